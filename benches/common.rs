//! What the benches share: the paper's networks, seeded batches of MNIST's shape, and an
//! SBP network trained for a few steps so that compress() has something to remove.
#![allow(dead_code)]

use candle::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_sbp::{LogNormalDropoutConfig, Net};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// As in the examples: glibc's allocator returns large freed blocks to the system and faults
// fresh pages in on every step (a third of a LeNet5 step, in page faults and TLB
// shootdowns), which would measure the allocator rather than the kernels.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub type Build = fn(Option<LogNormalDropoutConfig>, VarBuilder) -> candle_sbp::Result<Net>;

/// The paper's two MNIST networks, by bench name.
pub const NETS: [(&str, Build); 2] = [
    ("lenet5", candle_sbp::models::lenet5_caffe),
    ("lenet500_300", candle_sbp::models::lenet_500_300),
];

/// A seeded network, with SBP layers or without.
pub fn net(build: Build, sbp: bool) -> Net {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let net = build(sbp.then(LogNormalDropoutConfig::default), vb).expect("the model builds");
    net.reset_parameters(0).expect("seeded initialisation");
    net
}

/// A seeded batch of `n` MNIST-shaped images (pixels in [0, 1]) and labels.
pub fn batch(n: usize, seed: u64) -> (Tensor, Tensor) {
    let mut rng = StdRng::seed_from_u64(seed);
    let x: Vec<f32> = (0..n * 784).map(|_| rng.random::<f32>()).collect();
    let y: Vec<u32> = (0..n).map(|_| rng.random_range(0..10)).collect();
    (
        Tensor::from_vec(x, (n, 1, 28, 28), &Device::Cpu).expect("batch"),
        Tensor::from_vec(y, n, &Device::Cpu).expect("labels"),
    )
}

/// An SBP network whose noise layers remove every other unit (a broad `log θ`, μ = -10,
/// log σ = 2, has an SNR far below 1), as after SBP training: the compressed network keeps
/// about half of each layer's units.
pub fn half_pruned(build: Build) -> Net {
    let net = net(build, true);
    for (_, layer) in net.noise_layers() {
        let n = layer.num_units();
        let pick = |keep: f32, drop: f32| -> Tensor {
            let v: Vec<f32> = (0..n)
                .map(|i| if i % 2 == 0 { keep } else { drop })
                .collect();
            Tensor::from_vec(v, n, &Device::Cpu).expect("values")
        };
        for (param, values) in [
            (layer.mu(), pick(0.0, -10.0)),
            (layer.log_sigma(), pick(-5.0, 2.0)),
        ] {
            candle::Var::from_tensor(param)
                .and_then(|v| v.set(&values))
                .expect("set a noise parameter");
        }
        assert!(
            layer.num_kept().expect("SNR") <= n.div_ceil(2),
            "{}",
            layer.name()
        );
    }
    net
}
