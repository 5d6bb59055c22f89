//! Exact f64 maths of the truncated log-normal noise of Structured Bayesian Pruning.
//!
//! SBP multiplies a unit's output by `θ` with `log θ ~ N(μ, σ²)` truncated to `[a, b]`
//! (`σ = exp(log_sigma)`, by default `[a, b] = [-20, 0]`), under the prior
//! `log θ ~ U[a, b]`. This module computes, in plain `f64` and without candle:
//!
//! * [`TruncatedLogNormal::kl`]: `KL(q ‖ prior) = ln(b - a) - H[q]` and its gradient;
//! * [`TruncatedLogNormal::mean`], [`TruncatedLogNormal::variance`] and
//!   [`TruncatedLogNormal::snr`] `= E[θ] / sqrt(Var[θ])`, the pruning criterion;
//! * the reparameterised inverse-CDF sampler
//!   `log θ = μ + σ Φ⁻¹(Φ(α) + u Z)` with `α = (a - μ)/σ`, `β = (b - μ)/σ`,
//!   `Z = Φ(β) - Φ(α)`, `u ~ U(0, 1)`, and its derivatives.
//!
//! # Why not the textbook formulas
//!
//! Written directly, these formulas subtract numbers that agree to more digits than an
//! `f64` holds: `Φ(β) - Φ(α)` underflows to 0 when both bounds sit in the same tail (the
//! original TensorFlow code then returns NaN), `E[θ²] - E[θ]²` cancels completely once
//! `σ` is small (the original code reports `E[θ] = 0` at `μ = -0.1, log σ = -5`, where the
//! true SNR is 148), and the entropy adds `-α²/2` to `+α²/2` for `α` up to `10¹⁰`.
//! Here every quantity is rearranged so that nothing cancels:
//!
//! * a window `[α, β]` in the upper tail is written through the log Mills ratio
//!   `ℓ(x) = ln(Φc(x)/φ(x))`, with the large `α²/2` terms cancelled by hand, and one in the
//!   lower tail is mirrored onto the upper one;
//! * `ln E[θ] = μ + K(σ)`, where `K` is the cumulant generating function of the
//!   standardised truncated normal, again with its linear part cancelled by hand;
//! * `Var[θ]/E[θ]² = expm1(D)` with `D = K(2σ) - 2K(σ)`, and where `D` is small,
//!   `D = ∫₀^{2σ} V(α - t, β - t) min(t, 2σ - t) dt` with `V` the variance of a standard
//!   normal truncated to a window: an integral of a positive function, so no cancellation.
//!
//! The results are checked against a 100-digit mpmath reference
//! (`scripts/truncnorm_reference.py`, table in `tests/data/truncnorm_reference.csv`):
//! relative error below `1e-6` (in practice near `1e-12`) over `μ ∈ [-30, 10]`,
//! `log σ ∈ [-20, 5]`.
//!
//! ```
//! use candle_sbp::truncnorm::TruncatedLogNormal;
//!
//! // The paper's initial state: μ = 0, log σ = -5 with bounds [-20, 0].
//! let q = TruncatedLogNormal::with_default_bounds(0.0, -5.0)?;
//! assert!(q.snr() > 1.0); // a fresh unit carries signal
//! let grad = q.kl_grad();
//! assert!(grad.d_log_sigma < 0.0); // the KL pushes σ up
//! # Ok::<(), candle_sbp::Error>(())
//! ```

use crate::error::{Error, Result};
use statrs::function::erf::erfc_inv;
const SQRT_2: f64 = std::f64::consts::SQRT_2;
use crate::special::{
    gauss_legendre_16, log_mills, log_mills_and_mills, mills_and_inv_mills_excess, mills_at,
    mills_tails, norm_cdf, norm_inv_cdf_lower, norm_mass_straddling, norm_pdf, norm_sf,
    sf_log_mills_and_mills, MillsAt, LN_SQRT_2PI,
};

/// Default lower bound `a` of `log θ` (the paper's value).
pub const DEFAULT_A: f64 = -20.0;
/// Default upper bound `b` of `log θ` (the paper's value: `θ <= 1`).
pub const DEFAULT_B: f64 = 0.0;

/// Largest accepted `|μ|`, `|a|`, `|b|`: beyond it the standardised bounds stop being
/// representable for the smallest `σ`.
pub const MAX_ABS_LOCATION: f64 = 1e6;
/// Accepted range of `log σ`.
pub const LOG_SIGMA_RANGE: (f64, f64) = (-50.0, 50.0);

/// Below this `D = ln(E[θ²]/E[θ]²)` is integrated instead of differenced.
const D_DIRECT_MIN: f64 = 1e-3;
/// A tail mass ratio below this is treated as exactly zero.
const RHO_NEGLIGIBLE: f64 = 1e-30;

/// The gradient of a scalar with respect to the two variational parameters.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ParamGrad {
    /// Derivative with respect to `μ`.
    pub d_mu: f64,
    /// Derivative with respect to `log σ`.
    pub d_log_sigma: f64,
}

/// One reparameterised draw of `log θ` with its derivatives for a fixed uniform `u`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LogThetaSample {
    /// The drawn `log θ`, always inside `[a, b]`.
    pub log_theta: f64,
    /// `∂ log θ / ∂μ` at fixed `u`.
    pub d_mu: f64,
    /// `∂ log θ / ∂ log σ` at fixed `u`.
    pub d_log_sigma: f64,
}

/// The variational distribution of one SBP noise variable: `log θ ~ N(μ, σ²)` truncated to
/// `[a, b]`, with the log-uniform prior `log θ ~ U[a, b]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TruncatedLogNormal {
    mu: f64,
    log_sigma: f64,
    /// `exp(log σ)`, computed once: a draw and its KL use it half a dozen times.
    sigma: f64,
    a: f64,
    b: f64,
}

