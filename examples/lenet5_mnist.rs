//! LeNet5-Caffe on MNIST with Structured Bayesian Pruning: pretrain the dense network,
//! train with SBP from it, compress, and report error, units, MACs and measured speed-up.
//!
//!     cargo run --release --example lenet5_mnist -- --help

mod common;

use anyhow::Context;
use candle_sbp::data::{data_dir, mnist};
use candle_sbp::models::lenet5_caffe;
use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = common::Args::parse();
    let dir = data_dir(args.data_dir.as_deref()).join("mnist");
    let data =
        mnist::load(&dir).with_context(|| format!("reading MNIST from {}", dir.display()))?;
    common::main_with(
        "lenet5_mnist",
        "mnist",
        &lenet5_caffe,
        &args,
        data.train,
        &data.test,
    )
}
