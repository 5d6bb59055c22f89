//! The pruning schedules on a small MLP and learnable synthetic data.

mod common;

use candle::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use candle_sbp::criteria::{MeanActivation, Selection, WeightNorm};
use candle_sbp::models::lenet_mlp;
use candle_sbp::schedule::{
    agp_sparsity, fit_early_stopping, gradual, iterative, one_shot, prunable_groups, Between,
    IterativeConfig, Snapshot,
};
use candle_sbp::train::{AdamConfig, FitConfig};
use candle_sbp::{compress, CompressConfig, Net};
use common::synthetic_images;

fn mlp(vm: &VarMap) -> Net {
    let net = lenet_mlp(
        &[20, 10],
        None,
        VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu),
    )
    .unwrap();
    net.reset_parameters(4).unwrap();
    net
}

fn fit_config(epochs: usize) -> FitConfig {
    FitConfig {
        epochs,
        batch_size: 50,
        weights: AdamConfig {
            lr: 1e-2,
            ..Default::default()
        },
        constant_epochs: epochs,
        kl_scale: 0.0,
        seed: 2,
        progress: false,
        ..Default::default()
    }
}

fn kept(net: &Net) -> usize {
    prunable_groups(net)
        .iter()
        .map(|g| {
            net.mask(g.producers[0].index)
                .map_or(g.units, |m| m.iter().filter(|&&k| k).count())
        })
        .sum()
}

