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
