//! The optimiser, the objective and the learning-rate schedule.

use std::collections::BTreeMap;

use candle::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use candle_sbp::models::lenet_mlp;
use candle_sbp::train::{check_finite, elbo, linear_decay_factor, Adam, AdamConfig};
use candle_sbp::{Error, LogNormalDropoutConfig, Net};

fn mlp(varmap: &VarMap) -> Net {
    let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
    let net = lenet_mlp(&[16], Some(LogNormalDropoutConfig::default()), vb).unwrap();
    net.reset_parameters(5).unwrap();
    net
}

fn batch() -> (Tensor, Tensor) {
    let xs = Tensor::arange(0f32, 8.0 * 784.0, &Device::Cpu)
        .unwrap()
        .reshape((8, 1, 28, 28))
        .unwrap()
        .sin()
        .unwrap();
    let ys = Tensor::new(&[0u32, 1, 2, 3, 4, 5, 6, 7], &Device::Cpu).unwrap();
    (xs, ys)
}

fn values(net: &Net) -> Vec<f32> {
    net.named_params()
        .iter()
        .flat_map(|(_, t)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

#[test]
fn adam_matches_candle_adamw_and_restores_exactly() {
    let (xs, ys) = batch();
    let cfg = AdamConfig {
        lr: 1e-2,
        beta1: 0.95,
        ..Default::default()
    };
    let (va, vb) = (VarMap::new(), VarMap::new());
    let (a, b) = (mlp(&va), mlp(&vb));
    let mut ours = Adam::new(&a, cfg, cfg).unwrap();
    let params = candle_nn::ParamsAdamW {
        lr: 1e-2,
        beta1: 0.95,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let trainable: Vec<Var> = b
        .named_params()
        .into_iter()
        .filter(|(n, _)| !n.contains("running"))
        .map(|(_, t)| Var::from_tensor(&t).unwrap())
        .collect();
    let mut theirs = candle_nn::AdamW::new(trainable, params).unwrap();
    let loss = |net: &Net| {
        net.reseed(1);
        let logits = net.forward_t(&xs, true).unwrap();
        elbo(net, &logits, &ys, 100, 1.0, &BTreeMap::new())
            .unwrap()
            .loss
    };
    for _ in 0..5 {
        ours.backward_step(&loss(&a)).unwrap();
        theirs.backward_step(&loss(&b)).unwrap();
    }
    let (x, y) = (values(&a), values(&b));
    let worst = x
        .iter()
        .zip(&y)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-6, "{worst}");

    // Saving and restoring the state continues the same trajectory.
    let (state, step) = ours.state();
    let state: BTreeMap<String, Tensor> = state
        .into_iter()
        .map(|(n, t)| (n, t.copy().unwrap()))
        .collect();
    let vc = VarMap::new();
    let c = mlp(&vc);
    for ((_, src), (_, dst)) in a.named_params().iter().zip(c.named_params()) {
        Var::from_tensor(&dst).unwrap().set(src).unwrap();
    }
    let mut resumed = Adam::new(&c, cfg, cfg).unwrap();
    resumed.restore(&state, step).unwrap();
    for _ in 0..2 {
        ours.backward_step(&loss(&a)).unwrap();
        resumed.backward_step(&loss(&c)).unwrap();
    }
    assert!(
        values(&a) == values(&c),
        "the resumed run follows the same trajectory"
    );
    assert_eq!(resumed.step_count(), 7);
    let mut partial = state.clone();
    partial.remove("fc1.weight.adam_m");
    assert!(matches!(
        Adam::new(&c, cfg, cfg).unwrap().restore(&partial, 3),
        Err(Error::InvalidConfig { .. })
    ));
}

#[test]
fn elbo_adds_weighted_kl_over_n() {
    let varmap = VarMap::new();
    let net = mlp(&varmap);
    let (xs, ys) = batch();
    let logits = net.forward_t(&xs, false).unwrap();
    let total_kl: f64 = net
        .noise_layers()
        .iter()
        .map(|(_, l)| l.kl_per_unit().unwrap().iter().sum::<f64>())
        .sum();
    let plain = elbo(&net, &logits, &ys, 1000, 1.0, &BTreeMap::new()).unwrap();
    assert!((plain.kl - total_kl / 1000.0).abs() < 1e-6 * plain.kl.abs().max(1.0));
    let loss = plain.loss.to_scalar::<f32>().unwrap() as f64;
    assert!((loss - plain.cross_entropy - plain.kl).abs() < 1e-4);
    let weights = BTreeMap::from([("sbp0".to_string(), 0.0)]);
    let weighted = elbo(&net, &logits, &ys, 1000, 2.0, &weights).unwrap();
    let sbp1: f64 = net.noise_layers()[1].1.kl_per_unit().unwrap().iter().sum();
    assert!((weighted.kl - 2.0 * sbp1 / 1000.0).abs() < 1e-6);
    assert!(elbo(&net, &logits, &ys, 0, 1.0, &weights).is_err());
}

#[test]
fn schedule_and_finiteness() {
    assert_eq!(linear_decay_factor(0, 100, 200), 1.0);
    assert_eq!(linear_decay_factor(99, 100, 200), 1.0);
    assert_eq!(linear_decay_factor(100, 100, 200), 1.0);
    assert_eq!(linear_decay_factor(150, 100, 200), 0.5);
    assert!((linear_decay_factor(199, 100, 200) - 0.01).abs() < 1e-12);
    assert_eq!(linear_decay_factor(5, 10, 10), 1.0);

    let varmap = VarMap::new();
    let net = mlp(&varmap);
    check_finite(&net).unwrap();
    let w = net.param(net.node_index("fc1").unwrap(), "weight").unwrap();
    let mut v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[17] = f32::NAN;
    Var::from_tensor(w)
        .unwrap()
        .set(&Tensor::from_vec(v, w.dims(), &Device::Cpu).unwrap())
        .unwrap();
    match check_finite(&net) {
        Err(Error::NonFinite {
            layer, name, index, ..
        }) => assert_eq!(
            (layer.as_str(), name.as_str(), index),
            ("fc1", "weight", 17)
        ),
        other => panic!("{other:?}"),
    }
}
