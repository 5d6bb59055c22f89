//! Short versions of the paper examples on the real data: the report is complete and the
//! network really got smaller.

mod common;

use candle_nn::VarBuilder;
use candle_sbp::data::{cifar10, mnist, ImageSet};
use candle_sbp::experiment::{run, ExperimentConfig};
use candle_sbp::models::{lenet_300_100, vgg_like};
use candle_sbp::LogNormalDropoutConfig;

fn head(set: &ImageSet, n: usize) -> ImageSet {
    ImageSet {
        pixels: set.pixels[..n * set.image_len()].to_vec(),
        labels: set.labels[..n].to_vec(),
        ..set.clone()
    }
}

const FIELDS: [&str; 16] = [
    "model",
    "dataset",
    "seed",
    "epochs_pretrain",
    "epochs_sbp",
    "train_seconds",
    "dense_error",
    "compressed_error",
    "units_before",
    "units_after",
    "params_before",
    "params_after",
    "macs_before",
    "macs_after",
    "speedup_measured",
    "batch_size_timed",
];

fn check_json(report: &candle_sbp::report::ExperimentReport) -> serde_json::Value {
    let json: serde_json::Value =
        serde_json::from_str(&serde_json::to_string(report).unwrap()).unwrap();
    for f in FIELDS {
        assert!(json.get(f).is_some(), "the report lacks {f}");
    }
    json
}

#[test]
fn short_lenet300_100_run_compresses() {
    let Some(dir) = common::real_data("mnist") else {
        return;
    };
    let m = mnist::load(dir).unwrap();
    let config = ExperimentConfig {
        model: "lenet300_100_mnist".into(),
        dataset: "mnist".into(),
        epochs_pretrain: 1,
        epochs_sbp: 3,
        noise_lr: 0.1,
        progress: false,
        ..Default::default()
    };
    let mut epochs = 0;
    let outcome = run(
        &lenet_300_100,
        &head(&m.train, 3000),
        &head(&m.test, 2000),
        &config,
        |_, _| epochs += 1,
    )
    .unwrap();
    let (report, small) = (&outcome.report, &outcome.compressed);
    let png = tempfile::tempdir().unwrap();
    let plot = png.path().join("run.png");
    outcome.plot(&plot).unwrap();
    let bytes = std::fs::read(&plot).unwrap();
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "a real PNG"
    );
    std::fs::copy(&plot, std::env::temp_dir().join("candle-sbp-test-plot.png")).unwrap();
    println!(
        "{}\n{:?}",
        small.report,
        (
            report.dense_error,
            report.compressed_error,
            report.speedup_measured
        )
    );
    assert_eq!(epochs, 4);
    check_json(report);
    assert_eq!(report.units_before, [1, 300, 100, 10]);
    assert!(
        report.macs_after * 2 < report.macs_before,
        "{}",
        small.report
    );
    assert!(report.compressed_error < 0.2, "{}", report.compressed_error);
    assert!(report.speedup_measured > 0.0);
}

#[test]
fn short_vgg_run_reports() {
    let Some(dir) = common::real_data("cifar10") else {
        return;
    };
    let c = cifar10::load(dir).unwrap();
    let config = ExperimentConfig {
        model: "vgg_cifar10".into(),
        dataset: "cifar10".into(),
        epochs_pretrain: 1,
        epochs_sbp: 1,
        batch_size: 50,
        progress: false,
        timed_batch: 10,
        ..Default::default()
    };
    let model = |sbp: Option<LogNormalDropoutConfig>, vb: VarBuilder<'_>| vgg_like(0.125, sbp, vb);
    let report = run(
        &model,
        &head(&c.train, 300),
        &head(&c.test, 200),
        &config,
        |_, _| {},
    )
    .unwrap()
    .report;
    let json = check_json(&report);
    assert_eq!(json["units_before"].as_array().unwrap().len(), 1 + 13 + 2);
    assert!(report.dense_error <= 1.0 && report.compressed_error <= 1.0);
}
