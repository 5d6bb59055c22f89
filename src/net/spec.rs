//! The serialisable description of a [`Net`](super::Net): nodes, their operations and how
//! they connect, with shape inference that checks that the graph chains.

use candle_nn::Init;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layer::LogNormalDropoutConfig;

/// The shape of one example's activation at a node (the batch axis left out). Units are
/// the entries of axis 1: channels of an image, entries of a feature vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NodeShape {
    /// A feature vector, `(N, features)` with the batch.
    Features {
        /// Number of features.
        features: usize,
    },
    /// An image, `(N, channels, height, width)` with the batch.
    Image {
        /// Number of channels.
        channels: usize,
        /// Height in pixels.
        height: usize,
        /// Width in pixels.
        width: usize,
    },
}

impl NodeShape {
    /// A feature vector of `features` entries.
    pub fn features(features: usize) -> Self {
        Self::Features { features }
    }
    /// An image of `channels × height × width`.
    pub fn image(channels: usize, height: usize, width: usize) -> Self {
        Self::Image {
            channels,
            height,
            width,
        }
    }
    /// Number of units (the size of axis 1).
    pub fn units(&self) -> usize {
        match *self {
            Self::Features { features } => features,
            Self::Image { channels, .. } => channels,
        }
    }
    /// Spatial positions per unit: `height × width` for an image, 1 for features.
    pub fn positions(&self) -> usize {
        match *self {
            Self::Features { .. } => 1,
            Self::Image { height, width, .. } => height * width,
        }
    }
    /// Values per example.
    pub fn numel(&self) -> usize {
        self.units() * self.positions()
    }
    /// The tensor dimensions for a batch of `batch` examples.
    pub fn dims(&self, batch: usize) -> Vec<usize> {
        match *self {
            Self::Features { features } => vec![batch, features],
            Self::Image {
                channels,
                height,
                width,
            } => vec![batch, channels, height, width],
        }
    }
    /// The same shape with `units` units.
    pub fn with_units(&self, units: usize) -> Self {
        match *self {
            Self::Features { .. } => Self::features(units),
            Self::Image { height, width, .. } => Self::image(units, height, width),
        }
    }
    /// The shape a per-unit vector must take to broadcast against a batch of this shape.
    pub(crate) fn unit_broadcast_dims(&self) -> Vec<usize> {
        match self {
            Self::Features { features } => vec![1, *features],
            Self::Image { channels, .. } => vec![1, *channels, 1, 1],
        }
    }
}

/// An element-wise activation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "fn", rename_all = "snake_case")]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// `x` for `x ≥ 0`, `slope·x` otherwise.
    LeakyRelu {
        /// The negative slope.
        slope: f64,
    },
    /// `x·Φ(x)` (the exact, erf-based GELU).
    Gelu,
    /// `tanh(x)`.
    Tanh,
    /// `1 / (1 + e^{-x})`.
    Sigmoid,
    /// `x·sigmoid(x)`.
    Silu,
}

impl Activation {
    /// The activation of one value, in f64 (used to carry constants through the graph).
    pub fn apply_f64(&self, x: f64) -> f64 {
        match *self {
            Self::Relu => x.max(0.0),
            Self::LeakyRelu { slope } => {
                if x >= 0.0 {
                    x
                } else {
                    slope * x
                }
            }
            Self::Gelu => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
            Self::Tanh => x.tanh(),
            Self::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Self::Silu => x / (1.0 + (-x).exp()),
        }
    }

    /// `f(m·x) = m·f(x)` for every `m > 0`: a positive per-unit scale passes through.
    pub fn is_positively_homogeneous(&self) -> bool {
        matches!(self, Self::Relu | Self::LeakyRelu { .. })
    }
}

