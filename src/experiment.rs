//! One experiment as the paper runs it: pretrain the dense network, train with SBP from
//! it, compress, and measure. The examples are thin wrappers around [`run`].

use std::path::PathBuf;
use std::time::Instant;

use candle::utils::{cuda_is_available, metal_is_available};
use candle::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::compress::{compress, CompressConfig, Compressed};
use crate::data::ImageSet;
use crate::error::{Error, Result};
use crate::layer::LogNormalDropoutConfig;
use crate::net::Net;
use crate::report::{test_error, time_forward, ExperimentReport};
use crate::train::{fit, AdamConfig, EpochStats, FitConfig, Flow};

/// Builds a model with (`Some`) or without (`None`) noise layers.
pub type ModelFn = dyn Fn(Option<LogNormalDropoutConfig>, VarBuilder) -> Result<Net>;

/// Settings of [`run`].
#[derive(Debug, Clone)]
pub struct ExperimentConfig {
    /// The model's name in the report.
    pub model: String,
    /// The data set's name in the report.
    pub dataset: String,
    /// Dense pretraining epochs.
    pub epochs_pretrain: usize,
    /// SBP epochs.
    pub epochs_sbp: usize,
    /// Seed of initialisation, shuffling and noise.
    pub seed: u64,
    /// Examples per training step.
    pub batch_size: usize,
    /// Learning rate of the weights (Adam, β1 = 0.95 as the paper).
    pub lr: f64,
    /// Learning rate of the noise parameters.
    pub noise_lr: f64,
    /// Per-layer weights of the KL term by noise-layer name (1 where absent): above 1, a
    /// layer is pushed harder to prune.
    pub kl_weights: std::collections::BTreeMap<String, f64>,
    /// SBP epochs over which the KL term grows linearly from 0 to its full weight.
    pub kl_warmup_epochs: usize,
    /// Epochs of plain training of the compressed network (no noise, no KL) at a tenth of
    /// `lr`, decaying linearly to 0; 0 keeps the network as compression left it.
    pub finetune_epochs: usize,
    /// Checkpoint directory (each phase in its own subfolder); resumes a run.
    pub checkpoint: Option<PathBuf>,
    /// Progress bars.
    pub progress: bool,
    /// Batch size of the timed inference.
    pub timed_batch: usize,
    /// The device.
    pub device: Device,
}

impl Default for ExperimentConfig {
    fn default() -> Self {
        Self {
            model: "model".into(),
            dataset: "data".into(),
            epochs_pretrain: 2,
            epochs_sbp: 5,
            seed: 0,
            batch_size: 100,
            lr: 1e-3,
            noise_lr: 0.05,
            kl_weights: Default::default(),
            kl_warmup_epochs: 0,
            finetune_epochs: 0,
            checkpoint: None,
            progress: true,
            timed_batch: 100,
            device: Device::Cpu,
        }
    }
}

/// What [`run`] returns.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The report (the examples' JSON).
    pub report: ExperimentReport,
    /// The compressed network with its per-layer report.
    pub compressed: Compressed,
    /// The noise layers of the trained network: name and units.
    pub noise_layers: Vec<(String, usize)>,
    /// Their final per-unit SNR.
    pub snr: Vec<Vec<f64>>,
}

impl Outcome {
    /// Draws the run's PNG plot (see [`crate::plot::plot_run`]).
    pub fn plot(&self, path: &std::path::Path) -> Result<()> {
        let names: Vec<String> = self.noise_layers.iter().map(|l| l.0.clone()).collect();
        let units: Vec<usize> = self.noise_layers.iter().map(|l| l.1).collect();
        // Only the SBP phase has units to follow.
        let sbp: Vec<_> = self.report.history
            [self.report.epochs_pretrain.min(self.report.history.len())..]
            .iter()
            .cloned()
            .enumerate()
            .map(|(k, mut s)| {
                s.epoch = k;
                s
            })
            .collect();
        crate::plot::plot_run(path, &sbp, &names, &units, &self.snr)
    }
}

/// The device named `name`: `cpu`; `cuda` or `cuda:N`; `metal` or `metal:N`; or `auto`, the
/// first CUDA device where this build has CUDA (the `cuda` feature) and the machine a GPU,
/// else the first Metal device likewise, else the CPU. A GPU that this build or machine
/// lacks, an index that is not a number and an unknown name are errors that say which.
///
/// ```
/// use candle_sbp::experiment::device;
///
/// assert!(device("cpu")?.is_cpu());
/// let err = device("tpu").unwrap_err().to_string();
/// assert!(err.contains("cpu, cuda[:N], metal[:N] or auto"), "{err}");
/// # Ok::<(), candle_sbp::Error>(())
/// ```
pub fn device(name: &str) -> Result<Device> {
    let fail = |reason: String| Error::Device {
        name: name.to_string(),
        reason,
    };
    let (kind, ordinal) = match name.split_once(':') {
        Some((kind, index)) => match index.parse::<usize>() {
            Ok(i) => (kind, Some(i)),
            Err(_) => return Err(fail(format!("{index:?} is not a device index"))),
        },
        None => (name, None),
    };
    // A GPU of a kind this build has (its name, its feature), opened at the ordinal.
    let gpu =
        |built: bool, (what, feature): (&str, &str), open: fn(usize) -> candle::Result<Device>| {
            if !built {
                let reason = format!("this build has no {what}: build with --features {feature}");
                return Err(fail(reason));
            }
            open(ordinal.unwrap_or(0)).map_err(|e| fail(e.to_string()))
        };
    match (kind, ordinal) {
        ("cpu", None) => Ok(Device::Cpu),
        ("auto", None) => {
            let cuda = cuda_is_available().then(|| Device::new_cuda(0).ok());
            let metal = || {
                metal_is_available()
                    .then(|| Device::new_metal(0).ok())
                    .flatten()
            };
            Ok(cuda.flatten().or_else(metal).unwrap_or(Device::Cpu))
        }
        ("cuda", _) => gpu(cuda_is_available(), ("CUDA", "cuda"), Device::new_cuda),
        ("metal", _) => gpu(metal_is_available(), ("Metal", "metal"), Device::new_metal),
        _ => Err(fail("expected cpu, cuda[:N], metal[:N] or auto".into())),
    }
}

