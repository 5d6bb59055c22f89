//! [`compress`]: turns a trained [`Net`] into a physically smaller plain `Net` whose
//! evaluation output equals the original's.
//!
//! # How it works
//!
//! 1. **Multipliers.** Each noise layer becomes its evaluation-time multiplier: `E[θ]` on
//!    kept units (SNR above the threshold), 0 on removed ones. Node masks
//!    ([`Net::set_mask`]) multiply by 0 as well.
//! 2. **Constants, forwards.** Every unit of every node is either *live* or a known
//!    *constant*: a zeroed unit is the constant 0, a batch norm turns it into
//!    `β − γ·mean/σ`, an activation into `f(c)`, and so on. A layer whose inputs are all
//!    constant yields constants.
//! 3. **Need, backwards.** From the output, a unit is needed if a consumer reads it: a
//!    Linear or Conv2d reads all its live inputs, a unit-wise node reads unit `i` if its
//!    output `i` is live and needed, a Flatten reads channel `c` if any of its `H×W`
//!    features is needed, and so on.
//! 4. **Surgery.** Units that are live and needed are kept; every layer is rebuilt on its
//!    kept units. Constant inputs of a Linear or of an unpadded Conv2d fold into its bias;
//!    those of a padded Conv2d become a per-position shift (zero padding makes their effect
//!    vary at the borders). Where a consumer needs fewer units than its producer keeps
//!    (other consumers need the rest), a `Select` node picks them; where branches of a
//!    residual add keep different units, a `Scatter` node lines them up.
//! 5. **Folding.** Each noise layer's multiplier is folded into the neighbouring
//!    Conv2d/Linear/BatchNorm weights, through ReLU, pooling and flatten nodes (which commute
//!    with a positive per-unit scale); only where no such neighbour exists does a `Scale`
//!    node remain.
//!
//! Residual adds keep a unit if any branch keeps it ([`ResidualPolicy::Union`], exact), or
//! only if every branch keeps it ([`ResidualPolicy::Intersection`]; the add's output is then
//! masked where the branches disagree, and [`Compressed::derived_masks`] says where, so the
//! same masks on the original network reproduce the compressed network's output).

use std::collections::{BTreeMap, HashSet};

use candle::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::error::{Error, Result};
use crate::net::{graph, index_tensor, Net, NetSpec, NodeShape, NodeSpec, Op};
use crate::report::CompressionReport;

/// How the branches of a residual add share units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum ResidualPolicy {
    /// A unit of the sum survives if any branch keeps it (exact: nothing is changed).
    #[default]
    Union,
    /// A unit of the sum survives only if every branch keeps it; the others are masked.
    Intersection,
}

/// Options of [`compress`].
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CompressConfig {
    /// How residual adds combine their branches' keeps.
    pub residual: ResidualPolicy,
    /// Allow a layer to lose every unit. By default a noise layer that would remove all of
    /// its units keeps the one with the highest SNR (and the report says so), and a mask
    /// or policy that empties a layer is an error.
    pub allow_empty: bool,
}

/// The result of [`compress`].
#[derive(Debug, Clone)]
pub struct Compressed {
    /// The smaller network: no noise layers, parameters in its own `VarMap`.
    pub net: Net,
    /// Units, parameters and MACs per layer, before and after.
    pub report: CompressionReport,
    /// Masks the compression added on the original network's nodes (residual
    /// intersection). Set them on the original network to reproduce exactly the compressed
    /// network's output.
    pub derived_masks: BTreeMap<String, Vec<bool>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    Live,
    Const(f64),
}

impl Slot {
    fn is_live(self) -> bool {
        matches!(self, Slot::Live)
    }
    fn value(self) -> f64 {
        match self {
            Slot::Live => 0.0,
            Slot::Const(c) => c,
        }
    }
}

/// Compresses `net` with the noise layers' own keep masks and the net's node masks.
///
/// ```
/// use candle::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use candle_sbp::compress::{compress, CompressConfig};
/// use candle_sbp::net::{NetBuilder, NodeShape};
///
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let mut b = NetBuilder::new(NodeShape::features(6), vb);
/// let x = b.input();
/// let x = b.linear("fc1", x, 5)?;
/// let x = b.relu(x)?;
/// let x = b.linear("fc2", x, 3)?;
/// let mut net = b.build(x)?;
/// net.reset_parameters(1)?;
/// net.set_mask("fc1", &[true, false, true, false, true])?; // drop hidden units 1 and 3
///
/// let small = compress(&net, &CompressConfig::default())?;
/// let xs = Tensor::randn(0f32, 1., (4, 6), &Device::Cpu)?;
/// let diff = (net.forward_t(&xs, false)? - small.net.forward_t(&xs, false)?)?
///     .abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-5);
/// assert_eq!(small.net.param(small.net.node_index("fc1")?, "weight").unwrap().dims(), &[3, 6]);
/// println!("{}", small.report);
/// # Ok::<(), candle_sbp::Error>(())
/// ```
pub fn compress(net: &Net, config: &CompressConfig) -> Result<Compressed> {
    let mut notes = Vec::new();
    let multipliers = noise_multipliers(net, config, &mut notes)?;
    let (states, derived) = forward_states(net, &multipliers, config)?;
    let kept = kept_units(net, &states);
    check_not_empty(net, &states, &kept, config)?;
    let mut emitter = Emitter::new(net.device().clone(), net.dtype());
    let output = emit(net, &states, &kept, &multipliers, &mut emitter, &mut notes)?;
    let output = emitter.fold_scales(output, &mut notes)?;
    let small = emitter.into_net(output)?;
    let report = CompressionReport::new(net, &small, &kept, notes)?;
    Ok(Compressed {
        net: small,
        report,
        derived_masks: derived,
    })
}

