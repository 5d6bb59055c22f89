//! Size and cost of a network: units, parameters and multiply-accumulates (MACs) per
//! layer, and the before/after report of [`compress`](crate::compress::compress).
//!
//! MACs count the multiply-accumulates of Conv2d and Linear layers for one example of the
//! network's declared input shape (`C_out·H_out·W_out·C_in/groups·k²` and `in·out`); the
//! element-wise work of batch norms, activations and pooling is not counted, as in the SBP
//! paper's FLOPs. Parameters are those of the model at inference: Conv2d, Linear, affine
//! batch-norm, scale and shift parameters; batch-norm running statistics and the noise
//! layers' `μ` and `log σ` are not counted.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::net::{Net, NodeShape, Op};

/// Size and cost of one layer (the input, a Conv2d or a Linear).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerStats {
    /// The node's name.
    pub name: String,
    /// `input`, `conv2d` or `linear`.
    pub kind: String,
    /// Units the layer reads (channels or features).
    pub inputs: usize,
    /// Units the layer produces.
    pub units: usize,
    /// Parameters (weight and bias).
    pub params: usize,
    /// Multiply-accumulates per example.
    pub macs: u64,
}

/// Values in node `i`'s parameters.
fn node_params(net: &Net, i: usize) -> usize {
    net.param_names(i)
        .iter()
        .filter_map(|p| net.param(i, p))
        .map(|t| t.elem_count())
        .sum()
}

/// Per-layer size and cost of `net`: the input, then each Conv2d and Linear, in order.
pub fn layer_stats(net: &Net) -> Vec<LayerStats> {
    let shapes = net.shapes();
    net.spec()
        .nodes
        .iter()
        .enumerate()
        .filter_map(|(i, node)| {
            let out = shapes[i];
            let input = node.inputs.first().map_or(out, |&j| shapes[j]);
            let kind = match &node.op {
                Op::Input { .. } => "input",
                Op::Conv2d { .. } => "conv2d",
                Op::Linear { .. } => "linear",
                _ => return None,
            };
            let macs = node.op.macs(input, out) as u64;
            Some(LayerStats {
                name: node.name.clone(),
                kind: kind.into(),
                inputs: if kind == "input" {
                    out.units()
                } else {
                    input.units()
                },
                units: out.units(),
                params: node_params(net, i),
                macs,
            })
        })
        .collect()
}

/// Parameters of `net` at inference (see the [module docs](self)).
pub fn inference_params(net: &Net) -> usize {
    net.spec()
        .nodes
        .iter()
        .enumerate()
        .map(|(i, node)| match node.op {
            Op::Conv2d { .. } | Op::Linear { .. } | Op::Scale | Op::Shift { .. } => {
                node_params(net, i)
            }
            Op::BatchNorm { affine: true, .. } => 2 * net.shapes()[i].units(),
            _ => 0,
        })
        .sum()
}

/// Multiply-accumulates of `net` per example (see the [module docs](self)).
pub fn total_macs(net: &Net) -> u64 {
    layer_stats(net).iter().map(|l| l.macs).sum()
}

/// One layer before and after compression.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerReport {
    /// The layer's name (the same in both networks).
    pub name: String,
    /// `input`, `conv2d` or `linear`.
    pub kind: String,
    /// Units read before.
    pub inputs_before: usize,
    /// Units read after.
    pub inputs_after: usize,
    /// Units produced before (for the input: its features or channels).
    pub units_before: usize,
    /// Units produced after (for the input: those any layer still reads).
    pub units_after: usize,
    /// Parameters before.
    pub params_before: usize,
    /// Parameters after.
    pub params_after: usize,
    /// MACs per example before.
    pub macs_before: u64,
    /// MACs per example after.
    pub macs_after: u64,
}

