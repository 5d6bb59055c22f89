//! The ablation table: experiment reports grouped by setting, with the mean and spread of
//! every measure over the seeds of a setting. `cargo run --release --example ablation --
//! REPORT.json…` prints it; `scripts/ablation.sh` runs the settings and then that command.
//!
//! ```
//! use candle_sbp::ablation::{ablation_table, Setting};
//! use candle_sbp::report::ExperimentReport;
//!
//! let run = |seed, compressed_error, macs_after| ExperimentReport {
//!     model: "lenet5_mnist".into(),
//!     dataset: "mnist".into(),
//!     seed,
//!     epochs_pretrain: 5,
//!     epochs_sbp: 30,
//!     lr: 1e-3,
//!     noise_lr: 0.05,
//!     kl_weights: Default::default(),
//!     kl_warmup_epochs: 0,
//!     noise_units_after: vec![10, 20, 200, 180],
//!     finetune_epochs: 0,
//!     error_before_finetune: compressed_error,
//!     finetune_history: vec![],
//!     train_seconds: 600.0,
//!     dense_error: 0.0070,
//!     compressed_error,
//!     units_before: vec![1, 20, 50, 500, 10],
//!     units_after: vec![1, 10, 20, 200, 10],
//!     params_before: 431_080,
//!     params_after: 40_000,
//!     macs_before: 2_293_000,
//!     macs_after,
//!     speedup_measured: 3.0,
//!     batch_size_timed: 100,
//!     history: vec![],
//! };
//! let reports = [run(0, 0.0075, 229_300), run(1, 0.0079, 114_650)];
//! let rows = Setting::group(&reports);
//! assert_eq!(rows.len(), 1);
//! assert_eq!(rows[0].seeds, [0, 1]);
//! assert!((rows[0].macs_ratio.mean - 15.0).abs() < 1e-9);
//! let table = ablation_table(&reports);
//! assert!(table.contains("| 15.00× (10.00×–20.00×) | 10-20-200-180; 10-20-200-180 |"));
//! assert!(table.contains("| +0.07 (+0.05–+0.09) |"));
//! ```

use crate::report::ExperimentReport;

/// The mean and range of one measure over the seeds of a setting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// Mean over the seeds.
    pub mean: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

impl Spread {
    /// The spread of `values` (NaN throughout when empty).
    pub fn of(values: &[f64]) -> Self {
        let n = values.len() as f64;
        Self {
            mean: values.iter().sum::<f64>() / n,
            min: values.iter().copied().fold(f64::NAN, f64::min),
            max: values.iter().copied().fold(f64::NAN, f64::max),
        }
    }

    /// `mean` alone for one value, else `mean (min–max)`, each through `f`.
    fn show(&self, runs: usize, f: impl Fn(f64) -> String) -> String {
        if runs == 1 {
            f(self.mean)
        } else {
            format!("{} ({}–{})", f(self.mean), f(self.min), f(self.max))
        }
    }
}

/// One row of the ablation table: a setting and its runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    /// The network.
    pub model: String,
    /// What was set: epochs, learning rates, KL weights and warm-up.
    pub label: String,
    /// The seeds run.
    pub seeds: Vec<u64>,
    /// Units at each noise layer's position in the compressed network (the paper's
    /// notation: LeNet5's 3-18-284-283), one list per seed.
    pub units_kept: Vec<Vec<usize>>,
    /// Reduction of the MACs per example.
    pub macs_ratio: Spread,
    /// Test error of the dense network, in percent.
    pub dense_error: Spread,
    /// Test error of the compressed network, in percent.
    pub compressed_error: Spread,
    /// Compressed minus dense test error, in percentage points.
    pub error_increase: Spread,
    /// Wall-clock training seconds.
    pub seconds: Spread,
}