/// `t`'s values, flattened, in f64.
pub(crate) fn vec_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// Per node: `Some(multipliers)` for noise layers (0 on removed units).
fn noise_multipliers(
    net: &Net,
    config: &CompressConfig,
    notes: &mut Vec<String>,
) -> Result<Vec<Option<Vec<f64>>>> {
    let mut out = vec![None; net.spec().nodes.len()];
    for (i, layer) in net.noise_layers() {
        let mut m = layer.eval_multiplier_values()?;
        if !config.allow_empty && m.iter().all(|&v| v == 0.0) {
            let snr = layer.snr()?;
            let best = (0..snr.len())
                .max_by(|&a, &b| snr[a].total_cmp(&snr[b]))
                .expect("noise layers have units");
            m[best] = layer.mean()?[best];
            notes.push(format!(
                "{}: every unit has SNR at most {}; kept unit {best} (highest SNR, {:.3}) so that the layer is not empty",
                layer.name(),
                layer.config().snr_threshold,
                snr[best]
            ));
        }
        out[i] = Some(m);
    }
    Ok(out)
}

/// BatchNorm in evaluation as `a·x + c` per unit.
pub(crate) fn batch_norm_affine(net: &Net, i: usize, eps: f64) -> Result<(Vec<f64>, Vec<f64>)> {
    let mean = vec_f64(net.param(i, "running_mean").expect("bn mean"))?;
    let var = vec_f64(net.param(i, "running_var").expect("bn var"))?;
    let units = mean.len();
    let w = match net.param(i, "weight") {
        Some(t) => vec_f64(t)?,
        None => vec![1.0; units],
    };
    let b = match net.param(i, "bias") {
        Some(t) => vec_f64(t)?,
        None => vec![0.0; units],
    };
    let a: Vec<f64> = (0..units).map(|j| w[j] / (var[j] + eps).sqrt()).collect();
    let c = (0..units).map(|j| b[j] - a[j] * mean[j]).collect();
    Ok((a, c))
}

type States = Vec<Vec<Slot>>;

