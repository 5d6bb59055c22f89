//! Direct 2-d convolution in f32 on x86-64 with AVX2 and FMA, in 16-lane tiles where
//! AVX-512F is present (both detected at run time): stride 1, no dilation, any padding.
//!
//! Pruned networks keep few channels, and there im2col + GEMM spends more time writing
//! the im2col matrix (`c_in·kh·kw` values per output position, each used by only `c_out`
//! multiply-adds) than multiplying: a compressed LeNet5's first convolution keeps 6 output
//! channels for 25 im2col rows. This kernel reads the input where it lies. A tile of up to
//! 4 output channels × 3 output rows × 8 output columns stays in 12 registers while it
//! runs over the taps, and each input vector it loads feeds one FMA per channel. With
//! AVX-512 a vector holds 8 columns of two channels (see [`block_x86_wide`]): on 2 cores,
//! LeNet5's second convolution at batch 100 takes 1.34 ms against 2.33 ms in 8 lanes.

use std::mem::MaybeUninit;

/// Output channels per tile.
const CHANNELS: usize = 4;
/// Output rows per tile.
const ROWS: usize = 3;
/// Output columns per tile: one AVX vector of f32.
const LANES: usize = 8;

/// The shape of a stride-1, undilated convolution of one sample.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DirectConv {
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub padding: usize,
    /// A ReLU on the output.
    pub relu: bool,
    /// Then 2×2 max-pooling with stride 2 (a last odd row or column is dropped).
    pub pool: bool,
}

impl DirectConv {
    fn padded(&self) -> (usize, usize) {
        (self.h + 2 * self.padding, self.w + 2 * self.padding)
    }

    /// The convolution's output height and width.
    pub fn conv_size(&self) -> (usize, usize) {
        let (hp, wp) = self.padded();
        (hp + 1 - self.kh, wp + 1 - self.kw)
    }

    /// Output height and width (after the pooling, with `pool`).
    pub fn out_size(&self) -> (usize, usize) {
        let (oh, ow) = self.conv_size();
        if self.pool {
            (oh / 2, ow / 2)
        } else {
            (oh, ow)
        }
    }

    pub fn out_len(&self) -> usize {
        let (oh, ow) = self.out_size();
        self.c_out * oh * ow
    }

    fn in_len(&self) -> usize {
        self.c_in * self.h * self.w
    }

    fn k(&self) -> usize {
        self.c_in * self.kh * self.kw
    }
}

/// Whether this machine runs the kernel (x86-64 with AVX2 and FMA).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this machine also runs the 16-lane (AVX-512F) tiles, here and in
/// [`crate::linear_dot`].
pub(crate) fn wide_available() -> bool {
    available() && crate::simd::level() == crate::simd::Level::Avx512
}

/// Whether this kernel beats im2col + GEMM on the convolution `g`: up to 64 output
/// channels or with a short kernel, where building the im2col matrix costs most, and only
/// on rows of at least one vector ([`LANES`] columns). Measured at batch 100, direct
/// against im2col: LeNet5's 1→20 5×5 convolution 0.44 against 0.90 ms, its 20→50 one 2.34
/// against 2.53 ms, a pruned 6→11 one 0.15 against 0.27 ms; VGG's 3→64 3×3 at 32×32 2.6
/// against 4.7 ms, 64→64 at 32×32 60 against 63 ms; but 64→128 at 16×16 31 against 27 ms
/// and 256→256 at 8×8 57 against 47 ms.
pub(crate) fn pays(g: &DirectConv) -> bool {
    g.conv_size().1 >= LANES && (g.c_out <= 64 || g.k() <= 64)
}

/// Writes the convolution of a batch `x` (`batch × c_in × h × w`) with `w` (`c_out × c_in ×
/// kh × kw`) plus `b` into every element of `out` (`batch × c_out × oh × ow`, which may
/// start uninitialised). `None` (and `out` untouched) where the kernel does not run here
/// ([`available`]) or the buffers do not match the shape.
pub(crate) fn forward(
    g: &DirectConv,
    batch: usize,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    out: &mut [MaybeUninit<f32>],
) -> Option<()> {
    forward_on(wide_available(), g, batch, x, w, b, out)
}

