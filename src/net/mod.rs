//! [`Net`]: a declared layer graph that trains like any candle model and that
//! [`compress`](crate::compress::compress) understands.
//!
//! candle keeps its op graph private, so the structure that pruning needs (which layer
//! produces which units, and who consumes them) is declared: a [`NetSpec`] lists nodes in
//! topological order, and [`NetBuilder`] builds one through a `VarBuilder`, checking at
//! every step that shapes chain.
//!
//! ```
//! use candle::{DType, Device, ModuleT, Tensor};
//! use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
//! use candle_sbp::net::{NetBuilder, NodeShape};
//! use candle_sbp::LogNormalDropoutConfig;
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let mut b = NetBuilder::new(NodeShape::image(1, 12, 12), vb);
//! let x = b.input();
//! let x = b.conv2d("conv1", x, 8, 3, Conv2dConfig::default())?;
//! let x = b.log_normal_dropout("sbp1", x, LogNormalDropoutConfig::default())?;
//! let x = b.relu(x)?;
//! let x = b.max_pool2d(x, 2, 2)?;
//! let x = b.flatten(x)?;
//! let x = b.linear("fc1", x, 10)?;
//! let net = b.build(x)?;
//! net.reset_parameters(42)?; // seeded initialisation
//!
//! let images = Tensor::zeros((4, 1, 12, 12), DType::F32, &Device::Cpu)?;
//! let logits = net.forward_t(&images, true)?;
//! assert_eq!(logits.dims(), &[4, 10]);
//! # Ok::<(), candle_sbp::Error>(())
//! ```

mod builder;
mod io;
mod plan;
mod spec;

use std::sync::{Arc, Mutex};

use candle::{DType, Device, Tensor, Var};
use candle_nn::{BatchNorm, BatchNormConfig, Linear, ModuleT, VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

pub use builder::{NetBuilder, NodeId};
pub use io::write_atomic;
pub use plan::InferencePlan;
pub use spec::{Activation, NetSpec, NodeShape, NodeSpec, Op};

pub(crate) use spec::{graph, infer_shape, param_specs};

use crate::error::{Error, Result};
use crate::layer::{log_normal_dropout, open_unit, stream_seed, LogNormalDropout};

/// A network declared as a graph of nodes (see the [module docs](self)). It is a
/// [`candle::ModuleT`]: `train = true` samples noise and dropout and updates batch-norm
/// statistics, `train = false` evaluates.
///
/// Every node may carry a keep mask on its output units; a masked unit is multiplied by 0
/// in training and evaluation alike, and [`compress`](crate::compress::compress) removes
/// it physically.
#[derive(Debug, Clone)]
pub struct Net {
    spec: NetSpec,
    shapes: Vec<NodeShape>,
    nodes: Vec<NodeImpl>,
    params: Vec<Vec<(&'static str, Tensor)>>,
    masks: Vec<Option<NodeMask>>,
    last_use: Vec<usize>,
    /// Per node: its consumer, where exactly one node reads it and reads nothing else (the
    /// pairs a fused op may take together).
    sole_consumer: Vec<Option<usize>>,
    dtype: DType,
    device: Device,
    varmap: Option<OwnedVars>,
    /// Where evaluation may split the batch ([`batch_chunks`](Self::batch_chunks)): the
    /// multiply-adds of the largest layer per example.
    split_macs: Option<usize>,
}

/// The `VarMap` of a network this crate created; a newtype only for `Debug`.
#[derive(Clone)]
struct OwnedVars(VarMap);

impl std::fmt::Debug for OwnedVars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VarMap({} vars)", self.0.all_vars().len())
    }
}

#[derive(Debug, Clone)]
struct NodeMask {
    keep: Vec<bool>,
    tensor: Tensor,
}

#[derive(Debug, Clone)]
enum NodeImpl {
    Plain,
    Conv {
        weight: Tensor,
        bias: Option<Tensor>,
    },
    Linear(Linear),
    BatchNorm(BatchNorm),
    Noise(LogNormalDropout),
    Dropout(Arc<Mutex<StdRng>>),
    Indices(Tensor),
    Vector(Tensor),
}