#[test]
fn iterative_rewinds_the_surviving_weights_exactly() {
    let (train, val) = (synthetic_images(300, 0), synthetic_images(100, 3));
    let vm = VarMap::new();
    let mut net = mlp(&vm);
    let initial = Snapshot::take(&net).unwrap();
    let config = IterativeConfig {
        fit: fit_config(4),
        patience: 2,
        selection: Selection::PerLayer { drop: 0.2 },
        target_keep: 0.5,
        kappa: 0.5,
        between: Between::Rewind,
        min_units: 1,
        max_cycles: 10,
        compress_between: false,
    };
    let mut measured = 0;
    let cycles = iterative(&mut net, &train, &val, &MeanActivation, &config, |_, _| {
        measured += 1;
        Ok(())
    })
    .unwrap();
    println!("{cycles:?}");
    assert_eq!(measured, cycles.len());
    // 30 units: 24, then 19 (rounding per layer), ... until at most half is left.
    let fractions: Vec<f64> = cycles.iter().map(|c| c.kept_fraction).collect();
    assert!(fractions.windows(2).all(|w| w[1] < w[0]), "{fractions:?}");
    assert!(*fractions.last().unwrap() <= 0.5);
    assert!(cycles[0].val_accuracy > 0.9, "{:?}", cycles[0]);
    let small = compress(&net, &CompressConfig::default()).unwrap();
    assert_eq!(
        small.report.layer("fc1").unwrap().units_after
            + small.report.layer("fc2").unwrap().units_after,
        kept(&net)
    );

    // Stopped by max_cycles right after a pruning, the network holds its initial weights
    // again, bit for bit, with two rounds of masks.
    let vm = VarMap::new();
    let mut net = mlp(&vm);
    let config2 = IterativeConfig {
        max_cycles: 2,
        target_keep: 0.0,
        ..config.clone()
    };
    iterative(&mut net, &train, &val, &MeanActivation, &config2, |_, _| {
        Ok(())
    })
    .unwrap();
    for ((name, now), (_, then)) in net.named_params().iter().zip(initial.params()) {
        let (a, b) = (
            now.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            then.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(a == b, "{name} was not rewound");
    }
    assert_eq!(kept(&net), 16 + 8 - 3 - 2, "20 → 16 → 13 and 10 → 8 → 6");

    // Without rewinding the weights move on.
    let vm = VarMap::new();
    let mut net = mlp(&vm);
    let config = IterativeConfig {
        between: Between::Continue,
        max_cycles: 2,
        ..config
    };
    iterative(
        &mut net,
        &train,
        &val,
        &WeightNorm::l1(),
        &config,
        |net, _| {
            let moved = net
                .named_params()
                .iter()
                .zip(initial.params())
                .any(|((_, a), (_, b))| {
                    a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                        != b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                });
            assert!(moved);
            Ok(())
        },
    )
    .unwrap();
}

#[test]
fn gradual_and_one_shot_reach_their_targets() {
    let train = synthetic_images(300, 0);
    let vm = VarMap::new();
    let mut net = mlp(&vm);
    let history = gradual(
        &mut net,
        &train,
        &fit_config(4),
        &WeightNorm::l1(),
        |t| agp_sparsity(t, 0.0, 0.6),
        None,
        1,
    )
    .unwrap();
    assert_eq!(history.len(), 4);
    // 40% of 20 and of 10 units: 8 + 4.
    assert_eq!(kept(&net), 12);

    let vm = VarMap::new();
    let mut net = mlp(&vm);
    one_shot(
        &mut net,
        &train,
        &WeightNorm::l2(),
        Selection::TargetGlobal {
            keep: 0.5,
            normalize: true,
        },
        2,
        &fit_config(1),
    )
    .unwrap();
    assert_eq!(kept(&net), 15);

    // Early stopping never trains past the limit and restores the best epoch.
    let vm = VarMap::new();
    let mut net = mlp(&vm);
    let val = synthetic_images(100, 5);
    let (h, best) = fit_early_stopping(&mut net, &train, &val, &fit_config(6), 1).unwrap();
    assert!(h.len() <= 6 && best < 0.5, "{best}");
    let now = candle_sbp::report::test_error(&net, &val, 100).unwrap();
    assert_eq!(now, best);
}

/// With `compress_between`, the pruned units leave the network after every cycle: the same
/// cycles as with masks, each later cycle trains a smaller network, and rewinding gives the
/// surviving units' initial weights, bit for bit what compressing the masked run gives.
#[test]
fn iterative_can_remove_units_physically_between_cycles() {
    let (train, val) = (synthetic_images(300, 0), synthetic_images(100, 3));
    let run = |physical: bool, between: Between| {
        let vm = VarMap::new();
        let mut net = mlp(&vm);
        let config = IterativeConfig {
            fit: fit_config(3),
            patience: 2,
            selection: Selection::PerLayer { drop: 0.2 },
            target_keep: 0.0,
            kappa: 0.0,
            between,
            min_units: 1,
            max_cycles: 3,
            compress_between: physical,
        };
        let mut widths = Vec::new();
        let cycles = iterative(
            &mut net,
            &train,
            &val,
            &MeanActivation,
            &config,
            |net, _| {
                widths.push(
                    net.named_params()
                        .iter()
                        .map(|(_, t)| t.elem_count())
                        .sum::<usize>(),
                );
                Ok(())
            },
        )
        .unwrap();
        (net, cycles, widths)
    };
    for between in [Between::Rewind, Between::Continue] {
        let (masked, masked_cycles, masked_sizes) = run(false, between);
        let (physical, physical_cycles, physical_sizes) = run(true, between);
        let units = |c: &[candle_sbp::schedule::CycleStats]| -> Vec<Vec<usize>> {
            c.iter().map(|c| c.units_kept.clone()).collect()
        };
        assert_eq!(
            units(&masked_cycles),
            units(&physical_cycles),
            "{between:?}"
        );
        assert_eq!(
            masked_cycles
                .iter()
                .map(|c| c.kept_fraction)
                .collect::<Vec<_>>(),
            physical_cycles
                .iter()
                .map(|c| c.kept_fraction)
                .collect::<Vec<_>>()
        );
        // Masked networks keep their size; physical ones shrink every cycle.
        assert!(
            masked_sizes.windows(2).all(|w| w[0] == w[1]),
            "{masked_sizes:?}"
        );
        assert!(
            physical_sizes.windows(2).all(|w| w[1] < w[0]),
            "{physical_sizes:?}"
        );
        assert!(physical.masks().is_empty());
        let expected = compress(&masked, &CompressConfig::default()).unwrap().net;
        let params = |n: &Net| -> Vec<(String, Vec<f32>)> {
            n.named_params()
                .into_iter()
                .map(|(name, t)| (name, t.flatten_all().unwrap().to_vec1().unwrap()))
                .collect()
        };
        if between == Between::Rewind {
            assert_eq!(params(&expected), params(&physical), "rewound weights");
        } else {
            for ((name, a), (_, b)) in params(&expected).iter().zip(params(&physical)) {
                let worst = a
                    .iter()
                    .zip(&b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 1e-4, "{name} differs by {worst}");
            }
        }
    }
}
