#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod error;
pub mod layer;
mod special;
pub mod surgery;
pub mod truncnorm;

pub use error::{Error, Result};
pub use layer::{log_normal_dropout, LogNormalDropout, LogNormalDropoutConfig, NoiseMode};
pub use truncnorm::TruncatedLogNormal;
