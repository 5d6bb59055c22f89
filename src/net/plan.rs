//! Compiled CPU inference: a network's evaluation as a fixed sequence of host kernels with
//! the weights packed once.
//!
//! [`Net::forward_t`] builds candle tensors between layers and hands each product its
//! weights afresh, so the GEMM repacks them on every call. For a compressed network those
//! costs are a large share of the work: its products are small. An [`InferencePlan`]
//! snapshots the weights, packs them for its kernels, and runs each thread's share of the
//! batch through every layer on plain buffers.

use candle::{DType, Device, Module, Tensor};

use super::{graph, Net, NodeImpl, NodeShape, Op};
use crate::conv_direct::{DirectConv, PackedConv};
use crate::error::{Error, Result};
use crate::linear_packed::PackedLinear;
use crate::net::Activation;

/// Most rows a thread runs through the network at a time: bounds its buffers on large
/// batches.
const MAX_CHUNK_ROWS: usize = 256;

/// A [`Net`] compiled for evaluation on the CPU: the same outputs as
/// `net.forward_t(xs, false)` (to f32 rounding), faster where the network is small.
///
/// It compiles networks of convolutions (grouped ones too), linear layers, batch norms,
/// noise layers (their evaluation multiplier, `E[θ]` or 0), fixed scales and shifts,
/// element-wise activations, max- and average pooling, flattening, unit selections and
/// scatters, dropout (nothing in evaluation), residual adds, concatenations and keep masks,
/// in f32 on an x86-64 CPU with AVX2 and FMA: every model of [`crate::models`], with or
/// without SBP layers, and what [`compress`](crate::compress()) makes of them. A batch
/// norm or noise layer that is the only reader of a convolution or linear layer is folded
/// into its weights; a convolution with few channels runs through the direct kernel with
/// its ReLU and 2×2 pooling, others through im2col + GEMM. On another device, in another
/// dtype or with a mask on its input, it runs through the network itself;
/// [`is_compiled`](Self::is_compiled) tells which.
///
/// A compiled plan copies the weights when it is built: build it again after changing the
/// network. (One that runs through the network shares the network's parameters, as a
/// clone of a `Net` does.)
///
/// ```
/// use candle::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use candle_sbp::{models, Net};
///
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let net: Net = models::lenet_300_100(None, vb)?;
/// let plan = net.inference_plan()?;
/// let x = Tensor::rand(0f32, 1., (3, 1, 28, 28), &Device::Cpu)?;
/// let diff = (plan.forward(&x)? - net.forward_t(&x, false)?)?.abs()?.max_all()?;
/// assert!(diff.to_scalar::<f32>()? < 1e-4);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct InferencePlan {
    net: Net,
    compiled: std::result::Result<Compiled, String>,
}

/// The compiled network: its steps in the network's order.
#[derive(Debug, Clone)]
struct Compiled {
    steps: Vec<PlanStep>,
    /// Values per example at the input and at the output.
    in_len: usize,
    out_len: usize,
    /// The slot of the network's output, and how many slots there are (slot 0 holds the
    /// input; a node's value lives in the slot of its index).
    output: usize,
    slots: usize,
}

/// A step with the slots of the values it reads and writes.
#[derive(Debug, Clone)]
struct PlanStep {
    step: Step,
    inputs: Vec<usize>,
    output: usize,
    /// The slots no later step reads, dropped after this one.
    frees: Vec<usize>,
}

