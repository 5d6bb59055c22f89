//! The CPU kernels of `candle_sbp::ops` against candle's own ops: values and every gradient
//! (input, weight, bias, scale) on random shapes, strides, paddings and dilations, in f64
//! (to 1e-9) and f32 (to 1e-5), and the gradients that nothing needs are not computed.

mod common;

use candle::{DType, Device, Tensor, Var};
use candle_sbp::ops;
use common::relative_error;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random(rng: &mut StdRng, dims: &[usize], dtype: DType) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn tolerance(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        1e-9
    } else {
        1e-5
    }
}

/// Gradients of reductions (a weight's or a scale's, summed over the batch) cancel: in f32
/// the two sums' rounding then reaches a few 1e-5 of the largest value, whatever the order.
fn gradient_tolerance(dtype: DType) -> f64 {
    if dtype == DType::F64 {
        1e-9
    } else {
        1e-4
    }
}

/// A random `(batch, units, inner…)` input variable of the proptests' dtype, with the
/// generator that drew it (for the op's other operands) and its dims.
fn unit_input(
    seed: u64,
    (batch, units, inner): (usize, usize, &[usize]),
    f64_: bool,
) -> (DType, StdRng, Vec<usize>, Var) {
    let dtype = if f64_ { DType::F64 } else { DType::F32 };
    let mut rng = StdRng::seed_from_u64(seed);
    let mut dims = vec![batch, units];
    dims.extend(inner);
    let x = Var::from_tensor(&random(&mut rng, &dims, dtype)).unwrap();
    (dtype, rng, dims, x)
}

/// `Σ y·r` for a fixed random `r`: a loss whose gradient with respect to `y` is `r`.
fn probe(y: &Tensor, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let r = random(&mut rng, y.dims(), y.dtype());
    (y * r).unwrap().sum_all().unwrap()
}

/// Checks values and the gradients of every variable in `vars` (which both closures read).
fn check(
    vars: &[&Var],
    ours: impl Fn() -> Tensor,
    reference: impl Fn() -> Tensor,
    dtype: DType,
    what: &str,
) {
    let (y, r) = (ours(), reference());
    assert_eq!(y.dims(), r.dims(), "{what}: output shape");
    let err = relative_error(&r, &y);
    assert!(err < tolerance(dtype), "{what}: values differ by {err:e}");
    let g_ours = probe(&y, 7).backward().unwrap();
    let g_ref = probe(&r, 7).backward().unwrap();
    for (k, v) in vars.iter().enumerate() {
        let a = g_ref.get(v.as_tensor()).expect("reference gradient");
        let b = g_ours
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{what}: no gradient for variable {k}"));
        let err = relative_error(a, b);
        assert!(
            err < gradient_tolerance(dtype),
            "{what}: gradient {k} differs by {err:e}"
        );
    }
}

/// `scale_units` against `broadcast_mul`, values and gradients, for an input
/// `(batch, units, inner…)` and factors shared by the batch or per example.
fn check_scale(seed: u64, shape: (usize, usize, &[usize]), per_example: bool, f64_: bool) {
    let (dtype, mut rng, dims, x) = unit_input(seed, shape, f64_);
    let (batch, units) = (dims[0], dims[1]);
    let s_dims = if per_example {
        vec![batch, units]
    } else {
        vec![units]
    };
    let s = Var::from_tensor(&random(&mut rng, &s_dims, dtype)).unwrap();
    let mut b_dims = vec![1usize; dims.len()];
    b_dims[1] = units;
    if per_example {
        b_dims[0] = batch;
    }
    let ours = || ops::scale_units(x.as_tensor(), s.as_tensor()).unwrap();
    let reference = || {
        let s = s.as_tensor().reshape(b_dims.as_slice()).unwrap();
        x.as_tensor().broadcast_mul(&s).unwrap()
    };
    let what = format!("scale {dims:?} by {s_dims:?}");
    check(&[&x, &s], ours, reference, dtype, &what);
}

