//! candle_sbp::truncnorm against the 140-digit mpmath table made by
//! `scripts/truncnorm_reference.py` (the grid covers μ ∈ [-30, 10], log σ ∈ [-20, 5] with
//! its corners, for the default bounds [-20, 0] and four others).

use candle_sbp::truncnorm::TruncatedLogNormal;

const TABLE: &str = include_str!("data/truncnorm_reference.csv");
const US: [f64; 3] = [0.001, 0.5, 0.999];

struct Row {
    a: f64,
    b: f64,
    mu: f64,
    log_sigma: f64,
    kl: f64,
    mean: f64,
    snr: f64,
    log_theta: [f64; 3],
}

fn rows() -> Vec<Row> {
    TABLE
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with("a,"))
        .map(|l| {
            let v: Vec<f64> = l.split(',').map(|x| x.parse().unwrap()).collect();
            Row {
                a: v[0],
                b: v[1],
                mu: v[2],
                log_sigma: v[3],
                kl: v[4],
                mean: v[5],
                snr: v[6],
                log_theta: [v[7], v[8], v[9]],
            }
        })
        .collect()
}

fn rel(x: f64, r: f64) -> f64 {
    ((x - r) / r).abs()
}

#[test]
fn table_covers_the_box_and_its_corners() {
    let rows = rows();
    assert!(rows.len() > 1000);
    for (mu, ls) in [(-30.0, -20.0), (-30.0, 5.0), (10.0, -20.0), (10.0, 5.0)] {
        assert!(rows
            .iter()
            .any(|r| r.a == -20.0 && r.b == 0.0 && r.mu == mu && r.log_sigma == ls));
    }
}

#[test]
fn kl_mean_snr_match_the_high_precision_reference() {
    let mut worst = [
        (0.0, String::new()),
        (0.0, String::new()),
        (0.0, String::new()),
    ];
    for r in rows() {
        let q = TruncatedLogNormal::new(r.mu, r.log_sigma, r.a, r.b).unwrap();
        let errs = [
            rel(q.kl(), r.kl),
            rel(q.mean(), r.mean),
            rel(q.snr(), r.snr),
        ];
        for (w, e) in worst.iter_mut().zip(errs) {
            assert!(e.is_finite());
            if e > w.0 {
                *w = (
                    e,
                    format!("a={} b={} mu={} log_sigma={}", r.a, r.b, r.mu, r.log_sigma),
                );
            }
        }
    }
    for (name, (err, at)) in ["kl", "mean", "snr"].iter().zip(&worst) {
        println!("worst relative error of {name}: {err:.2e} at {at}");
        // The issue asks for 1e-6; we hold ourselves to 1e-9 so regressions show early.
        assert!(*err < 1e-9, "{name}: relative error {err:.2e} at {at}");
    }
}

#[test]
fn sampler_matches_the_high_precision_reference() {
    let mut worst = (0.0f64, String::new());
    for r in rows() {
        let q = TruncatedLogNormal::new(r.mu, r.log_sigma, r.a, r.b).unwrap();
        for (u, want) in US.iter().zip(r.log_theta) {
            let got = q.sample_log_theta(*u).unwrap();
            // Absolute error in log θ is relative error in θ.
            let err = (got - want).abs();
            if err > worst.0 {
                worst = (
                    err,
                    format!(
                        "a={} b={} mu={} log_sigma={} u={u}",
                        r.a, r.b, r.mu, r.log_sigma
                    ),
                );
            }
        }
    }
    println!(
        "worst error of log θ samples: {:.2e} at {}",
        worst.0, worst.1
    );
    assert!(worst.0 < 1e-9, "{:.2e} at {}", worst.0, worst.1);
}