impl TruncatedLogNormal {
    /// A distribution with explicit bounds. Fails if a value is not finite, if `a >= b`, if
    /// `|μ|`, `|a|` or `|b|` exceeds [`MAX_ABS_LOCATION`], or `log σ` leaves
    /// [`LOG_SIGMA_RANGE`].
    #[inline]
    pub fn new(mu: f64, log_sigma: f64, a: f64, b: f64) -> Result<Self> {
        if !(located(mu) && located(a) && located(b) && spread_in_range(log_sigma) && a < b) {
            return Err(Self::invalid(mu, log_sigma, a, b));
        }
        Ok(Self {
            mu,
            log_sigma,
            sigma: log_sigma.exp(),
            a,
            b,
        })
    }

    /// The error for the first bad argument of [`new`](Self::new), out of line: the layers
    /// build a distribution per unit and step, and the check should cost them nothing.
    #[cold]
    #[inline(never)]
    fn invalid(mu: f64, log_sigma: f64, a: f64, b: f64) -> Error {
        for (name, value) in [("mu", mu), ("a", a), ("b", b)] {
            if let Err(e) = check_location(name, value) {
                return e;
            }
        }
        if !spread_in_range(log_sigma) {
            return Error::InvalidValue {
                name: "log_sigma".into(),
                value: log_sigma,
                reason: format!(
                    "must be finite and within [{}, {}]",
                    LOG_SIGMA_RANGE.0, LOG_SIGMA_RANGE.1
                ),
            };
        }
        Error::InvalidValue {
            name: "a".into(),
            value: a,
            reason: format!("the lower bound must be below the upper bound b = {b}"),
        }
    }

    /// A distribution with the paper's bounds `[-20, 0]`.
    pub fn with_default_bounds(mu: f64, log_sigma: f64) -> Result<Self> {
        Self::new(mu, log_sigma, DEFAULT_A, DEFAULT_B)
    }

    /// Location `μ` of the untruncated normal.
    pub fn mu(&self) -> f64 {
        self.mu
    }
    /// `log σ` of the untruncated normal.
    pub fn log_sigma(&self) -> f64 {
        self.log_sigma
    }
    /// `σ = exp(log σ)`.
    pub fn sigma(&self) -> f64 {
        self.sigma
    }
    /// Lower bound `a` of `log θ`.
    pub fn a(&self) -> f64 {
        self.a
    }
    /// Upper bound `b` of `log θ`.
    pub fn b(&self) -> f64 {
        self.b
    }
    /// Standardised lower bound `α = (a - μ)/σ`.
    pub fn alpha(&self) -> f64 {
        (self.a - self.mu) / self.sigma()
    }
    /// Standardised upper bound `β = (b - μ)/σ`.
    pub fn beta(&self) -> f64 {
        (self.b - self.mu) / self.sigma()
    }

    /// `ln Z = ln(Φ(β) - Φ(α))`, the log of the normal mass kept by the truncation.
    pub fn log_normalizer(&self) -> f64 {
        ln_mass(self.alpha(), self.beta())
    }

    /// Differential entropy of `log θ` (nats).
    pub fn entropy(&self) -> f64 {
        self.log_sigma + self.window().entropy()
    }

    /// `KL(q ‖ p)` from the log-uniform prior: `ln(b - a) - H[log θ]`.
    pub fn kl(&self) -> f64 {
        self.kl_in(&self.window())
    }

    /// Gradient of [`kl`](Self::kl) with respect to `μ` and `log σ`.
    pub fn kl_grad(&self) -> ParamGrad {
        self.kl_grad_in(&self.window())
    }

    /// The standardised window with the pieces that the KL, its gradient and a draw share.
    fn window(&self) -> Window {
        Window::new(self.alpha(), self.beta())
    }

    fn kl_in(&self, w: &Window) -> f64 {
        if let Some(kl) = narrow_window_kl(w.alpha, w.beta) {
            return kl;
        }
        // KL = ln w - H[Y] with w = (b - a)/σ, the window's standardised width.
        (self.b - self.a).ln() - self.log_sigma - w.entropy()
    }

    fn kl_grad_in(&self, w: &Window) -> ParamGrad {
        let g = w.entropy_grad();
        ParamGrad {
            d_mu: (g.d_alpha + g.d_beta) / self.sigma(),
            d_log_sigma: w.alpha * g.d_alpha + w.beta * g.d_beta - 1.0,
        }
    }

    /// `ln E[θ]`, finite everywhere (`E[θ]` itself may underflow for extreme bounds).
    pub fn log_mean(&self) -> f64 {
        let (alpha, beta, sigma) = (self.alpha(), self.beta(), self.sigma());
        self.anchor(alpha, beta) + cgf_excess(alpha, beta, sigma)
    }

    /// `E[θ]`, the multiplier a kept unit gets at evaluation time.
    pub fn mean(&self) -> f64 {
        self.log_mean().exp()
    }

    /// `Var[θ] = E[θ]² · expm1(D)`.
    pub fn variance(&self) -> f64 {
        (2.0 * self.log_mean()).exp() * self.log_dispersion().exp_m1()
    }

    /// Signal-to-noise ratio `E[θ] / sqrt(Var[θ]) = 1 / sqrt(expm1(D))`.
    pub fn snr(&self) -> f64 {
        1.0 / self.log_dispersion().exp_m1().sqrt()
    }

    /// `D = ln(E[θ²] / E[θ]²) = ln(1 + 1/SNR²)`.
    pub fn log_dispersion(&self) -> f64 {
        let (alpha, beta, sigma) = (self.alpha(), self.beta(), self.sigma());
        let direct = cgf_excess(alpha, beta, 2.0 * sigma) - 2.0 * cgf_excess(alpha, beta, sigma);
        if direct >= D_DIRECT_MIN {
            return direct;
        }
        tilted_variance_integral(alpha, beta, sigma)
    }

