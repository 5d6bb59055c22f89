//! LeNet-500-300 on MNIST with Structured Bayesian Pruning (noise on the 784 input pixels and on
//! each hidden layer): pretrain, train with SBP, compress, report.
//!
//!     cargo run --release --example lenet500_300_mnist -- --help

mod common;

fn main() -> anyhow::Result<()> {
    common::mnist_main(
        candle_sbp::recipe::PaperNet::LeNet500_300,
        &candle_sbp::models::lenet_500_300,
    )
}
