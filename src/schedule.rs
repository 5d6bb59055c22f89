//! Pruning schedules: how much is pruned when. `t` is the fraction of training done, in
//! `[0, 1]`; sparsities are fractions of units removed.

use crate::error::{Error, Result};

fn check(t: f64, s_i: f64, s_f: f64) -> Result<()> {
    for (name, v) in [("t", t), ("s_i", s_i), ("s_f", s_f)] {
        if !(0.0..=1.0).contains(&v) {
            return Err(Error::InvalidValue {
                name: name.into(),
                value: v,
                reason: "must lie in [0, 1]".into(),
            });
        }
    }
    Ok(())
}

/// Automated Gradual Pruning (Zhu & Gupta 2017): `s_f + (s_i − s_f)(1 − t)³`.
pub fn agp_sparsity(t: f64, s_i: f64, s_f: f64) -> Result<f64> {
    check(t, s_i, s_f)?;
    Ok(s_f + (s_i - s_f) * (1.0 - t).powi(3))
}

/// One-Cycle Pruning (Hubens et al. 2022): `s_i + (s_f − s_i)(1 + e^(−α+β)) / (1 + e^(−αt+β))`
/// with `α = 14`, `β = 6`.
pub fn one_cycle_sparsity(t: f64, s_i: f64, s_f: f64) -> Result<f64> {
    one_cycle_sparsity_with(t, s_i, s_f, 14.0, 6.0)
}

/// [`one_cycle_sparsity`] with explicit `α` and `β`.
pub fn one_cycle_sparsity_with(t: f64, s_i: f64, s_f: f64, alpha: f64, beta: f64) -> Result<f64> {
    check(t, s_i, s_f)?;
    Ok(s_i + (s_f - s_i) * (1.0 + (-alpha + beta).exp()) / (1.0 + (-alpha * t + beta).exp()))
}

/// The iterative schedule's sizes (DropNet): after `cycle` cycles of dropping a fraction
/// `p` of the remaining units, the fraction left is `(1 − p)^cycle`; returns the number of
/// cycles needed to reach at most `target` kept.
pub fn iterative_cycles(p: f64, target: f64) -> Result<usize> {
    check(0.0, p, target)?;
    if p == 0.0 {
        return Err(Error::InvalidValue {
            name: "p".into(),
            value: p,
            reason: "dropping nothing never reaches a target".into(),
        });
    }
    let mut left = 1.0;
    let mut cycles = 0;
    while left > target + 1e-12 {
        left *= 1.0 - p;
        cycles += 1;
    }
    Ok(cycles)
}

use candle::Tensor;

use crate::compress::CompressConfig;
use crate::coupling::{coupling_groups, CouplingGroup};
use crate::criteria::{select, ActivationStats, Criterion, Selection};
use crate::data::ImageSet;
use crate::net::Net;
use crate::report::test_error;
use crate::train::{fit, EpochStats, FitConfig, Flow};

/// A copy of every parameter's values, for rewinding.
#[derive(Debug, Clone)]
pub struct Snapshot(Vec<(String, Tensor)>);

impl Snapshot {
    /// Copies `net`'s parameters.
    pub fn take(net: &Net) -> Result<Self> {
        Ok(Self(
            net.named_params()
                .into_iter()
                .map(|(n, t)| Ok((n, t.copy()?)))
                .collect::<Result<_>>()?,
        ))
    }

    /// Writes the copied values back into `net` (whose parameters must be variables).
    pub fn restore(&self, net: &Net) -> Result<()> {
        net.assign_params(&self.0)
    }

    /// The copied values, by full parameter name.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.0
    }
}

/// The groups a schedule prunes: every prunable group with weights (not the input).
pub fn prunable_groups(net: &Net) -> Vec<CouplingGroup> {
    coupling_groups(net)
        .into_iter()
        .filter(|g| g.prunable && g.producers.iter().all(|p| p.index != 0))
        .collect()
}

