//! [`LogNormalDropout`]: the multiplicative log-normal noise layer of Structured Bayesian
//! Pruning, with its closed-form KL term.
//!
//! The layer multiplies its input by `θ`, one noise variable per unit along an axis (a conv
//! channel of an NCHW tensor or a feature of an `(N, F)` tensor), with
//! `log θ ~ N(μ, σ²)` truncated to `[a, b]`. In training, `θ` is sampled with a
//! reparameterised gradient to `μ` and `log σ`; in evaluation, a unit is multiplied by
//! `E[θ]` if its signal-to-noise ratio exceeds the threshold and by 0 otherwise.
//!
//! # How the exact f64 maths meets candle's autograd
//!
//! The sample `log θ` and the KL are computed in f64 by [`crate::truncnorm`], together with
//! their derivatives with respect to `μ` and `log σ`. They enter the graph as the exact
//! first-order expansion `value + g_μ·(μ − detach(μ)) + g_σ·(log σ − detach(log σ))`: the
//! bracket is exactly zero, so the forward value is bit-exact, and backpropagation yields
//! exactly `g_μ` and `g_σ`. This needs only standard tensor ops, so it runs on every device
//! candle supports.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use crate::error::{Error, Result};
use crate::truncnorm::{
    TruncatedLogNormal, DEFAULT_A, DEFAULT_B, LOG_SIGMA_RANGE, MAX_ABS_LOCATION,
};

/// How many noise draws a training step takes per unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoiseMode {
    /// One `θ` per unit per step, shared by the whole batch (the paper's code).
    #[default]
    SharedPerBatch,
    /// One `θ` per unit per example: lower-variance gradients, more draws.
    PerExample,
}

/// Configuration of a [`LogNormalDropout`] layer. The defaults are the paper's.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LogNormalDropoutConfig {
    /// The axis that indexes units (1: channels of NCHW, features of `(N, F)`). Axis 0 is
    /// the batch and cannot carry units.
    pub axis: usize,
    /// Lower bound of `log θ` (default -20).
    pub a: f64,
    /// Upper bound of `log θ` (default 0).
    pub b: f64,
    /// Initial `μ` (default 0).
    pub mu_init: f64,
    /// Initial `log σ` (default -5).
    pub log_sigma_init: f64,
    /// `μ` is clamped to this range before use; outside it its gradient is zero
    /// (default `(-20, 5)`).
    pub mu_clamp: (f64, f64),
    /// `log σ` is clamped to this range before use (default `(-20, 5)`).
    pub log_sigma_clamp: (f64, f64),
    /// Units with SNR at most this are removed at evaluation (default 1).
    pub snr_threshold: f64,
    /// How noise is drawn in training.
    pub noise: NoiseMode,
    /// Seed of the noise stream; each layer mixes it with its own name, so layers built
    /// from one config draw independent streams.
    pub seed: u64,
}

impl Default for LogNormalDropoutConfig {
    fn default() -> Self {
        Self {
            axis: 1,
            a: DEFAULT_A,
            b: DEFAULT_B,
            mu_init: 0.0,
            log_sigma_init: -5.0,
            mu_clamp: (-20.0, 5.0),
            log_sigma_clamp: (-20.0, 5.0),
            snr_threshold: 1.0,
            noise: NoiseMode::SharedPerBatch,
            seed: 0,
        }
    }
}

impl LogNormalDropoutConfig {
    /// Checks that the configuration can work; `layer` names the layer in the error.
    pub fn validate(&self, layer: &str) -> Result<()> {
        let fail = |reason: String| {
            Err(Error::InvalidConfig {
                layer: layer.to_string(),
                reason,
            })
        };
        let finite = [
            ("a", self.a),
            ("b", self.b),
            ("mu_init", self.mu_init),
            ("log_sigma_init", self.log_sigma_init),
            ("mu_clamp.0", self.mu_clamp.0),
            ("mu_clamp.1", self.mu_clamp.1),
            ("log_sigma_clamp.0", self.log_sigma_clamp.0),
            ("log_sigma_clamp.1", self.log_sigma_clamp.1),
            ("snr_threshold", self.snr_threshold),
        ];
        for (name, value) in finite {
            if !value.is_finite() {
                return fail(format!("{name} = {value} is not finite"));
            }
        }
        if self.a >= self.b {
            return fail(format!(
                "the bounds need a < b, got a = {}, b = {}",
                self.a, self.b
            ));
        }
        for (name, (lo, hi), limit) in [
            (
                "mu_clamp",
                self.mu_clamp,
                (-MAX_ABS_LOCATION, MAX_ABS_LOCATION),
            ),
            ("log_sigma_clamp", self.log_sigma_clamp, LOG_SIGMA_RANGE),
        ] {
            if lo >= hi || lo < limit.0 || hi > limit.1 {
                return fail(format!(
                    "{name} = ({lo}, {hi}) must be an increasing range within [{}, {}]",
                    limit.0, limit.1
                ));
            }
        }
        if self.a.abs() > MAX_ABS_LOCATION || self.b.abs() > MAX_ABS_LOCATION {
            return fail(format!("the bounds must lie within ±{MAX_ABS_LOCATION}"));
        }
        if self.snr_threshold < 0.0 {
            return fail(format!(
                "snr_threshold = {} must not be negative",
                self.snr_threshold
            ));
        }
        if self.axis == 0 {
            return fail("axis 0 is the batch axis; units live on axis >= 1".into());
        }
        Ok(())
    }
}

