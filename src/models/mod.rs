//! The paper's networks as [`Net`]s, each with or without [`LogNormalDropout`] layers
//! (pass `Some(config)` for SBP, `None` for the dense baseline). Noise sits after each
//! layer's activation (or directly on a layer's output where a ReLU follows), so a removed
//! unit is exactly 0 and compression is exact.
//!
//! ```
//! use candle::{DType, Device};
//! use candle_nn::{VarBuilder, VarMap};
//! use candle_sbp::models::lenet5_caffe;
//! use candle_sbp::LogNormalDropoutConfig;
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let net = lenet5_caffe(Some(LogNormalDropoutConfig::default()), vb)?;
//! net.reset_parameters(0)?;
//! assert_eq!(net.noise_layers().len(), 4);
//! # Ok::<(), candle_sbp::Error>(())
//! ```
//!
//! [`LogNormalDropout`]: crate::LogNormalDropout

use candle_nn::{BatchNormConfig, Conv2dConfig, VarBuilder};

use crate::error::Result;
use crate::layer::LogNormalDropoutConfig;
use crate::net::{Net, NetBuilder, NodeId, NodeShape};

fn noise(
    b: &mut NetBuilder,
    name: &str,
    x: NodeId,
    sbp: Option<LogNormalDropoutConfig>,
) -> Result<NodeId> {
    match sbp {
        Some(config) => b.log_normal_dropout(name, x, config),
        None => Ok(x),
    }
}

/// An MNIST MLP: 784 inputs, ReLU hidden layers of widths `hidden`, 10 outputs; with SBP,
/// noise on the 784 input pixels and on every hidden layer. Input: `(N, 1, 28, 28)`.
pub fn lenet_mlp(
    hidden: &[usize],
    sbp: Option<LogNormalDropoutConfig>,
    vb: VarBuilder,
) -> Result<Net> {
    let mut b = NetBuilder::new(NodeShape::image(1, 28, 28), vb);
    let x = b.input();
    let x = b.flatten(x)?;
    let mut x = noise(&mut b, "sbp0", x, sbp)?;
    for (k, &width) in hidden.iter().enumerate() {
        x = b.linear(&format!("fc{}", k + 1), x, width)?;
        x = b.relu(x)?;
        x = noise(&mut b, &format!("sbp{}", k + 1), x, sbp)?;
    }
    let x = b.linear(&format!("fc{}", hidden.len() + 1), x, 10)?;
    b.build(x)
}

/// DropNet's "Model A" (Tan & Motani 2020): 784-40-40-10.
pub fn dropnet_model_a(sbp: Option<LogNormalDropoutConfig>, vb: VarBuilder) -> Result<Net> {
    lenet_mlp(&[40, 40], sbp, vb)
}

/// LeNet-300-100 (784-300-100-10).
pub fn lenet_300_100(sbp: Option<LogNormalDropoutConfig>, vb: VarBuilder) -> Result<Net> {
    lenet_mlp(&[300, 100], sbp, vb)
}

/// LeNet-500-300 (784-500-300-10), the paper's MLP.
pub fn lenet_500_300(sbp: Option<LogNormalDropoutConfig>, vb: VarBuilder) -> Result<Net> {
    lenet_mlp(&[500, 300], sbp, vb)
}

/// LeNet5-Caffe: conv 20 5×5 → max-pool 2 → conv 50 5×5 → max-pool 2 → fc 800→500 →
/// fc 500→10, valid convolutions; with SBP, noise on both convs' channels, on fc1's 800
/// inputs and on its 500 outputs. Input: `(N, 1, 28, 28)`.
pub fn lenet5_caffe(sbp: Option<LogNormalDropoutConfig>, vb: VarBuilder) -> Result<Net> {
    let mut b = NetBuilder::new(NodeShape::image(1, 28, 28), vb);
    let x = b.input();
    let x = b.conv2d("conv1", x, 20, 5, Conv2dConfig::default())?;
    let x = noise(&mut b, "sbp1", x, sbp)?;
    let x = b.relu(x)?;
    let x = b.max_pool2d(x, 2, 2)?;
    let x = b.conv2d("conv2", x, 50, 5, Conv2dConfig::default())?;
    let x = noise(&mut b, "sbp2", x, sbp)?;
    let x = b.relu(x)?;
    let x = b.max_pool2d(x, 2, 2)?;
    let x = b.flatten(x)?;
    let x = noise(&mut b, "sbp3", x, sbp)?;
    let x = b.linear("fc1", x, 500)?;
    let x = noise(&mut b, "sbp4", x, sbp)?;
    let x = b.relu(x)?;
    let x = b.linear("fc2", x, 10)?;
    b.build(x)
}

/// The VGG-like CIFAR-10 network: 13 conv 3×3 (padding 1) + BN + ReLU with widths
/// 64, 64, M, 128, 128, M, 256×3, M, 512×3, M, 512×3, M (M: max-pool 2), then FC 512 + BN +
/// ReLU and FC 10, every width multiplied by `width_scale` (at least 1 unit). With SBP,
/// noise after every conv block and on the first FC's inputs and outputs. Input:
/// `(N, 3, 32, 32)`.
pub fn vgg_like(
    width_scale: f64,
    sbp: Option<LogNormalDropoutConfig>,
    vb: VarBuilder,
) -> Result<Net> {
    const PLAN: [usize; 18] = [
        64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0,
    ];
    let width = |w: usize| ((w as f64 * width_scale).round() as usize).max(1);
    let same = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let mut b = NetBuilder::new(NodeShape::image(3, 32, 32), vb);
    let mut x = b.input();
    let mut k = 0;
    for &w in &PLAN {
        if w == 0 {
            x = b.max_pool2d(x, 2, 2)?;
            continue;
        }
        k += 1;
        x = b.conv2d(&format!("conv{k}"), x, width(w), 3, same)?;
        x = b.batch_norm(&format!("bn{k}"), x, BatchNormConfig::default())?;
        x = b.relu(x)?;
        x = noise(&mut b, &format!("sbp{k}"), x, sbp)?;
    }
    let x = b.flatten(x)?;
    let x = noise(&mut b, "sbp_fc_in", x, sbp)?;
    let x = b.linear("fc1", x, width(512))?;
    let x = b.batch_norm("bn_fc1", x, BatchNormConfig::default())?;
    let x = b.relu(x)?;
    let x = noise(&mut b, "sbp_fc_out", x, sbp)?;
    let x = b.linear("fc2", x, 10)?;
    b.build(x)
}
