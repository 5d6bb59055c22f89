//! Training: the SBP objective (ELBO) and an Adam optimiser whose state can be saved.
//!
//! The objective is `mean cross-entropy + kl_scale · Σ_layers w_l · KL_l / N_train`, where
//! `w_l` are optional per-layer KL weights (the paper's "SBPa" weights early layers more).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle::{DType, Tensor, Var};

use crate::data::ImageSet;
use crate::error::{Error, Result};
use crate::net::{write_atomic, Net};

/// The terms of one evaluation of the objective.
#[derive(Debug, Clone)]
pub struct Elbo {
    /// The loss to minimise (a scalar tensor with a graph).
    pub loss: Tensor,
    /// Mean cross-entropy.
    pub cross_entropy: f64,
    /// `Σ w_l · KL_l / N_train`, already scaled.
    pub kl: f64,
}

/// The SBP objective for `logits` against `labels`: mean cross-entropy plus
/// `kl_scale · Σ w_l KL_l / n_train` (weights by noise-layer name, 1 where absent).
pub fn elbo(
    net: &Net,
    logits: &Tensor,
    labels: &Tensor,
    n_train: usize,
    kl_scale: f64,
    kl_weights: &BTreeMap<String, f64>,
) -> Result<Elbo> {
    if n_train == 0 {
        return Err(Error::InvalidValue {
            name: "n_train".into(),
            value: 0.0,
            reason: "the training set size must be positive".into(),
        });
    }
    let ce = crate::ops::cross_entropy(logits, labels)?;
    let mut kl: Option<Tensor> = None;
    if kl_scale != 0.0 {
        for (_, layer) in net.noise_layers() {
            let w = kl_weights.get(layer.name()).copied().unwrap_or(1.0) * kl_scale;
            if w == 0.0 {
                continue;
            }
            let term = (layer.kl()?.to_dtype(logits.dtype())? * (w / n_train as f64))?;
            kl = Some(match kl {
                Some(sum) => sum.add(&term)?,
                None => term,
            });
        }
    }
    // One read of each term per step, not one per layer.
    let scalar = |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    let (loss, kl_total) = match &kl {
        Some(kl) => (ce.add(kl)?, scalar(kl)?),
        None => (ce.clone(), 0.0),
    };
    Ok(Elbo {
        cross_entropy: scalar(&ce)?,
        kl: kl_total,
        loss,
    })
}

/// Adam's hyper-parameters for one parameter group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay (the paper uses 0.95).
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay (AdamW); 0 for the noise parameters.
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One parameter with its Adam moments.
#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    moments: Moments,
    group: usize,
}

/// Adam's moments: host vectors updated with the parameter in one fused pass on the CPU;
/// tensors updated with candle ops on other devices.
#[derive(Debug)]
enum Moments {
    Host(crate::ops::HostMoments),
    Tensors { m: Tensor, v: Tensor },
}

impl Moments {
    fn for_param(t: &Tensor) -> Result<Self> {
        Ok(match crate::ops::HostMoments::for_param(t) {
            Some(host) => Self::Host(host),
            None => Self::Tensors {
                m: t.zeros_like()?,
                v: t.zeros_like()?,
            },
        })
    }

    /// `(m, v)` as tensors of the parameter's shape (copies: the moments change in place).
    fn tensors(&self, param: &Tensor) -> Result<(Tensor, Tensor)> {
        match self {
            Self::Host(h) => Ok(h.tensors(param.shape())?),
            Self::Tensors { m, v } => Ok((m.copy()?, v.copy()?)),
        }
    }
}

/// Adam with parameter groups (weights and noise parameters apart, so the noise gets no
/// weight decay and may get its own learning rate) and a state that can be saved and
/// restored exactly.
#[derive(Debug)]
pub struct Adam {
    slots: Vec<Slot>,
    groups: Vec<AdamConfig>,
    step: u64,
}

