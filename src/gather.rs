//! Gathering the kept features of each row: the input of a compressed network's first
//! linear layer (the pixels a noise layer on the image kept) and of the linear layer after
//! a flattened convolution.
//!
//! The hardware gathers (16 lanes with AVX-512, 8 with AVX2) take the indices once
//! checked, and write into an uninitialised buffer: 196 of 784 features over 100 rows in
//! 3.9 instead of 7.7 µs with indexing. In place, the compressed LeNet-500-300's forward
//! pass gained only about 1 µs of its 56 (why so much less is not pinned down).

use std::mem::MaybeUninit;

/// Writes `out[r·k + j] = x[r·row_len + idx[j]]` for every row `r` of `x` (`k =
/// idx.len()`), all of `out`. `None` (and `out` untouched) where the kernel does not run
/// here (x86-64 with AVX2), an index is not below `row_len`, or the buffers do not match;
/// the caller then gathers by plain indexing.
pub(crate) fn gather_rows_f32(
    x: &[f32],
    row_len: usize,
    idx: &[usize],
    out: &mut [MaybeUninit<f32>],
) -> Option<()> {
    gather_on(crate::conv_direct::wide_available(), x, row_len, idx, out)
}

/// [`gather_rows_f32`] in 16 lanes where `wide` (and AVX-512F is present), else in 8: the
/// tests run both on a machine that has both.
fn gather_on(
    wide: bool,
    x: &[f32],
    row_len: usize,
    idx: &[usize],
    out: &mut [MaybeUninit<f32>],
) -> Option<()> {
    let k = idx.len();
    let fits = row_len > 0
        && row_len <= i32::MAX as usize
        && x.len().is_multiple_of(row_len)
        && out.len() == x.len() / row_len * k
        && idx.iter().all(|&j| j < row_len);
    if !fits || !crate::conv_direct::available() {
        return None;
    }
    if k == 0 {
        return Some(());
    }
    #[cfg(target_arch = "x86_64")]
    {
        let wide = wide && crate::conv_direct::wide_available();
        let rows = x.len() / row_len;
        let idx32: Vec<i32> = idx.iter().map(|&j| j as i32).collect();
        // Rows in parallel where they are many: the pool's workers are spinning between
        // ops anyway, and a hand-off costs under a microsecond.
        let chunks = (rows * k / PAR_MIN_VALUES).clamp(1, crate::par::threads());
        let per_chunk = rows.div_ceil(chunks);
        crate::par::map(
            x.chunks(per_chunk * row_len)
                .zip(out.chunks_mut(per_chunk * k))
                .collect(),
            |_, (x, dst)| x86::gather(wide, x, row_len, &idx32, dst),
        );
        Some(())
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("available() is false off x86-64: {wide}")
}

/// The fewest gathered values in a parallel chunk: fewer cost less on one thread than a
/// hand-off.
const PAR_MIN_VALUES: usize = 8192;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    /// The gather on every row, 16 lanes where `wide`, else 8; writes all of `out`.
    ///
    /// Callers guarantee `0 <= idx[j] < row_len`, `x.len()` a multiple of `row_len`,
    /// `out.len() == x.len() / row_len · idx.len() > 0`, AVX2 on this machine, and
    /// AVX-512F where `wide`.
    pub(super) fn gather(
        wide: bool,
        x: &[f32],
        row_len: usize,
        idx: &[i32],
        out: &mut [MaybeUninit<f32>],
    ) {
        let k = idx.len();
        let rows = x.chunks_exact(row_len).zip(out.chunks_exact_mut(k));
        if wide {
            // SAFETY: AVX-512F is present (the caller checked); every index lies inside
            // its row.
            rows.for_each(|(row, dst)| unsafe { row_512(row, idx, dst) });
        } else {
            // SAFETY: AVX2 is present (the caller checked); every index lies inside its row.
            rows.for_each(|(row, dst)| unsafe { row_256(row, idx, dst) });
        }
    }

    /// One row, 16 indices a gather; the last one masked.
    #[target_feature(enable = "avx512f")]
    unsafe fn row_512(row: &[f32], idx: &[i32], dst: &mut [MaybeUninit<f32>]) {
        let base = row.as_ptr();
        let k = idx.len();
        let mut j = 0;
        while j + 16 <= k {
            let v = _mm512_loadu_si512(idx.as_ptr().add(j) as *const _);
            let g = _mm512_i32gather_ps::<4>(v, base);
            _mm512_storeu_ps(dst.as_mut_ptr().add(j) as *mut f32, g);
            j += 16;
        }
        if j < k {
            let mask: __mmask16 = (1u16 << (k - j)) - 1;
            let v = _mm512_maskz_loadu_epi32(mask, idx.as_ptr().add(j));
            let g = _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, v, base);
            _mm512_mask_storeu_ps(dst.as_mut_ptr().add(j) as *mut f32, mask, g);
        }
    }

    /// One row, 8 indices a gather; the rest one by one.
    #[target_feature(enable = "avx2")]
    unsafe fn row_256(row: &[f32], idx: &[i32], dst: &mut [MaybeUninit<f32>]) {
        let base = row.as_ptr();
        let k = idx.len();
        let mut j = 0;
        while j + 8 <= k {
            let v = _mm256_loadu_si256(idx.as_ptr().add(j) as *const __m256i);
            let g = _mm256_i32gather_ps::<4>(base, v);
            _mm256_storeu_ps(dst.as_mut_ptr().add(j) as *mut f32, g);
            j += 8;
        }
        for t in j..k {
            dst.get_unchecked_mut(t)
                .write(*row.get_unchecked(*idx.get_unchecked(t) as usize));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gather through `gather_on(wide, …)`, as a plain vector.
    fn gathered(wide: bool, x: &[f32], row_len: usize, idx: &[usize]) -> Option<Vec<f32>> {
        let mut out = vec![MaybeUninit::new(f32::NAN); x.len() / row_len.max(1) * idx.len()];
        gather_on(wide, x, row_len, idx, &mut out)?;
        // SAFETY: initialised (with NaN, then by the gather).
        Some(out.iter().map(|v| unsafe { v.assume_init() }).collect())
    }

    /// Every remainder of the 16- and 8-lane loops, both widths, against indexing.
    #[test]
    fn gathers_what_indexing_gives() {
        if !crate::conv_direct::available() {
            eprintln!("SKIPPED: no AVX2 on this machine, the gather never runs");
            return;
        }
        if !crate::conv_direct::wide_available() {
            eprintln!("no AVX-512F on this machine: the 16-lane gather is not tested");
        }
        let row_len = 53;
        let x: Vec<f32> = (0..3 * row_len).map(|v| v as f32 * 0.5 - 7.0).collect();
        for k in 0..40 {
            let idx: Vec<usize> = (0..k).map(|j| (j * 31 + 7) % row_len).collect();
            let want: Vec<f32> = x
                .chunks(row_len)
                .flat_map(|row| idx.iter().map(move |&j| row[j]))
                .collect();
            for wide in [false, true] {
                assert_eq!(
                    gathered(wide, &x, row_len, &idx),
                    Some(want.clone()),
                    "k {k} wide {wide}"
                );
            }
        }
    }

    #[test]
    fn gathers_many_rows_in_parallel_chunks() {
        if !crate::conv_direct::available() {
            eprintln!("SKIPPED: no AVX2 on this machine, the gather never runs");
            return;
        }
        // Enough rows for several chunks of the parallel split, and a short last one.
        let (row_len, rows) = (300, 1001);
        let x: Vec<f32> = (0..row_len * rows).map(|v| v as f32).collect();
        let idx: Vec<usize> = (0..row_len).filter(|j| j % 3 != 1).collect();
        let want: Vec<f32> = x
            .chunks(row_len)
            .flat_map(|row| idx.iter().map(move |&j| row[j]))
            .collect();
        assert_eq!(gathered(true, &x, row_len, &idx), Some(want));
    }

    #[test]
    fn refuses_out_of_range_indices_and_mismatched_buffers() {
        let x = vec![1.0f32; 20];
        assert!(gathered(true, &x, 10, &[3, 10]).is_none());
        assert!(gathered(true, &x, 0, &[]).is_none());
        assert!(gathered(true, &x, 7, &[1]).is_none());
        let mut short = vec![MaybeUninit::new(0f32); 3];
        assert!(gather_on(true, &x, 10, &[9, 0], &mut short).is_none());
        if crate::conv_direct::available() {
            assert_eq!(gathered(true, &x, 10, &[9, 0]), Some(vec![1.0; 4]));
            assert_eq!(gathered(true, &x, 10, &[]), Some(vec![]));
        }
    }
}
