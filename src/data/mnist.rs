//! MNIST in the IDX format (`train-images-idx3-ubyte` etc., raw or `.gz`).

use std::path::{Path, PathBuf};

use super::{format_error, read_maybe_gzip, ImageSet};
use crate::error::{Error, Result};

/// The training and test sets.
#[derive(Debug, Clone)]
pub struct Mnist {
    /// Training images (60,000 in the official files).
    pub train: ImageSet,
    /// Test images (10,000 in the official files).
    pub test: ImageSet,
}

/// The four official file stems.
pub const FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// Finds `stem` or `stem.gz` in `dir`.
fn find(dir: &Path, stem: &str) -> Result<PathBuf> {
    for name in [stem.to_string(), format!("{stem}.gz")] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::Io {
        path: dir.join(format!("{stem}.gz")),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("neither {stem} nor {stem}.gz is in this directory"),
        ),
    })
}

/// Loads MNIST from `dir` (the four IDX files, raw or gzip).
pub fn load(dir: impl AsRef<Path>) -> Result<Mnist> {
    let dir = dir.as_ref();
    let set = |images: &str, labels: &str| {
        let (ip, lp) = (find(dir, images)?, find(dir, labels)?);
        let (pixels, dims) = read_idx(&ip, 3)?;
        let (labels, ldims) = read_idx(&lp, 1)?;
        if ldims[0] != dims[0] {
            return Err(format_error(
                &lp,
                format!(
                    "{} labels for {} images in {}",
                    ldims[0],
                    dims[0],
                    ip.display()
                ),
            ));
        }
        check_labels(&lp, &labels, 8, 1)?;
        Ok(ImageSet {
            pixels,
            labels,
            channels: 1,
            height: dims[1],
            width: dims[2],
        })
    };
    Ok(Mnist {
        train: set(FILES[0], FILES[1])?,
        test: set(FILES[2], FILES[3])?,
    })
}

/// Labels must lie in `0..10`; the error gives the byte offset of the first bad one.
pub(crate) fn check_labels(path: &Path, labels: &[u8], start: usize, stride: usize) -> Result<()> {
    match labels.iter().position(|&l| l > 9) {
        Some(i) => Err(format_error(
            path,
            format!(
                "label {} of record {i} (byte offset {}) is not a class 0..9",
                labels[i],
                start + i * stride
            ),
        )),
        None => Ok(()),
    }
}

/// Reads an unsigned-byte IDX file with `rank` dimensions: its data and dimensions.
pub fn read_idx(path: &Path, rank: usize) -> Result<(Vec<u8>, Vec<usize>)> {
    let bytes = read_maybe_gzip(path)?;
    parse_idx(&bytes, rank).map_err(|reason| format_error(path, reason))
}

/// Parses IDX bytes (see [`read_idx`]); the error says what is wrong and at which offset.
pub fn parse_idx(bytes: &[u8], rank: usize) -> std::result::Result<(Vec<u8>, Vec<usize>), String> {
    if bytes.len() < 4 {
        return Err(format!(
            "{} bytes: too short for the IDX magic number",
            bytes.len()
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
        return Err(format!(
            "offset 0: magic {:02x} {:02x} {:02x} is not an unsigned-byte IDX file (00 00 08)",
            bytes[0], bytes[1], bytes[2]
        ));
    }
    if bytes[3] as usize != rank {
        return Err(format!(
            "offset 3: {} dimensions, expected {rank}",
            bytes[3]
        ));
    }
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err(format!("{} bytes: the header needs {header}", bytes.len()));
    }
    let dims: Vec<usize> = (0..rank)
        .map(|k| {
            u32::from_be_bytes(bytes[4 + 4 * k..8 + 4 * k].try_into().expect("4 bytes")) as usize
        })
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|n| n.checked_add(header))
        .ok_or_else(|| format!("dimensions {dims:?} overflow"))?;
    if dims.contains(&0) {
        return Err(format!("dimensions {dims:?} hold no data"));
    }
    if bytes.len() != expected {
        return Err(format!(
            "dimensions {dims:?} need {expected} bytes, the file has {}: {}",
            bytes.len(),
            if bytes.len() < expected {
                format!("truncated at offset {}", bytes.len())
            } else {
                format!("trailing data from offset {expected}")
            }
        ));
    }
    Ok((bytes[header..].to_vec(), dims))
}
