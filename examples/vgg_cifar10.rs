//! The VGG-like network on CIFAR-10 with Structured Bayesian Pruning. On a CPU the default
//! is a narrow network (`--width 0.25`) and a short schedule; the paper's configuration is
//! `--width 1 --epochs 200`, on a GPU with `--features cuda` (`--device` picks it by default).
//!
//!     cargo run --release --example vgg_cifar10 -- --help

mod common;

use anyhow::Context;
use candle_nn::VarBuilder;
use candle_sbp::data::{cifar10, data_dir};
use candle_sbp::models::vgg_like;
use candle_sbp::LogNormalDropoutConfig;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "VGG-like on CIFAR-10: dense pretraining, SBP, compression, report")]
struct Args {
    /// Width multiplier of every layer (1: the paper's 64…512 channels).
    #[arg(long, default_value_t = 0.25)]
    width: f64,
    #[command(flatten)]
    common: common::Args,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = data_dir(args.common.data_dir.as_deref()).join("cifar10");
    #[cfg(feature = "download")]
    candle_sbp::data::download::ensure_cifar10(&dir)?;
    let data =
        cifar10::load(&dir).with_context(|| format!("reading CIFAR-10 from {}", dir.display()))?;
    let width = args.width;
    let model =
        move |sbp: Option<LogNormalDropoutConfig>, vb: VarBuilder<'_>| vgg_like(width, sbp, vb);
    common::main_with(
        candle_sbp::recipe::PaperNet::VggLike,
        &model,
        &args.common,
        data.train,
        &data.test,
    )
}
