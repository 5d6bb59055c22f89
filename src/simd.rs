//! Element-wise loops compiled for the widest vector unit the CPU has.
//!
//! The crate builds for baseline x86-64, where the compiler vectorises plain loops with
//! 4-lane SSE. [`wide!`](crate::simd::wide) runs a block inside a function compiled for
//! AVX-512 (or AVX2) when the CPU has it: the block, inlined there, is vectorised 16 (or
//! 8) lanes wide. Neither instruction set changes a result: without fast-math flags the
//! compiler neither fuses nor reorders floating-point operations, so the values are the
//! same bit for bit on every machine.

/// Runs a block compiled for AVX-512 or AVX2 where the CPU has them, and as it is
/// elsewhere; evaluates to the block's value.
///
/// The block is a closure marked `#[inline(always)]`: the compiler would otherwise leave
/// a large one out of line, compiled for baseline x86-64, and the wrapper's instruction
/// set would not reach its loops.
macro_rules! wide {
    ($($body:tt)*) => {
        match $crate::simd::level() {
            #[cfg(target_arch = "x86_64")]
            $crate::simd::Level::Avx512 => {
                // SAFETY: `level` found AVX-512F on this CPU.
                unsafe { $crate::simd::avx512(#[inline(always)] || { $($body)* }) }
            }
            #[cfg(target_arch = "x86_64")]
            $crate::simd::Level::Avx2 => {
                // SAFETY: `level` found AVX2 on this CPU.
                unsafe { $crate::simd::avx2(#[inline(always)] || { $($body)* }) }
            }
            // A closure here too, so that `return` in the block means the same everywhere.
            #[allow(clippy::redundant_closure_call)]
            _ => (|| { $($body)* })(),
        }
    };
}
pub(crate) use wide;

/// The widest vector unit present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Level {
    /// Neither of the others (or not x86-64).
    Baseline,
    /// AVX2, 8 lanes of f32.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2,
    /// AVX-512F, 16 lanes of f32.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx512,
}

/// This CPU's [`Level`], detected once.
#[inline(always)]
pub(crate) fn level() -> Level {
    static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(detect)
}

fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Level::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

/// Calls `f` from code compiled for AVX-512F.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2")]
pub(crate) unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Calls `f` from code compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    /// A kernel with what the crate's loops do: products, sums, a division, a square
    /// root, a select on the sign and flushing of subnormals. Always inlined, so that the
    /// wide copy is compiled for the wide instruction set.
    #[inline(always)]
    fn kernel(p: &mut [f32], g: &[f32], m: &mut [f32], relu: bool) {
        let normal = |x: f32| if x.abs() < f32::MIN_POSITIVE { 0.0 } else { x };
        for ((p, &g), m) in p.iter_mut().zip(g).zip(m) {
            *m = normal(0.9 * *m + 0.1 * g);
            let step = *m / ((g * g).sqrt() * 0.5 + 1e-8);
            *p = if relu && *p < 0.0 {
                0.0
            } else {
                *p - 1e-3 * step
            };
        }
    }

    /// The same values, bit for bit, through the widest vector unit and through baseline
    /// code, on lengths that leave every remainder of 16 and 8 lanes.
    #[test]
    fn wide_code_gives_the_baseline_bits() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for len in [0, 1, 7, 8, 15, 16, 17, 31, 100, 1000] {
            let values = |rng: &mut rand::rngs::StdRng| -> Vec<f32> {
                (0..len)
                    .map(|i| match i % 5 {
                        0 => 1e-39 * rng.random_range(-1.0..1.0), // subnormal
                        _ => rng.random_range(-3.0..3.0),
                    })
                    .collect()
            };
            let (p0, g, m0) = (values(&mut rng), values(&mut rng), values(&mut rng));
            for relu in [false, true] {
                let (mut p_base, mut m_base) = (p0.clone(), m0.clone());
                kernel(&mut p_base, &g, &mut m_base, relu);
                let (mut p_wide, mut m_wide) = (p0.clone(), m0.clone());
                super::wide! { kernel(&mut p_wide, &g, &mut m_wide, relu) };
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&p_wide), bits(&p_base), "len {len} relu {relu}");
                assert_eq!(bits(&m_wide), bits(&m_base), "len {len} relu {relu}");
            }
        }
    }
}
