//! LeNet5-Caffe on MNIST with Structured Bayesian Pruning: pretrain the dense network,
//! train with SBP from it, compress, and report error, units, MACs and measured speed-up.
//!
//!     cargo run --release --example lenet5_mnist -- --help

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_sbp::data::{data_dir, mnist};
use candle_sbp::models::lenet5_caffe;
use candle_sbp::report::{test_error, time_forward, ExperimentReport};
use candle_sbp::train::{fit, AdamConfig, FitConfig};
use candle_sbp::{compress, CompressConfig, LogNormalDropoutConfig};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "LeNet5-Caffe on MNIST: dense pretraining, SBP, compression, report")]
struct Args {
    /// Dense pretraining epochs.
    #[arg(long, default_value_t = 2)]
    epochs_pretrain: usize,
    /// SBP epochs (the paper: 200).
    #[arg(long, default_value_t = 5)]
    epochs: usize,
    /// Seed of initialisation, shuffling and noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Examples per step.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Learning rate of the weights.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Learning rate of the noise parameters.
    #[arg(long, default_value_t = 1e-2)]
    noise_lr: f64,
    /// Use only the first N training images (0: all).
    #[arg(long, default_value_t = 0)]
    train_limit: usize,
    /// The data directory (default: $SBP_DATA_DIR, else ./data); MNIST is read from its
    /// `mnist` folder.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "lenet5_mnist.json")]
    report: PathBuf,
    /// Where to save the compressed model.
    #[arg(long, default_value = "lenet5_mnist_compressed.safetensors")]
    out: PathBuf,
    /// Checkpoint directory: resumes an interrupted run.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let device = Device::Cpu;
    let dir = data_dir(args.data_dir.as_deref()).join("mnist");
    let data =
        mnist::load(&dir).with_context(|| format!("reading MNIST from {}", dir.display()))?;
    let mut train = data.train.clone();
    if args.train_limit > 0 && args.train_limit < train.len() {
        train.pixels.truncate(args.train_limit * train.image_len());
        train.labels.truncate(args.train_limit);
    }
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let mut net = lenet5_caffe(Some(LogNormalDropoutConfig::default()), vb)?;
    net.reset_parameters(args.seed)?;

    let adam = |lr| AdamConfig {
        lr,
        beta1: 0.95,
        ..Default::default()
    };
    let phase = |epochs, kl_scale, noise_lr, sub: &str| FitConfig {
        epochs,
        batch_size: args.batch_size,
        weights: adam(args.lr),
        noise: adam(noise_lr),
        constant_epochs: epochs / 2,
        kl_scale,
        seed: args.seed,
        checkpoint: args.checkpoint.as_ref().map(|c| c.join(sub)),
        progress: !args.quiet,
        ..Default::default()
    };
    let start = Instant::now();
    // Dense pretraining: no KL and frozen noise (log σ = -5 makes θ ≈ 1).
    let mut history = fit(
        &mut net,
        &train,
        &phase(args.epochs_pretrain, 0.0, 0.0, "pretrain"),
        |_| Ok(()),
    )?;
    let dense_error = test_error(&net, &data.test, 500)?;
    println!("dense test error: {:.2}%", 100.0 * dense_error);
    history.extend(fit(
        &mut net,
        &train,
        &phase(args.epochs, 1.0, args.noise_lr, "sbp"),
        |s| {
            println!(
                "sbp epoch {}: loss {:.4}, train error {:.2}%, kept {:?}",
                s.epoch + 1,
                s.loss,
                100.0 * s.train_error,
                s.units_kept
            );
            Ok(())
        },
    )?);
    let train_seconds = start.elapsed().as_secs_f64();

    let small = compress(&net, &CompressConfig::default())?;
    let compressed_error = test_error(&small.net, &data.test, 500)?;
    let batch = 100;
    let xs = Tensor::rand(0f32, 1., (batch, 1, 28, 28), &device)?;
    let dense_vm = VarMap::new();
    let dense = lenet5_caffe(
        None,
        VarBuilder::from_varmap(&dense_vm, DType::F32, &device),
    )?;
    let speedup = time_forward(&dense, &xs, 30)? / time_forward(&small.net, &xs, 30)?;
    small.net.save(&args.out)?;

    let r = &small.report;
    let report = ExperimentReport {
        model: "lenet5_caffe".into(),
        dataset: "mnist".into(),
        seed: args.seed,
        epochs_pretrain: args.epochs_pretrain,
        epochs_sbp: args.epochs,
        train_seconds,
        dense_error,
        compressed_error,
        units_before: r.layers.iter().map(|l| l.units_before).collect(),
        units_after: r.layers.iter().map(|l| l.units_after).collect(),
        params_before: r.params_before,
        params_after: r.params_after,
        macs_before: r.macs_before,
        macs_after: r.macs_after,
        speedup_measured: speedup,
        batch_size_timed: batch,
        history,
    };
    println!("\n{r}");
    println!(
        "error: dense {:.2}% → compressed {:.2}%; MACs {:.2}× fewer; measured speed-up {:.2}× (batch {batch}); trained in {:.0} s",
        100.0 * dense_error,
        100.0 * compressed_error,
        r.macs_ratio(),
        speedup,
        train_seconds
    );
    let json = serde_json::to_string_pretty(&report)?;
    candle_sbp::net::write_atomic(&args.report, json.as_bytes())?;
    println!(
        "report: {}; compressed model: {}",
        args.report.display(),
        args.out.display()
    );
    Ok(())
}
