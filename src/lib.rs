#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod ablation;
pub mod compare;
pub mod compress;
mod conv_direct;
pub mod coupling;
pub mod criteria;
pub mod data;
pub mod error;
pub mod experiment;
mod gather;
pub mod layer;
mod linear_dot;
mod linear_packed;
pub mod models;
pub mod net;
pub mod ops;
mod par;
pub mod plot;
pub mod recipe;
pub mod report;
pub mod schedule;
mod simd;
mod special;
pub mod surgery;
pub mod train;
pub mod truncnorm;

pub use compress::{compress, CompressConfig, Compressed, ResidualPolicy};
pub use error::{Error, Result};
pub use layer::{log_normal_dropout, LogNormalDropout, LogNormalDropoutConfig, NoiseMode};
pub use net::{InferencePlan, Net, NetBuilder, NodeShape};
pub use truncnorm::TruncatedLogNormal;