fn current_keeps(net: &Net, groups: &[CouplingGroup]) -> Vec<Vec<bool>> {
    groups
        .iter()
        .map(|g| {
            (0..g.units)
                .map(|u| {
                    g.producers.iter().all(|p| {
                        net.mask(p.index)
                            .is_none_or(|m| p.units[u].iter().any(|&j| m[j]))
                    })
                })
                .collect()
        })
        .collect()
}

/// Scores every group with `criterion` (gathering activation statistics over `data` when
/// it needs them), selects, and masks the units that go. Returns the new keep masks.
pub fn prune_step(
    net: &mut Net,
    groups: &[CouplingGroup],
    criterion: &dyn Criterion,
    data: &ImageSet,
    selection: Selection,
    min_units: usize,
) -> Result<Vec<Vec<bool>>> {
    let stats = if criterion.needs_activations() {
        Some(ActivationStats::gather(net, groups, data, 500, false)?)
    } else {
        None
    };
    let scores = groups
        .iter()
        .map(|g| criterion.scores(net, g, stats.as_ref()))
        .collect::<Result<Vec<_>>>()?;
    let current = current_keeps(net, groups);
    let keep = select(&scores, &current, selection, min_units)?;
    for (g, k) in groups.iter().zip(&keep) {
        net.set_group_mask(g, k)?;
    }
    Ok(keep)
}

/// Fraction of the groups' units still kept.
pub fn kept_fraction(keeps: &[Vec<bool>]) -> f64 {
    let total: usize = keeps.iter().map(|k| k.len()).sum();
    let kept = keeps.iter().flatten().filter(|&&k| k).count();
    kept as f64 / total.max(1) as f64
}

/// Trains with early stopping on `val` error (patience in epochs), restoring the best
/// epoch's weights; returns the history and the best validation error.
pub fn fit_early_stopping(
    net: &mut Net,
    train: &ImageSet,
    val: &ImageSet,
    config: &FitConfig,
    patience: usize,
) -> Result<(Vec<EpochStats>, f64)> {
    let mut best = (f64::INFINITY, Snapshot::take(net)?);
    let mut since = 0;
    let history = fit(net, train, config, |net, _| {
        let err = test_error(net, val, 500)?;
        if err < best.0 {
            best = (err, Snapshot::take(net)?);
            since = 0;
        } else {
            since += 1;
        }
        Ok(if since >= patience.max(1) {
            Flow::Stop
        } else {
            Flow::Continue
        })
    })?;
    best.1.restore(net)?;
    Ok((history, best.0))
}

/// What happens to the surviving weights between cycles of [`iterative`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Between {
    /// Back to their values before the first cycle (DropNet's default).
    Rewind,
    /// Fresh seeded values.
    Reinitialize {
        /// The seed (plus the cycle).
        seed: u64,
    },
    /// Keep training from where they are.
    Continue,
}

/// Options of [`iterative`] (DropNet's schedule).
#[derive(Debug, Clone)]
pub struct IterativeConfig {
    /// Training per cycle; `epochs` is the most epochs a cycle may take.
    pub fit: FitConfig,
    /// Early-stopping patience in epochs (DropNet: 5).
    pub patience: usize,
    /// Per cycle: `PerLayer { drop }` or `Global { drop, .. }` (DropNet: drop 0.2).
    pub selection: Selection,
    /// Stop once at most this fraction of the units is kept.
    pub target_keep: f64,
    /// Stop once validation accuracy falls below `kappa` times the first cycle's (the
    /// network before that cycle's pruning is restored).
    pub kappa: f64,
    /// What the surviving weights do between cycles.
    pub between: Between,
    /// Units every group keeps.
    pub min_units: usize,
    /// A bound on the number of cycles.
    pub max_cycles: usize,
    /// Physically remove the pruned units with [`compress`](crate::compress()) after each
    /// cycle, so that later cycles train a smaller, faster network (`net` is replaced by
    /// the smaller one). Otherwise the units are masked and `net` keeps its shape.
    pub compress_between: bool,
}

