//! `InferencePlan`: the compiled evaluation of compressed LeNets equals the network's own,
//! and a network it cannot compile runs unchanged through the network.

mod common;

use candle::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_sbp::compress::{compress, CompressConfig};
use candle_sbp::{models, LogNormalDropoutConfig, Net};
use common::*;

/// Parameters for a new f32 network on the CPU (the builder keeps its `VarMap` alive).
fn f32_vars() -> VarBuilder<'static> {
    VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu)
}

/// A builder of a new f32 network with input `shape`.
fn builder(shape: candle_sbp::NodeShape) -> candle_sbp::NetBuilder<'static> {
    candle_sbp::NetBuilder::new(shape, f32_vars())
}

/// A model with SBP layers, seeded and with about half its units removed, compressed.
fn compressed(
    build: fn(Option<LogNormalDropoutConfig>, VarBuilder) -> candle_sbp::Result<Net>,
) -> (Net, Net) {
    let vb = f32_vars();
    let net = build(Some(LogNormalDropoutConfig::default()), vb).unwrap();
    randomise(&net, 7);
    set_noise_keeps(&net, 7, 0.5);
    let small = compress(&net, &CompressConfig::default()).unwrap().net;
    (net, small)
}

fn assert_plan_matches(net: &Net, batches: &[usize]) {
    let plan = net.inference_plan().unwrap();
    assert!(
        plan.is_compiled(),
        "not compiled: {:?}",
        plan.not_compiled_because()
    );
    for &batch in batches {
        let x = random_input(net, batch, batch as u64);
        let want = net.forward_t(&x, false).unwrap();
        let got = plan.forward(&x).unwrap();
        assert_eq!(got.dims(), want.dims(), "batch {batch}");
        let err = relative_error(&want, &got);
        assert!(err < 1e-5, "batch {batch}: relative error {err}");
        // The Module implementation is the same call.
        let via_module = Module::forward(&plan, &x).unwrap();
        assert_eq!(relative_error(&got, &via_module), 0.0);
    }
}

// Batch 1 (one chunk), odd batches (a short last chunk, every row remainder of the tiles)
// and 600 (chunks capped at 256 rows).
const BATCHES: &[usize] = &[1, 3, 37, 100, 600];

#[test]
fn compressed_lenet_300_100_runs_compiled_with_the_same_outputs() {
    let (_, small) = compressed(models::lenet_300_100);
    assert_plan_matches(&small, BATCHES);
}

#[test]
fn compressed_lenet5_runs_compiled_with_the_same_outputs() {
    let (_, small) = compressed(models::lenet5_caffe);
    assert_plan_matches(&small, BATCHES);
}

#[test]
fn dense_models_without_noise_layers_run_compiled() {
    for build in [models::lenet_500_300, models::lenet5_caffe] {
        let net = build(None, f32_vars()).unwrap();
        net.reset_parameters(3).unwrap();
        assert_plan_matches(&net, &[1, 100]);
        // Its Debug output names shapes; it does not print the packed weights.
        let shown = format!("{:?}", net.inference_plan().unwrap());
        assert!(
            shown.contains("PackedLinear") && shown.len() < 20_000,
            "{}",
            shown.len()
        );
    }
}

#[test]
fn sbp_models_run_compiled_with_noise_and_batch_norms_folded() {
    // Noise layers (about half their units removed) and batch norms with random running
    // statistics; VGG's wider convolutions go through im2col + GEMM, its pooling on its own.
    let (lenet300, _) = compressed(models::lenet_300_100);
    assert_plan_matches(&lenet300, &[1, 37, 100]);
    let (lenet5, _) = compressed(models::lenet5_caffe);
    assert_plan_matches(&lenet5, &[1, 37, 100]);
    let vb = f32_vars();
    let vgg = models::vgg_like(0.25, Some(LogNormalDropoutConfig::default()), vb).unwrap();
    randomise(&vgg, 5);
    set_noise_keeps(&vgg, 5, 0.5);
    assert_plan_matches(&vgg, &[1, 3, 20]);
}

