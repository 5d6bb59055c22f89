//! Eval-mode inference of the dense networks and of their compressed forms (half of every
//! SBP layer's units removed), at batch 1 and batch 100: through `Net::forward_t` and
//! through the networks' `InferencePlan`s.

mod common;

use std::time::Duration;

use candle_sbp::{compress, CompressConfig};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

fn inference(c: &mut Criterion) {
    let mut group = c.benchmark_group("inference");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(4));
    for (name, build) in common::NETS {
        let dense = common::net(build, false);
        let small =
            compress(&common::half_pruned(build), &CompressConfig::default()).expect("compress");
        println!(
            "{name}: MACs {} → {} ({:.2}× fewer)",
            small.report.macs_before,
            small.report.macs_after,
            small.report.macs_ratio()
        );
        let compressed = small.net;
        let plans = [
            ("dense", dense.inference_plan().expect("plan")),
            ("compressed", compressed.inference_plan().expect("plan")),
        ];
        for batch in [1usize, 100] {
            let (x, _) = common::batch(batch, 2);
            for (kind, net) in [("dense", &dense), ("compressed", &compressed)] {
                let id = BenchmarkId::new(format!("{name}/{kind}"), batch);
                group.bench_with_input(id, &x, |b, x| {
                    b.iter(|| net.forward_t(x, false).expect("forward"))
                });
            }
            for (kind, plan) in &plans {
                assert!(
                    plan.is_compiled(),
                    "{name}/{kind}: {:?}",
                    plan.not_compiled_because()
                );
                let id = BenchmarkId::new(format!("{name}/{kind}-plan"), batch);
                group.bench_with_input(id, &x, |b, x| b.iter(|| plan.forward(x).expect("forward")));
            }
        }
    }
    group.finish();
}

criterion_group!(benches, inference);
criterion_main!(benches);
