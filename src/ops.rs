//! CPU kernels with their own backward passes, for the layers where candle's generic CPU
//! ops are slow to train.
//!
//! candle 0.11 differentiates a convolution with a transposed convolution (slow on the CPU)
//! and always computes the gradient of the convolution's input, even for the input image,
//! which nothing needs; a linear layer's backward goes through transposed views and
//! `sum_keepdim` over broadcast axes; a per-channel multiply (a noise layer or a mask)
//! reduces over strided axes. The functions here compute the same values with
//! `im2col` + GEMM (the `gemm` crate candle itself uses), parallel over the batch, and skip
//! every gradient whose tensor does not require one.
//!
//! Each function falls back to candle's own ops wherever its kernel does not apply (other
//! devices, such as CUDA or Metal, other dtypes, grouped convolutions), so a GPU build
//! runs the same [`Net`](crate::Net) unchanged. Gradients are checked against candle's
//! own ops in `tests/ops.rs`. [`set_cpu_kernels`]`(false)` sends the CPU through those
//! fallbacks too: the code a GPU build runs, on a machine without one (training on both
//! paths is compared in `tests/candle_fallback.rs`), or to time what the kernels save.
//!
//! ```
//! use candle::{Device, Tensor};
//! use candle_sbp::ops;
//!
//! let x = Tensor::randn(0f32, 1., (2, 3, 8, 8), &Device::Cpu)?;
//! let w = Tensor::randn(0f32, 1., (4, 3, 3, 3), &Device::Cpu)?;
//! let y = ops::conv2d(&x, &w, None, 1, 1, 1, 1)?;
//! let reference = x.conv2d(&w, 1, 1, 1, 1)?;
//! let diff = (y - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(diff < 1e-4);
//! # Ok::<(), candle::Error>(())
//! ```

use crate::par::threads;
use candle::{
    backend::BackendStorage, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result,
    Shape, Tensor, WithDType,
};
use std::mem::MaybeUninit;

/// Whether this crate's CPU kernels are in use ([`set_cpu_kernels`]).
static CPU_KERNELS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns this crate's CPU kernels on or off for the whole process (on by default), and
/// returns the previous setting. Off, the functions of this module, [`Net`](crate::Net)'s
/// forward passes and [`Adam`](crate::train::Adam) take the paths they take on a GPU,
/// candle's own ops, on the CPU as well (and [`Net::inference_plan`](crate::Net::inference_plan)
/// compiles nothing): to check a result against candle, to time what the kernels save,
/// or to run the code of a GPU build on a machine without a GPU. The noise is drawn on
/// the host either way, so both paths draw the same values.
///
/// ```
/// use candle::{Device, Tensor};
/// use candle_sbp::ops;
///
/// let x = Tensor::randn(0f32, 1., (2, 3), &Device::Cpu)?;
/// let w = Tensor::randn(0f32, 1., (4, 3), &Device::Cpu)?;
/// let fused = ops::linear_relu(&x, &w, None)?;
/// let was = ops::set_cpu_kernels(false);
/// let plain = ops::linear_relu(&x, &w, None)?; // candle's matmul, then its relu
/// ops::set_cpu_kernels(was);
/// let diff = (fused - plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
/// assert!(diff < 1e-6);
/// # Ok::<(), candle::Error>(())
/// ```
pub fn set_cpu_kernels(enabled: bool) -> bool {
    CPU_KERNELS.swap(enabled, std::sync::atomic::Ordering::Relaxed)
}

/// Whether this crate's CPU kernels are in use (see [`set_cpu_kernels`]).
pub fn cpu_kernels() -> bool {
    CPU_KERNELS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether the CPU kernels apply to these tensors: kernels on, all on the CPU, all f32 or
/// all f64.
fn fast_path(ts: &[&Tensor]) -> bool {
    let dtype = ts[0].dtype();
    cpu_kernels()
        && matches!(dtype, DType::F32 | DType::F64)
        && ts.iter().all(|t| t.device().is_cpu() && t.dtype() == dtype)
}

/// Whether autograd will ask for this tensor's gradient.
fn needs_grad(t: &Tensor) -> bool {
    t.track_op()
}

/// The contiguous data of a CPU storage.
fn data<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let all = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&all[start..end]),
        None => candle::bail!("ops: a kernel input is not contiguous"),
    }
}

/// `s` as f32 values, where `T` is f32.
fn as_f32<T: WithDType>(s: &[T]) -> Option<&[f32]> {
    // SAFETY: T is f32 itself when its dtype is F32, so the cast changes nothing.
    (T::DTYPE == DType::F32)
        .then(|| unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), s.len()) })
}

/// [`as_f32`] for a mutable slice.
fn as_f32_mut<T: WithDType>(s: &mut [T]) -> Option<&mut [f32]> {
    // SAFETY: as in `as_f32`.
    (T::DTYPE == DType::F32)
        .then(|| unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), s.len()) })
}

/// Below this many multiply-adds a product runs on the calling thread.
pub(crate) const GEMM_PAR_MIN_MACS: usize = 1 << 18;

/// A raw pointer that may cross threads: each thread reaches disjoint elements through it.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub(crate) *mut T);

// SAFETY: only used to hand disjoint blocks of one buffer to the pool's threads.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so that closures capture the wrapper, not its field).
    pub(crate) fn at(self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }
}

/// `dst (m×n) [+]= lhs (m×k) · rhs (k×n)`, each matrix given by its slice and its row and
/// column strides. Checks that every index stays inside its slice. With `parallel`, a
/// large product is split into blocks of rows or columns of `dst` (whichever dimension is
/// larger) across candle's pool; the blocks' sums are the same as one product's, so the
/// result does not depend on the number of threads.
#[allow(clippy::too_many_arguments)]
fn matmul<T: WithDType>(
    dims: (usize, usize, usize),
    dst: &mut [T],
    accumulate: bool,
    lhs: (&[T], usize, usize),
    rhs: (&[T], usize, usize),
    parallel: bool,
) -> Result<()> {
    let len = dst.len();
    matmul_at(
        dims,
        (SendPtr(dst.as_mut_ptr()), len),
        accumulate,
        lhs,
        rhs,
        parallel,
    )
}

/// [`matmul`] without accumulating, into a buffer that may start uninitialised: every one of
/// its first `m·n` values is written. Spares the zeroing of a buffer the product overwrites
/// (a weight gradient of 392k values is 1.6 MB of `memset`).
fn matmul_uninit<T: WithDType>(
    dims: (usize, usize, usize),
    dst: &mut [MaybeUninit<T>],
    lhs: (&[T], usize, usize),
    rhs: (&[T], usize, usize),
    parallel: bool,
) -> Result<()> {
    // `MaybeUninit<T>` has `T`'s layout; without accumulating, the product writes `dst`
    // and never reads it.
    let len = dst.len();
    let dst = SendPtr(dst.as_mut_ptr().cast::<T>());
    matmul_at(dims, (dst, len), false, lhs, rhs, parallel)
}

/// [`matmul`] on a destination given by its pointer and length.
fn matmul_at<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    (out, dst_len): (SendPtr<T>, usize),
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (&[T], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[T], usize, usize),
    parallel: bool,
) -> Result<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| {
        (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs
    };
    if dst_len < m * n
        || (k > 0
            && (lhs.len() <= last(m, k, lhs_rs, lhs_cs) || rhs.len() <= last(k, n, rhs_rs, rhs_cs)))
    {
        candle::bail!("ops: internal matrix shapes do not fit their buffers");
    }
    if k == 0 {
        if !accumulate {
            for j in 0..m * n {
                // SAFETY: `j < m·n <= dst_len`, checked above.
                unsafe { out.at(j).write(T::zero()) };
            }
        }
        return Ok(());
    }
    let blocks = if parallel && m * n * k >= GEMM_PAR_MIN_MACS {
        threads().min(m.max(n))
    } else {
        1
    };
    let by_rows = m >= n;
    let len = if by_rows { m } else { n };
    let size = len.div_ceil(blocks);
    let ranges: Vec<_> = (0..len)
        .step_by(size)
        .map(|a| a..(a + size).min(len))
        .collect();
    let (lhs, rhs) = (
        SendPtr(lhs.as_ptr().cast_mut()),
        SendPtr(rhs.as_ptr().cast_mut()),
    );
    crate::par::map(ranges, |_, r| {
        let (bm, bn) = if by_rows { (r.len(), n) } else { (m, r.len()) };
        // Offsets of the block's first row (or column) in dst and in the operand it splits.
        let (dst_at, lhs_at, rhs_at) = if by_rows {
            (r.start * n, r.start * lhs_rs, 0)
        } else {
            (r.start, 0, r.start * rhs_cs)
        };
        // SAFETY: the extents were checked above, and the blocks split dst's rows (or
        // columns) without overlap, so each thread writes its own elements; `gemm` reads
        // `lhs` and `rhs` and writes `dst` only at `row * rs + col * cs` for rows and
        // columns inside the block, and `dst` does not alias the inputs (a distinct `&mut`).
        unsafe {
            gemm::gemm(
                bm,
                bn,
                k,
                out.at(dst_at),
                1,
                n as isize,
                accumulate,
                lhs.at(lhs_at),
                lhs_cs as isize,
                lhs_rs as isize,
                rhs.at(rhs_at),
                rhs_cs as isize,
                rhs_rs as isize,
                T::one(),
                T::one(),
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
    Ok(())
}

/// Splits `0..n` into at most `threads()` contiguous chunks.
fn chunks(n: usize) -> Vec<std::ops::Range<usize>> {
    let size = n.div_ceil(threads()).max(1);
    (0..n).step_by(size).map(|a| a..(a + size).min(n)).collect()
}

/// Splits the flat per-sample buffer `buf` (`per` values a sample) along `ranges`.
fn split_samples<'a, T>(
    mut buf: &'a mut [T],
    ranges: &[std::ops::Range<usize>],
    per: usize,
) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let (head, tail) = buf.split_at_mut(r.len() * per);
        out.push(head);
        buf = tail;
    }
    out
}

/// Dispatches a CPU kernel on the storage's dtype; gives the storage and its length.
macro_rules! cpu_dispatch {
    ($s:expr, $f:ident ( $($arg:expr),* )) => {
        match $s {
            CpuStorage::F32(_) => {
                let v = $f::<f32>($($arg),*)?;
                let len = v.len();
                (CpuStorage::F32(v), len)
            }
            CpuStorage::F64(_) => {
                let v = $f::<f64>($($arg),*)?;
                let len = v.len();
                (CpuStorage::F64(v), len)
            }
            other => candle::bail!("ops: no CPU kernel for {:?}", other.dtype()),
        }
    };
}

/// The `cpu_fwd` of a two-input op over `(a, b)` whose output has `a`'s shape (or the
/// shape that `|g, layout| …` gives from the geometry and `a`'s layout):
/// `$kernel(&self.0, a, b)`, with `self.0` a `$geometry`.
macro_rules! same_shape_cpu_fwd {
    ($geometry:ty, $kernel:ident) => {
        same_shape_cpu_fwd!($geometry, $kernel, |_g, l1| l1.shape().clone());
    };
    ($geometry:ty, $kernel:ident, |$g:ident, $l:ident| $shape:expr) => {
        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            fn run<T: WithDType>(
                g: &$geometry,
                (s1, l1): (&CpuStorage, &Layout),
                (s2, l2): (&CpuStorage, &Layout),
            ) -> Result<Vec<T>> {
                $kernel(g, data(s1, l1)?, data(s2, l2)?)
            }
            let (out, _) = cpu_dispatch!(s1, run(&self.0, (s1, l1), (s2, l2)));
            let ($g, $l) = (&self.0, l1);
            Ok((out, Shape::from($shape)))
        }
    };
}

/// A backward pass as a custom op over three tensors that writes every gradient into one
/// flat buffer (`$kernel(&op.g, op.want, a, b, c)`); the caller cuts the buffer apart.
macro_rules! flat_backward_op {
    ($op:ident, $name:literal, $kernel:ident) => {
        impl CustomOp3 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                s1: &CpuStorage,
                l1: &Layout,
                s2: &CpuStorage,
                l2: &Layout,
                s3: &CpuStorage,
                l3: &Layout,
            ) -> Result<(CpuStorage, Shape)> {
                fn run<T: WithDType>(
                    op: &$op,
                    (s1, l1): (&CpuStorage, &Layout),
                    (s2, l2): (&CpuStorage, &Layout),
                    (s3, l3): (&CpuStorage, &Layout),
                ) -> Result<Vec<T>> {
                    $kernel(&op.g, op.want, data(s1, l1)?, data(s2, l2)?, data(s3, l3)?)
                }
                let (out, len) = cpu_dispatch!(s1, run(self, (s1, l1), (s2, l2), (s3, l3)));
                Ok((out, Shape::from(len)))
            }
        }
    };
}

/// A layer over `(x, w, b)` as a custom op: the forward kernel `$forward(g, x, w, b)`, and a
/// backward pass through `$backward` (a [`flat_backward_op`]) whose buffer holds `dw`, then
/// `db` (with a bias), then `dx` (when `x` needs it).
macro_rules! weighted_op {
    ($op:ident, $name:literal, $forward:ident, $backward:ident, $g:ident => $shape:expr) => {
        impl CustomOp3 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                s1: &CpuStorage,
                l1: &Layout,
                s2: &CpuStorage,
                l2: &Layout,
                s3: &CpuStorage,
                l3: &Layout,
            ) -> Result<(CpuStorage, Shape)> {
                let $g = &self.0;
                let (out, _) = cpu_dispatch!(
                    s1,
                    weighted_forward(
                        $g.bias,
                        |x, w, b| $forward($g, x, w, b),
                        (s1, l1),
                        (s2, l2),
                        (s3, l3)
                    )
                );
                Ok((out, Shape::from($shape)))
            }

            fn bwd(
                &self,
                x: &Tensor,
                w: &Tensor,
                b: &Tensor,
                res: &Tensor,
                grad: &Tensor,
            ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
                let g = self.0;
                let want_dx = needs_grad(x);
                let grad = grad.contiguous()?;
                // Through the fused ReLU first: the gradient where the output is positive.
                let grad = if g.relu {
                    grad.apply_op2_no_bwd(res, &ReluMaskOp(()))?
                } else {
                    grad
                };
                let all = x.apply_op3_no_bwd(w, &grad, &$backward { g, want: want_dx })?;
                let pieces = [(true, w.shape()), (g.bias, b.shape()), (want_dx, x.shape())];
                let mut parts = split_flat(&all, &pieces)?.into_iter();
                let mut next = || parts.next().flatten();
                let (dw, db, dx) = (next(), next(), next());
                Ok((dx, dw, db))
            }
        }
    };
}

