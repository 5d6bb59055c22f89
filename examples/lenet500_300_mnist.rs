//! LeNet-500-300 on MNIST with Structured Bayesian Pruning (noise on the 784 input pixels and on
//! each hidden layer): pretrain, train with SBP, compress, report.
//!
//!     cargo run --release --example lenet500_300_mnist -- --help

mod common;

use anyhow::Context;
use candle_sbp::data::{data_dir, mnist};
use candle_sbp::models::lenet_500_300;
use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = common::Args::parse();
    let dir = data_dir(args.data_dir.as_deref()).join("mnist");
    let data =
        mnist::load(&dir).with_context(|| format!("reading MNIST from {}", dir.display()))?;
    common::main_with(
        "lenet500_300_mnist",
        "mnist",
        &lenet_500_300,
        &args,
        data.train,
        &data.test,
    )
}