/// [`forward`] in 16-lane tiles where `wide` (and AVX-512F is present), else in 8-lane
/// ones: the tests run both on a machine that has both.
fn forward_on(
    wide: bool,
    g: &DirectConv,
    batch: usize,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    out: &mut [MaybeUninit<f32>],
) -> Option<()> {
    if w.len() != g.c_out * g.k() {
        return None;
    }
    forward_packed_on(wide, g, batch, x, &pack_weights(g, w), b, out)
}

/// A convolution's weights packed once for [`forward`]'s kernel, for a network whose
/// weights do not change between calls (an inference plan).
#[derive(Clone)]
pub(crate) struct PackedConv {
    shape: DirectConv,
    weights: Vec<f32>,
}

/// The shape, not the packed values.
impl std::fmt::Debug for PackedConv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedConv")
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

impl PackedConv {
    /// Packs `w` (`c_out × c_in × kh × kw`) for the convolution `g`; `None` where the
    /// weights do not hold that shape.
    pub(crate) fn new(g: DirectConv, w: &[f32]) -> Option<Self> {
        (w.len() == g.c_out * g.k()).then(|| PackedConv {
            weights: pack_weights(&g, w),
            shape: g,
        })
    }

    /// The convolution's shape.
    pub(crate) fn shape(&self) -> &DirectConv {
        &self.shape
    }

    /// [`forward`] with these weights.
    pub(crate) fn forward(
        &self,
        batch: usize,
        x: &[f32],
        b: Option<&[f32]>,
        out: &mut [MaybeUninit<f32>],
    ) -> Option<()> {
        let g = &self.shape;
        forward_packed_on(wide_available(), g, batch, x, &self.weights, b, out)
    }
}

/// [`forward_on`] with weights packed by [`pack_weights`].
fn forward_packed_on(
    wide: bool,
    g: &DirectConv,
    batch: usize,
    x: &[f32],
    packed: &[f32],
    b: Option<&[f32]>,
    out: &mut [MaybeUninit<f32>],
) -> Option<()> {
    let fits = g.kh >= 1
        && g.kw >= 1
        && g.padded().0 >= g.kh
        && g.padded().1 >= g.kw
        && (!g.pool || (g.conv_size().0 >= 2 && g.conv_size().1 >= 2))
        && x.len() == batch * g.in_len()
        && packed.len() == g.c_out.div_ceil(CHANNELS) * g.k() * CHANNELS
        && b.is_none_or(|b| b.len() == g.c_out)
        && out.len() == batch * g.out_len();
    if !available() || !fits {
        return None;
    }
    let wide = wide && wide_available();
    let blocks = g.c_out.div_ceil(CHANNELS);
    // Enough work items for every thread: whole samples for a batch, blocks of output
    // channels for a single image.
    let threads = crate::par::threads();
    let groups = (2 * threads).div_ceil(batch.max(1)).clamp(1, blocks.max(1));
    let per_group = blocks.div_ceil(groups);
    let groups = blocks.div_ceil(per_group.max(1));
    let (oh, ow) = g.out_size();
    let plane = oh * ow;
    let mut items = Vec::with_capacity(batch * groups);
    let mut rest = out;
    for n in 0..batch {
        for group in 0..groups {
            let first = group * per_group;
            let last = ((group + 1) * per_group).min(blocks);
            let channels = (last * CHANNELS).min(g.c_out) - first * CHANNELS;
            let (dst, tail) = rest.split_at_mut(channels * plane);
            items.push((n, first..last, dst));
            rest = tail;
        }
    }
    crate::par::map(items, |_, (n, blocks, dst)| {
        let sample = &x[n * g.in_len()..(n + 1) * g.in_len()];
        let padded;
        let input = if g.padding == 0 {
            sample
        } else {
            padded = pad(g, sample);
            &padded
        };
        let first = blocks.start;
        for block in blocks {
            let c0 = block * CHANNELS;
            let channels = CHANNELS.min(g.c_out - c0);
            let weights = &packed[block * g.k() * CHANNELS..(block + 1) * g.k() * CHANNELS];
            let mut bias = [0f32; CHANNELS];
            if let Some(b) = b {
                bias[..channels].copy_from_slice(&b[c0..c0 + channels]);
            }
            let at = (c0 - first * CHANNELS) * plane;
            let dst = &mut dst[at..at + channels * plane];
            // SAFETY: `available()` held above, so AVX2 and FMA are present, and AVX-512F
            // where `wide`; the buffers' lengths were checked against the shape (`input`,
            // `weights` and `dst` are this sample's padded input, this block's packed
            // weights and its channels' output planes). The tiles cover every output
            // value, so all of `out` is written once every block has run.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                if wide {
                    block_x86_wide(g, input, weights, &bias, channels, dst)
                } else {
                    block_x86(g, input, weights, &bias, channels, dst)
                }
            };
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!(
                "available() is false off x86-64: {:?}",
                (input, weights, dst)
            );
        }
    });
    Some(())
}

