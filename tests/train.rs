//! The optimiser, the objective and the learning-rate schedule.

mod common;

use std::collections::BTreeMap;

use candle::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use candle_sbp::data::ImageSet;
use candle_sbp::models::lenet_mlp;
use candle_sbp::train::{
    check_finite, elbo, fit, kl_warmup_factor, linear_decay_factor, Adam, AdamConfig, FitConfig,
    Flow,
};
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
    // The moments hold no autograd history (which would leak memory step after step).
    assert!(ours.state().unwrap().0.iter().all(|(_, t)| !t.track_op()));
    let (x, y) = (values(&a), values(&b));
    let worst = x
        .iter()
        .zip(&y)
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-6, "{worst}");

    // Saving and restoring the state continues the same trajectory.
    let (state, step) = ours.state().unwrap();
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

    // The KL warm-up at t = 0, 0.5 and 1 of a 4-epoch warm-up of 100 steps an epoch.
    assert_eq!(kl_warmup_factor(0, 0, 100, 4), 0.0);
    assert_eq!(kl_warmup_factor(2, 0, 100, 4), 0.5);
    assert_eq!(kl_warmup_factor(1, 50, 100, 4), 0.375);
    assert_eq!(kl_warmup_factor(4, 0, 100, 4), 1.0);
    assert_eq!(kl_warmup_factor(9, 99, 100, 4), 1.0);
    assert_eq!(kl_warmup_factor(0, 0, 100, 0), 1.0);

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

mod fitting {
    use super::*;
    use candle_sbp::data::{mnist, ImageSet};
    use candle_sbp::train::{fit, FitConfig};

    fn synthetic(n: usize) -> ImageSet {
        // Class c lights up row c of the image: learnable in a few steps.
        let mut pixels = vec![0u8; n * 784];
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        for (i, &c) in labels.iter().enumerate() {
            for x in 0..28 {
                pixels[i * 784 + (c as usize * 2) * 28 + x] = 200 + (i % 7) as u8;
            }
        }
        ImageSet {
            pixels,
            labels,
            channels: 1,
            height: 28,
            width: 28,
        }
    }

    fn config(epochs: usize, dir: Option<std::path::PathBuf>) -> FitConfig {
        FitConfig {
            epochs,
            batch_size: 50,
            weights: AdamConfig {
                lr: 1e-2,
                ..Default::default()
            },
            noise: AdamConfig {
                lr: 1e-2,
                ..Default::default()
            },
            constant_epochs: 1,
            seed: 3,
            checkpoint: dir,
            progress: false,
            ..Default::default()
        }
    }