impl Adam {
    /// An optimiser over `net`'s trainable parameters: the noise layers' `mu` and
    /// `log_sigma` use `noise`, everything else `weights` (batch-norm running statistics
    /// are not trained).
    pub fn new(net: &Net, weights: AdamConfig, noise: AdamConfig) -> Result<Self> {
        let mut slots = Vec::new();
        for (name, t) in net.named_params() {
            if name.ends_with(".running_mean") || name.ends_with(".running_var") {
                continue;
            }
            if !t.is_variable() {
                return Err(Error::InvalidConfig {
                    layer: name,
                    reason: "not a variable: build the network from a VarMap to train it".into(),
                });
            }
            let is_noise = name.ends_with(".mu") || name.ends_with(".log_sigma");
            slots.push(Slot {
                moments: Moments::for_param(&t)?,
                var: Var::from_tensor(&t)?,
                group: usize::from(is_noise),
                name,
            });
        }
        Ok(Self {
            slots,
            groups: vec![weights, noise],
            step: 0,
        })
    }

    /// Steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Sets the learning rate of the weights (group 0) and of the noise (group 1).
    pub fn set_learning_rates(&mut self, weights: f64, noise: f64) {
        self.groups[0].lr = weights;
        self.groups[1].lr = noise;
    }

    /// The current learning rates (weights, noise).
    pub fn learning_rates(&self) -> (f64, f64) {
        (self.groups[0].lr, self.groups[1].lr)
    }

