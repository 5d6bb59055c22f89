//! What every paper example shares: its flags and how it reports.

// Each example uses the part it needs.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_sbp::data::ImageSet;
use candle_sbp::experiment::{run, ExperimentConfig, ModelFn};
use candle_sbp::recipe::{PaperNet, Recipe};

/// A training recipe of the paper examples (see `candle_sbp::recipe::Recipe`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecipeArg {
    /// This crate's tuned recipe (LeNet5: 5 + 30 epochs, conv KL ×50;
    /// LeNet-500-300: 20 + 50 epochs, KL ×2).
    Tuned,
    /// The paper's protocol, unchanged (200 SBP epochs).
    Paper,
    /// Two dense and five SBP epochs: real compression within minutes.
    Quick,
}

impl From<RecipeArg> for Recipe {
    fn from(r: RecipeArg) -> Self {
        match r {
            RecipeArg::Tuned => Recipe::Tuned,
            RecipeArg::Paper => Recipe::Paper,
            RecipeArg::Quick => Recipe::Quick,
        }
    }
}

/// The flags of every paper example.
#[derive(clap::Parser, Debug)]
pub struct Args {
    /// The training recipe: `tuned` (this crate's, from its ablation), `paper` (the
    /// paper's protocol as published: 200 SBP epochs, the noise at the weights' learning
    /// rate, no KL weights) or `quick` (2 + 5 epochs). Explicit flags override it.
    #[arg(long, value_enum, default_value_t = RecipeArg::Tuned)]
    pub recipe: RecipeArg,
    /// Dense pretraining epochs (default: the recipe's).
    #[arg(long)]
    pub epochs_pretrain: Option<usize>,
    /// SBP epochs (default: the recipe's).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Seed of initialisation, shuffling and noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Examples per step.
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// Learning rate of the weights (default: the recipe's, 1e-3).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Learning rate of the noise parameters (default: the recipe's: 0.05 for `tuned` and
    /// `quick`, the weights' for `paper`).
    #[arg(long)]
    pub noise_lr: Option<f64>,
    /// Weight of one noise layer's KL term, as NAME=WEIGHT (repeatable); replaces the
    /// recipe's weight of that layer (1 where neither gives one).
    #[arg(long = "kl-weight", value_parser = parse_kl_weight)]
    pub kl_weights: Vec<(String, f64)>,
    /// SBP epochs over which the KL term grows linearly from 0 to its full weight
    /// (default: the recipe's).
    #[arg(long)]
    pub kl_warmup: Option<usize>,
    /// Epochs of plain training of the compressed network, at a tenth of the learning rate
    /// (default: the recipe's).
    #[arg(long)]
    pub finetune: Option<usize>,
    /// Use only the first N training images (0: all).
    #[arg(long, default_value_t = 0)]
    pub train_limit: usize,
    /// The data directory (default: $SBP_DATA_DIR, else ./data).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Where to write the JSON report (default: NAME.json).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Where to save the compressed model (default: NAME_compressed.safetensors).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where to draw the PNG plot (default: NAME.png).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Checkpoint directory: resumes an interrupted run.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// Where to train: auto (a CUDA or Metal GPU where this build has one, else the CPU),
    /// cpu, cuda[:N] or metal[:N]. GPUs need the build's `cuda` or `metal` feature.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Parses `NAME=WEIGHT` (a finite, non-negative weight).
pub fn parse_kl_weight(s: &str) -> Result<(String, f64), String> {
    let (name, w) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=WEIGHT, got {s:?}"))?;
    let w: f64 = w.parse().map_err(|e| format!("weight of {name}: {e}"))?;
    if !(w.is_finite() && w >= 0.0) {
        return Err(format!(
            "weight of {name} must be finite and non-negative, got {w}"
        ));
    }
    Ok((name.to_string(), w))
}

// Reuses freed memory instead of returning it to the system and faulting fresh pages in on
// every step: a quarter of a LeNet5 training step with glibc's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The recipe's settings for `net` with the explicit flags applied over them.
pub fn experiment_config(net: PaperNet, args: &Args) -> candle_sbp::Result<ExperimentConfig> {
    let recipe = Recipe::from(args.recipe).config(net);
    let mut kl_weights = recipe.kl_weights.clone();
    kl_weights.extend(args.kl_weights.iter().cloned());
    Ok(ExperimentConfig {
        epochs_pretrain: args.epochs_pretrain.unwrap_or(recipe.epochs_pretrain),
        epochs_sbp: args.epochs.unwrap_or(recipe.epochs_sbp),
        seed: args.seed,
        batch_size: args.batch_size,
        lr: args.lr.unwrap_or(recipe.lr),
        noise_lr: args.noise_lr.unwrap_or(recipe.noise_lr),
        kl_weights,
        kl_warmup_epochs: args.kl_warmup.unwrap_or(recipe.kl_warmup_epochs),
        finetune_epochs: args.finetune.unwrap_or(recipe.finetune_epochs),
        checkpoint: args.checkpoint.clone(),
        progress: !args.quiet,
        device: candle_sbp::experiment::device(&args.device)?,
        ..recipe
    })
}

/// Trains, compresses, prints the table and writes the report and the model.
pub fn main_with(
    net: PaperNet,
    model: &ModelFn,
    args: &Args,
    mut train: ImageSet,
    test: &ImageSet,
) -> anyhow::Result<()> {
    let name = net.name();
    if args.train_limit > 0 && args.train_limit < train.len() {
        train.pixels.truncate(args.train_limit * train.image_len());
        train.labels.truncate(args.train_limit);
    }
    let config = experiment_config(net, args)?;
    println!(
        "{name}: recipe {:?}, {} dense + {} SBP epochs, lr {}, noise lr {}, KL weights {:?}, KL warm-up {} epochs, fine-tuning {} epochs, seed {}, device {:?}",
        args.recipe,
        config.epochs_pretrain,
        config.epochs_sbp,
        config.lr,
        config.noise_lr,
        config.kl_weights,
        config.kl_warmup_epochs,
        config.finetune_epochs,
        config.seed,
        config.device.location()
    );
    let outcome = run(model, &train, test, &config, |phase, s| {
        println!(
            "{phase} epoch {}: loss {:.4}, train error {:.2}%, kept {:?} ({:.0} s)",
            s.epoch + 1,
            s.loss,
            100.0 * s.train_error,
            s.units_kept,
            s.seconds
        );
    })?;
    let (report, small) = (&outcome.report, &outcome.compressed);
    let r = &small.report;
    println!("\n{r}");
    if report.finetune_epochs > 0 {
        println!(
            "compressed network's test error before fine-tuning: {:.2}%",
            100.0 * report.error_before_finetune
        );
    }
    println!(
        "test error: dense {:.2}% → compressed {:.2}%; MACs {:.2}× fewer; measured speed-up {:.2}× (batch {}); trained in {:.0} s",
        100.0 * report.dense_error,
        100.0 * report.compressed_error,
        r.macs_ratio(),
        report.speedup_measured,
        report.batch_size_timed,
        report.train_seconds
    );
    let report_path = args
        .report
        .clone()
        .unwrap_or_else(|| format!("{name}.json").into());
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| format!("{name}_compressed.safetensors").into());
    let plot = args
        .plot
        .clone()
        .unwrap_or_else(|| format!("{name}.png").into());
    let json = serde_json::to_string_pretty(report)?;
    candle_sbp::net::write_atomic(&report_path, json.as_bytes())?;
    small.net.save(&out)?;
    outcome.plot(&plot)?;
    println!(
        "report: {}; compressed model: {}; plot: {}",
        report_path.display(),
        out.display(),
        plot.display()
    );
    Ok(())
}

/// The whole `main` of an MNIST example: parse the flags, read MNIST, run.
pub fn mnist_main(net: PaperNet, model: &ModelFn) -> anyhow::Result<()> {
    use anyhow::Context;
    use clap::Parser;
    let args = Args::parse();
    let dir = candle_sbp::data::data_dir(args.data_dir.as_deref()).join("mnist");
    #[cfg(feature = "download")]
    candle_sbp::data::download::ensure_mnist(&dir)?;
    let data = candle_sbp::data::mnist::load(&dir)
        .with_context(|| format!("reading MNIST from {}", dir.display()))?;
    main_with(net, model, &args, data.train, &data.test)
}