    /// Draws `log θ` from the uniform `u ∈ (0, 1)` by the inverse CDF.
    pub fn sample_log_theta(&self, u: f64) -> Result<f64> {
        Ok(self.sample_log_theta_with_grad(u)?.log_theta)
    }

    /// Draws `log θ` from `u ∈ (0, 1)` and returns its derivatives at fixed `u`, the
    /// reparameterisation gradient.
    pub fn sample_log_theta_with_grad(&self, u: f64) -> Result<LogThetaSample> {
        if !(u > 0.0 && u < 1.0) {
            return Err(Error::InvalidValue {
                name: "u".into(),
                value: u,
                reason: "the uniform draw must lie in the open interval (0, 1)".into(),
            });
        }
        Ok(self.sample_unchecked(u))
    }

    /// The sampler without the range check on `u` (the layer draws `u` itself).
    pub(crate) fn sample_unchecked(&self, u: f64) -> LogThetaSample {
        self.sample_in(&self.window(), u)
    }

    /// A draw with the KL and its gradient, sharing the window's Mills ratios between them:
    /// bit for bit what [`sample_unchecked`](Self::sample_unchecked), [`kl`](Self::kl)
    /// and [`kl_grad`](Self::kl_grad) return.
    pub(crate) fn sample_and_kl_unchecked(&self, u: f64) -> (LogThetaSample, f64, ParamGrad) {
        let w = self.window();
        (self.sample_in(&w, u), self.kl_in(&w), self.kl_grad_in(&w))
    }

    fn sample_in(&self, w: &Window, u: f64) -> LogThetaSample {
        let (alpha, beta, sigma) = (w.alpha, w.beta, self.sigma());
        let v = 1.0 - u;
        let mut s = match &w.kind {
            WindowKind::Upper(tw) => {
                let t = tail_draw(tw, u, v);
                LogThetaSample {
                    log_theta: self.a + sigma * t.delta,
                    d_mu: -(t.d_alpha + t.d_beta),
                    d_log_sigma: sigma * (t.delta - alpha * t.d_alpha - beta * t.d_beta),
                }
            }
            WindowKind::Lower(tw) => {
                // Mirror: -log θ has bounds [-b, -a], location -μ, and uses the draw 1 - u.
                let (ma, mb) = (-beta, -alpha);
                let t = tail_draw(tw, v, u);
                LogThetaSample {
                    log_theta: self.b - sigma * t.delta,
                    d_mu: -(t.d_alpha + t.d_beta),
                    d_log_sigma: -sigma * (t.delta - ma * t.d_alpha - mb * t.d_beta),
                }
            }
            WindowKind::Straddling(st) => {
                let y = straddling_draw(alpha, beta, st, u, v);
                // ∂y/∂α = v·φ(α)/φ(y), ∂y/∂β = u·φ(β)/φ(y) (times Z/Z).
                let da = scaled_exp(v, 0.5 * (y - alpha) * (y + alpha));
                let db = scaled_exp(u, 0.5 * (y - beta) * (y + beta));
                LogThetaSample {
                    log_theta: self.mu + sigma * y,
                    d_mu: 1.0 - da - db,
                    d_log_sigma: sigma * (y - alpha * da - beta * db),
                }
            }
        };
        s.log_theta = s.log_theta.clamp(self.a, self.b);
        s
    }

    /// The exact value of `μ + σ·(linear part of K)`: `a` for a window in the upper tail,
    /// `b` in the lower tail, `μ` otherwise.
    fn anchor(&self, alpha: f64, beta: f64) -> f64 {
        if alpha >= 0.0 {
            self.a
        } else if beta <= 0.0 {
            self.b
        } else {
            self.mu
        }
    }
}

/// Whether `value` is an accepted `μ`, `a` or `b`: finite, at most [`MAX_ABS_LOCATION`].
fn located(value: f64) -> bool {
    value.is_finite() && value.abs() <= MAX_ABS_LOCATION
}

/// Whether `log_sigma` lies in [`LOG_SIGMA_RANGE`] (so is finite).
fn spread_in_range(log_sigma: f64) -> bool {
    (LOG_SIGMA_RANGE.0..=LOG_SIGMA_RANGE.1).contains(&log_sigma)
}

fn check_location(name: &str, value: f64) -> Result<()> {
    if located(value) {
        Ok(())
    } else {
        Err(Error::InvalidValue {
            name: name.into(),
            value,
            reason: format!("must be finite with magnitude at most {MAX_ABS_LOCATION}"),
        })
    }
}

/// `ln(1 - eˣ)` for `x <= 0`.
fn ln_one_minus_exp(x: f64) -> f64 {
    if x > -std::f64::consts::LN_2 {
        (-x.exp_m1()).ln()
    } else {
        (-x.exp()).ln_1p()
    }
}

/// The pieces of a window `[α, β]` with `α >= 0`, in the upper tail.
#[derive(Debug, Clone, Copy)]
struct TailWindow {
    alpha: f64,
    beta: f64,
    /// `ℓ(α)`.
    ell_alpha: f64,
    /// `Φc(α)` where it came with `ℓ(α)` (below the continued fraction's range).
    sf_alpha: Option<f64>,
    /// `ρ = Φc(β)/Φc(α)`, the share of the upper tail beyond the window.
    rho: f64,
    /// `1 - ρ` and its log, accurate for `ρ` near 1.
    one_minus_rho: f64,
    ln_one_minus_rho: f64,
    /// `t0 = 1/R(α) = φ(α)/Φc(α)`.
    t0: f64,
    /// `c = t0 - α`, `≈ 1/α`.
    c: f64,
    /// `α c - 1`, `≈ -2/α²`.
    alpha_c_minus_1: f64,
    /// `1/R(β)`.
    u0: f64,
    /// `V` of the window when `ρ` is negligible, from the continued fraction.
    variance_one_sided: f64,
}

