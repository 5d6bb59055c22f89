//! compress() of LeNet5-Caffe with half of every SBP layer's units removed.

mod common;

use candle_sbp::{compress, CompressConfig};
use criterion::{criterion_group, criterion_main, Criterion};

fn compress_lenet5(c: &mut Criterion) {
    let net = common::half_pruned(candle_sbp::models::lenet5_caffe);
    c.bench_function("compress/lenet5", |b| {
        b.iter(|| compress(&net, &CompressConfig::default()).expect("compress"))
    });
}

criterion_group!(benches, compress_lenet5);
criterion_main!(benches);
