//! The truncated log-normal statistics for 10,000 units: construction, mean and variance
//! (the SNR), KL with its gradient, and reparameterised draws with their gradients.

use candle_sbp::TruncatedLogNormal;
use criterion::{criterion_group, criterion_main, Criterion};

const UNITS: usize = 10_000;

/// Parameters spread over the range training visits: μ in [-10, 3], log σ in [-8, 1].
fn params() -> Vec<(f64, f64)> {
    (0..UNITS)
        .map(|i| {
            let t = i as f64 / UNITS as f64;
            (
                -10.0 + 13.0 * t,
                -8.0 + 9.0 * ((i * 7919) % UNITS) as f64 / UNITS as f64,
            )
        })
        .collect()
}

fn truncnorm(c: &mut Criterion) {
    let params = params();
    let dists: Vec<TruncatedLogNormal> = params
        .iter()
        .map(|&(m, s)| TruncatedLogNormal::with_default_bounds(m, s).expect("valid"))
        .collect();
    let mut group = c.benchmark_group("truncnorm_10k_units");
    group.bench_function("new", |b| {
        b.iter(|| {
            params
                .iter()
                .map(|&(m, s)| TruncatedLogNormal::with_default_bounds(m, s).expect("valid"))
                .collect::<Vec<_>>()
        })
    });
    group.bench_function("snr", |b| {
        b.iter(|| dists.iter().map(|d| d.snr()).sum::<f64>())
    });
    group.bench_function("kl_and_grad", |b| {
        b.iter(|| dists.iter().map(|d| d.kl() + d.kl_grad().d_mu).sum::<f64>())
    });
    group.bench_function("sample_with_grad", |b| {
        b.iter(|| {
            dists
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let u = (i as f64 + 0.5) / UNITS as f64;
                    d.sample_log_theta_with_grad(u)
                        .expect("u in (0, 1)")
                        .log_theta
                })
                .sum::<f64>()
        })
    });
    group.finish();
}

criterion_group!(benches, truncnorm);
criterion_main!(benches);