/// Log-normal multiplicative noise on the units of a layer (Structured Bayesian Pruning).
///
/// Build it with [`log_normal_dropout`] so that `μ` and `log σ` live in your `VarMap`.
/// Clones share the parameters and the noise stream.
///
/// [`LogNormalDropout::forward_t`] returns this crate's typed [`Error`]; the
/// [`candle::ModuleT`] implementation returns the same errors as candle errors.
#[derive(Debug, Clone)]
pub struct LogNormalDropout {
    mu: Tensor,
    log_sigma: Tensor,
    config: LogNormalDropoutConfig,
    name: String,
    rng: Arc<Mutex<StdRng>>,
    /// The KL terms computed alongside the last shared draw, for the parameters they were
    /// computed at: the loss of the same step then reuses them.
    kl_cache: Arc<Mutex<Option<KlCache>>>,
    /// Whether [`kl`](Self::kl) ran since the last draw: only then does the next draw
    /// compute the KL too (dense pretraining, with no KL term, never pays for it).
    kl_in_use: Arc<AtomicBool>,
    /// A draw shared by the batch, made ahead ([`PreparedDraws`]) together with the other
    /// noise layers of a network, for the forward pass under way.
    prepared: Arc<Mutex<Option<HostDraw>>>,
}

/// Per unit, derivatives with respect to `μ` and `log σ` (clamp-gated).
#[derive(Debug, Default)]
struct UnitGrads {
    mu: Vec<f64>,
    log_sigma: Vec<f64>,
}

impl UnitGrads {
    fn with_capacity(n: usize) -> Self {
        UnitGrads {
            mu: Vec::with_capacity(n),
            log_sigma: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, (d_mu, d_log_sigma): (f64, f64)) {
        self.mu.push(d_mu);
        self.log_sigma.push(d_log_sigma);
    }

    fn append(&mut self, other: UnitGrads) {
        self.mu.extend_from_slice(&other.mu);
        self.log_sigma.extend_from_slice(&other.log_sigma);
    }
}

/// Per unit: the KL and its gradients.
#[derive(Debug, Default)]
struct KlTerms {
    kl: Vec<f64>,
    grad: UnitGrads,
}

impl KlTerms {
    fn with_capacity(n: usize) -> Self {
        KlTerms {
            kl: Vec::with_capacity(n),
            grad: UnitGrads::with_capacity(n),
        }
    }

    fn push(&mut self, kl: f64, grad: (f64, f64)) {
        self.kl.push(kl);
        self.grad.push(grad);
    }

    fn append(&mut self, other: KlTerms) {
        self.kl.extend_from_slice(&other.kl);
        self.grad.append(other.grad);
    }
}

impl FromIterator<(f64, (f64, f64))> for KlTerms {
    fn from_iter<I: IntoIterator<Item = (f64, (f64, f64))>>(iter: I) -> Self {
        let mut t = KlTerms::default();
        for (kl, g) in iter {
            t.push(kl, g);
        }
        t
    }
}

/// [`KlTerms`] at the parameters `mu`, `log_sigma` (host copies).
#[derive(Debug)]
struct KlCache {
    mu: Vec<f64>,
    log_sigma: Vec<f64>,
    terms: KlTerms,
}

/// Creates a [`LogNormalDropout`] over `units` units with its parameters `mu` and
/// `log_sigma` taken from (or created in) `vb`.
///
/// ```
/// use candle::{DType, Device, ModuleT, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use candle_sbp::layer::{log_normal_dropout, LogNormalDropoutConfig};
///
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let sbp = log_normal_dropout(16, LogNormalDropoutConfig::default(), vb.pp("sbp1"))?;
/// let x = Tensor::ones((4, 16, 8, 8), DType::F32, &Device::Cpu)?;
/// let noisy = sbp.forward_t(&x, true)?; // training: sampled θ
/// let clean = sbp.forward_t(&x, false)?; // evaluation: E[θ] on kept units
/// assert_eq!(noisy.dims(), clean.dims());
/// assert_eq!(sbp.num_kept()?, 16); // a fresh layer keeps everything
/// # Ok::<(), candle_sbp::Error>(())
/// ```
pub fn log_normal_dropout(
    units: usize,
    config: LogNormalDropoutConfig,
    vb: VarBuilder,
) -> Result<LogNormalDropout> {
    let name = vb.prefix();
    config.validate(&name)?;
    if units == 0 {
        return Err(Error::InvalidConfig {
            layer: name,
            reason: "a noise layer needs at least one unit".into(),
        });
    }
    let mu = vb.get_with_hints(units, "mu", Init::Const(config.mu_init))?;
    let log_sigma = vb.get_with_hints(units, "log_sigma", Init::Const(config.log_sigma_init))?;
    LogNormalDropout::new(mu, log_sigma, config, name)
}

impl LogNormalDropout {
    /// A layer over existing parameter tensors (1-D, equal length).
    pub fn new(
        mu: Tensor,
        log_sigma: Tensor,
        config: LogNormalDropoutConfig,
        name: impl Into<String>,
    ) -> Result<Self> {
        let name = name.into();
        config.validate(&name)?;
        if mu.rank() != 1 || mu.dims() != log_sigma.dims() || mu.dim(0)? == 0 {
            return Err(Error::InvalidConfig {
                layer: name,
                reason: format!(
                    "mu and log_sigma must be non-empty 1-D tensors of equal length, got {:?} and {:?}",
                    mu.dims(),
                    log_sigma.dims()
                ),
            });
        }
        let rng = Arc::new(Mutex::new(StdRng::seed_from_u64(stream_seed(
            config.seed,
            &name,
        ))));
        Ok(Self {
            mu,
            log_sigma,
            config,
            name,
            rng,
            kl_cache: Arc::default(),
            kl_in_use: Arc::default(),
            prepared: Arc::default(),
        })
    }

