//! Special functions of the standard normal distribution, accurate in the far tails.
//!
//! Everything the truncated-normal maths needs is built on the Mills ratio
//! `R(x) = Φc(x) / φ(x)` and its logarithm, which stay finite and well conditioned where
//! `Φ` and `φ` themselves underflow. For `x >= CF_START` they come from Laplace's continued
//! fraction `R(x) = 1 / (x + 1/(x + 2/(x + 3/(x + …))))`, whose partial tails also give
//! cancellation-free forms of the quantities that the naive formulas lose (`1/R(x) - x`,
//! `x (1/R(x) - x) - 1`, the variance of a one-sided truncated normal).

use libm::{erf, erfc};
// statrs' inverse is good to a few ulps down to 1e-290 (tested below); beneath, it seeds a
// Newton polish in log space.
use statrs::function::erf::erfc_inv;

/// `0.5 · ln(2π)`.
pub(crate) const LN_SQRT_2PI: f64 = 0.918_938_533_204_672_8;
const SQRT_2: f64 = std::f64::consts::SQRT_2;

/// Where the continued fraction takes over from `erfc`. At 3 it converges to full
/// precision in 80 terms (checked against mpmath at 50 digits).
const CF_START: f64 = 3.0;

/// Density of the standard normal.
pub(crate) fn norm_pdf(x: f64) -> f64 {
    if x.abs() > PDF_ZERO_BEYOND {
        // Exactly what exp returns here, without its slow underflow path (errno).
        return 0.0;
    }
    (-0.5 * x * x - LN_SQRT_2PI).exp()
}

/// Beyond this `|x|`, `φ(x) = exp(-x²/2 - 0.92) < exp(-749)` rounds to 0 (the smallest
/// subnormal is `exp(-744.4)`).
const PDF_ZERO_BEYOND: f64 = 38.7;

/// `Φ(x)`, with full relative accuracy in the lower tail.
pub(crate) fn norm_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / SQRT_2)
}

/// `Φc(x) = 1 - Φ(x)`, with full relative accuracy in the upper tail.
pub(crate) fn norm_sf(x: f64) -> f64 {
    0.5 * erfc(x / SQRT_2)
}

/// `Φ(β) - Φ(α)` for `α <= 0 <= β`: a sum of two non-negative terms, so no cancellation.
pub(crate) fn norm_mass_straddling(alpha: f64, beta: f64) -> f64 {
    0.5 * (erf(beta / SQRT_2) + erf(-alpha / SQRT_2))
}

/// Partial tails of Laplace's continued fraction at `x >= CF_START`:
/// `T0 = 1/R(x)`, `T1`, `T2` with `T_k = x + (k+1)/T_{k+1}`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MillsTails {
    pub t0: f64,
    pub t1: f64,
    pub t2: f64,
}

/// The continued fraction's level below which [`mills_tails`] steps backwards.
const FORWARD_TO: usize = 6;

pub(crate) fn mills_tails(x: f64) -> MillsTails {
    debug_assert!(x >= CF_START);
    let depth = if x < 4.0 {
        80
    } else if x < 6.0 {
        40
    } else {
        24
    };
    // The deep part, `T_FORWARD_TO`, by the forward recurrence of its convergents `A/B`
    // (scaled by `x` per level, so they stay in range): a chain of additions instead of
    // one of divisions, 32 instead of 70 ns a call over x in [3, 12] (one thread, a loop
    // of independent calls). Its few ulps of accumulated error are damped
    // by the backward steps that follow (each scales it by `k/T_k² < 1/2`): the tails
    // come out within 2e-16 of mpmath's, as the all-backward recurrence did.
    let c = 1.0 / (x * x);
    let (mut a_prev, mut a) = (x, x);
    let (mut b_prev, mut b) = (0.0, 1.0);
    for k in FORWARD_TO + 1..=depth {
        let s = k as f64 * c;
        (a_prev, a) = (a, a + s * a_prev);
        (b_prev, b) = (b, b + s * b_prev);
    }
    let mut t = a / b;
    for k in (3..=FORWARD_TO).rev() {
        t = x + k as f64 / t;
    }
    let t2 = t;
    let t1 = x + 2.0 / t2;
    let t0 = x + 1.0 / t1;
    MillsTails { t0, t1, t2 }
}