/// Weights regrouped by blocks of [`CHANNELS`] output channels, each block
/// `[c_in][kh][kw][CHANNELS]` (zeros past the last channel), so that a tap's weights for the
/// tile's channels lie side by side.
fn pack_weights(g: &DirectConv, w: &[f32]) -> Vec<f32> {
    let k = g.k();
    let blocks = g.c_out.div_ceil(CHANNELS);
    let mut packed = vec![0f32; blocks * k * CHANNELS];
    for (o, row) in w.chunks_exact(k).enumerate() {
        let (block, j) = (o / CHANNELS, o % CHANNELS);
        for (t, &v) in row.iter().enumerate() {
            packed[(block * k + t) * CHANNELS + j] = v;
        }
    }
    packed
}

/// One sample's input with `padding` zeros around each plane.
fn pad(g: &DirectConv, sample: &[f32]) -> Vec<f32> {
    let (hp, wp) = g.padded();
    let p = g.padding;
    let mut out = vec![0f32; g.c_in * hp * wp];
    for (plane, src) in out
        .chunks_exact_mut(hp * wp)
        .zip(sample.chunks_exact(g.h * g.w))
    {
        for (y, row) in src.chunks_exact(g.w).enumerate() {
            let at = (y + p) * wp + p;
            plane[at..at + g.w].copy_from_slice(row);
        }
    }
    out
}