/// The forward pass of a layer over `(x, w, b)`: `kernel(x, w, Some(b) if bias)`.
fn weighted_forward<T: WithDType>(
    bias: bool,
    kernel: impl Fn(&[T], &[T], Option<&[T]>) -> Result<Vec<T>>,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> Result<Vec<T>> {
    let b = if bias { Some(data(s3, l3)?) } else { None };
    kernel(data(s1, l1)?, data(s2, l2)?, b)
}

/// Cuts a flat gradient buffer into consecutive pieces of the given shapes; pieces not
/// wanted take no room and come back as `None`.
fn split_flat(all: &Tensor, pieces: &[(bool, &Shape)]) -> Result<Vec<Option<Tensor>>> {
    let mut at = 0;
    let mut out = Vec::with_capacity(pieces.len());
    for &(wanted, shape) in pieces {
        if !wanted {
            out.push(None);
            continue;
        }
        let len = shape.elem_count();
        out.push(Some(all.narrow(0, at, len)?.reshape(shape)?));
        at += len;
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Convolution.

/// The sizes of one 2-d convolution (groups 1).
#[derive(Debug, Clone, Copy)]
struct ConvGeometry {
    batch: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    oh: usize,
    ow: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
    bias: bool,
    /// A ReLU applied to the output in the same pass.
    relu: bool,
}

impl ConvGeometry {
    /// Rows of the im2col matrix: input channels × kernel positions.
    fn k(&self) -> usize {
        self.c_in * self.kh * self.kw
    }
    /// Columns of the im2col matrix: output positions.
    fn p(&self) -> usize {
        self.oh * self.ow
    }
    fn in_len(&self) -> usize {
        self.c_in * self.h * self.w
    }

    /// The input coordinate read by output coordinate `o` at kernel offset `k`, if any.
    fn source(&self, o: usize, k: usize, size: usize) -> Option<usize> {
        let i = (o * self.stride + k * self.dilation).checked_sub(self.padding)?;
        (i < size).then_some(i)
    }

    /// The output columns `lo..hi` whose input column at kernel offset `kx` is inside the
    /// image, and the input column of `lo` (then every `stride`).
    fn valid_columns(&self, kx: usize) -> (usize, usize, usize) {
        let shift = kx * self.dilation;
        // ox·stride + shift − padding ≥ 0  and  < w
        let lo = self.padding.saturating_sub(shift).div_ceil(self.stride);
        let hi = if self.w + self.padding > shift {
            ((self.w + self.padding - shift - 1) / self.stride + 1).min(self.ow)
        } else {
            0
        };
        let hi = hi.max(lo);
        (
            lo,
            hi,
            (lo * self.stride + shift).saturating_sub(self.padding),
        )
    }

    /// Writes sample `x`'s im2col matrix (`k() × p()`) into columns `col0..col0 + p()` of
    /// the row-major `cols`, whose rows are `ld` long.
    fn im2col<T: WithDType>(&self, x: &[T], cols: &mut [T], ld: usize, col0: usize) {
        let ow = self.ow;
        if self.stride == 1 && self.padding == 0 && self.dilation == 1 {
            // The common case, without the per-row bounds arithmetic of the general one
            // (which cost more than the copies themselves on short rows).
            let (h, w, p) = (self.h, self.w, self.p());
            for (c, plane) in x.chunks_exact(h * w).take(self.c_in).enumerate() {
                for ky in 0..self.kh {
                    for kx in 0..self.kw {
                        let row = ((c * self.kh + ky) * self.kw + kx) * ld + col0;
                        let src = &plane[ky * w + kx..];
                        for (out, src) in cols[row..row + p].chunks_exact_mut(ow).zip(src.chunks(w))
                        {
                            copy_row(out, &src[..ow]);
                        }
                    }
                }
            }
            return;
        }
        for c in 0..self.c_in {
            let plane = &x[c * self.h * self.w..(c + 1) * self.h * self.w];
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = ((c * self.kh + ky) * self.kw + kx) * ld + col0;
                    let (lo, hi, ix0) = self.valid_columns(kx);
                    for oy in 0..self.oh {
                        let out = &mut cols[row + oy * ow..row + (oy + 1) * ow];
                        let Some(iy) = self.source(oy, ky, self.h) else {
                            out.fill(T::zero());
                            continue;
                        };
                        let src = &plane[iy * self.w..(iy + 1) * self.w];
                        if lo > 0 {
                            out[..lo].fill(T::zero());
                        }
                        if hi < ow {
                            out[hi..].fill(T::zero());
                        }
                        if self.stride == 1 {
                            copy_row(&mut out[lo..hi], &src[ix0..ix0 + hi - lo]);
                        } else {
                            let picked = src[ix0..].iter().step_by(self.stride);
                            out[lo..hi]
                                .iter_mut()
                                .zip(picked)
                                .for_each(|(o, &v)| *o = v);
                        }
                    }
                }
            }
        }
    }

    /// The im2col matrices of the samples `samples` of the batch `x`, side by side in
    /// `cols` (`k()` rows of `samples.len() · p()` columns).
    fn im2col_block<T: WithDType>(&self, x: &[T], samples: std::ops::Range<usize>, cols: &mut [T]) {
        let (p, len) = (self.p(), self.in_len());
        let ld = samples.len() * p;
        for (j, i) in samples.enumerate() {
            self.im2col(&x[i * len..(i + 1) * len], cols, ld, j * p);
        }
    }

    /// Adds the im2col-shaped gradient in columns `col0..col0 + p()` of `cols` (rows `ld`
    /// long) back onto the input gradient `dx`.
    fn col2im<T: WithDType>(&self, cols: &[T], ld: usize, col0: usize, dx: &mut [T]) {
        let ow = self.ow;
        for c in 0..self.c_in {
            let plane = &mut dx[c * self.h * self.w..(c + 1) * self.h * self.w];
            for ky in 0..self.kh {
                for kx in 0..self.kw {
                    let row = ((c * self.kh + ky) * self.kw + kx) * ld + col0;
                    let (lo, hi, ix0) = self.valid_columns(kx);
                    for oy in 0..self.oh {
                        let Some(iy) = self.source(oy, ky, self.h) else {
                            continue;
                        };
                        let src = &cols[row + oy * ow + lo..row + oy * ow + hi];
                        let dst = &mut plane[iy * self.w..(iy + 1) * self.w];
                        if self.stride == 1 {
                            let dst = &mut dst[ix0..ix0 + hi - lo];
                            dst.iter_mut().zip(src).for_each(|(d, &g)| *d += g);
                        } else {
                            let dst = dst[ix0..].iter_mut().step_by(self.stride);
                            dst.zip(src).for_each(|(d, &g)| *d += g);
                        }
                    }
                }
            }
        }
    }

    /// The same convolution for [`crate::conv_direct`] (stride 1 and no dilation assumed),
    /// then 2×2 max-pooling where `pool`.
    fn direct(&self, pool: bool) -> crate::conv_direct::DirectConv {
        crate::conv_direct::DirectConv {
            c_in: self.c_in,
            h: self.h,
            w: self.w,
            c_out: self.c_out,
            kh: self.kh,
            kw: self.kw,
            padding: self.padding,
            relu: self.relu,
            pool,
        }
    }

    /// Samples per GEMM: enough columns for an efficient product, few enough that the
    /// im2col buffer (`k() × b·p()`) stays near 1 MiB of f32.
    fn samples_per_gemm(&self) -> usize {
        (256 * 1024 / (self.k() * self.p()).max(1)).clamp(1, 64)
    }
}

/// `dst ← src` for one row of an im2col matrix. Rows of deep layers are short (8 values
/// for LeNet5's second convolution), where a call to `memcpy` per row cost more than the
/// copy: an inline loop for those.
#[inline(always)]
fn copy_row<T: WithDType>(dst: &mut [T], src: &[T]) {
    if dst.len() < 32 {
        let (d8, d_tail) = dst.as_chunks_mut::<8>();
        let (s8, s_tail) = src[..d8.len() * 8 + d_tail.len()].as_chunks::<8>();
        d8.iter_mut().zip(s8).for_each(|(d, s)| *d = *s);
        d_tail.iter_mut().zip(s_tail).for_each(|(d, &v)| *d = v);
    } else {
        dst.copy_from_slice(src);
    }
}

/// The output rows of one sample block: `out[j][o][q] = tmp[o][j·p + q] (+ bias[o])`, then
/// a ReLU if `relu`.
fn scatter_block<T: WithDType>(
    tmp: &[T],
    out: &mut [T],
    (o, p, b): (usize, usize, usize),
    bias: Option<&[T]>,
    relu: bool,
) {
    for j in 0..b {
        for oc in 0..o {
            let src = &tmp[oc * b * p + j * p..oc * b * p + (j + 1) * p];
            let dst = &mut out[(j * o + oc) * p..(j * o + oc + 1) * p];
            let b = bias.map_or(T::zero(), |b| b[oc]);
            dst.iter_mut()
                .zip(src)
                .for_each(|(d, &v)| *d = relu_if(relu, v + b));
        }
    }
}

/// The transpose of [`scatter_block`]: `tmp[o][j·p + q] = grad[j][o][q]`.
fn gather_block<T: WithDType>(grad: &[T], tmp: &mut [T], (o, p, b): (usize, usize, usize)) {
    for j in 0..b {
        for oc in 0..o {
            tmp[oc * b * p + j * p..oc * b * p + (j + 1) * p]
                .copy_from_slice(&grad[(j * o + oc) * p..(j * o + oc + 1) * p]);
        }
    }
}

fn conv_forward<T: WithDType>(
    g: &ConvGeometry,
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
) -> Result<Vec<T>> {
    let (k, p, o) = (g.k(), g.p(), g.c_out);
    let n = g.batch * o * p;
    let mut out = Vec::with_capacity(n);
    if direct_forward(g, x, w, b, &mut out.spare_capacity_mut()[..n]).is_some() {
        // SAFETY: the direct kernel wrote all `n` values.
        unsafe { out.set_len(n) };
        return Ok(out);
    }
    out.resize(n, T::zero());
    let ranges = chunks(g.batch);
    let outer = ranges.len() > 1;
    // Whole images (64 columns or more) go straight into the output; smaller ones are
    // multiplied several at a time, then moved into place.
    let per = if p >= 64 { 1 } else { g.samples_per_gemm() };
    let parts = split_samples(&mut out, &ranges, o * p);
    let work: Vec<_> = ranges.iter().cloned().zip(parts).collect();
    crate::par::map(work, |_, (range, out_part)| -> Result<()> {
        let mut cols = vec![T::zero(); k * per * p];
        let mut tmp = vec![T::zero(); if per > 1 { o * per * p } else { 0 }];
        for start in range.clone().step_by(per) {
            let nb = per.min(range.end - start);
            let ld = nb * p;
            g.im2col_block(x, start..start + nb, &mut cols);
            let at = (start - range.start) * o * p;
            let y = &mut out_part[at..at + nb * o * p];
            let lhs = (w, k, 1);
            if nb == 1 {
                if let Some(b) = b {
                    for (row, &bv) in y.chunks_mut(p).zip(b) {
                        row.fill(bv);
                    }
                }
                matmul((o, p, k), y, b.is_some(), lhs, (&cols, p, 1), !outer)?;
                if g.relu {
                    y.iter_mut().for_each(|v| *v = relu_if(true, *v));
                }
            } else {
                matmul((o, ld, k), &mut tmp, false, lhs, (&cols, ld, 1), !outer)?;
                scatter_block(&tmp, y, (o, p, nb), b, g.relu);
            }
        }
        Ok(())
    })
    .into_iter()
    .collect::<Result<()>>()?;
    Ok(out)
}

/// The convolution by [`crate::conv_direct`] where it runs and is the faster way (f32,
/// stride 1, no dilation, few channels: see [`prefers_direct`]); `None` otherwise.
fn direct_forward<T: WithDType>(
    g: &ConvGeometry,
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    out: &mut [MaybeUninit<T>],
) -> Option<()> {
    if !prefers_direct(g) {
        return None;
    }
    let (x, w) = (as_f32(x)?, as_f32(w)?);
    let b = b.map(|b| as_f32(b).expect("b has x's type"));
    // SAFETY: T is f32 (`as_f32` returned the data), and `MaybeUninit<f32>` has f32's
    // layout.
    let out: &mut [MaybeUninit<f32>] =
        unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast(), out.len()) };
    crate::conv_direct::forward(&g.direct(false), g.batch, x, w, b, out)
}

/// Whether the direct kernel runs this convolution (stride 1, no dilation) and beats
/// im2col + GEMM on it ([`crate::conv_direct::pays`]).
fn prefers_direct(g: &ConvGeometry) -> bool {
    g.stride == 1 && g.dilation == 1 && crate::conv_direct::pays(&g.direct(false))
}

/// `[dw (c_out·k), db (c_out, with a bias), dx (input size, if wanted)]` in one buffer.
fn conv_backward<T: WithDType>(
    g: &ConvGeometry,
    want_dx: bool,
    x: &[T],
    w: &[T],
    grad: &[T],
) -> Result<Vec<T>> {
    let (k, p, o) = (g.k(), g.p(), g.c_out);
    let ranges = chunks(g.batch);
    let outer = ranges.len() > 1;
    let per = g.samples_per_gemm();
    let mut dx = if want_dx {
        vec![T::zero(); g.batch * g.in_len()]
    } else {
        Vec::new()
    };
    let dx_parts: Vec<Option<&mut [T]>> = if want_dx {
        split_samples(&mut dx, &ranges, g.in_len())
            .into_iter()
            .map(Some)
            .collect()
    } else {
        ranges.iter().map(|_| None).collect()
    };
    let work: Vec<_> = ranges.iter().cloned().zip(dx_parts).collect();
    let partials: Vec<Result<(Vec<T>, Vec<T>)>> =
        crate::par::map(work, |_, (range, mut dx_part)| {
            let mut dw = vec![T::zero(); o * k];
            let mut db = vec![T::zero(); o];
            let mut cols = vec![T::zero(); k * per * p];
            let mut gt = vec![T::zero(); o * per * p];
            let par = !outer;
            for start in range.clone().step_by(per) {
                let nb = per.min(range.end - start);
                let ld = nb * p;
                g.im2col_block(x, start..start + nb, &mut cols);
                gather_block(
                    &grad[start * o * p..(start + nb) * o * p],
                    &mut gt,
                    (o, p, nb),
                );
                // dw += Gᵀ-block (o × nb·p) · colsᵀ (nb·p × k)
                matmul((o, k, ld), &mut dw, true, (&gt, ld, 1), (&cols, 1, ld), par)?;
                if g.bias {
                    crate::simd::wide! {
                        for (d, row) in db.iter_mut().zip(gt.chunks(ld)) {
                            *d += sum_lanes(row, row, |v, _| v);
                        }
                    }
                }
                if let Some(dx_part) = dx_part.as_deref_mut() {
                    // dcols (k × nb·p) = wᵀ (k×o) · G-block (o × nb·p), into the cols buffer.
                    matmul((k, ld, o), &mut cols, false, (w, 1, k), (&gt, ld, 1), par)?;
                    for j in 0..nb {
                        let at = (start - range.start + j) * g.in_len();
                        g.col2im(&cols, ld, j * p, &mut dx_part[at..at + g.in_len()]);
                    }
                }
            }
            Ok((dw, db))
        });
    let mut dw = vec![T::zero(); o * k];
    let mut db = vec![T::zero(); if g.bias { o } else { 0 }];
    for part in partials {
        let (pw, pb) = part?;
        dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
    }
    dw.extend(db);
    dw.extend(dx);
    Ok(dw)
}