proptest! {
    // A fixed seed (as in compress_equivalence): the cases are the same on every run.
    #![proptest_config(ProptestConfig {
        cases: 48,
        rng_seed: proptest::test_runner::RngSeed::Fixed(2017),
        ..ProptestConfig::default()
    })]

    #[test]
    fn conv2d_matches_candle(
        seed in 0u64..1_000_000,
        batch in 1usize..5,
        c_in in 1usize..5,
        c_out in 1usize..6,
        size in 3usize..10,
        k in 1usize..4,
        stride in 1usize..3,
        padding in 0usize..3,
        dilation in 1usize..3,
        bias in any::<bool>(),
        relu in any::<bool>(),
        f64_ in any::<bool>(),
    ) {
        let span = dilation * (k - 1) + 1;
        prop_assume!(size + 2 * padding >= span);
        let dtype = if f64_ { DType::F64 } else { DType::F32 };
        let mut rng = StdRng::seed_from_u64(seed);
        // candle's own backward pads both axes as the height needs, so its gradients are
        // only right for square inputs once the stride is above 1.
        let width = if stride == 1 { size + 1 } else { size };
        let x = Var::from_tensor(&random(&mut rng, &[batch, c_in, size, width], dtype)).unwrap();
        let w = Var::from_tensor(&random(&mut rng, &[c_out, c_in, k, k], dtype)).unwrap();
        let b = Var::from_tensor(&random(&mut rng, &[c_out], dtype)).unwrap();
        let what = format!("conv2d {batch}×{c_in}×{size} → {c_out}, k{k} s{stride} p{padding} d{dilation} relu {relu}");
        let bias_of = |b: &Var| bias.then(|| b.as_tensor().clone());
        let conv = if relu { ops::conv2d_relu } else { ops::conv2d };
        let ours = || conv(x.as_tensor(), w.as_tensor(), bias_of(&b).as_ref(), padding, stride, dilation, 1).unwrap();
        let reference = || {
            let y = x.as_tensor().conv2d(w.as_tensor(), padding, stride, dilation, 1).unwrap();
            let y = match bias_of(&b) {
                Some(b) => y.broadcast_add(&b.reshape((1, c_out, 1, 1)).unwrap()).unwrap(),
                None => y,
            };
            if relu { y.relu().unwrap() } else { y }
        };
        let mut vars = vec![&x, &w];
        if bias {
            vars.push(&b);
        }
        check(&vars, ours, reference, dtype, &what);
    }

    #[test]
    fn linear_matches_candle(
        seed in 0u64..1_000_000,
        batch in 1usize..9,
        inputs in 1usize..40,
        outputs in 1usize..30,
        bias in any::<bool>(),
        relu in any::<bool>(),
        f64_ in any::<bool>(),
    ) {
        let dtype = if f64_ { DType::F64 } else { DType::F32 };
        let mut rng = StdRng::seed_from_u64(seed);
        let x = Var::from_tensor(&random(&mut rng, &[batch, inputs], dtype)).unwrap();
        let w = Var::from_tensor(&random(&mut rng, &[outputs, inputs], dtype)).unwrap();
        let b = Var::from_tensor(&random(&mut rng, &[outputs], dtype)).unwrap();
        let bias_of = |b: &Var| bias.then(|| b.as_tensor().clone());
        let linear = if relu { ops::linear_relu } else { ops::linear };
        let ours = || linear(x.as_tensor(), w.as_tensor(), bias_of(&b).as_ref()).unwrap();
        let reference = || {
            let l = candle_nn::Linear::new(w.as_tensor().clone(), bias_of(&b));
            let y = candle::Module::forward(&l, x.as_tensor()).unwrap();
            if relu { y.relu().unwrap() } else { y }
        };
        let mut vars = vec![&x, &w];
        if bias {
            vars.push(&b);
        }
        let what = format!("linear {batch}×{inputs} → {outputs} relu {relu}");
        check(&vars, ours, reference, dtype, &what);
    }

    #[test]
    fn max_pool_matches_candle(
        seed in 0u64..1_000_000,
        batch in 1usize..4,
        channels in 1usize..5,
        size in 2usize..12,
        kernel in 1usize..4,
        f64_ in any::<bool>(),
    ) {
        prop_assume!(size >= kernel);
        let dtype = if f64_ { DType::F64 } else { DType::F32 };
        let mut rng = StdRng::seed_from_u64(seed);
        // Random values have no ties, where the two ops route gradients differently.
        let x = Var::from_tensor(&random(&mut rng, &[batch, channels, size, size + 2], dtype)).unwrap();
        // candle 0.11's own max-pool gradient is scaled by 1/kernel² (it multiplies by the
        // share of maxima in the window where it means to divide), so the reference is a
        // reshape and two max reductions over each window of the cropped input.
        let (oh, ow) = (size / kernel, (size + 2) / kernel);
        let ours = || ops::max_pool2d(x.as_tensor(), kernel, kernel).unwrap();
        let reference = || {
            let cropped = x.as_tensor().narrow(2, 0, oh * kernel).unwrap().narrow(3, 0, ow * kernel).unwrap();
            cropped
                .contiguous().unwrap()
                .reshape((batch, channels, oh, kernel, ow, kernel)).unwrap()
                .max(5).unwrap()
                .max(3).unwrap()
        };
        check(&[&x], ours, reference, dtype, &format!("max-pool {size} k{kernel}"));
    }

    #[test]
    fn scale_units_matches_broadcast_mul(
        seed in 0u64..1_000_000,
        batch in 1usize..6,
        units in 1usize..9,
        inner in prop::sample::select(vec![vec![], vec![3], vec![2, 5]]),
        per_example in any::<bool>(),
        f64_ in any::<bool>(),
    ) {
        check_scale(seed, (batch, units, &inner), per_example, f64_);
    }

    #[test]
    fn add_bias_matches_broadcast_add(
        seed in 0u64..1_000_000,
        rows in 1usize..7,
        cols in 1usize..12,
        f64_ in any::<bool>(),
    ) {
        let (dtype, mut rng, dims, y) = unit_input(seed, (rows, cols, &[]), f64_);
        let b = Var::from_tensor(&random(&mut rng, &[cols], dtype)).unwrap();
        let ours = || ops::add_bias(y.as_tensor(), b.as_tensor()).unwrap();
        let reference = || y.as_tensor().broadcast_add(b.as_tensor()).unwrap();
        check(&[&y, &b], ours, reference, dtype, &format!("bias on {dims:?}"));
    }

    #[test]
    fn select_units_matches_index_select(
        seed in 0u64..1_000_000,
        batch in 1usize..6,
        units in 1usize..12,
        inner in prop::sample::select(vec![vec![], vec![3], vec![2, 5]]),
        f64_ in any::<bool>(),
    ) {
        let (dtype, mut rng, dims, x) = unit_input(seed, (batch, units, &inner), f64_);
        // Any order, repeats allowed, as index_select.
        let picks: Vec<usize> = (0..rng.random_range(1..=units + 2)).map(|_| rng.random_range(0..units)).collect();
        let idx = Tensor::from_vec(picks.iter().map(|&j| j as u32).collect::<Vec<_>>(), picks.len(), &Device::Cpu).unwrap();
        let ours = || ops::select_units(x.as_tensor(), &picks, &idx).unwrap();
        let reference = || x.as_tensor().index_select(&idx, 1).unwrap();
        check(&[&x], ours, reference, dtype, &format!("select {picks:?} of {dims:?}"));
    }
}