/// One kernel of the plan, on a block of rows (`rows × values per example`).
#[derive(Debug, Clone)]
enum Step {
    Linear {
        layer: PackedLinear,
        relu: bool,
    },
    /// A convolution through the direct kernel, with its ReLU and pooling if any.
    Direct {
        conv: PackedConv,
        bias: Option<Vec<f32>>,
    },
    /// Any other convolution (im2col + GEMM where the direct kernel does not pay), one
    /// group of channels at a time.
    Conv {
        weights: Values,
        bias: Option<Vec<f32>>,
        /// `(c_in, h, w)`, `(c_out, kh, kw)`, `(padding, stride, dilation)`, all channel
        /// counts of the whole convolution.
        input: (usize, usize, usize),
        kernel: (usize, usize, usize),
        params: (usize, usize, usize),
        groups: usize,
        relu: bool,
    },
    /// Places unit `k` of its input at unit `indices[k]` of `units` (zeros elsewhere),
    /// `positions` values a unit.
    Scatter {
        indices: Vec<usize>,
        units: usize,
        positions: usize,
    },
    MaxPool {
        channels: usize,
        size: (usize, usize),
        kernel: usize,
        stride: usize,
    },
    /// Keeps `indices` of `units` units of `positions` values each.
    Select {
        units: usize,
        positions: usize,
        indices: Vec<usize>,
    },
    /// `x·scale + shift` per unit of `positions` values (a batch norm, a noise layer's
    /// multiplier or a fixed scale that no layer before it takes in), in place.
    Affine {
        scale: Vec<f32>,
        shift: Vec<f32>,
        positions: usize,
    },
    /// Adds a value per unit and position, in place.
    Add(Values),
    /// An element-wise activation, in place.
    Act(Activation),
    /// The sum of its inputs (a residual connection), into the first one's buffer.
    Sum,
    /// Its inputs side by side, per example (`lens` values of each).
    Concat {
        lens: Vec<usize>,
    },
    AvgPool {
        channels: usize,
        size: (usize, usize),
        kernel: usize,
        stride: usize,
    },
}

impl Step {
    /// Whether the step rewrites its input in place.
    fn in_place(&self) -> bool {
        matches!(self, Step::Affine { .. } | Step::Add(_) | Step::Act(_))
    }

    /// An in-place step on `rows` examples `x`.
    fn apply(&self, x: &mut [f32]) {
        match self {
            Step::Act(f) => x.iter_mut().for_each(|v| *v = activate(*f, *v)),
            Step::Affine {
                scale,
                shift,
                positions,
            } => {
                let units = x.chunks_exact_mut((*positions).max(1));
                for (k, unit) in units.enumerate() {
                    let (a, b) = (scale[k % scale.len()], shift[k % shift.len()]);
                    unit.iter_mut().for_each(|v| *v = *v * a + b);
                }
            }
            Step::Add(Values(values)) => {
                for row in x.chunks_exact_mut(values.len().max(1)) {
                    row.iter_mut().zip(values).for_each(|(v, &a)| *v += a);
                }
            }
            _ => unreachable!("only in-place steps are applied"),
        }
    }

    /// This step on `rows` examples `x` into a new buffer; `None` where a kernel refused
    /// its buffers (which the compiler sized, so never in practice). The in-place steps
    /// and those of several inputs run in [`Compiled::run`].
    fn run(&self, x: &[f32], rows: usize) -> Option<Vec<f32>> {
        match self {
            Step::Linear { layer, relu } => {
                let mut y = vec![0f32; rows * layer.outputs()];
                layer.forward(x, rows, *relu, &mut y)?;
                Some(y)
            }
            Step::Direct { conv, bias } => {
                let n = rows * conv.shape().out_len();
                let mut y = Vec::with_capacity(n);
                conv.forward(rows, x, bias.as_deref(), &mut y.spare_capacity_mut()[..n])?;
                // SAFETY: the kernel wrote all `n` values.
                unsafe { y.set_len(n) };
                Some(y)
            }
            Step::Conv {
                weights,
                bias,
                input,
                kernel,
                params,
                groups,
                relu,
            } => {
                let (b, w) = (bias.as_deref(), &weights.0);
                if *groups == 1 {
                    return crate::ops::conv2d_host(x, rows, *input, w, *kernel, b, *params, *relu)
                        .ok();
                }
                grouped_conv(x, rows, (*input, *kernel, *params), *groups, (w, b), *relu)
            }
            Step::Scatter {
                indices,
                units,
                positions,
            } => {
                let (p, per_in) = (*positions, indices.len() * positions);
                let mut y = vec![0f32; rows * units * p];
                for (out, row) in y.chunks_exact_mut(units * p).zip(x.chunks_exact(per_in)) {
                    for (k, &u) in indices.iter().enumerate() {
                        let dst = &mut out[u * p..(u + 1) * p];
                        dst.copy_from_slice(&row[k * p..(k + 1) * p]);
                    }
                }
                Some(y)
            }
            Step::MaxPool {
                channels,
                size,
                kernel,
                stride,
            } => crate::ops::max_pool2d_host(x, rows * channels, *size, *kernel, *stride).ok(),
            Step::Select {
                units,
                positions,
                indices,
            } => Some(crate::ops::select_host(x, *units, *positions, indices)),
            Step::AvgPool {
                channels,
                size,
                kernel,
                stride,
            } => Some(avg_pool(x, rows * channels, *size, (*kernel, *stride))),
            Step::Affine { .. } | Step::Add(_) | Step::Act(_) | Step::Sum | Step::Concat { .. } => {
                unreachable!("in-place steps and steps of several inputs run apart")
            }
        }
    }
}