/// What a node computes. Unit counts of a node's input come from the node it reads, so
/// the description holds no redundant sizes that could disagree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// The network's input (always node 0).
    Input {
        /// One example's shape.
        shape: NodeShape,
    },
    /// A 2-D convolution with a square kernel.
    Conv2d {
        /// Output channels.
        out_channels: usize,
        /// Kernel height and width.
        kernel: usize,
        /// Stride.
        stride: usize,
        /// Zero padding on every side.
        padding: usize,
        /// Dilation.
        dilation: usize,
        /// Groups (1: ordinary; input channels: depthwise).
        groups: usize,
        /// Whether there is a bias.
        bias: bool,
    },
    /// A fully connected layer.
    Linear {
        /// Output features.
        out_features: usize,
        /// Whether there is a bias.
        bias: bool,
    },
    /// Batch normalisation over axis 1 (BatchNorm1d on features, BatchNorm2d on images).
    BatchNorm {
        /// Added to the variance.
        eps: f64,
        /// Weight of the new batch statistics in the running averages.
        momentum: f64,
        /// Whether there is a learned scale and shift.
        affine: bool,
    },
    /// An element-wise activation.
    Activation {
        /// Which one.
        f: Activation,
    },
    /// Max pooling without padding.
    MaxPool2d {
        /// Window size.
        kernel: usize,
        /// Stride.
        stride: usize,
    },
    /// Average pooling without padding.
    AvgPool2d {
        /// Window size.
        kernel: usize,
        /// Stride.
        stride: usize,
    },
    /// `(N, C, H, W) → (N, C·H·W)`, channel-major.
    Flatten,
    /// Bernoulli dropout (training only).
    Dropout {
        /// Probability of dropping an entry.
        p: f64,
    },
    /// Structured Bayesian Pruning noise on axis 1.
    LogNormalDropout {
        /// The layer's configuration.
        config: LogNormalDropoutConfig,
    },
    /// The sum of two or more inputs of equal shape (a residual connection).
    Add,
    /// Concatenation of two or more inputs along axis 1.
    Concat,
    /// Keeps units `indices` (strictly increasing) of its input.
    Select {
        /// The kept units.
        indices: Vec<usize>,
    },
    /// Places its input's units at `indices` of `size` units, zeros elsewhere.
    Scatter {
        /// Where each input unit goes.
        indices: Vec<usize>,
        /// Units of the output.
        size: usize,
    },
    /// A fixed per-unit multiplier (parameter `scale`).
    Scale,
    /// A fixed additive term (parameter `shift`): per unit, or per unit and position.
    Shift {
        /// Whether the shift varies over an image's positions.
        per_position: bool,
    },
}

impl Op {
    /// A short name of the operation, for reports and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Conv2d { .. } => "conv2d",
            Op::Linear { .. } => "linear",
            Op::BatchNorm { .. } => "batch_norm",
            Op::Activation { .. } => "activation",
            Op::MaxPool2d { .. } => "max_pool2d",
            Op::AvgPool2d { .. } => "avg_pool2d",
            Op::Flatten => "flatten",
            Op::Dropout { .. } => "dropout",
            Op::LogNormalDropout { .. } => "log_normal_dropout",
            Op::Add => "add",
            Op::Concat => "concat",
            Op::Select { .. } => "select",
            Op::Scatter { .. } => "scatter",
            Op::Scale => "scale",
            Op::Shift { .. } => "shift",
        }
    }

    /// Multiply-accumulates per example of a convolution or linear layer with this
    /// `input` and `output` shape; 0 for every other node.
    pub(crate) fn macs(&self, input: NodeShape, output: NodeShape) -> usize {
        match *self {
            Op::Conv2d { kernel, groups, .. } => {
                output.numel() * input.units() / groups.max(1) * kernel * kernel
            }
            Op::Linear { .. } => input.units() * output.units(),
            _ => 0,
        }
    }
}

/// One node: a unique name (the prefix of its parameters), an operation and the indices of
/// the nodes it reads (always earlier nodes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSpec {
    /// The node's name; its parameters are stored as `name.weight`, `name.bias`, ….
    pub name: String,
    /// What it computes.
    pub op: Op,
    /// The nodes it reads.
    pub inputs: Vec<usize>,
}

/// A whole network: nodes in topological order, node 0 the input, the last node the output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetSpec {
    /// The nodes.
    pub nodes: Vec<NodeSpec>,
}

/// A parameter a node needs: its name within the node, shape and initialisation.
#[derive(Debug, Clone)]
pub(crate) struct ParamSpec {
    pub name: &'static str,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl NetSpec {
    /// Checks the whole graph (references, arities, names, shapes) and returns each node's
    /// output shape. Every error names the node at fault.
    pub fn shapes(&self) -> Result<Vec<NodeShape>> {
        let mut shapes: Vec<NodeShape> = Vec::with_capacity(self.nodes.len());
        let mut names = std::collections::HashSet::new();
        if self.nodes.is_empty() {
            return Err(graph("<net>", "a network needs at least an input node"));
        }
        for (i, node) in self.nodes.iter().enumerate() {
            if node.name.is_empty() || !names.insert(node.name.as_str()) {
                return Err(graph(
                    &node.name,
                    format!("node {i}: names must be non-empty and unique"),
                ));
            }
            if let Some(&bad) = node.inputs.iter().find(|&&j| j >= i) {
                return Err(graph(
                    &node.name,
                    format!("reads node {bad}, which does not come before it (node {i})"),
                ));
            }
            let is_input = matches!(node.op, Op::Input { .. });
            if is_input != (i == 0) {
                return Err(graph(
                    &node.name,
                    "the input must be node 0, and only node 0",
                ));
            }
            let ins: Vec<NodeShape> = node.inputs.iter().map(|&j| shapes[j]).collect();
            shapes.push(infer_shape(&node.name, &node.op, &ins)?);
        }
        Ok(shapes)
    }

