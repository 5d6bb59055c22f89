//! Short versions of the paper examples on the real data: the report is complete and the
//! network really got smaller.

mod common;

use candle_nn::VarBuilder;
use candle_sbp::data::{cifar10, mnist, ImageSet};
use candle_sbp::experiment::{run, ExperimentConfig};
use candle_sbp::models::{lenet5_caffe, lenet_300_100, lenet_500_300, vgg_like};
use candle_sbp::recipe::{PaperNet, Recipe};
use candle_sbp::report::ExperimentReport;
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

fn check_json(report: &ExperimentReport) -> serde_json::Value {
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
        finetune_epochs: 1,
        progress: false,
        ..Default::default()
    };
    let mut phases = Vec::new();
    let outcome = run(
        &lenet_300_100,
        &head(&m.train, 3000),
        &head(&m.test, 2000),
        &config,
        |phase, _| phases.push(phase.to_string()),
    )
    .unwrap();
    assert_eq!(phases, ["pretrain", "sbp", "sbp", "sbp", "finetune"]);
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
    check_json(report);
    // The fine-tuning trained the compressed network, not its structure.
    assert_eq!(report.finetune_history.len(), 1);
    assert_eq!(report.history.len(), 4);
    assert!(report.error_before_finetune > 0.0 && report.error_before_finetune < 0.3);
    assert_eq!(small.report.macs_after, report.macs_after);
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

/// The examples' default recipes, shortened (1 + 4 epochs, 10,000 training images) but
/// otherwise as `lenet5_mnist` and `lenet500_300_mnist` run them by default; checks what
/// every such run must show (a complete report, half the MACs gone, a working network).
/// `None` without the data.
fn short_tuned_run(
    net: PaperNet,
    model: &candle_sbp::experiment::ModelFn,
) -> Option<ExperimentReport> {
    let m = mnist::load(common::real_data("mnist")?).unwrap();
    let tuned = Recipe::Tuned.config(net);
    let config = ExperimentConfig {
        epochs_pretrain: 1,
        epochs_sbp: 4,
        kl_warmup_epochs: tuned.kl_warmup_epochs.min(1),
        progress: false,
        ..tuned
    };
    let report = run(
        model,
        &head(&m.train, 10_000),
        &head(&m.test, 1000),
        &config,
        |_, _| {},
    )
    .unwrap()
    .report;
    println!("{report:?}");
    check_json(&report);
    assert_eq!(report.model, net.name());
    assert!(
        report.macs_after * 2 < report.macs_before,
        "{:?}",
        report.units_after
    );
    assert!(
        report.compressed_error < 0.15,
        "{}",
        report.compressed_error
    );
    Some(report)
}

#[test]
fn short_form_of_the_tuned_lenet5_recipe() {
    let Some(report) = short_tuned_run(PaperNet::LeNet5Caffe, &lenet5_caffe) else {
        return;
    };
    assert_eq!(report.kl_weights.get("sbp1"), Some(&50.0));
    assert_eq!(report.units_before, [1, 20, 50, 500, 10]);
    // The weighted conv layers lose channels, and with them most of the MACs.
    assert!(
        report.units_after[1] < 20 && report.units_after[2] < 50,
        "{:?}",
        report.units_after
    );
}

#[test]
fn short_form_of_the_tuned_lenet500_300_recipe() {
    let Some(report) = short_tuned_run(PaperNet::LeNet500_300, &lenet_500_300) else {
        return;
    };
    assert_eq!(report.kl_weights.get("sbp0"), Some(&2.0));
    assert_eq!(report.units_before, [1, 500, 300, 10]);
    assert!(
        report.units_after[1] < 500 && report.units_after[2] < 300,
        "{:?}",
        report.units_after
    );
    // The input noise removes pixels, and with them fc1's inputs: params fall faster
    // than the hidden units alone explain.
    let hidden_only = 784 * report.units_after[1]
        + report.units_after[1] * report.units_after[2]
        + report.units_after[2] * 10;
    assert!(report.params_after < hidden_only, "{}", report.params_after);
}

/// Devices by name: the CPU, `auto` (the CPU in a build without GPUs), and errors that
/// name the problem for an unknown name, an index that is not a number and a GPU that the
/// build lacks.
#[test]
fn devices_by_name() {
    use candle_sbp::experiment::device;
    assert!(device("cpu").unwrap().is_cpu());
    let gpus = candle::utils::cuda_is_available() || candle::utils::metal_is_available();
    if !gpus {
        assert!(device("auto").unwrap().is_cpu());
    }
    let cases = [
        ("tpu", "expected cpu, cuda[:N], metal[:N] or auto"),
        ("cpu:1", "expected cpu, cuda[:N], metal[:N] or auto"),
        ("cuda:x", "\"x\" is not a device index"),
    ];
    for (name, says) in cases {
        let err = device(name).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, candle_sbp::Error::Device { .. }),
            "{name}: {text}"
        );
        assert!(text.contains(says), "{name}: {text}");
    }
    for (name, feature, built) in [
        (
            "cuda:0",
            "--features cuda",
            candle::utils::cuda_is_available(),
        ),
        (
            "metal",
            "--features metal",
            candle::utils::metal_is_available(),
        ),
    ] {
        if !built {
            let text = device(name).unwrap_err().to_string();
            assert!(text.contains(feature), "{name}: {text}");
        }
    }
}
