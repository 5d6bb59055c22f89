//! Property test: for random networks and random masks, the compressed network's eval
//! output equals the original's, and its layers have the kept sizes.

mod common;

use candle::DType;
use candle_sbp::compress::{compress, CompressConfig, ResidualPolicy};
use candle_sbp::net::Op;
use common::*;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn check(seed: u64, dtype: DType, tolerance: f64) -> Result<(), TestCaseError> {
    let mut g = random_net(seed, dtype);
    let mut rng = StdRng::seed_from_u64(seed ^ 0xbeef);
    let p_remove = [0.0, 0.3, 0.6, 0.97][rng.random_range(0..4)];
    let noise_keeps = set_noise_keeps(&g.net, seed, p_remove);
    // Masks a pruning criterion would set, on some layers' outputs.
    let mut user_masks = Vec::new();
    let layers: Vec<(String, usize)> = g
        .net
        .spec()
        .nodes
        .iter()
        .enumerate()
        .take(g.net.spec().nodes.len() - 1)
        .filter(|(_, n)| matches!(n.op, Op::Conv2d { groups: 1, .. } | Op::Linear { .. }))
        .map(|(i, n)| (n.name.clone(), g.net.shapes()[i].units()))
        .collect();
    for (name, units) in layers {
        if rng.random_bool(0.3) {
            let keep = random_keep(&mut rng, units, p_remove);
            g.net.set_mask(&name, &keep).unwrap();
            user_masks.push((name, keep));
        }
    }
    let residual = if rng.random_bool(0.5) {
        ResidualPolicy::Union
    } else {
        ResidualPolicy::Intersection
    };
    let config = CompressConfig {
        residual,
        ..Default::default()
    };
    // Random masks may disagree so much that a layer is left with nothing (two masks in a
    // row with disjoint keeps, a residual intersection of disjoint branches). By default that
    // is a typed error naming the node; with `allow_empty` the rest must still be exact.
    let (small, config) = match compress(&g.net, &config) {
        Err(candle_sbp::Error::Graph { reason, .. })
            if reason.contains("keeps no unit") || reason.contains("removes every unit") =>
        {
            let config = CompressConfig {
                allow_empty: true,
                ..config
            };
            match compress(&g.net, &config) {
                Err(candle_sbp::Error::Graph { reason, .. })
                    if reason.contains("every output of the network is constant") =>
                {
                    return Ok(())
                }
                other => (other, config),
            }
        }
        // A documented limit: a padded conv fed only by nonzero constants.
        Err(candle_sbp::Error::Graph { reason, .. }) if reason.contains("zero padding makes") => {
            return Ok(())
        }
        other => (other, config),
    };
    let small = small.map_err(|e| {
        TestCaseError::fail(format!(
            "seed {seed} ({residual:?}, p_remove {p_remove}, {config:?}): {e}"
        ))
    })?;
    let mut reference = g.net.clone();
    for (name, keep) in &small.derived_masks {
        reference.set_mask(name, keep).unwrap();
    }
    prop_assert!(
        residual == ResidualPolicy::Intersection || small.derived_masks.is_empty(),
        "union never derives masks"
    );
    let xs = random_input(&g.net, 5, seed);
    let want = reference.forward_t(&xs, false).unwrap();
    let got = small.net.forward_t(&xs, false).unwrap();
    let err = relative_error(&want, &got);
    prop_assert!(
        err <= tolerance,
        "seed {seed}: relative error {err:e} > {tolerance:e}\n{:#?}\n{}",
        g.net
            .spec()
            .nodes
            .iter()
            .map(|n| format!("{} {:?} {:?}", n.name, n.op, n.inputs))
            .collect::<Vec<_>>(),
        small.report
    );
    prop_assert!(
        small.net.noise_layers().is_empty(),
        "no noise layers are left"
    );
    // The compressed network's inference plan (compiled in f32, the network itself in
    // f64) gives its outputs too, to f32 rounding; and so does the masked original's,
    // with its noise layers, batch norms and masks folded.
    for (net, masked, want) in [
        (&small.net, "compressed", &got),
        (&reference, "original", &want),
    ] {
        let plan = net.inference_plan().unwrap();
        let planned = plan.forward(&xs).unwrap();
        let err = relative_error(want, &planned);
        prop_assert!(
            err <= tolerance.max(1e-5),
            "seed {seed}: the {masked} network's plan (compiled: {}) is off by {err:e}",
            plan.is_compiled()
        );
    }
    // Layer sizes: each report row matches the compressed layer, and a layer whose only
    // reader is a noise layer keeps at most the units that noise layer (and its mask) keep.
    for row in &small.report.layers {
        if row.kind == "input" {
            continue;
        }
        if row.units_after == 0 {
            prop_assert!(
                config.allow_empty && small.net.node_index(&row.name).is_err(),
                "seed {seed}: {} empty under {config:?}\n{:#?}\n{}",
                row.name,
                g.net
                    .spec()
                    .nodes
                    .iter()
                    .map(|n| format!(
                        "{} {:?} {:?} {:?}",
                        n.name,
                        n.op,
                        n.inputs,
                        g.net.mask(g.net.node_index(&n.name).unwrap())
                    ))
                    .collect::<Vec<_>>(),
                small.report
            );
            continue;
        }
        let i = small.net.node_index(&row.name).unwrap();
        prop_assert_eq!(small.net.shapes()[i].units(), row.units_after);
        let w = small.net.param(i, "weight").unwrap();
        prop_assert_eq!(w.dim(0).unwrap(), row.units_after);
        prop_assert!(row.units_after <= row.units_before && row.macs_after <= row.macs_before);
    }
    for (layer, noise) in &g.direct_pairs {
        let (_, keep) = noise_keeps.iter().find(|(n, _)| n == noise).unwrap();
        let mask = user_masks
            .iter()
            .find(|(n, _)| n == layer)
            .map(|(_, m)| m.clone());
        let expected = keep
            .iter()
            .enumerate()
            .filter(|&(j, &k)| k && mask.as_ref().is_none_or(|m| m[j]))
            .count();
        // Downstream nodes (a depthwise conv, a noise layer after a flatten) may need even
        // fewer units, never more.
        let row = small.report.layer(layer).unwrap();
        if residual == ResidualPolicy::Union {
            prop_assert!(
                row.units_after <= expected,
                "seed {}: layer {}",
                seed,
                layer
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 300,
        failure_persistence: None,
        // Reproducible in CI; set SBP_PROPTEST_SEED to explore other networks.
        rng_seed: proptest::test_runner::RngSeed::Fixed(
            std::env::var("SBP_PROPTEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(2017),
        ),
        ..ProptestConfig::default()
    })]

    #[test]
    fn compressed_equals_original_f64(seed in any::<u64>()) {
        check(seed, DType::F64, 1e-9)?;
    }

    #[test]
    fn compressed_equals_original_f32(seed in any::<u64>()) {
        check(seed, DType::F32, 1e-5)?;
    }
}
