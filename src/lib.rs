#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod error;
mod special;
pub mod truncnorm;

pub use error::{Error, Result};
pub use truncnorm::TruncatedLogNormal;
