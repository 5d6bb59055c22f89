//! `y = x·wᵀ + b` (with an optional ReLU) for f32 by register tiles of dot products, on
//! x86-64 with AVX2 and FMA (detected at run time).
//!
//! Both operands of a linear layer's forward pass are row-major along the shared axis, so
//! each output is a dot product of two contiguous rows. A tile of 4 rows of `x` by 3 rows of
//! `w` keeps 12 accumulators in registers and feeds each of its 7 loads to 3 or 4 FMAs; no
//! operand is packed. The GEMM that candle-sbp uses elsewhere repacks the weights on every
//! call, which for the small layers of a compressed network costs more than the packing
//! saves: on one core, a 50×196 by 145×196 product (compressed LeNet-500-300's first
//! layer, half a batch) takes 36.5 µs here against 41.3 µs, and its last layer (50×56 by
//! 10×56) 1.3 against 1.8 µs. Larger weights stay with the GEMM ([`prefers`]).

/// Values a vector holds.
const LANES: usize = 8;
/// Rows of `x` and of `w` in a full tile.
const TILE_ROWS: usize = 4;
const TILE_COLS: usize = 3;

/// Whether the kernel runs here and pays for a product of `n × i` by `o × i`: the weights
/// must stay in the core's L2 while every block of rows streams past them (at most 64k
/// weights), and rows must hold a vector.
pub(crate) fn prefers(i: usize, o: usize) -> bool {
    crate::conv_direct::available() && i >= LANES && o * i <= MAX_WEIGHTS
}

/// The most weights a product takes through this kernel.
const MAX_WEIGHTS: usize = 1 << 16;