#[test]
fn grouped_convolutions_and_scatters_run_compiled() {
    let mut b = builder(candle_sbp::NodeShape::image(4, 9, 9));
    let x = b.input();
    let grouped = candle_nn::Conv2dConfig {
        groups: 2,
        padding: 1,
        ..Default::default()
    };
    let h = b.conv2d("grouped", x, 6, 3, grouped).unwrap();
    let depthwise = candle_nn::Conv2dConfig {
        groups: 6,
        ..Default::default()
    };
    let h = b.conv2d("depthwise", h, 6, 3, depthwise).unwrap();
    let h = b.relu(h).unwrap();
    let h = b.flatten(h).unwrap();
    let h = b.linear("fc1", h, 5).unwrap();
    // Units 0, 2, 4, 6 and 8 of 9.
    let scatter = candle_sbp::net::Op::Scatter {
        indices: vec![0, 2, 4, 6, 8],
        size: 9,
    };
    let y = b.push("spread", scatter, &[h]).unwrap();
    let net = b.build(y).unwrap();
    net.reset_parameters(8).unwrap();
    assert_plan_matches(&net, &[1, 6]);
}

#[test]
fn masked_networks_run_compiled() {
    // Masks on a convolution (folded into its rows, before the batch norm's shift), on a
    // ReLU, on a pooling, on the flattened features and on a linear layer.
    let vb = f32_vars();
    let mut vgg = models::vgg_like(0.125, None, vb).unwrap();
    randomise(&vgg, 9);
    let kinds = ["conv1", "activation", "max_pool2d", "flatten", "fc1"];
    let nodes: Vec<(String, usize)> = (vgg.spec().nodes.iter().enumerate())
        .map(|(i, n)| (n.name.clone(), vgg.shapes()[i].units()))
        .collect();
    for kind in kinds {
        let (name, units) = nodes
            .iter()
            .find(|(name, _)| name.starts_with(kind))
            .unwrap_or_else(|| panic!("no {kind} node in {nodes:?}"));
        let keep: Vec<bool> = (0..*units).map(|u| u % 3 != 1).collect();
        vgg.set_mask(name, &keep).unwrap();
    }
    assert_plan_matches(&vgg, &[1, 3]);
}

#[test]
fn networks_it_cannot_compile_run_through_the_network() {
    // Another dtype is not compiled.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let double = models::lenet_300_100(None, vb).unwrap();
    let plan = double.inference_plan().unwrap();
    let why = plan.not_compiled_because().unwrap_or_default().to_string();
    assert!(why.contains("F64"), "{why}");
    let x = random_input(&double, 5, 1);
    let want = double.forward_t(&x, false).unwrap();
    assert_eq!(relative_error(&want, &plan.forward(&x).unwrap()), 0.0);
}

#[test]
fn the_plan_keeps_the_weights_it_was_built_with() {
    let (_, small) = compressed(models::lenet_300_100);
    let plan = small.inference_plan().unwrap();
    let x = random_input(&small, 4, 2);
    let before = plan.forward(&x).unwrap();
    small.reset_parameters(99).unwrap();
    assert_eq!(relative_error(&before, &plan.forward(&x).unwrap()), 0.0);
    assert!(relative_error(&before, &small.forward_t(&x, false).unwrap()) > 1e-3);
}