fn forward_states(
    net: &Net,
    multipliers: &[Option<Vec<f64>>],
    config: &CompressConfig,
) -> Result<(States, BTreeMap<String, Vec<bool>>)> {
    let spec = net.spec();
    let shapes = net.shapes();
    let mut states: States = Vec::with_capacity(spec.nodes.len());
    let mut derived = BTreeMap::new();
    for (i, node) in spec.nodes.iter().enumerate() {
        let units = shapes[i].units();
        let ins: Vec<&Vec<Slot>> = node.inputs.iter().map(|&j| &states[j]).collect();
        let mut out: Vec<Slot> = match &node.op {
            Op::Input { .. } => vec![Slot::Live; units],
            &Op::Conv2d {
                kernel,
                padding,
                groups,
                ..
            } => {
                let x = ins[0];
                let (cin, cout) = (x.len(), units);
                let (gin, gout) = (cin / groups, cout / groups);
                let bias = match net.param(i, "bias") {
                    Some(b) => vec_f64(b)?,
                    None => vec![0.0; cout],
                };
                let mut w = None;
                let mut out = Vec::with_capacity(cout);
                for (j, &b) in bias.iter().enumerate() {
                    let g = j / gout;
                    let group = &x[g * gin..(g + 1) * gin];
                    if group.iter().any(|s| s.is_live()) {
                        out.push(Slot::Live);
                        continue;
                    }
                    if padding > 0 && group.iter().any(|s| s.value() != 0.0) {
                        return Err(graph(
                            &node.name,
                            format!("output channel {j} reads only removed channels whose value is a nonzero constant (a batch norm or activation after the noise), and zero padding makes their effect vary over positions with no live channel left to carry it; put the noise layer after the activation, where a removed unit is 0"),
                        ));
                    }
                    let w = match &w {
                        Some(w) => w,
                        None => w.insert(vec_f64(net.param(i, "weight").expect("conv weight"))?),
                    };
                    let per_in = kernel * kernel;
                    let mut sum = b;
                    for (k, s) in group.iter().enumerate() {
                        let base = (j * gin + k) * per_in;
                        sum += s.value() * w[base..base + per_in].iter().sum::<f64>();
                    }
                    out.push(Slot::Const(sum));
                }
                out
            }
            Op::Linear { .. } => {
                let x = ins[0];
                if x.iter().any(|s| s.is_live()) {
                    vec![Slot::Live; units]
                } else {
                    let w = vec_f64(net.param(i, "weight").expect("linear weight"))?;
                    let b = match net.param(i, "bias") {
                        Some(b) => vec_f64(b)?,
                        None => vec![0.0; units],
                    };
                    (0..units)
                        .map(|j| {
                            let row = &w[j * x.len()..(j + 1) * x.len()];
                            Slot::Const(
                                b[j] + row.iter().zip(x).map(|(w, s)| w * s.value()).sum::<f64>(),
                            )
                        })
                        .collect()
                }
            }
            &Op::BatchNorm { eps, .. } => {
                let (a, c) = batch_norm_affine(net, i, eps)?;
                map_consts(ins[0], |j, v| a[j] * v + c[j])
            }
            Op::Activation { f } => map_consts(ins[0], |_, v| f.apply_f64(v)),
            Op::MaxPool2d { .. } | Op::AvgPool2d { .. } | Op::Dropout { .. } => ins[0].clone(),
            Op::Flatten => {
                let p = shapes[node.inputs[0]].positions();
                ins[0]
                    .iter()
                    .flat_map(|&s| std::iter::repeat_n(s, p))
                    .collect()
            }
            Op::LogNormalDropout { .. } => {
                let m = multipliers[i]
                    .as_ref()
                    .expect("noise layers have multipliers");
                ins[0]
                    .iter()
                    .zip(m)
                    .map(|(&s, &m)| match s {
                        _ if m == 0.0 => Slot::Const(0.0),
                        Slot::Live => Slot::Live,
                        Slot::Const(c) => Slot::Const(c * m),
                    })
                    .collect()
            }
            Op::Add => {
                let mut out = Vec::with_capacity(units);
                let mut mask = vec![true; units];
                for (j, keep) in mask.iter_mut().enumerate() {
                    let live = ins.iter().filter(|x| x[j].is_live()).count();
                    out.push(if live == 0 {
                        Slot::Const(ins.iter().map(|x| x[j].value()).sum())
                    } else if live < ins.len() && config.residual == ResidualPolicy::Intersection {
                        *keep = false;
                        Slot::Const(0.0)
                    } else {
                        Slot::Live
                    });
                }
                if mask.iter().any(|k| !k) {
                    derived.insert(node.name.clone(), mask);
                }
                out
            }
            Op::Concat => ins.iter().flat_map(|x| x.iter().copied()).collect(),
            Op::Select { indices } => indices.iter().map(|&k| ins[0][k]).collect(),
            Op::Scatter { indices, size } => {
                let mut out = vec![Slot::Const(0.0); *size];
                for (k, &j) in indices.iter().enumerate() {
                    out[j] = ins[0][k];
                }
                out
            }
            Op::Scale => {
                let s = vec_f64(net.param(i, "scale").expect("scale"))?;
                map_consts(ins[0], |j, v| s[j] * v)
            }
            &Op::Shift { per_position } => {
                let s = vec_f64(net.param(i, "shift").expect("shift"))?;
                if per_position {
                    // A per-position shift turns a constant channel into a fixed map: live.
                    vec![Slot::Live; units]
                } else {
                    map_consts(ins[0], |j, v| v + s[j])
                }
            }
        };
        if let Some(mask) = net.mask(i) {
            for (s, &k) in out.iter_mut().zip(mask) {
                if !k {
                    *s = Slot::Const(0.0);
                }
            }
        }
        if let Some(mask) = derived.get(&node.name) {
            for (s, &k) in out.iter_mut().zip(mask) {
                if !k {
                    *s = Slot::Const(0.0);
                }
            }
        }
        states.push(out);
    }
    Ok((states, derived))
}

fn map_consts(x: &[Slot], f: impl Fn(usize, f64) -> f64) -> Vec<Slot> {
    x.iter()
        .enumerate()
        .map(|(j, &s)| match s {
            Slot::Live => Slot::Live,
            Slot::Const(c) => Slot::Const(f(j, c)),
        })
        .collect()
}

/// Per node, the sorted units that are live and needed downstream.
fn kept_units(net: &Net, states: &States) -> Vec<Vec<usize>> {
    let spec = net.spec();
    let shapes = net.shapes();
    let n = spec.nodes.len();
    let mut needed: Vec<Vec<bool>> = shapes.iter().map(|s| vec![false; s.units()]).collect();
    needed[n - 1].iter_mut().for_each(|v| *v = true);
    for i in (1..n).rev() {
        let node = &spec.nodes[i];
        let used: Vec<bool> = needed[i]
            .iter()
            .zip(&states[i])
            .map(|(&need, s)| need && s.is_live())
            .collect();
        if !used.iter().any(|&u| u) {
            continue;
        }
        match &node.op {
            &Op::Conv2d { groups, .. } => {
                let e = node.inputs[0];
                let (gin, gout) = (needed[e].len() / groups, used.len() / groups);
                for g in 0..groups {
                    if used[g * gout..(g + 1) * gout].iter().any(|&u| u) {
                        needed[e][g * gin..(g + 1) * gin]
                            .iter_mut()
                            .for_each(|v| *v = true);
                    }
                }
            }
            Op::Linear { .. } => needed[node.inputs[0]].iter_mut().for_each(|v| *v = true),
            Op::Flatten => {
                let e = node.inputs[0];
                let p = shapes[e].positions();
                for (f, &u) in used.iter().enumerate() {
                    needed[e][f / p] |= u;
                }
            }
            Op::Add => {
                for &e in &node.inputs {
                    for (j, &u) in used.iter().enumerate() {
                        needed[e][j] |= u;
                    }
                }
            }
            Op::Concat => {
                let mut offset = 0;
                for &e in &node.inputs {
                    let len = needed[e].len();
                    for j in 0..len {
                        needed[e][j] |= used[offset + j];
                    }
                    offset += len;
                }
            }
            Op::Select { indices } => {
                let e = node.inputs[0];
                for (k, &j) in indices.iter().enumerate() {
                    needed[e][j] |= used[k];
                }
            }
            Op::Scatter { indices, .. } => {
                let e = node.inputs[0];
                for (k, &j) in indices.iter().enumerate() {
                    needed[e][k] |= used[j];
                }
            }
            Op::Input { .. } => {}
            _ => {
                // Unit-wise nodes.
                let e = node.inputs[0];
                for (j, &u) in used.iter().enumerate() {
                    needed[e][j] |= u;
                }
            }
        }
    }
    (0..n)
        .map(|i| {
            (0..states[i].len())
                .filter(|&j| needed[i][j] && states[i][j].is_live())
                .collect()
        })
        .collect()
}