impl TailWindow {
    fn new(alpha: f64, beta: f64) -> Self {
        debug_assert!(alpha >= 0.0 && beta > alpha);
        // One continued fraction (or one erfc) serves both ℓ(α) and 1/R(α).
        let (ell_alpha, sf_alpha, t0, c, alpha_c_minus_1, variance_one_sided) = if alpha >= 3.0 {
            let t = mills_tails(alpha);
            let c = 1.0 / t.t1;
            (
                -t.t0.ln(),
                None,
                t.t0,
                c,
                -2.0 / (t.t1 * t.t2),
                (2.0 / t.t2 - 1.0 / t.t1) / t.t1,
            )
        } else {
            let (sf, ell, r) = sf_log_mills_and_mills(alpha);
            let t0 = 1.0 / r;
            let c = t0 - alpha;
            (ell, Some(sf), t0, c, alpha * c - 1.0, 1.0 - t0 * c)
        };
        // ℓ decreases, so ln ρ <= -(β² - α²)/2: below -1000, ρ is exactly 0 in f64 either
        // way, and 1/R(β) only ever enters multiplied by ρ (its asymptote β stands in).
        let gap = -0.5 * (beta - alpha) * (beta + alpha);
        let (ln_rho, u0) = if gap < -1000.0 {
            (gap, beta)
        } else {
            let (ell_beta, r_beta) = log_mills_and_mills(beta);
            ((gap + ell_beta - ell_alpha).min(0.0), 1.0 / r_beta)
        };
        let rho = ln_rho.exp();
        TailWindow {
            alpha,
            beta,
            ell_alpha,
            sf_alpha,
            rho,
            one_minus_rho: -ln_rho.exp_m1(),
            ln_one_minus_rho: ln_one_minus_exp(ln_rho),
            t0,
            c,
            alpha_c_minus_1,
            u0,
            variance_one_sided,
        }
    }

    /// `ln Z`.
    fn ln_mass(&self) -> f64 {
        -0.5 * self.alpha * self.alpha - LN_SQRT_2PI + self.ell_alpha + self.ln_one_minus_rho
    }

    /// `H[Y]` for the standard normal truncated to the window.
    fn entropy(&self) -> f64 {
        let (a, b, rho) = (self.alpha, self.beta, self.rho);
        let tilt = (a * self.c + rho * (a * a - b * self.u0)) / (2.0 * self.one_minus_rho);
        0.5 + self.ell_alpha + self.ln_one_minus_rho + tilt
    }

    fn entropy_grad(&self) -> WindowGrad {
        let (a, b, rho, omr) = (self.alpha, self.beta, self.rho, self.one_minus_rho);
        let lambda_a = self.t0 / omr;
        let lambda_b = rho * self.u0 / omr;
        let g = (a * self.t0 - b * rho * self.u0) / (2.0 * omr);
        let d_alpha =
            lambda_a * (self.alpha_c_minus_1 + rho * (a * a + 1.0 - b * self.u0)) / (2.0 * omr);
        let d_beta = if rho == 0.0 {
            0.0
        } else {
            lambda_b * (0.5 * (1.0 + b * b) - g)
        };
        WindowGrad { d_alpha, d_beta }
    }

    fn variance(&self) -> f64 {
        if self.rho < RHO_NEGLIGIBLE {
            self.variance_one_sided
        } else {
            window_variance_quadrature(self.alpha, self.beta)
        }
    }
}

/// Derivatives of the standardised entropy with respect to the window's bounds.
#[derive(Debug, Clone, Copy)]
struct WindowGrad {
    d_alpha: f64,
    d_beta: f64,
}

/// `ln(Φ(β) - Φ(α))` for any window.
fn ln_mass(alpha: f64, beta: f64) -> f64 {
    if alpha >= 0.0 {
        TailWindow::new(alpha, beta).ln_mass()
    } else if beta <= 0.0 {
        TailWindow::new(-beta, -alpha).ln_mass()
    } else {
        norm_mass_straddling(alpha, beta).ln()
    }
}

/// A standardised window `[α, β]` and what its statistics and draws share.
#[derive(Debug, Clone, Copy)]
struct Window {
    alpha: f64,
    beta: f64,
    kind: WindowKind,
}

#[derive(Debug, Clone, Copy)]
enum WindowKind {
    /// `α >= 0`.
    Upper(TailWindow),
    /// `β <= 0`: the mirrored window `[-β, -α]`.
    Lower(TailWindow),
    /// `α < 0 < β`.
    Straddling(Straddle),
}

/// A window with `α < 0 < β`: its mass, the tails beyond it and the densities at its
/// bounds, which its draw, its entropy and the entropy's gradient share.
#[derive(Debug, Clone, Copy)]
struct Straddle {
    /// `Z = Φ(β) - Φ(α)`.
    z: f64,
    /// `Φ(α)`, the mass below the window.
    cdf_alpha: f64,
    /// `Φc(β)`, the mass above it.
    sf_beta: f64,
    pdf_alpha: f64,
    pdf_beta: f64,
}