/// All tiles of one block of `channels` output channels of one sample: writes every value
/// of `dst`.
///
/// # Safety
/// The CPU has AVX2 and FMA; `input` is the sample's (padded) input, `weights` the block's
/// packed weights (`k · CHANNELS`) and `dst` its `channels` output planes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_x86(
    g: &DirectConv,
    input: &[f32],
    weights: &[f32],
    bias: &[f32; CHANNELS],
    channels: usize,
    dst: &mut [MaybeUninit<f32>],
) {
    let (hp, wp) = g.padded();
    let (oh, ow) = g.out_size();
    debug_assert!(input.len() == g.c_in * hp * wp);
    debug_assert!(weights.len() == g.k() * CHANNELS && dst.len() == channels * oh * ow);
    let shape = Tile::of(g);
    if g.pool {
        // Two convolution rows and 8 columns a tile make one pooled row of 4 values.
        for py in 0..oh {
            for ox in (0..2 * ow).step_by(LANES) {
                let cols = LANES.min(2 * ow - ox);
                let mask = lane_mask(cols);
                let src = input.as_ptr().add(2 * py * wp + ox);
                let out = dst.as_mut_ptr().cast::<f32>().add(py * ow + ox / 2);
                let args = (src, weights.as_ptr(), bias, out, mask);
                match (channels, cols == LANES) {
                    (1, true) => tile::<1, 2, true, true>(&shape, args),
                    (1, false) => tile::<1, 2, false, true>(&shape, args),
                    (2, true) => tile::<2, 2, true, true>(&shape, args),
                    (2, false) => tile::<2, 2, false, true>(&shape, args),
                    (3, true) => tile::<3, 2, true, true>(&shape, args),
                    (3, false) => tile::<3, 2, false, true>(&shape, args),
                    (4, true) => tile::<4, 2, true, true>(&shape, args),
                    (4, false) => tile::<4, 2, false, true>(&shape, args),
                    _ => unreachable!("tiles have 1 to {CHANNELS} channels"),
                }
            }
        }
        return;
    }
    for oy in (0..oh).step_by(ROWS) {
        let rows = ROWS.min(oh - oy);
        for ox in (0..ow).step_by(LANES) {
            let cols = LANES.min(ow - ox);
            let mask = lane_mask(cols);
            let src = input.as_ptr().add(oy * wp + ox);
            let out = dst.as_mut_ptr().cast::<f32>().add(oy * ow + ox);
            let args = (src, weights.as_ptr(), bias, out, mask);
            macro_rules! dispatch {
                ($($c:literal $r:literal),*) => {
                    match (channels, rows, cols == LANES) {
                        $(
                            ($c, $r, true) => tile::<$c, $r, true, false>(&shape, args),
                            ($c, $r, false) => tile::<$c, $r, false, false>(&shape, args),
                        )*
                        _ => unreachable!("tiles have 1 to {CHANNELS} channels and 1 to {ROWS} rows"),
                    }
                };
            }
            dispatch!(1 1, 1 2, 1 3, 2 1, 2 2, 2 3, 3 1, 3 2, 3 3, 4 1, 4 2, 4 3);
        }
    }
}

/// Output rows per tile of the 16-lane kernel (two pooled rows with pooling), for two
/// pairs of channels; a single pair takes twice as many rows, so that its tile, too, keeps
/// 8 accumulators, enough to cover the FMAs' latency.
const WIDE_ROWS: usize = 4;

/// [`block_x86`] in 16-lane tiles: each vector holds 8 columns of two output channels, so
/// that a tile of 4 channels × 4 rows × 8 columns (2 channels × 8 rows) keeps 8
/// accumulators, and one FMA of an input vector (the same 8 values in both halves) with a
/// vector of the pair's two weights (8 copies of each, spread from the tap's 4 packed
/// weights by one permutation) serves both channels.
///
/// # Safety
/// As [`block_x86`], with AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn block_x86_wide(
    g: &DirectConv,
    input: &[f32],
    weights: &[f32],
    bias: &[f32; CHANNELS],
    channels: usize,
    dst: &mut [MaybeUninit<f32>],
) {
    let (hp, wp) = g.padded();
    let (oh, ow) = g.out_size();
    debug_assert!(input.len() == g.c_in * hp * wp);
    debug_assert!(weights.len() == g.k() * CHANNELS && dst.len() == channels * oh * ow);
    let shape = Tile::of(g);
    let pairs = channels.div_ceil(2);
    // The convolution's rows and columns that make the output (a last odd one is dropped
    // by the pooling).
    let (conv_rows, conv_cols) = if g.pool { (2 * oh, 2 * ow) } else { (oh, ow) };
    let tile_rows = WIDE_ROWS * 2 / pairs.max(1);
    for cy in (0..conv_rows).step_by(tile_rows) {
        let rows = tile_rows.min(conv_rows - cy);
        for cx in (0..conv_cols).step_by(LANES) {
            let cols = LANES.min(conv_cols - cx);
            let mask = lane_mask(cols);
            let src = input.as_ptr().add(cy * wp + cx);
            let out = if g.pool {
                dst.as_mut_ptr().cast::<f32>().add(cy / 2 * ow + cx / 2)
            } else {
                dst.as_mut_ptr().cast::<f32>().add(cy * ow + cx)
            };
            let args = (src, weights.as_ptr(), bias, out, mask, channels);
            macro_rules! dispatch {
                ($pool:literal; $($p:literal $r:literal),*) => {
                    match (pairs, rows, cols == LANES) {
                        $(
                            ($p, $r, true) => wide_tile::<$p, $r, true, $pool>(&shape, args),
                            ($p, $r, false) => wide_tile::<$p, $r, false, $pool>(&shape, args),
                        )*
                        _ => unreachable!("tiles have 1 pair and 1 to 8 rows or 2 and 1 to 4"),
                    }
                };
            }
            if g.pool {
                dispatch!(true; 1 2, 1 4, 1 6, 1 8, 2 2, 2 4);
            } else {
                dispatch!(false; 1 1, 1 2, 1 3, 1 4, 1 5, 1 6, 1 7, 1 8, 2 1, 2 2, 2 3, 2 4);
            }
        }
    }
}