/// `grad` where the (ReLU'd) output `res` is positive, 0 elsewhere: the gradient through a
/// ReLU fused into the op before it.
#[derive(Debug, Clone, Copy)]
struct ReluMaskOp(());

fn relu_mask<T: WithDType>(_: &(), grad: &[T], res: &[T]) -> Result<Vec<T>> {
    if grad.len() != res.len() {
        candle::bail!("ops: a ReLU's gradient and output differ in size");
    }
    let mut out = grad.to_vec();
    for_each_row(&mut out, DS_BLOCK_VALUES, |n, chunk| {
        let res = &res[n * DS_BLOCK_VALUES..];
        // A select, not a branch: which outputs are positive is a coin toss, and the
        // branch's mispredictions cost LeNet5 5% of its step.
        crate::simd::wide! {
            for (g, &r) in chunk.iter_mut().zip(res) {
                *g = if live(true, r) { *g } else { T::zero() };
            }
        }
    });
    Ok(out)
}

impl CustomOp2 for ReluMaskOp {
    fn name(&self) -> &'static str {
        "sbp-relu-mask"
    }

    same_shape_cpu_fwd!((), relu_mask);
}

/// The convolution as a custom op over `(x, w, b)` (`b` a dummy when there is no bias).
#[derive(Debug, Clone, Copy)]
struct Conv2dOp(ConvGeometry);

weighted_op!(Conv2dOp, "sbp-conv2d", conv_forward, Conv2dBackwardOp, g => (g.batch, g.c_out, g.oh, g.ow));

/// The convolution's backward pass over `(x, w, grad)`, into one flat buffer.
#[derive(Debug, Clone, Copy)]
struct Conv2dBackwardOp {
    g: ConvGeometry,
    want: bool,
}

flat_backward_op!(Conv2dBackwardOp, "sbp-conv2d-backward", conv_backward);

/// A 2-d convolution of `x` `(N, C, H, W)` with `w` `(O, C/groups, KH, KW)` plus an optional
/// bias `(O,)`, as candle's `conv2d` computes it. On the CPU (f32/f64, groups 1) it runs
/// as a direct kernel (f32, stride 1, few output channels, x86-64 with AVX2 and FMA) or as
/// im2col + GEMM, with its own backward pass, which skips the input's gradient when `x`
/// needs none (the first layer's image); elsewhere it is candle's `conv2d`.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> Result<Tensor> {
    conv2d_impl(x, w, b, (padding, stride, dilation, groups), false)
}

/// `relu(conv2d(…))`: the same convolution as [`conv2d`] with a ReLU applied in the same
/// pass on the CPU (and its gradient taken inside the convolution's backward), which saves
/// the ReLU's own passes over the output; elsewhere candle's `conv2d` then `relu`.
pub fn conv2d_relu(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    padding: usize,
    stride: usize,
    dilation: usize,
    groups: usize,
) -> Result<Tensor> {
    conv2d_impl(x, w, b, (padding, stride, dilation, groups), true)
}

/// [`conv2d`], or [`conv2d_relu`] where `relu`; `params` is `(padding, stride, dilation,
/// groups)`.
pub(crate) fn conv2d_impl(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    params: (usize, usize, usize, usize),
    relu: bool,
) -> Result<Tensor> {
    if let Some(g) = conv_geometry(x, w, b, params, relu)? {
        return apply_weighted(x, w, b, Conv2dOp(g));
    }
    let (padding, stride, dilation, groups) = params;
    let y = x.conv2d(w, padding, stride, dilation.max(1), groups)?;
    let y = match b {
        Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?)?,
        None => y,
    };
    if relu {
        y.relu()
    } else {
        Ok(y)
    }
}

/// The `kernel × kernel` windows of `x` `(N, C, H, W)` every `kernel`, as axes 3 and 5 of
/// a reshape `(N, C, H/kernel, kernel, W/kernel, kernel)` of `x` cropped to whole windows.
fn windows(x: &Tensor, kernel: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let (oh, ow) = (h / kernel, w / kernel);
    x.narrow(2, 0, oh * kernel)?
        .narrow(3, 0, ow * kernel)?
        .contiguous()?
        .reshape((n, c, oh, kernel, ow, kernel))
}

/// Average pooling of `x` `(N, C, H, W)` over `kernel × kernel` windows every `stride`
/// (no padding), as candle's `avg_pool2d_with_stride` computes it. Where `x` needs a
/// gradient, the windows do not overlap and do not tile `x` exactly, it is a mean over
/// each window of a reshape: candle 0.11 spreads the gradient back by a nearest-neighbour
/// upsampling to the input's size, which for a 5×5 input and 2×2 windows gives the
/// cropped last row and column a gradient and routes the third row's to the first window.
pub fn avg_pool2d(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    let uneven = x.rank() == 4
        && kernel > 0
        && kernel == stride
        && x.dim(2)? >= kernel
        && x.dim(3)? >= kernel
        && (x.dim(2)? % kernel != 0 || x.dim(3)? % kernel != 0);
    if uneven && needs_grad(x) {
        return windows(x, kernel)?.mean(5)?.mean(3);
    }
    x.avg_pool2d_with_stride((kernel, kernel), (stride, stride))
}

/// `max_pool2d(conv2d(…), kernel, pool_stride)` (with a ReLU between where `relu`): in one
/// op where the direct kernel applies (f32 on an x86-64 CPU with AVX2 and FMA, stride 1,
/// 2×2 pooling with stride 2, few channels), which never writes the convolution's output;
/// elsewhere [`conv2d`] (or [`conv2d_relu`]) then [`max_pool2d`]. The values are the same
/// either way; the gradient of the fused op recomputes the convolution.
pub fn conv2d_max_pool2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    params: (usize, usize, usize, usize),
    relu: bool,
    (kernel, pool_stride): (usize, usize),
) -> Result<Tensor> {
    let fusable = kernel == 2
        && pool_stride == 2
        && x.dtype() == DType::F32
        && crate::conv_direct::available();
    if fusable {
        if let Some(g) = conv_geometry(x, w, b, params, relu)? {
            if g.oh >= 2 && prefers_direct(&g) {
                return apply_weighted(x, w, b, ConvPoolOp(g));
            }
        }
    }
    max_pool2d(&conv2d_impl(x, w, b, params, relu)?, kernel, pool_stride)
}

/// The geometry of a convolution our CPU kernels run (`None` where candle's own op must:
/// other devices and dtypes, groups), or an error naming shapes that do not fit.
fn conv_geometry(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    (padding, stride, dilation, groups): (usize, usize, usize, usize),
    relu: bool,
) -> Result<Option<ConvGeometry>> {
    let mut args = vec![x, w];
    args.extend(b);
    if stride == 0 {
        candle::bail!("conv2d: the stride must be positive");
    }
    if groups != 1 || x.rank() != 4 || w.rank() != 4 || !fast_path(&args) {
        return Ok(None);
    }
    let (batch, c_in, h, wd) = x.dims4()?;
    let (c_out, c_w, kh, kw) = w.dims4()?;
    let shape = (c_w == c_in)
        .then(|| {
            let params = (padding, stride, dilation.max(1));
            let flags = (b.is_some(), relu);
            ConvGeometry::new(batch, (c_in, h, wd), (c_out, kh, kw), params, flags)
        })
        .flatten();
    let Some(g) = shape else {
        candle::bail!(
            "conv2d: input {:?} and kernel {:?} (padding {padding}, dilation {dilation}) do not fit",
            x.dims(),
            w.dims()
        );
    };
    if let Some(b) = b {
        if b.dims() != [c_out] {
            candle::bail!(
                "conv2d: bias of shape {:?} for {c_out} output channels",
                b.dims()
            );
        }
    }
    Ok(Some(g))
}

impl ConvGeometry {
    /// The geometry of a convolution (groups 1) of a batch of `batch` inputs `(c_in, h,
    /// w)` with kernels `(c_out, kh, kw)` at `(padding, stride, dilation)`, with a bias
    /// and a ReLU where asked; `None` where the kernel does not fit the padded input or a
    /// step is 0.
    fn new(
        batch: usize,
        (c_in, h, w): (usize, usize, usize),
        (c_out, kh, kw): (usize, usize, usize),
        (padding, stride, dilation): (usize, usize, usize),
        (bias, relu): (bool, bool),
    ) -> Option<Self> {
        let span = |k: usize| dilation * (k - 1) + 1;
        let fits = stride > 0
            && dilation > 0
            && kh > 0
            && kw > 0
            && h + 2 * padding >= span(kh)
            && w + 2 * padding >= span(kw);
        fits.then(|| ConvGeometry {
            batch,
            c_in,
            h,
            w,
            c_out,
            kh,
            kw,
            oh: (h + 2 * padding - span(kh)) / stride + 1,
            ow: (w + 2 * padding - span(kw)) / stride + 1,
            stride,
            padding,
            dilation,
            bias,
            relu,
        })
    }
}

/// The convolution of the host batch `x` (`batch × c_in × h × w`, f32) with `weight`
/// (`c_out × c_in × kh × kw`) plus `bias`, through a ReLU where `relu`: what [`conv2d`]
/// computes on the CPU (the direct kernel or im2col + GEMM), for an inference plan's
/// buffers. `params` is `(padding, stride, dilation)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv2d_host(
    x: &[f32],
    batch: usize,
    (c_in, h, w): (usize, usize, usize),
    weight: &[f32],
    (c_out, kh, kw): (usize, usize, usize),
    bias: Option<&[f32]>,
    (padding, stride, dilation): (usize, usize, usize),
    relu: bool,
) -> Result<Vec<f32>> {
    let (shape, flags) = ((padding, stride, dilation), (bias.is_some(), relu));
    let g = ConvGeometry::new(batch, (c_in, h, w), (c_out, kh, kw), shape, flags);
    let fits = x.len() == batch * c_in * h * w
        && weight.len() == c_out * c_in * kh * kw
        && bias.is_none_or(|b| b.len() == c_out);
    let Some(g) = g.filter(|_| fits) else {
        candle::bail!("conv2d: host buffers that do not fit the convolution");
    };
    conv_forward(&g, x, weight, bias)
}

/// [`conv2d_max_pool2d`]'s fused op over `(x, w, b)` (`b` a dummy without a bias).
#[derive(Debug, Clone, Copy)]
struct ConvPoolOp(ConvGeometry);

impl ConvPoolOp {
    fn pool(&self) -> PoolGeometry {
        let g = &self.0;
        PoolGeometry {
            planes: g.batch * g.c_out,
            h: g.oh,
            w: g.ow,
            kernel: 2,
            stride: 2,
            oh: g.oh / 2,
            ow: g.ow / 2,
        }
    }
}