/// Inputs large enough for the kernels' parallel paths (the proptests' small shapes run on
/// the calling thread): per-unit scaling of feature maps and of vectors, shared and per
/// example, against candle's `broadcast_mul`.
#[test]
fn large_inputs_take_the_parallel_paths_and_match_candle() {
    for (dims, per_example) in [
        (vec![64usize, 32, 8, 8], false),
        (vec![64, 32, 8, 8], true),
        (vec![300, 500], false),
        (vec![300, 500], true),
    ] {
        check_scale(5, (dims[0], dims[1], &dims[2..]), per_example, false);
    }
}

/// Overlapping windows (kernel 3, stride 2) against a direct maximum over each window, and
/// a NaN anywhere in a window propagates to its output, on both pooling paths.
#[test]
fn max_pool_overlapping_windows_and_nan() {
    let mut rng = StdRng::seed_from_u64(12);
    let (h, w) = (9usize, 11usize);
    let values: Vec<f64> = (0..h * w).map(|_| rng.random::<f64>()).collect();
    let x = Tensor::from_vec(values.clone(), (1, 1, h, w), &Device::Cpu).unwrap();
    let y = ops::max_pool2d(&x, 3, 2).unwrap();
    let (oh, ow) = ((h - 3) / 2 + 1, (w - 3) / 2 + 1);
    assert_eq!(y.dims(), [1, 1, oh, ow]);
    let got = y.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    for oy in 0..oh {
        for ox in 0..ow {
            let mut m = f64::NEG_INFINITY;
            for ky in 0..3 {
                for kx in 0..3 {
                    m = m.max(values[(2 * oy + ky) * w + 2 * ox + kx]);
                }
            }
            assert_eq!(got[oy * ow + ox], m, "window ({oy}, {ox})");
        }
    }
    for (kernel, stride) in [(2, 2), (3, 2)] {
        let mut with_nan = values.clone();
        with_nan[w + 1] = f64::NAN; // row 1, column 1: inside window (0, 0) either way
        let x = Tensor::from_vec(with_nan, (1, 1, h, w), &Device::Cpu).unwrap();
        let y = ops::max_pool2d(&x, kernel, stride).unwrap();
        let first = y.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0];
        assert!(first.is_nan(), "k{kernel} s{stride}: NaN lost, got {first}");
    }
}