impl Net {
    /// Builds the network `spec` with parameters taken from (or created in) `vb`, under the
    /// names `node.param` (`conv1.weight`, `bn1.running_mean`, `sbp1.mu`, …).
    pub fn new(spec: NetSpec, vb: VarBuilder) -> Result<Self> {
        let shapes = spec.shapes()?;
        let n = spec.nodes.len();
        let mut nodes = Vec::with_capacity(n);
        let mut params = Vec::with_capacity(n);
        for (i, node) in spec.nodes.iter().enumerate() {
            let vbn = vb.pp(&node.name);
            let input = node.inputs.first().map_or(shapes[i], |&j| shapes[j]);
            let mut own: Vec<(&'static str, Tensor)> = Vec::new();
            let specs = param_specs(&node.op, &input, &shapes[i]);
            let imp = match &node.op {
                Op::BatchNorm {
                    eps,
                    momentum,
                    affine,
                } => {
                    let config = BatchNormConfig {
                        eps: *eps,
                        remove_mean: true,
                        affine: *affine,
                        momentum: *momentum,
                    };
                    let bn = candle_nn::batch_norm(shapes[i].units(), config, vbn)?;
                    own.push(("running_mean", bn.running_mean().clone()));
                    own.push(("running_var", bn.running_var().clone()));
                    if let Some((w, b)) = bn.weight_and_bias() {
                        own.push(("weight", w.clone()));
                        own.push(("bias", b.clone()));
                    }
                    NodeImpl::BatchNorm(bn)
                }
                Op::LogNormalDropout { config } => {
                    let layer = log_normal_dropout(shapes[i].units(), *config, vbn)?;
                    own.push(("mu", layer.mu().clone()));
                    own.push(("log_sigma", layer.log_sigma().clone()));
                    NodeImpl::Noise(layer)
                }
                op => {
                    for p in &specs {
                        own.push((
                            p.name,
                            vbn.get_with_hints(p.shape.as_slice(), p.name, p.init)?,
                        ));
                    }
                    let get =
                        |name: &str| own.iter().find(|(n, _)| *n == name).map(|(_, t)| t.clone());
                    match op {
                        Op::Conv2d { .. } => NodeImpl::Conv {
                            weight: get("weight").expect("conv weight declared"),
                            bias: get("bias"),
                        },
                        Op::Linear { .. } => NodeImpl::Linear(Linear::new(
                            get("weight").expect("linear weight declared"),
                            get("bias"),
                        )),
                        Op::Dropout { .. } => NodeImpl::Dropout(Arc::new(Mutex::new(
                            StdRng::seed_from_u64(stream_seed(0, &node.name)),
                        ))),
                        Op::Select { indices } | Op::Scatter { indices, .. } => {
                            NodeImpl::Indices(index_tensor(indices, vb.device())?)
                        }
                        Op::Scale => NodeImpl::Vector(get("scale").expect("scale declared")),
                        Op::Shift { .. } => NodeImpl::Vector(get("shift").expect("shift declared")),
                        _ => NodeImpl::Plain,
                    }
                }
            };
            nodes.push(imp);
            params.push(own);
        }
        let mut last_use = vec![0; n];
        for (i, node) in spec.nodes.iter().enumerate() {
            for &j in &node.inputs {
                last_use[j] = last_use[j].max(i);
            }
        }
        last_use[n - 1] = usize::MAX;
        let sole_consumer = (0..n)
            .map(|i| {
                let mut readers = (0..n).filter(|&j| spec.nodes[j].inputs.contains(&i));
                match (readers.next(), readers.next()) {
                    (Some(j), None) if spec.nodes[j].inputs == [i] => Some(j),
                    _ => None,
                }
            })
            .collect();
        let split_macs = batch_splittable(&spec, &shapes);
        Ok(Self {
            split_macs,
            spec,
            shapes,
            nodes,
            params,
            masks: vec![None; n],
            last_use,
            sole_consumer,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            varmap: None,
        })
    }

    /// The architecture.
    pub fn spec(&self) -> &NetSpec {
        &self.spec
    }
    /// Each node's output shape (one example).
    pub fn shapes(&self) -> &[NodeShape] {
        &self.shapes
    }
    /// The shape of one input example.
    pub fn input_shape(&self) -> NodeShape {
        self.shapes[0]
    }
    /// The shape of one output example.
    pub fn output_shape(&self) -> NodeShape {
        *self.shapes.last().expect("a net has nodes")
    }
    /// The parameters' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The parameters' device.
    pub fn device(&self) -> &Device {
        &self.device
    }
    /// The `VarMap` holding the parameters of a network this crate created (by
    /// [`Net::load`] or [`compress`](crate::compress::compress)); `None` for a network built
    /// on the caller's own `VarBuilder`.
    pub fn varmap(&self) -> Option<&VarMap> {
        self.varmap.as_ref().map(|v| &v.0)
    }
    pub(crate) fn set_varmap(&mut self, varmap: VarMap) {
        self.varmap = Some(OwnedVars(varmap));
    }

    /// The index of the node called `name`.
    pub fn node_index(&self, name: &str) -> Result<usize> {
        self.spec
            .nodes
            .iter()
            .position(|n| n.name == name)
            .ok_or_else(|| graph(name, "there is no node of that name in this network"))
    }

    /// The number of units (channels or features) of the output of the node called `name`.
    pub fn node_units(&self, name: &str) -> Result<usize> {
        Ok(self.shapes[self.node_index(name)?].units())
    }

    /// The parameter `param` (`"weight"`, `"running_mean"`, …) of node `node`.
    pub fn param(&self, node: usize, param: &str) -> Option<&Tensor> {
        self.params
            .get(node)?
            .iter()
            .find(|(n, _)| *n == param)
            .map(|(_, t)| t)
    }

    /// The names of node `node`'s parameters.
    pub fn param_names(&self, node: usize) -> Vec<&'static str> {
        self.params
            .get(node)
            .map(|own| own.iter().map(|(n, _)| *n).collect())
            .unwrap_or_default()
    }

