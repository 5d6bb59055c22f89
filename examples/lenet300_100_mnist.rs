//! LeNet-300-100 on MNIST with Structured Bayesian Pruning (noise on the 784 input pixels and on
//! each hidden layer): pretrain, train with SBP, compress, report.
//!
//!     cargo run --release --example lenet300_100_mnist -- --help

mod common;

fn main() -> anyhow::Result<()> {
    common::mnist_main(
        candle_sbp::recipe::PaperNet::LeNet300_100,
        &candle_sbp::models::lenet_300_100,
    )
}