    /// The architecture as JSON (what a saved file's metadata holds).
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| graph("<net>", format!("cannot encode: {e}")))
    }

    /// Parses JSON written by [`NetSpec::to_json`] and checks the graph.
    pub fn from_json(json: &str) -> Result<Self> {
        let spec: NetSpec = serde_json::from_str(json)
            .map_err(|e| graph("<net>", format!("not a valid architecture: {e}")))?;
        spec.shapes()?;
        Ok(spec)
    }
}

pub(crate) fn graph(layer: &str, reason: impl Into<String>) -> Error {
    Error::Graph {
        layer: layer.to_string(),
        reason: reason.into(),
    }
}

fn arity(name: &str, op: &Op, got: usize) -> Result<()> {
    let ok = match op {
        Op::Input { .. } => got == 0,
        Op::Add | Op::Concat => got >= 2,
        _ => got == 1,
    };
    if ok {
        Ok(())
    } else {
        Err(graph(
            name,
            format!("a {} node cannot read {got} input(s)", op.kind()),
        ))
    }
}

fn want_image(name: &str, op: &Op, s: &NodeShape) -> Result<(usize, usize, usize)> {
    match *s {
        NodeShape::Image {
            channels,
            height,
            width,
        } => Ok((channels, height, width)),
        NodeShape::Features { features } => Err(graph(
            name,
            format!(
                "a {} node needs an image input, got {features} features",
                op.kind()
            ),
        )),
    }
}

fn positive(name: &str, what: &str, v: usize) -> Result<()> {
    if v == 0 {
        Err(graph(name, format!("{what} must be at least 1")))
    } else {
        Ok(())
    }
}

/// Output size of a window sliding over `len` (with `pad` on each side).
fn window_out(
    name: &str,
    len: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
    dil: usize,
) -> Result<usize> {
    let span = dil * (kernel - 1) + 1;
    if len + 2 * pad < span {
        return Err(graph(
            name,
            format!("a window spanning {span} does not fit an input of {len} (padding {pad})"),
        ));
    }
    Ok((len + 2 * pad - span) / stride + 1)
}

fn strictly_increasing_below(name: &str, what: &str, idx: &[usize], bound: usize) -> Result<()> {
    if idx.is_empty() {
        return Err(graph(name, format!("{what}: the index list is empty")));
    }
    for (pos, w) in idx.windows(2).enumerate() {
        if w[0] >= w[1] {
            return Err(graph(
                name,
                format!(
                    "{what}: indices must be strictly increasing, but position {} holds {} after {}",
                    pos + 1,
                    w[1],
                    w[0]
                ),
            ));
        }
    }
    if let Some(&last) = idx.last() {
        if last >= bound {
            return Err(graph(
                name,
                format!("{what}: index {last} is out of range for {bound} units"),
            ));
        }
    }
    Ok(())
}