/// `f(v)` as the network computes it in f32 (the GELU's erf in f64).
fn activate(f: Activation, v: f32) -> f32 {
    match f {
        Activation::Relu => crate::ops::relu_if(true, v),
        Activation::LeakyRelu { slope } => {
            if v < 0.0 {
                (f64::from(v) * slope) as f32
            } else {
                v
            }
        }
        Activation::Gelu => {
            let x = f64::from(v);
            (0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))) as f32
        }
        Activation::Tanh => v.tanh(),
        Activation::Sigmoid => 1.0 / (1.0 + (-v).exp()),
        Activation::Silu => v / (1.0 + (-v).exp()),
    }
}

/// Means of `kernel × kernel` windows every `stride` over `planes` planes of `(h, w)`
/// values.
fn avg_pool(
    x: &[f32],
    planes: usize,
    (h, w): (usize, usize),
    (kernel, stride): (usize, usize),
) -> Vec<f32> {
    let (oh, ow) = ((h - kernel) / stride + 1, (w - kernel) / stride + 1);
    let scale = 1.0 / (kernel * kernel) as f32;
    let mut out = Vec::with_capacity(planes * oh * ow);
    for plane in x.chunks_exact(h * w).take(planes) {
        for oy in 0..oh {
            for ox in 0..ow {
                let window = (0..kernel).flat_map(|dy| {
                    let at = (oy * stride + dy) * w + ox * stride;
                    &plane[at..at + kernel]
                });
                out.push(window.sum::<f32>() * scale);
            }
        }
    }
    out
}

impl Net {
    /// This network compiled for evaluation on the CPU (see [`InferencePlan`]): a
    /// snapshot of the current weights.
    pub fn inference_plan(&self) -> Result<InferencePlan> {
        let compiled = self.compile()?;
        Ok(InferencePlan {
            net: self.clone(),
            compiled,
        })
    }

