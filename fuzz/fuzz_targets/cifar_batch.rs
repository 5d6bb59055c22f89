//! Any bytes as a CIFAR-10 batch: an error, never a panic.
#![no_main]

use candle_sbp::data::cifar10::{parse_batch, RECORD};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(records) = parse_batch(data) {
        assert_eq!(records * RECORD, data.len());
    }
});