impl CustomOp3 for ConvPoolOp {
    fn name(&self) -> &'static str {
        "sbp-conv2d-max-pool2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.0;
        let b = if g.bias { Some(data(s3, l3)?) } else { None };
        let shape = g.direct(true);
        let n = g.batch * shape.out_len();
        let mut out = Vec::with_capacity(n);
        let spare = &mut out.spare_capacity_mut()[..n];
        if crate::conv_direct::forward(&shape, g.batch, data(s1, l1)?, data(s2, l2)?, b, spare)
            .is_none()
        {
            candle::bail!("conv2d-max-pool2d: the direct kernel does not run here");
        }
        // SAFETY: the direct kernel wrote all `n` values.
        unsafe { out.set_len(n) };
        let (ph, pw) = shape.out_size();
        Ok((
            CpuStorage::F32(out),
            Shape::from((g.batch, g.c_out, ph, pw)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The convolution's output was never kept: recompute it, route the gradient back
        // through the pooling, then through the convolution's own backward pass.
        let conv = Conv2dOp(self.0);
        let y = x.apply_op3_no_bwd(w, b, &conv)?;
        let dy = y.apply_op2_no_bwd(&grad.contiguous()?, &MaxPoolBackwardOp(self.pool()))?;
        conv.bwd(x, w, b, &y, &dy)
    }
}

/// Applies a layer op over `(x, w, b)`; without a bias the third tensor is an unread dummy.
fn apply_weighted<C: CustomOp3 + Send + Sync + 'static>(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    op: C,
) -> Result<Tensor> {
    let b = match b {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(1, x.dtype(), x.device())?,
    };
    x.contiguous()?.apply_op3(&w.contiguous()?, &b, op)
}

// ---------------------------------------------------------------------------------------
// Linear.

#[derive(Debug, Clone, Copy)]
struct LinearGeometry {
    batch: usize,
    inputs: usize,
    outputs: usize,
    bias: bool,
    /// A ReLU applied to the output in the same pass.
    relu: bool,
}

/// The linear layer `y = x·wᵀ + b` as a custom op over `(x, w, b)`.
#[derive(Debug, Clone, Copy)]
struct LinearOp(LinearGeometry);

fn linear_forward<T: WithDType>(
    g: &LinearGeometry,
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
) -> Result<Vec<T>> {
    let (n, i, o) = (g.batch, g.inputs, g.outputs);
    if let (Some(x), Some(w)) = (as_f32(x), as_f32(w)) {
        if crate::linear_dot::prefers(i, o) && n > 0 {
            let mut y = vec![T::zero(); n * o];
            let b = b.map(|b| as_f32(b).expect("b has x's type"));
            // Blocks of whole rows, one a thread where the product pays for the handoff.
            let blocks = if n * o * i >= GEMM_PAR_MIN_MACS {
                threads()
            } else {
                1
            };
            let rows = n.div_ceil(blocks).max(1);
            let done = std::sync::atomic::AtomicBool::new(true);
            crate::par::chunks_mut(&mut y, rows * o, |k, block| {
                let start = k * rows;
                let range = start..(start + block.len() / o.max(1));
                let out = as_f32_mut(block).expect("T is f32");
                if !crate::linear_dot::forward(x, w, b, g.relu, (n, i, o), range, out) {
                    done.store(false, std::sync::atomic::Ordering::Relaxed);
                }
            });
            if done.into_inner() {
                return Ok(y);
            }
        }
    }
    // y (n×o) = x (n×i) · wᵀ (i×o)
    let mut y = Vec::with_capacity(n * o);
    matmul_uninit(
        (n, o, i),
        &mut y.spare_capacity_mut()[..n * o],
        (x, i, 1),
        (w, 1, i),
        true,
    )?;
    // SAFETY: the product wrote all `n·o` values.
    unsafe { y.set_len(n * o) };
    // The bias and the ReLU in one pass over the output.
    if b.is_some() || g.relu {
        for_each_row(&mut y, o, |_, row| {
            crate::simd::wide! {
                let relu = g.relu; // read once (see accumulate_ds)
                match b {
                    Some(b) => {
                        let with_bias = row.iter_mut().zip(b);
                        with_bias.for_each(|(v, &bias)| *v = relu_if(relu, *v + bias))
                    }
                    None => row.iter_mut().for_each(|v| *v = relu_if(true, *v)),
                }
            }
        });
    }
    Ok(y)
}

/// `[dw (o·i), db (o, with a bias), dx (n·i, if wanted)]` in one buffer.
fn linear_backward<T: WithDType>(
    g: &LinearGeometry,
    want_dx: bool,
    x: &[T],
    w: &[T],
    grad: &[T],
) -> Result<Vec<T>> {
    let (n, i, o) = (g.batch, g.inputs, g.outputs);
    let db_len = if g.bias { o } else { 0 };
    let dx_len = if want_dx { n * i } else { 0 };
    let total = o * i + db_len + dx_len;
    let mut out = Vec::with_capacity(total);
    let (dw, rest) = out.spare_capacity_mut()[..total].split_at_mut(o * i);
    let (db, dx) = rest.split_at_mut(db_len);
    // dw (o×i) = gradᵀ (o×n) · x (n×i)
    matmul_uninit((o, i, n), dw, (grad, 1, o), (x, i, 1), true)?;
    if g.bias {
        let mut sums = vec![T::zero(); o];
        sum_rows_into(&mut sums, grad);
        db.iter_mut().zip(sums).for_each(|(d, v)| _ = d.write(v));
    }
    if want_dx {
        // dx (n×i) = grad (n×o) · w (o×i)
        matmul_uninit((n, i, o), dx, (grad, o, 1), (w, i, 1), true)?;
    }
    // SAFETY: the products wrote dw and dx, and db was written above.
    unsafe { out.set_len(total) };
    Ok(out)
}

weighted_op!(LinearOp, "sbp-linear", linear_forward, LinearBackwardOp, g => (g.batch, g.outputs));

#[derive(Debug, Clone, Copy)]
struct LinearBackwardOp {
    g: LinearGeometry,
    want: bool,
}

flat_backward_op!(LinearBackwardOp, "sbp-linear-backward", linear_backward);

/// `x·wᵀ + b` for `x` `(N, I)`, `w` `(O, I)` and an optional `b` `(O,)`, as
/// `candle_nn::Linear` computes it. On the CPU (f32/f64) it runs as one GEMM with its own
/// backward pass, which skips `x`'s gradient when nothing needs it; elsewhere (and for
/// inputs of another rank) it is candle's matmul.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    linear_impl(x, w, b, false)
}

/// `relu(linear(…))`: [`linear`] with a ReLU applied in the same op on the CPU (and its
/// gradient taken inside the layer's backward); elsewhere candle's matmul then `relu`.
pub fn linear_relu(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    linear_impl(x, w, b, true)
}

/// [`linear`], or [`linear_relu`] where `relu`.
pub(crate) fn linear_impl(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    let mut args = vec![x, w];
    args.extend(b);
    let shapes_fit = x.rank() == 2
        && w.rank() == 2
        && x.dim(1)? == w.dim(1)?
        && b.is_none_or(|b| b.dims() == [w.dim(0).unwrap_or(0)]);
    if !shapes_fit || !fast_path(&args) {
        let y = x.broadcast_matmul(&w.t()?)?;
        let y = match b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        return if relu { y.relu() } else { Ok(y) };
    }
    let g = LinearGeometry {
        batch: x.dim(0)?,
        inputs: x.dim(1)?,
        outputs: w.dim(0)?,
        bias: b.is_some(),
        relu,
    };
    apply_weighted(x, w, b, LinearOp(g))
}

// ---------------------------------------------------------------------------------------
// Adding a bias.

/// `y + b` for `y` `(N, O)` and `b` `(O,)` as a custom op: one pass forward; backward,
/// `y`'s gradient passed on as it is and `b`'s summed over the rows, where candle's
/// `broadcast_add` reduces over a strided axis one element at a time.
#[derive(Debug, Clone, Copy)]
struct BiasGeometry {
    cols: usize,
}

#[derive(Debug, Clone, Copy)]
struct BiasAddOp(BiasGeometry);

/// Adds `b` to each row of the row-major `y` (rows of `b.len()` values).
fn add_to_rows<T: WithDType>(y: &mut [T], b: &[T]) {
    crate::simd::wide! {
        for row in y.chunks_mut(b.len().max(1)) {
            row.iter_mut().zip(b).for_each(|(v, &bias)| *v += bias);
        }
    }
}

/// Adds the column sums of the row-major `m` (rows of `sums.len()` values) to `sums`.
fn sum_rows_into<T: WithDType>(sums: &mut [T], m: &[T]) {
    crate::simd::wide! {
        for row in m.chunks(sums.len().max(1)) {
            sums.iter_mut().zip(row).for_each(|(d, &v)| *d += v);
        }
    }
}

fn bias_add_forward<T: WithDType>(_g: &BiasGeometry, y: &[T], b: &[T]) -> Result<Vec<T>> {
    let mut out = y.to_vec();
    add_to_rows(&mut out, b);
    Ok(out)
}

/// Column sums of a contiguous `(rows, cols)` gradient.
fn column_sums<T: WithDType>(g: &BiasGeometry, grad: &[T], _b: &[T]) -> Result<Vec<T>> {
    let mut db = vec![T::zero(); g.cols];
    sum_rows_into(&mut db, grad);
    Ok(db)
}

/// The column sums of `grad` as a custom op over `(grad, b)` (b only names the dtype).
#[derive(Debug, Clone, Copy)]
struct ColumnSumOp(BiasGeometry);

impl CustomOp2 for ColumnSumOp {
    fn name(&self) -> &'static str {
        "sbp-column-sum"
    }

    same_shape_cpu_fwd!(BiasGeometry, column_sums, |g, _l| g.cols);
}

impl CustomOp2 for BiasAddOp {
    fn name(&self) -> &'static str {
        "sbp-bias-add"
    }

    same_shape_cpu_fwd!(BiasGeometry, bias_add_forward);

    fn bwd(
        &self,
        _y: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = if needs_grad(b) {
            Some(
                grad.contiguous()?
                    .apply_op2_no_bwd(b, &ColumnSumOp(self.0))?,
            )
        } else {
            None
        };
        Ok((Some(grad.clone()), db))
    }
}

/// `y + b` for `y` `(N, O)` and `b` `(O,)`: one op on the CPU (f32/f64), candle's
/// `broadcast_add` elsewhere.
pub fn add_bias(y: &Tensor, b: &Tensor) -> Result<Tensor> {
    let fits = y.rank() == 2 && b.dims() == [y.dim(1)?];
    if !fits || !fast_path(&[y, b]) {
        return y.broadcast_add(b);
    }
    let op = BiasAddOp(BiasGeometry { cols: y.dim(1)? });
    y.contiguous()?.apply_op2(&b.contiguous()?, op)
}

// ---------------------------------------------------------------------------------------
// Max-pooling.

#[derive(Debug, Clone, Copy)]
struct PoolGeometry {
    planes: usize,
    h: usize,
    w: usize,
    kernel: usize,
    stride: usize,
    oh: usize,
    ow: usize,
}

impl PoolGeometry {
    /// The flat index (inside its plane) of the first maximum of window `(oy, ox)`. Always
    /// inlined: as a call per window it cost the LeNet5 step 2.5%.
    #[inline(always)]
    fn argmax<T: WithDType>(&self, plane: &[T], oy: usize, ox: usize) -> usize {
        if self.kernel == 2 && self.stride == 2 {
            self.argmax_2x2(plane, oy, ox)
        } else {
            self.argmax_scan(plane, oy, ox)
        }
    }

    /// [`argmax`](Self::argmax) of any window, scanning it in row-major order.
    fn argmax_scan<T: WithDType>(&self, plane: &[T], oy: usize, ox: usize) -> usize {
        let (k, s) = (self.kernel, self.stride);
        let mut best = oy * s * self.w + ox * s;
        let mut best_v = plane[best];
        for ky in 0..k {
            let start = (oy * s + ky) * self.w + ox * s;
            for (j, &v) in plane[start..start + k].iter().enumerate() {
                if wins(v, best_v) {
                    (best, best_v) = (start + j, v);
                }
            }
        }
        best
    }

    /// [`argmax_scan`](Self::argmax_scan) of a 2×2 window with stride 2, by selects
    /// instead of branches: on real activations which of the four wins is a coin toss, and
    /// the branches' mispredictions made LeNet5's pooling gradients 15% of its training
    /// step.
    #[inline(always)]
    fn argmax_2x2<T: WithDType>(&self, plane: &[T], oy: usize, ox: usize) -> usize {
        let top = 2 * oy * self.w + 2 * ox;
        let at = [top, top + 1, top + self.w, top + self.w + 1];
        let (mut best, mut best_v) = (at[0], plane[at[0]]);
        for &i in &at[1..] {
            let v = plane[i];
            let win = wins(v, best_v);
            best = if win { i } else { best };
            best_v = if win { v } else { best_v };
        }
        best
    }

    /// Pools one plane into `out` (`oh × ow`). Windows that tile the plane (kernel =
    /// stride, LeNet's 2×2) take a running maximum over whole rows, with no index
    /// bookkeeping: the values an argmax would pick.
    fn pool_plane<T: WithDType>(&self, plane: &[T], out: &mut [T]) {
        let (k, s, w, ow) = (self.kernel, self.stride, self.w, self.ow);
        if k != s {
            for oy in 0..self.oh {
                for ox in 0..ow {
                    out[oy * ow + ox] = plane[self.argmax(plane, oy, ox)];
                }
            }
            return;
        }
        let larger = |m: T, v: T| if wins(v, m) { v } else { m };
        if k == 2 {
            // LeNet's pooling: two rows at a time, four values a window.
            for (oy, o_row) in out.chunks_exact_mut(ow).enumerate() {
                let r0 = &plane[2 * oy * w..][..2 * ow];
                let r1 = &plane[(2 * oy + 1) * w..][..2 * ow];
                let windows = r0.chunks_exact(2).zip(r1.chunks_exact(2));
                for (o, (a, b)) in o_row.iter_mut().zip(windows) {
                    *o = larger(larger(larger(a[0], a[1]), b[0]), b[1]);
                }
            }
            return;
        }
        for (oy, o_row) in out.chunks_exact_mut(ow).enumerate() {
            for ky in 0..k {
                let row = &plane[(oy * s + ky) * w..][..ow * s];
                for (o, window) in o_row.iter_mut().zip(row.chunks_exact(s)) {
                    let m = window[1..].iter().fold(window[0], |m, &v| larger(m, v));
                    *o = if ky == 0 { m } else { larger(*o, m) };
                }
            }
        }
    }
}

/// Whether `v` replaces the maximum `best` so far: when larger, or NaN (which propagates).
#[inline(always)]
fn wins<T: WithDType>(v: T, best: T) -> bool {
    #[allow(clippy::eq_op)]
    let nan = v != v;
    v > best || nan
}

#[derive(Debug, Clone, Copy)]
struct MaxPoolOp(PoolGeometry);

fn pool_forward<T: WithDType>(g: &PoolGeometry, x: &[T]) -> Result<Vec<T>> {
    let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
    let mut out = vec![T::zero(); g.planes * ohw];
    for_each_row(&mut out, ohw, |p, o| {
        g.pool_plane(&x[p * hw..(p + 1) * hw], o)
    });
    Ok(out)
}

/// The gradient goes to the first maximum of each window (PyTorch's choice; candle's own
/// op splits it between tied maxima).
fn pool_backward<T: WithDType>(g: &PoolGeometry, x: &[T], grad: &[T]) -> Result<Vec<T>> {
    let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
    let mut dx = vec![T::zero(); g.planes * hw];
    for_each_row(&mut dx, hw, |p, d| {
        let plane = &x[p * hw..(p + 1) * hw];
        let gp = &grad[p * ohw..(p + 1) * ohw];
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                d[g.argmax(plane, oy, ox)] += gp[oy * g.ow + ox];
            }
        }
    });
    Ok(dx)
}

impl CustomOp1 for MaxPoolOp {
    fn name(&self) -> &'static str {
        "sbp-max-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        fn run<T: WithDType>(g: &PoolGeometry, s: &CpuStorage, l: &Layout) -> Result<Vec<T>> {
            pool_forward(g, data(s, l)?)
        }
        let g = &self.0;
        let (out, _) = cpu_dispatch!(s, run(g, s, l));
        let dims = l.dims();
        Ok((out, Shape::from((dims[0], dims[1], g.oh, g.ow))))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !needs_grad(x) {
            return Ok(None);
        }
        let dx = x.apply_op2_no_bwd(&grad.contiguous()?, &MaxPoolBackwardOp(self.0))?;
        Ok(Some(dx))
    }
}

#[derive(Debug, Clone, Copy)]
struct MaxPoolBackwardOp(PoolGeometry);

