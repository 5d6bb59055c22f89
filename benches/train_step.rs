//! One training step (forward, ELBO, backward, Adam) at batch 100 of LeNet5-Caffe and
//! LeNet-500-300, with and without SBP layers.
//!
//! `cargo bench --bench train_step`; PyTorch's figures for the same steps come from
//! `cargo run --release --example speed -- --pytorch`.

mod common;

use std::time::Duration;

use candle_sbp::train::{elbo, Adam, AdamConfig};
use criterion::{criterion_group, criterion_main, Criterion};

fn train_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_step");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(8));
    let (x, y) = common::batch(100, 1);
    for (name, build) in common::NETS {
        for sbp in [false, true] {
            let net = common::net(build, sbp);
            let mut adam =
                Adam::new(&net, AdamConfig::default(), AdamConfig::default()).expect("optimiser");
            let weights = Default::default();
            let id = format!("{name}/{}", if sbp { "sbp" } else { "dense" });
            group.bench_function(id, |b| {
                b.iter(|| {
                    let logits = net.forward_t(&x, true).expect("forward");
                    let loss = elbo(&net, &logits, &y, 60_000, 1.0, &weights).expect("loss");
                    adam.backward_step(&loss.loss).expect("step");
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, train_step);
criterion_main!(benches);
