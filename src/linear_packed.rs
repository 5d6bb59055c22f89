//! `y = x·wᵀ + b` (with an optional ReLU) for f32 weights packed once, for the layers of an
//! [`InferencePlan`](crate::net::InferencePlan), on x86-64 with AVX2 and FMA (16-lane
//! vectors where AVX-512 is present).
//!
//! The training kernels get `w` afresh on every call: the GEMM repacks it each time, and the
//! dot-product kernel ([`crate::linear_dot`]) ends every output with a sum across lanes. A
//! plan's weights do not change, so they are packed once, transposed into panels of whole
//! vectors of outputs: for each group of up to [`GROUP_WIDE`] vectors (4 × 16 outputs),
//! `[input][vector][lane]`. A tile of `R` rows by `V` vectors then broadcasts one input of
//! each row against `V` vectors of weights: `R·V` FMAs for `V` loads and `R` broadcasts,
//! and no reduction at the end. On one core at 50 rows (half a batch), compressed
//! LeNet-500-300's three layers (196→145→56→10) took about 33 µs in these tiles (a scratch
//! prototype of them) against 39 µs through the GEMM and the dot products; through the
//! plan the whole network at batch 100 went from 56 to 32 µs.

/// Vectors of outputs a tile covers at most, with 16-lane vectors (AVX-512: 32 registers
/// hold 6 rows × 4 vectors of accumulators) ...
const GROUP_WIDE: usize = 4;
/// ... and with 8-lane vectors (AVX2: 16 registers hold 6 rows × 2 vectors).
const GROUP_NARROW: usize = 2;

/// Vectors of outputs a group holds with vectors of `lanes` lanes.
fn group_width(lanes: usize) -> usize {
    if lanes == 16 {
        GROUP_WIDE
    } else {
        GROUP_NARROW
    }
}

/// A linear layer's weights and bias packed for [`PackedLinear::forward`].
#[derive(Clone)]
pub(crate) struct PackedLinear {
    inputs: usize,
    outputs: usize,
    /// Lanes a vector holds: 16 with AVX-512, 8 with AVX2 only.
    lanes: usize,
    /// The panels, group after group: `[input][vector of the group][lane]`, zeros past the
    /// last output.
    panels: Vec<f32>,
    /// The bias (zeros without one), padded with zeros to whole vectors.
    bias: Vec<f32>,
}

/// The shape, not the hundreds of thousands of packed values.
impl std::fmt::Debug for PackedLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedLinear")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .field("lanes", &self.lanes)
            .finish_non_exhaustive()
    }
}

impl PackedLinear {
    /// Packs `w` (`outputs × inputs`, row-major) and the optional bias `b` for this CPU's
    /// widest vectors; `None` where the kernel does not run here (no AVX2 and FMA) or the
    /// buffers do not hold the shape.
    pub(crate) fn new(w: &[f32], b: Option<&[f32]>, inputs: usize, outputs: usize) -> Option<Self> {
        Self::new_on(crate::conv_direct::wide_available(), w, b, inputs, outputs)
    }

    /// [`new`](Self::new) with 16-lane vectors where `wide` (and AVX-512F is present),
    /// else 8-lane ones: the tests run both on a machine that has both.
    fn new_on(
        wide: bool,
        w: &[f32],
        b: Option<&[f32]>,
        inputs: usize,
        outputs: usize,
    ) -> Option<Self> {
        let fits = w.len() == inputs * outputs && b.is_none_or(|b| b.len() == outputs);
        if !fits || !crate::conv_direct::available() || inputs == 0 || outputs == 0 {
            return None;
        }
        let lanes = if wide && crate::conv_direct::wide_available() {
            16
        } else {
            8
        };
        let group = group_width(lanes);
        let vectors = outputs.div_ceil(lanes);
        let mut panels = Vec::with_capacity(inputs * vectors * lanes);
        for first in (0..vectors).step_by(group) {
            let width = group.min(vectors - first) * lanes;
            for k in 0..inputs {
                panels.extend((0..width).map(|j| {
                    let o = first * lanes + j;
                    if o < outputs {
                        w[o * inputs + k]
                    } else {
                        0.0
                    }
                }));
            }
        }
        let mut bias = vec![0f32; vectors * lanes];
        if let Some(b) = b {
            bias[..outputs].copy_from_slice(b);
        }
        Some(PackedLinear {
            inputs,
            outputs,
            lanes,
            panels,
            bias,
        })
    }

