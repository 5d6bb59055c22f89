//! LogNormalDropout: gradients, evaluation, KL, seeding and every bad-input path.

use candle::{DType, Device, ModuleT, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use candle_sbp::{
    log_normal_dropout, Error, LogNormalDropout, LogNormalDropoutConfig, NoiseMode,
    TruncatedLogNormal,
};

const MU: [f64; 6] = [-1.5, -0.3, -4.0, 0.0, 6.0, -12.0];
const LOG_SIGMA: [f64; 6] = [-1.0, 0.5, -0.2, -5.0, -1.0, 1.0];

/// A layer over 6 units in an f64 VarMap, with hand-set parameters (unit 4 has μ = 6,
/// outside the clamp range, so its μ gets no gradient).
fn layer(noise: NoiseMode, axis: usize) -> (VarMap, LogNormalDropout) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let cfg = LogNormalDropoutConfig {
        noise,
        axis,
        seed: 7,
        ..Default::default()
    };
    let l = log_normal_dropout(6, cfg, vb.pp("sbp")).unwrap();
    var(&varmap, "sbp.mu")
        .set(&Tensor::new(&MU, &Device::Cpu).unwrap())
        .unwrap();
    var(&varmap, "sbp.log_sigma")
        .set(&Tensor::new(&LOG_SIGMA, &Device::Cpu).unwrap())
        .unwrap();
    (varmap, l)
}

fn var(varmap: &VarMap, name: &str) -> Var {
    varmap.data().lock().unwrap()[name].clone()
}