impl Straddle {
    fn new(alpha: f64, beta: f64) -> Self {
        let (cdf_alpha, sf_beta) = (norm_cdf(alpha), norm_sf(beta));
        // Both tails are at most 1/2: where they leave Z >= 1/2 the difference loses at most
        // one bit and saves two evaluations of erf; below, the sum of erfs has no
        // cancellation at all.
        let outside = cdf_alpha + sf_beta;
        let z = if outside <= 0.5 {
            (1.0 - cdf_alpha) - sf_beta
        } else {
            norm_mass_straddling(alpha, beta)
        };
        Straddle {
            z,
            cdf_alpha,
            sf_beta,
            pdf_alpha: norm_pdf(alpha),
            pdf_beta: norm_pdf(beta),
        }
    }
}

impl Window {
    fn new(alpha: f64, beta: f64) -> Self {
        let kind = if alpha >= 0.0 {
            WindowKind::Upper(TailWindow::new(alpha, beta))
        } else if beta <= 0.0 {
            WindowKind::Lower(TailWindow::new(-beta, -alpha))
        } else {
            WindowKind::Straddling(Straddle::new(alpha, beta))
        };
        Window { alpha, beta, kind }
    }

    /// Entropy of the standard normal truncated to `[α, β]` (mirror-invariant).
    fn entropy(&self) -> f64 {
        let (alpha, beta) = (self.alpha, self.beta);
        match &self.kind {
            WindowKind::Upper(w) | WindowKind::Lower(w) => w.entropy(),
            WindowKind::Straddling(st) => {
                let tilt = (alpha * st.pdf_alpha - beta * st.pdf_beta) / (2.0 * st.z);
                0.5 + LN_SQRT_2PI + st.z.ln() + tilt
            }
        }
    }

    fn entropy_grad(&self) -> WindowGrad {
        let (alpha, beta) = (self.alpha, self.beta);
        match &self.kind {
            WindowKind::Upper(w) => w.entropy_grad(),
            WindowKind::Lower(w) => {
                // H(α, β) = H'(-β, -α): the derivatives swap and change sign.
                let m = w.entropy_grad();
                WindowGrad {
                    d_alpha: -m.d_beta,
                    d_beta: -m.d_alpha,
                }
            }
            WindowKind::Straddling(st) => {
                let lambda_a = st.pdf_alpha / st.z;
                let lambda_b = st.pdf_beta / st.z;
                let g = 0.5 * (alpha * lambda_a - beta * lambda_b);
                WindowGrad {
                    d_alpha: lambda_a * (g - 0.5 * (1.0 + alpha * alpha)),
                    d_beta: lambda_b * (0.5 * (1.0 + beta * beta) - g),
                }
            }
        }
    }
}

/// KL from the uniform on a narrow window (`w < 1`, `|centre|·w < 10`), where
/// `ln w - H` would cancel to a tiny number. With `g(y) = ln φ(y) - ln φ(centre)`,
/// `KL = E_q[g] - ln E_u[e^g]`: both terms are of the size of the result.
fn narrow_window_kl(alpha: f64, beta: f64) -> Option<f64> {
    let width = beta - alpha;
    let centre = 0.5 * (alpha + beta);
    if width >= 1.0 || centre.abs() * width >= 10.0 {
        return None;
    }
    let (nodes, weights) = gauss_legendre_16();
    let panels = ((centre.abs() * width).ceil() as usize).clamp(1, 16);
    let h = width / panels as f64;
    let (mut mass, mut g_mass, mut excess) = (0.0, 0.0, 0.0);
    for p in 0..panels {
        let mid = -0.5 * width + (p as f64 + 0.5) * h;
        for (x, w) in nodes.iter().zip(weights) {
            let t = mid + 0.5 * h * x;
            let g = -t * (2.0 * centre + t) / 2.0;
            let wg = w * g.exp();
            mass += wg;
            g_mass += wg * g;
            excess += w * g.exp_m1();
        }
    }
    // Each panel's weights sum to 2, so Σ w / (2·panels) is the uniform average.
    let uniform_mean_excess = excess / (2.0 * panels as f64);
    Some(g_mass / mass - uniform_mean_excess.ln_1p())
}

/// `K(s) - (linear anchor part)`, where `K(s) = ln E[e^{sY}]` is the cumulant generating
/// function of the standard normal truncated to `[α, β]`. The anchor part is `αs` for a
/// window in the upper tail, `βs` in the lower tail and 0 otherwise; it is exact in
/// `log θ` units (`μ + σα = a`), so callers add `a`, `b` or `μ` instead.
fn cgf_excess(alpha: f64, beta: f64, s: f64) -> f64 {
    if alpha >= 0.0 {
        tail_cgf_excess(alpha, beta, s)
    } else if beta <= 0.0 {
        // Y = -Y' with Y' on [-β, -α]: K(s) = K'(-s) = βs + K̂'(-s).
        tail_cgf_excess(-beta, -alpha, -s)
    } else {
        0.5 * s * s + ln_mass(alpha - s, beta - s) - ln_mass(alpha, beta)
    }
}

/// `K(s) - αs` for `α >= 0`.
fn tail_cgf_excess(alpha: f64, beta: f64, s: f64) -> f64 {
    if alpha - s < 0.0 {
        // The tilted window has left the upper tail, where the form below would need
        // `1 - ρ(s)` with `ρ(s) ≈ 1`. Here `α < s <= 2σ`, so `α` is moderate and the
        // plain difference of log masses loses nothing.
        return 0.5 * s * s - alpha * s + ln_mass(alpha - s, beta - s) - ln_mass(alpha, beta);
    }
    // ℓ(α-s) - ℓ(α) + ln(1-ρ(s)) - ln(1-ρ(0)): the ±α²/2 terms cancelled by hand.
    let ell_a0 = log_mills(alpha);
    let ell_as = log_mills(alpha - s);
    let ln_rho = |shift: f64, ell_a: f64| {
        (-0.5 * (beta - alpha) * (beta + alpha - 2.0 * shift) + log_mills(beta - shift) - ell_a)
            .min(0.0)
    };
    ell_as - ell_a0 + ln_one_minus_exp(ln_rho(s, ell_as)) - ln_one_minus_exp(ln_rho(0.0, ell_a0))
}