    #[test]
    fn an_interrupted_run_resumes_with_nothing_lost() {
        let data = synthetic(400);
        let straight = VarMap::new();
        let mut a = mlp(&straight);
        let history = fit(&mut a, &data, &config(3, None), |_, _| Ok(Flow::Continue)).unwrap();
        assert_eq!(history.len(), 3);
        assert!(history[2].train_error < 0.2, "{history:?}");

        let dir = tempfile::tempdir().unwrap();
        let ckpt = dir.path().join("run");
        let vm = VarMap::new();
        let mut b = mlp(&vm);
        // "Interrupted" after the second epoch.
        let mut seen = 0;
        let stop = fit(&mut b, &data, &config(3, Some(ckpt.clone())), |_, s| {
            seen += 1;
            if s.epoch == 1 {
                Err(Error::InvalidConfig {
                    layer: "test".into(),
                    reason: "interrupt".into(),
                })
            } else {
                Ok(Flow::Continue)
            }
        });
        assert!(stop.is_err() && seen == 2);
        let files: Vec<String> = std::fs::read_dir(&ckpt)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into())
            .collect();
        assert!(
            files.contains(&"net-epoch2.safetensors".to_string())
                && !files.contains(&"net-epoch1.safetensors".to_string()),
            "{files:?}"
        );
        let vm2 = VarMap::new();
        let mut c = mlp(&vm2);
        let resumed = fit(&mut c, &data, &config(3, Some(ckpt)), |_, _| {
            Ok(Flow::Continue)
        })
        .unwrap();
        assert_eq!(resumed.len(), 3);
        assert_eq!(
            resumed[..2].iter().map(|s| s.loss).collect::<Vec<_>>(),
            history[..2].iter().map(|s| s.loss).collect::<Vec<_>>()
        );
        assert!(
            values(&a) == values(&c),
            "resumed weights equal the uninterrupted run's"
        );
    }

    #[test]
    fn a_non_finite_loss_stops_with_the_step_and_parameter() {
        let vm = VarMap::new();
        let mut net = mlp(&vm);
        let w = net
            .param(net.node_index("fc2").unwrap(), "weight")
            .unwrap()
            .clone();
        let mut v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[3] = f32::INFINITY;
        Var::from_tensor(&w)
            .unwrap()
            .set(&Tensor::from_vec(v, w.dims(), &Device::Cpu).unwrap())
            .unwrap();
        match fit(&mut net, &synthetic(100), &config(1, None), |_, _| {
            Ok(Flow::Continue)
        }) {
            Err(Error::Diverged {
                epoch,
                step,
                reason,
            }) => {
                assert_eq!((epoch, step), (0, 1));
                assert!(
                    reason.contains("fc2") && reason.contains("weight[3]"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn learns_real_mnist_and_prunes() {
        let Some(dir) = common::real_data("mnist") else {
            return;
        };
        let m = mnist::load(dir).unwrap();
        let n = 3000;
        let sub = ImageSet {
            pixels: m.train.pixels[..n * 784].to_vec(),
            labels: m.train.labels[..n].to_vec(),
            ..m.train.clone()
        };
        let vm = VarMap::new();
        let mut net = mlp(&vm);
        // A larger noise learning rate, so that pruning shows within 240 steps.
        let cfg = FitConfig {
            kl_scale: 1.0,
            noise: AdamConfig {
                lr: 0.1,
                ..Default::default()
            },
            constant_epochs: 4,
            ..config(4, None)
        };
        let history = fit(&mut net, &sub, &cfg, |_, _| Ok(Flow::Continue)).unwrap();
        let idx: Vec<usize> = (0..1000).collect();
        let (xs, ys) = m.test.batch(&idx, &Device::Cpu).unwrap();
        let pred = net.forward_t(&xs, false).unwrap().argmax(1).unwrap();
        let acc = pred
            .eq(&ys)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        println!("{history:?}\ntest accuracy {acc}");
        assert!(acc > 0.8, "test accuracy {acc}");
        assert!(
            history.last().unwrap().units_kept[0] < 784,
            "the input layer lost pixels: {:?}",
            history.last().unwrap().units_kept
        );
    }
}

/// Eight synthetic 28×28 images a class, so that a run takes milliseconds.
fn synthetic_set() -> ImageSet {
    let n = 80;
    let pixels = (0..n * 784)
        .map(|i| ((i * 7919 + (i / 784) * 31) % 251) as u8)
        .collect();
    ImageSet {
        pixels,
        labels: (0..n).map(|i| (i % 10) as u8).collect(),
        channels: 1,
        height: 28,
        width: 28,
    }
}

#[test]
fn kl_warmup_scales_the_first_epochs_kl_term() {
    let data = synthetic_set();
    let run = |warmup: usize| {
        let varmap = VarMap::new();
        let mut net = mlp(&varmap);
        let cfg = FitConfig {
            epochs: 3,
            batch_size: 20,
            kl_warmup_epochs: warmup,
            progress: false,
            ..Default::default()
        };
        fit(&mut net, &data, &cfg, |_, _| Ok(Flow::Continue)).unwrap()
    };
    let (full, warm) = (run(0), run(2));
    // Epoch 0's four steps carry factors 0, 1/8, 2/8, 3/8 (mean 3/16), epoch 1's
    // 4/8 … 7/8 (mean 11/16), epoch 2's 1; the KL itself moves little in three epochs.
    let ratio = |e: usize| warm[e].kl / full[e].kl;
    assert!((ratio(0) - 3.0 / 16.0).abs() < 0.02, "{}", ratio(0));
    assert!((ratio(1) - 11.0 / 16.0).abs() < 0.05, "{}", ratio(1));
    assert!((ratio(2) - 1.0).abs() < 0.05, "{}", ratio(2));
}

#[test]
fn a_kl_weight_for_no_noise_layer_is_a_typed_error() {
    let varmap = VarMap::new();
    let mut net = mlp(&varmap);
    let cfg = FitConfig {
        epochs: 1,
        kl_weights: [("sbp9".to_string(), 2.0)].into_iter().collect(),
        progress: false,
        ..Default::default()
    };
    match fit(&mut net, &synthetic_set(), &cfg, |_, _| Ok(Flow::Continue)) {
        Err(Error::InvalidConfig { layer, reason }) => {
            assert_eq!(layer, "sbp9");
            assert!(reason.contains("sbp0"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}