/// `P` pairs of channels × `R` rows × 8 columns (the first `mask` lanes unless `FULL`) of
/// output at `out`, reading the input from `src`; of the pairs' channels, only the first
/// `channels` are written. With `POOL` (`R` even), the tile's 2×2 maxima instead: `R / 2`
/// rows × 4 columns.
///
/// # Safety
/// As [`tile`], with AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::type_complexity)]
unsafe fn wide_tile<const P: usize, const R: usize, const FULL: bool, const POOL: bool>(
    t: &Tile,
    (src, weights, bias, out, mask, channels): (
        *const f32,
        *const f32,
        &[f32; CHANNELS],
        *mut f32,
        std::arch::x86_64::__m256i,
        usize,
    ),
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); R]; P];
    // Per pair: the lanes of a tap's 4 weights that fill its two halves.
    let mut spread = [_mm512_setzero_si512(); P];
    for (p, s) in spread.iter_mut().enumerate() {
        let (a, b) = (2 * p as i32, 2 * p as i32 + 1);
        *s = _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b);
    }
    for (p, row) in acc.iter_mut().enumerate() {
        let b = _mm512_mask_blend_ps(
            0xFF00,
            _mm512_set1_ps(bias[2 * p]),
            _mm512_set1_ps(bias[2 * p + 1]),
        );
        *row = [b; R];
    }
    let mut v = [_mm512_setzero_ps(); R];
    for c in 0..t.c_in {
        for ky in 0..t.kh {
            let line = src.add(c * t.plane + ky * t.row);
            let taps = weights.add((c * t.kh + ky) * t.kw * CHANNELS);
            for kx in 0..t.kw {
                for (r, v) in v.iter_mut().enumerate() {
                    let p = line.add(r * t.row + kx);
                    let eight = if FULL {
                        _mm256_loadu_ps(p)
                    } else {
                        _mm256_maskload_ps(p, mask)
                    };
                    *v = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(eight)));
                }
                let four = _mm512_castps128_ps512(_mm_loadu_ps(taps.add(kx * CHANNELS)));
                for (row, &s) in acc.iter_mut().zip(&spread) {
                    let wv = _mm512_permutexvar_ps(s, four);
                    for (a, &x) in row.iter_mut().zip(&v) {
                        *a = _mm512_fmadd_ps(x, wv, *a);
                    }
                }
            }
        }
    }
    let zero = _mm512_setzero_ps();
    let relu = |a: __m512| if t.relu { _mm512_max_ps(zero, a) } else { a };
    if POOL {
        // Pair maxima of adjacent lanes land on the even lanes; each half's four move to
        // the vector's first two quarters.
        let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 0, 0, 0, 0, 0, 0, 0);
        for (p, row) in acc.iter().enumerate() {
            for q in 0..R / 2 {
                let m = nan_max_wide(relu(row[2 * q]), relu(row[2 * q + 1]));
                let m = nan_max_wide(m, _mm512_permute_ps(m, 0b10_11_00_01));
                let m = _mm512_permutexvar_ps(evens, m);
                let quarters = [_mm512_castps512_ps128(m), _mm512_extractf32x4_ps(m, 1)];
                for (j, &quarter) in quarters.iter().enumerate() {
                    if 2 * p + j >= channels {
                        continue;
                    }
                    let at = out.add((2 * p + j) * t.out_plane + q * t.out_row);
                    store_pooled::<FULL>(at, quarter, mask);
                }
            }
        }
        return;
    }
    for (p, row) in acc.iter().enumerate() {
        for (r, &a) in row.iter().enumerate() {
            let a = relu(a);
            let high = _mm512_extractf64x4_pd(_mm512_castps_pd(a), 1);
            let halves = [_mm512_castps512_ps256(a), _mm256_castpd_ps(high)];
            for (j, &half) in halves.iter().enumerate() {
                if 2 * p + j >= channels {
                    continue;
                }
                store8::<FULL>(
                    out.add((2 * p + j) * t.out_plane + r * t.out_row),
                    half,
                    mask,
                );
            }
        }
    }
}

