//! The download path against a loopback HTTP server serving the real files.
#![cfg(feature = "download")]

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_sbp::data::download::{ensure_cifar10_from, ensure_mnist_from, md5_hex, CIFAR10_FILES};
use candle_sbp::data::{cifar10, mnist};
use candle_sbp::Error;

/// Serves `files` (path → bytes) on 127.0.0.1 for at most 60 s or 40 requests; returns the
/// base URL and a request counter.
fn serve(files: HashMap<String, Vec<u8>>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let base = format!("http://{}/", listener.local_addr().unwrap());
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && seen.load(Ordering::SeqCst) < 40 {
            let Ok((mut stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            seen.fetch_add(1, Ordering::SeqCst);
            stream.set_nonblocking(false).unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let line = String::from_utf8_lossy(&request);
            let path = line
                .split_whitespace()
                .nth(1)
                .unwrap_or("/")
                .trim_start_matches('/')
                .to_string();
            match files.get(&path) {
                Some(body) => {
                    let head = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(head.as_bytes());
                    let _ = stream.write_all(body);
                }
                None => {
                    let _ = stream.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                }
            }
        }
    });
    (base, count)
}

#[test]
fn mnist_downloads_check_the_official_checksums() {
    let Some(real) = common::real_data("mnist") else {
        return;
    };
    let mut files = HashMap::new();
    for stem in mnist::FILES {
        files.insert(
            format!("{stem}.gz"),
            std::fs::read(real.join(format!("{stem}.gz"))).unwrap(),
        );
    }
    // A mirror whose test labels are damaged.
    let mut bad = files.clone();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(b"not mnist").unwrap();
    bad.insert("t10k-labels-idx1-ubyte.gz".into(), gz.finish().unwrap());

    let (base, requests) = serve(files);
    let dir = tempfile::tempdir().unwrap();
    ensure_mnist_from(dir.path(), &base).unwrap();
    assert_eq!(requests.load(Ordering::SeqCst), 4);
    let m = mnist::load(dir.path()).unwrap();
    assert_eq!((m.train.len(), m.test.len()), (60_000, 10_000));
    ensure_mnist_from(dir.path(), &base).unwrap();
    assert_eq!(
        requests.load(Ordering::SeqCst),
        4,
        "present files are not fetched again"
    );

    let (bad_base, _) = serve(bad);
    let dir = tempfile::tempdir().unwrap();
    match ensure_mnist_from(dir.path(), &bad_base) {
        Err(Error::Format { path, reason }) => {
            assert!(path
                .to_string_lossy()
                .ends_with("t10k-labels-idx1-ubyte.gz"));
            assert!(reason.contains("MD5"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        !dir.path().join("t10k-labels-idx1-ubyte.gz").exists(),
        "nothing unchecked is written"
    );
    let (empty, _) = serve(HashMap::new());
    assert!(matches!(
        ensure_mnist_from(tempfile::tempdir().unwrap().path(), &empty),
        Err(Error::Format { .. })
    ));
}

#[test]
fn cifar_archive_is_checked_and_only_the_batches_are_extracted() {
    let Some(real) = common::real_data("cifar10") else {
        return;
    };
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for f in CIFAR10_FILES.iter().chain(&["batches.meta.txt"]) {
        builder
            .append_path_with_name(real.join(f), format!("cifar-10-batches-bin/{f}"))
            .unwrap();
    }
    let archive = builder.into_inner().unwrap().finish().unwrap();
    let md5 = md5_hex(&archive);
    let (base, _) = serve(HashMap::from([("cifar.tar.gz".to_string(), archive)]));
    let url = format!("{base}cifar.tar.gz");

    let dir = tempfile::tempdir().unwrap();
    match ensure_cifar10_from(dir.path(), &url, "00000000000000000000000000000000") {
        Err(Error::Format { reason, .. }) => assert!(reason.contains("MD5"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(!dir.path().join("test_batch.bin").exists());
    ensure_cifar10_from(dir.path(), &url, &md5).unwrap();
    let c = cifar10::load(dir.path()).unwrap();
    assert_eq!((c.train.len(), c.test.len()), (5_590, 1_017));
    assert!(
        !dir.path().join("batches.meta.txt").exists(),
        "only the six batches are extracted"
    );
}
