//! SBP beside DropNet (per layer and global), L1-norm, APoZ and random pruning on MNIST,
//! with the same network, data and budget: test accuracy against the fraction of units and
//! of MACs kept, as a table, a JSON file and a PNG plot.
//!
//!     cargo run --release --example compare_mnist -- --help
//!
//! `--model a` is DropNet's "Model A" MLP (784-40-40-10); `--model lenet5` is LeNet5-Caffe.

mod common;

use std::path::PathBuf;

use anyhow::Context;
use candle_sbp::compare::{compare, standard_methods, CompareConfig};
use candle_sbp::data::{data_dir, mnist, ImageSet};
use candle_sbp::experiment::ModelFn;
use candle_sbp::models::{dropnet_model_a, lenet5_caffe};
use candle_sbp::train::{AdamConfig, FitConfig};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "SBP against DropNet, L1, APoZ and random pruning on MNIST")]
struct Args {
    /// `a` (784-40-40-10) or `lenet5`.
    #[arg(long, default_value = "a")]
    model: String,
    /// Most epochs per training (early stopping on a validation split).
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Cycles of the iterative methods.
    #[arg(long, default_value_t = 8)]
    cycles: usize,
    /// SBP epochs after dense pretraining.
    #[arg(long, default_value_t = 10)]
    sbp_epochs: usize,
    /// Fraction of the remaining units each cycle drops (DropNet: 0.2).
    #[arg(long, default_value_t = 0.2)]
    drop: f64,
    /// Learning rate of the noise parameters.
    #[arg(long, default_value_t = 0.05)]
    noise_lr: f64,
    /// Weight of one SBP noise layer's KL term, as NAME=WEIGHT (repeatable; 1 where
    /// absent). The KL is divided by the number of training images, so a weight
    /// tuned on the full training set scales with them (×100 on all of MNIST is ×33 with
    /// `--train-limit 20000`).
    #[arg(long = "kl-weight", value_parser = common::parse_kl_weight)]
    kl_weights: Vec<(String, f64)>,
    /// Training images used (0: all but the validation split).
    #[arg(long, default_value_t = 0)]
    train_limit: usize,
    /// Images held out of training for early stopping.
    #[arg(long, default_value_t = 5000)]
    validation: usize,
    /// Seed of every model.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The data directory (default: $SBP_DATA_DIR, else ./data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "compare_mnist.json")]
    report: PathBuf,
    /// Where to draw the PNG plot.
    #[arg(long, default_value = "compare_mnist.png")]
    plot: PathBuf,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

fn slice(set: &ImageSet, from: usize, to: usize) -> ImageSet {
    let per = set.image_len();
    ImageSet {
        pixels: set.pixels[from * per..to * per].to_vec(),
        labels: set.labels[from..to].to_vec(),
        ..set.clone()
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = data_dir(args.data_dir.as_deref()).join("mnist");
    #[cfg(feature = "download")]
    candle_sbp::data::download::ensure_mnist(&dir)?;
    let data =
        mnist::load(&dir).with_context(|| format!("reading MNIST from {}", dir.display()))?;
    let n = data.train.len();
    let val_n = args.validation.min(n / 5);
    let train_end = if args.train_limit > 0 {
        (val_n + args.train_limit).min(n)
    } else {
        n
    };
    let (val, train) = (
        slice(&data.train, 0, val_n),
        slice(&data.train, val_n, train_end),
    );
    let model: &ModelFn = match args.model.as_str() {
        "a" => &dropnet_model_a,
        "lenet5" => &lenet5_caffe,
        other => anyhow::bail!("unknown --model {other}: use a or lenet5"),
    };
    let config = CompareConfig {
        fit: FitConfig {
            epochs: args.epochs,
            constant_epochs: args.epochs,
            batch_size: 100,
            weights: AdamConfig {
                lr: 1e-3,
                ..Default::default()
            },
            kl_scale: 0.0,
            kl_weights: args.kl_weights.iter().cloned().collect(),
            seed: args.seed,
            progress: !args.quiet,
            ..Default::default()
        },
        patience: 5,
        drop: args.drop,
        cycles: args.cycles,
        sbp_epochs: args.sbp_epochs,
        noise_lr: args.noise_lr,
        min_units: 1,
        seed: args.seed,
    };
    let methods = standard_methods(args.drop, args.seed);
    let points = compare(model, &methods, &train, &val, &data.test, &config, |p| {
        println!(
            "{:<15} stage {:>2}: units {:>5.1}%  MACs {:>5.1}%  test accuracy {:.2}%",
            p.method,
            p.stage,
            100.0 * p.units_kept,
            100.0 * p.macs_kept,
            100.0 * p.test_accuracy
        );
    })?;
    let json = serde_json::json!({
        "model": args.model,
        "dataset": "mnist",
        "seed": args.seed,
        "train_images": train.len(),
        "validation_images": val.len(),
        "points": points,
    });
    candle_sbp::net::write_atomic(
        &args.report,
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    candle_sbp::plot::plot_comparison(&args.plot, &points)?;
    println!(
        "report: {}; plot: {}",
        args.report.display(),
        args.plot.display()
    );
    Ok(())
}
