//! Criteria and selection on small nets with known answers.

use candle::{DType, Device, Tensor, Var};
use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
use candle_sbp::coupling::{coupling_groups, CouplingGroup};
use candle_sbp::criteria::{
    select, ActivationStats, Apoz, Criterion, MeanActivation, Random, Selection, Snr, WeightNorm,
};
use candle_sbp::data::ImageSet;
use candle_sbp::net::{NetBuilder, NodeShape};
use candle_sbp::{Error, LogNormalDropoutConfig, Net};

fn set(net: &Net, node: &str, param: &str, values: Vec<f32>) {
    let t = net.param(net.node_index(node).unwrap(), param).unwrap();
    Var::from_tensor(t)
        .unwrap()
        .set(&Tensor::from_vec(values, t.dims(), &Device::Cpu).unwrap())
        .unwrap();
}

/// 1×4×4 images → conv (4 filters 3×3) → relu → flatten → fc (5) → relu → noise → fc (2).
fn net(varmap: &VarMap) -> Net {
    let vb = VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu);
    let mut b = NetBuilder::new(NodeShape::image(1, 4, 4), vb);
    let x = b.input();
    let x = b.conv2d("conv", x, 4, 3, Conv2dConfig::default()).unwrap();
    let x = b.relu(x).unwrap();
    let x = b.flatten(x).unwrap();
    let x = b.linear("fc", x, 5).unwrap();
    let x = b.relu(x).unwrap();
    let x = b
        .log_normal_dropout("sbp", x, LogNormalDropoutConfig::default())
        .unwrap();
    let x = b.linear("out", x, 2).unwrap();
    let net = b.build(x).unwrap();
    net.reset_parameters(1).unwrap();
    net
}

fn images(n: usize) -> ImageSet {
    ImageSet {
        pixels: (0..n * 16).map(|i| (i * 37 % 251) as u8).collect(),
        labels: vec![0; n],
        channels: 1,
        height: 4,
        width: 4,
    }
}

fn group<'a>(groups: &'a [CouplingGroup], producer: &str) -> &'a CouplingGroup {
    groups
        .iter()
        .find(|g| g.producers.iter().any(|p| p.node == producer))
        .unwrap()
}

fn argmin(v: &[f64]) -> usize {
    (0..v.len()).min_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap()
}

#[test]
fn a_dead_unit_scores_lowest_on_activations() {
    let vm = VarMap::new();
    let net = net(&vm);
    // fc unit 2 never fires: zero weights, negative bias. The others get a positive bias.
    let mut w = net
        .param(net.node_index("fc").unwrap(), "weight")
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    w[2 * 16..3 * 16].iter_mut().for_each(|v| *v = 0.0);
    set(&net, "fc", "weight", w);
    set(&net, "fc", "bias", vec![3.0, 3.0, -1.0, 3.0, 3.0]);
    let groups = coupling_groups(&net);
    let stats = ActivationStats::gather(&net, &groups, &images(20), 7, false).unwrap();
    let fc = group(&groups, "fc");
    let mean = MeanActivation.scores(&net, fc, Some(&stats)).unwrap();
    let apoz = Apoz.scores(&net, fc, Some(&stats)).unwrap();
    assert_eq!(argmin(&mean), 2);
    assert_eq!(mean[2], 0.0);
    assert_eq!(apoz[2], 0.0, "all zeros: 1 - APoZ = 0");
    assert!(apoz.iter().enumerate().all(|(j, &s)| j == 2 || s > 0.0));
    // Conv channels are averaged over positions; without statistics it is an error.
    assert_eq!(
        MeanActivation
            .scores(&net, group(&groups, "conv"), Some(&stats))
            .unwrap()
            .len(),
        4
    );
    assert!(matches!(
        Apoz.scores(&net, fc, None),
        Err(Error::InvalidConfig { .. })
    ));
}

#[test]
fn a_zero_filter_scores_lowest_on_weight_norm() {
    let vm = VarMap::new();
    let net = net(&vm);
    let mut w = net
        .param(net.node_index("conv").unwrap(), "weight")
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    w[9..18].iter_mut().for_each(|v| *v = 0.0);
    set(&net, "conv", "weight", w);
    let groups = coupling_groups(&net);
    for norm in [WeightNorm::l1(), WeightNorm::l2()] {
        let s = norm.scores(&net, group(&groups, "conv"), None).unwrap();
        assert_eq!(argmin(&s), 1);
        assert_eq!(s[1], 0.0);
    }
    assert!(WeightNorm { p: 3 }
        .scores(&net, group(&groups, "conv"), None)
        .is_err());
}