impl CustomOp2 for MaxPoolBackwardOp {
    fn name(&self) -> &'static str {
        "sbp-max-pool2d-backward"
    }

    same_shape_cpu_fwd!(PoolGeometry, pool_backward);
}

/// Max-pooling of `x` `(N, C, H, W)` over `kernel × kernel` windows every `stride`
/// (no padding), as candle's `max_pool2d_with_stride` computes it. On the CPU it has its
/// own backward pass, which routes each window's gradient to its first maximum.
/// Elsewhere, where `x` needs a gradient and the windows do not overlap, it is two max
/// reductions over a reshape, whose gradient reaches each window's maximum whole: candle
/// 0.11's own max-pool gradient is scaled by `1/kernel²` (it multiplies by the share of
/// the window's values that are its maximum, where it means to divide), which would
/// shrink every gradient behind a pooling on a GPU.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize) -> Result<Tensor> {
    let fits =
        x.rank() == 4 && kernel > 0 && stride > 0 && x.dim(2)? >= kernel && x.dim(3)? >= kernel;
    if !fits || !fast_path(&[x]) {
        if fits && kernel == stride && needs_grad(x) {
            return windows(x, kernel)?.max(5)?.max(3);
        }
        return x.max_pool2d_with_stride((kernel, kernel), (stride, stride));
    }
    let (n, c, h, w) = x.dims4()?;
    let g = PoolGeometry {
        planes: n * c,
        h,
        w,
        kernel,
        stride,
        oh: (h - kernel) / stride + 1,
        ow: (w - kernel) / stride + 1,
    };
    x.contiguous()?.apply_op1(MaxPoolOp(g))
}

/// Max-pooling of the host planes `x` (`planes × h × w`, f32) over `kernel × kernel`
/// windows every `stride`: what [`max_pool2d`] computes, for an inference plan's buffers.
pub(crate) fn max_pool2d_host(
    x: &[f32],
    planes: usize,
    (h, w): (usize, usize),
    kernel: usize,
    stride: usize,
) -> Result<Vec<f32>> {
    if kernel == 0 || stride == 0 || h < kernel || w < kernel || x.len() != planes * h * w {
        candle::bail!("max-pool2d: host buffers that do not fit the pooling");
    }
    let g = PoolGeometry {
        planes,
        h,
        w,
        kernel,
        stride,
        oh: (h - kernel) / stride + 1,
        ow: (w - kernel) / stride + 1,
    };
    pool_forward(&g, x)
}

// ---------------------------------------------------------------------------------------
// Per-unit scaling.

#[derive(Debug, Clone, Copy)]
struct ScaleGeometry {
    batch: usize,
    units: usize,
    /// Values per unit and example (H·W for a feature map, 1 for a vector).
    inner: usize,
    /// Whether the scale is per example `(N, U)` rather than shared `(U,)`.
    per_example: bool,
    /// A ReLU fused in: `y = max(x·s, 0)`, which for positive factors (a noise layer's `θ`)
    /// is the ReLU before the multiply or after it alike.
    relu: bool,
}

impl ScaleGeometry {
    /// The factors of example `n`: one per unit.
    fn factors<'a, T>(&self, s: &'a [T], n: usize) -> &'a [T] {
        if self.per_example {
            &s[n * self.units..(n + 1) * self.units]
        } else {
            &s[..self.units]
        }
    }

    /// Values per example.
    fn per(&self) -> usize {
        self.units * self.inner
    }
}

/// Below this many values an element-wise pass runs on the calling thread: handing work
/// to the pool and waiting for it costs tens of microseconds, more than such a pass.
const PAR_MIN_VALUES: usize = 1 << 17;

/// Whether a pass over `values` values pays for splitting across the pool.
fn worth_splitting(values: usize) -> bool {
    values >= PAR_MIN_VALUES && threads() > 1
}

/// `f(n, row)` for the rows of `out` (`row_len` values each), in parallel where `out` is
/// large enough to pay for it.
fn for_each_row<T: Send>(out: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let row_len = row_len.max(1);
    if !worth_splitting(out.len()) {
        out.chunks_mut(row_len)
            .enumerate()
            .for_each(|(n, r)| f(n, r));
        return;
    }
    // A few chunks of whole rows per thread, so that a slow thread can be helped.
    let rows = (out.len() / row_len).div_ceil(threads() * 4).max(1);
    crate::par::chunks_mut(out, rows * row_len, |c, chunk| {
        for (j, r) in chunk.chunks_mut(row_len).enumerate() {
            f(c * rows + j, r)
        }
    });
}

/// `max(v, 0)` where `relu`, else `v`.
#[inline(always)]
pub(crate) fn relu_if<T: WithDType>(relu: bool, v: T) -> T {
    if relu && v < T::zero() {
        T::zero()
    } else {
        v
    }
}

/// Whether gradient passes at input `x`: everywhere, or where `x > 0` with a ReLU fused in.
#[inline(always)]
fn live<T: WithDType>(relu: bool, x: T) -> bool {
    !relu || x > T::zero()
}

/// `y = x · s` along axis 1, as a custom op over `(x, s)`.
#[derive(Debug, Clone, Copy)]
struct ScaleOp(ScaleGeometry);

fn scale_forward<T: WithDType>(g: &ScaleGeometry, x: &[T], s: &[T]) -> Result<Vec<T>> {
    let per = g.per();
    let mut y = vec![T::zero(); g.batch * per];
    for_each_row(&mut y, per, |n, yn| {
        let (xn, fs) = (&x[n * per..(n + 1) * per], g.factors(s, n));
        crate::simd::wide! {
            let relu = g.relu; // read once (see accumulate_ds)
            if g.inner == 1 {
                // Vectors (the MLPs): one straight pass over the row.
                for ((y, &x), &f) in yn.iter_mut().zip(xn).zip(fs) {
                    *y = relu_if(relu, x * f);
                }
                return;
            }
            for ((yr, xr), &f) in yn.chunks_mut(g.inner).zip(xn.chunks(g.inner)).zip(fs) {
                for (y, &x) in yr.iter_mut().zip(xr) {
                    *y = relu_if(relu, x * f);
                }
            }
        }
    });
    Ok(y)
}

/// Lanes of [`sum_lanes`]: a 16-lane vector of f32, two of f64.
const SUM_LANES: usize = 16;

/// `Σ_i term(a_i, b_i)` over two equally long slices, as `SUM_LANES` interleaved partial
/// sums added up in a fixed order at the end. One running sum is a chain of dependent
/// additions, one every 4 cycles and never vectorised (the compiler keeps the order of
/// float additions); interleaved sums vectorise, and the order, fixed by the length
/// alone, gives the same value on any machine and thread count.
#[inline(always)]
fn sum_lanes<T: WithDType>(a: &[T], b: &[T], term: impl Fn(T, T) -> T) -> T {
    let (ac, bc) = (a.chunks_exact(SUM_LANES), b.chunks_exact(SUM_LANES));
    let tail: T = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .fold(T::zero(), |s, (&x, &y)| s + term(x, y));
    let mut lanes = [T::zero(); SUM_LANES];
    for (ca, cb) in ac.zip(bc) {
        for ((l, &x), &y) in lanes.iter_mut().zip(ca).zip(cb) {
            *l += term(x, y);
        }
    }
    lanes.iter().fold(T::zero(), |s, &l| s + l) + tail
}

/// Adds `Σ_i x·grad` over the inner positions of one example's row to `acc` (one value per
/// unit), counting only positions where `x > 0` when a ReLU is fused in.
#[inline(always)]
fn accumulate_ds<T: WithDType>(g: &ScaleGeometry, acc: &mut [T], x: &[T], grad: &[T]) {
    // A local copy: read through `g` the flag is reloaded after every store (which could
    // alias it), and the loop does not vectorise.
    let relu = g.relu;
    let term = move |x: T, gv: T| if live(relu, x) { x * gv } else { T::zero() };
    if g.inner == 1 {
        for ((a, &x), &gv) in acc.iter_mut().zip(x).zip(grad) {
            *a += term(x, gv);
        }
        return;
    }
    for ((a, xr), gr) in acc
        .iter_mut()
        .zip(x.chunks(g.inner))
        .zip(grad.chunks(g.inner))
    {
        *a += sum_lanes(xr, gr, term);
    }
}

/// Values per block of rows whose `ds` is summed on its own before the blocks are added
/// in order: the block layout depends on the shapes only, so the sum is the same on any
/// number of threads.
const DS_BLOCK_VALUES: usize = 1 << 15;

/// `[ds (s's size, if wanted), dx (x's size, if wanted)]` in one buffer. With the ReLU
/// fused in, only positions where `x > 0` pass gradient (the factors are positive).
fn scale_backward<T: WithDType>(
    g: &ScaleGeometry,
    (want_dx, want_ds): (bool, bool),
    x: &[T],
    s: &[T],
    grad: &[T],
) -> Result<Vec<T>> {
    let per = g.per();
    let s_len = if g.per_example {
        g.batch * g.units
    } else {
        g.units
    };
    let mut out = vec![T::zero(); if want_ds { s_len } else { 0 }];
    let row = |n: usize| n * per..(n + 1) * per;
    if want_ds && g.per_example {
        for_each_row(&mut out, g.units, |n, dn| {
            crate::simd::wide! { accumulate_ds(g, dn, &x[row(n)], &grad[row(n)]) }
        });
    } else if want_ds {
        let rows_per_block = (DS_BLOCK_VALUES / per.max(1)).max(1);
        let block = |b: usize| {
            let mut acc = vec![T::zero(); g.units];
            crate::simd::wide! {
                for n in b * rows_per_block..((b + 1) * rows_per_block).min(g.batch) {
                    accumulate_ds(g, &mut acc, &x[row(n)], &grad[row(n)]);
                }
            };
            acc
        };
        let blocks = g.batch.div_ceil(rows_per_block);
        let partial: Vec<Vec<T>> = if worth_splitting(x.len()) {
            crate::par::map((0..blocks).collect(), |_, b| block(b))
        } else {
            (0..blocks).map(block).collect()
        };
        for p in partial {
            out.iter_mut().zip(p).for_each(|(d, v)| *d += v);
        }
    }
    if want_dx {
        let start = out.len();
        out.resize(start + g.batch * per, T::zero());
        for_each_row(&mut out[start..], per, |n, dn| {
            let (xn, gn, fs) = (&x[row(n)], &grad[row(n)], g.factors(s, n));
            let relu = g.relu; // read once (see accumulate_ds)
            let pass = move |x: T, gv: T, f: T| if live(relu, x) { gv * f } else { T::zero() };
            crate::simd::wide! {
                if g.inner == 1 {
                    for (((d, &x), &gv), &f) in dn.iter_mut().zip(xn).zip(gn).zip(fs) {
                        *d = pass(x, gv, f);
                    }
                    return;
                }
                let rows = dn.chunks_mut(g.inner).zip(xn.chunks(g.inner));
                for (((dr, xr), gr), &f) in rows.zip(gn.chunks(g.inner)).zip(fs) {
                    for ((d, &x), &gv) in dr.iter_mut().zip(xr).zip(gr) {
                        *d = pass(x, gv, f);
                    }
                }
            }
        });
    }
    Ok(out)
}

impl CustomOp2 for ScaleOp {
    fn name(&self) -> &'static str {
        "sbp-scale-units"
    }

    same_shape_cpu_fwd!(ScaleGeometry, scale_forward);

    fn bwd(
        &self,
        x: &Tensor,
        s: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let want = (needs_grad(x), needs_grad(s));
        if want == (false, false) {
            return Ok((None, None));
        }
        let op = ScaleBackwardOp { g: self.0, want };
        let all = x.apply_op3_no_bwd(s, &grad.contiguous()?, &op)?;
        let parts = split_flat(&all, &[(want.1, s.shape()), (want.0, x.shape())])?;
        let mut parts = parts.into_iter();
        let mut next = || parts.next().flatten();
        let (ds, dx) = (next(), next());
        Ok((dx, ds))
    }
}

#[derive(Debug, Clone, Copy)]
struct ScaleBackwardOp {
    g: ScaleGeometry,
    want: (bool, bool),
}

flat_backward_op!(ScaleBackwardOp, "sbp-scale-units-backward", scale_backward);

/// Multiplies each unit (axis 1) of `x` `(N, U, …)` by its factor: `s` is `(U,)` (shared
/// by the batch) or `(N, U)` (one factor per example and unit). The same values as
/// `x.broadcast_mul(s reshaped)`; on the CPU (f32/f64) one pass forward and one backward,
/// each gradient computed only when needed. This is how noise layers and masks act.
pub fn scale_units(x: &Tensor, s: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let per_example = s.rank() == 2;
    let fits = dims.len() >= 2
        && match s.dims() {
            [u] => *u == dims[1],
            [n, u] => *n == dims[0] && *u == dims[1],
            _ => false,
        };
    if !fits {
        candle::bail!(
            "scale_units: factors of shape {:?} do not fit input {:?} (want (U,) or (N, U) for axis 1)",
            s.dims(),
            dims
        );
    }
    if !fast_path(&[x, s]) {
        let mut shape = vec![1usize; dims.len()];
        shape[1] = dims[1];
        if per_example {
            shape[0] = dims[0];
        }
        return x.broadcast_mul(&s.reshape(shape)?);
    }
    let g = ScaleGeometry {
        batch: dims[0],
        units: dims[1],
        inner: dims[2..].iter().product(),
        per_example,
        relu: false,
    };
    x.contiguous()?.apply_op2(&s.contiguous()?, ScaleOp(g))
}

// ---------------------------------------------------------------------------------------
// Selecting units.

/// Keeps the units `idx` (axis 1) of a contiguous `(N, U, inner…)` input.
#[derive(Debug, Clone)]
struct SelectOp {
    idx: std::sync::Arc<Vec<usize>>,
    units: usize,
    inner: usize,
}

fn select_forward<T: WithDType>(op: &SelectOp, x: &[T]) -> Result<Vec<T>> {
    Ok(select_host(x, op.units, op.inner, &op.idx))
}