/// One cycle of [`iterative`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CycleStats {
    /// The cycle (0-based).
    pub cycle: usize,
    /// Epochs trained.
    pub epochs: usize,
    /// Validation accuracy after training.
    pub val_accuracy: f64,
    /// Fraction of units kept while training this cycle.
    pub kept_fraction: f64,
    /// Units kept per group while training this cycle.
    pub units_kept: Vec<usize>,
}

/// DropNet's iterative schedule: repeat { train with early stopping; drop a fraction of the
/// remaining units by `criterion` } until the target, the accuracy floor or `max_cycles`
/// is reached. `on_cycle` sees the trained network of each cycle, before its pruning (the
/// place to measure test accuracy). Returns the cycles. The network ends trained if a
/// target or the floor stopped it, and pruned and rewound (or not) if `max_cycles` did.
pub fn iterative(
    net: &mut Net,
    train: &ImageSet,
    val: &ImageSet,
    criterion: &dyn Criterion,
    config: &IterativeConfig,
    mut on_cycle: impl FnMut(&Net, &CycleStats) -> Result<()>,
) -> Result<Vec<CycleStats>> {
    check(0.0, config.target_keep, config.kappa.clamp(0.0, 1.0))?;
    let mut groups = prunable_groups(net);
    let original_units: usize = groups.iter().map(|g| g.units).sum();
    let initial = Snapshot::take(net)?;
    let mut physical = if config.compress_between {
        Some(Shrinker::new(net, &groups)?)
    } else {
        None
    };
    let mut cycles = Vec::new();
    let mut first_accuracy = None;
    let mut accepted: Option<Accepted> = None;
    for cycle in 0..config.max_cycles.max(1) {
        let keeps = current_keeps(net, &groups);
        let (history, err) = fit_early_stopping(net, train, val, &config.fit, config.patience)?;
        let units_kept: Vec<usize> = keeps
            .iter()
            .map(|k| k.iter().filter(|&&v| v).count())
            .collect();
        let stats = CycleStats {
            cycle,
            epochs: history.len(),
            val_accuracy: 1.0 - err,
            kept_fraction: units_kept.iter().sum::<usize>() as f64 / original_units.max(1) as f64,
            units_kept,
        };
        let first = *first_accuracy.get_or_insert(stats.val_accuracy);
        if stats.val_accuracy < config.kappa * first {
            // Back to the last accepted network.
            match accepted.take() {
                Some(Accepted::Masked(weights, masks)) => {
                    weights.restore(net)?;
                    net.set_masks(&masks)?;
                }
                Some(Accepted::Physical(previous)) => *net = previous,
                None => {}
            }
            cycles.push(stats);
            break;
        }
        accepted = Some(if physical.is_some() {
            Accepted::Physical(crate::compress(net, &CompressConfig::default())?.net)
        } else {
            Accepted::Masked(Snapshot::take(net)?, net.masks())
        });
        let done = stats.kept_fraction <= config.target_keep;
        on_cycle(net, &stats)?;
        cycles.push(stats);
        if done {
            break;
        }
        prune_step(
            net,
            &groups,
            criterion,
            train,
            config.selection,
            config.min_units,
        )?;
        if let Some(shrinker) = &mut physical {
            *net = shrinker.shrink(net, config.between, cycle)?;
            groups = prunable_groups(net);
            continue;
        }
        match config.between {
            Between::Rewind => initial.restore(net)?,
            Between::Reinitialize { seed } => {
                net.reset_parameters(seed.wrapping_add(cycle as u64))?
            }
            Between::Continue => {}
        }
    }
    Ok(cycles)
}

/// The network [`iterative`] returns to when a cycle falls below the accuracy floor.
enum Accepted {
    Masked(Snapshot, std::collections::BTreeMap<String, Vec<bool>>),
    Physical(Net),
}

