//! A short `compare_mnist` on the real data: every method yields points of the right shape.

mod common;

use candle_sbp::compare::{compare, standard_methods, CompareConfig};
use candle_sbp::data::{mnist, ImageSet};
use candle_sbp::models::dropnet_model_a;
use candle_sbp::train::{AdamConfig, FitConfig};

fn head(set: &ImageSet, from: usize, n: usize) -> ImageSet {
    let per = set.image_len();
    ImageSet {
        pixels: set.pixels[from * per..(from + n) * per].to_vec(),
        labels: set.labels[from..from + n].to_vec(),
        ..set.clone()
    }
}

#[test]
fn short_comparison_has_every_method() {
    let Some(dir) = common::real_data("mnist") else {
        return;
    };
    let m = mnist::load(dir).unwrap();
    let (val, train, test) = (
        head(&m.train, 0, 500),
        head(&m.train, 500, 2000),
        head(&m.test, 0, 1000),
    );
    let config = CompareConfig {
        fit: FitConfig {
            epochs: 2,
            constant_epochs: 2,
            batch_size: 100,
            weights: AdamConfig {
                lr: 3e-3,
                ..Default::default()
            },
            kl_scale: 0.0,
            progress: false,
            ..Default::default()
        },
        patience: 2,
        drop: 0.3,
        cycles: 3,
        sbp_epochs: 2,
        noise_lr: 0.1,
        min_units: 1,
        seed: 0,
    };
    let methods = standard_methods(0.3, 0);
    let points = compare(
        &dropnet_model_a,
        &methods,
        &train,
        &val,
        &test,
        &config,
        |_| {},
    )
    .unwrap();
    for (name, _) in &methods {
        let mine: Vec<_> = points.iter().filter(|p| &p.method == name).collect();
        assert_eq!(mine.len(), 3, "{name}: {mine:?}");
        assert!(mine
            .iter()
            .all(|p| (0.0..=1.0).contains(&p.units_kept) && (0.0..=1.0).contains(&p.macs_kept)));
        assert!(mine[0].test_accuracy > 0.7, "{name}: {:?}", mine[0]);
        if name != "sbp" {
            // 40 + 40 units, 30% per cycle per layer: 80 → 56 → 40.
            let kept: Vec<f64> = mine.iter().map(|p| p.units_kept).collect();
            assert!(
                kept[0] == 1.0 && kept[1] < 0.75 && kept[2] < kept[1],
                "{name}: {kept:?}"
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("compare.png");
    candle_sbp::plot::plot_comparison(&png, &points).unwrap();
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    std::fs::copy(&png, std::env::temp_dir().join("candle-sbp-compare.png")).unwrap();
    let json = serde_json::to_value(&points).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 18);
}