impl Setting {
    /// The label of a report's setting: everything but the seed.
    pub fn label_of(r: &ExperimentReport) -> String {
        let mut label = format!(
            "{} + {} epochs, lr {}, noise lr {}",
            r.epochs_pretrain, r.epochs_sbp, r.lr, r.noise_lr
        );
        // A weight of 1 is no weight.
        let weights: Vec<String> = r
            .kl_weights
            .iter()
            .filter(|(_, &w)| w != 1.0)
            .map(|(name, w)| format!("{name} ×{w}"))
            .collect();
        if !weights.is_empty() {
            label += &format!(", KL {}", weights.join(" "));
        }
        if r.kl_warmup_epochs > 0 {
            label += &format!(", KL warm-up {}", r.kl_warmup_epochs);
        }
        if r.finetune_epochs > 0 {
            label += &format!(", fine-tune {}", r.finetune_epochs);
        }
        label
    }

    /// Groups reports by model and setting, in the order each setting first appears, the
    /// runs of a setting by seed.
    pub fn group(reports: &[ExperimentReport]) -> Vec<Setting> {
        let mut groups: Vec<(String, String, Vec<&ExperimentReport>)> = Vec::new();
        for r in reports {
            let label = Self::label_of(r);
            match groups
                .iter_mut()
                .find(|(m, l, _)| *m == r.model && *l == label)
            {
                Some((_, _, runs)) => runs.push(r),
                None => groups.push((r.model.clone(), label, vec![r])),
            }
        }
        groups
            .into_iter()
            .map(|(model, label, mut runs)| {
                runs.sort_by_key(|r| r.seed);
                let spread = |f: &dyn Fn(&ExperimentReport) -> f64| {
                    Spread::of(&runs.iter().map(|r| f(r)).collect::<Vec<_>>())
                };
                Setting {
                    model,
                    label,
                    seeds: runs.iter().map(|r| r.seed).collect(),
                    units_kept: runs.iter().map(|r| units_kept(r)).collect(),
                    macs_ratio: spread(&|r| r.macs_before as f64 / r.macs_after.max(1) as f64),
                    dense_error: spread(&|r| 100.0 * r.dense_error),
                    compressed_error: spread(&|r| 100.0 * r.compressed_error),
                    error_increase: spread(&|r| 100.0 * (r.compressed_error - r.dense_error)),
                    seconds: spread(&|r| r.train_seconds),
                }
            })
            .collect()
    }
}

/// The units at each noise layer's position in the compressed network; for reports
/// written before they were recorded, the units each noise layer kept after the last
/// epoch (or the compressed layers' units when there is no history either).
fn units_kept(r: &ExperimentReport) -> Vec<usize> {
    if !r.noise_units_after.is_empty() {
        return r.noise_units_after.clone();
    }
    match r.history.last() {
        Some(last) if !last.units_kept.is_empty() => last.units_kept.clone(),
        _ => r.units_after.clone(),
    }
}

/// The ablation table of `reports` in Markdown: one row per model and setting, the mean
/// and (over several seeds) the range of each measure.
pub fn ablation_table(reports: &[ExperimentReport]) -> String {
    let mut out = String::from(
        "| network | setting | seeds | MACs reduction | units kept | dense error | compressed error | increase (points) | seconds |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for s in Setting::group(reports) {
        let n = s.seeds.len();
        let seeds: Vec<String> = s.seeds.iter().map(u64::to_string).collect();
        let units: Vec<String> = s
            .units_kept
            .iter()
            .map(|u| u.iter().map(usize::to_string).collect::<Vec<_>>().join("-"))
            .collect();
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            s.model,
            s.label,
            seeds.join(", "),
            s.macs_ratio.show(n, |v| format!("{v:.2}×")),
            units.join("; "),
            s.dense_error.show(n, |v| format!("{v:.2}%")),
            s.compressed_error.show(n, |v| format!("{v:.2}%")),
            s.error_increase.show(n, |v| format!("{v:+.2}")),
            s.seconds.show(n, |v| format!("{v:.0}")),
        );
    }
    out
}