    /// The `μ` parameter (unclamped), shape `(units,)`.
    pub fn mu(&self) -> &Tensor {
        &self.mu
    }
    /// The `log σ` parameter (unclamped), shape `(units,)`.
    pub fn log_sigma(&self) -> &Tensor {
        &self.log_sigma
    }
    /// The configuration.
    pub fn config(&self) -> &LogNormalDropoutConfig {
        &self.config
    }
    /// The layer's name (its VarBuilder path), used in errors.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Number of units (noise variables).
    pub fn num_units(&self) -> usize {
        self.mu.dims()[0]
    }

    /// Restarts the noise stream from `seed` (mixed with the layer's name).
    pub fn reseed(&self, seed: u64) {
        *self.lock_rng() = StdRng::seed_from_u64(stream_seed(seed, &self.name));
        // A draw made ahead came from the old stream.
        self.lock_prepared().take();
    }

    /// The per-unit noise distributions, with `μ` and `log σ` clamped as in the forward
    /// pass. Fails if a parameter is NaN or infinite.
    pub fn distributions(&self) -> Result<Vec<TruncatedLogNormal>> {
        Ok(self.clamped_params()?.into_iter().map(|p| p.dist).collect())
    }

    /// Per-unit signal-to-noise ratio `E[θ]/sqrt(Var[θ])`.
    pub fn snr(&self) -> Result<Vec<f64>> {
        let d = self.distributions()?;
        Ok(crate::par::map_ranges(d.len(), PAR_UNITS, |r| {
            d[r].iter().map(|d| d.snr()).collect()
        }))
    }

    /// Per-unit `E[θ]`.
    pub fn mean(&self) -> Result<Vec<f64>> {
        Ok(self.distributions()?.iter().map(|d| d.mean()).collect())
    }

    /// Per-unit KL divergence from the prior (f64, no graph).
    pub fn kl_per_unit(&self) -> Result<Vec<f64>> {
        Ok(self.distributions()?.iter().map(|d| d.kl()).collect())
    }

    /// `true` for units whose SNR exceeds the threshold.
    pub fn keep_mask(&self) -> Result<Vec<bool>> {
        Ok(self
            .distributions()?
            .iter()
            .map(|d| self.keeps(d))
            .collect())
    }

    /// How many units the keep mask keeps.
    pub fn num_kept(&self) -> Result<usize> {
        Ok(self.keep_mask()?.into_iter().filter(|&k| k).count())
    }

    /// The layer's KL summed over units: a scalar tensor differentiable in `μ` and `log σ`.
    /// The training objective is `cross-entropy + Σ_layers kl() / N_train`.
    pub fn kl(&self) -> Result<Tensor> {
        self.kl_in_use.store(true, Ordering::Relaxed);
        let (mu, log_sigma) = self.host_params()?;
        let cached = self
            .kl_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .filter(|c| c.mu == mu && c.log_sigma == log_sigma);
        let terms = match cached {
            Some(c) => c.terms,
            None => {
                let params = self.clamp(&mu, &log_sigma)?;
                crate::par::map_ranges(params.len(), PAR_UNITS, |r| {
                    params[r]
                        .iter()
                        .map(|p| {
                            let g = p.dist.kl_grad();
                            (p.dist.kl(), p.gate(g.d_mu, g.d_log_sigma))
                        })
                        .collect()
                })
                .into_iter()
                .collect()
            }
        };
        // Summed in unit order, so the total does not depend on the thread count.
        let total: f64 = terms.kl.iter().sum();
        // On the CPU, one op; elsewhere, a candle expression with the same value and gradient.
        if crate::ops::surrogate_applies(&self.mu, &self.log_sigma) {
            let params = (&self.mu, &self.log_sigma);
            return Ok(crate::ops::surrogate_scalar(
                params,
                total,
                terms.grad.mu,
                terms.grad.log_sigma,
            )?);
        }
        let lin = self.linearised(1, &terms.grad)?.sum_all()?;
        let value = Tensor::new(total, self.mu.device())?.to_dtype(self.mu.dtype())?;
        Ok(lin.add(&value)?)
    }