    /// Every parameter with its full name (`node.param`), in node order.
    pub fn named_params(&self) -> Vec<(String, Tensor)> {
        self.spec
            .nodes
            .iter()
            .zip(&self.params)
            .flat_map(|(node, own)| {
                own.iter()
                    .map(move |(p, t)| (format!("{}.{p}", node.name), t.clone()))
            })
            .collect()
    }

    /// The noise layers, with their node indices.
    pub fn noise_layers(&self) -> Vec<(usize, &LogNormalDropout)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| match n {
                NodeImpl::Noise(l) => Some((i, l)),
                _ => None,
            })
            .collect()
    }

    /// The sum of every noise layer's KL divergence: a scalar tensor, differentiable in the
    /// noise parameters (zero when there are no noise layers). The SBP objective is
    /// `cross-entropy + kl() / N_train`.
    pub fn kl(&self) -> Result<Tensor> {
        let mut total = Tensor::zeros((), self.dtype, &self.device)?;
        for (_, layer) in self.noise_layers() {
            total = total.add(&layer.kl()?.to_dtype(self.dtype)?)?;
        }
        Ok(total)
    }

    /// Restarts every random stream (noise layers and dropout) from `seed`, each mixed with
    /// its node's name.
    pub fn reseed(&self, seed: u64) {
        for (node, imp) in self.spec.nodes.iter().zip(&self.nodes) {
            match imp {
                NodeImpl::Noise(l) => l.reseed(seed),
                NodeImpl::Dropout(rng) => {
                    *rng.lock().unwrap_or_else(|e| e.into_inner()) =
                        StdRng::seed_from_u64(stream_seed(seed, &node.name))
                }
                _ => {}
            }
        }
    }

    /// Re-initialises every parameter from a generator seeded with `seed`: Kaiming-normal
    /// weights and uniform `±1/sqrt(fan_in)` biases for Conv2d and Linear (candle-nn's
    /// defaults, made reproducible), identity batch norms, and noise layers at their
    /// configured `mu_init` and `log_sigma_init`. Needs parameters that are variables
    /// (built from a `VarMap`).
    pub fn reset_parameters(&self, seed: u64) -> Result<()> {
        for (i, node) in self.spec.nodes.iter().enumerate() {
            let input = node
                .inputs
                .first()
                .map_or(self.shapes[i], |&j| self.shapes[j]);
            for p in param_specs(&node.op, &input, &self.shapes[i]) {
                let full = format!("{}.{}", node.name, p.name);
                let tensor = self.param(i, p.name).expect("declared parameter exists");
                if !tensor.is_variable() {
                    return Err(graph(
                        &node.name,
                        format!("{full} is not a variable; build the network from a VarMap to re-initialise it"),
                    ));
                }
                let numel: usize = p.shape.iter().product();
                let fan_in: usize = p.shape.iter().skip(1).product::<usize>().max(1);
                let mut rng = StdRng::seed_from_u64(stream_seed(seed, &full));
                let values: Vec<f64> = match p.init {
                    candle_nn::Init::Const(c) => vec![c; numel],
                    candle_nn::Init::Uniform { lo, up } => (0..numel)
                        .map(|_| lo + (up - lo) * open_unit(&mut rng))
                        .collect(),
                    _ => {
                        // Kaiming normal, fan-in, ReLU gain.
                        let std = (2.0 / fan_in as f64).sqrt();
                        let normal = Normal::new(0.0, std).expect("finite std");
                        (0..numel).map(|_| normal.sample(&mut rng)).collect()
                    }
                };
                let fresh = Tensor::from_vec(values, p.shape.as_slice(), &self.device)?
                    .to_dtype(tensor.dtype())?;
                Var::from_tensor(tensor)?.set(&fresh)?;
            }
        }
        Ok(())
    }

    /// Sets the keep mask of node `node`'s output units (`true` keeps). The mask acts in
    /// training and evaluation, and [`compress`](crate::compress::compress) removes the
    /// masked units.
    pub fn set_mask(&mut self, node: &str, keep: &[bool]) -> Result<()> {
        let i = self.node_index(node)?;
        let units = self.shapes[i].units();
        if keep.len() != units {
            return Err(Error::Mask {
                layer: node.into(),
                reason: format!("{} entries for {units} units", keep.len()),
            });
        }
        if i + 1 == self.nodes.len() {
            return Err(Error::Mask {
                layer: node.into(),
                reason: "the output node cannot be masked (its units are the network's outputs)"
                    .into(),
            });
        }
        let values: Vec<f32> = keep.iter().map(|&k| if k { 1.0 } else { 0.0 }).collect();
        let tensor = Tensor::from_vec(values, self.shapes[i].unit_broadcast_dims(), &self.device)?
            .to_dtype(self.dtype)?;
        self.masks[i] = Some(NodeMask {
            keep: keep.to_vec(),
            tensor,
        });
        Ok(())
    }

    /// Replaces every mask by `masks` (node name → keep mask).
    pub fn set_masks(
        &mut self,
        masks: &std::collections::BTreeMap<String, Vec<bool>>,
    ) -> Result<()> {
        self.clear_masks();
        for (name, keep) in masks {
            self.set_mask(name, keep)?;
        }
        Ok(())
    }

    /// Writes `values` (full names and tensors, in the order of [`Net::named_params`]) into
    /// this network's parameters, which must be variables.
    pub fn assign_params(&self, values: &[(String, Tensor)]) -> Result<()> {
        let params = self.named_params();
        if params.len() != values.len() {
            return Err(graph(
                "<net>",
                format!("{} values for {} parameters", values.len(), params.len()),
            ));
        }
        for ((name, dst), (src_name, src)) in params.into_iter().zip(values) {
            if &name != src_name {
                return Err(graph(
                    &name,
                    format!("got a value for {src_name} in its place"),
                ));
            }
            if !dst.is_variable() {
                return Err(graph(
                    &name,
                    "not a variable: build the network from a VarMap",
                ));
            }
            Var::from_tensor(&dst)?.set(&src.to_dtype(dst.dtype())?)?;
        }
        Ok(())
    }

    /// Removes node `node`'s mask.
    pub fn clear_mask(&mut self, node: &str) -> Result<()> {
        let i = self.node_index(node)?;
        self.masks[i] = None;
        Ok(())
    }

    /// Removes every mask.
    pub fn clear_masks(&mut self) {
        self.masks.iter_mut().for_each(|m| *m = None);
    }

    /// Node `node`'s keep mask, if it has one.
    pub fn mask(&self, node: usize) -> Option<&[bool]> {
        self.masks.get(node)?.as_ref().map(|m| m.keep.as_slice())
    }

    /// Every mask, by node name.
    pub fn masks(&self) -> std::collections::BTreeMap<String, Vec<bool>> {
        self.spec
            .nodes
            .iter()
            .zip(&self.masks)
            .filter_map(|(n, m)| m.as_ref().map(|m| (n.name.clone(), m.keep.clone())))
            .collect()
    }

    /// Runs the network and returns its output (typed errors; see also the
    /// [`candle::ModuleT`] implementation).
    ///
    /// In evaluation on the CPU, a network of small convolutions and linear layers with
    /// ReLUs, pooling, flattening and unit selections (a compressed network), unmasked,
    /// runs its batch in one chunk a thread, each chunk through the whole network on one
    /// thread: splitting every small product across the threads instead would cost a
    /// handoff a layer and leave a core idle through the small ones.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        let chunks = self.batch_chunks(xs, train);
        if chunks.len() <= 1 {
            return Ok(self.forward_with(xs, train, &[])?.0);
        }
        // Only this crate's kernels (which run on the calling thread inside the pool) and
        // views of tensors run in a chunk: a candle op that used candle's pool from inside
        // it would wait for the pool it runs on.
        let outs = crate::par::map(chunks, |_, (start, len)| {
            Ok(self.forward_with(&xs.narrow(0, start, len)?, false, &[])?.0)
        });
        let outs = outs.into_iter().collect::<Result<Vec<Tensor>>>()?;
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// The `(start, len)` batch chunks that [`forward_t`](Self::forward_t) runs side by
    /// side; a single chunk where it runs the batch whole.
    fn batch_chunks(&self, xs: &Tensor, train: bool) -> Vec<(usize, usize)> {
        let batch = xs.dims().first().copied().unwrap_or(0);
        let small = self
            .split_macs
            .is_some_and(|m| m.saturating_mul(batch) <= SPLIT_MAX_MACS);
        // Other dtypes than f32 and f64 go to candle's ops.
        let splits = small
            && !train
            && crate::ops::cpu_kernels()
            && matches!(self.dtype, DType::F32 | DType::F64)
            && xs.device().is_cpu()
            && xs.dims() == self.shapes[0].dims(batch).as_slice()
            && self.masks.iter().all(Option::is_none);
        let chunks = if splits {
            crate::par::threads().min(batch / MIN_CHUNK_ROWS).max(1)
        } else {
            1
        };
        let size = batch.div_ceil(chunks).max(1);
        (0..batch)
            .step_by(size)
            .map(|a| (a, size.min(batch - a)))
            .collect()
    }

    /// Runs the network and also returns the outputs of the nodes `taps` (in that order),
    /// after their masks: what activation-based pruning criteria look at.
    pub fn forward_with(
        &self,
        xs: &Tensor,
        train: bool,
        taps: &[usize],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let n = self.nodes.len();
        if let Some(&bad) = taps.iter().find(|&&t| t >= n) {
            return Err(graph("<net>", format!("no node {bad} to tap ({n} nodes)")));
        }
        let want = self.shapes[0].dims(xs.dims().first().copied().unwrap_or(0));
        if xs.dims() != want.as_slice() || want[0] == 0 {
            return Err(Error::InputShape {
                layer: self.spec.nodes[0].name.clone(),
                shape: xs.dims().to_vec(),
                reason: format!("expected (batch ≥ 1, {:?})", &want[1..]),
            });
        }
        // In training, the noise layers' draws shared by the batch are made together; what
        // this pass does not take is dropped at its end.
        let _draws = if train {
            let layers = self.noise_layers().into_iter().map(|(_, l)| l).collect();
            Some(crate::layer::PreparedDraws::new(layers)?)
        } else {
            None
        };
        let mut values: Vec<Option<Tensor>> = vec![None; n];
        let mut tapped: Vec<Option<Tensor>> = vec![None; taps.len()];
        // Per postponed node: the chain of postponed nodes ending with it (see `defers`).
        let mut deferred: Vec<Option<Vec<usize>>> = vec![None; n];
        for i in 0..n {
            let out = {
                let ins: Vec<&Tensor> = self.spec.nodes[i]
                    .inputs
                    .iter()
                    .map(|&j| {
                        values[j]
                            .as_ref()
                            .expect("inputs are computed and kept until last use")
                    })
                    .collect();
                let chain = self.spec.nodes[i]
                    .inputs
                    .first()
                    .and_then(|&k| deferred[k].take());
                let out = if i == 0 {
                    xs.to_dtype(self.dtype)?
                } else if self.defers(i, train, taps, want[0]) {
                    // Held back for its consumer to apply with it; it passes on the input
                    // of its chain.
                    let mut chain = chain.unwrap_or_default();
                    chain.push(i);
                    deferred[i] = Some(chain);
                    ins[0].clone()
                } else if let Some(mut chain) = chain {
                    chain.push(i);
                    self.run_chain(&chain, ins[0], train)?
                } else {
                    self.apply(i, &ins, train)?
                };
                match &self.masks[i] {
                    Some(m) => crate::ops::scale_units(&out, &m.tensor.flatten_all()?)?,
                    None => out,
                }
            };
            for (k, _) in taps.iter().enumerate().filter(|(_, &t)| t == i) {
                tapped[k] = Some(out.clone());
            }
            for &j in &self.spec.nodes[i].inputs {
                if self.last_use[j] == i {
                    values[j] = None;
                }
            }
            values[i] = Some(out);
        }
        let output = values[n - 1].take().expect("the output node was computed");
        Ok((
            output,
            tapped
                .into_iter()
                .map(|t| t.expect("every tap was computed"))
                .collect(),
        ))
    }

    /// Whether node `i` may leave its work to its only consumer, which then runs the chain
    /// of such nodes ending with it ([`run_chain`](Self::run_chain)): a convolution or
    /// linear layer followed by a ReLU or by a noise layer that folds into its weights, a
    /// noise layer followed by a ReLU and a ReLU followed by a noise layer; in evaluation a
    /// convolution or ReLU followed by max-pooling; in training a noise layer followed by
    /// a linear layer (see [`LogNormalDropout::forward_into_linear`], and
    /// [`folds_into_next`](Self::folds_into_next)). Only for an unmasked, untapped node.
    fn defers(&self, i: usize, train: bool, taps: &[usize], batch: usize) -> bool {
        if self.masks[i].is_some() || taps.contains(&i) {
            return false;
        }
        let Some(j) = self.sole_consumer[i] else {
            return false;
        };
        let pooled = !train && matches!(self.spec.nodes[j].op, Op::MaxPool2d { .. });
        if self.weighted(i) && (self.relu(j) || self.folds(i, j, train, batch) || pooled) {
            return true;
        }
        match (&self.nodes[i], &self.nodes[j]) {
            (NodeImpl::Noise(layer), NodeImpl::Linear(_)) if train => {
                layer.config().noise == crate::layer::NoiseMode::SharedPerBatch
            }
            (NodeImpl::Noise(_), _) => self.relu(j),
            (_, NodeImpl::Noise(_)) => self.relu(i),
            _ => self.relu(i) && pooled,
        }
    }

    fn relu(&self, k: usize) -> bool {
        matches!(
            self.spec.nodes[k].op,
            Op::Activation {
                f: Activation::Relu
            }
        )
    }

    fn weighted(&self, k: usize) -> bool {
        matches!(
            (&self.spec.nodes[k].op, &self.nodes[k]),
            (Op::Conv2d { .. }, NodeImpl::Conv { .. }) | (Op::Linear { .. }, NodeImpl::Linear(_))
        )
    }

    /// Whether noise node `n` folds into the weights of layer `w` before it: in evaluation
    /// (the multiplier `E[θ]` or 0), in training for a draw shared by the batch, and where
    /// the weights are no larger than the layer's output (scaling them, and their
    /// gradient, must cost less than scaling the output: not so for LeNet5's first linear
    /// layer, 400k weights for 500 outputs a sample).
    fn folds(&self, w: usize, n: usize, train: bool, batch: usize) -> bool {
        let weight = match &self.nodes[w] {
            NodeImpl::Conv { weight, .. } => weight,
            NodeImpl::Linear(l) => l.weight(),
            _ => return false,
        };
        let small = weight.elem_count() <= batch * self.shapes[w].numel();
        small && matches!(&self.nodes[n], NodeImpl::Noise(l) if l.foldable(train))
    }

    /// Whether noise node `n` folds into the input columns of linear layer `l` after it:
    /// where [`folds`](Self::folds) would fold it into a layer before it, and the weights
    /// are no larger than the noise layer's input (LeNet-500-300's last layer: 3,000
    /// weights against 30,000 activations at batch 100), so that scaling them and their
    /// gradient costs less than the noise layer's own passes.
    fn folds_into_next(&self, n: usize, l: usize, train: bool, batch: usize) -> bool {
        let (NodeImpl::Noise(layer), NodeImpl::Linear(linear)) = (&self.nodes[n], &self.nodes[l])
        else {
            return false;
        };
        layer.foldable(train) && linear.weight().elem_count() <= batch * layer.num_units()
    }

    /// Runs the postponed nodes `chain` (each the sole consumer of the one before, the last
    /// one not postponed) on `x`, the first one's input, in fused ops where they apply.
    fn run_chain(&self, chain: &[usize], x: &Tensor, train: bool) -> Result<Tensor> {
        let mut x = x.clone();
        let mut rest = chain;
        while !rest.is_empty() {
            let (y, used) = self.fused_front(rest, &x, train)?;
            x = y;
            rest = &rest[used..];
        }
        Ok(x)
    }

    /// The output of the first nodes of `chain` on `x`, taken together in the largest
    /// fused op that applies, and how many nodes it took.
    fn fused_front(&self, chain: &[usize], x: &Tensor, train: bool) -> Result<(Tensor, usize)> {
        let k = chain[0];
        let next = chain.get(1).copied();
        let batch = x.dim(0)?;

        if self.weighted(k) {
            // The layer, then a noise layer folded into its weights and a ReLU in either
            // order (θ·relu(z) = relu(θ·z) as θ > 0), then in evaluation a max-pooling.
            let (mut noise, mut with_relu, mut used) = (None, false, 1);
            for &n in &chain[1..] {
                if noise.is_none() && self.folds(k, n, train, batch) {
                    noise = Some(n);
                } else if !with_relu && self.relu(n) {
                    with_relu = true;
                } else {
                    break;
                }
                used += 1;
            }
            let theta = match noise.map(|n| &self.nodes[n]) {
                Some(NodeImpl::Noise(layer)) => Some(layer.fold_multiplier(train)?),
                _ => None,
            };
            let conv = matches!(self.spec.nodes[k].op, Op::Conv2d { .. });
            let pool = match chain.get(used).map(|&n| &self.spec.nodes[n].op) {
                Some(&Op::MaxPool2d { kernel, stride }) if conv && !train => Some((kernel, stride)),
                _ => None,
            };
            let y = self.weighted_layer(k, x, theta.as_ref(), with_relu, pool)?;
            return Ok((y, used + usize::from(pool.is_some())));
        }
        if let (NodeImpl::Noise(layer), Some(j)) = (&self.nodes[k], next) {
            if let NodeImpl::Linear(l) = &self.nodes[j] {
                // A ReLU and a noise layer on the outputs, in either order (θ·relu(z) =
                // relu(θ·z) as θ > 0), go into the same op.
                let (mut out, mut relu, mut used) = (None, false, 2);
                for &n in &chain[2..] {
                    match &self.nodes[n] {
                        NodeImpl::Noise(o)
                            if out.is_none() && o.foldable(train) && o.divides_back() =>
                        {
                            out = Some(o)
                        }
                        _ if !relu && self.relu(n) => relu = true,
                        _ => break,
                    }
                    used += 1;
                }
                // A ReLU whose noise layer is left out of the chain (tapped) stays with
                // that layer's own pass.
                if relu && out.is_none() {
                    let r = chain[used - 1];
                    if let Some(NodeImpl::Noise(_)) = self.sole_consumer[r].map(|n| &self.nodes[n])
                    {
                        (relu, used) = (false, used - 1);
                    }
                }
                let params = (l.weight(), l.bias());
                if let Some(y) = layer.forward_into_linear(x, train, params, relu, out)? {
                    return Ok((y, used));
                }
                if self.folds_into_next(k, j, train, batch) {
                    // (x ⊙ θ)·wᵀ = x·(w·diag θ)ᵀ: the weights' columns scaled, with a ReLU
                    // after the layer in the same op.
                    let units = layer.num_units();
                    let theta = layer.fold_multiplier(train)?.reshape((1, units))?;
                    let w = l.weight().broadcast_mul(&theta)?;
                    let relu = chain.get(2).is_some_and(|&n| self.relu(n));
                    let y = crate::ops::linear_impl(x, &w, l.bias(), relu)?;
                    return Ok((y, 2 + usize::from(relu)));
                }
            }
            if self.relu(j) {
                return Ok((layer.forward_relu(x, train)?, 2));
            }
        }
        if let (true, Some(NodeImpl::Noise(layer))) = (self.relu(k), next.map(|j| &self.nodes[j])) {
            return Ok((layer.forward_relu(x, train)?, 2));
        }
        Ok((self.apply(k, &[x], train)?, 1))
    }

    /// Convolution or linear node `k` on `x`, with its weights and bias multiplied by `θ`
    /// per output unit where given, a ReLU in the same op where `relu`, and for a
    /// convolution a max-pooling `(kernel, stride)` after it where given.
    fn weighted_layer(
        &self,
        k: usize,
        x: &Tensor,
        theta: Option<&Tensor>,
        relu: bool,
        pool: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let scaled = |w: &Tensor, b: Option<&Tensor>| -> Result<(Tensor, Option<Tensor>)> {
            let Some(t) = theta else {
                return Ok((w.clone(), b.cloned()));
            };
            let mut per_unit = vec![1; w.rank()];
            per_unit[0] = t.elem_count();
            let w = w.broadcast_mul(&t.reshape(per_unit)?)?;
            let b = b.map(|b| b.mul(t)).transpose()?;
            Ok((w, b))
        };
        let name = &self.spec.nodes[k].name;
        match (&self.spec.nodes[k].op, &self.nodes[k]) {
            (
                &Op::Conv2d {
                    stride,
                    padding,
                    dilation,
                    groups,
                    ..
                },
                NodeImpl::Conv { weight, bias },
            ) => {
                let (w, b) = scaled(weight, bias.as_ref())?;
                let params = (padding, stride, dilation, groups);
                Ok(match pool {
                    Some(pool) => {
                        crate::ops::conv2d_max_pool2d(x, &w, b.as_ref(), params, relu, pool)?
                    }
                    None => crate::ops::conv2d_impl(x, &w, b.as_ref(), params, relu)?,
                })
            }
            (Op::Linear { .. }, NodeImpl::Linear(l)) => {
                let (w, b) = scaled(l.weight(), l.bias())?;
                Ok(crate::ops::linear_impl(x, &w, b.as_ref(), relu)?)
            }
            _ => Err(graph(name, "internal: not a weighted layer".to_string())),
        }
    }

    fn apply(&self, i: usize, ins: &[&Tensor], train: bool) -> Result<Tensor> {
        let x = ins[0];
        let node = &self.spec.nodes[i];
        let out = match (&node.op, &self.nodes[i]) {
            (Op::Conv2d { .. }, NodeImpl::Conv { .. })
            | (Op::Linear { .. }, NodeImpl::Linear(_)) => {
                self.weighted_layer(i, x, None, false, None)?
            }
            (Op::BatchNorm { .. }, NodeImpl::BatchNorm(bn)) => bn.forward_t(x, train)?,
            (Op::Activation { f }, _) => match *f {
                Activation::Relu => x.relu()?,
                Activation::LeakyRelu { slope } => (x.relu()? - (x.neg()?.relu()? * slope)?)?,
                Activation::Gelu => x.gelu_erf()?,
                Activation::Tanh => x.tanh()?,
                Activation::Sigmoid => candle_nn::ops::sigmoid(x)?,
                Activation::Silu => x.silu()?,
            },
            (&Op::MaxPool2d { kernel, stride }, _) => crate::ops::max_pool2d(x, kernel, stride)?,
            (&Op::AvgPool2d { kernel, stride }, _) => crate::ops::avg_pool2d(x, kernel, stride)?,
            (Op::Flatten, _) => x.flatten_from(1)?,
            (&Op::Dropout { p }, NodeImpl::Dropout(rng)) => {
                if train && p > 0.0 {
                    let keep_scale = 1.0 / (1.0 - p);
                    let mut rng = rng.lock().unwrap_or_else(|e| e.into_inner());
                    let mask: Vec<f32> = (0..x.elem_count())
                        .map(|_| {
                            if open_unit(&mut rng) >= p {
                                keep_scale as f32
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    let mask = Tensor::from_vec(mask, x.dims(), x.device())?.to_dtype(x.dtype())?;
                    (x * mask)?
                } else {
                    x.clone()
                }
            }
            (Op::LogNormalDropout { .. }, NodeImpl::Noise(layer)) => layer.forward_t(x, train)?,
            (Op::Add, _) => {
                let mut sum = x.clone();
                for y in &ins[1..] {
                    sum = (sum + *y)?;
                }
                sum
            }
            (Op::Concat, _) => Tensor::cat(ins, 1)?,
            (Op::Select { indices }, NodeImpl::Indices(idx)) => {
                crate::ops::select_units(x, indices, idx)?
            }
            (Op::Scatter { .. }, NodeImpl::Indices(idx)) => {
                let zeros = Tensor::zeros(self.shapes[i].dims(x.dim(0)?), x.dtype(), x.device())?;
                zeros.index_add(idx, x, 1)?
            }
            (Op::Scale, NodeImpl::Vector(s)) => {
                x.broadcast_mul(&s.reshape(self.shapes[i].unit_broadcast_dims())?)?
            }
            (&Op::Shift { per_position }, NodeImpl::Vector(s)) => {
                if per_position {
                    x.broadcast_add(&s.unsqueeze(0)?)?
                } else {
                    x.broadcast_add(&s.reshape(self.shapes[i].unit_broadcast_dims())?)?
                }
            }
            (op, _) => {
                return Err(graph(
                    &node.name,
                    format!("internal: no implementation for a {} node", op.kind()),
                ))
            }
        };
        Ok(out)
    }
}

impl candle::ModuleT for Net {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle::Result<Tensor> {
        Net::forward_t(self, xs, train).map_err(Error::into_candle)
    }
}

/// Above this many multiply-adds in one layer over the whole batch, splitting that layer's
/// product across the threads pays for its handoff: evaluation then runs the batch whole.
/// Between LeNet-500-300's first layer (39M at batch 100: 0.71 ms whole, 0.78 ms split)
/// and compressed LeNet5's convolutions (10M: 0.347 ms whole, 0.315 ms split).
const SPLIT_MAX_MACS: usize = 1 << 24;

/// The fewest examples in a batch chunk.
const MIN_CHUNK_ROWS: usize = 8;

/// The multiply-adds per example of the largest layer of a network made only of nodes
/// that evaluate through this crate's kernels or as views (see [`Net::forward_t`]);
/// `None` for any other network.
fn batch_splittable(spec: &NetSpec, shapes: &[NodeShape]) -> Option<usize> {
    let mut largest = 0;
    for (i, node) in spec.nodes.iter().enumerate() {
        let out = shapes[i];
        let input = node.inputs.first().map_or(out, |&j| shapes[j]);
        let macs = match node.op {
            // Grouped convolutions are candle's, and so is the bias add after them.
            Op::Conv2d { groups: 1, .. } | Op::Linear { .. } => node.op.macs(input, out),
            Op::Input { .. }
            | Op::Activation {
                f: Activation::Relu,
            }
            | Op::MaxPool2d { .. }
            | Op::Flatten
            | Op::Select { .. } => 0,
            _ => return None,
        };
        largest = largest.max(macs);
    }
    Some(largest)
}

pub(crate) fn index_tensor(indices: &[usize], device: &Device) -> Result<Tensor> {
    let idx: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
    Ok(Tensor::from_vec(idx, indices.len(), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{NetBuilder, NodeShape};
    use candle_nn::VarBuilder;

    /// A small compressed-style network: every node type an evaluation may split over.
    fn small_net(varmap: &VarMap) -> Net {
        let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
        let mut b = NetBuilder::new(NodeShape::image(1, 12, 12), vb);
        let x = b.input();
        let x = b.conv2d("conv1", x, 3, 5, Default::default()).unwrap();
        let x = b.relu(x).unwrap();
        let x = b.max_pool2d(x, 2, 2).unwrap();
        let x = b.flatten(x).unwrap();
        let select = Op::Select {
            indices: vec![0, 2, 3, 7, 11, 19, 40, 47],
        };
        let x = b.push("keep", select, &[x]).unwrap();
        let x = b.linear("fc1", x, 6).unwrap();
        let x = b.relu(x).unwrap();
        let x = b.linear("fc2", x, 4).unwrap();
        let net = b.build(x).unwrap();
        net.reset_parameters(3).unwrap();
        net
    }

    #[test]
    fn evaluation_splits_small_networks_by_batch_with_the_same_outputs() {
        let varmap = VarMap::new();
        let mut net = small_net(&varmap);
        // 37 examples: chunks of unequal length.
        let x = Tensor::randn(0f32, 1., (37, 1, 12, 12), &Device::Cpu).unwrap();
        let chunks = net.batch_chunks(&x, false);
        let expected = crate::par::threads().min(37 / MIN_CHUNK_ROWS);
        assert_eq!(chunks.len(), expected.max(1));
        let covered: usize = chunks.iter().map(|c| c.1).sum();
        assert_eq!(covered, 37);
        assert!(chunks.windows(2).all(|w| w[0].0 + w[0].1 == w[1].0));
        // Training, masks and small batches run whole.
        assert_eq!(net.batch_chunks(&x, true).len(), 1);
        assert_eq!(
            net.batch_chunks(&x.narrow(0, 0, 7).unwrap(), false).len(),
            1
        );

        // The split pass gives each example what a pass over it alone gives.
        let split = net.forward_t(&x, false).unwrap();
        for k in [0, 18, 19, 36] {
            let one = net
                .forward_with(&x.narrow(0, k, 1).unwrap(), false, &[])
                .unwrap()
                .0;
            let diff = (split.narrow(0, k, 1).unwrap() - one)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "example {k}: {diff}");
        }
        net.set_mask("fc1", &[true, false, true, true, true, true])
            .unwrap();
        assert_eq!(net.batch_chunks(&x, false).len(), 1);
    }

    #[test]
    fn evaluation_runs_large_or_other_networks_whole() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        // LeNet-500-300's first layer: 39M multiply-adds at batch 100.
        let mlp = crate::models::lenet_500_300(None, vb.pp("mlp")).unwrap();
        let x = Tensor::zeros((100, 1, 28, 28), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(mlp.batch_chunks(&x, false).len(), 1);
        // Noise layers evaluate through candle's ops.
        let cfg = crate::LogNormalDropoutConfig::default();
        let sbp = crate::models::lenet_500_300(Some(cfg), vb.pp("sbp")).unwrap();
        let x = Tensor::zeros((20, 1, 28, 28), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(sbp.batch_chunks(&x, false).len(), 1);
    }
}