    /// The host kernels for this network, or why there are none.
    fn compile(&self) -> Result<std::result::Result<Compiled, String>> {
        if !crate::conv_direct::available() {
            return Ok(Err("the CPU kernels need x86-64 with AVX2 and FMA".into()));
        }
        if !crate::ops::cpu_kernels() {
            return Ok(Err(
                "the CPU kernels are turned off (ops::set_cpu_kernels)".into()
            ));
        }
        if !self.device.is_cpu() || self.dtype != DType::F32 {
            return Ok(Err(format!(
                "the network is {:?} on {:?}; the plan compiles f32 on the CPU",
                self.dtype, self.device
            )));
        }
        let nodes = &self.spec.nodes;
        let n = nodes.len();
        // The slot each node's value lives in: its own, or its input's for a node that
        // passes its input on (flattening, dropout).
        let mut slot: Vec<usize> = (0..n).collect();
        let mut taken = vec![false; n];
        let mut steps: Vec<(Step, Vec<usize>, usize)> = Vec::new();
        if self.masks[0].is_some() {
            return Ok(Err(format!("{}: a keep mask on the input", nodes[0].name)));
        }
        for i in 1..n {
            if taken[i] {
                continue;
            }
            let node = &nodes[i];
            let refuse = |why: &str| Ok(Err(format!("{}: {why}", node.name)));
            let reads: Vec<usize> = node.inputs.iter().map(|&j| slot[j]).collect();
            let input = self.shapes[node.inputs[0]];
            // A keep mask multiplies the node's units by 0 or 1 after it: folded into a
            // convolution's or linear layer's rows (`compile_weighted`), a step of its own
            // after anything else.
            if self.weighted(i) {
                match self.compile_weighted(i)? {
                    Ok((step, tail)) => {
                        let last = tail.last().copied().unwrap_or(i);
                        tail.iter().for_each(|&j| taken[j] = true);
                        steps.push((step, reads, last));
                    }
                    Err(why) => return refuse(&why),
                }
                continue;
            }
            let mask = self.masks[i].as_ref().map(|m| Step::Affine {
                scale: m.keep.iter().map(|&k| f32::from(u8::from(k))).collect(),
                shift: vec![0.0; m.keep.len()],
                positions: self.shapes[i].positions(),
            });
            if let Some((scale, shift)) = self.eval_affine(i)? {
                let step = Step::Affine {
                    scale: to_f32(&scale),
                    shift: to_f32(&shift),
                    positions: input.positions(),
                };
                steps.push((step, reads, i));
                steps.extend(mask.map(|m| (m, vec![i], i)));
                continue;
            }
            let step = match (&node.op, &self.nodes[i]) {
                (Op::Select { indices }, _) => Step::Select {
                    units: input.units(),
                    positions: input.positions(),
                    indices: indices.clone(),
                },
                (&Op::Activation { f }, _) => Step::Act(f),
                (&Op::MaxPool2d { kernel, stride } | &Op::AvgPool2d { kernel, stride }, _) => {
                    let NodeShape::Image {
                        channels,
                        height,
                        width,
                    } = input
                    else {
                        return refuse("pooling of a feature vector");
                    };
                    if kernel == 0 || stride == 0 || height < kernel || width < kernel {
                        return refuse("a pooling window larger than its input");
                    }
                    let size = (height, width);
                    if matches!(node.op, Op::MaxPool2d { .. }) {
                        Step::MaxPool {
                            channels,
                            size,
                            kernel,
                            stride,
                        }
                    } else {
                        Step::AvgPool {
                            channels,
                            size,
                            kernel,
                            stride,
                        }
                    }
                }
                (Op::Shift { per_position: true }, NodeImpl::Vector(v)) => {
                    Step::Add(Values(v.flatten_all()?.to_vec1::<f32>()?))
                }
                (Op::Add, _) => Step::Sum,
                (Op::Scatter { indices, size }, _) => Step::Scatter {
                    indices: indices.clone(),
                    units: *size,
                    positions: input.positions(),
                },
                (Op::Concat, _) => Step::Concat {
                    lens: node
                        .inputs
                        .iter()
                        .map(|&j| self.shapes[j].numel())
                        .collect(),
                },
                (Op::Flatten | Op::Dropout { .. }, _) => {
                    // The same values: the input's slot, unless a mask changes them.
                    match mask {
                        Some(m) => steps.push((m, reads, i)),
                        None => slot[i] = reads[0],
                    }
                    continue;
                }
                (op, _) => return refuse(&format!("no compiled kernel for a {} node", op.kind())),
            };
            steps.push((step, reads, i));
            steps.extend(mask.map(|m| (m, vec![i], i)));
        }
        // Each slot is dropped after the last step that reads it (the output's never).
        let output = slot[n - 1];
        let mut last_reader = vec![None; n];
        for (k, (_, reads, _)) in steps.iter().enumerate() {
            reads.iter().for_each(|&j| last_reader[j] = Some(k));
        }
        let steps = steps
            .into_iter()
            .enumerate()
            .map(|(k, (step, inputs, out))| {
                let frees = (1..n)
                    .filter(|&j| last_reader[j] == Some(k) && j != output)
                    .collect();
                PlanStep {
                    step,
                    inputs,
                    output: out,
                    frees,
                }
            })
            .collect();
        Ok(Ok(Compiled {
            steps,
            in_len: self.shapes[0].numel(),
            out_len: self.shapes[n - 1].numel(),
            output,
            slots: n,
        }))
    }

    /// Node `k`'s evaluation as `x·scale + shift` per unit, where it is one: a batch norm,
    /// a noise layer (its multiplier `E[θ]` or 0), a fixed scale or a per-unit shift.
    fn eval_affine(&self, k: usize) -> Result<Option<(Vec<f64>, Vec<f64>)>> {
        let units = self.shapes[k].units();
        let vector = crate::compress::vec_f64;
        Ok(match (&self.spec.nodes[k].op, &self.nodes[k]) {
            (&Op::BatchNorm { eps, .. }, NodeImpl::BatchNorm(_)) => {
                Some(crate::compress::batch_norm_affine(self, k, eps)?)
            }
            (Op::LogNormalDropout { .. }, NodeImpl::Noise(layer)) => {
                Some((layer.eval_multiplier_values()?, vec![0.0; units]))
            }
            (Op::Scale, NodeImpl::Vector(v)) => Some((vector(v)?, vec![0.0; units])),
            (
                Op::Shift {
                    per_position: false,
                },
                NodeImpl::Vector(v),
            ) => Some((vec![1.0; units], vector(v)?)),
            _ => None,
        })
    }