    /// Applies the layer. `train = true` samples `θ`; `train = false` multiplies kept units
    /// by `E[θ]` and removed ones by 0.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_impl(xs, train, false)
    }

    /// `relu(layer(xs))`, which equals `layer(relu(xs))` as `θ > 0`: in training on the
    /// CPU one fused op, saving the ReLU's own pass and gradient buffers.
    pub(crate) fn forward_relu(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_impl(xs, train, true)
    }

    fn forward_impl(&self, xs: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        self.check_input(xs)?;
        let theta = if train {
            let draw = self.draw(xs)?;
            if self.config.axis == 1 && crate::ops::noise_applies(xs, &self.mu, &self.log_sigma) {
                let (mu, log_sigma) = (&self.mu, &self.log_sigma);
                let fused = crate::ops::noise_multiply(xs, mu, log_sigma, draw.noise(), relu)?;
                if let Some(y) = fused {
                    return Ok(y);
                }
            }
            self.theta_tensor(&draw)?
        } else {
            self.eval_multiplier()?
        };
        let theta = theta.to_dtype(xs.dtype())?;
        let y = if self.config.axis == 1 {
            crate::ops::scale_units(xs, &theta)?
        } else {
            xs.broadcast_mul(&self.broadcastable(&theta, xs)?)?
        };
        Ok(if relu { y.relu()? } else { y })
    }

    /// In training, `linear(x ⊙ θ)` (with a ReLU after it where `relu`, and the noise
    /// layer `out` on its outputs where given) in one fused op, where `x` needs no
    /// gradient (the network's input), the draw is shared by the batch and the kernel
    /// applies; `None` otherwise (nothing drawn then), and the caller applies the layers
    /// one by one. `out` must be [`foldable`](Self::foldable) in training and
    /// [`divides_back`](Self::divides_back).
    pub(crate) fn forward_into_linear(
        &self,
        xs: &Tensor,
        train: bool,
        (w, b): (&Tensor, Option<&Tensor>),
        relu: bool,
        out: Option<&LogNormalDropout>,
    ) -> Result<Option<Tensor>> {
        let fusable = train
            && self.config.axis == 1
            && self.config.noise == NoiseMode::SharedPerBatch
            && crate::ops::noise_linear_applies(xs, &self.mu, &self.log_sigma, w);
        if !fusable {
            return Ok(None);
        }
        self.check_input(xs)?;
        let draw = self.draw(xs)?.noise();
        let theta_out = out.map(|l| l.shared_theta()).transpose()?;
        let params = (&self.mu, &self.log_sigma);
        let y = crate::ops::noise_linear(xs, params, draw, (w, b), relu, theta_out.as_ref())?;
        Ok(Some(y))
    }

    /// The evaluation-time multiplier per unit: `E[θ]` where kept, 0 where removed.
    pub fn eval_multiplier_values(&self) -> Result<Vec<f64>> {
        let d = self.distributions()?;
        let value = |d: &TruncatedLogNormal| if self.keeps(d) { d.mean() } else { 0.0 };
        Ok(crate::par::map_ranges(d.len(), PAR_UNITS, |r| {
            d[r].iter().map(value).collect()
        }))
    }

    fn eval_multiplier(&self) -> Result<Tensor> {
        let values = self.eval_multiplier_values()?;
        let n = values.len();
        Ok(Tensor::from_vec(values, n, self.mu.device())?)
    }

    /// Whether the layer's multiplier can be multiplied into the weights of the layer
    /// before it ([`fold_multiplier`](Self::fold_multiplier)): on the channel axis 1, in
    /// evaluation or for a draw shared by the batch.
    pub(crate) fn foldable(&self, train: bool) -> bool {
        self.config.axis == 1 && (!train || self.config.noise == NoiseMode::SharedPerBatch)
    }

    /// Whether an op that multiplies its outputs by this layer's draw may divide the
    /// products by `θ` again in its backward pass: `θ >= e^a` stays far above the
    /// smallest normal number in f32 (with the paper's `a = -20`, `θ >= 2e-9`).
    pub(crate) fn divides_back(&self) -> bool {
        self.config.a >= DIVIDES_BACK_MIN_A
    }

    /// The per-unit multiplier `(units,)` that a [`foldable`](Self::foldable) layer applies:
    /// in training the step's draw of `θ` ([`shared_theta`](Self::shared_theta)), in
    /// evaluation `E[θ]` for kept units and 0 for removed ones.
    pub(crate) fn fold_multiplier(&self, train: bool) -> Result<Tensor> {
        if train {
            self.shared_theta()
        } else {
            Ok(self.eval_multiplier()?.to_dtype(self.mu.dtype())?)
        }
    }

