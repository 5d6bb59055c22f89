//! Compiled CPU inference: a network's evaluation as a fixed chain of host kernels with
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
/// It compiles chains of convolutions (stride 1, with their ReLU and 2×2 max-pooling),
/// linear layers (with their ReLU), flattening, unit selections, ReLUs and dropout (a
/// no-op in evaluation), unmasked, in f32 on an x86-64 CPU with AVX2 and FMA: the
/// networks that [`compress`](crate::compress()) produces from LeNet-300-100,
/// LeNet-500-300 and LeNet5-Caffe, and those models themselves without noise layers.
/// Anything else (another device or dtype, batch norm, noise layers, residual adds, masks)
/// runs through the network itself; [`is_compiled`](Self::is_compiled) tells which.
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

/// The compiled chain.
#[derive(Debug, Clone)]
struct Compiled {
    steps: Vec<Step>,
    /// Values per example at the input and at the output.
    in_len: usize,
    out_len: usize,
}

/// One kernel of the chain, on a block of rows (`rows × values per example`).
#[derive(Debug, Clone)]
enum Step {
    Linear {
        layer: PackedLinear,
        relu: bool,
    },
    Conv {
        conv: PackedConv,
        bias: Option<Vec<f32>>,
    },
    /// Keeps `indices` of `units` units of `positions` values each.
    Select {
        units: usize,
        positions: usize,
        indices: Vec<usize>,
    },
    Relu,
}

impl Step {
    /// Values per example this step writes.
    fn out_len(&self) -> usize {
        match self {
            Step::Linear { layer, .. } => layer.outputs(),
            Step::Conv { conv, .. } => conv.shape().out_len(),
            Step::Select {
                positions, indices, ..
            } => positions * indices.len(),
            Step::Relu => 0,
        }
    }

    /// This step on `rows` examples `x` into a new buffer; `None` where a kernel refused
    /// its buffers (which the compiler sized, so never in practice).
    fn run(&self, x: &[f32], rows: usize) -> Option<Vec<f32>> {
        let n = rows * self.out_len();
        match self {
            Step::Linear { layer, relu } => {
                let mut y = vec![0f32; n];
                layer.forward(x, rows, *relu, &mut y)?;
                Some(y)
            }
            Step::Conv { conv, bias } => {
                let mut y = Vec::with_capacity(n);
                conv.forward(rows, x, bias.as_deref(), &mut y.spare_capacity_mut()[..n])?;
                // SAFETY: the kernel wrote all `n` values.
                unsafe { y.set_len(n) };
                Some(y)
            }
            Step::Select {
                units,
                positions,
                indices,
            } => Some(select(x, *units, *positions, indices, n)),
            Step::Relu => Some(x.iter().map(|&v| relu(v)).collect()),
        }
    }
}

/// `max(v, 0)`, NaN kept (as candle's ReLU keeps it).
fn relu(v: f32) -> f32 {
    if v < 0.0 {
        0.0
    } else {
        v
    }
}