/// Pretrains `model` densely (no KL, noise frozen at `log σ = -5`, so `θ ≈ 1`), trains it
/// with SBP, compresses it, and measures test errors and the eval speed-up of the
/// compressed over the dense network. `on_epoch` sees every epoch of both phases.
pub fn run(
    model: &ModelFn,
    train: &ImageSet,
    test: &ImageSet,
    config: &ExperimentConfig,
    mut on_epoch: impl FnMut(&str, &EpochStats),
) -> Result<Outcome> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &config.device);
    let mut net = model(Some(LogNormalDropoutConfig::default()), vb)?;
    net.reset_parameters(config.seed)?;
    let adam = |lr| AdamConfig {
        lr,
        beta1: 0.95,
        ..Default::default()
    };
    let phase = |epochs: usize, kl_scale, noise_lr, sub: &str| FitConfig {
        epochs,
        batch_size: config.batch_size,
        weights: adam(config.lr),
        noise: adam(noise_lr),
        constant_epochs: epochs / 2,
        kl_scale,
        kl_weights: config.kl_weights.clone(),
        kl_warmup_epochs: config.kl_warmup_epochs,
        seed: config.seed,
        checkpoint: config.checkpoint.as_ref().map(|c| c.join(sub)),
        progress: config.progress,
    };
    let start = Instant::now();
    let pretrain = phase(config.epochs_pretrain, 0.0, 0.0, "pretrain");
    let mut history = fit(&mut net, train, &pretrain, |_, s| {
        on_epoch("pretrain", s);
        Ok(Flow::Continue)
    })?;
    let dense_error = test_error(&net, test, 500)?;
    let sbp = phase(config.epochs_sbp, 1.0, config.noise_lr, "sbp");
    history.extend(fit(&mut net, train, &sbp, |_, s| {
        on_epoch("sbp", s);
        Ok(Flow::Continue)
    })?);

    let noise_layers = net
        .noise_layers()
        .iter()
        .map(|(_, l)| (l.name().to_string(), l.num_units()))
        .collect();
    let snr = net
        .noise_layers()
        .iter()
        .map(|(_, l)| l.snr())
        .collect::<Result<Vec<_>>>()?;
    let mut small = compress(&net, &CompressConfig::default())?;
    let error_before_finetune = test_error(&small.net, test, 500)?;
    let mut finetune_history = Vec::new();
    let compressed_error = if config.finetune_epochs > 0 {
        let finetune = FitConfig {
            weights: adam(0.1 * config.lr),
            constant_epochs: 0,
            kl_weights: Default::default(),
            kl_warmup_epochs: 0,
            ..phase(config.finetune_epochs, 0.0, 0.0, "finetune")
        };
        finetune_history = fit(&mut small.net, train, &finetune, |_, s| {
            on_epoch("finetune", s);
            Ok(Flow::Continue)
        })?;
        test_error(&small.net, test, 500)?
    } else {
        error_before_finetune
    };
    let train_seconds = start.elapsed().as_secs_f64();
    let dense_vm = VarMap::new();
    let dense = model(
        None,
        VarBuilder::from_varmap(&dense_vm, DType::F32, &config.device),
    )?;
    let dims = dense.input_shape().dims(config.timed_batch);
    let xs = Tensor::rand(0f32, 1., dims, &config.device)?;
    let speedup = time_forward(&dense, &xs, 30)? / time_forward(&small.net, &xs, 30)?;
    let r = &small.report;
    let report = ExperimentReport {
        model: config.model.clone(),
        dataset: config.dataset.clone(),
        seed: config.seed,
        epochs_pretrain: config.epochs_pretrain,
        epochs_sbp: config.epochs_sbp,
        lr: config.lr,
        noise_lr: config.noise_lr,
        kl_weights: config.kl_weights.clone(),
        kl_warmup_epochs: config.kl_warmup_epochs,
        finetune_epochs: config.finetune_epochs,
        error_before_finetune,
        finetune_history,
        noise_units_after: r.noise_layers.iter().map(|n| n.units_after).collect(),
        train_seconds,
        dense_error,
        compressed_error,
        units_before: r.layers.iter().map(|l| l.units_before).collect(),
        units_after: r.layers.iter().map(|l| l.units_after).collect(),
        params_before: r.params_before,
        params_after: r.params_after,
        macs_before: r.macs_before,
        macs_after: r.macs_after,
        speedup_measured: speedup,
        batch_size_timed: config.timed_batch,
        history,
    };
    Ok(Outcome {
        report,
        compressed: small,
        noise_layers,
        snr,
    })
}