#[test]
fn inputs_of_the_wrong_shape_are_typed_errors() {
    let (_, small) = compressed(models::lenet5_caffe);
    let plan = small.inference_plan().unwrap();
    for dims in [vec![2, 1, 28, 27], vec![0, 1, 28, 28], vec![2, 784]] {
        let x = Tensor::zeros(dims.as_slice(), DType::F32, &Device::Cpu).unwrap();
        match plan.forward(&x) {
            Err(candle_sbp::Error::InputShape { shape, .. }) => assert_eq!(shape, dims),
            other => panic!("{dims:?}: expected an input-shape error, got {other:?}"),
        }
    }
    // Another dtype is converted, as the network itself converts it.
    let x = random_input(&small, 3, 5);
    let want = plan.forward(&x).unwrap();
    let got = plan.forward(&x.to_dtype(DType::F64).unwrap()).unwrap();
    assert_eq!(relative_error(&want, &got), 0.0);
}

#[test]
fn every_compiled_step_matches_the_network() {
    // A channel selection on an image, a padded convolution with its ReLU and pooling,
    // dropout (nothing in evaluation), a linear layer whose ReLU comes after a dropout
    // (so not fused: a ReLU of its own), one without a bias, then every other activation;
    // and a second network with average pooling after a strided convolution.
    let mut b = builder(candle_sbp::NodeShape::image(3, 12, 12));
    let x = b.input();
    let x = (b.push(
        "keep",
        candle_sbp::net::Op::Select {
            indices: vec![0, 2],
        },
        &[x],
    ))
    .unwrap();
    let conv = candle_nn::Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let x = b.conv2d("conv", x, 6, 3, conv).unwrap();
    let x = b.relu(x).unwrap();
    let x = b.max_pool2d(x, 2, 2).unwrap();
    let x = b.dropout(x, 0.3).unwrap();
    let x = b.flatten(x).unwrap();
    let x = b.linear("fc1", x, 21).unwrap();
    let x = b.dropout(x, 0.5).unwrap();
    let x = b.relu(x).unwrap();
    let x = b.linear_no_bias("fc2", x, 5).unwrap();
    // Every other activation, in place after a layer that takes none in.
    use candle_sbp::net::Activation::*;
    let mut x = x;
    for f in [LeakyRelu { slope: 0.1 }, Gelu, Tanh, Sigmoid, Silu] {
        x = b
            .linear(
                &format!("fc_{f:?}").replace([' ', '{', '}', ':', '.'], ""),
                x,
                9,
            )
            .unwrap();
        x = b.activation(x, f).unwrap();
    }
    let net = b.build(x).unwrap();
    net.reset_parameters(11).unwrap();
    assert_plan_matches(&net, &[1, 2, 9, 16, 17, 24, 32, 33, 48, 64]);

    let mut b = builder(candle_sbp::NodeShape::image(2, 15, 15));
    let x = b.input();
    let strided = candle_nn::Conv2dConfig {
        stride: 2,
        ..Default::default()
    };
    let x = b.conv2d("conv", x, 5, 3, strided).unwrap();
    let x = b.avg_pool2d(x, 3, 2).unwrap();
    let x = b.flatten(x).unwrap();
    let x = b.linear("fc", x, 4).unwrap();
    let net = b.build(x).unwrap();
    net.reset_parameters(12).unwrap();
    assert_plan_matches(&net, &[1, 7]);
}

#[test]
fn residual_adds_and_concats_run_compiled() {
    // Two branches that add (one of them the input itself, read twice), then a concat of
    // a branch and the sum, then a sum of a value with itself.
    let mut b = builder(candle_sbp::NodeShape::image(3, 10, 10));
    let x = b.input();
    let same = candle_nn::Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let h = b.conv2d("conv1", x, 3, 3, same).unwrap();
    let h = b.relu(h).unwrap();
    let r = b.add(&[h, x]).unwrap();
    let g = b.conv2d("conv2", r, 4, 3, same).unwrap();
    let c = b.concat(&[g, r]).unwrap();
    let c = b.relu(c).unwrap();
    let d = b.add(&[c, c]).unwrap();
    let y = b.flatten(d).unwrap();
    let y = b.linear("fc", y, 6).unwrap();
    let net = b.build(y).unwrap();
    net.reset_parameters(21).unwrap();
    assert_plan_matches(&net, &[1, 5, 64]);
}