/// Keeps units `idx` of each row of `x` (`units` units of `inner` values each), in that
/// order: the kernel of [`select_units`], for an inference plan's buffers too.
pub(crate) fn select_host<T: WithDType>(
    x: &[T],
    units: usize,
    inner: usize,
    idx: &[usize],
) -> Vec<T> {
    let k = idx.len();
    if k * inner == 0 {
        return Vec::new(); // nothing kept (a network compressed with `allow_empty`)
    }
    let batch = x.len() / (units * inner);
    let mut out = Vec::with_capacity(batch * k * inner);
    if inner == 1 {
        // Features of a flat input: a gather, not a copy per feature; in f32 the hardware
        // gather's, into the uninitialised buffer.
        if let Some(x32) = as_f32(x) {
            // SAFETY: T is f32 (`as_f32` returned the data), and `MaybeUninit<f32>` has
            // f32's layout; the capacity holds `batch · k` values.
            let dst: &mut [MaybeUninit<f32>] = unsafe {
                std::slice::from_raw_parts_mut(
                    out.spare_capacity_mut().as_mut_ptr().cast(),
                    batch * k,
                )
            };
            if crate::gather::gather_rows_f32(x32, units, idx, dst).is_some() {
                // SAFETY: the gather wrote all `batch · k` values.
                unsafe { out.set_len(batch * k) };
                return out;
            }
        }
        for row in x.chunks_exact(units) {
            out.extend(idx.iter().map(|&j| row[j]));
        }
        return out;
    }
    for row in x.chunks_exact(units * inner) {
        for &j in idx {
            out.extend_from_slice(&row[j * inner..(j + 1) * inner]);
        }
    }
    out
}

impl CustomOp1 for SelectOp {
    fn name(&self) -> &'static str {
        "sbp-select-units"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (storage, _) = match s {
            CpuStorage::F32(_) => {
                let v = select_forward::<f32>(self, data(s, l)?)?;
                (CpuStorage::F32(v), ())
            }
            CpuStorage::F64(_) => {
                let v = select_forward::<f64>(self, data(s, l)?)?;
                (CpuStorage::F64(v), ())
            }
            other => candle::bail!("ops: no CPU kernel for {:?}", other.dtype()),
        };
        let mut dims = l.dims().to_vec();
        dims[1] = self.idx.len();
        Ok((storage, Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !needs_grad(x) {
            return Ok(None);
        }
        // Training through a selection is rare (fine-tuning a compressed network):
        // candle's scatter-add is good enough.
        let idx: Vec<u32> = self.idx.iter().map(|&j| j as u32).collect();
        let idx = Tensor::from_vec(idx, self.idx.len(), x.device())?;
        Ok(Some(x.zeros_like()?.index_add(&idx, grad, 1)?))
    }
}

/// Keeps the units `indices` of `x` `(N, U, …)` along axis 1, in that order: the values of
/// `x.index_select(indices, 1)`, in one copy per kept unit on the CPU (candle's CPU
/// `index_select` goes element by element). `indices` is the same selection as a `u32`
/// tensor, for the fallback on other devices. Compressed networks read their kept input
/// features through it.
pub fn select_units(x: &Tensor, indices: &[usize], index_tensor: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2
        || indices.iter().any(|&j| j >= dims[1])
        || index_tensor.elem_count() != indices.len()
    {
        candle::bail!(
            "select_units: indices {:?}… do not fit input {:?} along axis 1",
            &indices[..indices.len().min(4)],
            dims
        );
    }
    if !fast_path(&[x]) {
        return x.index_select(index_tensor, 1);
    }
    let op = SelectOp {
        idx: std::sync::Arc::new(indices.to_vec()),
        units: dims[1],
        inner: dims[2..].iter().product(),
    };
    x.contiguous()?.apply_op1(op)
}

// ---------------------------------------------------------------------------------------
// Adam, in place.

/// One Adam update's constants (bias corrections already applied).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamStep {
    pub beta1: f64,
    pub beta2: f64,
    /// `lr / (1 − β1ᵗ)`.
    pub step_size: f64,
    /// `1 / sqrt(1 − β2ᵗ)`.
    pub v_scale: f64,
    pub eps: f64,
    /// `1 − lr·weight_decay`.
    pub decay: f64,
}

/// Adam's two moments of one parameter, kept on the host next to a CPU parameter.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum HostMoments {
    F32(Vec<f32>, Vec<f32>),
    F64(Vec<f64>, Vec<f64>),
}

impl HostMoments {
    /// Zero moments for `param`, or `None` where the fused kernel does not apply.
    pub(crate) fn for_param(param: &Tensor) -> Option<Self> {
        if !fast_path(&[param]) || !param.is_contiguous() {
            return None;
        }
        let n = param.elem_count();
        Some(match param.dtype() {
            DType::F32 => Self::F32(vec![0.0; n], vec![0.0; n]),
            _ => Self::F64(vec![0.0; n], vec![0.0; n]),
        })
    }

    /// The moments `(m, v)` as tensors of `shape` on the CPU.
    pub(crate) fn tensors(&self, shape: &Shape) -> Result<(Tensor, Tensor)> {
        let cpu = &candle::Device::Cpu;
        Ok(match self {
            Self::F32(m, v) => (
                Tensor::from_slice(m, shape, cpu)?,
                Tensor::from_slice(v, shape, cpu)?,
            ),
            Self::F64(m, v) => (
                Tensor::from_slice(m, shape, cpu)?,
                Tensor::from_slice(v, shape, cpu)?,
            ),
        })
    }

    /// Overwrites the moments with `m` and `v` (any shape with the same element count).
    pub(crate) fn set(&mut self, m: &Tensor, v: &Tensor) -> Result<()> {
        let flat = |t: &Tensor, dtype| {
            t.flatten_all()?
                .to_dtype(dtype)?
                .to_device(&candle::Device::Cpu)
        };
        match self {
            Self::F32(hm, hv) => {
                let (m, v) = (
                    flat(m, DType::F32)?.to_vec1()?,
                    flat(v, DType::F32)?.to_vec1()?,
                );
                if m.len() != hm.len() || v.len() != hv.len() {
                    candle::bail!(
                        "adam: moments of {} values for a parameter of {}",
                        m.len(),
                        hm.len()
                    );
                }
                (*hm, *hv) = (m, v);
            }
            Self::F64(hm, hv) => {
                let (m, v) = (
                    flat(m, DType::F64)?.to_vec1()?,
                    flat(v, DType::F64)?.to_vec1()?,
                );
                if m.len() != hm.len() || v.len() != hv.len() {
                    candle::bail!(
                        "adam: moments of {} values for a parameter of {}",
                        m.len(),
                        hm.len()
                    );
                }
                (*hm, *hv) = (m, v);
            }
        }
        Ok(())
    }
}

/// Elements per parallel chunk of the Adam kernel.
const ADAM_CHUNK: usize = 1 << 14;

macro_rules! adam_kernel {
    ($name:ident, $t:ty) => {
        /// One pass: `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
        /// `θ ← decay·θ − step_size · m / (sqrt(v)·v_scale + ε)`.
        ///
        /// Subnormal gradients and moments count as 0. A parameter whose gradient has
        /// vanished (a pruned unit's weights, a memorised batch) sees its moments decay
        /// geometrically through the subnormal range, `v` for some 16,000 steps at
        /// β2 = 0.999, and every arithmetic operation on a subnormal takes a microcode
        /// assist of a hundred cycles or more: a LeNet-500-300 step took 4.3 ms instead
        /// of 2.4 once its moments got there. Below 1e-38 (f32) they move a parameter
        /// by less than 1e-30 of the step size.
        fn $name(s: &AdamStep, p: &mut [$t], g: &[$t], m: &mut [$t], v: &mut [$t]) {
            let (b1, c1) = (s.beta1 as $t, (1.0 - s.beta1) as $t);
            let (b2, c2) = (s.beta2 as $t, (1.0 - s.beta2) as $t);
            let (decay, size) = (s.decay as $t, s.step_size as $t);
            let (scale, eps) = (s.v_scale as $t, s.eps as $t);
            let normal = |x: $t| if x.abs() < <$t>::MIN_POSITIVE { 0.0 } else { x };
            let update = |((p, g), (m, v)): ((&mut [$t], &[$t]), (&mut [$t], &mut [$t]))| {
                crate::simd::wide! {
                    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
                        let g = normal(g);
                        *m = normal(b1 * *m + c1 * g);
                        *v = normal(b2 * *v + c2 * g * g);
                        *p = decay * *p - size * *m / (v.sqrt() * scale + eps);
                    }
                }
            };
            if !worth_splitting(p.len()) {
                // Biases and noise parameters: the pool would cost more than the pass.
                return update(((p, g), (m, v)));
            }
            let chunks = p
                .chunks_mut(ADAM_CHUNK)
                .zip(g.chunks(ADAM_CHUNK))
                .zip(m.chunks_mut(ADAM_CHUNK).zip(v.chunks_mut(ADAM_CHUNK)));
            crate::par::map(chunks.collect(), |_, c| update(c));
        }
    };
}

adam_kernel!(adam_f32, f32);
adam_kernel!(adam_f64, f64);

/// The fused Adam update of one parameter, in place, with its host moments.
struct AdamFused<'a> {
    step: AdamStep,
    moments: std::sync::Mutex<&'a mut HostMoments>,
}

impl candle::InplaceOp2 for AdamFused<'_> {
    fn name(&self) -> &'static str {
        "sbp-adam"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (a, b) = l1
            .contiguous_offsets()
            .ok_or_else(|| candle::Error::Msg("adam: the parameter is not contiguous".into()))?;
        let mut moments = self.moments.lock().unwrap_or_else(|e| e.into_inner());
        match (s1, &mut **moments) {
            (CpuStorage::F32(p), HostMoments::F32(m, v)) => {
                adam_f32(&self.step, &mut p[a..b], data(s2, l2)?, m, v)
            }
            (CpuStorage::F64(p), HostMoments::F64(m, v)) => {
                adam_f64(&self.step, &mut p[a..b], data(s2, l2)?, m, v)
            }
            _ => candle::bail!("adam: the parameter's dtype changed"),
        }
        Ok(())
    }
}

/// Updates `param` and its host `moments` in place in one pass over memory.
pub(crate) fn adam_host(
    param: &Tensor,
    grad: &Tensor,
    moments: &mut HostMoments,
    step: AdamStep,
) -> Result<()> {
    let len = match moments {
        HostMoments::F32(m, _) => m.len(),
        HostMoments::F64(m, _) => m.len(),
    };
    if grad.dims() != param.dims() || param.elem_count() != len || !fast_path(&[param, grad]) {
        candle::bail!(
            "adam: gradient {:?} and {len} moments for a parameter of shape {:?}",
            grad.dims(),
            param.dims()
        );
    }
    let grad = grad.contiguous()?;
    let op = AdamFused {
        step,
        moments: std::sync::Mutex::new(moments),
    };
    param.inplace_op2(&grad, &op)
}

// ---------------------------------------------------------------------------------------
// The noise layer: `y = x · θ(μ, log σ)` with θ and its derivatives drawn on the host.

/// `θ` for one step of a noise layer and its derivatives, row-major `(rows, units)`
/// (`rows` 1 when the draw is shared by the batch).
#[derive(Debug, Clone)]
pub(crate) struct NoiseDraw {
    pub theta: Vec<f64>,
    /// `∂θ/∂μ`.
    pub d_mu: Vec<f64>,
    /// `∂θ/∂log σ`.
    pub d_log_sigma: Vec<f64>,
    pub rows: usize,
}

/// `x · θ` as a custom op over `(x, μ, log σ)`: the forward pass multiplies by the drawn
/// `θ`; the backward pass gives `x` its gradient `grad·θ` and `μ`, `log σ` theirs through
/// `∂θ/∂μ`, `∂θ/∂log σ`: one op per layer and step instead of a dozen small ones.
#[derive(Debug, Clone)]
struct NoiseOp {
    g: ScaleGeometry,
    draw: std::sync::Arc<NoiseDraw>,
}

impl NoiseOp {
    fn theta<T: WithDType>(&self) -> Vec<T> {
        self.draw.theta.iter().map(|&v| T::from_f64(v)).collect()
    }
}

impl CustomOp3 for NoiseOp {
    fn name(&self) -> &'static str {
        "sbp-noise"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
        _s3: &CpuStorage,
        _l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: WithDType>(op: &NoiseOp, s: &CpuStorage, l: &Layout) -> Result<Vec<T>> {
            scale_forward(&op.g, data(s, l)?, &op.theta::<T>())
        }
        let (out, _) = cpu_dispatch!(s1, run(self, s1, l1));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        mu: &Tensor,
        log_sigma: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let want_dx = needs_grad(x);
        let theta_dims: &[usize] = if self.g.per_example {
            &[self.g.batch, self.g.units]
        } else {
            &[self.g.units]
        };
        let theta =
            Tensor::from_slice(&self.draw.theta, theta_dims, x.device())?.to_dtype(x.dtype())?;
        let op = ScaleBackwardOp {
            g: self.g,
            want: (want_dx, true),
        };
        let all = x.apply_op3_no_bwd(&theta, &grad.contiguous()?, &op)?;
        let n_theta = self.draw.theta.len();
        let d_theta: Vec<f64> = all.narrow(0, 0, n_theta)?.to_dtype(DType::F64)?.to_vec1()?;
        let units = self.g.units;
        let (mut d_mu, mut d_ls) = (vec![0.0; units], vec![0.0; units]);
        for (k, &dt) in d_theta.iter().enumerate() {
            d_mu[k % units] += dt * self.draw.d_mu[k];
            d_ls[k % units] += dt * self.draw.d_log_sigma[k];
        }
        let param = |v: Vec<f64>, like: &Tensor| -> Result<Option<Tensor>> {
            if !needs_grad(like) {
                return Ok(None);
            }
            Ok(Some(
                Tensor::from_vec(v, like.shape(), like.device())?.to_dtype(like.dtype())?,
            ))
        };
        let dx = if want_dx {
            Some(all.narrow(0, n_theta, x.elem_count())?.reshape(x.shape())?)
        } else {
            None
        };
        Ok((dx, param(d_mu, mu)?, param(d_ls, log_sigma)?))
    }
}

/// Whether [`noise_multiply`] has a kernel for this input and these parameters.
pub(crate) fn noise_applies(x: &Tensor, mu: &Tensor, log_sigma: &Tensor) -> bool {
    x.rank() >= 2 && fast_path(&[x]) && mu.device().is_cpu() && log_sigma.device().is_cpu()
}