/// Variance of the standard normal truncated to `[α, β]`, to full relative precision.
fn window_variance(alpha: f64, beta: f64) -> f64 {
    if alpha >= 0.0 {
        TailWindow::new(alpha, beta).variance()
    } else if beta <= 0.0 {
        TailWindow::new(-beta, -alpha).variance()
    } else if beta - alpha < 2.0 {
        window_variance_quadrature(alpha, beta)
    } else {
        let z = norm_mass_straddling(alpha, beta);
        let (pa, pb) = (norm_pdf(alpha), norm_pdf(beta));
        let m = (pa - pb) / z;
        1.0 + (alpha * pa - beta * pb) / z - m * m
    }
}

/// Variance of `Y ~ φ` on `[α, β]` by composite Gauss–Legendre quadrature with a two-pass
/// central moment (no cancellation). Used for narrow windows and two-sided tails.
fn window_variance_quadrature(alpha: f64, beta: f64) -> f64 {
    let width = beta - alpha;
    // Work in t = y - α with log-density -α t - t²/2, shifted by its maximum on [0, w].
    let log_f = |t: f64| -alpha * t - 0.5 * t * t;
    let t_peak = (-alpha).clamp(0.0, width);
    let top = log_f(t_peak);
    let range = top - log_f(0.0).min(log_f(width));
    let panels = ((range / 3.0).ceil() as usize + 1).clamp(1, 256);
    let (nodes, weights) = gauss_legendre_16();
    let h = width / panels as f64;
    let mut pts = Vec::with_capacity(panels * 16);
    for p in 0..panels {
        let mid = (p as f64 + 0.5) * h;
        for (x, w) in nodes.iter().zip(weights) {
            let t = mid + 0.5 * h * x;
            pts.push((t, w * (log_f(t) - top).exp()));
        }
    }
    let mass: f64 = pts.iter().map(|(_, w)| w).sum();
    let mean = pts.iter().map(|(t, w)| w * t).sum::<f64>() / mass;
    pts.iter()
        .map(|(t, w)| w * (t - mean) * (t - mean))
        .sum::<f64>()
        / mass
}

/// `D = ∫₀^{2σ} V(α - t, β - t) min(t, 2σ - t) dt`, the second difference
/// `K(2σ) - 2K(σ)` written as an integral of the (positive) tilted variance.
fn tilted_variance_integral(alpha: f64, beta: f64, sigma: f64) -> f64 {
    let (nodes, weights) = gauss_legendre_16();
    let panels = (sigma.ceil() as usize).clamp(1, 64);
    let h = sigma / panels as f64;
    let mut total = 0.0;
    // Two halves, [0, σ] with weight t and [σ, 2σ] with weight 2σ - t (the kink at σ).
    for p in 0..2 * panels {
        let mid = (p as f64 + 0.5) * h;
        for (x, w) in nodes.iter().zip(weights) {
            let t = mid + 0.5 * h * x;
            let tri = t.min(2.0 * sigma - t);
            total += 0.5 * h * w * tri * window_variance(alpha - t, beta - t);
        }
    }
    total
}

/// A standardised draw from a window in the upper tail: `Y = α + δ`, with the
/// derivatives `∂δ/∂α`, `∂δ/∂β` at fixed `u`.
#[derive(Debug, Clone, Copy)]
struct TailDraw {
    delta: f64,
    d_alpha: f64,
    d_beta: f64,
}

/// Below this `α`, a tail draw starts Newton from the inverse normal CDF: its error, a
/// few ulps of `α + δ`, is larger relative to `δ` by `α/δ`, still far inside Newton's
/// quadratic basin.
const GUESS_BY_INVERSE_BELOW: f64 = 10.0;

/// The largest final Newton step (times `max(1, y)`) after which a tail draw moves its
/// last evaluation of the Mills ratio instead of evaluating it again: the neglected
/// second-order terms are then below 1e-18.
const FIRST_ORDER_MAX_STEP: f64 = 1e-9;