/// Mills ratio `R(x) = Φc(x)/φ(x)`; finite for `x > -37`, `+inf` below.
pub(crate) fn mills(x: f64) -> f64 {
    if x >= CF_START {
        1.0 / mills_tails(x).t0
    } else {
        log_mills(x).exp()
    }
}

/// `ℓ(x) = ln R(x)`, finite for every finite `x`.
pub(crate) fn log_mills(x: f64) -> f64 {
    if x >= CF_START {
        -mills_tails(x).t0.ln()
    } else {
        log_mills_by_erfc(x)
    }
}

/// `(ℓ(x), R(x))` from one evaluation: bit for bit what [`log_mills`] and [`mills`]
/// return, at half their joint cost.
pub(crate) fn log_mills_and_mills(x: f64) -> (f64, f64) {
    if x >= CF_START {
        let t0 = mills_tails(x).t0;
        (-t0.ln(), 1.0 / t0)
    } else {
        let (_, ell, r) = sf_log_mills_and_mills(x);
        (ell, r)
    }
}

/// `(R(x), c(x))` from one evaluation, with `c(x) = 1/R(x) - x` the excess of the
/// inverse Mills ratio over `x` (`≈ 1/x` for large `x`), computed without cancellation.
pub(crate) fn mills_and_inv_mills_excess(x: f64) -> (f64, f64) {
    if x >= CF_START {
        let t = mills_tails(x);
        (1.0 / t.t0, 1.0 / t.t1)
    } else {
        let r = mills(x);
        (r, 1.0 / r - x)
    }
}

/// The Mills ratio at one point with what a Newton step in its argument needs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MillsAt {
    /// `ℓ(x)`.
    pub ell: f64,
    /// `R(x)`.
    pub r: f64,
    /// `c(x) = 1/R(x) - x`.
    pub c: f64,
    /// `c'(x) = c² + x c - 1`.
    pub dc: f64,
}

/// [`MillsAt`] `x` from one evaluation: `ell` and `r` bit for bit what
/// [`log_mills_and_mills`] returns, `r` and `c` what [`mills_and_inv_mills_excess`] does.
pub(crate) fn mills_at(x: f64) -> MillsAt {
    if x >= CF_START {
        let t = mills_tails(x);
        let c = 1.0 / t.t1;
        // x c - 1 = -2/(T1 T2) without cancellation.
        let dc = c * (c - 2.0 / t.t2);
        MillsAt {
            ell: -t.t0.ln(),
            r: 1.0 / t.t0,
            c,
            dc,
        }
    } else {
        let (_, ell, r) = sf_log_mills_and_mills(x);
        let c = 1.0 / r - x;
        MillsAt {
            ell,
            r,
            c,
            dc: c * c + x * c - 1.0,
        }
    }
}

/// `ℓ(x)` through `erfc`, accurate while `erfc(x/√2)` does not underflow.
fn log_mills_by_erfc(x: f64) -> f64 {
    log_mills_from_sf(x, norm_sf(x))
}

/// `ℓ(x)` from `Φc(x)`.
fn log_mills_from_sf(x: f64, sf: f64) -> f64 {
    sf.ln() + 0.5 * x * x + LN_SQRT_2PI
}

/// `(Φc(x), ℓ(x), R(x))` for `x < CF_START` from one `erfc`: what [`log_mills_and_mills`]
/// and [`mills_at`] build on there.
pub(crate) fn sf_log_mills_and_mills(x: f64) -> (f64, f64, f64) {
    debug_assert!(x < CF_START);
    let sf = norm_sf(x);
    let ell = log_mills_from_sf(x, sf);
    (sf, ell, ell.exp())
}