/// The image fed to the first layer is no variable: its gradient is neither returned nor
/// computed, while the weights' gradients stay exact.
#[test]
fn gradients_nothing_needs_are_skipped() {
    let mut rng = StdRng::seed_from_u64(3);
    let image = random(&mut rng, &[4, 1, 12, 12], DType::F64);
    let w = Var::from_tensor(&random(&mut rng, &[6, 1, 5, 5], DType::F64)).unwrap();
    let y = ops::conv2d(&image, w.as_tensor(), None, 0, 1, 1, 1).unwrap();
    let grads = probe(&y, 1).backward().unwrap();
    assert!(grads.get(&image).is_none());
    let r = image.conv2d(w.as_tensor(), 0, 1, 1, 1).unwrap();
    let reference = probe(&r, 1).backward().unwrap();
    let err = relative_error(
        reference.get(w.as_tensor()).unwrap(),
        grads.get(w.as_tensor()).unwrap(),
    );
    assert!(err < 1e-12, "weight gradient differs by {err:e}");

    let x = random(&mut rng, &[3, 10], DType::F64);
    let lw = Var::from_tensor(&random(&mut rng, &[4, 10], DType::F64)).unwrap();
    let grads = probe(&ops::linear(&x, lw.as_tensor(), None).unwrap(), 2)
        .backward()
        .unwrap();
    assert!(grads.get(&x).is_none());
    assert!(grads.get(lw.as_tensor()).is_some());
}