fn input(shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `Σ w ⊙ layer(x)` with the noise stream reset, so every call sees the same `u`.
fn loss(l: &LogNormalDropout, x: &Tensor, w: &Tensor) -> Tensor {
    l.reseed(11);
    l.forward_t(x, true)
        .unwrap()
        .mul(w)
        .unwrap()
        .sum_all()
        .unwrap()
}

fn check_gradients(noise: NoiseMode, shape: &[usize]) {
    let (varmap, l) = layer(noise, 1);
    let x = input(shape);
    let w = input(shape).sin().unwrap();
    let grads = loss(&l, &x, &w).backward().unwrap();
    for (name, values) in [("sbp.mu", MU), ("sbp.log_sigma", LOG_SIGMA)] {
        let v = var(&varmap, name);
        let analytic: Vec<f64> = grads.get(v.as_tensor()).unwrap().to_vec1().unwrap();
        for j in 0..6 {
            let h = 1e-6;
            let at = |delta: f64| {
                let mut p = values;
                p[j] += delta;
                v.set(&Tensor::new(&p, &Device::Cpu).unwrap()).unwrap();
                let out = loss(&l, &x, &w).to_scalar::<f64>().unwrap();
                v.set(&Tensor::new(&values, &Device::Cpu).unwrap()).unwrap();
                out
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            let err = (analytic[j] - numeric).abs();
            assert!(
                err <= 1e-6 * numeric.abs().max(1.0),
                "{noise:?} {name}[{j}]: autograd {} vs finite difference {numeric}",
                analytic[j]
            );
        }
        if name == "sbp.mu" {
            assert_eq!(analytic[4], 0.0, "a clamped μ must get no gradient");
        }
    }
}

#[test]
fn gradients_match_finite_differences_shared_noise() {
    check_gradients(NoiseMode::SharedPerBatch, &[3, 6, 2, 2]);
}

#[test]
fn gradients_match_finite_differences_per_example_noise() {
    check_gradients(NoiseMode::PerExample, &[4, 6]);
}

#[test]
fn kl_tensor_matches_f64_maths_in_value_and_gradient() {
    let (varmap, l) = layer(NoiseMode::SharedPerBatch, 1);
    let kl = l.kl().unwrap();
    assert_eq!(kl.dims(), &[] as &[usize]);
    let dists: Vec<TruncatedLogNormal> = MU
        .iter()
        .zip(LOG_SIGMA)
        .map(|(&m, ls)| TruncatedLogNormal::with_default_bounds(m.clamp(-20.0, 5.0), ls).unwrap())
        .collect();
    let want: f64 = dists.iter().map(|d| d.kl()).sum();
    assert!((kl.to_scalar::<f64>().unwrap() - want).abs() < 1e-12 * want);
    let grads = kl.backward().unwrap();
    let g_mu: Vec<f64> = grads
        .get(var(&varmap, "sbp.mu").as_tensor())
        .unwrap()
        .to_vec1()
        .unwrap();
    let g_ls: Vec<f64> = grads
        .get(var(&varmap, "sbp.log_sigma").as_tensor())
        .unwrap()
        .to_vec1()
        .unwrap();
    for (j, d) in dists.iter().enumerate() {
        let g = d.kl_grad();
        let want_mu = if j == 4 { 0.0 } else { g.d_mu };
        assert_eq!(g_mu[j], want_mu, "unit {j}");
        assert_eq!(g_ls[j], g.d_log_sigma, "unit {j}");
    }
}

/// The KL value and gradients of `l` as host vectors.
fn kl_and_grads(varmap: &VarMap, l: &LogNormalDropout) -> (f64, Vec<f64>, Vec<f64>) {
    let kl = l.kl().unwrap();
    let grads = kl.backward().unwrap();
    let get = |name: &str| -> Vec<f64> {
        grads
            .get(var(varmap, name).as_tensor())
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    (
        kl.to_scalar::<f64>().unwrap(),
        get("sbp.mu"),
        get("sbp.log_sigma"),
    )
}

#[test]
fn kl_computed_with_the_draw_equals_the_kl_computed_alone_and_never_goes_stale() {
    let (varmap, l) = layer(NoiseMode::SharedPerBatch, 1);
    let alone = kl_and_grads(&varmap, &l);
    // A training pass draws θ and computes the KL from the same windows.
    l.forward_t(&input(&[3, 6]), true).unwrap();
    assert_eq!(kl_and_grads(&varmap, &l), alone, "bit for bit");
    // New parameters after the draw (an optimiser step): the KL follows them.
    let mu = var(&varmap, "sbp.mu");
    l.forward_t(&input(&[3, 6]), true).unwrap();
    mu.set(&(mu.as_tensor() - 0.25).unwrap()).unwrap();
    let moved = kl_and_grads(&varmap, &l);
    assert_ne!(moved.0, alone.0);
    let (fresh_vm, fresh) = layer(NoiseMode::SharedPerBatch, 1);
    var(&fresh_vm, "sbp.mu")
        .set(&(Tensor::new(&MU, &Device::Cpu).unwrap() - 0.25).unwrap())
        .unwrap();
    assert_eq!(moved, kl_and_grads(&fresh_vm, &fresh));
}

#[test]
fn evaluation_multiplies_by_mean_of_kept_units_only() {
    let (_varmap, l) = layer(NoiseMode::SharedPerBatch, 1);
    let snr = l.snr().unwrap();
    let mean = l.mean().unwrap();
    let mask = l.keep_mask().unwrap();
    // μ = -12, log σ = 1 is noise-dominated; μ = 0, log σ = -5 is a fresh, kept unit.
    assert!(!mask[5] && mask[3]);
    assert_eq!(l.num_kept().unwrap(), mask.iter().filter(|&&k| k).count());
    let x = input(&[2, 6, 3]);
    let y = l.forward_t(&x, false).unwrap();
    let xv: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let yv: Vec<f64> = y.flatten_all().unwrap().to_vec1().unwrap();
    for (k, (xi, yi)) in xv.iter().zip(&yv).enumerate() {
        let unit = (k / 3) % 6;
        let m = if snr[unit] > 1.0 { mean[unit] } else { 0.0 };
        assert!((yi - xi * m).abs() < 1e-12, "element {k}");
    }
}

#[test]
fn shared_noise_is_shared_and_per_example_noise_is_not() {
    let x = Tensor::ones((3, 6), DType::F64, &Device::Cpu).unwrap();
    let (_v, shared) = layer(NoiseMode::SharedPerBatch, 1);
    let rows: Vec<Vec<f64>> = shared.forward_t(&x, true).unwrap().to_vec2().unwrap();
    assert_eq!(rows[0], rows[1]);
    assert_eq!(rows[1], rows[2]);
    let (_v, per) = layer(NoiseMode::PerExample, 1);
    let rows: Vec<Vec<f64>> = per.forward_t(&x, true).unwrap().to_vec2().unwrap();
    assert_ne!(rows[0], rows[1]);
    for row in rows {
        for (j, t) in row.iter().enumerate() {
            let bounds = (-20f64.exp(), 1.0);
            assert!(
                *t >= bounds.0 && *t <= bounds.1,
                "θ[{j}] = {t} outside [e^a, e^b]"
            );
        }
    }
}

#[test]
fn noise_is_reproducible_from_the_seed() {
    let x = Tensor::ones((2, 6), DType::F64, &Device::Cpu).unwrap();
    let draw = |l: &LogNormalDropout| -> Vec<f64> {
        l.forward_t(&x, true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (_a, la) = layer(NoiseMode::PerExample, 1);
    let (_b, lb) = layer(NoiseMode::PerExample, 1);
    let first = draw(&la);
    assert_eq!(first, draw(&lb), "same seed and name, same noise");
    assert_ne!(first, draw(&la), "the stream moves on");
    la.reseed(7);
    assert_eq!(first, draw(&la), "reseeding restarts the stream");
    // Two layers built from one config but with different names draw different noise.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let cfg = LogNormalDropoutConfig::default();
    let l1 = log_normal_dropout(6, cfg, vb.pp("one")).unwrap();
    let l2 = log_normal_dropout(6, cfg, vb.pp("two")).unwrap();
    assert_ne!(draw(&l1), draw(&l2));
}

#[test]
fn works_on_other_axes_and_dtypes() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let cfg = LogNormalDropoutConfig {
        axis: 2,
        ..Default::default()
    };
    let l = log_normal_dropout(5, cfg, vb.pp("last")).unwrap();
    let x = Tensor::ones((2, 3, 5), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(l.forward_t(&x, true).unwrap().dims(), &[2, 3, 5]);
    let y = l.forward_t(&x, false).unwrap();
    assert_eq!(y.dtype(), DType::F32);
    // Fresh units: E[θ] of N(0, e^-10) truncated at 0 ≈ 1 - σ·sqrt(2/π).
    let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
    let want = 1.0 - (-5.0f64).exp() * (2.0 / std::f64::consts::PI).sqrt();
    assert!(v.iter().all(|&t| ((t as f64) - want).abs() < 1e-4), "{v:?}");
}

fn config_error(cfg: LogNormalDropoutConfig) -> String {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    match log_normal_dropout(4, cfg, vb.pp("bad")) {
        Err(e @ Error::InvalidConfig { .. }) => e.to_string(),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
}

#[test]
fn bad_configurations_are_typed_errors() {
    let d = LogNormalDropoutConfig::default();
    let cases = [
        (
            LogNormalDropoutConfig {
                a: 0.0,
                b: 0.0,
                ..d
            },
            "a < b",
        ),
        (
            LogNormalDropoutConfig {
                a: 1.0,
                b: -1.0,
                ..d
            },
            "a < b",
        ),
        (LogNormalDropoutConfig { a: f64::NAN, ..d }, "not finite"),
        (
            LogNormalDropoutConfig {
                mu_init: f64::INFINITY,
                ..d
            },
            "not finite",
        ),
        (
            LogNormalDropoutConfig {
                log_sigma_init: f64::NAN,
                ..d
            },
            "not finite",
        ),
        (
            LogNormalDropoutConfig {
                snr_threshold: -0.5,
                ..d
            },
            "must not be negative",
        ),
        (
            LogNormalDropoutConfig {
                snr_threshold: f64::NAN,
                ..d
            },
            "not finite",
        ),
        (LogNormalDropoutConfig { axis: 0, ..d }, "batch axis"),
        (
            LogNormalDropoutConfig {
                log_sigma_clamp: (1.0, -1.0),
                ..d
            },
            "increasing range",
        ),
        (
            LogNormalDropoutConfig {
                log_sigma_clamp: (-80.0, 5.0),
                ..d
            },
            "increasing range",
        ),
    ];
    for (cfg, needle) in cases {
        let msg = config_error(cfg);
        assert!(msg.contains(needle) && msg.contains("bad"), "{msg}");
    }
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    assert!(matches!(
        log_normal_dropout(0, d, vb.pp("empty")),
        Err(Error::InvalidConfig { .. })
    ));
    let mu = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    let ls = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        LogNormalDropout::new(mu, ls, d, "mismatch"),
        Err(Error::InvalidConfig { .. })
    ));
}

#[test]
fn bad_inputs_are_typed_errors_naming_the_layer() {
    let (_v, l) = layer(NoiseMode::SharedPerBatch, 1);
    for (shape, needle) in [
        (vec![6], "rank at least 2"),
        (vec![2, 5], "expected 6 units along axis 1, found 5"),
        (vec![2, 7, 3], "expected 6 units"),
    ] {
        let x = Tensor::zeros(shape.as_slice(), DType::F64, &Device::Cpu).unwrap();
        for train in [true, false] {
            match l.forward_t(&x, train) {
                Err(e @ Error::InputShape { .. }) => {
                    let msg = e.to_string();
                    assert!(msg.contains(needle) && msg.contains("sbp"), "{msg}");
                }
                other => panic!("expected InputShape, got {other:?}"),
            }
        }
        // Through candle's trait the message survives as a candle error.
        let msg = ModuleT::forward_t(&l, &x, true).unwrap_err().to_string();
        assert!(msg.contains(needle), "{msg}");
    }
    let (_v, axis3) = layer(NoiseMode::SharedPerBatch, 3);
    let x = Tensor::zeros((2, 6, 4), DType::F64, &Device::Cpu).unwrap();
    assert!(matches!(
        axis3.forward_t(&x, true),
        Err(Error::InputShape { .. })
    ));
}

#[test]
fn non_finite_parameters_are_reported_with_their_index() {
    let (varmap, l) = layer(NoiseMode::SharedPerBatch, 1);
    let mut bad = LOG_SIGMA;
    bad[2] = f64::NAN;
    var(&varmap, "sbp.log_sigma")
        .set(&Tensor::new(&bad, &Device::Cpu).unwrap())
        .unwrap();
    let x = input(&[2, 6]);
    for result in [
        l.forward_t(&x, true).map(|_| ()),
        l.kl().map(|_| ()),
        l.snr().map(|_| ()),
    ] {
        match result {
            Err(Error::NonFinite {
                layer, name, index, ..
            }) => {
                assert_eq!(
                    (layer.as_str(), name.as_str(), index),
                    ("sbp", "log_sigma", 2)
                );
            }
            other => panic!("expected NonFinite, got {other:?}"),
        }
    }
}