/// Without `allow_empty`, no node on the path to the output may turn every live unit it
/// receives into a constant; the error names the first node that does.
fn check_not_empty(
    net: &Net,
    states: &States,
    kept: &[Vec<usize>],
    config: &CompressConfig,
) -> Result<()> {
    // The node to blame is the first one on the way to the output that receives live units
    // and passes on none.
    let spec = net.spec();
    let n = spec.nodes.len();
    let mut reaches = vec![false; n];
    reaches[n - 1] = true;
    for i in (0..n).rev() {
        if reaches[i] {
            for &j in &spec.nodes[i].inputs {
                reaches[j] = true;
            }
        }
    }
    if !config.allow_empty {
        for (i, node) in spec.nodes.iter().enumerate() {
            let fed_live = node.inputs.is_empty()
                || node
                    .inputs
                    .iter()
                    .any(|&j| states[j].iter().any(|s| s.is_live()));
            let all_const = states[i].iter().all(|s| !s.is_live());
            if reaches[i] && all_const && fed_live {
                let reason = match node.op {
                    Op::Add => "the residual intersection keeps no unit (the branches keep disjoint units); use ResidualPolicy::Union or CompressConfig::allow_empty",
                    _ => "pruning removes every unit of this node (set CompressConfig::allow_empty to allow it, or keep a unit in its masks)",
                };
                return Err(graph(&node.name, reason));
            }
        }
        for (i, node) in spec.nodes.iter().enumerate() {
            let layer = matches!(node.op, Op::Conv2d { .. } | Op::Linear { .. });
            if layer && reaches[i] && kept[i].is_empty() {
                return Err(graph(
                    &node.name,
                    "pruning removes every unit of this layer: nothing downstream reads any of them (set CompressConfig::allow_empty to drop the layer)",
                ));
            }
        }
    }
    if kept[n - 1].is_empty() {
        return Err(graph(
            &spec.nodes[n - 1].name,
            "every output of the network is constant after pruning: nothing is left to compute",
        ));
    }
    Ok(())
}

/// A node of the network under construction.
#[derive(Debug, Clone)]
struct ENode {
    name: String,
    op: Op,
    inputs: Vec<usize>,
    params: Vec<(&'static str, Tensor)>,
    shape: NodeShape,
    removed: bool,
}

impl ENode {
    fn param(&self, name: &str) -> Option<&Tensor> {
        self.params.iter().find(|(n, _)| *n == name).map(|(_, t)| t)
    }
    fn set_param(&mut self, name: &'static str, t: Tensor) {
        match self.params.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = t,
            None => self.params.push((name, t)),
        }
    }
}

struct Emitter {
    nodes: Vec<ENode>,
    names: HashSet<String>,
    device: Device,
    dtype: DType,
}

impl Emitter {
    fn new(device: Device, dtype: DType) -> Self {
        Self {
            nodes: Vec::new(),
            names: HashSet::new(),
            device,
            dtype,
        }
    }