/// Shapes the kernels cannot take are typed errors, as candle's own ops give.
#[test]
fn bad_shapes_are_errors() {
    let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
    let idx = Tensor::new(&[1u32, 4], &Device::Cpu).unwrap();
    assert!(
        ops::select_units(&x, &[1, 4], &idx).is_err(),
        "index 4 of 4 units"
    );
    let x = Tensor::zeros((2, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((5, 2, 3, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(
        ops::conv2d(&x, &w, None, 0, 1, 1, 1).is_err(),
        "channel mismatch"
    );
    let w = Tensor::zeros((5, 3, 7, 7), DType::F32, &Device::Cpu).unwrap();
    assert!(
        ops::conv2d(&x, &w, None, 0, 1, 1, 1).is_err(),
        "kernel larger than input"
    );
    let w = Tensor::zeros((5, 3, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let b = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    assert!(
        ops::conv2d(&x, &w, Some(&b), 0, 1, 1, 1).is_err(),
        "bias length"
    );
    let s = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    assert!(ops::scale_units(&x, &s).is_err(), "scale length");
    let v = Tensor::zeros((2, 7), DType::F32, &Device::Cpu).unwrap();
    let lw = Tensor::zeros((3, 6), DType::F32, &Device::Cpu).unwrap();
    assert!(ops::linear(&v, &lw, None).is_err(), "linear input width");
    assert!(
        ops::max_pool2d(&x, 5, 5).is_err(),
        "pool window larger than input"
    );
}

/// A convolution, its ReLU and a max-pooling in one op (fused where the direct kernel runs:
/// f32, stride 1, 2×2 pooling) give the values and gradients of our three ops one by one,
/// odd sizes (a dropped last row and column), padding and other poolings included.
#[test]
fn fused_convolution_and_pooling_match_the_ops_one_by_one() {
    let cases = [
        // batch, c_in, h, w, c_out, k, padding, relu, (pool kernel, pool stride), dtype
        (2, 3, 12, 13, 11, 5, 0, false, (2, 2), DType::F32),
        (3, 1, 28, 28, 6, 5, 0, true, (2, 2), DType::F32),
        (1, 2, 9, 17, 5, 3, 1, true, (2, 2), DType::F32),
        (2, 2, 10, 10, 3, 3, 0, true, (3, 2), DType::F32),
        (2, 2, 12, 12, 3, 3, 0, true, (2, 2), DType::F64),
    ];
    for (seed, (batch, c_in, h, w, c_out, k, padding, relu, pool, dtype)) in
        cases.into_iter().enumerate()
    {
        let mut rng = StdRng::seed_from_u64(seed as u64);
        let x = Var::from_tensor(&random(&mut rng, &[batch, c_in, h, w], dtype)).unwrap();
        let wt = Var::from_tensor(&random(&mut rng, &[c_out, c_in, k, k], dtype)).unwrap();
        let b = Var::from_tensor(&random(&mut rng, &[c_out], dtype)).unwrap();
        let (x_, w_, b_) = (x.as_tensor(), wt.as_tensor(), b.as_tensor());
        let params = (padding, 1, 1, 1);
        let ours = || ops::conv2d_max_pool2d(x_, w_, Some(b_), params, relu, pool).unwrap();
        // The ops one by one, each checked against candle's above (candle 0.11's own
        // max-pooling gradient is scaled by 1/kernel², so it cannot be the reference here).
        let reference = || {
            let conv = if relu { ops::conv2d_relu } else { ops::conv2d };
            let y = conv(x_, w_, Some(b_), padding, 1, 1, 1).unwrap();
            ops::max_pool2d(&y, pool.0, pool.1).unwrap()
        };
        let what = format!("conv {batch}×{c_in}×{h}×{w} → {c_out} k{k} p{padding}, relu {relu}, pool {pool:?}, {dtype:?}");
        check(&[&x, &wt, &b], ours, reference, dtype, &what);
    }
}

/// Grouped convolutions take candle's own path and give its values.
#[test]
fn grouped_convolutions_fall_back_to_candle() {
    let mut rng = StdRng::seed_from_u64(5);
    let x = random(&mut rng, &[2, 4, 6, 6], DType::F32);
    let w = random(&mut rng, &[4, 1, 3, 3], DType::F32);
    let ours = ops::conv2d(&x, &w, None, 1, 1, 1, 4).unwrap();
    let reference = x.conv2d(&w, 1, 1, 1, 4).unwrap();
    assert_eq!(relative_error(&reference, &ours), 0.0);
}

/// Input noise on a linear layer without a bias (100 outputs: the backward of the fused
/// noise-linear op runs in five blocks of rows, the last one partial) with the ReLU after
/// it taken into that op, a linear layer and its ReLU, then a noise layer and a linear
/// layer small enough (48 weights for 6 × 12 activations) that the noise folds into its
/// input columns.
fn small_noisy_mlp(
    config: Option<candle_sbp::LogNormalDropoutConfig>,
    vb: candle_nn::VarBuilder,
) -> candle_sbp::Result<candle_sbp::Net> {
    let mut b = candle_sbp::NetBuilder::new(candle_sbp::NodeShape::image(1, 28, 28), vb);
    let mut x = b.flatten(b.input())?;
    if let Some(config) = config {
        x = b.log_normal_dropout("sbp_in", x, config)?;
    }
    x = b.linear_no_bias("fc1", x, 100)?;
    x = b.relu(x)?;
    x = b.linear("fc_mid", x, 12)?;
    x = b.relu(x)?;
    if let Some(config) = config {
        x = b.log_normal_dropout("sbp1", x, config)?;
    }
    let x = b.linear("fc2", x, 4)?;
    b.build(x)
}

/// Fused ops: in training a noise layer on the input of a linear layer (no gradient for
/// the input, `dθ` from the weight gradient, the bias, a ReLU and on the MLP the noise
/// layer on its outputs in the same op), a noise
/// layer folded into the input columns of a small linear layer after it, and noise layers
/// next to a ReLU (one pass); in training and evaluation a convolution or linear layer and
/// the ReLU after it. Tapping every node keeps all layers apart. Same draws, same loss,
/// same gradients for every parameter, on the MLP (input noise, linear → ReLU → noise), on
/// a small MLP (input noise before a linear layer without a bias, a noise layer before a
/// small one) and on LeNet5 (conv → noise → ReLU, flatten → noise → linear), with and
/// without noise layers; same outputs in evaluation.
#[test]
fn fused_layers_match_the_unfused_layers() {
    type Build = fn(
        Option<candle_sbp::LogNormalDropoutConfig>,
        candle_nn::VarBuilder,
    ) -> candle_sbp::Result<candle_sbp::Net>;
    let models: [(&str, Build); 3] = [
        ("model A", candle_sbp::models::dropnet_model_a),
        ("small noisy MLP", small_noisy_mlp),
        ("lenet5", candle_sbp::models::lenet5_caffe),
    ];
    let cases = models
        .into_iter()
        .flat_map(|m| [DType::F64, DType::F32].map(|d| (m, d)))
        .flat_map(|c| [true, false].map(|sbp| (c, sbp)));
    for (((model, build), dtype), sbp) in cases {
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
        let config = candle_sbp::LogNormalDropoutConfig {
            mu_init: 0.3,
            log_sigma_init: -1.0,
            ..Default::default()
        };
        let net = build(sbp.then_some(config), vb).unwrap();
        let model = format!("{model} (noise layers: {sbp})");
        net.reset_parameters(4).unwrap();
        let every_node: Vec<usize> = (0..net.spec().nodes.len()).collect();
        let mut rng = StdRng::seed_from_u64(9);
        let x = random(&mut rng, &[6, 1, 28, 28], dtype);
        let grads = |taps: &[usize]| {
            net.reseed(11);
            let (y, _) = net.forward_with(&x, true, taps).unwrap();
            let loss = probe(&y, 3);
            let value = loss
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            (value, loss.backward().unwrap())
        };
        let (fused_loss, fused) = grads(&[]);
        let (plain_loss, plain) = grads(&every_node);
        let tol = gradient_tolerance(dtype);
        let eval = |taps: &[usize]| net.forward_with(&x, false, taps).unwrap().0;
        let err = relative_error(&eval(&[]), &eval(&every_node));
        assert!(
            err < tol,
            "{model} {dtype:?}: evaluation differs by {err:e}"
        );
        assert!(
            (fused_loss - plain_loss).abs() <= tol * plain_loss.abs().max(1.0),
            "{model} {dtype:?}: loss {fused_loss} against {plain_loss}"
        );
        for (name, p) in net.named_params() {
            let (Some(a), Some(b)) = (plain.get(&p), fused.get(&p)) else {
                panic!("{model} {dtype:?}: {name} has a gradient on one path only");
            };
            let err = relative_error(a, b);
            assert!(
                err < tol,
                "{model} {dtype:?}: gradient of {name} differs by {err:e}"
            );
        }
    }
}

/// Average pooling: candle's values, and a gradient that gives each window's `1/k²` share
/// to its values and nothing to the rows and columns cropped off, also where the windows
/// do not tile the input (candle 0.11's own gradient there goes to the wrong rows).
#[test]
fn avg_pool_gradient_reaches_each_window() {
    let mut rng = StdRng::seed_from_u64(5);
    for (h, w, k) in [(4, 6, 2), (5, 5, 2), (7, 9, 3), (6, 6, 3)] {
        let x = Var::from_tensor(&random(&mut rng, &[2, 3, h, w], DType::F64)).unwrap();
        let y = ops::avg_pool2d(x.as_tensor(), k, k).unwrap();
        let reference = x
            .as_tensor()
            .avg_pool2d_with_stride((k, k), (k, k))
            .unwrap();
        assert!(
            relative_error(&reference, &y) < 1e-15,
            "{h}x{w} k{k}: values"
        );
        let r = random(&mut rng, y.dims(), DType::F64);
        let all = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let grad = all.get(&x).unwrap().flatten_all().unwrap();
        let grad = grad.to_vec1::<f64>().unwrap();
        let r = r.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let (oh, ow) = (h / k, w / k);
        for plane in 0..6 {
            for i in 0..h {
                for j in 0..w {
                    let want = if i < oh * k && j < ow * k {
                        r[plane * oh * ow + (i / k) * ow + j / k] / (k * k) as f64
                    } else {
                        0.0
                    };
                    let got = grad[plane * h * w + i * w + j];
                    assert!(
                        (got - want).abs() < 1e-15,
                        "{h}x{w} k{k} ({plane}, {i}, {j}): {got} against {want}"
                    );
                }
            }
        }
    }
}

/// A noise layer whose draw underflows to 0 in f32 (`a = -120`, `θ ≈ e^-110`) stays out of
/// the input layer's fused op, whose backward divides by `θ`: the gradients stay finite
/// and equal the unfused layers'.
#[test]
fn output_noise_that_underflows_is_not_divided_back() {
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let config = candle_sbp::LogNormalDropoutConfig {
        a: -120.0,
        mu_init: -110.0,
        log_sigma_init: -1.0,
        mu_clamp: (-120.0, 5.0),
        ..Default::default()
    };
    let net = candle_sbp::models::dropnet_model_a(Some(config), vb).unwrap();
    net.reset_parameters(4).unwrap();
    let every_node: Vec<usize> = (0..net.spec().nodes.len()).collect();
    let x = random(&mut StdRng::seed_from_u64(9), &[6, 1, 28, 28], DType::F32);
    let grads = |taps: &[usize]| {
        net.reseed(11);
        let (y, _) = net.forward_with(&x, true, taps).unwrap();
        probe(&y, 3).backward().unwrap()
    };
    let (fused, plain) = (grads(&[]), grads(&every_node));
    for (name, p) in net.named_params() {
        let (a, b) = (fused.get(&p).unwrap(), plain.get(&p).unwrap());
        let values = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(values.iter().all(|v| v.is_finite()), "{name}: {values:?}");
        let err = relative_error(a, b);
        assert!(
            err < gradient_tolerance(DType::F32),
            "{name} differs by {err:e}"
        );
    }
}

/// The fused cross-entropy gives candle-nn's value and gradient; a label out of range is an
/// error naming it.
#[test]
fn cross_entropy_matches_candle_nn() {
    for (seed, dtype) in [(1u64, DType::F64), (2, DType::F32), (3, DType::F64)] {
        let mut rng = StdRng::seed_from_u64(seed);
        let (n, c) = (7, 5);
        let z = Var::from_tensor(&(random(&mut rng, &[n, c], dtype) * 6.0).unwrap()).unwrap();
        let labels: Vec<u32> = (0..n).map(|_| rng.random_range(0..c as u32)).collect();
        let labels = Tensor::new(labels.as_slice(), &Device::Cpu).unwrap();
        check(
            &[&z],
            || ops::cross_entropy(z.as_tensor(), &labels).unwrap(),
            || candle_nn::loss::cross_entropy(z.as_tensor(), &labels).unwrap(),
            dtype,
            &format!("cross-entropy {dtype:?}"),
        );
    }
    let z = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let bad = Tensor::new(&[1u32, 3], &Device::Cpu).unwrap();
    let err = ops::cross_entropy(&z, &bad).unwrap_err().to_string();
    assert!(err.contains("label 3 at index 1"), "{err}");
}

/// The kernels share candle's thread pool, which serialises its callers: several threads
/// training at once (as `cargo test` does) must neither deadlock nor see each other's
/// work. Each thread's convolution, linear layer and their gradients, on inputs large
/// enough for the parallel paths, equal the same computation run alone, bit for bit.
#[test]
fn kernels_called_from_several_threads_at_once_agree_with_one() {
    let run = |seed: u64| -> Vec<Vec<f32>> {
        let mut rng = StdRng::seed_from_u64(seed);
        let x = random(&mut rng, &[32, 3, 20, 20], DType::F32);
        let w = Var::from_tensor(&random(&mut rng, &[16, 3, 5, 5], DType::F32)).unwrap();
        let fc = Var::from_tensor(&random(&mut rng, &[64, 16 * 16 * 16], DType::F32)).unwrap();
        let y = ops::conv2d(&x, w.as_tensor(), None, 0, 1, 1, 1).unwrap();
        let h = ops::linear(&y.flatten_from(1).unwrap(), fc.as_tensor(), None).unwrap();
        let grads = probe(&h, seed).backward().unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        vec![
            flat(&h),
            flat(grads.get(w.as_tensor()).unwrap()),
            flat(grads.get(fc.as_tensor()).unwrap()),
        ]
    };
    let alone: Vec<_> = (0..4).map(run).collect();
    let together: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4).map(|k| s.spawn(move || run(k))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(alone, together);
}