/// `ln Φc(x)`, finite for every finite `x`.
pub(crate) fn log_norm_sf(x: f64) -> f64 {
    if x > 5.0 {
        -0.5 * x * x - LN_SQRT_2PI + log_mills(x)
    } else {
        norm_sf(x).ln()
    }
}

/// `ln Φ(x)`, finite for every finite `x`.
pub(crate) fn log_norm_cdf(x: f64) -> f64 {
    log_norm_sf(-x)
}

/// Down to this `p`, statrs' `erfc⁻¹` (Boost's rational approximations) gives `Φ⁻¹(p)`
/// within 1e-15 relative of its polished value (checked over 20,000 `p` in `(0, 0.5]` and
/// at every decade down to this bound by the tests below): no polish is needed.
const UNPOLISHED_MIN_P: f64 = 1e-290;

/// `Φ⁻¹(p)` for `0 < p <= 0.5`, with full relative accuracy deep in the lower tail: below
/// [`UNPOLISHED_MIN_P`] polished by Newton steps in log space.
pub(crate) fn norm_inv_cdf_lower(p: f64) -> f64 {
    let mut y = -SQRT_2 * erfc_inv(2.0 * p);
    if !y.is_finite() || p >= UNPOLISHED_MIN_P {
        return y;
    }
    // Newton on ln Φ(y) = ln p; d/dy ln Φ(y) = φ(y)/Φ(y) = 1/R(-y).
    for _ in 0..2 {
        let step = (log_norm_cdf(y) - p.ln()) * mills(-y);
        if !step.is_finite() {
            break;
        }
        y -= step;
        if step.abs() <= 1e-15 * y.abs().max(1e-300) {
            break;
        }
    }
    y
}

/// Gauss–Legendre nodes and weights on [-1, 1], `N` points, built once.
pub(crate) fn gauss_legendre_16() -> &'static ([f64; 16], [f64; 16]) {
    static RULE: std::sync::OnceLock<([f64; 16], [f64; 16])> = std::sync::OnceLock::new();
    RULE.get_or_init(gauss_legendre::<16>)
}

