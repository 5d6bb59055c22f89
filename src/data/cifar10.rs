//! CIFAR-10 in the official binary format: records of one label byte and 3,072 pixel bytes
//! (1,024 red, 1,024 green, 1,024 blue, each 32×32 row-major).

use std::path::Path;

use super::mnist::check_labels;
use super::{format_error, read_maybe_gzip, ImageSet};
use crate::error::Result;

/// Bytes per record.
pub const RECORD: usize = 1 + 3 * 32 * 32;

/// The training and test sets.
#[derive(Debug, Clone)]
pub struct Cifar10 {
    /// Training images (`data_batch_1.bin` … `data_batch_5.bin`).
    pub train: ImageSet,
    /// Test images (`test_batch.bin`).
    pub test: ImageSet,
}

/// Loads CIFAR-10 from `dir`; record counts come from the file sizes.
pub fn load(dir: impl AsRef<Path>) -> Result<Cifar10> {
    let dir = dir.as_ref();
    let mut train = empty();
    for k in 1..=5 {
        let part = read_batch(&dir.join(format!("data_batch_{k}.bin")))?;
        train.pixels.extend(part.pixels);
        train.labels.extend(part.labels);
    }
    Ok(Cifar10 {
        train,
        test: read_batch(&dir.join("test_batch.bin"))?,
    })
}

fn empty() -> ImageSet {
    ImageSet {
        pixels: Vec::new(),
        labels: Vec::new(),
        channels: 3,
        height: 32,
        width: 32,
    }
}

/// Reads one batch file.
pub fn read_batch(path: &Path) -> Result<ImageSet> {
    let bytes = read_maybe_gzip(path)?;
    parse_batch(&bytes).map_err(|reason| format_error(path, reason))?;
    let mut set = empty();
    for record in bytes.chunks_exact(RECORD) {
        set.labels.push(record[0]);
        set.pixels.extend_from_slice(&record[1..]);
    }
    check_labels(path, &set.labels, 0, RECORD)?;
    Ok(set)
}

/// Checks the size of batch bytes; the error says where a truncated record starts.
pub fn parse_batch(bytes: &[u8]) -> std::result::Result<usize, String> {
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    if !bytes.len().is_multiple_of(RECORD) {
        let whole = bytes.len() / RECORD;
        return Err(format!(
            "{} bytes is not a whole number of {RECORD}-byte records: record {whole} at offset {} is truncated",
            bytes.len(),
            whole * RECORD
        ));
    }
    Ok(bytes.len() / RECORD)
}
