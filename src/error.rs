//! The crate's error type.

/// Every failure of the public API: what went wrong and where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An error raised by candle itself.
    #[error(transparent)]
    Candle(#[from] candle::Error),

    /// A scalar argument outside its domain.
    #[error("invalid {name} = {value}: {reason}")]
    InvalidValue {
        /// The argument's name.
        name: String,
        /// The offending value.
        value: f64,
        /// What the value must satisfy.
        reason: String,
    },

    /// A layer's configuration that cannot work.
    #[error("{layer}: invalid configuration: {reason}")]
    InvalidConfig {
        /// The layer (its VarBuilder path).
        layer: String,
        /// What is wrong.
        reason: String,
    },

    /// An input tensor whose rank or size does not fit the layer.
    #[error("{layer}: input of shape {shape:?} does not fit: {reason}")]
    InputShape {
        /// The layer (its VarBuilder path).
        layer: String,
        /// The shape that was passed.
        shape: Vec<usize>,
        /// What was expected.
        reason: String,
    },

    /// Surgery on a layer that cannot be done as asked (bad keep list, unsupported layout).
    #[error("{layer}: cannot shrink: {reason}")]
    Surgery {
        /// The layer's name.
        layer: String,
        /// What is wrong.
        reason: String,
    },

    /// A parameter that became NaN or infinite.
    #[error("{layer}: {name}[{index}] is not finite ({value})")]
    NonFinite {
        /// The layer (its VarBuilder path).
        layer: String,
        /// The parameter's name.
        name: String,
        /// The unit's index.
        index: usize,
        /// The value found.
        value: f64,
    },
}

impl Error {
    /// Converts into a candle error (for `Module`/`ModuleT` implementations), keeping the
    /// message.
    pub fn into_candle(self) -> candle::Error {
        match self {
            Error::Candle(e) => e,
            other => candle::Error::wrap(other),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
