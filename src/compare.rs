//! SBP beside the structured criteria practitioners know, on the same network, data and
//! budget: test accuracy against the fraction of units (and of MACs) kept.

use candle::{DType, Device};
use candle_nn::{VarBuilder, VarMap};

use crate::compress::{compress, CompressConfig};
use crate::criteria::{Criterion, Selection};
use crate::data::ImageSet;
use crate::error::Result;
use crate::experiment::ModelFn;
use crate::layer::LogNormalDropoutConfig;
use crate::net::Net;
use crate::report::test_error;
use crate::schedule::{iterative, Between, IterativeConfig};
use crate::train::{fit, AdamConfig, FitConfig, Flow};

/// A method to compare.
pub enum Method {
    /// Structured Bayesian Pruning: dense pretraining, then SBP; a point per SBP epoch.
    Sbp,
    /// A criterion with DropNet's iterative schedule; a point per cycle.
    Iterative {
        /// Scores the units.
        criterion: Box<dyn Criterion>,
        /// Per layer or global.
        selection: Selection,
    },
}

/// One measurement: a method at one stage of pruning.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ComparePoint {
    /// The method's name.
    pub method: String,
    /// The cycle (iterative) or SBP epoch.
    pub stage: usize,
    /// Fraction of the hidden units (conv channels and linear outputs, not the logits)
    /// kept.
    pub units_kept: f64,
    /// Fraction of the MACs kept.
    pub macs_kept: f64,
    /// Test accuracy of the compressed network.
    pub test_accuracy: f64,
}

/// Settings of [`compare`].
#[derive(Debug, Clone)]
pub struct CompareConfig {
    /// Training per cycle (iterative) and for the dense pretraining (SBP).
    pub fit: FitConfig,
    /// Early-stopping patience of the iterative schedule.
    pub patience: usize,
    /// Fraction dropped per cycle.
    pub drop: f64,
    /// Cycles of the iterative schedule.
    pub cycles: usize,
    /// SBP epochs after pretraining.
    pub sbp_epochs: usize,
    /// Learning rate of the noise parameters.
    pub noise_lr: f64,
    /// Units every layer keeps.
    pub min_units: usize,
    /// Seed of every model.
    pub seed: u64,
}

/// Fractions of hidden units and of MACs that `net` keeps once compressed, and the
/// compressed network's test accuracy.
pub fn measure(net: &Net, test: &ImageSet) -> Result<(f64, f64, f64)> {
    measure_against(net, test, None)
}

/// Hidden units and MACs of `net` (its masks applied), the baseline of [`measure_against`].
pub fn size_of(net: &Net) -> Result<(usize, u64)> {
    let r = compress(net, &CompressConfig::default())?.report;
    let hidden = &r.layers[1..r.layers.len() - 1];
    Ok((hidden.iter().map(|l| l.units_after).sum(), r.macs_after))
}

/// As [`measure`], with the fractions taken of `baseline` (hidden units, MACs) where given
/// (for a network that has already been physically shrunk) rather than of `net` itself.
pub fn measure_against(
    net: &Net,
    test: &ImageSet,
    baseline: Option<(usize, u64)>,
) -> Result<(f64, f64, f64)> {
    let small = compress(net, &CompressConfig::default())?;
    let r = &small.report;
    let hidden = &r.layers[1..r.layers.len() - 1];
    let (units_before, macs_before) =
        baseline.unwrap_or((hidden.iter().map(|l| l.units_before).sum(), r.macs_before));
    let after: usize = hidden.iter().map(|l| l.units_after).sum();
    Ok((
        after as f64 / units_before.max(1) as f64,
        r.macs_after as f64 / macs_before.max(1) as f64,
        1.0 - test_error(&small.net, test, 500)?,
    ))
}

/// Runs every method on `model` and returns all points; `on_point` sees each as it comes.
pub fn compare(
    model: &ModelFn,
    methods: &[(String, Method)],
    train: &ImageSet,
    val: &ImageSet,
    test: &ImageSet,
    config: &CompareConfig,
    mut on_point: impl FnMut(&ComparePoint),
) -> Result<Vec<ComparePoint>> {
    let mut points = Vec::new();
    for (name, method) in methods {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let mut push = |stage, (units_kept, macs_kept, test_accuracy)| {
            let p = ComparePoint {
                method: name.clone(),
                stage,
                units_kept,
                macs_kept,
                test_accuracy,
            };
            on_point(&p);
            points.push(p);
        };
        match method {
            Method::Sbp => {
                let mut net = model(Some(LogNormalDropoutConfig::default()), vb)?;
                net.reset_parameters(config.seed)?;
                let dense = FitConfig {
                    kl_scale: 0.0,
                    noise: AdamConfig {
                        lr: 0.0,
                        ..config.fit.noise
                    },
                    ..config.fit.clone()
                };
                fit(&mut net, train, &dense, |_, _| Ok(Flow::Continue))?;
                push(0, measure(&net, test)?);
                let sbp = FitConfig {
                    epochs: config.sbp_epochs,
                    constant_epochs: config.sbp_epochs,
                    kl_scale: 1.0,
                    noise: AdamConfig {
                        lr: config.noise_lr,
                        ..config.fit.noise
                    },
                    ..config.fit.clone()
                };
                fit(&mut net, train, &sbp, |net, s| {
                    push(s.epoch + 1, measure(net, test)?);
                    Ok(Flow::Continue)
                })?;
            }
            Method::Iterative {
                criterion,
                selection,
            } => {
                let mut net = model(None, vb)?;
                net.reset_parameters(config.seed)?;
                let schedule = IterativeConfig {
                    // KL weights are for SBP's noise layers; these networks have none.
                    fit: FitConfig {
                        kl_weights: Default::default(),
                        ..config.fit.clone()
                    },
                    patience: config.patience,
                    selection: *selection,
                    target_keep: 0.0,
                    kappa: 0.0,
                    between: Between::Rewind,
                    min_units: config.min_units,
                    max_cycles: config.cycles,
                    // Later cycles train the smaller network.
                    compress_between: true,
                };
                let baseline = size_of(&net)?;
                iterative(
                    &mut net,
                    train,
                    val,
                    criterion.as_ref(),
                    &schedule,
                    |net, c| {
                        push(c.cycle, measure_against(net, test, Some(baseline))?);
                        Ok(())
                    },
                )?;
            }
        }
    }
    Ok(points)
}

/// The standard line-up: SBP, DropNet per layer and global, L1, APoZ and random, each
/// iterative method dropping `drop` of the remaining units per cycle.
pub fn standard_methods(drop: f64, seed: u64) -> Vec<(String, Method)> {
    use crate::criteria::{Apoz, MeanActivation, Random, WeightNorm};
    let per_layer = Selection::PerLayer { drop };
    vec![
        ("sbp".into(), Method::Sbp),
        (
            "dropnet_layer".into(),
            Method::Iterative {
                criterion: Box::new(MeanActivation),
                selection: per_layer,
            },
        ),
        (
            "dropnet_global".into(),
            Method::Iterative {
                criterion: Box::new(MeanActivation),
                selection: Selection::Global {
                    drop,
                    normalize: true,
                },
            },
        ),
        (
            "l1".into(),
            Method::Iterative {
                criterion: Box::new(WeightNorm::l1()),
                selection: per_layer,
            },
        ),
        (
            "apoz".into(),
            Method::Iterative {
                criterion: Box::new(Apoz),
                selection: per_layer,
            },
        ),
        (
            "random".into(),
            Method::Iterative {
                criterion: Box::new(Random { seed }),
                selection: per_layer,
            },
        ),
    ]
}