/// Keeps units `indices` of each row of `x` (`units` units of `positions` values), `n`
/// values in all.
fn select(x: &[f32], units: usize, positions: usize, indices: &[usize], n: usize) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(n);
    if n == 0 {
        return out; // nothing kept (a network compressed with `allow_empty`)
    }
    if positions == 1
        && crate::gather::gather_rows_f32(x, units, indices, &mut out.spare_capacity_mut()[..n])
            .is_some()
    {
        // SAFETY: the gather wrote all `n` values.
        unsafe { out.set_len(n) };
        return out;
    }
    for row in x.chunks_exact(units * positions) {
        for &u in indices {
            out.extend_from_slice(&row[u * positions..(u + 1) * positions]);
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

    /// The chain of host kernels for this network, or why there is none.
    fn compile(&self) -> Result<std::result::Result<Compiled, String>> {
        if !crate::conv_direct::available() {
            return Ok(Err("the CPU kernels need x86-64 with AVX2 and FMA".into()));
        }
        if !self.device.is_cpu() || self.dtype != DType::F32 {
            return Ok(Err(format!(
                "the network is {:?} on {:?}; the plan compiles f32 on the CPU",
                self.dtype, self.device
            )));
        }
        let nodes = &self.spec.nodes;
        let mut steps = Vec::new();
        let mut i = 1;
        while i < nodes.len() {
            let node = &nodes[i];
            let refuse = |why: &str| Ok(Err(format!("{}: {why}", node.name)));
            if node.inputs != [i - 1] {
                return refuse("not part of a chain (each node reading the one before)");
            }
            if self.masks[i].is_some() {
                return refuse("has a keep mask (compress the network first)");
            }
            // A following node taken into this one's kernel, where it is the sole reader.
            let next = |k: usize| {
                let j = i + k;
                (j < nodes.len()
                    && nodes[j].inputs == [j - 1]
                    && self.masks[j - 1].is_none()
                    && self.sole_consumer[j - 1] == Some(j))
                .then(|| &nodes[j].op)
            };
            let is_relu = |op: Option<&Op>| {
                matches!(
                    op,
                    Some(Op::Activation {
                        f: Activation::Relu
                    })
                )
            };
            let input = self.shapes[i - 1];
            match (&node.op, &self.nodes[i]) {
                (Op::Linear { .. }, NodeImpl::Linear(l)) => {
                    let w = l.weight().flatten_all()?.to_vec1::<f32>()?;
                    let b = l.bias().map(|b| b.to_vec1::<f32>()).transpose()?;
                    let (inputs, outputs) = (input.numel(), self.shapes[i].units());
                    let Some(layer) = PackedLinear::new(&w, b.as_deref(), inputs, outputs) else {
                        return refuse("weights that do not fit the packed kernel");
                    };
                    let relu = is_relu(next(1)) && self.masks[i + 1].is_none();
                    steps.push(Step::Linear { layer, relu });
                    i += 1 + usize::from(relu);
                }
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
                    let NodeShape::Image {
                        channels,
                        height,
                        width,
                    } = input
                    else {
                        return refuse("a convolution of a feature vector");
                    };
                    let (_, _, kh, kw) = weight.dims4()?;
                    let relu = is_relu(next(1)) && self.masks[i + 1].is_none();
                    let at = i + 1 + usize::from(relu);
                    let pool = matches!(
                        next(1 + usize::from(relu)),
                        Some(&Op::MaxPool2d {
                            kernel: 2,
                            stride: 2
                        })
                    ) && self.masks[at].is_none();
                    let shape = DirectConv {
                        c_in: channels,
                        h: height,
                        w: width,
                        c_out: self.shapes[i].units(),
                        kh,
                        kw,
                        padding,
                        relu,
                        pool,
                    };
                    if stride != 1 || dilation != 1 || groups != 1 {
                        return refuse("a strided, dilated or grouped convolution");
                    }
                    if !crate::conv_direct::pays(&shape) {
                        return refuse("a convolution the direct kernel does not run fast");
                    }
                    let w = weight.flatten_all()?.to_vec1::<f32>()?;
                    let Some(conv) = PackedConv::new(shape, &w) else {
                        return refuse("weights that do not fit the convolution");
                    };
                    let bias = bias.as_ref().map(|b| b.to_vec1::<f32>()).transpose()?;
                    steps.push(Step::Conv { conv, bias });
                    i = at + usize::from(pool);
                }
                (Op::Select { indices }, _) => {
                    steps.push(Step::Select {
                        units: input.units(),
                        positions: input.positions(),
                        indices: indices.clone(),
                    });
                    i += 1;
                }
                (
                    Op::Activation {
                        f: Activation::Relu,
                    },
                    _,
                ) => {
                    steps.push(Step::Relu);
                    i += 1;
                }
                (Op::Flatten | Op::Dropout { .. }, _) => i += 1,
                (op, _) => return refuse(&format!("no compiled kernel for a {} node", op.kind())),
            }
        }
        Ok(Ok(Compiled {
            steps,
            in_len: self.shapes[0].numel(),
            out_len: self.shapes[nodes.len() - 1].numel(),
        }))
    }
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
    /// The chain on `rows` examples `x`.
    fn run(&self, x: &[f32], rows: usize) -> Option<Vec<f32>> {
        let mut cur: Option<Vec<f32>> = None;
        for step in &self.steps {
            match (step, cur.as_mut()) {
                (Step::Relu, Some(v)) => v.iter_mut().for_each(|v| *v = relu(*v)),
                _ => cur = Some(step.run(cur.as_deref().unwrap_or(x), rows)?),
            }
        }
        Some(cur.unwrap_or_else(|| x.to_vec()))
    }
}

impl Module for InferencePlan {
    fn forward(&self, xs: &Tensor) -> candle::Result<Tensor> {
        InferencePlan::forward(self, xs).map_err(candle::Error::wrap)
    }
}
