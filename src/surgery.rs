//! Low-level surgery: physically shrink candle-nn layers to a list of kept units.
//!
//! These functions serve people with their own model structs. Each takes a layer, the
//! indices to keep (strictly increasing, in range) and the layer's name for errors, and
//! returns a new, smaller layer of the same candle-nn type. The result shares nothing
//! mutable with the input.
//!
//! Removing a unit from one layer means removing it wherever it is consumed, too: a conv's
//! output channels, the next BatchNorm's features and the next conv's input channels must
//! lose the same indices.
//!
//! ```
//! use candle::{DType, Device, Module, Tensor};
//! use candle_nn::{linear, VarBuilder, VarMap};
//! use candle_sbp::surgery::{linear_keep_inputs, linear_keep_outputs};
//!
//! // A hand-written two-layer MLP: fc1 (4 -> 3), fc2 (3 -> 2). Hidden unit 1 goes.
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let (fc1, fc2) = (linear(4, 3, vb.pp("fc1"))?, linear(3, 2, vb.pp("fc2"))?);
//! let keep = [0, 2];
//! let small1 = linear_keep_outputs(&fc1, &keep, "fc1")?;
//! let small2 = linear_keep_inputs(&fc2, &keep, "fc2")?;
//! assert_eq!(small1.weight().dims(), &[2, 4]);
//! assert_eq!(small2.weight().dims(), &[2, 2]);
//! let x = Tensor::ones((1, 4), DType::F32, &Device::Cpu)?;
//! let _y = small2.forward(&small1.forward(&x)?)?;
//! # Ok::<(), candle_sbp::Error>(())
//! ```

use candle::Tensor;
use candle_nn::{BatchNorm, Conv2d, Conv2dConfig, Linear};

use crate::error::{Error, Result};

/// Keeps rows `keep` of a Linear's weight (its output units) and of its bias.
pub fn linear_keep_outputs(layer: &Linear, keep: &[usize], name: &str) -> Result<Linear> {
    let idx = index_tensor(
        keep,
        layer.weight().dim(0)?,
        name,
        "output unit",
        layer.weight(),
    )?;
    let bias = layer.bias().map(|b| b.index_select(&idx, 0)).transpose()?;
    Ok(Linear::new(layer.weight().index_select(&idx, 0)?, bias))
}

/// Keeps columns `keep` of a Linear's weight (its input features).
pub fn linear_keep_inputs(layer: &Linear, keep: &[usize], name: &str) -> Result<Linear> {
    let idx = index_tensor(
        keep,
        layer.weight().dim(1)?,
        name,
        "input feature",
        layer.weight(),
    )?;
    Ok(Linear::new(
        layer.weight().index_select(&idx, 1)?.contiguous()?,
        layer.bias().cloned(),
    ))
}

/// Keeps output channels `keep` of an ordinary (`groups = 1`) Conv2d.
pub fn conv2d_keep_outputs(layer: &Conv2d, keep: &[usize], name: &str) -> Result<Conv2d> {
    require_groups(layer, name, "conv2d_keep_outputs")?;
    let idx = index_tensor(
        keep,
        layer.weight().dim(0)?,
        name,
        "output channel",
        layer.weight(),
    )?;
    let bias = layer.bias().map(|b| b.index_select(&idx, 0)).transpose()?;
    Ok(Conv2d::new(
        layer.weight().index_select(&idx, 0)?,
        bias,
        *layer.config(),
    ))
}

/// Keeps input channels `keep` of an ordinary (`groups = 1`) Conv2d.
pub fn conv2d_keep_inputs(layer: &Conv2d, keep: &[usize], name: &str) -> Result<Conv2d> {
    require_groups(layer, name, "conv2d_keep_inputs")?;
    let idx = index_tensor(
        keep,
        layer.weight().dim(1)?,
        name,
        "input channel",
        layer.weight(),
    )?;
    Ok(Conv2d::new(
        layer.weight().index_select(&idx, 1)?.contiguous()?,
        layer.bias().cloned(),
        *layer.config(),
    ))
}