    fn push(
        &mut self,
        name: &str,
        op: Op,
        inputs: Vec<usize>,
        params: Vec<(&'static str, Tensor)>,
    ) -> Result<usize> {
        let mut unique = name.to_string();
        let mut k = 1;
        while self.names.contains(&unique) {
            k += 1;
            unique = format!("{name}_{k}");
        }
        let ins: Vec<NodeShape> = inputs.iter().map(|&j| self.nodes[j].shape).collect();
        let shape = crate::net::infer_shape(&unique, &op, &ins)?;
        self.names.insert(unique.clone());
        self.nodes.push(ENode {
            name: unique,
            op,
            inputs,
            params,
            shape,
            removed: false,
        });
        Ok(self.nodes.len() - 1)
    }

    fn vector(&self, values: &[f64]) -> Result<Tensor> {
        Ok(Tensor::from_vec(values.to_vec(), values.len(), &self.device)?.to_dtype(self.dtype)?)
    }

    fn consumers(&self, node: usize) -> Vec<usize> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| !n.removed && n.inputs.contains(&node))
            .map(|(i, _)| i)
            .collect()
    }

    /// Folds every `Scale` node into a neighbour where that is exact; returns the output
    /// node (which changes if the output itself was a folded scale).
    fn fold_scales(&mut self, mut output: usize, notes: &mut Vec<String>) -> Result<usize> {
        for s in 0..self.nodes.len() {
            if self.nodes[s].removed || self.nodes[s].op != Op::Scale {
                continue;
            }
            let m = vec_f64(self.nodes[s].param("scale").expect("scale"))?;
            let folded = self.fold_backward(s, &m)? || self.fold_forward(s, &m)?;
            if !folded {
                notes.push(format!(
                    "{}: its multipliers could not be folded into a neighbouring layer; kept as a scale node",
                    self.nodes[s].name
                ));
                continue;
            }
            let source = self.nodes[s].inputs[0];
            for c in self.consumers(s) {
                for x in self.nodes[c].inputs.iter_mut() {
                    if *x == s {
                        *x = source;
                    }
                }
            }
            self.nodes[s].removed = true;
            if output == s {
                output = source;
            }
        }
        Ok(output)
    }

    /// Per-unit multiplier `m` as a tensor broadcasting along `axis` of a rank-`rank` tensor.
    fn along(&self, m: &[f64], axis: usize, rank: usize) -> Result<Tensor> {
        let mut dims = vec![1; rank];
        dims[axis] = m.len();
        Ok(self.vector(m)?.reshape(dims)?)
    }

    fn scale_param(
        &mut self,
        node: usize,
        name: &'static str,
        m: &[f64],
        axis: usize,
    ) -> Result<()> {
        if let Some(t) = self.nodes[node].param(name).cloned() {
            let scaled = t.broadcast_mul(&self.along(m, axis, t.rank())?)?;
            self.nodes[node].set_param(name, scaled);
        }
        Ok(())
    }

    fn make_batch_norm_affine(&mut self, node: usize) -> Result<()> {
        if let Op::BatchNorm { affine, .. } = &mut self.nodes[node].op {
            if !*affine {
                *affine = true;
                let units = self.nodes[node].shape.units();
                let ones = self.vector(&vec![1.0; units])?;
                let zeros = self.vector(&vec![0.0; units])?;
                self.nodes[node].set_param("weight", ones);
                self.nodes[node].set_param("bias", zeros);
            }
        }
        Ok(())
    }

    /// `scale(f(x))` → `f'(x)`: scales the rows of the layer that produced the scaled units,
    /// through nodes that commute with the scale and feed nothing else.
    fn fold_backward(&mut self, s: usize, m: &[f64]) -> Result<bool> {
        let positive = m.iter().all(|&v| v > 0.0);
        let mut path = Vec::new();
        let mut p = self.nodes[s].inputs[0];
        let mut next = s;
        loop {
            if self.consumers(p) != [next] {
                return Ok(false);
            }
            match &self.nodes[p].op {
                Op::Activation { f } if positive && f.is_positively_homogeneous() => {}
                Op::MaxPool2d { .. } if positive => {}
                Op::AvgPool2d { .. } | Op::Dropout { .. } => {}
                Op::Shift { .. } => path.push(p),
                Op::Conv2d { groups, .. } => {
                    let cin = self.nodes[self.nodes[p].inputs[0]].shape.units();
                    if *groups != 1 && *groups != cin {
                        return Ok(false);
                    }
                    break;
                }
                Op::Linear { .. } | Op::BatchNorm { .. } | Op::Scale => break,
                _ => return Ok(false),
            }
            next = p;
            p = self.nodes[p].inputs[0];
        }
        for q in path {
            self.scale_param(q, "shift", m, 0)?;
        }
        if let Op::BatchNorm { .. } = self.nodes[p].op {
            self.make_batch_norm_affine(p)?;
        }
        for name in ["weight", "bias", "scale"] {
            self.scale_param(p, name, m, 0)?;
        }
        Ok(true)
    }

    /// `f(scale(x))` → `f'(x)`: scales the columns of the layer that consumes the scaled
    /// units, through nodes that commute with the scale.
    fn fold_forward(&mut self, s: usize, m: &[f64]) -> Result<bool> {
        let positive = m.iter().all(|&v| v > 0.0);
        if m.contains(&0.0) {
            return Ok(false);
        }
        let mut m = m.to_vec();
        let mut c = s;
        loop {
            let consumers = self.consumers(c);
            let [next] = consumers.as_slice() else {
                return Ok(false);
            };
            let from = c;
            c = *next;
            match &self.nodes[c].op {
                Op::Activation { f } if positive && f.is_positively_homogeneous() => {}
                Op::MaxPool2d { .. } if positive => {}
                Op::AvgPool2d { .. } | Op::Dropout { .. } => {}
                Op::Flatten => {
                    let p = self.nodes[from].shape.positions();
                    m = m.iter().flat_map(|&v| std::iter::repeat_n(v, p)).collect();
                }
                Op::Select { indices } => m = indices.iter().map(|&k| m[k]).collect(),
                Op::Linear { .. } => {
                    self.scale_param(c, "weight", &m, 1)?;
                    return Ok(true);
                }
                Op::Conv2d { groups, .. } => {
                    let cin = self.nodes[from].shape.units();
                    let axis = match *groups {
                        1 => 1,
                        g if g == cin => 0,
                        _ => return Ok(false),
                    };
                    self.scale_param(c, "weight", &m, axis)?;
                    return Ok(true);
                }
                Op::BatchNorm { .. } => {
                    // BN(m·x) = γ·m·(x − mean/m)/σ + β.
                    self.make_batch_norm_affine(c)?;
                    self.scale_param(c, "weight", &m, 0)?;
                    let inv: Vec<f64> = m.iter().map(|v| 1.0 / v).collect();
                    self.scale_param(c, "running_mean", &inv, 0)?;
                    return Ok(true);
                }
                Op::Scale => {
                    self.scale_param(c, "scale", &m, 0)?;
                    return Ok(true);
                }
                _ => return Ok(false),
            }
        }
    }

    /// Builds the plain network: the output's ancestors, in order, with fresh variables.
    fn into_net(self, output: usize) -> Result<Net> {
        let mut keep = vec![false; self.nodes.len()];
        keep[output] = true;
        for i in (0..=output).rev() {
            if keep[i] {
                for &j in &self.nodes[i].inputs {
                    keep[j] = true;
                }
            }
        }
        let mut new_index = vec![usize::MAX; self.nodes.len()];
        let mut spec = NetSpec { nodes: Vec::new() };
        let varmap = VarMap::new();
        {
            let mut data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            for (i, node) in self.nodes.iter().enumerate().take(output + 1) {
                if !keep[i] {
                    continue;
                }
                new_index[i] = spec.nodes.len();
                spec.nodes.push(NodeSpec {
                    name: node.name.clone(),
                    op: node.op.clone(),
                    inputs: node.inputs.iter().map(|&j| new_index[j]).collect(),
                });
                for (p, t) in &node.params {
                    let t = t.to_dtype(self.dtype)?.contiguous()?.copy()?;
                    data.insert(format!("{}.{p}", node.name), Var::from_tensor(&t)?);
                }
            }
        }
        let vb = VarBuilder::from_varmap(&varmap, self.dtype, &self.device);
        let mut net = Net::new(spec, vb)?;
        net.set_varmap(varmap);
        Ok(net)
    }
}

