//! compress() on a LeNet5-Caffe-shaped network, save/load, and the typed errors.

mod common;

use std::time::Instant;

use candle::{DType, Device, Tensor};
use candle_nn::{BatchNormConfig, Conv2dConfig, VarBuilder, VarMap};
use candle_sbp::compress::{compress, CompressConfig, ResidualPolicy};
use candle_sbp::net::{NetBuilder, NodeShape, Op};
use candle_sbp::{Error, LogNormalDropoutConfig, Net};
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// LeNet5-Caffe with noise on both convs' channels, on fc1's 800 inputs and its 500 outputs.
fn lenet5(varmap: &VarMap) -> Net {
    let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
    let sbp = LogNormalDropoutConfig::default();
    let mut b = NetBuilder::new(NodeShape::image(1, 28, 28), vb);
    let x = b.input();
    let x = b
        .conv2d("conv1", x, 20, 5, Conv2dConfig::default())
        .unwrap();
    let x = b.log_normal_dropout("sbp1", x, sbp).unwrap();
    let x = b.relu(x).unwrap();
    let x = b.max_pool2d(x, 2, 2).unwrap();
    let x = b
        .conv2d("conv2", x, 50, 5, Conv2dConfig::default())
        .unwrap();
    let x = b.log_normal_dropout("sbp2", x, sbp).unwrap();
    let x = b.relu(x).unwrap();
    let x = b.max_pool2d(x, 2, 2).unwrap();
    let x = b.flatten(x).unwrap();
    let x = b.log_normal_dropout("sbp3", x, sbp).unwrap();
    let x = b.linear("fc1", x, 500).unwrap();
    let x = b.log_normal_dropout("sbp4", x, sbp).unwrap();
    let x = b.relu(x).unwrap();
    let x = b.linear("fc2", x, 10).unwrap();
    let net = b.build(x).unwrap();
    net.reset_parameters(7).unwrap();
    net
}

/// A seeded batch of MNIST-shaped images in [0, 1).
fn mnist_batch(batch: usize, seed: u64) -> Tensor {
    let mut rng = StdRng::seed_from_u64(seed);
    let values: Vec<f32> = (0..batch * 784).map(|_| rng.random::<f32>()).collect();
    Tensor::from_vec(values, (batch, 1, 28, 28), &Device::Cpu).unwrap()
}

#[test]
fn lenet5_compresses_to_the_kept_units_fast() {
    let varmap = VarMap::new();
    let net = lenet5(&varmap);
    let keeps = set_noise_keeps(&net, 3, 0.85);
    let kept = |name: &str| keeps.iter().find(|(n, _)| n == name).unwrap().1.clone();
    let count = |k: &[bool]| k.iter().filter(|&&v| v).count();

    let start = Instant::now();
    let small = compress(&net, &CompressConfig::default()).unwrap();
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "compress(LeNet5-Caffe): {:.1} ms\n{}",
        seconds * 1e3,
        small.report
    );
    assert!(seconds < 1.0, "compress took {seconds} s");

    // conv1 keeps what sbp1 keeps; conv2 keeps sbp2's channels that some kept feature of
    // sbp3 still reads; fc1 reads sbp3's kept features of those channels.
    let (k1, k2, k3, k4) = (kept("sbp1"), kept("sbp2"), kept("sbp3"), kept("sbp4"));
    let conv2_kept: Vec<usize> = (0..50)
        .filter(|&c| k2[c] && (0..16).any(|p| k3[c * 16 + p]))
        .collect();
    let fc1_inputs = conv2_kept
        .iter()
        .map(|&c| (0..16).filter(|&p| k3[c * 16 + p]).count())
        .sum::<usize>();
    let r = &small.report;
    assert_eq!(r.layer("conv1").unwrap().units_after, count(&k1));
    assert_eq!(r.layer("conv2").unwrap().inputs_after, count(&k1));
    assert_eq!(r.layer("conv2").unwrap().units_after, conv2_kept.len());
    assert_eq!(r.layer("fc1").unwrap().inputs_after, fc1_inputs);
    assert_eq!(r.layer("fc1").unwrap().units_after, count(&k4));
    assert_eq!(r.layer("fc2").unwrap().inputs_after, count(&k4));
    // MACs before: the paper's LeNet5-Caffe figure.
    assert_eq!(
        r.macs_before,
        20 * 24 * 24 * 25 + 50 * 8 * 8 * 20 * 25 + 800 * 500 + 500 * 10
    );
    let (c1, c2) = (count(&k1) as u64, conv2_kept.len() as u64);
    let macs_after = c1 * 24 * 24 * 25
        + c2 * 8 * 8 * c1 * 25
        + fc1_inputs as u64 * count(&k4) as u64
        + count(&k4) as u64 * 10;
    assert_eq!(r.macs_after, macs_after);
    assert!(r.macs_ratio() > 3.0);
    // Every multiplier was folded into a weight: the compressed net is conv/linear/relu/pool.
    assert!(small
        .net
        .spec()
        .nodes
        .iter()
        .all(|n| !matches!(n.op, Op::Scale | Op::LogNormalDropout { .. })));
    assert!(r.notes.is_empty(), "{:?}", r.notes);

    let xs = mnist_batch(16, 1);
    let err = relative_error(
        &net.forward_t(&xs, false).unwrap(),
        &small.net.forward_t(&xs, false).unwrap(),
    );
    assert!(err < 1e-5, "{err}");
    // The JSON report round-trips.
    let back: candle_sbp::report::CompressionReport =
        serde_json::from_str(&small.report.to_json()).unwrap();
    assert_eq!(&back, r);
}

