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

    /// A declared layer graph that cannot work: shapes that do not chain, a node that is
    /// not supported where it stands, a bad reference between nodes.
    #[error("{layer}: {reason}")]
    Graph {
        /// The node's name.
        layer: String,
        /// What is wrong.
        reason: String,
    },

    /// A keep mask that does not fit its layer, or that conflicts with another.
    #[error("{layer}: bad mask: {reason}")]
    Mask {
        /// The node the mask was given for.
        layer: String,
        /// What is wrong.
        reason: String,
    },

    /// Training produced a non-finite loss.
    #[error("training diverged at epoch {epoch}, step {step}: {reason}")]
    Diverged {
        /// The epoch (0-based).
        epoch: usize,
        /// The optimiser step that would have been taken.
        step: u64,
        /// The loss and the first non-finite parameter, if any.
        reason: String,
    },

    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },

    /// A device that cannot be opened: an unknown name, or a GPU this build or machine
    /// does not have.
    #[error("device {name:?}: {reason}")]
    Device {
        /// The device as named.
        name: String,
        /// Why it cannot be used.
        reason: String,
    },

    /// A file whose contents are not what they must be (truncated, tampered, wrong format).
    #[error("{}: {reason}", path.display())]
    Format {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong, with the offset where it is known.
        reason: String,
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
