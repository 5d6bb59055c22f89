//! LeNet5-Caffe on MNIST with Structured Bayesian Pruning: pretrain the dense network,
//! train with SBP from it, compress, and report error, units, MACs and measured speed-up.
//!
//!     cargo run --release --example lenet5_mnist -- --help

mod common;

fn main() -> anyhow::Result<()> {
    common::mnist_main("lenet5_mnist", &candle_sbp::models::lenet5_caffe)
}