/// Solves `Φc(α + δ) = v Φc(α) + u Φc(β)` for `δ >= 0` with `v = 1 - u`, i.e.
/// `g(δ) = -αδ - δ²/2 + ℓ(α + δ) - ℓ(α) - ln(v + uρ) = 0`. `g` is concave and
/// decreasing, so Newton from `δ = 0` overshoots once and then converges monotonically.
fn tail_draw(w: &TailWindow, u: f64, v: f64) -> TailDraw {
    let (alpha, beta) = (w.alpha, w.beta);
    let q = v + u * w.rho;
    let r = q.ln();
    let width = beta - alpha;
    // g(δ), and the Newton scale R(α + δ) with it.
    let g_at = |d: f64, m: &MillsAt| -alpha * d - 0.5 * d * d + m.ell - w.ell_alpha - r;
    // Start from the exponential tail's δ = -ln q / t0, or near the window's start,
    // where that is crude, from Φc⁻¹(q·Φc(α)) (statrs' erfc⁻¹, good to a few ulps of
    // α + δ, but δ = y - α cancels): one or two Newton steps then finish instead of five
    // or six, and none where δ >= α, as a few ulps of α + δ are then a few ulps of δ.
    let (mut delta, polish) = if alpha < GUESS_BY_INVERSE_BELOW {
        let sf_alpha = w.sf_alpha.unwrap_or_else(|| norm_sf(alpha));
        let guess = (SQRT_2 * erfc_inv(2.0 * q * sf_alpha) - alpha).clamp(0.0, width);
        // NaN polishes too (and then restarts below).
        (guess, guess.is_nan() || guess < alpha)
    } else {
        ((-r / w.t0).min(width), true)
    };
    if !delta.is_finite() {
        delta = (-r / w.t0).min(width);
    }
    // Converged once a step no longer shrinks (round-off in `g` then dominates) or is
    // below 1e-9 of δ: the error after a step is about C·step² with C = |g''/2g'| ≈ 1/(2y),
    // so the step just taken left δ within a few ulps and another evaluation would only
    // confirm it.
    let mut last_move = f64::INFINITY;
    let newton_steps = if polish { 100 } else { 0 };
    // The last evaluation and where it was taken.
    let mut last: Option<(f64, MillsAt)> = None;
    for _ in 0..newton_steps {
        let m = mills_at(alpha + delta);
        last = Some((delta, m));
        let step = g_at(delta, &m) * m.r;
        let next = (delta + step).clamp(0.0, width);
        let moved = (next - delta).abs();
        if moved.partial_cmp(&last_move) != Some(std::cmp::Ordering::Less) {
            break; // no progress (or NaN): keep the better previous iterate
        }
        delta = next;
        last_move = moved;
        if moved <= 1e-9 * delta {
            break;
        }
    }
    let y = alpha + delta;
    // The gradient needs R and c at y. After the usual final step, of a few ulps, the
    // last evaluation moved along by first order is exact to the step squared
    // (`R'' / R = 1 - y c` lies in [0, 1] here, and `c''` is as tame), instead of
    // another evaluation, which for y >= 3 is a continued fraction.
    let (r_y, c_y) = match last {
        Some((d, m)) if d == delta => (m.r, m.c),
        Some((d, m)) if (delta - d).abs() * y.max(1.0) <= FIRST_ORDER_MAX_STEP => {
            let h = delta - d;
            (m.r * (1.0 - m.c * h), m.c + m.dc * h)
        }
        _ => mills_and_inv_mills_excess(y),
    };
    let r_alpha = u * w.rho * w.t0 / q;
    let r_beta = -u * w.rho * w.u0 / q;
    let g_alpha = -delta - c_y + w.c - r_alpha;
    TailDraw {
        delta,
        d_alpha: g_alpha * r_y,
        d_beta: -r_beta * r_y,
    }
}

/// `w·eᵉ` for `w ∈ (0, 1]`, without the logarithm where neither factor can underflow
/// the product, and without either where the product is certainly 0.
fn scaled_exp(w: f64, e: f64) -> f64 {
    if e < -746.0 {
        0.0 // below the smallest subnormal's log even with w = 1
    } else if e > -650.0 {
        w * e.exp() // w >= 2⁻⁵⁴ keeps the product a normal number
    } else {
        (w.ln() + e).exp()
    }
}

