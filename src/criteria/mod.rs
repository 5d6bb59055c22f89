//! Pruning criteria (*which units matter*) and selection (*which units go*), apart from
//! surgery (*how layers shrink*, [`compress`](crate::compress::compress)).
//!
//! A [`Criterion`] gives a score to each unit of a [`CouplingGroup`]: low scores go first.
//! [`select`] turns the scores of all groups into keep masks, per layer or globally, and
//! [`Net::set_group_mask`] applies them.
//!
//! ```
//! use candle::{DType, Device};
//! use candle_nn::{VarBuilder, VarMap};
//! use candle_sbp::coupling::coupling_groups;
//! use candle_sbp::criteria::{select, Criterion, Selection, WeightNorm};
//! use candle_sbp::models::lenet_300_100;
//!
//! let varmap = VarMap::new();
//! let mut net = lenet_300_100(None, VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
//! net.reset_parameters(0)?;
//! // The hidden layers (the input has no weights to score; the output is never pruned).
//! let groups: Vec<_> = coupling_groups(&net)
//!     .into_iter()
//!     .filter(|g| g.prunable && g.producers.iter().all(|p| p.index != 0))
//!     .collect();
//! let scores = groups
//!     .iter()
//!     .map(|g| WeightNorm::l1().scores(&net, g, None))
//!     .collect::<candle_sbp::Result<Vec<_>>>()?;
//! let current: Vec<Vec<bool>> = groups.iter().map(|g| vec![true; g.units]).collect();
//! let keep = select(&scores, &current, Selection::PerLayer { drop: 0.2 }, 1)?;
//! for (g, k) in groups.iter().zip(&keep) {
//!     net.set_group_mask(g, k)?;
//! }
//! # Ok::<(), candle_sbp::Error>(())
//! ```

mod stats;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub use stats::{ActivationStats, UnitStats};

use crate::coupling::CouplingGroup;
use crate::error::{Error, Result};
use crate::net::Net;

/// Scores the units of a coupling group; low scores are pruned first.
pub trait Criterion {
    /// A short name for reports.
    fn name(&self) -> String;
    /// Whether [`Criterion::scores`] needs [`ActivationStats`].
    fn needs_activations(&self) -> bool {
        false
    }
    /// One score per unit of `group`. Activation-based criteria need `stats`.
    fn scores(
        &self,
        net: &Net,
        group: &CouplingGroup,
        stats: Option<&ActivationStats>,
    ) -> Result<Vec<f64>>;
}

/// The statistics of `group`, or an error naming what needed them.
fn group_stats(
    stats: Option<&ActivationStats>,
    group: &CouplingGroup,
    criterion: &str,
) -> Result<stats::UnitStats> {
    stats
        .ok_or_else(|| criterion_error(group, format!("{criterion} needs activation statistics")))?
        .group(group)
}

fn criterion_error(group: &CouplingGroup, reason: impl Into<String>) -> Error {
    Error::InvalidConfig {
        layer: group
            .producers
            .first()
            .map_or_else(|| "<group>".to_string(), |p| p.node.clone()),
        reason: reason.into(),
    }
}

/// The SBP signal-to-noise ratio of each unit (the group's first noise layer; where a unit
/// spans several noise units, as after a flatten, their largest SNR).
#[derive(Debug, Clone, Copy, Default)]
pub struct Snr;

impl Criterion for Snr {
    fn name(&self) -> String {
        "snr".into()
    }
    fn scores(
        &self,
        net: &Net,
        group: &CouplingGroup,
        _: Option<&ActivationStats>,
    ) -> Result<Vec<f64>> {
        let member = group.noise.first().ok_or_else(|| {
            criterion_error(group, "SNR needs a noise layer on this group's units")
        })?;
        let layer = net
            .noise_layers()
            .into_iter()
            .find(|(i, _)| *i == member.index)
            .map(|(_, l)| l)
            .ok_or_else(|| criterion_error(group, "its noise layer is missing"))?;
        let snr = layer.snr()?;
        Ok(member
            .units
            .iter()
            .map(|slots| {
                slots
                    .iter()
                    .map(|&j| snr[j])
                    .fold(f64::NEG_INFINITY, f64::max)
            })
            .collect())
    }
}

/// DropNet's criterion: the unit's mean post-activation value over the data (averaged over
/// positions for a conv channel).
#[derive(Debug, Clone, Copy, Default)]
pub struct MeanActivation;

