//! `y = x·wᵀ + b` (with an optional ReLU) for f32 by register tiles of dot products, on
//! x86-64 with AVX2 and FMA, and in 16-lane vectors where AVX-512 is present (both
//! detected at run time).
//!
//! Both operands of a linear layer's forward pass are row-major along the shared axis, so
//! each output is a dot product of two contiguous rows. A tile of 4 rows of `x` by 3 rows of
//! `w` keeps 12 accumulators in registers and feeds each of its 7 loads to 3 or 4 FMAs; no
//! operand is packed. The GEMM that candle-sbp uses elsewhere repacks the weights on every
//! call, which for the small layers of a compressed network costs more than the packing
//! saves: on one core, a 50×196 by 145×196 product (compressed LeNet-500-300's first
//! layer, half a batch) takes 36.5 µs here against 41.3 µs, and its last layer (50×56 by
//! 10×56) 1.3 against 1.8 µs. Larger weights stay with the GEMM ([`prefers`]). With
//! AVX-512 (which the GEMM uses too) the same tiles hold 16 lanes a vector.

/// Values a vector holds.
const LANES: usize = 8;
/// Rows of `x` and of `w` in a full tile.
const TILE_ROWS: usize = 4;
const TILE_COLS: usize = 3;

/// Whether the kernel runs here and pays for a product of `n × i` by `o × i`: the weights
/// must stay in the core's L2 while every block of rows streams past them (at most 64k
/// weights), and rows must hold a vector.
///
/// With AVX-512 the GEMM packs into 16-lane tiles too and wins wherever its packing is
/// shared by enough outputs; the dot products keep the few-output layers (a classifier)
/// and the long, narrow ones. On one core at 50 rows: 196→145 takes 29.1 µs in the GEMM
/// against 36.9 µs here, 145→56 8.8 against 11.5 µs, 120→84 11.7 against 12.6 µs; but
/// 56→10 1.8 against 1.3 µs, 300→10 6.9 against 4.4 µs, 400→120 46.6 against 41.4 µs.
pub(crate) fn prefers(i: usize, o: usize) -> bool {
    let fits = crate::conv_direct::available() && i >= LANES && o * i <= MAX_WEIGHTS;
    fits && (!crate::conv_direct::wide_available()
        || o <= WIDE_MAX_OUTPUTS
        || i >= WIDE_MIN_INPUTS_PER_OUTPUT * o)
}

/// With AVX-512: the most outputs a layer of any input length runs here ...
const WIDE_MAX_OUTPUTS: usize = 16;
/// ... and the inputs per output above which a layer with more outputs does.
const WIDE_MIN_INPUTS_PER_OUTPUT: usize = 3;

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
    forward_on(
        crate::conv_direct::wide_available(),
        x,
        w,
        b,
        relu,
        (n, i, o),
        rows,
        y,
    )
}

