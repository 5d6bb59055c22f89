//! Training on candle's own ops, the path of a GPU build (`ops::set_cpu_kernels(false)`),
//! against training on this crate's CPU kernels: the same networks with SBP layers, the same
//! draws (shared by the batch, and one per example) and batches. In f64, three Adam steps:
//! same losses, same parameters after them, same evaluation outputs. In f32, the first
//! step's loss and gradients (after a step, Adam's update of a parameter whose gradient is
//! round-off flips with its sign). The switch is process-wide, so these tests have a
//! binary of their own and take turns on it.

mod common;

use std::sync::Mutex;

use candle::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_sbp::train::{elbo, Adam, AdamConfig};
use candle_sbp::{compress, models, ops, CompressConfig, LogNormalDropoutConfig, Net, NoiseMode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Held by each test while it uses the switch.
static SWITCH: Mutex<()> = Mutex::new(());

/// Sets the switch until dropped, then puts back what it was (also when a test fails, so
/// that the next test does not run both sides on candle's ops).
struct Kernels(bool);

impl Kernels {
    fn set(enabled: bool) -> Self {
        Self(ops::set_cpu_kernels(enabled))
    }
}

impl Drop for Kernels {
    fn drop(&mut self) {
        ops::set_cpu_kernels(self.0);
    }
}

type Build = fn(Option<LogNormalDropoutConfig>, VarBuilder) -> candle_sbp::Result<Net>;

/// Values by parameter name.
type Named = (String, Vec<f64>);

/// What a short training run leaves behind.
struct Run {
    losses: Vec<f64>,
    /// The first step's gradients.
    grads: Vec<Named>,
    /// The parameters after the last step.
    params: Vec<Named>,
    eval: Vec<f64>,
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `steps` training steps of a fresh network on seeded random batches of `input` images,
/// on this crate's kernels or on candle's ops.
fn train(
    build: Build,
    dtype: DType,
    input: (usize, usize, usize),
    steps: usize,
    kernels: bool,
) -> Run {
    let switch = Kernels::set(kernels);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
    // Wide noise (σ = 0.37), so that the draws move the losses visibly.
    let config = LogNormalDropoutConfig {
        mu_init: -0.5,
        log_sigma_init: -1.0,
        ..Default::default()
    };
    let net = build(Some(config), vb).unwrap();
    net.reset_parameters(3).unwrap();
    let noise = AdamConfig {
        lr: 0.05,
        ..Default::default()
    };
    let mut adam = Adam::new(&net, AdamConfig::default(), noise).unwrap();
    let mut rng = StdRng::seed_from_u64(17);
    let (c, h, w) = input;
    let batch = 6;
    let mut losses = Vec::new();
    let mut grads = Vec::new();
    let mut last = None;
    for step in 0..steps {
        let pixels: Vec<f64> = (0..batch * c * h * w).map(|_| rng.random()).collect();
        let xs = Tensor::from_vec(pixels, (batch, c, h, w), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let labels: Vec<u32> = (0..batch).map(|_| rng.random_range(0..10)).collect();
        let labels = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
        let logits = net.forward_t(&xs, true).unwrap();
        let loss = elbo(&net, &logits, &labels, 1_000, 1.0, &Default::default()).unwrap();
        losses.push(values(&loss.loss)[0]);
        if step == 0 {
            let g = loss.loss.backward().unwrap();
            let params = net.named_params().into_iter();
            grads = params
                .filter_map(|(name, t)| g.get(&t).map(|g| (name, values(g))))
                .collect();
        }
        adam.backward_step(&loss.loss).unwrap();
        last = Some(xs);
    }
    let eval = values(&net.forward_t(&last.unwrap(), false).unwrap());
    let params = net
        .named_params()
        .into_iter()
        .map(|(name, t)| (name, values(&t)))
        .collect();
    drop(switch);
    Run {
        losses,
        grads,
        params,
        eval,
    }
}

/// The largest difference relative to the largest magnitude of `reference`.
fn relative_error(ours: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let scale = reference
        .iter()
        .fold(0f64, |m, v| m.max(v.abs()))
        .max(1e-30);
    let diff = ours
        .iter()
        .zip(reference)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

/// Each of `ours` against the same-named one of `reference`, which must match one to one,
/// leaving out the parameters named in `inert`.
fn same(what: &str, (ours, reference): (&[Named], &[Named]), inert: &[String], tol: f64) {
    assert_eq!(
        ours.len(),
        reference.len(),
        "{what}: not the same parameters"
    );
    for ((n, a), (m, b)) in ours.iter().zip(reference) {
        assert_eq!(n, m);
        if !inert.contains(n) {
            let err = relative_error(a, b);
            assert!(err < tol, "{what}: {n} differs by {err:e}");
        }
    }
}

fn compare(name: &str, build: Build, input: (usize, usize, usize)) {
    let _turn = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    // Parameters without effect in training (a convolution's bias before a batch norm):
    // their gradients are round-off on both paths, found in f64.
    let mut inert = Vec::new();
    for (dtype, steps, tol) in [(DType::F64, 3, 1e-9), (DType::F32, 1, 1e-4)] {
        let fast = train(build, dtype, input, steps, true);
        let plain = train(build, dtype, input, steps, false);
        let err = relative_error(&fast.losses, &plain.losses);
        assert!(
            err < tol,
            "{name} {dtype:?}: losses {:?} on the kernels, {:?} on candle's ops",
            fast.losses,
            plain.losses
        );
        if dtype == DType::F64 {
            let largest = |v: &[f64]| v.iter().fold(0f64, |m, x| m.max(x.abs()));
            let overall = fast.grads.iter().fold(0f64, |m, (_, g)| m.max(largest(g)));
            let without_effect = fast
                .grads
                .iter()
                .filter(|(_, g)| largest(g) < 1e-12 * overall);
            inert = without_effect.map(|(n, _)| n.clone()).collect();
            assert!(
                inert.iter().all(|n| n.ends_with(".bias")),
                "{name}: {inert:?}"
            );
        }
        let what = format!("{name} {dtype:?}, gradient");
        same(&what, (&fast.grads, &plain.grads), &inert, tol);
        if dtype == DType::F64 {
            let what = format!("{name} {dtype:?}, after {steps} steps");
            // Adam scales an inert parameter's round-off gradient up to a step of the
            // learning rate in its sign, and that bias moves the batch norm's running mean
            // after it by its round-off.
            same(&what, (&fast.params, &plain.params), &inert, 100.0 * tol);
            let err = relative_error(&fast.eval, &plain.eval);
            assert!(err < tol, "{what}: evaluation differs by {err:e}");
        }
    }
    assert!(ops::cpu_kernels(), "the kernels are back on after the runs");
}

/// LeNet5-Caffe: convolutions, max-pooling, noise on channels and on a flattened map.
#[test]
fn lenet5_trains_alike_on_candles_ops() {
    compare("lenet5", models::lenet5_caffe, (1, 28, 28));
}

/// LeNet-300-100: input noise fused with the first layer and the noise after it, a
/// hidden noise layer folded into the last layer's columns.
#[test]
fn lenet_300_100_trains_alike_on_candles_ops() {
    compare("lenet-300-100", models::lenet_300_100, (1, 28, 28));
}

/// LeNet-300-100 with a draw per example: no fused noise-linear op, no folding.
#[test]
fn noise_per_example_trains_alike_on_candles_ops() {
    let per_example: Build = |sbp, vb| {
        let per_example = |c| LogNormalDropoutConfig {
            noise: NoiseMode::PerExample,
            ..c
        };
        models::lenet_300_100(sbp.map(per_example), vb)
    };
    compare("lenet-300-100, per example", per_example, (1, 28, 28));
}

/// A narrow VGG-like network: padded convolutions, batch norm, five poolings.
#[test]
fn vgg_like_trains_alike_on_candles_ops() {
    let narrow: Build = |sbp, vb| models::vgg_like(1.0 / 16.0, sbp, vb);
    compare("vgg-like", narrow, (3, 32, 32));
}

/// compress() on candle's ops: a narrow VGG-like network with about half the units of each
/// noise layer without signal shrinks, and the smaller network evaluates as the original
/// did, on candle's ops and on the kernels.
#[test]
fn compression_on_candles_ops_keeps_the_evaluation() {
    let _turn = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let switch = Kernels::set(false);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let config = LogNormalDropoutConfig::default();
    let net = models::vgg_like(1.0 / 16.0, Some(config), vb).unwrap();
    net.reset_parameters(3).unwrap();
    common::set_noise_keeps(&net, 2, 0.5);
    let mut rng = StdRng::seed_from_u64(4);
    let pixels: Vec<f64> = (0..4 * 3 * 32 * 32).map(|_| rng.random()).collect();
    let xs = Tensor::from_vec(pixels, (4, 3, 32, 32), &Device::Cpu).unwrap();
    let before = values(&net.forward_t(&xs, false).unwrap());
    let small = compress(&net, &CompressConfig::default()).unwrap();
    let on_candle = values(&small.net.forward_t(&xs, false).unwrap());
    drop(switch);
    let on_kernels = values(&small.net.forward_t(&xs, false).unwrap());
    let ratio = small.report.macs_ratio();
    assert!(ratio > 1.5, "{ratio}x fewer multiply-accumulates");
    assert!(relative_error(&on_candle, &before) < 1e-9);
    assert!(relative_error(&on_kernels, &before) < 1e-9);
}

/// Off, the inference plan compiles nothing and says why; on again, it compiles.
#[test]
fn the_inference_plan_follows_the_switch() {
    let _turn = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let net = models::lenet_300_100(None, vb).unwrap();
    let switch = Kernels::set(false);
    let off = net.inference_plan().unwrap();
    drop(switch);
    let on = net.inference_plan().unwrap();
    assert!(!off.is_compiled());
    assert!(off.not_compiled_because().unwrap().contains("turned off"));
    let xs = Tensor::rand(0f32, 1., (3, 1, 28, 28), &Device::Cpu).unwrap();
    let reference = values(&net.forward_t(&xs, false).unwrap());
    assert!(relative_error(&values(&off.forward(&xs).unwrap()), &reference) < 1e-6);
    if on.is_compiled() {
        assert!(relative_error(&values(&on.forward(&xs).unwrap()), &reference) < 1e-5);
    }
}

/// On candle's ops, a max-pooling's gradient reaches each window's maximum whole (candle
/// 0.11's own gradient would be a quarter of it for 2×2 windows), and overlapping windows
/// still pool.
#[test]
fn max_pooling_on_candles_ops_passes_the_whole_gradient() {
    let _turn = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let switch = Kernels::set(false);
    let pixels: Vec<f32> = (0..20).map(|k| ((k * 7) % 20) as f32).collect();
    let x = candle::Var::from_vec(pixels.clone(), (1, 1, 4, 5), &Device::Cpu).unwrap();
    let y = ops::max_pool2d(x.as_tensor(), 2, 2).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    let overlapping = ops::max_pool2d(x.as_tensor(), 3, 1).unwrap();
    drop(switch);
    let g: Vec<f32> = grads
        .get(&x)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    // The two 2×2 windows of each row pair (the fifth column is cropped).
    for (rows, cols) in [(0..2, 0..2), (0..2, 2..4), (2..4, 0..2), (2..4, 2..4)] {
        let at = |r: usize, c: usize| r * 5 + c;
        let window: Vec<usize> = rows
            .flat_map(|r| cols.clone().map(move |c| at(r, c)))
            .collect();
        let max = *window
            .iter()
            .max_by(|&&a, &&b| pixels[a].total_cmp(&pixels[b]))
            .unwrap();
        for &k in &window {
            assert_eq!(g[k], if k == max { 1.0 } else { 0.0 }, "pixel {k}");
        }
    }
    assert!(g[4] == 0.0 && g[9] == 0.0 && g[14] == 0.0 && g[19] == 0.0);
    assert_eq!(overlapping.dims(), &[1, 1, 2, 3]);
}