/// What [`compress`](crate::compress::compress) did: per layer and in total.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompressionReport {
    /// One example's input shape (what the MACs are counted for).
    pub input_shape: NodeShape,
    /// The input, each Conv2d and each Linear.
    pub layers: Vec<LayerReport>,
    /// Inference parameters before.
    pub params_before: usize,
    /// Inference parameters after.
    pub params_after: usize,
    /// MACs per example before.
    pub macs_before: u64,
    /// MACs per example after.
    pub macs_after: u64,
    /// Decisions worth knowing about (a layer kept from emptying, a multiplier that stayed
    /// a scale node, …).
    pub notes: Vec<String>,
    /// Units at each noise layer's position, before and after (the paper's notation:
    /// LeNet5's 20-50-800-500 → 3-18-284-283), in node order.
    #[serde(default)]
    pub noise_layers: Vec<NoiseUnits>,
}

/// The units at one noise layer's position before and after compression: those whose
/// noise keeps them and that the compressed network still computes and reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoiseUnits {
    /// The noise layer.
    pub name: String,
    /// Its units.
    pub units_before: usize,
    /// Units left in the compressed network.
    pub units_after: usize,
}

impl CompressionReport {
    pub(crate) fn new(
        before: &Net,
        after: &Net,
        kept: &[Vec<usize>],
        notes: Vec<String>,
    ) -> Result<Self> {
        let after_stats = layer_stats(after);
        let layers = layer_stats(before)
            .into_iter()
            .map(|b| {
                let i = before.node_index(&b.name).expect("stats name a node");
                let a = after_stats.iter().find(|a| a.name == b.name);
                let units_after = kept[i].len();
                LayerReport {
                    inputs_after: if b.kind == "input" {
                        units_after
                    } else {
                        a.map_or(0, |a| a.inputs)
                    },
                    units_after,
                    params_after: a.map_or(0, |a| a.params),
                    macs_after: a.map_or(0, |a| a.macs),
                    name: b.name,
                    kind: b.kind,
                    inputs_before: b.inputs,
                    units_before: b.units,
                    params_before: b.params,
                    macs_before: b.macs,
                }
            })
            .collect();
        let noise_layers = before
            .noise_layers()
            .iter()
            .map(|&(i, layer)| NoiseUnits {
                name: layer.name().to_string(),
                units_before: layer.num_units(),
                units_after: kept[i].len(),
            })
            .collect();
        Ok(Self {
            noise_layers,
            input_shape: before.input_shape(),
            layers,
            params_before: inference_params(before),
            params_after: inference_params(after),
            macs_before: total_macs(before),
            macs_after: total_macs(after),
            notes,
        })
    }

    /// `macs_before / macs_after` (how many times fewer MACs).
    pub fn macs_ratio(&self) -> f64 {
        self.macs_before as f64 / self.macs_after.max(1) as f64
    }

    /// `params_before / params_after`.
    pub fn params_ratio(&self) -> f64 {
        self.params_before as f64 / self.params_after.max(1) as f64
    }

    /// The layer report of `name`, if there is one.
    pub fn layer(&self, name: &str) -> Option<&LayerReport> {
        self.layers.iter().find(|l| l.name == name)
    }

    /// Pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serialises")
    }
}

impl fmt::Display for CompressionReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name_w = self
            .layers
            .iter()
            .map(|l| l.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        writeln!(
            f,
            "{:<name_w$}  {:<7}  {:>15}  {:>15}  {:>21}  {:>23}",
            "layer", "kind", "inputs", "units", "params", "MACs"
        )?;
        for l in &self.layers {
            writeln!(
                f,
                "{:<name_w$}  {:<7}  {:>15}  {:>15}  {:>21}  {:>23}",
                l.name,
                l.kind,
                format!("{} → {}", l.inputs_before, l.inputs_after),
                format!("{} → {}", l.units_before, l.units_after),
                format!("{} → {}", l.params_before, l.params_after),
                format!("{} → {}", l.macs_before, l.macs_after),
            )?;
        }
        writeln!(
            f,
            "total: params {} → {} ({:.2}× fewer), MACs {} → {} ({:.2}× fewer)",
            self.params_before,
            self.params_after,
            self.params_ratio(),
            self.macs_before,
            self.macs_after,
            self.macs_ratio()
        )?;
        if !self.noise_layers.is_empty() {
            let units = |f: fn(&NoiseUnits) -> usize| {
                let u: Vec<String> = self.noise_layers.iter().map(|n| f(n).to_string()).collect();
                u.join("-")
            };
            writeln!(
                f,
                "units at the noise layers: {} → {}",
                units(|n| n.units_before),
                units(|n| n.units_after)
            )?;
        }
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        Ok(())
    }
}