/// [`nan_max`] on 16 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn nan_max_wide(
    a: std::arch::x86_64::__m512,
    b: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let a_nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, a);
    _mm512_mask_blend_ps(a_nan, _mm512_max_ps(a, b), a)
}

/// A mask with lanes `0..cols` on (sign bit set) and the rest off.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn lane_mask(cols: usize) -> std::arch::x86_64::__m256i {
    let lanes: [i32; LANES] = std::array::from_fn(|l| if l < cols { -1 } else { 0 });
    std::arch::x86_64::_mm256_loadu_si256(lanes.as_ptr().cast())
}

/// Strides of a sample's input and output, and the kernel's extent.
#[cfg(target_arch = "x86_64")]
struct Tile {
    plane: usize,
    row: usize,
    c_in: usize,
    kh: usize,
    kw: usize,
    out_plane: usize,
    out_row: usize,
    relu: bool,
}

#[cfg(target_arch = "x86_64")]
impl Tile {
    fn of(g: &DirectConv) -> Self {
        let (hp, wp) = g.padded();
        let (oh, ow) = g.out_size();
        Tile {
            plane: hp * wp,
            row: wp,
            c_in: g.c_in,
            kh: g.kh,
            kw: g.kw,
            out_plane: oh * ow,
            out_row: ow,
            relu: g.relu,
        }
    }
}

/// Stores 8 values at `at`, only the lanes of `mask` unless `FULL`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn store8<const FULL: bool>(
    at: *mut f32,
    v: std::arch::x86_64::__m256,
    mask: std::arch::x86_64::__m256i,
) {
    use std::arch::x86_64::*;
    if FULL {
        _mm256_storeu_ps(at, v);
    } else {
        _mm256_maskstore_ps(at, mask, v);
    }
}

/// Stores 4 pooled values at `at`, only those whose two columns lie inside the tile's
/// `mask` unless `FULL`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn store_pooled<const FULL: bool>(
    at: *mut f32,
    v: std::arch::x86_64::__m128,
    mask: std::arch::x86_64::__m256i,
) {
    use std::arch::x86_64::*;
    if FULL {
        _mm_storeu_ps(at, v);
    } else {
        let columns = _mm256_movemask_ps(_mm256_castsi256_ps(mask));
        let lanes: [i32; 4] = std::array::from_fn(|l| -(columns >> (2 * l + 1) & 1));
        _mm_maskstore_ps(at, _mm_loadu_si128(lanes.as_ptr().cast()), v);
    }
}