    /// In training, for a [`foldable`](Self::foldable) layer: the step's draw of `θ`
    /// `(units,)`, differentiable in `μ` and `log σ`. A convolution or linear layer whose
    /// weights and bias are multiplied by it per output unit gives this layer's output
    /// on its own output, in one op and with no pass over the activations.
    pub(crate) fn shared_theta(&self) -> Result<Tensor> {
        if !self.foldable(true) {
            return Err(Error::InvalidConfig {
                layer: self.name.clone(),
                reason: "only a draw shared by the batch on axis 1 folds into weights".into(),
            });
        }
        let draw = self.draw_rows(1)?;
        if crate::ops::surrogate_applies(&self.mu, &self.log_sigma) {
            return Ok(crate::ops::noise_theta(
                &self.mu,
                &self.log_sigma,
                draw.noise(),
            )?);
        }
        self.theta_tensor(&draw)
    }

    /// One step's draw on the host, one row per example or one for the batch.
    fn draw(&self, xs: &Tensor) -> Result<HostDraw> {
        let rows = match self.config.noise {
            NoiseMode::SharedPerBatch => 1,
            NoiseMode::PerExample => xs.dim(0)?,
        };
        self.draw_rows(rows)
    }

    /// [`draw`](Self::draw) for `rows` rows of units: the one made ahead for this forward
    /// pass if there is one, else a fresh one.
    fn draw_rows(&self, rows: usize) -> Result<HostDraw> {
        if rows == 1 {
            if let Some(draw) = self.lock_prepared().take() {
                return Ok(draw);
            }
        }
        let job = self.draw_job(rows)?;
        let chunks =
            crate::par::map_range_chunks(job.len(), PAR_UNITS, |r| self.draw_chunk(&job, r));
        self.finish_draw(job, chunks)
    }

    /// The sequential part of a draw: the parameters on the host, and the uniforms in
    /// stream order (the costlier transforms then run in parallel: the same values on any
    /// number of threads).
    fn draw_job(&self, rows: usize) -> Result<DrawJob> {
        let (mu, log_sigma) = self.host_params()?;
        let n = rows * mu.len();
        if !mu.iter().chain(&log_sigma).all(|v| v.is_finite()) {
            // The error names the first bad parameter, before the stream moves on.
            self.clamp(&mu, &log_sigma)?;
        }
        let uniforms: Vec<f64> = {
            let mut rng = self.lock_rng();
            (0..n).map(|_| open_unit(&mut rng)).collect()
        };
        // With one draw per unit, the KL of the step's loss comes from the same windows
        // (when the previous step had a KL term).
        let with_kl = rows == 1 && self.kl_in_use.swap(false, Ordering::Relaxed);
        // One row clamps each unit inside the parallel pass; several rows clamp once.
        let clamped = if rows > 1 {
            Some(self.clamp(&mu, &log_sigma)?)
        } else {
            None
        };
        Ok(DrawJob {
            mu,
            log_sigma,
            uniforms,
            with_kl,
            clamped,
            rows,
        })
    }

    /// The draws (and KL terms) of the job's positions `r`.
    fn draw_chunk(&self, job: &DrawJob, r: std::ops::Range<usize>) -> Result<HostDraw> {
        let units = job.mu.len();
        let mut d = HostDraw::with_capacity(r.len(), job.with_kl);
        for k in r {
            let i = k % units;
            let p = match &job.clamped {
                Some(params) => params[i],
                None => self.unit_params(i, job.mu[i], job.log_sigma[i])?,
            };
            let s = if job.with_kl {
                let (s, kl, g) = p.dist.sample_and_kl_unchecked(job.uniforms[k]);
                d.kl.push(kl, p.gate(g.d_mu, g.d_log_sigma));
                s
            } else {
                p.dist.sample_unchecked(job.uniforms[k])
            };
            d.push(s.log_theta, p.gate(s.d_mu, s.d_log_sigma));
        }
        Ok(d)
    }

    /// The job's chunks in order as one draw; its KL terms are kept for the step's loss.
    fn finish_draw(&self, job: DrawJob, chunks: Vec<Result<HostDraw>>) -> Result<HostDraw> {
        let mut draw = HostDraw::with_capacity(job.len(), job.with_kl);
        for chunk in chunks {
            draw.append(chunk?);
        }
        draw.rows = job.rows;
        if job.with_kl {
            let terms = std::mem::take(&mut draw.kl);
            *self.kl_cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(KlCache {
                mu: job.mu,
                log_sigma: job.log_sigma,
                terms,
            });
        }
        Ok(draw)
    }

    /// The slot of a draw made ahead (a poisoned lock still holds a whole draw or none).
    fn lock_prepared(&self) -> std::sync::MutexGuard<'_, Option<HostDraw>> {
        self.prepared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `θ` as a candle expression of `μ` and `log σ` (the path for other devices): shape
    /// `(units,)` or `(rows, units)`.
    fn theta_tensor(&self, draw: &HostDraw) -> Result<Tensor> {
        let rows = draw.rows;
        let units = self.num_units();
        let shape: Vec<usize> = match self.config.noise {
            NoiseMode::SharedPerBatch => vec![units],
            NoiseMode::PerExample => vec![rows, units],
        };
        let device = self.mu.device();
        let value = Tensor::from_slice(&draw.log_theta, shape.as_slice(), device)?
            .to_dtype(self.mu.dtype())?;
        let log_theta = self
            .linearised(rows, &draw.grad)?
            .reshape(shape)?
            .add(&value)?;
        Ok(log_theta.exp()?)
    }