fn gauss_legendre<const N: usize>() -> ([f64; N], [f64; N]) {
    let mut nodes = [0.0; N];
    let mut weights = [0.0; N];
    let n = N as f64;
    for i in 0..N.div_ceil(2) {
        // Chebyshev-like first guess, then Newton on P_N.
        let mut z = (std::f64::consts::PI * (i as f64 + 0.75) / (n + 0.5)).cos();
        let mut dp = 0.0;
        for _ in 0..100 {
            let (mut p0, mut p1) = (1.0, 0.0);
            for j in 0..N {
                let p2 = p1;
                p1 = p0;
                let jf = j as f64;
                p0 = ((2.0 * jf + 1.0) * z * p1 - jf * p2) / (jf + 1.0);
            }
            dp = n * (z * p0 - p1) / (z * z - 1.0);
            let dz = p0 / dp;
            z -= dz;
            if dz.abs() < 1e-16 {
                break;
            }
        }
        let w = 2.0 / ((1.0 - z * z) * dp * dp);
        nodes[i] = -z;
        nodes[N - 1 - i] = z;
        weights[i] = w;
        weights[N - 1 - i] = w;
    }
    (nodes, weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauss_legendre_integrates_polynomials_exactly() {
        let (x, w) = gauss_legendre_16();
        let total: f64 = w.iter().sum();
        assert!((total - 2.0).abs() < 1e-14);
        // ∫ x^30 over [-1, 1] = 2/31 (degree 2N-1 = 31 is the exactness limit).
        let m30: f64 = x.iter().zip(w).map(|(x, w)| w * x.powi(30)).sum();
        assert!((m30 - 2.0 / 31.0).abs() < 1e-14);
    }

    #[test]
    fn mills_ratio_matches_both_branches_at_the_switch() {
        for x in [CF_START, 4.0, 6.0, 9.0] {
            let by_cf = log_mills(x);
            let by_erfc = log_mills_by_erfc(x);
            assert!((by_cf - by_erfc).abs() < 1e-14, "{x}: {by_cf} vs {by_erfc}");
        }
    }

    /// The all-backward recurrence to depth 200, far past convergence: the form
    /// [`mills_tails`] replaced for speed, good to 2e-16 of mpmath's 50 digits.
    fn tails_by_backward_recurrence(x: f64) -> [f64; 3] {
        let mut t = x;
        for k in (3..=200).rev() {
            t = x + k as f64 / t;
        }
        let t1 = x + 2.0 / t;
        [x + 1.0 / t1, t1, t]
    }

    #[test]
    fn mills_tails_match_the_backward_recurrence() {
        // An all-forward evaluation (no backward steps to damp its rounding) is 1.4e-15
        // off at x = 3: the bound catches it.
        let mut worst = (0.0f64, 0.0);
        let grid = (0..4000).map(|i| CF_START + 60.0 * (i as f64 / 4000.0).powi(2));
        // Far out, where x² overflows and the scaled convergents see no terms at all.
        for x in grid.chain([1e3, 1e8, 1e20, 1e160, 1e300]) {
            let t = mills_tails(x);
            for (got, want) in [t.t0, t.t1, t.t2]
                .into_iter()
                .zip(tails_by_backward_recurrence(x))
            {
                let err = ((got - want) / want).abs();
                if err > worst.0 {
                    worst = (err, x);
                }
            }
        }
        assert!(worst.0 < 6e-16, "{:.2e} at x = {}", worst.0, worst.1);
    }

    #[test]
    fn mills_ratio_known_values() {
        // R(0) = sqrt(pi/2).
        assert!((mills(0.0) - (std::f64::consts::PI / 2.0).sqrt()).abs() < 1e-15);
        // Asymptotics: R(x) ~ 1/x - 1/x^3 for large x.
        let x = 1e8;
        assert!((mills(x) * x - 1.0).abs() < 1e-15);
        // Far left: ln R(x) ~ x^2/2 + ln sqrt(2 pi).
        let x = -1e3;
        assert!((log_mills(x) - (0.5 * x * x + LN_SQRT_2PI)).abs() < 1e-9);
    }

    #[test]
    fn inverse_cdf_round_trips_in_the_tails() {
        for &p in &[1e-300, 1e-100, 1e-20, 1e-5, 0.1, 0.5, 0.9, 1.0 - 1e-12] {
            let y = if p <= 0.5 {
                norm_inv_cdf_lower(p)
            } else {
                -norm_inv_cdf_lower(1.0 - p)
            };
            let back = norm_cdf(y);
            // An error e relative in y is about y²·e relative in Φ(y).
            let tolerance = 1e-14 * (1.0 + y * y);
            assert!(
                ((back - p) / p).abs() < tolerance,
                "p={p} y={y} back={back}"
            );
        }
    }

    /// Newton in log space from `y`, to round-off: the reference for the unpolished range.
    fn polished(p: f64, mut y: f64) -> f64 {
        for _ in 0..4 {
            y -= (log_norm_cdf(y) - p.ln()) * mills(-y);
        }
        y
    }

    #[test]
    fn inverse_cdf_needs_no_polish_above_its_threshold() {
        let mut ps: Vec<f64> = (0..20_000)
            .map(|i| 0.5 * (i as f64 + 0.5) / 20_000.0)
            .collect();
        ps.extend((1..=290).map(|k| 10f64.powi(-k)));
        ps.extend((1..=290).map(|k| 3.7 * 10f64.powi(-k)));
        let mut worst = (0.0f64, 0.0);
        for p in ps.into_iter().filter(|&p| p >= UNPOLISHED_MIN_P) {
            let y = norm_inv_cdf_lower(p);
            let err = ((y - polished(p, y)) / y).abs();
            if err > worst.0 {
                worst = (err, p);
            }
        }
        assert!(worst.0 < 1e-15, "{:.2e} at p = {:e}", worst.0, worst.1);
    }
}