    /// The step of the convolution or linear layer `k`, with the nodes after it that its
    /// kernel takes in (each the sole reader of the one before, unmasked): per-unit affine
    /// maps folded into its weights and bias (`a·(Wx + b) + c`), once its ReLU is taken
    /// only the ones that scale by a non-negative factor (`a·relu(z) = relu(a·z)`), the
    /// ReLU itself, and for a convolution through the direct kernel a 2×2 max-pooling.
    /// Also the nodes taken in, in order; or why the layer does not compile.
    fn compile_weighted(
        &self,
        k: usize,
    ) -> Result<std::result::Result<(Step, Vec<usize>), String>> {
        let (weight, bias) = match &self.nodes[k] {
            NodeImpl::Conv { weight, bias } => (weight, bias.as_ref()),
            NodeImpl::Linear(l) => (l.weight(), l.bias()),
            _ => return Ok(Err("internal: not a weighted layer".into())),
        };
        let units = self.shapes[k].units();
        let mut w = weight.flatten_all()?.to_vec1::<f32>()?;
        let per_unit = w.len() / units.max(1);
        let mut b: Option<Vec<f32>> = bias.map(|b| b.to_vec1::<f32>()).transpose()?;
        // The layer's own keep mask zeroes the removed units' rows.
        if let Some(mask) = &self.masks[k] {
            for (u, _) in mask.keep.iter().enumerate().filter(|(_, &keep)| !keep) {
                w[u * per_unit..(u + 1) * per_unit].fill(0.0);
                if let Some(bias) = b.as_mut() {
                    bias[u] = 0.0;
                }
            }
        }
        let mut relu = false;
        // The nodes taken in, each the sole reader of the one before, unmasked.
        let mut tail = Vec::new();
        let follow = |prev: usize| self.sole_consumer[prev].filter(|&j| self.masks[j].is_none());
        while let Some(j) = follow(tail.last().copied().unwrap_or(k)) {
            if !relu && self.relu(j) {
                relu = true;
            } else if let Some((scale, shift)) = self.eval_affine(j)? {
                let scales_only =
                    shift.iter().all(|&c| c == 0.0) && scale.iter().all(|&a| a >= 0.0);
                if relu && !scales_only {
                    break;
                }
                for (u, (&a, &c)) in scale.iter().zip(&shift).enumerate() {
                    w[u * per_unit..(u + 1) * per_unit]
                        .iter_mut()
                        .for_each(|v| *v = (f64::from(*v) * a) as f32);
                    if b.is_some() || c != 0.0 {
                        let bias = b.get_or_insert_with(|| vec![0.0; units]);
                        bias[u] = (f64::from(bias[u]) * a + c) as f32;
                    }
                }
            } else {
                break;
            }
            tail.push(j);
        }
        let input = self.shapes[self.spec.nodes[k].inputs[0]];
        match (&self.spec.nodes[k].op, input) {
            (Op::Linear { .. }, _) => {
                let Some(layer) = PackedLinear::new(&w, b.as_deref(), input.numel(), units) else {
                    return Ok(Err("weights that do not fit the packed kernel".into()));
                };
                Ok(Ok((Step::Linear { layer, relu }, tail)))
            }
            (
                &Op::Conv2d {
                    stride,
                    padding,
                    dilation,
                    groups,
                    ..
                },
                NodeShape::Image {
                    channels,
                    height,
                    width,
                },
            ) => {
                let (_, _, kh, kw) = weight.dims4()?;
                let direct = DirectConv {
                    c_in: channels,
                    h: height,
                    w: width,
                    c_out: units,
                    kh,
                    kw,
                    padding,
                    relu,
                    pool: false,
                };
                // candle and the network's own kernels read a dilation of 0 as 1.
                let dilation = dilation.max(1);
                if groups == 1 && stride == 1 && dilation == 1 && crate::conv_direct::pays(&direct)
                {
                    let after = follow(tail.last().copied().unwrap_or(k));
                    let pool = after.filter(|&j| {
                        matches!(
                            self.spec.nodes[j].op,
                            Op::MaxPool2d {
                                kernel: 2,
                                stride: 2
                            }
                        )
                    });
                    let shape = DirectConv {
                        pool: pool.is_some(),
                        ..direct
                    };
                    let Some(conv) = PackedConv::new(shape, &w) else {
                        return Ok(Err("weights that do not fit the convolution".into()));
                    };
                    tail.extend(pool);
                    return Ok(Ok((Step::Direct { conv, bias: b }, tail)));
                }
                let step = Step::Conv {
                    weights: Values(w),
                    bias: b,
                    input: (channels, height, width),
                    kernel: (units, kh, kw),
                    params: (padding, stride, dilation),
                    groups,
                    relu,
                };
                Ok(Ok((step, tail)))
            }
            _ => Ok(Err("a convolution of a feature vector".into())),
        }
    }
}

