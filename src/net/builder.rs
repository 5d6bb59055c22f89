//! [`NetBuilder`]: declares a [`Net`] node by node, checking shapes as it goes.

use candle_nn::{BatchNormConfig, Conv2dConfig, VarBuilder};

use super::spec::{graph, infer_shape, Activation, NetSpec, NodeShape, NodeSpec, Op};
use super::Net;
use crate::error::Result;
use crate::layer::LogNormalDropoutConfig;

/// A handle to a node declared on a [`NetBuilder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeId(usize);

impl NodeId {
    /// The node's index in the network.
    pub fn index(self) -> usize {
        self.0
    }
}

/// Declares a [`Net`]. Layers with parameters take a name (their parameters become
/// `name.weight`, …); parameter-free nodes are named after their kind and index. Each call
/// checks that the new node fits its inputs and says which node does not.
pub struct NetBuilder<'a> {
    vb: VarBuilder<'a>,
    spec: NetSpec,
    shapes: Vec<NodeShape>,
}

impl<'a> NetBuilder<'a> {
    /// Starts a network whose examples have shape `input`; parameters come from `vb`.
    pub fn new(input: NodeShape, vb: VarBuilder<'a>) -> Self {
        Self {
            vb,
            spec: NetSpec {
                nodes: vec![NodeSpec {
                    name: "input".into(),
                    op: Op::Input { shape: input },
                    inputs: Vec::new(),
                }],
            },
            shapes: vec![input],
        }
    }

    /// The input node.
    pub fn input(&self) -> NodeId {
        NodeId(0)
    }

    /// The output shape of node `x`.
    pub fn shape(&self, x: NodeId) -> NodeShape {
        self.shapes[x.0]
    }

    /// Adds any node; the typed helpers below are shorthands for this.
    pub fn push(&mut self, name: impl Into<String>, op: Op, inputs: &[NodeId]) -> Result<NodeId> {
        let name = name.into();
        let index = self.spec.nodes.len();
        if let Some(bad) = inputs.iter().find(|x| x.0 >= index) {
            return Err(graph(
                &name,
                format!("reads node {}, which does not exist", bad.0),
            ));
        }
        if self.spec.nodes.iter().any(|n| n.name == name) {
            return Err(graph(&name, "a node of this name already exists"));
        }
        if let Op::Input { .. } = op {
            return Err(graph(&name, "a network has exactly one input node"));
        }
        let ins: Vec<NodeShape> = inputs.iter().map(|x| self.shapes[x.0]).collect();
        let shape = infer_shape(&name, &op, &ins)?;
        self.spec.nodes.push(NodeSpec {
            name,
            op,
            inputs: inputs.iter().map(|x| x.0).collect(),
        });
        self.shapes.push(shape);
        Ok(NodeId(index))
    }

    fn push_anonymous(&mut self, op: Op, inputs: &[NodeId]) -> Result<NodeId> {
        let name = format!("{}{}", op.kind(), self.spec.nodes.len());
        self.push(name, op, inputs)
    }

    /// A Conv2d with a square `kernel` and a bias (`config.groups` may be 1 or a divisor
    /// of the channels; depthwise is `groups` = input channels).
    pub fn conv2d(
        &mut self,
        name: &str,
        x: NodeId,
        out_channels: usize,
        kernel: usize,
        config: Conv2dConfig,
    ) -> Result<NodeId> {
        self.conv2d_with_bias(name, x, out_channels, kernel, config, true)
    }

    /// A Conv2d, with or without a bias.
    pub fn conv2d_with_bias(
        &mut self,
        name: &str,
        x: NodeId,
        out_channels: usize,
        kernel: usize,
        config: Conv2dConfig,
        bias: bool,
    ) -> Result<NodeId> {
        let op = Op::Conv2d {
            out_channels,
            kernel,
            stride: config.stride,
            padding: config.padding,
            dilation: config.dilation,
            groups: config.groups,
            bias,
        };
        self.push(name, op, &[x])
    }