/// `C` channels × `R` rows × 8 columns (the first `mask` lanes unless `FULL`) of output at
/// `out`, reading the input from `src` (the tile's top-left input value). With `POOL`
/// (and `R` = 2), the tile's 2×2 maxima instead: `C` × 1 row × 4 columns (half the mask's
/// lanes).
///
/// # Safety
/// AVX2 and FMA are present; every input value under the tile's windows and every output
/// value of the tile (on lanes the mask keeps) is inside its buffer.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::type_complexity)]
unsafe fn tile<const C: usize, const R: usize, const FULL: bool, const POOL: bool>(
    t: &Tile,
    (src, weights, bias, out, mask): (
        *const f32,
        *const f32,
        &[f32; CHANNELS],
        *mut f32,
        std::arch::x86_64::__m256i,
    ),
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); R]; C];
    for (j, row) in acc.iter_mut().enumerate() {
        *row = [_mm256_set1_ps(bias[j]); R];
    }
    for c in 0..t.c_in {
        for ky in 0..t.kh {
            let line = src.add(c * t.plane + ky * t.row);
            let taps = weights.add((c * t.kh + ky) * t.kw * CHANNELS);
            for kx in 0..t.kw {
                let v: [__m256; R] = std::array::from_fn(|r| {
                    let p = line.add(r * t.row + kx);
                    if FULL {
                        _mm256_loadu_ps(p)
                    } else {
                        _mm256_maskload_ps(p, mask)
                    }
                });
                for (j, row) in acc.iter_mut().enumerate() {
                    let wv = _mm256_broadcast_ss(&*taps.add(kx * CHANNELS + j));
                    for (a, &x) in row.iter_mut().zip(&v) {
                        *a = _mm256_fmadd_ps(x, wv, *a);
                    }
                }
            }
        }
    }
    let zero = _mm256_setzero_ps();
    if POOL {
        // Pair maxima of adjacent lanes land on the even lanes, which move to the low half.
        let evens = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
        for (j, row) in acc.iter().enumerate() {
            let rows = row.map(|a| if t.relu { _mm256_max_ps(zero, a) } else { a });
            let m = nan_max(rows[0], rows[R - 1]);
            let m = nan_max(m, _mm256_permute_ps(m, 0b10_11_00_01));
            let m = _mm256_castps256_ps128(_mm256_permutevar8x32_ps(m, evens));
            store_pooled::<FULL>(out.add(j * t.out_plane), m, mask);
        }
        return;
    }
    for (j, row) in acc.iter().enumerate() {
        for (r, &a) in row.iter().enumerate() {
            // `max(0, a)` keeps a NaN (the second operand wins on NaN), as `relu_if` does.
            let a = if t.relu { _mm256_max_ps(zero, a) } else { a };
            store8::<FULL>(out.add(j * t.out_plane + r * t.out_row), a, mask);
        }
    }
}