/// Physical pruning between cycles: remembers which of the original units each masked
/// node still has, so that rewinding can cut the same units out of the initial weights.
struct Shrinker {
    /// The initial network (never trained), whose masks select the surviving units.
    pristine: Net,
    /// Per maskable node: the original indices of the units the current network has.
    origin: std::collections::BTreeMap<String, Vec<usize>>,
}

impl Shrinker {
    fn new(net: &Net, groups: &[CouplingGroup]) -> Result<Self> {
        let mut pristine = crate::compress(net, &CompressConfig::default())?.net;
        for g in groups {
            pristine.set_group_mask(g, &vec![true; g.units])?;
        }
        let origin = pristine
            .masks()
            .into_iter()
            .map(|(name, keep)| (name, (0..keep.len()).collect()))
            .collect();
        pristine.clear_masks();
        Ok(Self { pristine, origin })
    }

    /// The physically smaller network after `net`'s newest masks: `net`'s own weights
    /// (`Continue`), fresh ones (`Reinitialize`), or the initial weights of the surviving
    /// units (`Rewind`).
    fn shrink(&mut self, net: &Net, between: Between, cycle: usize) -> Result<Net> {
        let mut full_masks = std::collections::BTreeMap::new();
        for (name, keep) in net.masks() {
            let Some(origin) = self.origin.get_mut(&name) else {
                continue;
            };
            if origin.len() != keep.len() {
                return Err(Error::Surgery {
                    layer: name,
                    reason: format!(
                        "{} units tracked, {} masked: the network changed shape between cycles",
                        origin.len(),
                        keep.len()
                    ),
                });
            }
            *origin = origin
                .iter()
                .zip(&keep)
                .filter(|(_, &k)| k)
                .map(|(&i, _)| i)
                .collect();
            let original = self.pristine.node_units(&name)?;
            let mut full = vec![false; original];
            origin.iter().for_each(|&i| full[i] = true);
            full_masks.insert(name, full);
        }
        let config = CompressConfig::default();
        Ok(match between {
            Between::Rewind => {
                self.pristine.set_masks(&full_masks)?;
                let small = crate::compress(&self.pristine, &config)?.net;
                self.pristine.clear_masks();
                small
            }
            Between::Reinitialize { seed } => {
                let small = crate::compress(net, &config)?.net;
                small.reset_parameters(seed.wrapping_add(cycle as u64))?;
                small
            }
            Between::Continue => crate::compress(net, &config)?.net,
        })
    }
}

/// Gradual pruning during training: after each epoch, prunes by `criterion` up to the
/// sparsity `sparsity(t)` (`t` = fraction of epochs done; for instance
/// [`agp_sparsity`] or [`one_cycle_sparsity`]), ranking per layer or globally.
pub fn gradual(
    net: &mut Net,
    train: &ImageSet,
    config: &FitConfig,
    criterion: &dyn Criterion,
    sparsity: impl Fn(f64) -> Result<f64>,
    global: Option<bool>,
    min_units: usize,
) -> Result<Vec<EpochStats>> {
    let groups = prunable_groups(net);
    let epochs = config.epochs.max(1);
    fit(net, train, config, |net, s| {
        let t = (s.epoch + 1) as f64 / epochs as f64;
        let keep = 1.0 - sparsity(t)?;
        let selection = match global {
            Some(normalize) => Selection::TargetGlobal { keep, normalize },
            None => Selection::TargetPerLayer { keep },
        };
        prune_step(net, &groups, criterion, train, selection, min_units)?;
        Ok(Flow::Continue)
    })
}

/// One-shot pruning: prune once by `criterion` with `selection`, then fine-tune.
pub fn one_shot(
    net: &mut Net,
    train: &ImageSet,
    criterion: &dyn Criterion,
    selection: Selection,
    min_units: usize,
    fine_tune: &FitConfig,
) -> Result<Vec<EpochStats>> {
    let groups = prunable_groups(net);
    prune_step(net, &groups, criterion, train, selection, min_units)?;
    fit(net, train, fine_tune, |_, _| Ok(Flow::Continue))
}