/// A convolution's `(c_in, h, w)`, `(c_out, kh, kw)` and `(padding, stride, dilation)`.
type ConvShape = (
    (usize, usize, usize),
    (usize, usize, usize),
    (usize, usize, usize),
);

/// A grouped convolution of `rows` examples `x`, one group at a time through
/// [`crate::ops::conv2d_host`]: each group's input channels copied out, its output channels
/// copied into place. `shape` is the whole convolution's `(c_in, h, w)`, `(c_out, kh,
/// kw)` and `(padding, stride, dilation)`.
fn grouped_conv(
    x: &[f32],
    rows: usize,
    shape: ConvShape,
    groups: usize,
    (w, b): (&[f32], Option<&[f32]>),
    relu: bool,
) -> Option<Vec<f32>> {
    let ((c_in, h, wd), (c_out, kh, kw), params) = shape;
    let (cin_g, cout_g) = (c_in / groups, c_out / groups);
    let (in_g, w_g) = (cin_g * h * wd, cout_g * cin_g * kh * kw);
    let mut y: Vec<f32> = Vec::new();
    let mut out_g = 0;
    for g in 0..groups {
        let part: Vec<f32> = x
            .chunks_exact(c_in * h * wd)
            .flat_map(|sample| &sample[g * in_g..(g + 1) * in_g])
            .copied()
            .collect();
        let weights = &w[g * w_g..(g + 1) * w_g];
        let bias = b.map(|b| &b[g * cout_g..(g + 1) * cout_g]);
        let kernel = (cout_g, kh, kw);
        let z = crate::ops::conv2d_host(
            &part,
            rows,
            (cin_g, h, wd),
            weights,
            kernel,
            bias,
            params,
            relu,
        )
        .ok()?;
        if g == 0 {
            out_g = z.len() / rows.max(1);
            y = vec![0f32; rows * out_g * groups];
        }
        for (r, block) in z.chunks_exact(out_g.max(1)).enumerate() {
            let at = (r * groups + g) * out_g;
            y[at..at + out_g].copy_from_slice(block);
        }
    }
    Some(y)
}

/// A step's large table of values; its `Debug` shows only how many there are.
#[derive(Clone)]
struct Values(Vec<f32>);

impl std::fmt::Debug for Values {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{} values]", self.0.len())
    }
}

/// `v` in f32.
fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

impl InferencePlan {
    /// Whether the network compiled; where it did not, [`forward`](Self::forward) runs
    /// the network itself.
    pub fn is_compiled(&self) -> bool {
        self.compiled.is_ok()
    }

    /// Why the network did not compile (the first node that stopped it), if it did not.
    pub fn not_compiled_because(&self) -> Option<&str> {
        self.compiled.as_ref().err().map(String::as_str)
    }

    /// The network the plan was built from.
    pub fn net(&self) -> &Net {
        &self.net
    }