    /// Backpropagates `loss` and updates every parameter.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step += 1;
        let t = self.step as f64;
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let c = self.groups[slot.group];
            let theta = slot.var.as_tensor();
            let fused = crate::ops::AdamStep {
                beta1: c.beta1,
                beta2: c.beta2,
                step_size: c.lr / (1.0 - c.beta1.powf(t)),
                v_scale: 1.0 / (1.0 - c.beta2.powf(t)).sqrt(),
                eps: c.eps,
                decay: 1.0 - c.lr * c.weight_decay,
            };
            let (m_old, v_old) = match &mut slot.moments {
                Moments::Host(host) => {
                    crate::ops::adam_host(theta, g, host, fused)?;
                    continue;
                }
                Moments::Tensors { m, v } => (m, v),
            };
            let m = ((&*m_old * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&*v_old * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&m / (1.0 - c.beta1.powf(t)))?;
            let v_hat = (&v / (1.0 - c.beta2.powf(t)))?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let decayed = if c.weight_decay != 0.0 {
                (theta * (1.0 - c.lr * c.weight_decay))?
            } else {
                theta.clone()
            };
            slot.var.set(&(decayed - (update * c.lr)?)?)?;
            // The moments must never carry autograd history, or each step would keep the
            // previous steps' graphs alive.
            *m_old = m.detach();
            *v_old = v.detach();
        }
        Ok(())
    }

    /// The optimiser's state as named tensors (`name.adam_m`, `name.adam_v`) and its step.
    pub fn state(&self) -> Result<(Vec<(String, Tensor)>, u64)> {
        let mut out = Vec::with_capacity(2 * self.slots.len());
        for s in &self.slots {
            let (m, v) = s.moments.tensors(s.var.as_tensor())?;
            out.push((format!("{}.adam_m", s.name), m));
            out.push((format!("{}.adam_v", s.name), v));
        }
        Ok((out, self.step))
    }

    /// Restores a state from [`Adam::state`]; every moment must be present with the right
    /// shape.
    pub fn restore(&mut self, tensors: &BTreeMap<String, Tensor>, step: u64) -> Result<()> {
        for s in &mut self.slots {
            let param = s.var.as_tensor();
            let mut loaded = Vec::with_capacity(2);
            for suffix in ["adam_m", "adam_v"] {
                let key = format!("{}.{suffix}", s.name);
                let t = tensors.get(&key).ok_or_else(|| Error::InvalidConfig {
                    layer: s.name.clone(),
                    reason: format!("the optimiser state lacks {key}"),
                })?;
                if t.dims() != param.dims() {
                    return Err(Error::InvalidConfig {
                        layer: s.name.clone(),
                        reason: format!(
                            "{key} has shape {:?}, expected {:?}",
                            t.dims(),
                            param.dims()
                        ),
                    });
                }
                // A copy of its own: the moments are updated in place.
                loaded.push(
                    t.to_dtype(param.dtype())?
                        .to_device(param.device())?
                        .copy()?,
                );
            }
            let (m, v) = (&loaded[0], &loaded[1]);
            match &mut s.moments {
                Moments::Host(host) => host.set(m, v)?,
                Moments::Tensors { m: tm, v: tv } => (*tm, *tv) = (m.clone(), v.clone()),
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The paper's learning-rate schedule: constant for `constant_epochs`, then linear decay to
/// zero at `total_epochs`. Returns the factor for `epoch` (0-based).
pub fn linear_decay_factor(epoch: usize, constant_epochs: usize, total_epochs: usize) -> f64 {
    if epoch < constant_epochs || total_epochs <= constant_epochs {
        1.0
    } else {
        let span = (total_epochs - constant_epochs) as f64;
        (1.0 - (epoch - constant_epochs) as f64 / span).max(0.0)
    }
}

/// The KL warm-up: the factor on the KL term at `step` (0-based) of `steps` in `epoch`
/// (0-based), rising linearly from 0 at the first step to 1 after `warmup_epochs` epochs
/// (1 throughout when `warmup_epochs` is 0). Without it a heavily weighted KL term removes
/// most units in the first epoch, before the cross-entropy has said which ones matter.
pub fn kl_warmup_factor(epoch: usize, step: usize, steps: usize, warmup_epochs: usize) -> f64 {
    if warmup_epochs == 0 || steps == 0 {
        return 1.0;
    }
    let done = epoch as f64 + step as f64 / steps as f64;
    (done / warmup_epochs as f64).min(1.0)
}

/// Fails with [`Error::InvalidConfig`] if `weights` names a layer that is not one of
/// `net`'s noise layers (a typo would otherwise silently weight nothing).
pub fn check_kl_weights(net: &Net, weights: &BTreeMap<String, f64>) -> Result<()> {
    let names: Vec<&str> = net.noise_layers().iter().map(|(_, l)| l.name()).collect();
    match weights.keys().find(|k| !names.contains(&k.as_str())) {
        Some(unknown) => Err(Error::InvalidConfig {
            layer: unknown.clone(),
            reason: format!("a KL weight for no noise layer (the noise layers: {names:?})"),
        }),
        None => Ok(()),
    }
}

/// Checks every parameter for NaN or infinity; the error names the parameter and index.
pub fn check_finite(net: &Net) -> Result<()> {
    for (name, t) in net.named_params() {
        let values = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            let (layer, param) = name.rsplit_once('.').unwrap_or((name.as_str(), ""));
            return Err(Error::NonFinite {
                layer: layer.into(),
                name: param.into(),
                index,
                value,
            });
        }
    }
    Ok(())
}

/// What [`fit`] does after an epoch's callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on training.
    Continue,
    /// Stop here (early stopping); the epoch's checkpoint is already written.
    Stop,
}

/// Options of [`fit`].
#[derive(Debug, Clone)]
pub struct FitConfig {
    /// Epochs in all (a resumed run counts the finished ones).
    pub epochs: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// Adam for the weights.
    pub weights: AdamConfig,
    /// Adam for the noise parameters.
    pub noise: AdamConfig,
    /// The learning rates stay constant for these epochs, then decay linearly to 0 at
    /// `epochs` (the paper's schedule; `epochs` keeps them constant).
    pub constant_epochs: usize,
    /// Multiplies the KL term (0 trains the dense network without it).
    pub kl_scale: f64,
    /// Per noise layer KL weights (1 where absent).
    pub kl_weights: BTreeMap<String, f64>,
    /// The KL term grows linearly from 0 to its full weight over these first epochs, step
    /// by step (0: full weight from the first step; see [`kl_warmup_factor`]).
    pub kl_warmup_epochs: usize,
    /// Seeds the shuffling and the noise, epoch by epoch.
    pub seed: u64,
    /// A directory for checkpoints: written atomically after every epoch, and read back
    /// to resume an interrupted run.
    pub checkpoint: Option<PathBuf>,
    /// Show a progress bar.
    pub progress: bool,
}

impl Default for FitConfig {
    fn default() -> Self {
        Self {
            epochs: 10,
            batch_size: 100,
            weights: AdamConfig::default(),
            noise: AdamConfig::default(),
            constant_epochs: 10,
            kl_scale: 1.0,
            kl_weights: BTreeMap::new(),
            kl_warmup_epochs: 0,
            seed: 0,
            checkpoint: None,
            progress: true,
        }
    }
}

/// What one epoch did.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochStats {
    /// The epoch (0-based).
    pub epoch: usize,
    /// Mean loss over the epoch's steps.
    pub loss: f64,
    /// Mean cross-entropy.
    pub cross_entropy: f64,
    /// Mean scaled KL term.
    pub kl: f64,
    /// Training error of the noisy network over the epoch.
    pub train_error: f64,
    /// Units each noise layer keeps at the end of the epoch, in node order.
    pub units_kept: Vec<usize>,
    /// Wall-clock seconds of the epoch.
    pub seconds: f64,
}

