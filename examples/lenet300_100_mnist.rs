//! LeNet-300-100 on MNIST with Structured Bayesian Pruning (noise on the 784 input pixels and on
//! each hidden layer): pretrain, train with SBP, compress, report.
//!
//!     cargo run --release --example lenet300_100_mnist -- --help

mod common;

use anyhow::Context;
use candle_sbp::data::{data_dir, mnist};
use candle_sbp::models::lenet_300_100;
use clap::Parser;

fn main() -> anyhow::Result<()> {
    let args = common::Args::parse();
    let dir = data_dir(args.data_dir.as_deref()).join("mnist");
    let data =
        mnist::load(&dir).with_context(|| format!("reading MNIST from {}", dir.display()))?;
    common::main_with(
        "lenet300_100_mnist",
        "mnist",
        &lenet_300_100,
        &args,
        data.train,
        &data.test,
    )
}