/// The output shape of `op` on inputs of shapes `ins`, or why it cannot work.
pub(crate) fn infer_shape(name: &str, op: &Op, ins: &[NodeShape]) -> Result<NodeShape> {
    arity(name, op, ins.len())?;
    let out = match op {
        Op::Input { shape } => *shape,
        &Op::Conv2d {
            out_channels,
            kernel,
            stride,
            padding,
            dilation,
            groups,
            ..
        } => {
            let (c, h, w) = want_image(name, op, &ins[0])?;
            for (what, v) in [
                ("out_channels", out_channels),
                ("kernel", kernel),
                ("stride", stride),
                ("dilation", dilation),
                ("groups", groups),
            ] {
                positive(name, what, v)?;
            }
            if c % groups != 0 || out_channels % groups != 0 {
                return Err(graph(
                    name,
                    format!("groups = {groups} must divide the input channels ({c}) and the output channels ({out_channels})"),
                ));
            }
            NodeShape::image(
                out_channels,
                window_out(name, h, kernel, stride, padding, dilation)?,
                window_out(name, w, kernel, stride, padding, dilation)?,
            )
        }
        &Op::Linear { out_features, .. } => {
            if let NodeShape::Image { .. } = ins[0] {
                return Err(graph(
                    name,
                    format!(
                        "a linear node needs a feature vector, got an image {:?}: put a flatten node before it",
                        ins[0]
                    ),
                ));
            }
            positive(name, "out_features", out_features)?;
            NodeShape::features(out_features)
        }
        &Op::BatchNorm { eps, momentum, .. } => {
            if !(eps.is_finite() && eps > 0.0 && (0.0..=1.0).contains(&momentum)) {
                return Err(graph(
                    name,
                    format!("batch norm needs eps > 0 and momentum in [0, 1], got eps = {eps}, momentum = {momentum}"),
                ));
            }
            ins[0]
        }
        Op::Activation { f } => {
            if let Activation::LeakyRelu { slope } = f {
                if !slope.is_finite() {
                    return Err(graph(
                        name,
                        format!("leaky relu slope {slope} is not finite"),
                    ));
                }
            }
            ins[0]
        }
        &Op::MaxPool2d { kernel, stride } | &Op::AvgPool2d { kernel, stride } => {
            let (c, h, w) = want_image(name, op, &ins[0])?;
            positive(name, "kernel", kernel)?;
            positive(name, "stride", stride)?;
            NodeShape::image(
                c,
                window_out(name, h, kernel, stride, 0, 1)?,
                window_out(name, w, kernel, stride, 0, 1)?,
            )
        }
        Op::Flatten => NodeShape::features(ins[0].numel()),
        &Op::Dropout { p } => {
            if !(0.0..1.0).contains(&p) {
                return Err(graph(name, format!("dropout p = {p} must lie in [0, 1)")));
            }
            ins[0]
        }
        Op::LogNormalDropout { config } => {
            config.validate(name)?;
            if config.axis != 1 {
                return Err(graph(
                    name,
                    format!(
                        "inside a Net, noise acts on axis 1 (units), got axis {}",
                        config.axis
                    ),
                ));
            }
            ins[0]
        }
        Op::Add => {
            if let Some(other) = ins.iter().find(|s| **s != ins[0]) {
                return Err(graph(
                    name,
                    format!(
                        "add needs inputs of equal shape, got {:?} and {other:?}",
                        ins[0]
                    ),
                ));
            }
            ins[0]
        }
        Op::Concat => {
            let units = ins.iter().map(|s| s.units()).sum();
            if let Some(other) = ins.iter().find(|s| s.with_units(1) != ins[0].with_units(1)) {
                return Err(graph(
                    name,
                    format!(
                        "concat needs inputs that differ only in units, got {:?} and {other:?}",
                        ins[0]
                    ),
                ));
            }
            ins[0].with_units(units)
        }
        Op::Select { indices } => {
            strictly_increasing_below(name, "select", indices, ins[0].units())?;
            ins[0].with_units(indices.len())
        }
        Op::Scatter { indices, size } => {
            strictly_increasing_below(name, "scatter", indices, *size)?;
            if indices.len() != ins[0].units() {
                return Err(graph(
                    name,
                    format!(
                        "scatter places {} units but its input has {}",
                        indices.len(),
                        ins[0].units()
                    ),
                ));
            }
            ins[0].with_units(*size)
        }
        Op::Scale => ins[0],
        &Op::Shift { per_position } => {
            if per_position {
                want_image(name, op, &ins[0])?;
            }
            ins[0]
        }
    };
    if out.units() == 0 || out.positions() == 0 {
        return Err(graph(name, format!("output shape {out:?} is empty")));
    }
    Ok(out)
}

/// The parameters of node `op`, given its (first) input and output shapes.
pub(crate) fn param_specs(op: &Op, input: &NodeShape, output: &NodeShape) -> Vec<ParamSpec> {
    let p = |name, shape: Vec<usize>, init| ParamSpec { name, shape, init };
    let unit = |name, init| p(name, vec![output.units()], init);
    let fan_uniform = |fan_in: usize| {
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        Init::Uniform {
            lo: -bound,
            up: bound,
        }
    };
    match *op {
        Op::Conv2d {
            out_channels,
            kernel,
            groups,
            bias,
            ..
        } => {
            let per_group = input.units() / groups;
            let mut v = vec![p(
                "weight",
                vec![out_channels, per_group, kernel, kernel],
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )];
            if bias {
                v.push(unit("bias", fan_uniform(per_group * kernel * kernel)));
            }
            v
        }
        Op::Linear { out_features, bias } => {
            let mut v = vec![p(
                "weight",
                vec![out_features, input.units()],
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )];
            if bias {
                v.push(unit("bias", fan_uniform(input.units())));
            }
            v
        }
        Op::BatchNorm { affine, .. } => {
            let mut v = vec![
                unit("running_mean", Init::Const(0.0)),
                unit("running_var", Init::Const(1.0)),
            ];
            if affine {
                v.push(unit("weight", Init::Const(1.0)));
                v.push(unit("bias", Init::Const(0.0)));
            }
            v
        }
        Op::LogNormalDropout { config } => vec![
            unit("mu", Init::Const(config.mu_init)),
            unit("log_sigma", Init::Const(config.log_sigma_init)),
        ],
        Op::Scale => vec![unit("scale", Init::Const(1.0))],
        Op::Shift { per_position } => {
            let shape = if per_position {
                output.dims(1)[1..].to_vec()
            } else {
                vec![output.units()]
            };
            vec![p("shift", shape, Init::Const(0.0))]
        }
        _ => Vec::new(),
    }
}
