//! Low-level surgery: each shrunk layer reproduces the original on the kept units.

use candle::{DType, Device, Module, ModuleT, Tensor};
use candle_nn::{BatchNorm, Conv2d, Conv2dConfig, Linear};
use candle_sbp::surgery::*;
use candle_sbp::Error;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn rand_tensor(shape: &[usize], rng: &mut StdRng) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    a.sub(b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// `x` with the channels (dim 1) not in `keep` set to zero, and `x` restricted to `keep`.
fn zeroed_and_selected(x: &Tensor, keep: &[usize]) -> (Tensor, Tensor) {
    let c = x.dim(1).unwrap();
    let mask: Vec<f32> = (0..c)
        .map(|i| if keep.contains(&i) { 1.0 } else { 0.0 })
        .collect();
    let mut shape = vec![1; x.rank()];
    shape[1] = c;
    let mask = Tensor::from_vec(mask, shape, &Device::Cpu).unwrap();
    let idx = Tensor::from_vec(
        keep.iter().map(|&k| k as u32).collect::<Vec<_>>(),
        keep.len(),
        &Device::Cpu,
    )
    .unwrap();
    (
        x.broadcast_mul(&mask).unwrap(),
        x.index_select(&idx, 1).unwrap(),
    )
}

fn select(x: &Tensor, keep: &[usize], dim: usize) -> Tensor {
    let idx = Tensor::from_vec(
        keep.iter().map(|&k| k as u32).collect::<Vec<_>>(),
        keep.len(),
        &Device::Cpu,
    )
    .unwrap();
    x.index_select(&idx, dim).unwrap()
}

const KEEP: [usize; 3] = [0, 2, 5];

#[test]
fn linear_outputs_and_inputs() {
    let mut rng = StdRng::seed_from_u64(1);
    let l = Linear::new(
        rand_tensor(&[6, 6], &mut rng),
        Some(rand_tensor(&[6], &mut rng)),
    );
    let x = rand_tensor(&[4, 6], &mut rng);
    let small = linear_keep_outputs(&l, &KEEP, "fc").unwrap();
    assert!(
        max_diff(
            &small.forward(&x).unwrap(),
            &select(&l.forward(&x).unwrap(), &KEEP, 1)
        ) < 1e-6
    );
    let small = linear_keep_inputs(&l, &KEEP, "fc").unwrap();
    let (zeroed, selected) = zeroed_and_selected(&x, &KEEP);
    assert!(
        max_diff(
            &small.forward(&selected).unwrap(),
            &l.forward(&zeroed).unwrap()
        ) < 1e-6
    );
}

#[test]
fn conv_outputs_inputs_and_depthwise() {
    let mut rng = StdRng::seed_from_u64(2);
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let c = Conv2d::new(
        rand_tensor(&[6, 6, 3, 3], &mut rng),
        Some(rand_tensor(&[6], &mut rng)),
        cfg,
    );
    let x = rand_tensor(&[2, 6, 5, 5], &mut rng);
    let small = conv2d_keep_outputs(&c, &KEEP, "conv").unwrap();
    assert!(
        max_diff(
            &small.forward(&x).unwrap(),
            &select(&c.forward(&x).unwrap(), &KEEP, 1)
        ) < 1e-5
    );
    let small = conv2d_keep_inputs(&c, &KEEP, "conv").unwrap();
    let (zeroed, selected) = zeroed_and_selected(&x, &KEEP);
    assert!(
        max_diff(
            &small.forward(&selected).unwrap(),
            &c.forward(&zeroed).unwrap()
        ) < 1e-5
    );

    let dw_cfg = Conv2dConfig {
        groups: 6,
        padding: 1,
        ..Default::default()
    };
    let dw = Conv2d::new(
        rand_tensor(&[6, 1, 3, 3], &mut rng),
        Some(rand_tensor(&[6], &mut rng)),
        dw_cfg,
    );
    let small = conv2d_depthwise_keep_channels(&dw, &KEEP, "dw").unwrap();
    assert_eq!(small.config().groups, 3);
    let want = select(&dw.forward(&x).unwrap(), &KEEP, 1);
    assert!(max_diff(&small.forward(&select(&x, &KEEP, 1)).unwrap(), &want) < 1e-5);
}

#[test]
fn batch_norm_features() {
    let mut rng = StdRng::seed_from_u64(3);
    let var = rand_tensor(&[6], &mut rng)
        .abs()
        .unwrap()
        .affine(1.0, 0.5)
        .unwrap();
    let bn = BatchNorm::new(
        6,
        rand_tensor(&[6], &mut rng),
        var,
        rand_tensor(&[6], &mut rng),
        rand_tensor(&[6], &mut rng),
        1e-5,
    )
    .unwrap();
    let x = rand_tensor(&[2, 6, 3, 3], &mut rng);
    let small = batch_norm_keep_features(&bn, &KEEP, "bn").unwrap();
    let want = select(&bn.forward_t(&x, false).unwrap(), &KEEP, 1);
    let got = small.forward_t(&select(&x, &KEEP, 1), false).unwrap();
    assert!(max_diff(&got, &want) < 1e-6);
    assert_eq!(small.eps(), bn.eps());
}

#[test]
fn bad_keep_lists_and_layouts_are_typed_errors() {
    let mut rng = StdRng::seed_from_u64(4);
    let l = Linear::new(rand_tensor(&[6, 4], &mut rng), None);
    for (keep, needle) in [
        (
            vec![0, 6],
            "index 6 (position 1 of the keep list) is out of range: the layer has 6",
        ),
        (vec![2, 1], "strictly increasing"),
        (vec![1, 1], "strictly increasing"),
    ] {
        match linear_keep_outputs(&l, &keep, "fc7") {
            Err(e @ Error::Surgery { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains(needle) && msg.contains("fc7"), "{msg}");
            }
            other => panic!("expected a Surgery error, got {other:?}"),
        }
    }
    assert!(matches!(
        linear_keep_inputs(&l, &[4], "fc7"),
        Err(Error::Surgery { .. })
    ));
    let grouped = Conv2d::new(
        Tensor::zeros((4, 2, 3, 3), DType::F32, &Device::Cpu).unwrap(),
        None,
        Conv2dConfig {
            groups: 2,
            ..Default::default()
        },
    );
    for result in [
        conv2d_keep_outputs(&grouped, &[0], "g"),
        conv2d_keep_inputs(&grouped, &[0], "g"),
        conv2d_depthwise_keep_channels(&grouped, &[0], "g"),
    ] {
        assert!(matches!(result, Err(Error::Surgery { .. })));
    }
}
