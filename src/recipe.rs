//! Training recipes for the paper's networks: how many epochs, which learning rates and
//! which KL weights [`experiment::run`](crate::experiment::run) uses. The examples take
//! their defaults from here (`--recipe tuned|paper|quick`), and the tests run the same
//! recipes in a short form.
//!
//! ```
//! use candle_sbp::recipe::{PaperNet, Recipe};
//!
//! let config = Recipe::Tuned.config(PaperNet::LeNet5Caffe);
//! assert_eq!(config.epochs_sbp, 30);
//! assert_eq!(config.kl_weights["sbp1"], 50.0);
//! // The paper's protocol: 200 SBP epochs, noise at the weights' learning rate.
//! let paper = Recipe::Paper.config(PaperNet::LeNet5Caffe);
//! assert_eq!((paper.epochs_sbp, paper.noise_lr), (200, paper.lr));
//! ```

use std::collections::BTreeMap;

use crate::experiment::ExperimentConfig;

/// The networks of the paper's experiments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaperNet {
    /// LeNet5-Caffe on MNIST (noise after conv1, conv2, fc1 and on fc2's input).
    LeNet5Caffe,
    /// LeNet-500-300 on MNIST (noise on the input pixels and both hidden layers).
    LeNet500_300,
    /// LeNet-300-100 on MNIST (as LeNet-500-300).
    LeNet300_100,
    /// The VGG-like network on CIFAR-10.
    VggLike,
}

impl PaperNet {
    /// The name the examples and reports use.
    pub fn name(self) -> &'static str {
        match self {
            Self::LeNet5Caffe => "lenet5_mnist",
            Self::LeNet500_300 => "lenet500_300_mnist",
            Self::LeNet300_100 => "lenet300_100_mnist",
            Self::VggLike => "vgg_cifar10",
        }
    }

    /// The data set's name.
    pub fn dataset(self) -> &'static str {
        match self {
            Self::VggLike => "cifar10",
            _ => "mnist",
        }
    }
}

/// A training recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Recipe {
    /// The recipe of this crate's ablation (README, "Training recipe"): the noise learns at
    /// 50× the weights' rate, and the KL terms are weighted where the MACs are. LeNet5: 5
    /// dense and 30 SBP epochs, the two conv layers' KL ×50.
    /// LeNet-500-300 and LeNet-300-100: 20 dense and 50 SBP epochs, every KL ×2. The
    /// VGG-like network has not been tuned (no GPU here): it gets the quick recipe.
    #[default]
    Tuned,
    /// The paper's protocol as published: 200 SBP epochs, the noise at the weights'
    /// learning rate (1e-3), constant then linearly decaying, no KL weights, no warm-up,
    /// after the same dense pretraining as `Tuned`.
    Paper,
    /// Two dense and five SBP epochs with the fast noise learning rate: real compression
    /// within minutes on a CPU, far from the paper's.
    Quick,
}

impl Recipe {
    /// The experiment settings of this recipe for `net`; the rest (device, progress bars,
    /// checkpoints, seed) are [`ExperimentConfig::default`]'s.
    pub fn config(self, net: PaperNet) -> ExperimentConfig {
        let base = ExperimentConfig {
            model: net.name().into(),
            dataset: net.dataset().into(),
            ..Default::default()
        };
        let lr = base.lr;
        let weights = |names: &[&str], w: f64| -> BTreeMap<String, f64> {
            names.iter().map(|n| (n.to_string(), w)).collect()
        };
        let pretrain = match net {
            PaperNet::LeNet5Caffe => 5,
            PaperNet::LeNet500_300 | PaperNet::LeNet300_100 => 20,
            PaperNet::VggLike => base.epochs_pretrain,
        };
        match (self, net) {
            (Self::Quick, _) | (Self::Tuned, PaperNet::VggLike) => base,
            (Self::Paper, _) => ExperimentConfig {
                epochs_pretrain: pretrain,
                epochs_sbp: 200,
                noise_lr: lr,
                ..base
            },
            (Self::Tuned, PaperNet::LeNet5Caffe) => ExperimentConfig {
                epochs_pretrain: pretrain,
                epochs_sbp: 30,
                noise_lr: 0.05,
                kl_weights: weights(&["sbp1", "sbp2"], 50.0),
                ..base
            },
            (Self::Tuned, PaperNet::LeNet500_300 | PaperNet::LeNet300_100) => ExperimentConfig {
                epochs_pretrain: pretrain,
                epochs_sbp: 50,
                noise_lr: 0.05,
                kl_weights: weights(&["sbp0", "sbp1", "sbp2"], 2.0),
                ..base
            },
        }
    }
}