    /// A Linear layer with a bias.
    pub fn linear(&mut self, name: &str, x: NodeId, out_features: usize) -> Result<NodeId> {
        self.push(
            name,
            Op::Linear {
                out_features,
                bias: true,
            },
            &[x],
        )
    }

    /// A Linear layer without a bias.
    pub fn linear_no_bias(&mut self, name: &str, x: NodeId, out_features: usize) -> Result<NodeId> {
        self.push(
            name,
            Op::Linear {
                out_features,
                bias: false,
            },
            &[x],
        )
    }

    /// Batch normalisation over axis 1 (1-D on features, 2-D on images). `remove_mean`
    /// must be true (it is candle-nn's default).
    pub fn batch_norm(&mut self, name: &str, x: NodeId, config: BatchNormConfig) -> Result<NodeId> {
        if !config.remove_mean {
            return Err(graph(
                name,
                "batch norm without mean removal is not supported",
            ));
        }
        let op = Op::BatchNorm {
            eps: config.eps,
            momentum: config.momentum,
            affine: config.affine,
        };
        self.push(name, op, &[x])
    }

    /// An element-wise activation.
    pub fn activation(&mut self, x: NodeId, f: Activation) -> Result<NodeId> {
        self.push_anonymous(Op::Activation { f }, &[x])
    }

    /// ReLU.
    pub fn relu(&mut self, x: NodeId) -> Result<NodeId> {
        self.activation(x, Activation::Relu)
    }

    /// Max pooling with a square window.
    pub fn max_pool2d(&mut self, x: NodeId, kernel: usize, stride: usize) -> Result<NodeId> {
        self.push_anonymous(Op::MaxPool2d { kernel, stride }, &[x])
    }

    /// Average pooling with a square window.
    pub fn avg_pool2d(&mut self, x: NodeId, kernel: usize, stride: usize) -> Result<NodeId> {
        self.push_anonymous(Op::AvgPool2d { kernel, stride }, &[x])
    }

    /// `(N, C, H, W) → (N, C·H·W)`.
    pub fn flatten(&mut self, x: NodeId) -> Result<NodeId> {
        self.push_anonymous(Op::Flatten, &[x])
    }

    /// Dropout with drop probability `p` (seeded; see [`Net::reseed`]).
    pub fn dropout(&mut self, x: NodeId, p: f64) -> Result<NodeId> {
        self.push_anonymous(Op::Dropout { p }, &[x])
    }

    /// A [`LogNormalDropout`](crate::LogNormalDropout) on the units of `x`: on a layer's
    /// outputs, or on the network's input to prune input features.
    pub fn log_normal_dropout(
        &mut self,
        name: &str,
        x: NodeId,
        config: LogNormalDropoutConfig,
    ) -> Result<NodeId> {
        self.push(name, Op::LogNormalDropout { config }, &[x])
    }

    /// The sum of equally shaped nodes (a residual connection).
    pub fn add(&mut self, xs: &[NodeId]) -> Result<NodeId> {
        self.push_anonymous(Op::Add, xs)
    }

    /// The concatenation of nodes along axis 1.
    pub fn concat(&mut self, xs: &[NodeId]) -> Result<NodeId> {
        self.push_anonymous(Op::Concat, xs)
    }

    /// The declared architecture so far.
    pub fn spec(&self) -> &NetSpec {
        &self.spec
    }

    /// Finishes the network with `output` as its output, which must be the last node
    /// declared.
    pub fn build(self, output: NodeId) -> Result<Net> {
        let last = self.spec.nodes.len() - 1;
        if output.0 != last {
            return Err(graph(
                &self.spec.nodes[last].name,
                format!(
                    "declared after the output node {}; the output must be the last node",
                    self.spec.nodes[output.0].name
                ),
            ));
        }
        Net::new(self.spec, self.vb)
    }
}
