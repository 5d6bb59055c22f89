//! Properties of candle_sbp::truncnorm that need no reference table: finiteness over the
//! whole parameter box, gradients against central finite differences, and the sampler's
//! distribution.

use candle_sbp::truncnorm::TruncatedLogNormal;
use proptest::prelude::*;

const BOUNDS: [(f64, f64); 4] = [(-20.0, 0.0), (-10.0, 0.0), (-4.0, 4.0), (-30.0, -2.0)];

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        rng_seed: proptest::test_runner::RngSeed::Fixed(2017),
        ..ProptestConfig::default()
    })]

    #[test]
    fn everything_is_finite_over_the_box(
        mu in -30.0f64..10.0,
        log_sigma in -20.0f64..5.0,
        u in 1e-12f64..(1.0 - 1e-12),
        bounds in 0usize..4,
    ) {
        let (a, b) = BOUNDS[bounds];
        let q = TruncatedLogNormal::new(mu, log_sigma, a, b).unwrap();
        let g = q.kl_grad();
        prop_assert!(q.kl().is_finite() && q.kl() >= 0.0, "kl {}", q.kl());
        prop_assert!(g.d_mu.is_finite() && g.d_log_sigma.is_finite(), "{g:?}");
        prop_assert!(q.log_mean().is_finite() && q.log_mean() <= b && q.log_mean() >= a);
        prop_assert!(q.snr().is_finite() && q.snr() > 0.0, "snr {}", q.snr());
        prop_assert!(q.variance().is_finite() && q.variance() >= 0.0);
        let s = q.sample_log_theta_with_grad(u).unwrap();
        prop_assert!(s.log_theta >= a && s.log_theta <= b);
        prop_assert!(s.d_mu.is_finite() && s.d_log_sigma.is_finite(), "{s:?}");
    }
}

/// Central difference of `f` at `x` with step `h`, divided by the step actually taken
/// (`(x + h) - (x - h)` is not `2h` once `h` nears the spacing of floats at `x`).
fn central(f: impl Fn(f64) -> f64, x: f64, h: f64) -> f64 {
    let (hi, lo) = (x + h, x - h);
    (f(hi) - f(lo)) / (hi - lo)
}

fn close(analytic: f64, numeric: f64, rel: f64, abs: f64) -> bool {
    (analytic - numeric).abs() <= rel * numeric.abs().max(analytic.abs()) + abs
}

/// A step in μ that is small against every scale the function varies on (σ, and the
/// distance to the nearest bound) but large enough to stay clear of round-off.
fn mu_step(h: f64, mu: f64, log_sigma: f64, a: f64, b: f64) -> f64 {
    let dist = (mu - a).abs().min((mu - b).abs());
    h * log_sigma.exp().max(dist).min(1.0)
}

/// Round-off floor of a central difference of a value of size `f` with step `h`.
fn roundoff(f: f64, h: f64) -> f64 {
    8.0 * f64::EPSILON * f.abs().max(1.0) / h
}

fn grid() -> impl Iterator<Item = (f64, f64, f64, f64)> {
    BOUNDS.into_iter().flat_map(|(a, b)| {
        (0..=16).flat_map(move |i| {
            (0..=20).map(move |j| (a, b, -30.0 + 2.5 * i as f64, -12.0 + 0.85 * j as f64))
        })
    })
}

#[test]
fn kl_gradient_matches_finite_differences() {
    let h = 1e-5;
    let mut checked = 0;
    for (a, b, mu, ls) in grid() {
        let q = TruncatedLogNormal::new(mu, ls, a, b).unwrap();
        let g = q.kl_grad();
        let kl_at = |m: f64, l: f64| TruncatedLogNormal::new(m, l, a, b).unwrap().kl();
        let hm = mu_step(h, mu, ls, a, b);
        let fd_mu = central(|m| kl_at(m, ls), mu, hm);
        let fd_ls = central(|l| kl_at(mu, l), ls, h);
        assert!(
            close(g.d_mu, fd_mu, 1e-5, roundoff(q.kl(), hm)),
            "d_mu at a={a} b={b} mu={mu} ls={ls}: {} vs {fd_mu}",
            g.d_mu
        );
        assert!(
            close(g.d_log_sigma, fd_ls, 1e-5, roundoff(q.kl(), h)),
            "d_ls at a={a} b={b} mu={mu} ls={ls}: {} vs {fd_ls}",
            g.d_log_sigma
        );
        checked += 1;
    }
    assert!(checked > 1000);
}

#[test]
fn sample_gradient_matches_finite_differences() {
    let h = 1e-5;
    for (a, b, mu, ls) in grid() {
        for u in [0.01, 0.3, 0.7, 0.99] {
            let q = TruncatedLogNormal::new(mu, ls, a, b).unwrap();
            let s = q.sample_log_theta_with_grad(u).unwrap();
            let at = |m: f64, l: f64| {
                TruncatedLogNormal::new(m, l, a, b)
                    .unwrap()
                    .sample_log_theta(u)
                    .unwrap()
            };
            let hm = mu_step(h, mu, ls, a, b);
            let fd_mu = central(|m| at(m, ls), mu, hm);
            let fd_ls = central(|l| at(mu, l), ls, h);
            // log θ = a + σδ carries δ's round-off times σ.
            let size = s.log_theta.abs() + ls.exp();
            assert!(
                close(s.d_mu, fd_mu, 1e-5, roundoff(size, hm)),
                "d_mu at a={a} b={b} mu={mu} ls={ls} u={u}: {} vs {fd_mu}",
                s.d_mu
            );
            assert!(
                close(s.d_log_sigma, fd_ls, 1e-5, roundoff(size, h)),
                "d_ls at a={a} b={b} mu={mu} ls={ls} u={u}: {} vs {fd_ls}",
                s.d_log_sigma
            );
        }
    }
}

#[test]
fn sampler_reproduces_mean_and_variance() {
    // Stratified u over (0, 1): the sample moments of θ converge to E[θ] and Var[θ].
    let n = 200_000;
    for (mu, ls) in [
        (-1.0, -0.5),
        (-0.1, -5.0),
        (-3.0, 0.5),
        (2.0, 0.0),
        (-21.0, 0.0),
    ] {
        let q = TruncatedLogNormal::with_default_bounds(mu, ls).unwrap();
        let (mut s1, mut s2) = (0.0, 0.0);
        for i in 0..n {
            let u = (i as f64 + 0.5) / n as f64;
            let t = q.sample_log_theta(u).unwrap().exp();
            s1 += t;
            s2 += t * t;
        }
        let mean = s1 / n as f64;
        let var = s2 / n as f64 - mean * mean;
        assert!(
            (mean / q.mean() - 1.0).abs() < 1e-4,
            "mean at {mu} {ls}: {mean} vs {}",
            q.mean()
        );
        assert!(
            (var / q.variance() - 1.0).abs() < 1e-2,
            "var at {mu} {ls}: {var} vs {}",
            q.variance()
        );
    }
}
