//! Any bytes, raw or gzip, as an MNIST IDX file of rank 1 or 3: an error, never a panic.
#![no_main]

use candle_sbp::data::{inflate_if_gzip, mnist::parse_idx};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(bytes) = inflate_if_gzip(data.to_vec()) {
        for rank in [1, 3] {
            if let Ok((values, dims)) = parse_idx(&bytes, rank) {
                assert_eq!(values.len(), dims.iter().product::<usize>());
            }
        }
    }
});
