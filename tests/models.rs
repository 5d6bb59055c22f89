//! The paper's networks: shapes, unit counts, MACs, and exact compression.

mod common;

use candle::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_sbp::models::{lenet5_caffe, lenet_300_100, lenet_500_300, vgg_like};
use candle_sbp::report::{layer_stats, total_macs};
use candle_sbp::{compress, CompressConfig, LogNormalDropoutConfig, Net};
use common::*;

fn build(
    f: impl Fn(Option<LogNormalDropoutConfig>, VarBuilder) -> candle_sbp::Result<Net>,
    sbp: bool,
) -> Net {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let net = f(sbp.then(LogNormalDropoutConfig::default), vb).unwrap();
    net.reset_parameters(11).unwrap();
    net
}

fn units(net: &Net) -> Vec<usize> {
    layer_stats(net).iter().skip(1).map(|l| l.units).collect()
}

#[test]
fn paper_networks_have_the_paper_sizes() {
    for sbp in [false, true] {
        let mlp = build(lenet_500_300, sbp);
        assert_eq!(units(&mlp), [500, 300, 10]);
        assert_eq!(total_macs(&mlp), 784 * 500 + 500 * 300 + 300 * 10);
        assert_eq!(mlp.noise_layers().len(), if sbp { 3 } else { 0 });
        let small = build(lenet_300_100, sbp);
        assert_eq!(total_macs(&small), 784 * 300 + 300 * 100 + 100 * 10);
        let lenet5 = build(lenet5_caffe, sbp);
        assert_eq!(units(&lenet5), [20, 50, 500, 10]);
        assert_eq!(layer_stats(&lenet5)[3].inputs, 800);
        assert_eq!(lenet5.noise_layers().len(), if sbp { 4 } else { 0 });
        let vgg = build(|s, vb| vgg_like(0.125, s, vb), sbp);
        assert_eq!(
            units(&vgg),
            [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64, 64, 10]
        );
        assert_eq!(vgg.noise_layers().len(), if sbp { 15 } else { 0 });
        let xs = Tensor::rand(0f32, 1., (2, 3, 32, 32), &Device::Cpu).unwrap();
        assert_eq!(vgg.forward_t(&xs, true).unwrap().dims(), &[2, 10]);
    }
}

#[test]
fn paper_networks_compress_exactly() {
    for (name, net) in [
        ("lenet_500_300", build(lenet_500_300, true)),
        ("lenet5", build(lenet5_caffe, true)),
        ("vgg", build(|s, vb| vgg_like(0.125, s, vb), true)),
    ] {
        randomise(&net, 3);
        set_noise_keeps(&net, 5, 0.7);
        let small = compress(&net, &CompressConfig::default()).unwrap();
        let xs = random_input(&net, 3, 1);
        let err = relative_error(
            &net.forward_t(&xs, false).unwrap(),
            &small.net.forward_t(&xs, false).unwrap(),
        );
        assert!(err < 1e-5, "{name}: {err}");
        assert!(small.report.macs_ratio() > 2.0, "{name}\n{}", small.report);
        assert!(
            small.report.notes.is_empty(),
            "{name}: {:?}",
            small.report.notes
        );
    }
}
