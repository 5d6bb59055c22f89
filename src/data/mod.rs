//! Readers for the paper's data sets: MNIST (IDX files, gzip or raw) and CIFAR-10 (the
//! official binary batches). Counts come from headers and file sizes, never from
//! assumptions; a truncated, corrupt or mislabelled file is an [`Error::Format`] naming the
//! file and the byte offset.

pub mod cifar10;
#[cfg(feature = "download")]
pub mod download;
pub mod mnist;

use std::io::Read;
use std::path::{Path, PathBuf};

use candle::{Device, Tensor};

use crate::error::{Error, Result};

/// Labelled images held as bytes: `count` images of `channels × height × width` pixels
/// (channel-major per image), one label in `0..classes` each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSet {
    /// Pixels, `count · channels · height · width` bytes.
    pub pixels: Vec<u8>,
    /// Labels, one per image.
    pub labels: Vec<u8>,
    /// Channels per image.
    pub channels: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
}

impl ImageSet {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    /// Values per image.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// Images `indices` as an `(n, channels, height, width)` f32 tensor scaled to `[0, 1]`,
    /// and their labels as a `(n,)` u32 tensor.
    pub fn batch(&self, indices: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
        let per = self.image_len();
        if self.pixels.len() != self.len() * per {
            return Err(Error::InvalidValue {
                name: "ImageSet::pixels".into(),
                value: self.pixels.len() as f64,
                reason: format!(
                    "{} labels of {per}-value images need {} pixels",
                    self.len(),
                    self.len() * per
                ),
            });
        }
        let mut xs = Vec::with_capacity(indices.len() * per);
        let mut ys = Vec::with_capacity(indices.len());
        for &i in indices {
            if i >= self.len() {
                return Err(Error::InvalidValue {
                    name: "image index".into(),
                    value: i as f64,
                    reason: format!("the set holds {} images", self.len()),
                });
            }
            xs.extend(
                self.pixels[i * per..(i + 1) * per]
                    .iter()
                    .map(|&p| p as f32 / 255.0),
            );
            ys.push(self.labels[i] as u32);
        }
        let n = indices.len();
        Ok((
            Tensor::from_vec(xs, (n, self.channels, self.height, self.width), device)?,
            Tensor::from_vec(ys, n, device)?,
        ))
    }

    /// The whole set as tensors (see [`ImageSet::batch`]).
    pub fn tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        self.batch(&(0..self.len()).collect::<Vec<_>>(), device)
    }
}

/// The data directory: `flag` if given, else `$SBP_DATA_DIR`, else `./data`.
pub fn data_dir(flag: Option<&Path>) -> PathBuf {
    match flag {
        Some(p) => p.to_path_buf(),
        None => std::env::var_os("SBP_DATA_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("data")),
    }
}

pub(crate) fn format_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads a whole file, inflating it if it is gzip-compressed (by its magic bytes).
pub(crate) fn read_maybe_gzip(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    inflate_if_gzip(raw).map_err(|reason| format_error(path, reason))
}

/// `bytes` inflated if they start with the gzip magic, else unchanged; the error says how
/// far the stream decoded.
pub fn inflate_if_gzip(bytes: Vec<u8>) -> std::result::Result<Vec<u8>, String> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes);
    }
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes.as_slice())
        .read_to_end(&mut out)
        .map_err(|e| format!("corrupt gzip stream after {} bytes: {e}", out.len()))?;
    Ok(out)
}