#[test]
fn save_then_load_is_bit_identical_and_readable_by_candle_nn() {
    let varmap = VarMap::new();
    let net = lenet5(&varmap);
    set_noise_keeps(&net, 5, 0.6);
    let small = compress(&net, &CompressConfig::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lenet5-small.safetensors");
    small.net.save(&path).unwrap();
    let loaded = Net::load(&path, &Device::Cpu).unwrap();
    assert_eq!(loaded.spec(), small.net.spec());
    let xs = mnist_batch(8, 2);
    let a = eval_values(&small.net, &xs);
    let b = eval_values(&loaded, &xs);
    assert_eq!(a, b, "bit-identical outputs");
    assert!(loaded.varmap().is_some(), "a loaded net can be fine-tuned");

    // Plain candle-nn code reads the same file by the readable names.
    let vb =
        unsafe { VarBuilder::from_mmaped_safetensors(&[&path], DType::F32, &Device::Cpu).unwrap() };
    let fc2_in = small.report.layer("fc2").unwrap().inputs_after;
    let fc2 = candle_nn::linear(fc2_in, 10, vb.pp("fc2")).unwrap();
    assert_eq!(fc2.weight().dims(), &[10, fc2_in]);

    // The uncompressed network round-trips too, noise parameters and masks included.
    let mut full = net.clone();
    full.set_mask(
        "fc1",
        &[true; 500]
            .iter()
            .enumerate()
            .map(|(i, _)| i % 3 != 0)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let full_path = dir.path().join("lenet5-full.safetensors");
    full.save(&full_path).unwrap();
    let again = Net::load(&full_path, &Device::Cpu).unwrap();
    assert_eq!(again.masks(), full.masks());
    assert_eq!(again.noise_layers().len(), 4);
    let a = eval_values(&full, &xs);
    let b = eval_values(&again, &xs);
    assert_eq!(a, b);
}

#[test]
fn damaged_files_give_typed_errors() {
    let varmap = VarMap::new();
    let net = lenet5(&varmap);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("net.safetensors");
    net.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;

    let write = |name: &str, data: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, data).unwrap();
        p
    };
    let expect_format = |p: &std::path::Path, what: &str| match Net::load(p, &Device::Cpu) {
        Err(Error::Format { path, reason }) => {
            assert_eq!(path, p);
            println!("{what}: {reason}");
        }
        other => panic!("{what}: expected a format error, got {other:?}"),
    };
    // Truncated at many places: in the length, the header, the data.
    for cut in [
        0,
        4,
        8,
        20,
        header_len,
        header_len + 8,
        bytes.len() / 2,
        bytes.len() - 1,
    ] {
        expect_format(
            &write("cut.safetensors", &bytes[..cut]),
            &format!("truncated at {cut}"),
        );
    }
    // One weight byte changed.
    let mut tampered = bytes.clone();
    let last = tampered.len() - 3;
    tampered[last] ^= 0x40;
    expect_format(
        &write("tampered.safetensors", &tampered),
        "a flipped data byte",
    );
    // The architecture edited in the header (a layer made wider) keeps the JSON valid.
    let text = String::from_utf8_lossy(&bytes[8..8 + header_len]).to_string();
    let edited = text.replacen("\\\"out_features\\\":500", "\\\"out_features\\\":501", 1);
    assert_ne!(edited, text, "the architecture is in the header");
    let mut file = (edited.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(edited.as_bytes());
    file.extend_from_slice(&bytes[8 + header_len..]);
    expect_format(
        &write("edited.safetensors", &file),
        "an edited architecture",
    );
    // Random garbage.
    expect_format(&write("garbage.safetensors", &[7u8; 1000]), "garbage");
    // A plain safetensors file without our metadata.
    let plain = dir.path().join("plain.safetensors");
    candle::safetensors::save(
        &std::collections::HashMap::from([(
            "w".to_string(),
            Tensor::ones(3, DType::F32, &Device::Cpu).unwrap(),
        )]),
        &plain,
    )
    .unwrap();
    expect_format(&plain, "a foreign safetensors file");
    // A missing file is an I/O error naming it.
    match Net::load(dir.path().join("missing.safetensors"), &Device::Cpu) {
        Err(Error::Io { path, .. }) => assert!(path.ends_with("missing.safetensors")),
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

#[test]
fn bad_input_names_the_layer() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    // Shapes that do not chain.
    let mut b = NetBuilder::new(NodeShape::image(1, 8, 8), vb.clone());
    let x = b.input();
    match b.linear("fc", x, 4) {
        Err(Error::Graph { layer, reason }) => {
            assert_eq!(layer, "fc");
            assert!(reason.contains("flatten"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let c = b.conv2d("conv", x, 4, 3, Conv2dConfig::default()).unwrap();
    let p = b.conv2d("proj", x, 5, 3, Conv2dConfig::default()).unwrap();
    assert!(matches!(b.add(&[c, p]), Err(Error::Graph { .. })));
    assert!(
        matches!(b.conv2d("big", c, 4, 9, Conv2dConfig::default()), Err(Error::Graph { layer, .. }) if layer == "big")
    );
    assert!(
        matches!(b.conv2d("conv", c, 4, 3, Conv2dConfig::default()), Err(Error::Graph { layer, .. }) if layer == "conv")
    );

    // A mask of the wrong length, and a mask on the output.
    let mut b = NetBuilder::new(NodeShape::features(6), vb.pp("mlp"));
    let x = b.input();
    let h = b.linear("fc1", x, 4).unwrap();
    let y = b.linear("fc2", h, 2).unwrap();
    let mut net = b.build(y).unwrap();
    assert!(
        matches!(net.set_mask("fc1", &[true; 3]), Err(Error::Mask { layer, .. }) if layer == "fc1")
    );
    assert!(matches!(
        net.set_mask("fc2", &[true; 2]),
        Err(Error::Mask { .. })
    ));
    assert!(
        matches!(net.set_mask("nope", &[true; 2]), Err(Error::Graph { layer, .. }) if layer == "nope")
    );
    // An input of the wrong shape.
    let xs = Tensor::zeros((2, 5), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        net.forward_t(&xs, false),
        Err(Error::InputShape { .. })
    ));
    // A mask that empties a layer, without allow_empty.
    net.set_mask("fc1", &[false; 4]).unwrap();
    match compress(&net, &CompressConfig::default()) {
        Err(Error::Graph { layer, .. }) => assert_eq!(layer, "fc1"),
        other => panic!("{other:?}"),
    }

    // A coupling conflict: a grouped (not depthwise) conv ties its channels in groups.
    let mut b = NetBuilder::new(NodeShape::image(4, 6, 6), vb.pp("grouped"));
    let x = b.input();
    let g = b
        .conv2d(
            "gconv",
            x,
            4,
            3,
            Conv2dConfig {
                groups: 2,
                ..Default::default()
            },
        )
        .unwrap();
    let s = b
        .log_normal_dropout("sbp", g, LogNormalDropoutConfig::default())
        .unwrap();
    let f = b.flatten(s).unwrap();
    let y = b.linear("head", f, 2).unwrap();
    let net = b.build(y).unwrap();
    set_noise_keeps(&net, 1, 0.0);
    compress(&net, &CompressConfig::default()).unwrap();
    let (_, layer) = net.noise_layers()[0];
    let mu = Tensor::new(&[0f32, -12., 0., 0.], &Device::Cpu).unwrap();
    let ls = Tensor::new(&[-4f32, 1.5, -4., -4.], &Device::Cpu).unwrap();
    candle::Var::from_tensor(layer.mu())
        .unwrap()
        .set(&mu)
        .unwrap();
    candle::Var::from_tensor(layer.log_sigma())
        .unwrap()
        .set(&ls)
        .unwrap();
    match compress(&net, &CompressConfig::default()) {
        Err(Error::Surgery { layer, reason }) => {
            assert_eq!(layer, "gconv");
            assert!(reason.contains("groups"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // An architecture whose nodes read later nodes, loaded from JSON.
    let bad = r#"{"nodes":[{"name":"input","op":{"op":"input","shape":{"kind":"features","features":3}},"inputs":[]},{"name":"fc","op":{"op":"linear","out_features":2,"bias":true},"inputs":[2]}]}"#;
    assert!(
        matches!(candle_sbp::net::NetSpec::from_json(bad), Err(Error::Graph { layer, .. }) if layer == "fc")
    );
}

#[test]
fn an_all_removed_noise_layer_keeps_its_best_unit_and_says_so() {
    let varmap = VarMap::new();
    let net = lenet5(&varmap);
    set_noise_keeps(&net, 9, 0.5);
    let (_, sbp2) = net.noise_layers()[1];
    let mu: Vec<f32> = (0..50).map(|i| -12.0 + 0.01 * i as f32).collect();
    candle::Var::from_tensor(sbp2.mu())
        .unwrap()
        .set(&Tensor::new(mu, &Device::Cpu).unwrap())
        .unwrap();
    candle::Var::from_tensor(sbp2.log_sigma())
        .unwrap()
        .set(&Tensor::full(1.5f32, 50, &Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(sbp2.num_kept().unwrap(), 0);
    let snr = sbp2.snr().unwrap();
    let best = (0..50).max_by(|&a, &b| snr[a].total_cmp(&snr[b])).unwrap();
    let small = compress(&net, &CompressConfig::default()).unwrap();
    assert_eq!(small.report.layer("conv2").unwrap().units_after, 1);
    assert!(
        small
            .report
            .notes
            .iter()
            .any(|n| n.contains("sbp2") && n.contains(&format!("unit {best}"))),
        "{:?}",
        small.report.notes
    );
    assert!(format!("{}", small.report).contains("note: sbp2"));
}

#[test]
fn residual_intersection_masks_what_the_branches_disagree_on() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let sbp = LogNormalDropoutConfig::default();
    let mut b = NetBuilder::new(NodeShape::image(3, 6, 6), vb);
    let x = b.input();
    let same = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let stem = b.conv2d("stem", x, 4, 3, same).unwrap();
    let stem = b.relu(stem).unwrap();
    let a = b.conv2d("a", stem, 4, 3, same).unwrap();
    let a = b.batch_norm("bn_a", a, BatchNormConfig::default()).unwrap();
    let a = b.log_normal_dropout("sbp_a", a, sbp).unwrap();
    let c = b.conv2d("c", stem, 4, 1, Conv2dConfig::default()).unwrap();
    let c = b.log_normal_dropout("sbp_c", c, sbp).unwrap();
    let s = b.add(&[a, c]).unwrap();
    let s = b.relu(s).unwrap();
    let f = b.flatten(s).unwrap();
    let y = b.linear("head", f, 2).unwrap();
    let net = b.build(y).unwrap();
    randomise(&net, 4);
    let set = |i: usize, keep: [bool; 4]| {
        let (_, l) = net.noise_layers()[i];
        let mu: Vec<f32> = keep.iter().map(|&k| if k { -0.5 } else { -12.0 }).collect();
        let ls: Vec<f32> = keep.iter().map(|&k| if k { -3.0 } else { 1.5 }).collect();
        candle::Var::from_tensor(l.mu())
            .unwrap()
            .set(&Tensor::new(mu, &Device::Cpu).unwrap())
            .unwrap();
        candle::Var::from_tensor(l.log_sigma())
            .unwrap()
            .set(&Tensor::new(ls, &Device::Cpu).unwrap())
            .unwrap();
    };
    set(0, [true, true, false, false]);
    set(1, [true, false, true, false]);
    let xs = random_input(&net, 4, 1);

    let union = compress(&net, &CompressConfig::default()).unwrap();
    assert!(union.derived_masks.is_empty());
    assert_eq!(union.report.layer("a").unwrap().units_after, 2);
    assert_eq!(union.report.layer("c").unwrap().units_after, 2);
    assert_eq!(
        union.report.layer("head").unwrap().inputs_after,
        3 * 36,
        "units 0, 1, 2 survive the sum"
    );
    assert!(
        relative_error(
            &net.forward_t(&xs, false).unwrap(),
            &union.net.forward_t(&xs, false).unwrap()
        ) < 1e-5
    );

    let config = CompressConfig {
        residual: ResidualPolicy::Intersection,
        ..Default::default()
    };
    let inter = compress(&net, &config).unwrap();
    let add = &net.spec().nodes[net.node_index("sbp_c").unwrap() + 1].name;
    assert_eq!(
        inter.derived_masks.get(add),
        Some(&vec![true, false, false, true])
    );
    assert_eq!(inter.report.layer("a").unwrap().units_after, 1);
    assert_eq!(inter.report.layer("c").unwrap().units_after, 1);
    assert_eq!(
        inter.report.layer("head").unwrap().inputs_after,
        36,
        "only unit 0 is kept by both"
    );
    let mut reference = net.clone();
    for (name, keep) in &inter.derived_masks {
        reference.set_mask(name, keep).unwrap();
    }
    assert!(
        relative_error(
            &reference.forward_t(&xs, false).unwrap(),
            &inter.net.forward_t(&xs, false).unwrap()
        ) < 1e-5
    );
}

#[test]
fn coupling_groups_follow_units_through_flatten_adds_and_concats() {
    use candle_sbp::coupling::coupling_groups;
    let varmap = VarMap::new();
    let mut net = lenet5(&varmap);
    let groups = coupling_groups(&net);
    let summary: Vec<(Vec<&str>, usize, bool)> = groups
        .iter()
        .map(|g| {
            (
                g.producers.iter().map(|p| p.node.as_str()).collect(),
                g.units,
                g.prunable,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (vec!["input"], 1, true),
            (vec!["conv1"], 20, true),
            (vec!["conv2"], 50, true),
            (vec!["fc1"], 500, true),
            (vec!["fc2"], 10, false),
        ]
    );
    let conv2 = &groups[2];
    let fc1_cols = conv2
        .slices
        .iter()
        .find(|s| s.node == "fc1" && s.param == "weight")
        .unwrap();
    assert_eq!(fc1_cols.axis, 1);
    assert_eq!(
        fc1_cols.indices[3],
        (48..64).collect::<Vec<_>>(),
        "channel 3 is a 4x4 block of columns"
    );
    let noise: Vec<&str> = conv2.noise.iter().map(|m| m.node.as_str()).collect();
    assert_eq!(noise, ["sbp2", "sbp3"]);
    assert!(conv2
        .slices
        .iter()
        .any(|s| s.node == "conv2" && s.param == "bias" && s.axis == 0));

    // Masking ten units of the conv2 group removes them from conv2, sbp2/sbp3 and fc1.
    let keep: Vec<bool> = (0..50).map(|c| c >= 10).collect();
    net.set_group_mask(conv2, &keep).unwrap();
    assert!(
        net.set_group_mask(&groups[4], &[true; 10]).is_err(),
        "outputs are not prunable"
    );
    assert!(net.set_group_mask(conv2, &[true; 3]).is_err());
    let small = compress(&net, &CompressConfig::default()).unwrap();
    assert_eq!(small.report.layer("conv2").unwrap().units_after, 40);
    assert_eq!(small.report.layer("fc1").unwrap().inputs_after, 640);
    let xs = mnist_batch(4, 0);
    assert!(
        relative_error(
            &net.forward_t(&xs, false).unwrap(),
            &small.net.forward_t(&xs, false).unwrap()
        ) < 1e-5
    );

    // A residual add couples both branches; a concat places each branch at its offset.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let mut b = NetBuilder::new(NodeShape::image(2, 5, 5), vb);
    let x = b.input();
    let same = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let a = b.conv2d("a", x, 3, 3, same).unwrap();
    let a = b.batch_norm("bn", a, BatchNormConfig::default()).unwrap();
    let c = b.conv2d("c", x, 3, 1, Conv2dConfig::default()).unwrap();
    let s = b.add(&[a, c]).unwrap();
    let d = b.conv2d("d", x, 2, 1, Conv2dConfig::default()).unwrap();
    let cat = b.concat(&[s, d]).unwrap();
    let y = b
        .conv2d("head", cat, 1, 1, Conv2dConfig::default())
        .unwrap();
    let net = b.build(y).unwrap();
    let groups = coupling_groups(&net);
    let residual = groups.iter().find(|g| g.producers.len() == 2).unwrap();
    assert_eq!(
        residual
            .producers
            .iter()
            .map(|p| p.node.as_str())
            .collect::<Vec<_>>(),
        ["a", "c"]
    );
    let head = |g: &candle_sbp::coupling::CouplingGroup| {
        g.slices
            .iter()
            .find(|s| s.node == "head")
            .unwrap()
            .indices
            .clone()
    };
    assert_eq!(head(residual), vec![vec![0], vec![1], vec![2]]);
    assert!(residual
        .slices
        .iter()
        .any(|s| s.node == "bn" && s.param == "running_var"));
    let d = groups.iter().find(|g| g.producers[0].node == "d").unwrap();
    assert_eq!(
        head(d),
        vec![vec![3], vec![4]],
        "after the concat, d's units sit at offset 3"
    );
}