/// [`forward`] in 16-lane tiles where `wide` (and AVX-512F is present), else in 8-lane
/// ones: the tests run both on a machine that has both.
#[allow(clippy::too_many_arguments)]
fn forward_on(
    wide: bool,
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
        let wide = wide && crate::conv_direct::wide_available();
        // SAFETY: AVX2 and FMA are present (checked above), and AVX-512F where `wide`;
        // every pointer the tiles form stays inside the slices, whose lengths were checked
        // against the shape.
        unsafe { x86::forward(wide, x, w, b, relu, (i, o), rows, y) };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (wide, relu, rows);
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{LANES, TILE_COLS, TILE_ROWS};
    use std::arch::x86_64::*;

    /// Lanes of an AVX-512 vector.
    const WIDE_LANES: usize = 16;

    /// Writes the rows `rows` of `x·wᵀ + b` (through a ReLU where `relu`) into `y`, in
    /// 16-lane tiles where `wide`, else in 8-lane ones.
    ///
    /// # Safety
    /// AVX2 and FMA must be present, and AVX-512F where `wide`; the slices must hold the
    /// shape (`x` `rows.end × i`, `w` `o × i`, `y` `rows.len() × o`, `b` `o` values).
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn forward(
        wide: bool,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        relu: bool,
        (i, o): (usize, usize),
        rows: std::ops::Range<usize>,
        y: &mut [f32],
    ) {
        let out = Out { o, b, relu };
        if wide {
            let tile = Tile::<Wide> {
                i,
                mask: ((1u32 << (i % WIDE_LANES)) - 1) as __mmask16,
                out,
            };
            walk_wide(&tile, x, w, rows, y);
        } else {
            let lanes: [i32; LANES] = std::array::from_fn(|l| if l < i % LANES { -1 } else { 0 });
            let tile = Tile::<Narrow> {
                i,
                mask: _mm256_loadu_si256(lanes.as_ptr().cast()),
                out,
            };
            walk(&tile, x, w, rows, y);
        }
    }

    /// One register tile: `R` rows of x (from `x`) by `C` rows of w (from `w`), written at
    /// `y` (row stride `o`); `c` is the first column's index, for the bias.
    trait Tiles {
        /// The reduced axis' length and the output's row length.
        fn shape(&self) -> (usize, usize);

        /// # Safety
        /// The instruction set of the implementation must be present; `R` rows of `x` and
        /// `C` rows of `w` of `i` values ([`shape`](Self::shape)), and `R` rows of `C` outputs at `y`,
        /// must lie inside their slices.
        unsafe fn run<const R: usize, const C: usize>(
            &self,
            x: *const f32,
            w: *const f32,
            y: *mut f32,
            c: usize,
        );
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn walk(
        t: &Tile<Narrow>,
        x: &[f32],
        w: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
    ) {
        walk_tiles(t, x, w, rows, y)
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn walk_wide(
        t: &Tile<Wide>,
        x: &[f32],
        w: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
    ) {
        walk_tiles(t, x, w, rows, y)
    }

    /// Every tile of the output rows `rows`.
    #[inline(always)]
    unsafe fn walk_tiles<T: Tiles>(
        t: &T,
        x: &[f32],
        w: &[f32],
        rows: std::ops::Range<usize>,
        y: &mut [f32],
    ) {
        let (i, o) = t.shape();
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

    /// Where a tile's sums go: the output's row stride, the bias and the ReLU.
    #[derive(Clone, Copy)]
    struct Out<'a> {
        o: usize,
        b: Option<&'a [f32]>,
        relu: bool,
    }

    impl Out<'_> {
        /// Per row: the `C` sums of its 8-lane accumulators in one vector, plus the bias,
        /// through the ReLU, stored at `y` by a mask of `C` lanes.
        #[target_feature(enable = "avx2,fma")]
        #[inline]
        unsafe fn store<const R: usize, const C: usize>(
            &self,
            acc: &[[__m256; C]; R],
            y: *mut f32,
            c: usize,
        ) {
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

    /// One vector width's operations, for the tile body both widths share.
    trait Lanes {
        type V: Copy;
        type Mask: Copy;
        /// Values a vector holds.
        const N: usize;
        unsafe fn zero() -> Self::V;
        unsafe fn load(p: *const f32) -> Self::V;
        /// The lanes `mask` keeps, zeros elsewhere; the others are not read.
        unsafe fn load_masked(p: *const f32, mask: Self::Mask) -> Self::V;
        unsafe fn fma(a: Self::V, b: Self::V, acc: Self::V) -> Self::V;
        /// Eight lanes whose sum is `v`'s, for the 8-lane epilogue.
        unsafe fn fold(v: Self::V) -> __m256;
    }

    /// AVX2 and FMA: 8 lanes.
    struct Narrow;

    impl Lanes for Narrow {
        type V = __m256;
        type Mask = __m256i;
        const N: usize = LANES;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load_masked(p: *const f32, mask: __m256i) -> __m256 {
            _mm256_maskload_ps(p, mask)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, acc: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, acc)
        }
        #[inline(always)]
        unsafe fn fold(v: __m256) -> __m256 {
            v
        }
    }

    /// AVX-512F: 16 lanes, twice the multiply-adds an instruction.
    struct Wide;

    impl Lanes for Wide {
        type V = __m512;
        type Mask = __mmask16;
        const N: usize = WIDE_LANES;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load_masked(p: *const f32, mask: __mmask16) -> __m512 {
            _mm512_maskz_loadu_ps(mask, p)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, acc: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, acc)
        }
        #[inline(always)]
        unsafe fn fold(v: __m512) -> __m256 {
            let high = _mm512_extractf64x4_pd(_mm512_castps_pd(v), 1);
            _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(high))
        }
    }

    /// The tiles of one vector width.
    struct Tile<'a, L: Lanes> {
        i: usize,
        /// Lanes `0..i % L::N` on: the loads of each row's last, partial vector.
        mask: L::Mask,
        out: Out<'a>,
    }

    impl<L: Lanes> Tile<'_, L> {
        /// The tile's dot products, then its outputs: the body of [`Tiles::run`], inlined
        /// into each width's entry point, which enables that width's instructions. No
        /// closures here: they would not inherit the instructions.
        #[inline(always)]
        unsafe fn body<const R: usize, const C: usize>(
            &self,
            x: *const f32,
            w: *const f32,
            y: *mut f32,
            c: usize,
        ) {
            let i = self.i;
            let mut acc = [[L::zero(); C]; R];
            let full = i - i % L::N;
            let mut k = 0;
            while k < full {
                self.step::<R, C, false>(&mut acc, x, w, k);
                k += L::N;
            }
            if full < i {
                self.step::<R, C, true>(&mut acc, x, w, k);
            }
            let mut folded = [[_mm256_setzero_ps(); C]; R];
            for (f_r, acc_r) in folded.iter_mut().zip(&acc) {
                for (f, &a) in f_r.iter_mut().zip(acc_r) {
                    *f = L::fold(a);
                }
            }
            self.out.store(&folded, y, c);
        }

        /// One vector of the tile's rows from offset `k` into its accumulators, the
        /// lanes of `mask` only where `MASKED`.
        #[inline(always)]
        unsafe fn step<const R: usize, const C: usize, const MASKED: bool>(
            &self,
            acc: &mut [[L::V; C]; R],
            x: *const f32,
            w: *const f32,
            k: usize,
        ) {
            let mut wv = [L::zero(); C];
            for (cc, v) in wv.iter_mut().enumerate() {
                let p = w.add(cc * self.i + k);
                *v = if MASKED {
                    L::load_masked(p, self.mask)
                } else {
                    L::load(p)
                };
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let p = x.add(r * self.i + k);
                let xv = if MASKED {
                    L::load_masked(p, self.mask)
                } else {
                    L::load(p)
                };
                for (a, &wc) in acc_r.iter_mut().zip(&wv) {
                    *a = L::fma(xv, wc, *a);
                }
            }
        }
    }

    impl Tiles for Tile<'_, Narrow> {
        fn shape(&self) -> (usize, usize) {
            (self.i, self.out.o)
        }

        #[target_feature(enable = "avx2,fma")]
        unsafe fn run<const R: usize, const C: usize>(
            &self,
            x: *const f32,
            w: *const f32,
            y: *mut f32,
            c: usize,
        ) {
            self.body::<R, C>(x, w, y, c)
        }
    }

    impl Tiles for Tile<'_, Wide> {
        fn shape(&self) -> (usize, usize) {
            (self.i, self.out.o)
        }

        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn run<const R: usize, const C: usize>(
            &self,
            x: *const f32,
            w: *const f32,
            y: *mut f32,
            c: usize,
        ) {
            self.body::<R, C>(x, w, y, c)
        }
    }

    /// The lane sums of up to 4 vectors, in one pass of horizontal adds.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn hsum(v: &[__m256]) -> __m128 {
        let at = |k: usize| v.get(k).copied().unwrap_or(_mm256_setzero_ps());
        let ab = _mm256_hadd_ps(at(0), at(1));
        let cd = _mm256_hadd_ps(at(2), at(3));
        let abcd = _mm256_hadd_ps(ab, cd);
        _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `x·wᵀ + b` (through a ReLU where `relu`) summed in f64: the other linear kernels'
    /// tests compare with it too.
    pub(crate) fn reference(
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
        if !crate::conv_direct::wide_available() {
            eprintln!("linear_dot: no AVX-512F on this machine, 16-lane tiles not tested");
        }
        for wide in [false, true] {
            tiles_match_the_definition(wide);
        }
    }

    fn tiles_match_the_definition(wide: bool) {
        let value = |k: usize| ((k * 7919 % 1000) as f32 - 500.0) / 250.0;
        for &(n, i, o) in &[
            (1, 8, 1),
            (5, 9, 4),
            (7, 23, 7),
            (9, 64, 6),
            (4, 196, 3),
            (13, 31, 11),
            (6, 16, 5),
            (5, 33, 4),
            (9, 145, 7),
        ] {
            let x: Vec<f32> = (0..n * i).map(value).collect();
            let w: Vec<f32> = (0..o * i).map(|k| value(k + 17)).collect();
            let b: Vec<f32> = (0..o).map(|k| value(k + 3)).collect();
            for relu in [false, true] {
                let want = reference(&x, &w, &b, relu, (n, i, o));
                let mut y = vec![f32::NAN; n * o];
                assert!(forward_on(
                    wide,
                    &x,
                    &w,
                    Some(&b),
                    relu,
                    (n, i, o),
                    0..n,
                    &mut y
                ));
                for (k, (got, want)) in y.iter().zip(&want).enumerate() {
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "wide {wide} ({n},{i},{o}) relu {relu} [{k}]: {got} vs {want}"
                    );
                }
                // A block of rows writes only its own rows.
                if n > 2 {
                    let mut part = vec![f32::NAN; (n - 2) * o];
                    assert!(forward_on(
                        wide,
                        &x,
                        &w,
                        Some(&b),
                        relu,
                        (n, i, o),
                        2..n,
                        &mut part
                    ));
                    assert_eq!(part, y[2 * o..]);
                }
            }
        }
        // A NaN passes the ReLU, as on the GEMM path.
        let x = [f32::NAN; 8];
        let mut y = [0.0f32; 1];
        assert!(forward_on(
            wide,
            &x,
            &[1.0; 8],
            None,
            true,
            (1, 8, 1),
            0..1,
            &mut y
        ));
        assert!(y[0].is_nan());
        // Buffers that do not fit are refused.
        let mut y = vec![0.0f32; 3];
        assert!(!forward_on(
            wide,
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