/// Positions of `wanted` (sorted original unit indices) within `have` (sorted).
fn positions(name: &str, have: &[usize], wanted: &[usize]) -> Result<Vec<usize>> {
    wanted
        .iter()
        .map(|w| {
            have.binary_search(w).map_err(|_| Error::Surgery {
                layer: name.into(),
                reason: format!("internal: unit {w} is needed but was not kept"),
            })
        })
        .collect()
}

/// A Conv2d op like `op` with new output channels, groups and bias flag.
fn resized_conv(op: &Op, out_channels: usize, groups: usize, bias: bool) -> Op {
    match *op {
        Op::Conv2d {
            kernel,
            stride,
            padding,
            dilation,
            ..
        } => Op::Conv2d {
            out_channels,
            kernel,
            stride,
            padding,
            dilation,
            groups,
            bias,
        },
        ref other => other.clone(),
    }
}

fn weight_and_bias(weight: Tensor, bias: Option<Tensor>) -> Vec<(&'static str, Tensor)> {
    let mut params = vec![("weight", weight)];
    params.extend(bias.map(|b| ("bias", b)));
    params
}

fn pick(t: &Tensor, idx: &[usize], dim: usize) -> Result<Tensor> {
    Ok(t.index_select(&index_tensor(idx, t.device())?, dim)?
        .contiguous()?)
}

struct Emission<'a> {
    net: &'a Net,
    states: &'a States,
    kept: &'a [Vec<usize>],
    emitted: Vec<Option<usize>>,
}

impl Emission<'_> {
    /// An emitted node producing exactly units `wanted` of original node `e`.
    fn adapt(&self, em: &mut Emitter, e: usize, wanted: &[usize]) -> Result<usize> {
        let name = &self.net.spec().nodes[e].name;
        let src = self.emitted[e].ok_or_else(|| Error::Surgery {
            layer: name.clone(),
            reason: "internal: read but not emitted".into(),
        })?;
        if wanted == self.kept[e].as_slice() {
            return Ok(src);
        }
        let indices = positions(name, &self.kept[e], wanted)?;
        em.push(
            &format!("{name}_select"),
            Op::Select { indices },
            vec![src],
            Vec::new(),
        )
    }

    fn param(&self, i: usize, name: &str) -> Option<Tensor> {
        self.net.param(i, name).cloned()
    }

    /// Nonzero constant inputs of node `i` (through its first input): `(unit, value)`.
    fn const_inputs(&self, i: usize) -> Vec<(usize, f64)> {
        let e = self.net.spec().nodes[i].inputs[0];
        self.states[e]
            .iter()
            .enumerate()
            .filter_map(|(j, s)| match *s {
                Slot::Const(c) if c != 0.0 => Some((j, c)),
                _ => None,
            })
            .collect()
    }
}

