//! The MNIST and CIFAR-10 readers on the real files and on damaged ones.

use candle::Device;
use candle_sbp::data::{cifar10, mnist};
use candle_sbp::Error;

mod common;
use common::real_data;

#[test]
fn reads_the_complete_official_mnist() {
    let Some(dir) = real_data("mnist") else {
        return;
    };
    let m = mnist::load(&dir).unwrap();
    assert_eq!((m.train.len(), m.test.len()), (60_000, 10_000));
    assert_eq!(
        (m.train.channels, m.train.height, m.train.width),
        (1, 28, 28)
    );
    // The official files start with a 5 (train) and a 7 (test).
    assert_eq!((m.train.labels[0], m.test.labels[0]), (5, 7));
    let mut counts = [0usize; 10];
    m.train.labels.iter().for_each(|&l| counts[l as usize] += 1);
    assert_eq!(
        counts,
        [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    );
    let (xs, ys) = m.test.batch(&[0, 1, 2], &Device::Cpu).unwrap();
    assert_eq!(xs.dims(), &[3, 1, 28, 28]);
    assert_eq!(ys.to_vec1::<u32>().unwrap(), [7, 2, 1]);
    let max = xs.max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(max <= 1.0 && max > 0.9);
    assert!(matches!(
        m.test.batch(&[10_000], &Device::Cpu),
        Err(Error::InvalidValue { .. })
    ));
}

#[test]
fn reads_the_cifar10_subset_counting_records_from_sizes() {
    let Some(dir) = real_data("cifar10") else {
        return;
    };
    let c = cifar10::load(&dir).unwrap();
    assert_eq!((c.train.len(), c.test.len()), (5_590, 1_017));
    assert_eq!(c.train.pixels.len(), 5_590 * 3072);
    // The official batches start with a frog (6) and a cat (3).
    assert_eq!((c.train.labels[0], c.test.labels[0]), (6, 3));
    let (xs, _) = c.test.batch(&[0], &Device::Cpu).unwrap();
    assert_eq!(xs.dims(), &[1, 3, 32, 32]);
}

fn expect_format(
    result: Result<impl std::fmt::Debug, Error>,
    path: &std::path::Path,
    needle: &str,
) {
    match result {
        Err(Error::Format { path: p, reason }) => {
            assert_eq!(p, path);
            assert!(reason.contains(needle), "{reason:?} lacks {needle:?}");
        }
        other => panic!("expected a format error with {needle:?}, got {other:?}"),
    }
}

fn idx(magic3: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, magic3];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

#[test]
fn damaged_mnist_files_are_typed_errors_with_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x");
    let read = |bytes: &[u8], rank| {
        std::fs::write(&p, bytes).unwrap();
        mnist::read_idx(&p, rank)
    };
    expect_format(read(&[0, 0], 3), &p, "too short");
    expect_format(read(&[0, 0, 9, 3, 0, 0, 0, 1], 3), &p, "offset 0");
    expect_format(read(&idx(1, &[2], &[1, 2]), 3), &p, "offset 3");
    expect_format(
        read(&idx(3, &[2, 2, 2], &[0; 7]), 3),
        &p,
        "truncated at offset 23",
    );
    expect_format(
        read(&idx(3, &[2, 2, 2], &[0; 9]), 3),
        &p,
        "trailing data from offset 24",
    );
    expect_format(read(&idx(3, &[0, 2, 2], &[]), 3), &p, "no data");
    expect_format(read(&[0x1f, 0x8b, 8, 0, 1, 2, 3], 3), &p, "corrupt gzip");
    assert_eq!(
        read(&idx(1, &[3], &[4, 5, 6]), 1).unwrap(),
        (vec![4, 5, 6], vec![3])
    );
    // A gzip-compressed file reads the same.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &idx(1, &[3], &[4, 5, 6])).unwrap();
    assert_eq!(read(&gz.finish().unwrap(), 1).unwrap().0, vec![4, 5, 6]);

    // A whole directory: mislabelled, mismatched counts, missing files.
    let write = |name: &str, bytes: Vec<u8>| std::fs::write(dir.path().join(name), bytes).unwrap();
    write("train-images-idx3-ubyte", idx(3, &[2, 2, 2], &[0; 8]));
    write("train-labels-idx1-ubyte", idx(1, &[2], &[3, 12]));
    write("t10k-images-idx3-ubyte", idx(3, &[1, 2, 2], &[0; 4]));
    write("t10k-labels-idx1-ubyte", idx(1, &[2], &[1, 2]));
    let labels = dir.path().join("train-labels-idx1-ubyte");
    expect_format(
        mnist::load(dir.path()),
        &labels,
        "label 12 of record 1 (byte offset 9)",
    );
    write("train-labels-idx1-ubyte", idx(1, &[2], &[3, 4]));
    expect_format(
        mnist::load(dir.path()),
        &dir.path().join("t10k-labels-idx1-ubyte"),
        "2 labels for 1 images",
    );
    std::fs::remove_file(dir.path().join("t10k-images-idx3-ubyte")).unwrap();
    assert!(matches!(mnist::load(dir.path()), Err(Error::Io { .. })));
}

