//! Activation statistics for [`MeanActivation`](super::MeanActivation) and
//! [`Apoz`](super::Apoz), gathered in one pass over the data.

use std::collections::BTreeMap;

use candle::{DType, Device};

use crate::coupling::CouplingGroup;
use crate::data::ImageSet;
use crate::error::{Error, Result};
use crate::net::Net;

/// Per-unit statistics of one group, at its first activation (or its producer's output
/// where it has none).
#[derive(Debug, Clone, PartialEq)]
pub struct UnitStats {
    /// The node the statistics were taken at.
    pub node: usize,
    /// Mean value per unit (over examples and positions).
    pub mean: Vec<f64>,
    /// Fraction of values at or below 0 per unit.
    pub zero_fraction: Vec<f64>,
}

/// Statistics for several groups.
#[derive(Debug, Clone, Default)]
pub struct ActivationStats {
    by_node: BTreeMap<usize, UnitStats>,
}

fn tap(group: &CouplingGroup) -> Option<(usize, &Vec<Vec<usize>>)> {
    group
        .activations
        .first()
        .or(group.producers.first())
        .map(|m| (m.index, &m.units))
}

impl ActivationStats {
    /// One evaluation-mode pass over `data` in batches of `batch`, with a progress bar
    /// when `progress`.
    pub fn gather(
        net: &Net,
        groups: &[CouplingGroup],
        data: &ImageSet,
        batch: usize,
        progress: bool,
    ) -> Result<Self> {
        let mut taps: Vec<usize> = groups.iter().filter_map(|g| tap(g).map(|t| t.0)).collect();
        taps.sort_unstable();
        taps.dedup();
        let units: Vec<usize> = taps.iter().map(|&t| net.shapes()[t].units()).collect();
        let mut sums: Vec<Vec<f64>> = units.iter().map(|&u| vec![0.0; u]).collect();
        let mut zeros: Vec<Vec<f64>> = units.iter().map(|&u| vec![0.0; u]).collect();
        let mut counts = vec![0.0f64; taps.len()];
        let idx: Vec<usize> = (0..data.len()).collect();
        let bar = progress.then(|| indicatif::ProgressBar::new(data.len() as u64));
        let device: &Device = net.device();
        for chunk in idx.chunks(batch.max(1)) {
            let (xs, _) = data.batch(chunk, device)?;
            let (_, outs) = net.forward_with(&xs, false, &taps)?;
            for (k, out) in outs.iter().enumerate() {
                // (N, C, ...) → per-unit sums over everything but axis 1.
                let u = units[k];
                let t = out
                    .to_dtype(DType::F64)?
                    .transpose(0, 1)?
                    .reshape((u, ()))?;
                let s: Vec<f64> = t.sum(1)?.to_vec1()?;
                let z: Vec<f64> = t.le(0.0)?.to_dtype(DType::F64)?.sum(1)?.to_vec1()?;
                let per_unit = t.dim(1)? as f64;
                for j in 0..u {
                    sums[k][j] += s[j];
                    zeros[k][j] += z[j];
                }
                counts[k] += per_unit;
            }
            if let Some(bar) = &bar {
                bar.inc(chunk.len() as u64);
            }
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        let by_node = taps
            .iter()
            .enumerate()
            .map(|(k, &node)| {
                let c = counts[k].max(1.0);
                (
                    node,
                    UnitStats {
                        node,
                        mean: sums[k].iter().map(|s| s / c).collect(),
                        zero_fraction: zeros[k].iter().map(|z| z / c).collect(),
                    },
                )
            })
            .collect();
        Ok(Self { by_node })
    }

    /// The statistics of `group`'s units (averaged over the positions a unit spans).
    pub fn group(&self, group: &CouplingGroup) -> Result<UnitStats> {
        let missing = || Error::InvalidConfig {
            layer: group
                .producers
                .first()
                .map_or_else(|| "<group>".into(), |p| p.node.clone()),
            reason: "no activation statistics were gathered for this group".into(),
        };
        let (node, units) = tap(group).ok_or_else(missing)?;
        let s = self.by_node.get(&node).ok_or_else(missing)?;
        let avg = |v: &[f64], slots: &Vec<usize>| {
            slots.iter().map(|&j| v[j]).sum::<f64>() / slots.len().max(1) as f64
        };
        Ok(UnitStats {
            node,
            mean: units.iter().map(|slots| avg(&s.mean, slots)).collect(),
            zero_fraction: units
                .iter()
                .map(|slots| avg(&s.zero_fraction, slots))
                .collect(),
        })
    }
}