/// `Φ⁻¹(Φ(α) + uZ)` for a window with `α < 0 < β`, through whichever tail keeps full
/// relative precision.
fn straddling_draw(alpha: f64, beta: f64, st: &Straddle, u: f64, v: f64) -> f64 {
    let lower = st.cdf_alpha + u * st.z;
    let y = if lower <= 0.5 {
        norm_inv_cdf_lower(lower)
    } else {
        -norm_inv_cdf_lower(st.sf_beta + v * st.z)
    };
    y.clamp(alpha, beta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(mu: f64, ls: f64) -> TruncatedLogNormal {
        TruncatedLogNormal::with_default_bounds(mu, ls).unwrap()
    }

    #[test]
    fn untruncated_limit_matches_log_normal_moments() {
        // μ = -10, σ = e^-3: bounds 200 σ away, the truncation is invisible.
        let d = q(-10.0, -3.0);
        let s = d.sigma();
        let mean = (-10.0 + s * s / 2.0f64).exp();
        assert!((d.mean() / mean - 1.0).abs() < 1e-13);
        let snr = 1.0 / (s * s).exp_m1().sqrt();
        assert!((d.snr() / snr - 1.0).abs() < 1e-12, "{} vs {snr}", d.snr());
        let kl =
            20f64.ln() - (-3.0 + 0.5 * (2.0 * std::f64::consts::PI * std::f64::consts::E).ln());
        assert!((d.kl() / kl - 1.0).abs() < 1e-13);
    }

    /// Every tail draw, and in particular one that skips Newton (`δ >= α`), solves Newton's
    /// equation `g(δ) = 0` to the round-off of `g` itself: a wrong target or tail mass in
    /// the unpolished guess would show. (That the guess is then within a few ulps of `δ`
    /// follows from `erfc⁻¹`'s accuracy, which `special`'s tests check.)
    #[test]
    fn tail_draws_solve_newtons_equation_to_round_off() {
        let mut skipped = 0;
        for alpha in [0.0, 0.05, 0.4, 1.0, 2.5, 4.0, 9.0] {
            for beta in [alpha + 0.5, alpha + 3.0, alpha + 40.0] {
                let w = TailWindow::new(alpha, beta);
                for i in 0..500 {
                    let u = (i as f64 + 0.5) / 500.0;
                    let t = tail_draw(&w, u, 1.0 - u);
                    let y = alpha + t.delta;
                    let (ell, r) = log_mills_and_mills(y);
                    let q = (1.0 - u) + u * w.rho;
                    let g = -alpha * t.delta - 0.5 * t.delta * t.delta + ell - w.ell_alpha - q.ln();
                    let step = (g * r).abs();
                    // Round-off in g: a few ulps of its largest term, y²/2 or ℓ.
                    let noise = 8.0 * f64::EPSILON * (1.0 + y * y + ell.abs()) * r;
                    assert!(
                        step <= noise.max(1e-15 * t.delta),
                        "α {alpha} β {beta} u {u}: δ {} step {step:e}",
                        t.delta
                    );
                    skipped += usize::from(t.delta >= alpha && alpha < GUESS_BY_INVERSE_BELOW);
                }
            }
        }
        assert!(
            skipped > 3000,
            "only {skipped} draws took the unpolished path"
        );
    }

    /// The draw's derivatives, which reuse Newton's last Mills ratio moved along by first
    /// order, against the same formula with `R` and `c` evaluated afresh at the draw.
    #[test]
    fn tail_draw_gradients_match_a_fresh_evaluation() {
        let mut reused = 0;
        for alpha in [0.5, 2.9, 3.0, 3.4, 5.4, 9.9, 10.0, 14.0, 40.0] {
            for beta in [alpha + 0.01, alpha + 0.7, alpha + 5.0, alpha + 300.0] {
                let w = TailWindow::new(alpha, beta);
                for i in 0..400 {
                    let u = (i as f64 + 0.5) / 400.0;
                    let t = tail_draw(&w, u, 1.0 - u);
                    let (r_y, c_y) = mills_and_inv_mills_excess(alpha + t.delta);
                    let q = (1.0 - u) + u * w.rho;
                    let g_alpha = -t.delta - c_y + w.c - u * w.rho * w.t0 / q;
                    let (d_alpha, d_beta) = (g_alpha * r_y, u * w.rho * w.u0 / q * r_y);
                    // g_alpha cancels where the draw sits near α; its terms set the scale,
                    // and either way of computing c carries a few ulps of 1/R.
                    let scale = (t.delta + c_y + w.c + u * w.rho * w.t0 / q) * r_y;
                    let bad = |got: f64, want: f64, scale: f64| {
                        (got - want).abs() > 5e-14 * scale.abs().max(want.abs()) + 1e-300
                    };
                    assert!(
                        !bad(t.d_alpha, d_alpha, scale) && !bad(t.d_beta, d_beta, d_beta),
                        "α {alpha} β {beta} u {u}: {t:?} vs {d_alpha}, {d_beta}"
                    );
                    reused += usize::from(t.d_alpha != d_alpha);
                }
            }
        }
        // The first-order path ran (else the test checks nothing new).
        assert!(reused > 100, "{reused}");
    }

    #[test]
    fn original_code_failures_are_fixed() {
        // The TensorFlow code reports E[θ] = 0 here; the true SNR is about 148.
        let d = q(-0.1, -5.0);
        assert!(
            d.mean() > 0.8 && (d.snr() - 148.0).abs() < 1.0,
            "snr {}",
            d.snr()
        );
        let d = q(-4.5, -1.2);
        assert!((d.snr() - 3.2).abs() < 0.05, "snr {}", d.snr());
        // Z underflows in f64 for both of these; we stay finite.
        for (mu, ls) in [(10.0, -20.0), (-30.0, -20.0), (5.0, -8.0)] {
            let d = q(mu, ls);
            assert!(d.kl().is_finite() && d.mean() > 0.0 && d.snr().is_finite());
        }
    }

    #[test]
    fn mirrored_windows_have_equal_entropy() {
        for (a, b) in [(0.5, 3.0), (4.0, 9.0), (-1.0, 2.0), (10.0, 10.5)] {
            let h1 = Window::new(a, b).entropy();
            let h2 = Window::new(-b, -a).entropy();
            assert!((h1 - h2).abs() < 1e-12, "{a} {b}: {h1} {h2}");
        }
    }

    #[test]
    fn variance_branches_agree_with_quadrature() {
        for (a, b) in [
            (0.0, 50.0),
            (2.9, 60.0),
            (3.1, 60.0),
            (7.0, 100.0),
            (-3.0, 3.0),
            (-0.5, 8.0),
        ] {
            let v = window_variance(a, b);
            let vq = window_variance_quadrature(a, b);
            assert!((v / vq - 1.0).abs() < 1e-10, "[{a}, {b}]: {v} vs {vq}");
        }
    }

    #[test]
    fn dispersion_methods_agree_where_both_are_accurate() {
        for (mu, ls) in [(-1.0, -1.0), (-19.0, -0.5), (-25.0, 0.0), (3.0, -0.5)] {
            let d = q(mu, ls);
            let (a, b, s) = (d.alpha(), d.beta(), d.sigma());
            let direct = cgf_excess(a, b, 2.0 * s) - 2.0 * cgf_excess(a, b, s);
            let integral = tilted_variance_integral(a, b, s);
            assert!(
                (direct / integral - 1.0).abs() < 1e-9,
                "{mu} {ls}: {direct} {integral}"
            );
        }
    }

    #[test]
    fn rejects_bad_parameters() {
        // Each error names the first bad argument: μ, a, b, then log σ, then the order.
        let cases = [
            ((f64::NAN, 0.0, -20.0, 0.0), "mu"),
            ((0.0, f64::INFINITY, -20.0, 0.0), "log_sigma"),
            ((0.0, 0.0, 0.0, 0.0), "a"),
            ((0.0, 0.0, 1.0, -1.0), "a"),
            ((0.0, 60.0, -20.0, 0.0), "log_sigma"),
            ((1e7, 0.0, -20.0, 0.0), "mu"),
            ((0.0, 0.0, -20.0, f64::NAN), "b"),
            ((0.0, f64::NAN, 5.0, 1.0), "log_sigma"),
        ];
        for ((mu, ls, a, b), want) in cases {
            match TruncatedLogNormal::new(mu, ls, a, b) {
                Err(Error::InvalidValue { name, .. }) => assert_eq!(name, want),
                other => panic!("({mu}, {ls}, {a}, {b}): {other:?}"),
            }
        }
        let d = q(0.0, 0.0);
        for u in [0.0, 1.0, -0.1, f64::NAN] {
            assert!(d.sample_log_theta(u).is_err(), "u = {u}");
        }
    }
}