    /// The network's evaluation-mode output for `xs` (shaped as the network's input, with
    /// a batch axis).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let compiled = match &self.compiled {
            Ok(c) if xs.device().is_cpu() => c,
            _ => return self.net.forward_t(xs, false),
        };
        let batch = xs.dims().first().copied().unwrap_or(0);
        let want = self.net.shapes[0].dims(batch);
        if xs.dims() != want.as_slice() || batch == 0 {
            return Err(Error::InputShape {
                layer: self.net.spec.nodes[0].name.clone(),
                shape: xs.dims().to_vec(),
                reason: format!("expected (batch ≥ 1, {:?})", &want[1..]),
            });
        }
        let xs = xs.to_dtype(DType::F32)?.contiguous()?;
        let (storage, layout) = xs.storage_and_layout();
        let candle::Storage::Cpu(cpu) = &*storage else {
            return self.net.forward_t(&xs, false);
        };
        let all = cpu.as_slice::<f32>()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(graph(
                "<plan>",
                "internal: a contiguous input without offsets",
            ));
        };
        let x = &all[start..end];
        let rows = batch
            .div_ceil(crate::par::threads())
            .clamp(1, MAX_CHUNK_ROWS);
        let chunks: Vec<_> = (0..batch).step_by(rows).collect();
        let outs = crate::par::map(chunks, |_, first| {
            let n = rows.min(batch - first);
            compiled.run(
                &x[first * compiled.in_len..(first + n) * compiled.in_len],
                n,
            )
        });
        let mut out = Vec::with_capacity(batch * compiled.out_len);
        for part in outs {
            let part = part.ok_or_else(|| {
                graph(
                    "<plan>",
                    "internal: a kernel refused the buffers it was compiled for",
                )
            })?;
            out.extend_from_slice(&part);
        }
        let dims = self.net.shapes[self.net.spec.nodes.len() - 1].dims(batch);
        Ok(Tensor::from_vec(out, dims, &Device::Cpu)?)
    }
}

impl Compiled {
    /// The network on `rows` examples `x`.
    fn run(&self, x: &[f32], rows: usize) -> Option<Vec<f32>> {
        // Slot 0 is `x` itself; the others hold the values that later steps still read.
        let mut slots: Vec<Option<Vec<f32>>> = vec![None; self.slots];
        for ps in &self.steps {
            let first = ps.inputs[0];
            let out = match &ps.step {
                Step::Sum => {
                    let mut sum = take_first(ps, &mut slots, x)?;
                    for &k in &ps.inputs[1..] {
                        let v = slot_value(&slots, x, k)?;
                        sum.iter_mut().zip(v).for_each(|(s, &a)| *s += a);
                    }
                    sum
                }
                Step::Concat { lens } => {
                    let mut y = Vec::with_capacity(rows * lens.iter().sum::<usize>());
                    for r in 0..rows {
                        for (&k, &len) in ps.inputs.iter().zip(lens) {
                            let v = slot_value(&slots, x, k)?;
                            y.extend_from_slice(&v[r * len..(r + 1) * len]);
                        }
                    }
                    y
                }
                step if step.in_place() => {
                    let mut v = take_first(ps, &mut slots, x)?;
                    step.apply(&mut v);
                    v
                }
                step => step.run(slot_value(&slots, x, first)?, rows)?,
            };
            for &k in &ps.frees {
                slots[k] = None;
            }
            slots[ps.output] = Some(out);
        }
        if self.output == 0 {
            return Some(x.to_vec());
        }
        slots[self.output].take()
    }
}

/// The value in slot `k`: the input `x` for slot 0.
fn slot_value<'a>(slots: &'a [Option<Vec<f32>>], x: &'a [f32], k: usize) -> Option<&'a [f32]> {
    if k == 0 {
        Some(x)
    } else {
        slots[k].as_deref()
    }
}

/// The first input of `ps` as a buffer of its own: taken from its slot where no later step
/// (nor another input of this one) reads it, copied otherwise.
fn take_first(ps: &PlanStep, slots: &mut [Option<Vec<f32>>], x: &[f32]) -> Option<Vec<f32>> {
    let first = ps.inputs[0];
    let once = ps.inputs.iter().filter(|&&k| k == first).count() == 1;
    if first == 0 {
        Some(x.to_vec())
    } else if once && ps.frees.contains(&first) {
        slots[first].take()
    } else {
        slots[first].clone()
    }
}

impl Module for InferencePlan {
    fn forward(&self, xs: &Tensor) -> candle::Result<Tensor> {
        InferencePlan::forward(self, xs).map_err(candle::Error::wrap)
    }
}