    /// `g_μ·(μ − detach μ) + g_σ·(log σ − detach log σ)`, shape `(rows, units)` flattened
    /// from the row-major `g`s: exactly zero in value, exactly `g` in gradient.
    fn linearised(&self, rows: usize, grad: &UnitGrads) -> Result<Tensor> {
        let (g_mu, g_ls) = (&grad.mu, &grad.log_sigma);
        let units = self.num_units();
        let device = self.mu.device();
        let dtype = self.mu.dtype();
        let g_mu = Tensor::from_slice(g_mu, (rows, units), device)?.to_dtype(dtype)?;
        let g_ls = Tensor::from_slice(g_ls, (rows, units), device)?.to_dtype(dtype)?;
        let d_mu = self.mu.sub(&self.mu.detach())?.unsqueeze(0)?;
        let d_ls = self.log_sigma.sub(&self.log_sigma.detach())?.unsqueeze(0)?;
        Ok(g_mu
            .broadcast_mul(&d_mu)?
            .add(&g_ls.broadcast_mul(&d_ls)?)?
            .flatten_all()?)
    }

    /// Reshapes a per-unit `(units,)` or per-example `(batch, units)` tensor so that it
    /// broadcasts against `xs` along the unit axis.
    fn broadcastable(&self, theta: &Tensor, xs: &Tensor) -> Result<Tensor> {
        let mut shape = vec![1usize; xs.rank()];
        shape[self.config.axis] = self.num_units();
        if theta.rank() == 2 {
            shape[0] = theta.dim(0)?;
        }
        Ok(theta.reshape(shape)?)
    }

    fn check_input(&self, xs: &Tensor) -> Result<()> {
        let axis = self.config.axis;
        let fail = |reason: String| {
            Err(Error::InputShape {
                layer: self.name.clone(),
                shape: xs.dims().to_vec(),
                reason,
            })
        };
        if xs.rank() <= axis {
            return fail(format!(
                "the unit axis is {axis}, so the input needs rank at least {}",
                axis + 1
            ));
        }
        if xs.dim(axis)? != self.num_units() {
            return fail(format!(
                "expected {} units along axis {axis}, found {}",
                self.num_units(),
                xs.dim(axis)?
            ));
        }
        if self.config.noise == NoiseMode::PerExample && xs.dim(0)? == 0 {
            return fail("per-example noise needs a non-empty batch".into());
        }
        Ok(())
    }

    fn clamped_params(&self) -> Result<Vec<UnitParams>> {
        let (mu, log_sigma) = self.host_params()?;
        self.clamp(&mu, &log_sigma)
    }

    /// `μ` and `log σ` on the host, in f64.
    fn host_params(&self) -> Result<(Vec<f64>, Vec<f64>)> {
        Ok((to_f64_vec(&self.mu)?, to_f64_vec(&self.log_sigma)?))
    }

    /// Each unit's clamped distribution; a non-finite parameter is an error naming it.
    fn clamp(&self, mu: &[f64], log_sigma: &[f64]) -> Result<Vec<UnitParams>> {
        mu.iter()
            .zip(log_sigma)
            .enumerate()
            .map(|(index, (&m, &ls))| self.unit_params(index, m, ls))
            .collect()
    }

    /// Unit `index`'s clamped distribution from its `μ` and `log σ`.
    fn unit_params(&self, index: usize, m: f64, ls: f64) -> Result<UnitParams> {
        let c = &self.config;
        for (name, value) in [("mu", m), ("log_sigma", ls)] {
            if !value.is_finite() {
                return Err(Error::NonFinite {
                    layer: self.name.clone(),
                    name: name.into(),
                    index,
                    value,
                });
            }
        }
        let (mc, lc) = (
            m.clamp(c.mu_clamp.0, c.mu_clamp.1),
            ls.clamp(c.log_sigma_clamp.0, c.log_sigma_clamp.1),
        );
        Ok(UnitParams {
            dist: TruncatedLogNormal::new(mc, lc, c.a, c.b)?,
            mu_free: mc == m,
            log_sigma_free: lc == ls,
        })
    }

    /// The one rule for what survives: SNR strictly above the threshold.
    fn keeps(&self, d: &TruncatedLogNormal) -> bool {
        d.snr() > self.config.snr_threshold
    }