impl Criterion for MeanActivation {
    fn name(&self) -> String {
        "mean_activation".into()
    }
    fn needs_activations(&self) -> bool {
        true
    }
    fn scores(
        &self,
        _: &Net,
        group: &CouplingGroup,
        stats: Option<&ActivationStats>,
    ) -> Result<Vec<f64>> {
        Ok(group_stats(stats, group, "mean activation")?.mean)
    }
}

/// APoZ (Hu et al. 2016): the fraction of zero post-ReLU activations; a high fraction goes
/// first, so the score is `1 − APoZ`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Apoz;

impl Criterion for Apoz {
    fn name(&self) -> String {
        "apoz".into()
    }
    fn needs_activations(&self) -> bool {
        true
    }
    fn scores(
        &self,
        _: &Net,
        group: &CouplingGroup,
        stats: Option<&ActivationStats>,
    ) -> Result<Vec<f64>> {
        Ok(group_stats(stats, group, "APoZ")?
            .zero_fraction
            .iter()
            .map(|z| 1.0 - z)
            .collect())
    }
}

/// Li et al. (ICLR 2017): the L1 or L2 norm of the unit's incoming weights (summed over the
/// group's producers). Needs no data.
#[derive(Debug, Clone, Copy)]
pub struct WeightNorm {
    /// 1 or 2.
    pub p: u8,
}

impl WeightNorm {
    /// The L1 norm (the paper's choice).
    pub fn l1() -> Self {
        Self { p: 1 }
    }
    /// The L2 norm.
    pub fn l2() -> Self {
        Self { p: 2 }
    }
}

impl Criterion for WeightNorm {
    fn name(&self) -> String {
        format!("l{}_norm", self.p)
    }
    fn scores(
        &self,
        net: &Net,
        group: &CouplingGroup,
        _: Option<&ActivationStats>,
    ) -> Result<Vec<f64>> {
        if self.p != 1 && self.p != 2 {
            return Err(criterion_error(
                group,
                format!("norm order {} is not 1 or 2", self.p),
            ));
        }
        let mut scores = vec![0.0; group.units];
        let mut any = false;
        for producer in &group.producers {
            let Some(w) = net.param(producer.index, "weight") else {
                continue; // the input has no weights
            };
            any = true;
            let rows = w.dim(0)?;
            let w = w.to_dtype(candle::DType::F64)?.reshape((rows, ()))?;
            let norms: Vec<f64> = if self.p == 1 {
                w.abs()?.sum(1)?.to_vec1()?
            } else {
                w.sqr()?.sum(1)?.sqrt()?.to_vec1()?
            };
            for (u, slots) in producer.units.iter().enumerate() {
                scores[u] += slots.iter().map(|&j| norms[j]).sum::<f64>();
            }
        }
        if !any {
            return Err(criterion_error(
                group,
                "no producer of this group has weights",
            ));
        }
        Ok(scores)
    }
}

/// Uniform random scores from a seeded generator: the control every comparison needs.
#[derive(Debug, Clone, Copy)]
pub struct Random {
    /// The seed (mixed with the group's first producer).
    pub seed: u64,
}

impl Criterion for Random {
    fn name(&self) -> String {
        "random".into()
    }
    fn scores(
        &self,
        _: &Net,
        group: &CouplingGroup,
        _: Option<&ActivationStats>,
    ) -> Result<Vec<f64>> {
        let name = group.producers.first().map_or("", |p| p.node.as_str());
        let mut rng = StdRng::seed_from_u64(crate::layer::stream_seed(self.seed, name));
        Ok((0..group.units).map(|_| rng.random::<f64>()).collect())
    }
}

/// Which units go, given every group's scores.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Selection {
    /// Drop a fraction `drop` of each group's remaining units (DropNet per layer).
    PerLayer {
        /// The fraction to drop, in `[0, 1]`.
        drop: f64,
    },
    /// Drop a fraction `drop` of all remaining units, ranked together; `normalize` divides
    /// each group's scores by their root mean square first, so layers compare.
    Global {
        /// The fraction to drop, in `[0, 1]`.
        drop: f64,
        /// Per-layer score normalisation.
        normalize: bool,
    },
    /// Keep the units whose score exceeds `min_score` (SNR > 1 for SBP).
    Threshold {
        /// The score a unit must exceed.
        min_score: f64,
    },
    /// Keep a fraction `keep` of each group's units (counting the original units).
    TargetPerLayer {
        /// The fraction to keep, in `[0, 1]`.
        keep: f64,
    },
    /// Keep a fraction `keep` of all units, ranked together.
    TargetGlobal {
        /// The fraction to keep, in `[0, 1]`.
        keep: f64,
        /// Per-layer score normalisation.
        normalize: bool,
    },
}