/// Multiplies unit axis 1 of `x` by the drawn `θ` (then applies a ReLU if `relu`) with
/// gradients flowing to `mu` and `log_sigma` (both `(units,)`), or `None` where the CPU
/// kernel does not apply (the layer then builds the same product from candle ops).
pub(crate) fn noise_multiply(
    x: &Tensor,
    mu: &Tensor,
    log_sigma: &Tensor,
    draw: NoiseDraw,
    relu: bool,
) -> Result<Option<Tensor>> {
    let dims = x.dims();
    if !noise_applies(x, mu, log_sigma) {
        return Ok(None);
    }
    let units = dims[1];
    let per_example = draw.rows != 1;
    if draw.theta.len() != draw.rows * units || mu.elem_count() != units {
        candle::bail!(
            "noise: {} draws for {} rows of {units} units",
            draw.theta.len(),
            draw.rows
        );
    }
    if per_example && draw.rows != dims[0] {
        candle::bail!(
            "noise: {} rows of draws for a batch of {}",
            draw.rows,
            dims[0]
        );
    }
    let g = ScaleGeometry {
        batch: dims[0],
        units,
        inner: dims[2..].iter().product(),
        per_example,
        relu,
    };
    let op = NoiseOp {
        g,
        draw: std::sync::Arc::new(draw),
    };
    Ok(Some(x.contiguous()?.apply_op3(mu, log_sigma, op)?))
}

/// A scalar `value` whose gradients with respect to `mu` and `log_sigma` are `g_mu` and
/// `g_log_sigma`: the noise layer's KL term in one op.
#[derive(Debug, Clone)]
struct SurrogateOp {
    value: f64,
    g_mu: std::sync::Arc<Vec<f64>>,
    g_log_sigma: std::sync::Arc<Vec<f64>>,
}

impl CustomOp2 for SurrogateOp {
    fn name(&self) -> &'static str {
        "sbp-surrogate"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(vec![self.value as f32]),
            CpuStorage::F64(_) => CpuStorage::F64(vec![self.value]),
            other => candle::bail!("surrogate: no CPU kernel for {:?}", other.dtype()),
        };
        Ok((out, Shape::from(())))
    }

    fn bwd(
        &self,
        mu: &Tensor,
        log_sigma: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let scaled = |v: &[f64], like: &Tensor| -> Result<Option<Tensor>> {
            if !needs_grad(like) {
                return Ok(None);
            }
            let v: Vec<f64> = v.iter().map(|&d| d * g).collect();
            Ok(Some(
                Tensor::from_vec(v, like.shape(), like.device())?.to_dtype(like.dtype())?,
            ))
        };
        Ok((
            scaled(&self.g_mu, mu)?,
            scaled(&self.g_log_sigma, log_sigma)?,
        ))
    }
}

/// The drawn `θ` `(units,)` of a draw shared by the batch as a custom op over `(μ, log σ)`:
/// the forward pass gives `θ`, the backward pass `grad·∂θ/∂μ` and `grad·∂θ/∂log σ`.
#[derive(Debug, Clone)]
struct ThetaOp {
    draw: std::sync::Arc<NoiseDraw>,
}

impl CustomOp2 for ThetaOp {
    fn name(&self) -> &'static str {
        "sbp-theta"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        _l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let theta = &self.draw.theta;
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(theta.iter().map(|&v| v as f32).collect()),
            CpuStorage::F64(_) => CpuStorage::F64(theta.clone()),
            other => candle::bail!("theta: no CPU kernel for {:?}", other.dtype()),
        };
        Ok((out, Shape::from(theta.len())))
    }

    fn bwd(
        &self,
        mu: &Tensor,
        log_sigma: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g: Vec<f64> = grad.to_dtype(DType::F64)?.to_vec1()?;
        Ok((
            unit_grad(&g, &self.draw.d_mu, mu)?,
            unit_grad(&g, &self.draw.d_log_sigma, log_sigma)?,
        ))
    }
}

/// The gradient of a noise parameter `like` (`μ` or `log σ`) from the gradient `d_theta`
/// of each unit's `θ` and `∂θ/∂param` per unit; `None` where nothing needs it.
fn unit_grad(d_theta: &[f64], d: &[f64], like: &Tensor) -> Result<Option<Tensor>> {
    if !needs_grad(like) {
        return Ok(None);
    }
    let v: Vec<f64> = d_theta.iter().zip(d).map(|(a, b)| a * b).collect();
    Ok(Some(
        Tensor::from_vec(v, like.shape(), like.device())?.to_dtype(like.dtype())?,
    ))
}

/// The drawn `θ` of a draw shared by the batch (`draw.rows == 1`) as a tensor shaped like
/// `mu`, with gradients flowing to `mu` and `log_sigma` (CPU, f32/f64: see
/// [`surrogate_applies`]).
pub(crate) fn noise_theta(mu: &Tensor, log_sigma: &Tensor, draw: NoiseDraw) -> Result<Tensor> {
    let units = mu.elem_count();
    if !surrogate_applies(mu, log_sigma)
        || mu.rank() != 1
        || draw.rows != 1
        || [draw.theta.len(), draw.d_mu.len(), draw.d_log_sigma.len()] != [units; 3]
    {
        candle::bail!("theta: no kernel for parameters {:?}", mu.dims());
    }
    let op = ThetaOp {
        draw: std::sync::Arc::new(draw),
    };
    mu.apply_op2(log_sigma, op)
}

/// Whether [`surrogate_scalar`] has a kernel for these parameters (CPU, f32/f64).
pub(crate) fn surrogate_applies(mu: &Tensor, log_sigma: &Tensor) -> bool {
    fast_path(&[mu, log_sigma])
}

/// The scalar `value` with gradients `g_mu`, `g_log_sigma` with respect to `(μ, log σ)`.
pub(crate) fn surrogate_scalar(
    (mu, log_sigma): (&Tensor, &Tensor),
    value: f64,
    g_mu: Vec<f64>,
    g_log_sigma: Vec<f64>,
) -> Result<Tensor> {
    if !surrogate_applies(mu, log_sigma)
        || g_mu.len() != mu.elem_count()
        || g_log_sigma.len() != log_sigma.elem_count()
    {
        candle::bail!("surrogate: no kernel for parameters {:?}", mu.dims());
    }
    let op = SurrogateOp {
        value,
        g_mu: std::sync::Arc::new(g_mu),
        g_log_sigma: std::sync::Arc::new(g_log_sigma),
    };
    mu.apply_op2(log_sigma, op)
}

// ---------------------------------------------------------------------------------------
// A noise layer on an input that needs no gradient, feeding a linear layer.

/// `(x ⊙ θ)·wᵀ + b` for an `x` that needs no gradient (the image, or its flattening) and
/// a `θ` shared by the batch, as a custom op over `(w, θ, b)` (`θ` from [`noise_theta`],
/// which passes its gradient on to `μ` and `log σ`). With `A = gradᵀ·x` (one GEMM),
/// `dw = A·diag(θ)` and `dθ_u = Σ_o w_ou·A_ou`: the GEMM that an unfused layer spends on
/// the gradient of its input, which only served `dθ`, is saved. The bias, and a ReLU
/// where the geometry asks for one, are applied in the same op, not by nodes of their own
/// (each with its own pass, buffers and gradient sum).
///
/// With `scaled_out`, the `θ` operand is the input draw followed by the draw of a noise
/// layer on the outputs, `y = relu((x ⊙ θ_in)·wᵀ + b) ⊙ θ_out`, multiplied (with the ReLU)
/// in one pass over the output after the bias: the outputs' noise then costs no node on
/// the activations. Backward,
/// one pass over the output and its gradient gives both the gradient before the noise and
/// `dθ_out = Σ_rows grad·y / θ_out`.
#[derive(Debug, Clone)]
struct NoiseLinearOp {
    x: Tensor,
    g: LinearGeometry,
    scaled_out: bool,
}

/// A kernel of the noise-linear op: the op, its input `x`, the op's output where the
/// backward kernel needs it, and three operands.
type NoiseLinearKernel<T> =
    fn(&NoiseLinearOp, &[T], Option<&[T]>, (&[T], &[T], &[T])) -> Result<Vec<T>>;

/// `kernel` on the host values of `op`'s input, of its output `res` where given, and of
/// three operands (the `cpu_fwd` of the op and of its backward op).
fn noise_linear_run<T: WithDType>(
    op: &NoiseLinearOp,
    res: Option<&Tensor>,
    kernel: NoiseLinearKernel<T>,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
) -> Result<Vec<T>> {
    let operands = (data(s1, l1)?, data(s2, l2)?, data(s3, l3)?);
    let (xs, xl) = op.x.storage_and_layout();
    let candle::Storage::Cpu(xs) = &*xs else {
        candle::bail!("noise-linear: the input left the CPU");
    };
    let res = res.map(|r| r.storage_and_layout());
    let res = match &res {
        Some((s, l)) => match &**s {
            candle::Storage::Cpu(s) => Some(data(s, l)?),
            _ => candle::bail!("noise-linear: the output left the CPU"),
        },
        None => None,
    };
    kernel(op, data(xs, xl)?, res, operands)
}

fn noise_linear_forward<T: WithDType>(
    op: &NoiseLinearOp,
    x: &[T],
    _res: Option<&[T]>,
    (w, thetas, b): (&[T], &[T], &[T]),
) -> Result<Vec<T>> {
    let g = &op.g;
    let (theta, theta_out) = thetas.split_at(g.inputs);
    let mut scaled = x.to_vec();
    crate::simd::wide! {
        for row in scaled.chunks_mut(g.inputs) {
            row.iter_mut().zip(theta).for_each(|(v, &t)| *v *= t);
        }
    };
    if !op.scaled_out {
        return linear_forward(g, &scaled, w, Some(b));
    }
    let mut y = linear_forward(&LinearGeometry { relu: false, ..*g }, &scaled, w, Some(b))?;
    for_each_row(&mut y, g.outputs, |_, row| {
        crate::simd::wide! {
            let relu = g.relu; // read once (see accumulate_ds)
            let lanes = row.iter_mut().zip(theta_out);
            lanes.for_each(|(v, &t)| *v = relu_if(relu, *v * t));
        }
    });
    Ok(y)
}

/// Backward through the output noise (and the ReLU, where there is one) of a
/// `scaled_out` noise-linear op with output `y`: the gradient before the noise,
/// `grad·θ_out` where `y` is live, and `dθ_out = Σ_rows grad·y / θ_out` (`y/θ_out` is the
/// value the noise multiplied; where the ReLU cut it, `y` is 0).
fn out_noise_backward<T: WithDType>(
    g: &LinearGeometry,
    theta_out: &[T],
    y: &[T],
    grad: &[T],
) -> (Vec<T>, Vec<T>) {
    let mut before = grad.to_vec();
    let mut d_theta = vec![T::zero(); g.outputs];
    crate::simd::wide! {
        let relu = g.relu; // read once (see accumulate_ds)
        for (row, y_row) in before.chunks_mut(g.outputs).zip(y.chunks(g.outputs)) {
            let lanes = row.iter_mut().zip(y_row).zip(d_theta.iter_mut());
            for (((v, &y), d), &t) in lanes.zip(theta_out) {
                *d += *v * y;
                *v = if live(relu, y) { *v * t } else { T::zero() };
            }
        }
    };
    d_theta
        .iter_mut()
        .zip(theta_out)
        .for_each(|(d, &t)| *d /= t);
    (before, d_theta)
}

/// Rows of `A` per block of the noise-linear backward for `inputs` columns: about 2¹⁴
/// values (64 KiB in f32, beside as much of `w`), rounded up to a multiple of 6 (the
/// GEMM's register tile along them). LeNet-500-300's first layer: 21 blocks of 24 rows;
/// its backward took 331-352 µs against 358-377 µs in blocks of 84 rows and 371-398 µs
/// unblocked (scratch timers, runs alternated).
fn noise_linear_block_rows(inputs: usize) -> usize {
    ((1usize << 14) / inputs.max(1)).div_ceil(6).max(1) * 6
}

/// `[dw (o·i), dθ (i), dθ_out (o, when scaled_out), db (o)]` in one buffer.
fn noise_linear_backward<T: WithDType>(
    op: &NoiseLinearOp,
    x: &[T],
    y: Option<&[T]>,
    (w, thetas, grad): (&[T], &[T], &[T]),
) -> Result<Vec<T>> {
    let g = &op.g;
    let (n, i, o) = (g.batch, g.inputs, g.outputs);
    let (theta, theta_out) = thetas.split_at(i);
    let (before, d_theta_out) = match (op.scaled_out, y) {
        (true, Some(y)) => out_noise_backward(g, theta_out, y, grad),
        (true, None) => candle::bail!("noise-linear: the output noise needs the output"),
        (false, _) => (Vec::new(), Vec::new()),
    };
    let grad = if op.scaled_out { &before[..] } else { grad };
    let mut out = Vec::with_capacity(o * i + thetas.len() + o);
    // A (o×i) = gradᵀ (o×n) · x (n×i) by fixed blocks of rows in parallel, each followed
    // at once, while it is still in the core's cache, by dθ_j = Σ_rows w·a and dw = a·θ.
    // The blocks' partial sums are added in block order: dθ does not depend on the thread
    // count. (One GEMM over A and then one pass read A back from the shared cache, half of
    // it written by the other core.)
    let rows = noise_linear_block_rows(i);
    let blocks: Vec<&mut [MaybeUninit<T>]> = out.spare_capacity_mut()[..o * i]
        .chunks_mut((rows * i).max(1))
        .collect();
    let partials = crate::par::map(blocks, |b, a_block| {
        let (first, len) = (b * rows, a_block.len() / i.max(1));
        matmul_uninit(
            (len, i, n),
            a_block,
            (&grad[first..], 1, o),
            (x, i, 1),
            false,
        )?;
        // SAFETY: the product wrote every value of the block, and `MaybeUninit<T>` has
        // `T`'s layout.
        let a_block = unsafe { &mut *(a_block as *mut [MaybeUninit<T>] as *mut [T]) };
        let mut d = vec![T::zero(); i];
        let w_block = &w[first * i..];
        crate::simd::wide! {
            for (a_row, w_row) in a_block.chunks_mut(i).zip(w_block.chunks(i)) {
                // Zipped rather than indexed, so that the loop vectorises.
                let lanes = a_row.iter_mut().zip(w_row).zip(d.iter_mut());
                for (((a, &w), d), &t) in lanes.zip(theta) {
                    *d += w * *a;
                    *a *= t;
                }
            }
        };
        Ok::<_, candle::Error>(d)
    });
    let partials = partials.into_iter().collect::<Result<Vec<_>>>()?;
    // SAFETY: every block's product succeeded, so all `o·i` values are written; dθ (from
    // zeros), dθ_out and db follow.
    unsafe { out.set_len(o * i) };
    out.resize(o * i + i, T::zero());
    for part in partials {
        out[o * i..].iter_mut().zip(part).for_each(|(d, p)| *d += p);
    }
    out.extend_from_slice(&d_theta_out);
    let db_at = out.len();
    out.resize(db_at + o, T::zero());
    sum_rows_into(&mut out[db_at..], grad);
    Ok(out)
}