/// `max(a, b)` per lane, NaN where either is NaN (as the pooling op's maximum).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn nan_max(
    a: std::arch::x86_64::__m256,
    b: std::arch::x86_64::__m256,
) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // `max_ps` gives `b` where either is NaN; the blend gives `a` where `a` is NaN.
    let a_nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(a, a);
    _mm256_blendv_ps(_mm256_max_ps(a, b), a, a_nan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The convolution (and pooling) straight from its definition, in f64.
    fn reference(
        g: &DirectConv,
        batch: usize,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
    ) -> Vec<f64> {
        let (oh, ow) = g.conv_size();
        let mut out = vec![0f64; batch * g.c_out * oh * ow];
        for n in 0..batch {
            for o in 0..g.c_out {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut s = b.map_or(0.0, |b| b[o] as f64);
                        for c in 0..g.c_in {
                            for ky in 0..g.kh {
                                for kx in 0..g.kw {
                                    let (iy, ix) = (oy + ky, ox + kx);
                                    let (Some(iy), Some(ix)) =
                                        (iy.checked_sub(g.padding), ix.checked_sub(g.padding))
                                    else {
                                        continue;
                                    };
                                    if iy >= g.h || ix >= g.w {
                                        continue;
                                    }
                                    let xv = x[((n * g.c_in + c) * g.h + iy) * g.w + ix];
                                    let wv = w[((o * g.c_in + c) * g.kh + ky) * g.kw + kx];
                                    s += xv as f64 * wv as f64;
                                }
                            }
                        }
                        out[((n * g.c_out + o) * oh + oy) * ow + ox] =
                            if g.relu { s.max(0.0) } else { s };
                    }
                }
            }
        }
        if g.pool {
            max_pool_2x2(g, batch, &out)
        } else {
            out
        }
    }

    /// 2×2 max-pooling with stride 2 of the convolution output `conv`.
    fn max_pool_2x2(g: &DirectConv, batch: usize, conv: &[f64]) -> Vec<f64> {
        let (oh, ow) = g.conv_size();
        let (ph, pw) = g.out_size();
        let mut out = vec![0f64; batch * g.c_out * ph * pw];
        for (plane, src) in out
            .chunks_exact_mut(ph * pw)
            .zip(conv.chunks_exact(oh * ow))
        {
            for py in 0..ph {
                for px in 0..pw {
                    let at = |dy: usize, dx: usize| src[(2 * py + dy) * ow + 2 * px + dx];
                    plane[py * pw + px] = at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1));
                }
            }
        }
        out
    }

    #[test]
    fn matches_the_definition_on_every_tile_shape() {
        if !available() {
            eprintln!("SKIPPED: no AVX2 + FMA on this machine, the direct kernel never runs");
            return;
        }
        if !wide_available() {
            eprintln!("no AVX-512F on this machine: the 16-lane tiles are not tested");
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // Channel counts and output sizes that leave every remainder of the 4-channel,
        // 3-row and 8-column tiles, with and without padding and bias, batch 1 and more.
        let cases = [
            (1, 1, 30, 40, 2, 3, 3, 0, true),
            (2, 1, 21, 19, 5, 3, 3, 1, false),
            (1, 1, 28, 28, 6, 5, 5, 0, true),
            (3, 2, 12, 12, 11, 5, 5, 0, true),
            (1, 1, 5, 5, 1, 5, 5, 0, false),
            (2, 3, 9, 13, 7, 3, 3, 1, true),
            (1, 4, 4, 20, 9, 3, 2, 2, false),
            (5, 2, 10, 7, 4, 1, 1, 0, true),
            (2, 1, 6, 17, 3, 2, 3, 0, true),
            (1, 8, 8, 8, 16, 3, 3, 1, true),
            (2, 2, 13, 21, 5, 2, 2, 0, true),
        ];
        let every = cases
            .into_iter()
            .enumerate()
            .flat_map(|c| [(c, false), (c, true)]);
        for ((case, (batch, c_in, h, w, c_out, kh, kw, padding, bias)), pool) in every {
            let g = DirectConv {
                c_in,
                h,
                w,
                c_out,
                kh,
                kw,
                padding,
                relu: case % 2 == 1,
                pool,
            };
            if pool && (g.conv_size().0 < 2 || g.conv_size().1 < 2) {
                continue;
            }
            let mut draw =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
            let x = draw(batch * g.in_len());
            let wt = draw(c_out * g.k());
            let b = draw(c_out);
            let b = bias.then_some(b.as_slice());
            let want = reference(&g, batch, &x, &wt, b);
            for wide in [false, true] {
                let mut ours = vec![MaybeUninit::new(f32::NAN); batch * g.out_len()];
                forward_on(wide, &g, batch, &x, &wt, b, &mut ours).expect("the kernel runs");
                // SAFETY: initialised (with NaN, then by the kernel).
                let ours: Vec<f32> = ours.iter().map(|v| unsafe { v.assume_init() }).collect();
                assert_eq!(ours.len(), want.len(), "{g:?}");
                for (i, (&a, &e)) in ours.iter().zip(&want).enumerate() {
                    assert!(
                        (a as f64 - e).abs() <= 1e-5 * (1.0 + e.abs()),
                        "{g:?} batch {batch} wide {wide}: output {i} is {a}, expected {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn mismatched_buffers_are_refused() {
        let g = DirectConv {
            c_in: 1,
            h: 5,
            w: 5,
            c_out: 2,
            kh: 3,
            kw: 3,
            padding: 0,
            relu: false,
            pool: false,
        };
        let x = vec![0f32; 25];
        let mut out = vec![MaybeUninit::new(0f32); 18];
        assert!(forward(&g, 1, &x, &[0f32; 17], None, &mut out).is_none());
        assert!(forward(&g, 2, &x, &[0f32; 18], None, &mut out).is_none());
        assert!(forward(&g, 1, &x, &[0f32; 18], Some(&[0f32; 3]), &mut out).is_none());
        assert!(forward(&g, 1, &x, &[0f32; 18], None, &mut out[..17]).is_none());
    }
}