/// Keeps channels `keep` of a depthwise Conv2d (`groups` = input = output channels), where
/// each channel is its own filter: input and output channels go together.
pub fn conv2d_depthwise_keep_channels(
    layer: &Conv2d,
    keep: &[usize],
    name: &str,
) -> Result<Conv2d> {
    let (out_ch, per_group) = (layer.weight().dim(0)?, layer.weight().dim(1)?);
    let groups = layer.config().groups;
    if groups != out_ch || per_group != 1 {
        return Err(Error::Surgery {
            layer: name.into(),
            reason: format!(
                "not a depthwise conv: groups = {groups}, weight shape {:?} (depthwise needs groups = out channels and one input channel per group)",
                layer.weight().dims()
            ),
        });
    }
    let idx = index_tensor(keep, out_ch, name, "channel", layer.weight())?;
    let (weight, bias) = keep_output_rows(layer.weight(), layer.bias(), &idx)?;
    let config = Conv2dConfig {
        groups: keep.len(),
        ..*layer.config()
    };
    Ok(Conv2d::new(weight, bias, config))
}

/// Keeps features `keep` of a BatchNorm (running mean and variance, and the affine weight
/// and bias when present). Momentum and epsilon carry over.
pub fn batch_norm_keep_features(
    layer: &BatchNorm,
    keep: &[usize],
    name: &str,
) -> Result<BatchNorm> {
    let mean = layer.running_mean();
    let idx = index_tensor(keep, mean.dim(0)?, name, "feature", mean)?;
    let pick = |t: &Tensor| t.index_select(&idx, 0);
    let (mean, var) = (pick(mean)?, pick(layer.running_var())?);
    let bn = match layer.weight_and_bias() {
        Some((w, b)) => BatchNorm::new_with_momentum(
            keep.len(),
            mean,
            var,
            pick(w)?,
            pick(b)?,
            layer.eps(),
            layer.momentum(),
        )?,
        None => BatchNorm::new_no_bias_with_momentum(
            keep.len(),
            mean,
            var,
            layer.eps(),
            layer.momentum(),
        )?,
    };
    Ok(bn)
}

/// The weight's rows (dim 0, one per output unit) and the bias entries at `idx`.
fn keep_output_rows(
    weight: &Tensor,
    bias: Option<&Tensor>,
    idx: &Tensor,
) -> Result<(Tensor, Option<Tensor>)> {
    let bias = bias.map(|b| b.index_select(idx, 0)).transpose()?;
    Ok((weight.index_select(idx, 0)?, bias))
}

fn require_groups(layer: &Conv2d, name: &str, what: &str) -> Result<()> {
    let groups = layer.config().groups;
    if groups != 1 {
        return Err(Error::Surgery {
            layer: name.into(),
            reason: format!(
                "{what} handles groups = 1 only, this conv has groups = {groups} (use conv2d_depthwise_keep_channels for depthwise convs)"
            ),
        });
    }
    Ok(())
}

/// Checks `keep` (strictly increasing, below `len`) and makes it an index tensor on the
/// device of `like`.
fn index_tensor(
    keep: &[usize],
    len: usize,
    name: &str,
    what: &str,
    like: &Tensor,
) -> Result<Tensor> {
    let fail = |reason: String| Error::Surgery {
        layer: name.into(),
        reason,
    };
    for (pos, &k) in keep.iter().enumerate() {
        if k >= len {
            return Err(fail(format!(
                "{what} index {k} (position {pos} of the keep list) is out of range: the layer has {len}"
            )));
        }
        if pos > 0 && keep[pos - 1] >= k {
            return Err(fail(format!(
                "the keep list must be strictly increasing, but index {k} at position {pos} follows {}",
                keep[pos - 1]
            )));
        }
    }
    let idx: Vec<u32> = keep.iter().map(|&k| k as u32).collect();
    Ok(Tensor::from_vec(idx, keep.len(), like.device())?)
}