#[test]
fn snr_and_random() {
    let vm = VarMap::new();
    let net = net(&vm);
    set(&net, "sbp", "mu", vec![0.0, 0.0, 0.0, -12.0, 0.0]);
    set(&net, "sbp", "log_sigma", vec![-5.0, -5.0, -5.0, 1.5, -5.0]);
    let groups = coupling_groups(&net);
    let fc = group(&groups, "fc");
    let snr = Snr.scores(&net, fc, None).unwrap();
    assert_eq!(argmin(&snr), 3);
    assert!(snr[3] < 1.0 && snr[0] > 100.0);
    assert!(
        Snr.scores(&net, group(&groups, "conv"), None).is_err(),
        "no noise on the conv"
    );
    let a = Random { seed: 1 }.scores(&net, fc, None).unwrap();
    assert_eq!(a, Random { seed: 1 }.scores(&net, fc, None).unwrap());
    assert_ne!(a, Random { seed: 2 }.scores(&net, fc, None).unwrap());
}

#[test]
fn selection_modes() {
    let scores = vec![vec![0.4, 0.1, 0.3, 0.2], vec![10.0, 20.0]];
    let all = vec![vec![true; 4], vec![true; 2]];
    let per = select(&scores, &all, Selection::PerLayer { drop: 0.5 }, 1).unwrap();
    assert_eq!(per, vec![vec![true, false, true, false], vec![false, true]]);
    // Units already gone stay gone and are not counted again.
    let again = select(&scores, &per, Selection::PerLayer { drop: 0.5 }, 1).unwrap();
    assert_eq!(
        again,
        vec![vec![true, false, false, false], vec![false, true]]
    );
    // Global without normalisation: the small scores of group 0 all go first; min_units
    // keeps one of them.
    let global = select(
        &scores,
        &all,
        Selection::Global {
            drop: 0.5,
            normalize: false,
        },
        1,
    )
    .unwrap();
    assert_eq!(
        global,
        vec![vec![true, false, false, false], vec![true, true]]
    );
    // With normalisation the layers compare by relative score.
    let norm = select(
        &scores,
        &all,
        Selection::Global {
            drop: 0.5,
            normalize: true,
        },
        1,
    )
    .unwrap();
    assert_eq!(norm.iter().flatten().filter(|&&k| !k).count(), 3);
    assert!(!norm[1][0], "10 is small relative to its layer");
    let thr = select(&scores, &all, Selection::Threshold { min_score: 0.25 }, 1).unwrap();
    assert_eq!(thr, vec![vec![true, false, true, false], vec![true, true]]);
    let target = select(&scores, &all, Selection::TargetPerLayer { keep: 0.25 }, 1).unwrap();
    assert_eq!(
        target,
        vec![vec![true, false, false, false], vec![false, true]]
    );
    let tg = select(
        &scores,
        &all,
        Selection::TargetGlobal {
            keep: 0.5,
            normalize: false,
        },
        0,
    )
    .unwrap();
    assert_eq!(tg.iter().flatten().filter(|&&k| k).count(), 3);
    assert!(select(&scores, &all, Selection::PerLayer { drop: 1.5 }, 1).is_err());
    assert!(select(
        &[vec![f64::NAN; 4], vec![0.0; 2]],
        &all,
        Selection::PerLayer { drop: 0.5 },
        1
    )
    .is_err());
    assert!(select(&scores[..1], &all, Selection::PerLayer { drop: 0.5 }, 1).is_err());
}

#[test]
fn schedules_at_known_points() {
    use candle_sbp::schedule::{agp_sparsity, iterative_cycles, one_cycle_sparsity};
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    assert!(close(agp_sparsity(0.0, 0.0, 0.8).unwrap(), 0.0));
    assert!(close(
        agp_sparsity(0.5, 0.0, 0.8).unwrap(),
        0.8 - 0.8 * 0.125
    ));
    assert!(close(agp_sparsity(1.0, 0.0, 0.8).unwrap(), 0.8));
    // One-cycle: s(1) = s_f exactly; s(0) = s_i + (s_f - s_i)(1 + e^-8)/(1 + e^6), almost s_i.
    let s0 = one_cycle_sparsity(0.0, 0.0, 0.8).unwrap();
    assert!(close(s0, 0.8 * (1.0 + (-8f64).exp()) / (1.0 + 6f64.exp())) && s0 < 0.002);
    assert!(close(
        one_cycle_sparsity(0.5, 0.0, 0.8).unwrap(),
        0.8 * (1.0 + (-8f64).exp()) / (1.0 + (-1f64).exp())
    ));
    assert!(close(one_cycle_sparsity(1.0, 0.0, 0.8).unwrap(), 0.8));
    assert!(agp_sparsity(1.5, 0.0, 0.8).is_err());
    // DropNet: 0.8^4 = 0.41 > 0.4, 0.8^5 = 0.33.
    assert_eq!(iterative_cycles(0.2, 0.4).unwrap(), 5);
    assert!(iterative_cycles(0.0, 0.4).is_err());
}
