//! Downloads of the official MNIST and CIFAR-10 files where they are missing (the default
//! `download` feature), checked against the official MD5 checksums, with a progress bar.
//! Files are written atomically, so an interrupted download leaves nothing half-written.

use std::io::Read;
use std::path::Path;

use md5::{Digest, Md5};

use super::format_error;
use crate::error::{Error, Result};
use crate::net::write_atomic;

/// Where MNIST is fetched from by default (`SBP_MNIST_URL` overrides it).
pub const MNIST_URL: &str = "https://ossci-datasets.s3.amazonaws.com/mnist/";

/// MD5 of the official MNIST files, uncompressed (the `.gz` wrappers vary by mirror).
pub const MNIST_MD5: [(&str, &str); 4] = [
    (
        "train-images-idx3-ubyte",
        "6bbc9ace898e44ae57da46a324031adb",
    ),
    (
        "train-labels-idx1-ubyte",
        "a25bea736e30d166cdddb491f175f624",
    ),
    ("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea"),
    ("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637"),
];

/// The official CIFAR-10 binary archive (`SBP_CIFAR10_URL` overrides it).
pub const CIFAR10_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";

/// MD5 of the official CIFAR-10 binary archive.
pub const CIFAR10_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";

/// The batch files of CIFAR-10.
pub const CIFAR10_FILES: [&str; 6] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
];

/// Hex MD5 of `bytes`.
pub fn md5_hex(bytes: &[u8]) -> String {
    Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Fetches `url` into memory with a progress bar labelled `label`.
pub fn fetch(url: &str, label: &str) -> Result<Vec<u8>> {
    let fail = |reason: String| Error::Format {
        path: url.into(),
        reason,
    };
    let response = ureq::get(url)
        .call()
        .map_err(|e| fail(format!("download failed: {e}")))?;
    let total = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let bar = indicatif::ProgressBar::new(total.unwrap_or(0));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    let mut reader = response.into_body().into_reader();
    let mut out = Vec::with_capacity(total.unwrap_or(0) as usize);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| fail(format!("download broke off after {} bytes: {e}", out.len())))?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        bar.set_position(out.len() as u64);
    }
    bar.finish_and_clear();
    if let Some(t) = total {
        if out.len() as u64 != t {
            return Err(fail(format!("got {} of {t} bytes", out.len())));
        }
    }
    Ok(out)
}

/// Makes sure `dir` holds the four MNIST files, downloading the missing ones from
/// `SBP_MNIST_URL` or [`MNIST_URL`].
pub fn ensure_mnist(dir: &Path) -> Result<()> {
    let base = std::env::var("SBP_MNIST_URL").unwrap_or_else(|_| MNIST_URL.to_string());
    ensure_mnist_from(dir, &base)
}

/// [`ensure_mnist`] from the mirror `base` (a URL ending in `/` that serves `NAME.gz`).
/// Each download must inflate to the official bytes (MD5), or nothing is written.
pub fn ensure_mnist_from(dir: &Path, base: &str) -> Result<()> {
    for (stem, md5) in MNIST_MD5 {
        if dir.join(stem).is_file() || dir.join(format!("{stem}.gz")).is_file() {
            continue;
        }
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let url = format!("{base}{stem}.gz");
        let gz = fetch(&url, stem)?;
        let raw =
            super::inflate_if_gzip(gz.clone()).map_err(|r| format_error(Path::new(&url), r))?;
        let got = md5_hex(&raw);
        if got != md5 {
            return Err(format_error(
                Path::new(&url),
                format!("MD5 {got} of the inflated file is not the official {md5}"),
            ));
        }
        write_atomic(&dir.join(format!("{stem}.gz")), &gz)?;
    }
    Ok(())
}

/// Makes sure `dir` holds the six CIFAR-10 batch files, downloading the official archive
/// from `SBP_CIFAR10_URL` or [`CIFAR10_URL`] if any is missing.
pub fn ensure_cifar10(dir: &Path) -> Result<()> {
    let url = std::env::var("SBP_CIFAR10_URL").unwrap_or_else(|_| CIFAR10_URL.to_string());
    ensure_cifar10_from(dir, &url, CIFAR10_MD5)
}

/// [`ensure_cifar10`] from `url`, whose archive must have MD5 `md5`. Only the six batch
/// files are extracted (by name, never by the archive's paths).
pub fn ensure_cifar10_from(dir: &Path, url: &str, md5: &str) -> Result<()> {
    if CIFAR10_FILES.iter().all(|f| dir.join(f).is_file()) {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let archive = fetch(url, "cifar-10-binary.tar.gz")?;
    let got = md5_hex(&archive);
    if got != md5 {
        return Err(format_error(
            Path::new(url),
            format!("MD5 {got} of the archive is not the expected {md5}"),
        ));
    }
    let tar_bytes = super::inflate_if_gzip(archive).map_err(|r| format_error(Path::new(url), r))?;
    let mut found = Vec::new();
    let mut entries = tar::Archive::new(tar_bytes.as_slice());
    let iter = entries
        .entries()
        .map_err(|e| format_error(Path::new(url), format!("not a tar archive: {e}")))?;
    for entry in iter {
        let mut entry =
            entry.map_err(|e| format_error(Path::new(url), format!("bad tar entry: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| format_error(Path::new(url), format!("bad tar path: {e}")))?
            .into_owned();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(&file) = CIFAR10_FILES.iter().find(|&&f| f == name) {
            let mut bytes = Vec::new();
            entry
                .read_to_end(&mut bytes)
                .map_err(|e| format_error(Path::new(url), format!("{name}: {e}")))?;
            write_atomic(&dir.join(file), &bytes)?;
            found.push(file);
        }
    }
    if let Some(missing) = CIFAR10_FILES.iter().find(|f| !found.contains(f)) {
        return Err(format_error(
            Path::new(url),
            format!("the archive lacks {missing}"),
        ));
    }
    Ok(())
}