fn check_fraction(name: &str, v: f64) -> Result<()> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(Error::InvalidValue {
            name: name.into(),
            value: v,
            reason: "a fraction must lie in [0, 1]".into(),
        })
    }
}

/// New keep masks, one per group, from `scores` and the `current` masks (units already
/// removed stay removed). Every group keeps at least `min_units` of its current units
/// (global ranking would otherwise empty layers, as DropNet reports for VGG-19).
pub fn select(
    scores: &[Vec<f64>],
    current: &[Vec<bool>],
    selection: Selection,
    min_units: usize,
) -> Result<Vec<Vec<bool>>> {
    if scores.len() != current.len() {
        return Err(Error::InvalidValue {
            name: "scores".into(),
            value: scores.len() as f64,
            reason: format!("one score list per group: {} masks", current.len()),
        });
    }
    for (k, (s, c)) in scores.iter().zip(current).enumerate() {
        if s.len() != c.len() {
            return Err(Error::InvalidValue {
                name: format!("scores[{k}]"),
                value: s.len() as f64,
                reason: format!("the group has {} units", c.len()),
            });
        }
        if let Some(j) = s.iter().position(|v| v.is_nan()) {
            return Err(Error::InvalidValue {
                name: format!("scores[{k}][{j}]"),
                value: f64::NAN,
                reason: "a score is NaN".into(),
            });
        }
    }
    let remaining: Vec<Vec<usize>> = current
        .iter()
        .map(|c| (0..c.len()).filter(|&j| c[j]).collect())
        .collect();
    // How many each group may still lose.
    let spare: Vec<usize> = remaining
        .iter()
        .map(|r| r.len().saturating_sub(min_units))
        .collect();
    let mut keep = current.to_vec();
    let drop_lowest = |keep: &mut Vec<Vec<bool>>, g: usize, n: usize| {
        let mut order = remaining[g].clone();
        order.sort_by(|&a, &b| scores[g][a].total_cmp(&scores[g][b]));
        for &j in order.iter().take(n.min(spare[g])) {
            keep[g][j] = false;
        }
    };
    match selection {
        Selection::PerLayer { drop } => {
            check_fraction("drop", drop)?;
            for (g, r) in remaining.iter().enumerate() {
                drop_lowest(&mut keep, g, (drop * r.len() as f64).round() as usize);
            }
        }
        Selection::TargetPerLayer { keep: frac } => {
            check_fraction("keep", frac)?;
            for (g, r) in remaining.iter().enumerate() {
                let target = (frac * current[g].len() as f64).round() as usize;
                drop_lowest(&mut keep, g, r.len().saturating_sub(target));
            }
        }
        Selection::Threshold { min_score } => {
            for g in 0..keep.len() {
                let n = remaining[g]
                    .iter()
                    .filter(|&&j| scores[g][j] <= min_score)
                    .count();
                drop_lowest(&mut keep, g, n);
            }
        }
        Selection::Global { drop, normalize }
        | Selection::TargetGlobal {
            keep: drop,
            normalize,
        } => {
            check_fraction(
                if matches!(selection, Selection::Global { .. }) {
                    "drop"
                } else {
                    "keep"
                },
                drop,
            )?;
            let total: usize = remaining.iter().map(|r| r.len()).sum();
            let n = match selection {
                Selection::Global { .. } => (drop * total as f64).round() as usize,
                _ => {
                    let original: usize = current.iter().map(|c| c.len()).sum();
                    total.saturating_sub((drop * original as f64).round() as usize)
                }
            };
            let scale: Vec<f64> = scores
                .iter()
                .zip(&remaining)
                .map(|(s, r)| {
                    if !normalize || r.is_empty() {
                        return 1.0;
                    }
                    let rms = (r.iter().map(|&j| s[j] * s[j]).sum::<f64>() / r.len() as f64).sqrt();
                    if rms > 0.0 {
                        1.0 / rms
                    } else {
                        1.0
                    }
                })
                .collect();
            let mut all: Vec<(f64, usize, usize)> = remaining
                .iter()
                .enumerate()
                .flat_map(|(g, r)| r.iter().map(move |&j| (g, j)))
                .map(|(g, j)| (scores[g][j] * scale[g], g, j))
                .collect();
            all.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut lost = vec![0usize; keep.len()];
            let mut dropped = 0;
            for (_, g, j) in all {
                if dropped == n {
                    break;
                }
                if lost[g] < spare[g] {
                    keep[g][j] = false;
                    lost[g] += 1;
                    dropped += 1;
                }
            }
        }
    }
    Ok(keep)
}