    /// Outputs a row of `y` holds.
    pub(crate) fn outputs(&self) -> usize {
        self.outputs
    }

    /// Writes `x·wᵀ + b` (through a ReLU where `relu`) for the `rows` rows of `x`
    /// (`rows × inputs`) into `y` (`rows × outputs`); `None` (and `y` untouched) where the
    /// buffers do not hold the shape. A large product splits its groups of outputs across
    /// the pool (a single example through a wide layer is bound by reading the weights);
    /// inside the pool's work it runs on the calling thread.
    pub(crate) fn forward(&self, x: &[f32], rows: usize, relu: bool, y: &mut [f32]) -> Option<()> {
        if x.len() != rows * self.inputs || y.len() != rows * self.outputs {
            return None;
        }
        let group = group_width(self.lanes);
        let groups = self.outputs.div_ceil(self.lanes).div_ceil(group);
        let macs = rows * self.inputs * self.outputs;
        let parts = if macs >= crate::ops::GEMM_PAR_MIN_MACS {
            crate::par::threads().min(groups)
        } else {
            1
        };
        let per = groups.div_ceil(parts);
        let ranges: Vec<_> = (0..groups)
            .step_by(per)
            .map(|g| g..(g + per).min(groups))
            .collect();
        let out = crate::ops::SendPtr(y.as_mut_ptr());
        crate::par::map(ranges, |_, groups| {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `new_on` built the packing only where AVX2 and FMA are present, and
            // in 16 lanes only where AVX-512F is; the panels and the padded bias hold the
            // packed shape, `x` and `y` were checked against it above, and the ranges of
            // groups split the output columns without overlap, so each thread writes its
            // own elements of `y`.
            unsafe {
                if self.lanes == 16 {
                    x86::forward_wide(self, x, rows, relu, out.at(0), groups)
                } else {
                    x86::forward_narrow(self, x, rows, relu, out.at(0), groups)
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            unreachable!("no packing is built off x86-64: {:?}", (x, relu, groups))
        });
        Some(())
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{PackedLinear, GROUP_NARROW, GROUP_WIDE};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// One vector width's instructions.
    trait Lanes {
        type V: Copy;
        /// Values a vector holds.
        const N: usize;
        unsafe fn zero() -> Self::V;
        unsafe fn load(p: *const f32) -> Self::V;
        unsafe fn splat(p: *const f32) -> Self::V;
        unsafe fn fma(a: Self::V, b: Self::V, acc: Self::V) -> Self::V;
        unsafe fn add(a: Self::V, b: Self::V) -> Self::V;
        unsafe fn relu(a: Self::V) -> Self::V;
        /// Stores the first `lanes` values of `v` at `p` (all of them where `lanes >= N`).
        unsafe fn store(p: *mut f32, v: Self::V, lanes: usize);
    }

    /// AVX2 and FMA: 8 lanes.
    struct Narrow;

    impl Lanes for Narrow {
        type V = __m256;
        const N: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn splat(p: *const f32) -> __m256 {
            _mm256_broadcast_ss(&*p)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, acc: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, acc)
        }
        #[inline(always)]
        unsafe fn add(a: __m256, b: __m256) -> __m256 {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn relu(a: __m256) -> __m256 {
            // The instruction returns its second operand where either is NaN: a NaN comes
            // through, as it does through candle's ReLU.
            _mm256_max_ps(_mm256_setzero_ps(), a)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256, lanes: usize) {
            if lanes >= 8 {
                _mm256_storeu_ps(p, v)
            } else {
                let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes as i32), lane);
                _mm256_maskstore_ps(p, mask, v)
            }
        }
    }

    /// AVX-512F: 16 lanes.
    struct Wide;

    impl Lanes for Wide {
        type V = __m512;
        const N: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn splat(p: *const f32) -> __m512 {
            _mm512_set1_ps(*p)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, acc: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, acc)
        }
        #[inline(always)]
        unsafe fn add(a: __m512, b: __m512) -> __m512 {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn relu(a: __m512) -> __m512 {
            _mm512_max_ps(_mm512_setzero_ps(), a)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512, lanes: usize) {
            if lanes >= 16 {
                _mm512_storeu_ps(p, v)
            } else {
                _mm512_mask_storeu_ps(p, ((1u32 << lanes) - 1) as __mmask16, v)
            }
        }
    }

    /// One group of a layer: where its panel, bias and output columns start.
    #[derive(Clone, Copy)]
    struct Group {
        inputs: usize,
        panel: *const f32,
        bias: *const f32,
        /// The group's first output column in `y`, and `y`'s row length.
        y: *mut f32,
        ld: usize,
        /// Output columns of the group that exist (the rest are padding).
        columns: usize,
        relu: bool,
    }

    /// `R` rows from `x` (rows of `inputs` values) through the group's `V` vectors.
    #[inline(always)]
    unsafe fn tile<L: Lanes, const R: usize, const V: usize>(g: &Group, x: *const f32) {
        let mut acc = [[L::zero(); V]; R];
        for k in 0..g.inputs {
            let mut w = [L::zero(); V];
            for (v, wv) in w.iter_mut().enumerate() {
                *wv = L::load(g.panel.add((k * V + v) * L::N));
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let xb = L::splat(x.add(r * g.inputs + k));
                for (a, &wv) in acc_r.iter_mut().zip(&w) {
                    *a = L::fma(xb, wv, *a);
                }
            }
        }
        for v in 0..V {
            let lanes = g.columns.saturating_sub(v * L::N);
            let bias = L::load(g.bias.add(v * L::N));
            for (r, acc_r) in acc.iter().enumerate() {
                let mut s = L::add(acc_r[v], bias);
                if g.relu {
                    s = L::relu(s);
                }
                L::store(g.y.add(r * g.ld + v * L::N), s, lanes);
            }
        }
    }

    /// All `rows` rows of `x` through the group: tiles of `R` rows, then of 4, then one of 2
    /// and one of 1 as needed.
    #[inline(always)]
    unsafe fn rows<L: Lanes, const R: usize, const V: usize>(g: Group, x: *const f32, rows: usize) {
        let mut r = 0;
        let at = |g: &Group, r: usize| Group {
            y: g.y.add(r * g.ld),
            ..*g
        };
        while r + R <= rows {
            tile::<L, R, V>(&at(&g, r), x.add(r * g.inputs));
            r += R;
        }
        while r + 4 <= rows {
            tile::<L, 4, V>(&at(&g, r), x.add(r * g.inputs));
            r += 4;
        }
        if r + 2 <= rows {
            tile::<L, 2, V>(&at(&g, r), x.add(r * g.inputs));
            r += 2;
        }
        if r < rows {
            tile::<L, 1, V>(&at(&g, r), x.add(r * g.inputs));
        }
    }

    /// The groups `groups` of the product in one width, each over all rows.
    #[inline(always)]
    unsafe fn forward<L: Lanes>(
        p: &PackedLinear,
        group: usize,
        x: &[f32],
        n: usize,
        relu: bool,
        y: *mut f32,
        groups: Range<usize>,
    ) {
        let vectors = p.outputs.div_ceil(L::N);
        let mut first = groups.start * group;
        while first < vectors.min(groups.end * group) {
            let v = group.min(vectors - first);
            let col = first * L::N;
            let g = Group {
                inputs: p.inputs,
                panel: p.panels.as_ptr().add(first * L::N * p.inputs),
                bias: p.bias.as_ptr().add(col),
                y: y.add(col),
                ld: p.outputs,
                columns: p.outputs - col,
                relu,
            };
            let x = x.as_ptr();
            // Accumulators: R·V of the 32 (AVX-512) or 16 (AVX2) registers, leaving room
            // for the V weight vectors and a broadcast.
            match (L::N, v) {
                (16, 4) => rows::<L, 6, 4>(g, x, n),
                (16, 3) => rows::<L, 8, 3>(g, x, n),
                (_, 2) => rows::<L, 6, 2>(g, x, n),
                _ => rows::<L, 12, 1>(g, x, n),
            }
            first += v;
        }
    }

    /// # Safety
    /// AVX-512F, AVX2 and FMA must be present; `p` packed in 16 lanes, `x` `n × inputs`,
    /// `y` the start of `n × outputs` values, of which the groups' columns are written.
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn forward_wide(
        p: &PackedLinear,
        x: &[f32],
        n: usize,
        relu: bool,
        y: *mut f32,
        groups: Range<usize>,
    ) {
        forward::<Wide>(p, GROUP_WIDE, x, n, relu, y, groups)
    }

    /// # Safety
    /// AVX2 and FMA must be present; `p` packed in 8 lanes, `x` `n × inputs`, `y` the
    /// start of `n × outputs` values, of which the groups' columns are written.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn forward_narrow(
        p: &PackedLinear,
        x: &[f32],
        n: usize,
        relu: bool,
        y: *mut f32,
        groups: Range<usize>,
    ) {
        forward::<Narrow>(p, GROUP_NARROW, x, n, relu, y, groups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear_dot::tests::reference;

    #[test]
    fn packed_products_match_a_plain_sum_in_both_widths() {
        if !crate::conv_direct::available() {
            eprintln!("SKIPPED: no AVX2 and FMA on this machine, the packed kernel does not run");
            return;
        }
        let value = |k: usize| ((k * 7919 % 1009) as f32 - 504.0) / 512.0;
        // Every row remainder of the 6- and 12-row tiles, every group width and partial
        // last vector of both widths, products split across the pool.
        for &(n, i, o) in &[
            (1, 1, 1),
            (13, 3, 7),
            (11, 17, 16),
            (7, 9, 17),
            (25, 33, 40),
            (6, 8, 63),
            (50, 196, 145),
            (5, 31, 130),
            // Large enough to split its groups across the pool, one row and several.
            (1, 600, 500),
            (3, 300, 333),
        ] {
            let x: Vec<f32> = (0..n * i).map(value).collect();
            let w: Vec<f32> = (0..o * i).map(|k| value(k + 11)).collect();
            let b: Vec<f32> = (0..o).map(|k| value(k + 5)).collect();
            for wide in [false, true] {
                for (bias, relu) in [
                    (None, false),
                    (Some(b.as_slice()), false),
                    (Some(b.as_slice()), true),
                ] {
                    let p = PackedLinear::new_on(wide, &w, bias, i, o).expect("AVX2 is present");
                    let mut y = vec![f32::NAN; n * o];
                    p.forward(&x, n, relu, &mut y).expect("the shape fits");
                    let zeros = vec![0f32; o];
                    let want = reference(&x, &w, bias.unwrap_or(&zeros), relu, (n, i, o));
                    for (k, (&got, &want)) in y.iter().zip(&want).enumerate() {
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{n}x{i}x{o} wide={wide} relu={relu} at {k}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn mismatched_buffers_are_refused() {
        if !crate::conv_direct::available() {
            eprintln!("SKIPPED: no AVX2 and FMA on this machine, the packed kernel does not run");
            return;
        }
        assert!(PackedLinear::new(&[0.0; 5], None, 2, 3).is_none());
        assert!(PackedLinear::new(&[0.0; 6], Some(&[0.0; 2]), 2, 3).is_none());
        let p = PackedLinear::new(&[1.0; 6], None, 2, 3).unwrap();
        let mut y = vec![0f32; 6];
        assert!(p.forward(&[1.0; 3], 2, false, &mut y).is_none());
        assert!(p.forward(&[1.0; 4], 2, false, &mut y[..5]).is_none());
        assert!(p.forward(&[1.0; 4], 2, false, &mut y).is_some());
        assert_eq!(y, vec![2.0; 6]);
    }
}