    fn lock_rng(&self) -> std::sync::MutexGuard<'_, StdRng> {
        // A poisoned lock only means another thread panicked mid-draw; the generator state
        // is still a valid state.
        self.rng.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl candle::ModuleT for LogNormalDropout {
    fn forward_t(&self, xs: &Tensor, train: bool) -> candle::Result<Tensor> {
        LogNormalDropout::forward_t(self, xs, train).map_err(Error::into_candle)
    }
}

/// One unit's clamped distribution and whether each parameter is inside its clamp range
/// (outside it, its gradient is zero).
#[derive(Debug, Clone, Copy)]
struct UnitParams {
    dist: TruncatedLogNormal,
    mu_free: bool,
    log_sigma_free: bool,
}

impl UnitParams {
    /// Zeroes the derivative of a parameter held at its clamp bound.
    fn gate(&self, d_mu: f64, d_log_sigma: f64) -> (f64, f64) {
        (
            if self.mu_free { d_mu } else { 0.0 },
            if self.log_sigma_free {
                d_log_sigma
            } else {
                0.0
            },
        )
    }
}

/// A 1-D tensor's values as f64 on the host: read in place from an f32 tensor in host
/// memory (the layers copy their parameters every step, twice with a KL term), through
/// candle's conversions otherwise.
fn to_f64_vec(t: &Tensor) -> Result<Vec<f64>> {
    if t.dtype() == DType::F32 && t.rank() == 1 {
        let (storage, layout) = t.storage_and_layout();
        if let (candle::Storage::Cpu(cpu), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            let values = cpu.as_slice::<f32>()?;
            return Ok(values[start..end].iter().map(|&v| v as f64).collect());
        }
    }
    Ok(t.to_dtype(DType::F64)?.to_device(&Device::Cpu)?.to_vec1()?)
}

/// The sequential part of a draw, whose positions are then transformed in parallel.
#[derive(Debug)]
struct DrawJob {
    mu: Vec<f64>,
    log_sigma: Vec<f64>,
    uniforms: Vec<f64>,
    with_kl: bool,
    /// With several rows, every unit's distribution, clamped once.
    clamped: Option<Vec<UnitParams>>,
    rows: usize,
}

impl DrawJob {
    fn len(&self) -> usize {
        self.uniforms.len()
    }
}

/// The next draws shared by the batch of several noise layers, made together in one
/// parallel pass for the forward pass about to run; each layer's draw then takes its own
/// instead of drawing. The values are those the layers would draw one by one (each from
/// its own stream): one pass instead of one a layer saves the hand-offs to the threads
/// and the idle ends of the passes. Dropping it drops what the forward pass left
/// unused (one that failed half-way), so that a later pass draws afresh.
pub(crate) struct PreparedDraws<'a>(Vec<&'a LogNormalDropout>);

impl<'a> PreparedDraws<'a> {
    /// Draws for those of `layers` whose draw is shared by the batch (nothing for fewer
    /// than two: there is nothing to save).
    pub(crate) fn new(layers: Vec<&'a LogNormalDropout>) -> Result<Self> {
        let layers: Vec<_> = layers
            .into_iter()
            .filter(|l| l.config.noise == NoiseMode::SharedPerBatch)
            .collect();
        if layers.len() < 2 {
            return Ok(Self(Vec::new()));
        }
        let jobs = layers
            .iter()
            .map(|l| l.draw_job(1))
            .collect::<Result<Vec<_>>>()?;
        // Every layer's chunks, as each would split its own draw, in one list; the results
        // come back in that order, each with its layer.
        let items: Vec<(usize, std::ops::Range<usize>)> = jobs
            .iter()
            .enumerate()
            .flat_map(|(k, job)| {
                let ranges = crate::par::chunk_ranges(job.len(), PAR_UNITS);
                ranges.into_iter().map(move |r| (k, r))
            })
            .collect();
        let mut chunks = crate::par::map(items, |_, (k, r)| (k, layers[k].draw_chunk(&jobs[k], r)))
            .into_iter()
            .peekable();
        let prepared = Self(layers);
        for (k, (layer, job)) in prepared.0.iter().zip(jobs).enumerate() {
            let mut own = Vec::new();
            while let Some((_, chunk)) = chunks.next_if(|(owner, _)| *owner == k) {
                own.push(chunk);
            }
            let draw = layer.finish_draw(job, own)?;
            *layer.lock_prepared() = Some(draw);
        }
        Ok(prepared)
    }
}

impl Drop for PreparedDraws<'_> {
    fn drop(&mut self) {
        for layer in &self.0 {
            layer.lock_prepared().take();
        }
    }
}

/// One step's draw on the host, row-major `(rows, units)`.
#[derive(Debug, Default)]
struct HostDraw {
    log_theta: Vec<f64>,
    /// `exp(log θ)`, taken in the parallel pass.
    theta: Vec<f64>,
    /// The derivatives of `log θ` at the draw's uniforms.
    grad: UnitGrads,
    /// With one row and a KL in use: the KL terms from the same windows.
    kl: KlTerms,
    rows: usize,
}

impl HostDraw {
    fn with_capacity(n: usize, with_kl: bool) -> Self {
        HostDraw {
            log_theta: Vec::with_capacity(n),
            theta: Vec::with_capacity(n),
            grad: UnitGrads::with_capacity(n),
            kl: KlTerms::with_capacity(if with_kl { n } else { 0 }),
            rows: 1,
        }
    }