const MANIFEST: &str = "checkpoint.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct Manifest {
    epochs_done: usize,
    step: u64,
    net: String,
    optimizer: String,
    history: Vec<EpochStats>,
}

/// Trains `net` on `data` with the SBP objective (see [`FitConfig`]), calling `on_epoch`
/// after each epoch with the network (a gradual pruning schedule sets its masks there). With a checkpoint directory, every epoch ends with an atomic
/// checkpoint, and a run that finds one resumes after its last finished epoch with the
/// same weights, optimiser state and history. A non-finite loss stops the run with
/// [`Error::Diverged`] naming the step and the first parameter that is not finite.
pub fn fit(
    net: &mut Net,
    data: &ImageSet,
    config: &FitConfig,
    mut on_epoch: impl FnMut(&mut Net, &EpochStats) -> Result<Flow>,
) -> Result<Vec<EpochStats>> {
    if config.batch_size == 0 || data.is_empty() {
        return Err(Error::InvalidValue {
            name: "batch_size".into(),
            value: config.batch_size as f64,
            reason: format!(
                "needs a positive batch size and data ({} examples)",
                data.len()
            ),
        });
    }
    check_kl_weights(net, &config.kl_weights)?;
    let mut opt = Adam::new(net, config.weights, config.noise)?;
    let mut history = Vec::new();
    if let Some(dir) = &config.checkpoint {
        if let Some(m) = read_manifest(dir)? {
            net.restore(dir.join(&m.net))?;
            let state = candle::safetensors::load(dir.join(&m.optimizer), net.device())?;
            opt.restore(&state.into_iter().collect(), m.step)?;
            history = m.history;
        }
    }
    let device = net.device().clone();
    let n = data.len();
    let steps = n.div_ceil(config.batch_size);
    for epoch in history.len()..config.epochs {
        let start = std::time::Instant::now();
        let factor = linear_decay_factor(epoch, config.constant_epochs, config.epochs);
        opt.set_learning_rates(config.weights.lr * factor, config.noise.lr * factor);
        net.reseed(config.seed.wrapping_add(epoch as u64));
        let order = shuffled(n, config.seed, epoch);
        let bar = progress_bar(config.progress, steps as u64, epoch, config.epochs);
        let (mut loss_sum, mut ce_sum, mut kl_sum, mut wrong) = (0.0, 0.0, 0.0, 0usize);
        for (k, chunk) in order.chunks(config.batch_size).enumerate() {
            let (xs, ys) = data.batch(chunk, &device)?;
            let logits = net.forward_t(&xs, true)?;
            let kl_scale =
                config.kl_scale * kl_warmup_factor(epoch, k, steps, config.kl_warmup_epochs);
            let terms = elbo(net, &logits, &ys, n, kl_scale, &config.kl_weights)?;
            // The loss tensor is their sum; reading it again would cost another sync.
            let loss = terms.cross_entropy + terms.kl;
            if !loss.is_finite() {
                let step = opt.step_count() + 1;
                let cause = match check_finite(net) {
                    Err(e) => e.to_string(),
                    Ok(()) => "every parameter is finite: the loss itself overflowed".into(),
                };
                return Err(Error::Diverged {
                    epoch,
                    step,
                    reason: format!("loss = {loss}; {cause}"),
                });
            }
            opt.backward_step(&terms.loss)?;
            let predicted = logits.argmax(1)?;
            let hits = predicted
                .eq(&ys)?
                .to_dtype(DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?;
            wrong += chunk.len() - hits as usize;
            loss_sum += loss;
            ce_sum += terms.cross_entropy;
            kl_sum += terms.kl;
            if let Some(bar) = &bar {
                bar.set_position(k as u64 + 1);
                bar.set_message(format!(
                    "loss {:.4} err {:.2}%",
                    loss_sum / (k + 1) as f64,
                    100.0 * wrong as f64 / ((k * config.batch_size) + chunk.len()) as f64
                ));
            }
        }
        let units_kept = net
            .noise_layers()
            .iter()
            .map(|(_, l)| l.num_kept())
            .collect::<Result<Vec<_>>>()?;
        let stats = EpochStats {
            epoch,
            loss: loss_sum / steps as f64,
            cross_entropy: ce_sum / steps as f64,
            kl: kl_sum / steps as f64,
            train_error: wrong as f64 / n as f64,
            units_kept,
            seconds: start.elapsed().as_secs_f64(),
        };
        if let Some(bar) = bar {
            bar.finish_with_message(format!(
                "loss {:.4} err {:.2}% kept {:?}",
                stats.loss,
                100.0 * stats.train_error,
                stats.units_kept
            ));
        }
        history.push(stats.clone());
        if let Some(dir) = &config.checkpoint {
            write_checkpoint(dir, net, &opt, &history)?;
        }
        if on_epoch(net, &stats)? == Flow::Stop {
            break;
        }
    }
    Ok(history)
}

fn shuffled(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(crate::layer::stream_seed(
        seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        "shuffle",
    ));
    order.shuffle(&mut rng);
    order
}

fn progress_bar(
    show: bool,
    steps: u64,
    epoch: usize,
    epochs: usize,
) -> Option<indicatif::ProgressBar> {
    if !show {
        return None;
    }
    let bar = indicatif::ProgressBar::new(steps);
    let style = indicatif::ProgressStyle::with_template(
        "{prefix} [{bar:30}] {pos}/{len} {elapsed_precise}<{eta_precise} {msg}",
    )
    .expect("a valid template")
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(format!("epoch {}/{epochs}", epoch + 1));
    Some(bar)
}

fn read_manifest(dir: &Path) -> Result<Option<Manifest>> {
    let path = dir.join(MANIFEST);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Format {
            path,
            reason: format!("not a checkpoint manifest: {e}"),
        })
}