fn emit(
    net: &Net,
    states: &States,
    kept: &[Vec<usize>],
    multipliers: &[Option<Vec<f64>>],
    em: &mut Emitter,
    notes: &mut Vec<String>,
) -> Result<usize> {
    let spec = net.spec();
    let shapes = net.shapes();
    let n = spec.nodes.len();
    let mut x = Emission {
        net,
        states,
        kept,
        emitted: vec![None; n],
    };
    for (i, node) in spec.nodes.iter().enumerate() {
        let rows = &kept[i];
        if rows.is_empty() {
            continue;
        }
        let name = node.name.as_str();
        let e = node.inputs.first().copied();
        let produced = match &node.op {
            Op::Input { .. } => {
                let id = em.push(name, node.op.clone(), Vec::new(), Vec::new())?;
                if rows.len() == shapes[0].units() {
                    id
                } else {
                    em.push(
                        "input_select",
                        Op::Select {
                            indices: rows.clone(),
                        },
                        vec![id],
                        Vec::new(),
                    )?
                }
            }
            &Op::Conv2d {
                stride,
                padding,
                dilation,
                groups,
                ..
            } => {
                let e = e.expect("conv has an input");
                let cin = shapes[e].units();
                let weight = x.param(i, "weight").expect("conv weight");
                let b = x.param(i, "bias");
                if groups == cin && groups > 1 {
                    // Depthwise: channel j reads channel j only.
                    let src = x.adapt(em, e, rows)?;
                    let b = b.map(|b| pick(&b, rows, 0)).transpose()?;
                    let op = resized_conv(&node.op, rows.len(), rows.len(), b.is_some());
                    em.push(
                        name,
                        op,
                        vec![src],
                        weight_and_bias(pick(&weight, rows, 0)?, b),
                    )?
                } else if groups != 1 {
                    if rows.len() != shapes[i].units() || kept[e].len() != cin {
                        return Err(Error::Surgery {
                            layer: name.into(),
                            reason: format!("a grouped conv (groups = {groups}) can lose units only as a whole depthwise conv; keep all of its channels"),
                        });
                    }
                    let src = x.emitted[e].expect("input emitted");
                    let mut params = vec![("weight", weight.clone())];
                    if let Some(b) = b {
                        params.push(("bias", b));
                    }
                    em.push(name, node.op.clone(), vec![src], params)?
                } else {
                    let src = x.emitted[e].expect("input emitted");
                    let w_rows = pick(&weight, rows, 0)?;
                    let mut b = b.map(|b| pick(&b, rows, 0)).transpose()?;
                    let consts = x.const_inputs(i);
                    let mut shift = None;
                    if !consts.is_empty() {
                        // The constant channels' effect: the conv of a constant image.
                        let mut fill = vec![0.0f64; shapes[e].numel()];
                        let p = shapes[e].positions();
                        for &(j, c) in &consts {
                            fill[j * p..(j + 1) * p].iter_mut().for_each(|v| *v = c);
                        }
                        let image = Tensor::from_vec(fill, shapes[e].dims(1), net.device())?
                            .to_dtype(DType::F64)?;
                        let map = image
                            .conv2d(&w_rows.to_dtype(DType::F64)?, padding, stride, dilation, 1)?
                            .squeeze(0)?;
                        if padding == 0 {
                            let per_channel =
                                map.flatten_from(1)?.mean(1)?.to_dtype(net.dtype())?;
                            b = Some(match b {
                                Some(b) => (b + per_channel)?,
                                None => per_channel,
                            });
                        } else {
                            shift = Some(map.to_dtype(net.dtype())?);
                        }
                    }
                    let op = resized_conv(&node.op, rows.len(), 1, b.is_some());
                    let params = weight_and_bias(pick(&w_rows, &kept[e], 1)?, b);
                    let conv = em.push(name, op, vec![src], params)?;
                    match shift {
                        Some(map) => {
                            notes.push(format!(
                                "{name}: removed channels feed it constants that zero padding makes position-dependent; added a per-position shift"
                            ));
                            em.push(
                                &format!("{name}_shift"),
                                Op::Shift { per_position: true },
                                vec![conv],
                                vec![("shift", map)],
                            )?
                        }
                        None => conv,
                    }
                }
            }
            Op::Linear { .. } => {
                let e = e.expect("linear has an input");
                let src = x.emitted[e].expect("input emitted");
                let w_rows = pick(&x.param(i, "weight").expect("linear weight"), rows, 0)?;
                let mut b = x.param(i, "bias").map(|b| pick(&b, rows, 0)).transpose()?;
                let consts = x.const_inputs(i);
                if !consts.is_empty() {
                    let cols: Vec<usize> = consts.iter().map(|c| c.0).collect();
                    let values: Vec<f64> = consts.iter().map(|c| c.1).collect();
                    let k = Tensor::from_vec(values, (cols.len(), 1), net.device())?;
                    let extra = pick(&w_rows, &cols, 1)?
                        .to_dtype(DType::F64)?
                        .matmul(&k)?
                        .squeeze(1)?
                        .to_dtype(net.dtype())?;
                    b = Some(match b {
                        Some(b) => (b + extra)?,
                        None => extra,
                    });
                }
                let op = Op::Linear {
                    out_features: rows.len(),
                    bias: b.is_some(),
                };
                let params = weight_and_bias(pick(&w_rows, &kept[e], 1)?, b);
                em.push(name, op, vec![src], params)?
            }
            Op::BatchNorm { .. } => {
                let src = x.adapt(em, e.expect("bn input"), rows)?;
                let params = net
                    .param_names(i)
                    .into_iter()
                    .map(|p| Ok((p, pick(net.param(i, p).expect("bn param"), rows, 0)?)))
                    .collect::<Result<Vec<_>>>()?;
                em.push(name, node.op.clone(), vec![src], params)?
            }
            Op::Activation { .. }
            | Op::MaxPool2d { .. }
            | Op::AvgPool2d { .. }
            | Op::Dropout { .. } => {
                let src = x.adapt(em, e.expect("input"), rows)?;
                em.push(name, node.op.clone(), vec![src], Vec::new())?
            }
            Op::Flatten => {
                let e = e.expect("flatten input");
                if let NodeShape::Features { .. } = shapes[e] {
                    x.adapt(em, e, rows)?
                } else {
                    let src = x.emitted[e].expect("input emitted");
                    let flat = em.push(name, Op::Flatten, vec![src], Vec::new())?;
                    let p = shapes[e].positions();
                    let full: Vec<usize> = kept[e]
                        .iter()
                        .flat_map(|&c| (c * p..(c + 1) * p).collect::<Vec<_>>())
                        .collect();
                    if full == *rows {
                        flat
                    } else {
                        let indices = positions(name, &full, rows)?;
                        em.push(
                            &format!("{name}_select"),
                            Op::Select { indices },
                            vec![flat],
                            Vec::new(),
                        )?
                    }
                }
            }
            Op::LogNormalDropout { .. } => {
                let src = x.adapt(em, e.expect("noise input"), rows)?;
                let m = multipliers[i].as_ref().expect("multipliers");
                let values: Vec<f64> = rows.iter().map(|&j| m[j]).collect();
                em.push(
                    name,
                    Op::Scale,
                    vec![src],
                    vec![("scale", em.vector(&values)?)],
                )?
            }
            Op::Add => {
                let mut branches = Vec::new();
                for &b in &node.inputs {
                    let live: Vec<usize> = rows
                        .iter()
                        .copied()
                        .filter(|&j| states[b][j].is_live())
                        .collect();
                    if live.is_empty() {
                        continue;
                    }
                    let mut id = x.adapt(em, b, &live)?;
                    if live.len() != rows.len() {
                        let indices = positions(name, rows, &live)?;
                        id = em.push(
                            &format!("{name}_scatter"),
                            Op::Scatter {
                                indices,
                                size: rows.len(),
                            },
                            vec![id],
                            Vec::new(),
                        )?;
                    }
                    branches.push(id);
                }
                let mut id = if branches.len() == 1 {
                    branches[0]
                } else {
                    em.push(name, Op::Add, branches, Vec::new())?
                };
                let consts: Vec<f64> = rows
                    .iter()
                    .map(|&j| node.inputs.iter().map(|&b| states[b][j].value()).sum())
                    .collect();
                if consts.iter().any(|&c| c != 0.0) {
                    id = em.push(
                        &format!("{name}_shift"),
                        Op::Shift {
                            per_position: false,
                        },
                        vec![id],
                        vec![("shift", em.vector(&consts)?)],
                    )?;
                }
                id
            }
            Op::Concat => {
                let mut parts = Vec::new();
                let mut offset = 0;
                for &b in &node.inputs {
                    let len = shapes[b].units();
                    let wanted: Vec<usize> = rows
                        .iter()
                        .filter(|&&j| j >= offset && j < offset + len)
                        .map(|&j| j - offset)
                        .collect();
                    if !wanted.is_empty() {
                        parts.push(x.adapt(em, b, &wanted)?);
                    }
                    offset += len;
                }
                if parts.len() == 1 {
                    parts[0]
                } else {
                    em.push(name, Op::Concat, parts, Vec::new())?
                }
            }
            Op::Select { indices } => {
                let wanted: Vec<usize> = rows.iter().map(|&j| indices[j]).collect();
                x.adapt(em, e.expect("select input"), &wanted)?
            }
            Op::Scatter { indices, .. } => {
                let wanted: Vec<usize> = rows
                    .iter()
                    .map(|&j| {
                        indices
                            .binary_search(&j)
                            .expect("kept scatter units are filled")
                    })
                    .collect();
                x.adapt(em, e.expect("scatter input"), &wanted)?
            }
            Op::Scale | Op::Shift { .. } => {
                let src = x.adapt(em, e.expect("input"), rows)?;
                let pname = if node.op == Op::Scale {
                    "scale"
                } else {
                    "shift"
                };
                let t = pick(net.param(i, pname).expect("vector param"), rows, 0)?;
                em.push(name, node.op.clone(), vec![src], vec![(pname, t)])?
            }
        };
        x.emitted[i] = Some(produced);
    }
    let last = n - 1;
    let mut out = x.emitted[last].expect("the output has kept units");
    let units = shapes[last].units();
    if kept[last].len() != units {
        out = em.push(
            "output_scatter",
            Op::Scatter {
                indices: kept[last].clone(),
                size: units,
            },
            vec![out],
            Vec::new(),
        )?;
        let consts: Vec<f64> = states[last].iter().map(|s| s.value()).collect();
        if consts.iter().any(|&c| c != 0.0) {
            out = em.push(
                "output_shift",
                Op::Shift {
                    per_position: false,
                },
                vec![out],
                vec![("shift", em.vector(&consts)?)],
            )?;
        }
    }
    Ok(out)
}
