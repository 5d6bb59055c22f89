//! Training: the SBP objective (ELBO) and an Adam optimiser whose state can be saved.
//!
//! The objective is `mean cross-entropy + kl_scale · Σ_layers w_l · KL_l / N_train`, where
//! `w_l` are optional per-layer KL weights (the paper's "SBPa" weights early layers more).

use std::collections::BTreeMap;

use candle::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::net::Net;

/// The terms of one evaluation of the objective.
#[derive(Debug, Clone)]
pub struct Elbo {
    /// The loss to minimise (a scalar tensor with a graph).
    pub loss: Tensor,
    /// Mean cross-entropy.
    pub cross_entropy: f64,
    /// `Σ w_l · KL_l / N_train`, already scaled.
    pub kl: f64,
}

/// The SBP objective for `logits` against `labels`: mean cross-entropy plus
/// `kl_scale · Σ w_l KL_l / n_train` (weights by noise-layer name, 1 where absent).
pub fn elbo(
    net: &Net,
    logits: &Tensor,
    labels: &Tensor,
    n_train: usize,
    kl_scale: f64,
    kl_weights: &BTreeMap<String, f64>,
) -> Result<Elbo> {
    if n_train == 0 {
        return Err(Error::InvalidValue {
            name: "n_train".into(),
            value: 0.0,
            reason: "the training set size must be positive".into(),
        });
    }
    let ce = candle_nn::loss::cross_entropy(logits, labels)?;
    let mut loss = ce.clone();
    let mut kl_total = 0.0;
    if kl_scale != 0.0 {
        for (_, layer) in net.noise_layers() {
            let w = kl_weights.get(layer.name()).copied().unwrap_or(1.0) * kl_scale;
            if w == 0.0 {
                continue;
            }
            let kl = (layer.kl()?.to_dtype(logits.dtype())? * (w / n_train as f64))?;
            kl_total += kl.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            loss = loss.add(&kl)?;
        }
    }
    Ok(Elbo {
        cross_entropy: ce.to_dtype(DType::F64)?.to_scalar::<f64>()?,
        kl: kl_total,
        loss,
    })
}

/// Adam's hyper-parameters for one parameter group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay (the paper uses 0.95).
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay (AdamW); 0 for the noise parameters.
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// One parameter with its Adam moments.
#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    group: usize,
}

/// Adam with parameter groups (weights and noise parameters apart, so the noise gets no
/// weight decay and may get its own learning rate) and a state that can be saved and
/// restored exactly.
#[derive(Debug)]
pub struct Adam {
    slots: Vec<Slot>,
    groups: Vec<AdamConfig>,
    step: u64,
}

impl Adam {
    /// An optimiser over `net`'s trainable parameters: the noise layers' `mu` and
    /// `log_sigma` use `noise`, everything else `weights` (batch-norm running statistics
    /// are not trained).
    pub fn new(net: &Net, weights: AdamConfig, noise: AdamConfig) -> Result<Self> {
        let mut slots = Vec::new();
        for (name, t) in net.named_params() {
            if name.ends_with(".running_mean") || name.ends_with(".running_var") {
                continue;
            }
            if !t.is_variable() {
                return Err(Error::InvalidConfig {
                    layer: name,
                    reason: "not a variable: build the network from a VarMap to train it".into(),
                });
            }
            let is_noise = name.ends_with(".mu") || name.ends_with(".log_sigma");
            slots.push(Slot {
                m: t.zeros_like()?,
                v: t.zeros_like()?,
                var: Var::from_tensor(&t)?,
                group: usize::from(is_noise),
                name,
            });
        }
        Ok(Self {
            slots,
            groups: vec![weights, noise],
            step: 0,
        })
    }

    /// Steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Sets the learning rate of the weights (group 0) and of the noise (group 1).
    pub fn set_learning_rates(&mut self, weights: f64, noise: f64) {
        self.groups[0].lr = weights;
        self.groups[1].lr = noise;
    }

    /// The current learning rates (weights, noise).
    pub fn learning_rates(&self) -> (f64, f64) {
        (self.groups[0].lr, self.groups[1].lr)
    }

    /// Backpropagates `loss` and updates every parameter.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step += 1;
        let t = self.step as f64;
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let c = self.groups[slot.group];
            let m = ((&slot.m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&slot.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&m / (1.0 - c.beta1.powf(t)))?;
            let v_hat = (&v / (1.0 - c.beta2.powf(t)))?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let theta = slot.var.as_tensor();
            let decayed = if c.weight_decay != 0.0 {
                (theta * (1.0 - c.lr * c.weight_decay))?
            } else {
                theta.clone()
            };
            slot.var.set(&(decayed - (update * c.lr)?)?)?;
            slot.m = m;
            slot.v = v;
        }
        Ok(())
    }

    /// The optimiser's state as named tensors (`name.adam_m`, `name.adam_v`) and its step.
    pub fn state(&self) -> (Vec<(String, Tensor)>, u64) {
        let mut out = Vec::with_capacity(2 * self.slots.len());
        for s in &self.slots {
            out.push((format!("{}.adam_m", s.name), s.m.clone()));
            out.push((format!("{}.adam_v", s.name), s.v.clone()));
        }
        (out, self.step)
    }

    /// Restores a state from [`Adam::state`]; every moment must be present with the right
    /// shape.
    pub fn restore(&mut self, tensors: &BTreeMap<String, Tensor>, step: u64) -> Result<()> {
        for s in &mut self.slots {
            for (suffix, target) in [("adam_m", &mut s.m), ("adam_v", &mut s.v)] {
                let key = format!("{}.{suffix}", s.name);
                let t = tensors.get(&key).ok_or_else(|| Error::InvalidConfig {
                    layer: s.name.clone(),
                    reason: format!("the optimiser state lacks {key}"),
                })?;
                if t.dims() != target.dims() {
                    return Err(Error::InvalidConfig {
                        layer: s.name.clone(),
                        reason: format!(
                            "{key} has shape {:?}, expected {:?}",
                            t.dims(),
                            target.dims()
                        ),
                    });
                }
                *target = t.to_dtype(target.dtype())?.to_device(target.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The paper's learning-rate schedule: constant for `constant_epochs`, then linear decay to
/// zero at `total_epochs`. Returns the factor for `epoch` (0-based).
pub fn linear_decay_factor(epoch: usize, constant_epochs: usize, total_epochs: usize) -> f64 {
    if epoch < constant_epochs || total_epochs <= constant_epochs {
        1.0
    } else {
        let span = (total_epochs - constant_epochs) as f64;
        (1.0 - (epoch - constant_epochs) as f64 / span).max(0.0)
    }
}

/// Checks every parameter for NaN or infinity; the error names the parameter and index.
pub fn check_finite(net: &Net) -> Result<()> {
    for (name, t) in net.named_params() {
        let values = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        if let Some((index, &value)) = values.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            let (layer, param) = name.rsplit_once('.').unwrap_or((name.as_str(), ""));
            return Err(Error::NonFinite {
                layer: layer.into(),
                name: param.into(),
                index,
                value,
            });
        }
    }
    Ok(())
}