    fn push(&mut self, log_theta: f64, grad: (f64, f64)) {
        self.log_theta.push(log_theta);
        self.theta.push(log_theta.exp());
        self.grad.push(grad);
    }

    /// Appends a later chunk of the same draw.
    fn append(&mut self, chunk: HostDraw) {
        self.log_theta.extend_from_slice(&chunk.log_theta);
        self.theta.extend_from_slice(&chunk.theta);
        self.grad.append(chunk.grad);
        self.kl.append(chunk.kl);
    }

    /// `θ` and its derivatives (`∂θ = θ·∂log θ`), as the CPU ops take them.
    fn noise(&self) -> crate::ops::NoiseDraw {
        let scale = |g: &[f64]| self.theta.iter().zip(g).map(|(t, g)| t * g).collect();
        crate::ops::NoiseDraw {
            d_mu: scale(&self.grad.mu),
            d_log_sigma: scale(&self.grad.log_sigma),
            theta: self.theta.clone(),
            rows: self.rows,
        }
    }
}

/// The fewest units in a parallel chunk of the host-side draws and statistics (each unit
/// costs about 0.3 µs; smaller chunks would cost more to hand out than to compute). Layers
/// are split into two chunks a thread: a 300-unit layer's draw took 79 µs in chunks of
/// 256 and 44 units, 60 µs in four of 75, on two threads.
const PAR_UNITS: usize = 64;

/// The lowest `a` of [`LogNormalDropout::divides_back`]: `e^-40 = 4e-18`, so that a product
/// `v·θ` is a normal f32 for any `|v| > 3e-21`.
const DIVIDES_BACK_MIN_A: f64 = -40.0;

/// A uniform draw in the open interval (0, 1): `(k + 1/2) / 2⁵³`.
pub(crate) fn open_unit(rng: &mut StdRng) -> f64 {
    ((rng.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
}

/// Mixes the user's seed with the layer name (FNV-1a, then SplitMix64), so that layers
/// sharing one config draw independent, reproducible streams.
pub(crate) fn stream_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        h ^= byte as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut z = seed ^ h;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three layers of different sizes whose units cover every kind of window.
    fn layers() -> Vec<LogNormalDropout> {
        [(700usize, "a"), (130, "b"), (5, "c")]
            .into_iter()
            .map(|(n, name)| {
                let mu: Vec<f32> = (0..n).map(|i| -25.0 + 30.0 * i as f32 / n as f32).collect();
                let ls: Vec<f32> = (0..n).map(|i| -6.0 + (i % 7) as f32).collect();
                let mu = Tensor::new(mu.as_slice(), &Device::Cpu).unwrap();
                let ls = Tensor::new(ls.as_slice(), &Device::Cpu).unwrap();
                let config = LogNormalDropoutConfig {
                    seed: 5,
                    ..Default::default()
                };
                LogNormalDropout::new(mu, ls, config, name).unwrap()
            })
            .collect()
    }

    fn bits(draw: &HostDraw) -> Vec<u64> {
        [
            &draw.log_theta,
            &draw.theta,
            &draw.grad.mu,
            &draw.grad.log_sigma,
        ]
        .into_iter()
        .flatten()
        .map(|v| v.to_bits())
        .collect()
    }

    fn kl_bits(layer: &LogNormalDropout) -> Vec<u64> {
        let cache = layer.kl_cache.lock().unwrap();
        let terms = &cache.as_ref().expect("the draw kept its KL terms").terms;
        [&terms.kl, &terms.grad.mu, &terms.grad.log_sigma]
            .into_iter()
            .flatten()
            .map(|v| v.to_bits())
            .collect()
    }

    /// Draws made together are those the layers make one by one, KL terms included, and
    /// what a forward pass leaves unused is dropped: the streams then go on from there.
    #[test]
    fn draws_made_together_equal_draws_made_one_by_one() {
        let (together, alone) = (layers(), layers());
        for with_kl in [true, false] {
            if with_kl {
                together
                    .iter()
                    .chain(&alone)
                    .for_each(|l| _ = l.kl().unwrap());
            }
            let prepared = PreparedDraws::new(together.iter().collect()).unwrap();
            for (t, a) in together.iter().zip(&alone) {
                assert!(t.lock_prepared().is_some(), "{}", t.name);
                assert_eq!(
                    bits(&t.draw_rows(1).unwrap()),
                    bits(&a.draw_rows(1).unwrap())
                );
                if with_kl {
                    assert_eq!(kl_bits(t), kl_bits(a), "{}", t.name);
                }
            }
            drop(prepared);
        }
        // Unused: the next draws come from further on in each stream.
        drop(PreparedDraws::new(together.iter().collect()).unwrap());
        for (t, a) in together.iter().zip(&alone) {
            assert!(t.lock_prepared().is_none());
            a.draw_rows(1).unwrap();
            assert_eq!(
                bits(&t.draw_rows(1).unwrap()),
                bits(&a.draw_rows(1).unwrap())
            );
        }
    }
}