impl CustomOp3 for NoiseLinearOp {
    fn name(&self) -> &'static str {
        "sbp-noise-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let args = ((s1, l1), (s2, l2), (s3, l3));
        let (out, _) = cpu_dispatch!(
            s1,
            noise_linear_run(self, None, noise_linear_forward, args.0, args.1, args.2)
        );
        Ok((out, Shape::from((self.g.batch, self.g.outputs))))
    }

    fn bwd(
        &self,
        w: &Tensor,
        theta: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = NoiseLinearBackwardOp {
            op: self.clone(),
            res: self.scaled_out.then(|| res.clone()),
        };
        let grad = grad.contiguous()?;
        // Through the fused ReLU first (with output noise, inside the kernel): the gradient
        // where the output is positive.
        let grad = if self.g.relu && !self.scaled_out {
            grad.apply_op2_no_bwd(res, &ReluMaskOp(()))?
        } else {
            grad
        };
        let all = w.apply_op3_no_bwd(theta, &grad, &op)?;
        let (o, i, thetas) = (self.g.outputs, self.g.inputs, theta.elem_count());
        let dw = all.narrow(0, 0, o * i)?.reshape(w.shape())?;
        let d_theta = all.narrow(0, o * i, thetas)?;
        let db = needs_grad(b)
            .then(|| all.narrow(0, o * i + thetas, o))
            .transpose()?;
        Ok((Some(dw), Some(d_theta), db))
    }
}

/// The noise-linear op's backward kernel over `(w, θ, grad)`, with the op's output where
/// it has output noise.
#[derive(Debug, Clone)]
struct NoiseLinearBackwardOp {
    op: NoiseLinearOp,
    res: Option<Tensor>,
}

impl CustomOp3 for NoiseLinearBackwardOp {
    fn name(&self) -> &'static str {
        "sbp-noise-linear-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let args = ((s1, l1), (s2, l2), (s3, l3));
        let (out, len) = cpu_dispatch!(
            s1,
            noise_linear_run(
                &self.op,
                self.res.as_ref(),
                noise_linear_backward,
                args.0,
                args.1,
                args.2
            )
        );
        Ok((out, Shape::from(len)))
    }
}

/// Whether [`noise_linear`] has a kernel for this input, noise parameters and weight: an
/// `x` `(N, I)` on the CPU that needs no gradient.
pub(crate) fn noise_linear_applies(
    x: &Tensor,
    mu: &Tensor,
    log_sigma: &Tensor,
    w: &Tensor,
) -> bool {
    x.rank() == 2
        && w.rank() == 2
        && !needs_grad(x)
        && x.dim(1).ok() == w.dim(1).ok()
        && x.dim(1).ok() == Some(mu.elem_count())
        && mu.rank() == 1
        && fast_path(&[x, w])
        && surrogate_applies(mu, log_sigma)
}

/// `(x ⊙ θ)·wᵀ + b`, followed by a ReLU where `relu` and multiplied by `theta_out` (the
/// draw `(outputs,)` of a noise layer on the outputs, shared by the batch) where given,
/// for a noise layer's draw shared by the batch, where [`noise_linear_applies`].
pub(crate) fn noise_linear(
    x: &Tensor,
    (mu, log_sigma): (&Tensor, &Tensor),
    draw: NoiseDraw,
    (w, b): (&Tensor, Option<&Tensor>),
    relu: bool,
    theta_out: Option<&Tensor>,
) -> Result<Tensor> {
    if !noise_linear_applies(x, mu, log_sigma, w) || draw.rows != 1 {
        candle::bail!(
            "noise-linear: no fused kernel for input {:?} and weight {:?}",
            x.dims(),
            w.dims()
        );
    }
    let g = LinearGeometry {
        batch: x.dim(0)?,
        inputs: x.dim(1)?,
        outputs: w.dim(0)?,
        bias: true,
        relu,
    };
    let theta = noise_theta(mu, log_sigma, draw)?.to_dtype(w.dtype())?;
    let theta = match theta_out {
        Some(t) if t.dims() == [g.outputs] => Tensor::cat(&[&theta, &t.to_dtype(w.dtype())?], 0)?,
        Some(t) => candle::bail!(
            "noise-linear: output noise of shape {:?} for {} outputs",
            t.dims(),
            g.outputs
        ),
        None => theta,
    };
    // Without a bias, zeros: a constant, so candle keeps no gradient for it (the op's
    // column sums for it are dropped).
    let b = match b {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(g.outputs, w.dtype(), w.device())?,
    };
    let op = NoiseLinearOp {
        x: x.contiguous()?,
        g,
        scaled_out: theta_out.is_some(),
    };
    w.contiguous()?.apply_op3(&theta, &b, op)
}

// ---------------------------------------------------------------------------------------
// Cross-entropy.

/// Mean cross-entropy of `logits` `(N, C)` against integer `labels` `(N,)` as one op:
/// forward a stable log-sum-exp per row, backward `(softmax − one-hot) / N`.
#[derive(Debug, Clone, Copy)]
struct CrossEntropyOp {
    rows: usize,
    classes: usize,
}

fn label_indices(s: &CpuStorage, l: &Layout, classes: usize) -> Result<Vec<usize>> {
    let labels: Vec<usize> = match s {
        CpuStorage::U32(v) => v[l.start_offset()..l.start_offset() + l.shape().elem_count()]
            .iter()
            .map(|&k| k as usize)
            .collect(),
        CpuStorage::I64(v) => v[l.start_offset()..l.start_offset() + l.shape().elem_count()]
            .iter()
            .map(|&k| usize::try_from(k).unwrap_or(usize::MAX))
            .collect(),
        CpuStorage::U8(v) => v[l.start_offset()..l.start_offset() + l.shape().elem_count()]
            .iter()
            .map(|&k| k as usize)
            .collect(),
        other => candle::bail!("cross-entropy: labels of dtype {:?}", other.dtype()),
    };
    if let Some((i, &k)) = labels.iter().enumerate().find(|(_, &k)| k >= classes) {
        candle::bail!("cross-entropy: label {k} at index {i} is not one of {classes} classes");
    }
    Ok(labels)
}

/// Per row: `(log Σ exp z, max z)`.
fn log_sum_exp<T: WithDType>(row: &[T]) -> (f64, f64) {
    let max = row
        .iter()
        .map(|v| v.to_f64())
        .fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = row.iter().map(|v| (v.to_f64() - max).exp()).sum();
    (max + sum.ln(), max)
}

impl CustomOp2 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "sbp-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        fn run<T: WithDType>(op: &CrossEntropyOp, z: &[T], labels: &[usize]) -> Result<Vec<T>> {
            let total: f64 = z
                .chunks(op.classes)
                .zip(labels)
                .map(|(row, &k)| log_sum_exp(row).0 - row[k].to_f64())
                .sum();
            Ok(vec![T::from_f64(total / op.rows as f64)])
        }
        let labels = label_indices(s2, l2, self.classes)?;
        let (out, _) = match s1 {
            CpuStorage::F32(_) => {
                let v = run::<f32>(self, data(s1, l1)?, &labels)?;
                (CpuStorage::F32(v), 1)
            }
            CpuStorage::F64(_) => {
                let v = run::<f64>(self, data(s1, l1)?, &labels)?;
                (CpuStorage::F64(v), 1)
            }
            other => candle::bail!("cross-entropy: no CPU kernel for {:?}", other.dtype()),
        };
        Ok((out, Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !needs_grad(logits) {
            return Ok((None, None));
        }
        let scale = grad.to_dtype(DType::F64)?.to_scalar::<f64>()? / self.rows as f64;
        let z: Vec<f64> = logits.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let k: Vec<u32> = labels.to_dtype(DType::U32)?.to_vec1()?;
        let mut d = vec![0.0; z.len()];
        for ((row, out), &k) in z
            .chunks(self.classes)
            .zip(d.chunks_mut(self.classes))
            .zip(&k)
        {
            let (lse, _) = log_sum_exp(row);
            for (o, &v) in out.iter_mut().zip(row) {
                *o = (v - lse).exp() * scale;
            }
            out[k as usize] -= scale;
        }
        let d = Tensor::from_vec(d, logits.shape(), logits.device())?.to_dtype(logits.dtype())?;
        Ok((Some(d), None))
    }
}

/// Mean cross-entropy of `logits` `(N, C)` against class indices `labels` `(N,)`, as
/// `candle_nn::loss::cross_entropy` computes it; on the CPU (f32/f64 logits) one op with
/// its own backward instead of a log-softmax, a gather and a mean, each differentiated.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let fits = logits.rank() == 2
        && labels.dims() == [logits.dim(0)?]
        && logits.dim(0)? > 0
        && logits.dim(1)? > 0
        && labels.device().is_cpu()
        && fast_path(&[logits]);
    if !fits {
        return candle_nn::loss::cross_entropy(logits, labels);
    }
    let op = CrossEntropyOp {
        rows: logits.dim(0)?,
        classes: logits.dim(1)?,
    };
    logits.contiguous()?.apply_op2(&labels.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Into a buffer that starts uninitialised, the product writes every value: the same
    /// values as into a zeroed one, and zeros for an empty inner dimension.
    #[test]
    fn products_into_uninitialised_buffers_write_every_value() {
        let value = |k: usize| ((k * 7919 % 1009) as f64 - 504.0) / 512.0;
        for (m, n, k) in [(3, 5, 7), (70, 40, 300), (4, 6, 0)] {
            let lhs: Vec<f64> = (0..m * k).map(value).collect();
            let rhs: Vec<f64> = (0..k * n).map(|j| value(j + 3)).collect();
            let mut want = vec![f64::NAN; m * n];
            matmul(
                (m, n, k),
                &mut want,
                false,
                (&lhs, k, 1),
                (&rhs, n, 1),
                true,
            )
            .unwrap();
            let mut got: Vec<f64> = Vec::with_capacity(m * n);
            let dst = &mut got.spare_capacity_mut()[..m * n];
            matmul_uninit((m, n, k), dst, (&lhs, k, 1), (&rhs, n, 1), true).unwrap();
            // SAFETY: the product wrote all `m·n` values (what the test checks).
            unsafe { got.set_len(m * n) };
            assert_eq!(got, want, "{m}x{n}x{k}");
            if k == 0 {
                assert!(got.iter().all(|&v| v == 0.0));
            }
        }
        let mut short: Vec<f64> = Vec::with_capacity(5);
        let dst = &mut short.spare_capacity_mut()[..5];
        assert!(
            matmul_uninit((2, 3, 1), dst, (&[1.0; 2], 1, 1), (&[1.0; 3], 3, 1), false).is_err()
        );
    }

    /// The interleaved sum against a running sum in f64: integers (exact either way) and
    /// random values (within the rounding of the sums), at every remainder of the lanes,
    /// with the term applied to both slices.
    #[test]
    fn interleaved_sums_add_up_every_term() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for len in [0, 1, 15, 16, 17, 33, 100, 576, 1000] {
            let ints: Vec<f32> = (0..len).map(|i| (i % 7) as f32 - 3.0).collect();
            let exact: f32 = ints.iter().map(|&v| f64::from(v)).sum::<f64>() as f32;
            assert_eq!(sum_lanes(&ints, &ints, |v, _| v), exact, "len {len}");
            let a: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
            let term = |x: f32, y: f32| if x > 0.0 { x * y } else { 0.0 };
            let want: f64 = a.iter().zip(&b).map(|(&x, &y)| f64::from(term(x, y))).sum();
            let got = f64::from(sum_lanes(&a, &b, term));
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "len {len}: {got} {want}"
            );
        }
    }

    /// Every filling of a 2×2 window from values with ties, both zeros, infinities and
    /// NaNs: the branch-free argmax picks the position the scanning one picks (the first
    /// maximum, or the last NaN), in windows at every offset of a plane.
    #[test]
    fn the_2x2_argmax_picks_what_the_general_one_picks() {
        let values = [0.0f64, -0.0, 1.0, -1.0, f64::INFINITY, f64::NAN];
        let g = PoolGeometry {
            planes: 1,
            h: 5,
            w: 7,
            kernel: 2,
            stride: 2,
            oh: 2,
            ow: 3,
        };
        let n = values.len();
        for code in 0..n.pow(4) {
            let window: Vec<f64> = (0..4).map(|k| values[code / n.pow(k) % n]).collect();
            for (oy, ox) in [(0, 0), (1, 2)] {
                let mut plane = vec![0.5f64; g.h * g.w];
                let top = 2 * oy * g.w + 2 * ox;
                for (k, &v) in window.iter().enumerate() {
                    plane[top + k / 2 * g.w + k % 2] = v;
                }
                assert_eq!(
                    g.argmax_2x2(&plane, oy, ox),
                    g.argmax_scan(&plane, oy, ox),
                    "window {window:?} at ({oy}, {ox})"
                );
            }
        }
    }

    #[test]
    fn adam_counts_subnormal_gradients_and_moments_as_zero() {
        let step = AdamStep {
            beta1: 0.9,
            beta2: 0.999,
            step_size: 1e-3,
            v_scale: 1.0,
            eps: 1e-8,
            decay: 1.0,
        };
        let tiny = f32::MIN_POSITIVE / 4.0; // subnormal
        let mut p = vec![1.0f32, 2.0, 3.0];
        let g = vec![0.0f32, tiny, 0.5];
        let mut m = vec![tiny, 0.0, 0.1];
        let mut v = vec![tiny, f32::MIN_POSITIVE / 2.0, 0.01];
        adam_f32(&step, &mut p, &g, &mut m, &mut v);
        // The first two parameters had nothing but subnormals: moments 0, no move.
        assert_eq!((m[0], v[0], p[0]), (0.0, 0.0, 1.0));
        assert_eq!((m[1], v[1], p[1]), (0.0, 0.0, 2.0));
        // The third is an ordinary Adam step.
        let (m2, v2) = (0.9f32 * 0.1 + 0.1 * 0.5, 0.999f32 * 0.01 + 0.001 * 0.25);
        assert_eq!((m[2], v[2]), (m2, v2));
        assert!((p[2] - (3.0 - 1e-3 * m2 / (v2.sqrt() + 1e-8))).abs() < 1e-7);
    }
}