/// Writes `x (n×i) · wᵀ (i×o) + b`, through a ReLU where `relu`, into `y` (`n×o`) for the
/// rows `rows` of `x`. `false` (and `y` untouched) where the kernel does not run here or
/// the buffers do not fit.
pub(crate) fn forward(
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    relu: bool,
    (n, i, o): (usize, usize, usize),
    rows: std::ops::Range<usize>,
    y: &mut [f32],
) -> bool {
    let fits = x.len() >= n * i
        && w.len() >= o * i
        && y.len() >= rows.len() * o
        && rows.end <= n
        && b.is_none_or(|b| b.len() >= o);
    if !fits || !crate::conv_direct::available() || i == 0 {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: AVX2 and FMA are present (checked above); every pointer the tiles form
        // stays inside the slices, whose lengths were checked against the shape.
        unsafe { x86::forward(x, w, b, relu, (i, o), rows, y) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (relu, rows);
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{LANES, TILE_COLS, TILE_ROWS};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn forward(
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        relu: bool,
        (i, o): (usize, usize),
        rows: std::ops::Range<usize>,
        y: &mut [f32],
    ) {
        let lanes: [i32; LANES] = std::array::from_fn(|l| if l < i % LANES { -1 } else { 0 });
        let mask = _mm256_loadu_si256(lanes.as_ptr().cast());
        let t = Tile {
            i,
            o,
            mask,
            b,
            relu,
        };
        // The weights' column blocks outside, so that each block's rows stay in L1 while
        // the rows of x pass.
        let mut c = 0;
        while c < o {
            let cols = (o - c).min(TILE_COLS);
            let mut r = rows.start;
            while r < rows.end {
                let rs = (rows.end - r).min(TILE_ROWS);
                let xp = x.as_ptr().add(r * i);
                let wp = w.as_ptr().add(c * i);
                let yp = y.as_mut_ptr().add((r - rows.start) * o + c);
                match (rs, cols) {
                    (4, 3) => t.run::<4, 3>(xp, wp, yp, c),
                    (4, 2) => t.run::<4, 2>(xp, wp, yp, c),
                    (4, 1) => t.run::<4, 1>(xp, wp, yp, c),
                    (3, 3) => t.run::<3, 3>(xp, wp, yp, c),
                    (3, 2) => t.run::<3, 2>(xp, wp, yp, c),
                    (3, 1) => t.run::<3, 1>(xp, wp, yp, c),
                    (2, 3) => t.run::<2, 3>(xp, wp, yp, c),
                    (2, 2) => t.run::<2, 2>(xp, wp, yp, c),
                    (2, 1) => t.run::<2, 1>(xp, wp, yp, c),
                    (1, 3) => t.run::<1, 3>(xp, wp, yp, c),
                    (1, 2) => t.run::<1, 2>(xp, wp, yp, c),
                    _ => t.run::<1, 1>(xp, wp, yp, c),
                }
                r += rs;
            }
            c += cols;
        }
    }

    struct Tile<'a> {
        i: usize,
        o: usize,
        /// Lanes `0..i % 8` on: the loads of each row's last, partial vector.
        mask: __m256i,
        b: Option<&'a [f32]>,
        relu: bool,
    }

    impl Tile<'_> {
        /// `R` rows of x (from `x`) by `C` rows of w (from `w`), written at `y` (row
        /// stride `o`); `c` is the first column's index, for the bias.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn run<const R: usize, const C: usize>(
            &self,
            x: *const f32,
            w: *const f32,
            y: *mut f32,
            c: usize,
        ) {
            let i = self.i;
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            let full = i - i % LANES;
            let mut k = 0;
            while k < full {
                let wv: [__m256; C] = std::array::from_fn(|cc| _mm256_loadu_ps(w.add(cc * i + k)));
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(x.add(r * i + k));
                    for (a, &wc) in acc_r.iter_mut().zip(&wv) {
                        *a = _mm256_fmadd_ps(xv, wc, *a);
                    }
                }
                k += LANES;
            }
            if full < i {
                let m = self.mask;
                let wv: [__m256; C] =
                    std::array::from_fn(|cc| _mm256_maskload_ps(w.add(cc * i + k), m));
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let xv = _mm256_maskload_ps(x.add(r * i + k), m);
                    for (a, &wc) in acc_r.iter_mut().zip(&wv) {
                        *a = _mm256_fmadd_ps(xv, wc, *a);
                    }
                }
            }
            // Per row: the C sums in one vector, plus the bias, through the ReLU, stored
            // by a mask of C lanes.
            let lanes: [i32; 4] = std::array::from_fn(|l| if l < C { -1 } else { 0 });
            let cols = _mm_loadu_si128(lanes.as_ptr().cast());
            let bias = match self.b {
                Some(b) => _mm_maskload_ps(b.as_ptr().add(c), cols),
                None => _mm_setzero_ps(),
            };
            for (r, acc_r) in acc.iter().enumerate() {
                let mut v = _mm_add_ps(hsum(acc_r), bias);
                if self.relu {
                    // maxps returns its second operand when either is NaN (or both are
                    // zeros): a NaN, and -0, pass as the GEMM path's ReLU passes them.
                    v = _mm_max_ps(_mm_setzero_ps(), v);
                }
                _mm_maskstore_ps(y.add(r * self.o), cols, v);
            }
        }
    }

    /// The lane sums of up to 4 vectors, in one pass of horizontal adds.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: &[__m256]) -> __m128 {
        let at = |k: usize| v.get(k).copied().unwrap_or(_mm256_setzero_ps());
        let ab = _mm256_hadd_ps(at(0), at(1));
        let cd = _mm256_hadd_ps(at(2), at(3));
        let abcd = _mm256_hadd_ps(ab, cd);
        _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(
        x: &[f32],
        w: &[f32],
        b: &[f32],
        relu: bool,
        (n, i, o): (usize, usize, usize),
    ) -> Vec<f32> {
        let mut y = vec![0.0f32; n * o];
        for r in 0..n {
            for c in 0..o {
                let mut s = b[c] as f64;
                for k in 0..i {
                    s += x[r * i + k] as f64 * w[c * i + k] as f64;
                }
                y[r * o + c] = if relu { s.max(0.0) } else { s } as f32;
            }
        }
        y
    }

    #[test]
    fn tiles_and_remainders_match_the_definition() {
        if !crate::conv_direct::available() {
            eprintln!("linear_dot: no AVX2/FMA on this machine, kernel not tested");
            return;
        }
        let value = |k: usize| ((k * 7919 % 1000) as f32 - 500.0) / 250.0;
        for &(n, i, o) in &[
            (1, 8, 1),
            (5, 9, 4),
            (7, 23, 7),
            (9, 64, 6),
            (4, 196, 3),
            (13, 31, 11),
        ] {
            let x: Vec<f32> = (0..n * i).map(value).collect();
            let w: Vec<f32> = (0..o * i).map(|k| value(k + 17)).collect();
            let b: Vec<f32> = (0..o).map(|k| value(k + 3)).collect();
            for relu in [false, true] {
                let want = reference(&x, &w, &b, relu, (n, i, o));
                let mut y = vec![f32::NAN; n * o];
                assert!(forward(&x, &w, Some(&b), relu, (n, i, o), 0..n, &mut y));
                for (k, (got, want)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "({n},{i},{o}) relu {relu} [{k}]: {got} vs {want}"
                    );
                }
                // A block of rows writes only its own rows.
                if n > 2 {
                    let mut part = vec![f32::NAN; (n - 2) * o];
                    assert!(forward(&x, &w, Some(&b), relu, (n, i, o), 2..n, &mut part));
                    assert_eq!(part, y[2 * o..]);
                }
            }
        }
        // A NaN passes the ReLU, as on the GEMM path.
        let x = [f32::NAN; 8];
        let mut y = [0.0f32; 1];
        assert!(forward(&x, &[1.0; 8], None, true, (1, 8, 1), 0..1, &mut y));
        assert!(y[0].is_nan());
        // Buffers that do not fit are refused.
        let mut y = vec![0.0f32; 3];
        assert!(!forward(
            &[0.0; 16],
            &[0.0; 16],
            None,
            false,
            (2, 8, 2),
            0..2,
            &mut y
        ));
    }
}