/// Writes the epoch's files, then the manifest that names them (atomically), then removes
/// the previous epoch's files: a crash at any moment leaves a consistent checkpoint.
fn write_checkpoint(dir: &Path, net: &Net, opt: &Adam, history: &[EpochStats]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let previous = read_manifest(dir)?;
    let epochs_done = history.len();
    let net_file = format!("net-epoch{epochs_done}.safetensors");
    let opt_file = format!("optimizer-epoch{epochs_done}.safetensors");
    net.save(dir.join(&net_file))?;
    let (state, step) = opt.state()?;
    let bytes =
        safetensors::serialize(state.iter().map(|(n, t)| (n.as_str(), t)), None).map_err(|e| {
            Error::Format {
                path: dir.join(&opt_file),
                reason: format!("cannot encode: {e}"),
            }
        })?;
    write_atomic(&dir.join(&opt_file), &bytes)?;
    let manifest = Manifest {
        epochs_done,
        step,
        net: net_file.clone(),
        optimizer: opt_file.clone(),
        history: history.to_vec(),
    };
    let json = serde_json::to_string_pretty(&manifest).expect("a manifest serialises");
    write_atomic(&dir.join(MANIFEST), json.as_bytes())?;
    if let Some(old) = previous {
        for f in [old.net, old.optimizer] {
            if f != net_file && f != opt_file {
                let _ = std::fs::remove_file(dir.join(f));
            }
        }
    }
    Ok(())
}