/// The report an experiment writes (the examples' `--report FILE`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExperimentReport {
    /// The network.
    pub model: String,
    /// The data set.
    pub dataset: String,
    /// The seed of the run.
    pub seed: u64,
    /// Dense pretraining epochs.
    pub epochs_pretrain: usize,
    /// SBP epochs.
    pub epochs_sbp: usize,
    /// Learning rate of the weights.
    #[serde(default)]
    pub lr: f64,
    /// Learning rate of the noise parameters.
    #[serde(default)]
    pub noise_lr: f64,
    /// Per-layer KL weights (absent layers: 1).
    #[serde(default)]
    pub kl_weights: std::collections::BTreeMap<String, f64>,
    /// SBP epochs of linear KL warm-up (0: none).
    #[serde(default)]
    pub kl_warmup_epochs: usize,
    /// Units at each noise layer's position in the compressed network (the paper's
    /// notation), in node order.
    #[serde(default)]
    pub noise_units_after: Vec<usize>,
    /// Epochs of plain training of the compressed network (0: none).
    #[serde(default)]
    pub finetune_epochs: usize,
    /// Test error of the compressed network before that training (equal to
    /// `compressed_error` without it).
    #[serde(default)]
    pub error_before_finetune: f64,
    /// The fine-tuning epochs.
    #[serde(default)]
    pub finetune_history: Vec<crate::train::EpochStats>,
    /// Wall-clock seconds of training (every phase).
    pub train_seconds: f64,
    /// Test error of the dense network after pretraining.
    pub dense_error: f64,
    /// Test error of the compressed network.
    pub compressed_error: f64,
    /// Units per layer before (the input, then each Conv2d and Linear).
    pub units_before: Vec<usize>,
    /// Units per layer after (for the input: the features still read).
    pub units_after: Vec<usize>,
    /// Inference parameters before.
    pub params_before: usize,
    /// Inference parameters after.
    pub params_after: usize,
    /// MACs per example before.
    pub macs_before: u64,
    /// MACs per example after.
    pub macs_after: u64,
    /// Measured eval-time speed-up of the compressed over the dense network, both run
    /// through their [`InferencePlan`](crate::InferencePlan)s.
    pub speedup_measured: f64,
    /// The batch size the speed-up was measured at.
    pub batch_size_timed: usize,
    /// Every epoch of both phases.
    pub history: Vec<crate::train::EpochStats>,
}

/// Test error of `net` in evaluation mode over `data`, in batches of `batch`.
pub fn test_error(net: &Net, data: &crate::data::ImageSet, batch: usize) -> Result<f64> {
    let mut wrong = 0usize;
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(batch.max(1)) {
        let (xs, ys) = data.batch(chunk, net.device())?;
        let pred = net.forward_t(&xs, false)?.argmax(1)?;
        let hits = pred
            .eq(&ys)?
            .to_dtype(candle::DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        wrong += chunk.len() - hits as usize;
    }
    Ok(wrong as f64 / data.len().max(1) as f64)
}

/// Median seconds of one eval-mode forward pass of `net` on `xs` through its
/// [`InferencePlan`](crate::InferencePlan) (the way to run a trained network fast; the
/// network itself where the plan does not compile it), over `repeats` runs after a warm-up
/// run.
pub fn time_forward(net: &Net, xs: &candle::Tensor, repeats: usize) -> Result<f64> {
    let plan = net.inference_plan()?;
    plan.forward(xs)?;
    let mut times = Vec::with_capacity(repeats.max(1));
    for _ in 0..repeats.max(1) {
        let start = std::time::Instant::now();
        let out = plan.forward(xs)?;
        out.device().synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