#[test]
fn damaged_cifar_files_are_typed_errors_with_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("data_batch_1.bin");
    let mut two = vec![0u8; 2 * cifar10::RECORD];
    two[cifar10::RECORD] = 4;
    std::fs::write(&p, &two).unwrap();
    assert_eq!(cifar10::read_batch(&p).unwrap().labels, [0, 4]);
    std::fs::write(&p, &two[..2 * cifar10::RECORD - 5]).unwrap();
    expect_format(
        cifar10::read_batch(&p),
        &p,
        "record 1 at offset 3073 is truncated",
    );
    two[cifar10::RECORD] = 10;
    std::fs::write(&p, &two).unwrap();
    expect_format(
        cifar10::read_batch(&p),
        &p,
        "label 10 of record 1 (byte offset 3073)",
    );
    std::fs::write(&p, []).unwrap();
    expect_format(cifar10::read_batch(&p), &p, "empty");
    assert!(matches!(
        cifar10::load(dir.path().join("nowhere")),
        Err(Error::Io { .. })
    ));
}

mod random_bytes {
    use super::idx;
    use candle_sbp::data::{cifar10, inflate_if_gzip, mnist};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: 5000,
            failure_persistence: None,
            rng_seed: proptest::test_runner::RngSeed::Fixed(7),
            ..ProptestConfig::default()
        })]

        /// Random bytes, and valid headers with random dimensions and bodies: the parsers
        /// return errors, never panic, and what they accept is consistent.
        #[test]
        fn parsers_never_panic(
            noise in proptest::collection::vec(any::<u8>(), 0..400),
            dims in proptest::collection::vec(0u32..6, 1..4),
            cut in 0usize..80,
        ) {
            let _ = inflate_if_gzip(noise.clone());
            let mut gz = vec![0x1f, 0x8b];
            gz.extend_from_slice(&noise);
            prop_assert!(inflate_if_gzip(gz).is_err() || noise.len() > 10);
            let body_len: usize = dims.iter().map(|&d| d as usize).product();
            let mut file = idx(dims.len() as u8, &dims, &vec![1u8; body_len]);
            file.truncate(file.len().saturating_sub(cut % 3));
            for bytes in [&noise, &file] {
                for rank in 1..4 {
                    if let Ok((values, shape)) = mnist::parse_idx(bytes, rank) {
                        prop_assert_eq!(values.len(), shape.iter().product::<usize>());
                    }
                }
                if let Ok(records) = cifar10::parse_batch(bytes) {
                    prop_assert_eq!(records * cifar10::RECORD, bytes.len());
                }
            }
        }
    }
}
