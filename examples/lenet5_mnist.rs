//! LeNet5-Caffe on MNIST with Structured Bayesian Pruning: pretrain the dense network,
//! train with SBP from it, compress, and report error, units, MACs and measured speed-up.
//!
//!     cargo run --release --example lenet5_mnist -- --help

mod common;

fn main() -> anyhow::Result<()> {
    common::mnist_main(
        candle_sbp::recipe::PaperNet::LeNet5Caffe,
        &candle_sbp::models::lenet5_caffe,
    )
}
