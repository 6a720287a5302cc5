//! The SIMD passes of `dense.rs`: a block of weight rows dotted with a few activation rows,
//! every sum in one vector of lanes then added across, so that each (weight row, activation
//! row) pair gets the same operations, and bits, however the rows are blocked. One generic
//! body ([`dots`]) serves AVX-512 and AVX2 through the [`Vector`] and [`Weight`] traits.

use std::arch::x86_64::*;

/// An f32 vector the passes accumulate in. Its methods are only inlined into functions that
/// enable the instructions they use.
pub(crate) trait Vector: Copy {
    /// f32 lanes per vector.
    const LANES: usize;
    /// All lanes zero.
    unsafe fn zero() -> Self;
    /// `LANES` f32 values at `p`.
    unsafe fn load(p: *const f32) -> Self;
    /// `a * b + c`, rounded once.
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self;
    /// The lanes added together.
    unsafe fn sum(self) -> f32;
}

/// A weight element type that widens to f32 as a pass loads it: f32, bf16 and f16 (half the
/// bytes per token), in either width.
pub(crate) trait Weight<V: Vector>: Copy + Send + Sync + 'static {
    /// Zero in this type, to pad a partial last vector.
    const ZERO: Self;
    /// `V::LANES` values at `p` as f32 (exactly: every bf16 and f16 is an f32).
    unsafe fn widen(p: *const Self) -> V;
}

/// Sixteen f32 lanes (AVX-512F).
#[derive(Clone, Copy)]
pub(crate) struct V512(__m512);

impl Vector for V512 {
    const LANES: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Self(_mm512_setzero_ps())
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Self(_mm512_loadu_ps(p))
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        Self(_mm512_fmadd_ps(a.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        _mm512_reduce_add_ps(self.0)
    }
}

/// Eight f32 lanes (AVX2 + FMA).
#[derive(Clone, Copy)]
pub(crate) struct V256(__m256);

impl Vector for V256 {
    const LANES: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        Self(_mm256_setzero_ps())
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        Self(_mm256_loadu_ps(p))
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        Self(_mm256_fmadd_ps(a.0, b.0, c.0))
    }
    #[inline(always)]
    unsafe fn sum(self) -> f32 {
        super::hsum(self.0)
    }
}

impl<V: Vector> Weight<V> for f32 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    unsafe fn widen(p: *const Self) -> V {
        V::load(p)
    }
}

impl Weight<V512> for half::bf16 {
    const ZERO: Self = half::bf16::ZERO;
    /// A bf16 is the top half of the f32 with the same value: widen and shift.
    #[inline(always)]
    unsafe fn widen(p: *const Self) -> V512 {
        let h = _mm256_loadu_si256(p as *const __m256i);
        V512(_mm512_castsi512_ps(_mm512_slli_epi32::<16>(
            _mm512_cvtepu16_epi32(h),
        )))
    }
}

impl Weight<V512> for half::f16 {
    const ZERO: Self = half::f16::ZERO;
    #[inline(always)]
    unsafe fn widen(p: *const Self) -> V512 {
        V512(_mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)))
    }
}

impl Weight<V256> for half::bf16 {
    const ZERO: Self = half::bf16::ZERO;
    #[inline(always)]
    unsafe fn widen(p: *const Self) -> V256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        V256(_mm256_castsi256_ps(_mm256_slli_epi32::<16>(
            _mm256_cvtepu16_epi32(h),
        )))
    }
}

impl Weight<V256> for half::f16 {
    const ZERO: Self = half::f16::ZERO;
    #[inline(always)]
    unsafe fn widen(p: *const Self) -> V256 {
        V256(_mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)))
    }
}

/// The `n < V::LANES` values at `p` as `T::widen` gives them (weights, or f32 activations),
/// the missing lanes zero (so they add nothing).
#[inline(always)]
unsafe fn widen_tail<V: Vector, T: Weight<V>>(p: *const T, n: usize) -> V {
    let mut buf = [T::ZERO; 16];
    std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n);
    T::widen(buf.as_ptr())
}

/// `R` weight rows (`w`, `w + cols`, ...) dotted with `N` activation rows: `acc[r][j]` sums
/// `w[r] · x[j]` in `V::LANES` f32 lanes over the columns, the last partial vector
/// zero-padded, then adds the lanes. Every (weight row, activation row) pair runs the same
/// operations in the same order whatever `R` and `N` are, so a row gives the same bits batched
/// or alone.
///
/// # Safety
/// Only inlined into a function that enables `V`'s instructions; `w` holds `R * cols` values
/// and each `x[j]` `cols`.
#[inline(always)]
unsafe fn dots<V: Vector, T: Weight<V>, const R: usize, const N: usize>(
    w: *const T,
    cols: usize,
    x: [*const f32; N],
) -> [[f32; N]; R] {
    // One array of sums per weight row (at most four): with a two-dimensional array LLVM kept
    // the sums on the stack, a store per multiply-add. No closures: a closure does not inherit
    // `target_feature`, and LLVM left them as calls passing vectors through memory.
    const { assert!(R >= 1 && R <= 4) };
    let z = V::zero();
    let (mut a0, mut a1, mut a2, mut a3) = ([z; N], [z; N], [z; N], [z; N]);
    macro_rules! columns {
        ($i:expr, |$p:ident| $wload:expr, |$q:ident| $xload:expr) => {{
            let i = $i;
            // Pointer arithmetic only: no vector code in this closure.
            let row = |r: usize| w.add(r * cols + i);
            let w0 = {
                let $p = row(0);
                $wload
            };
            let w1 = if R > 1 {
                let $p = row(1);
                $wload
            } else {
                z
            };
            let w2 = if R > 2 {
                let $p = row(2);
                $wload
            } else {
                z
            };
            let w3 = if R > 3 {
                let $p = row(3);
                $wload
            } else {
                z
            };
            for j in 0..N {
                let xv = {
                    let $q = x[j].add(i);
                    $xload
                };
                a0[j] = V::fmadd(w0, xv, a0[j]);
                if R > 1 {
                    a1[j] = V::fmadd(w1, xv, a1[j]);
                }
                if R > 2 {
                    a2[j] = V::fmadd(w2, xv, a2[j]);
                }
                if R > 3 {
                    a3[j] = V::fmadd(w3, xv, a3[j]);
                }
            }
        }};
    }
    let full = cols / V::LANES * V::LANES;
    // Elements of `T` in 8 KB, and in one cache line.
    let (ahead, line) = (8192 / size_of::<T>(), 64 / size_of::<T>());
    let mut i = 0;
    while i < full {
        if i % line == 0 {
            // Each weight row's stream 8 KB ahead, once per cache line: at eight activation
            // rows the hardware prefetcher alone left the step waiting on DRAM (SmolLM2 f32,
            // 43.6 -> 33.8 ms).
            for r in 0..R {
                _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add(r * cols + i + ahead) as *const i8);
            }
        }
        columns!(i, |p| T::widen(p), |q| V::load(q));
        i += V::LANES;
    }
    if full < cols {
        let n = cols - full;
        columns!(full, |p| widen_tail(p, n), |q| widen_tail::<V, f32>(q, n));
    }
    let mut sums = [[0f32; N]; R];
    for j in 0..N {
        sums[0][j] = a0[j].sum();
        if R > 1 {
            sums[1][j] = a1[j].sum();
        }
        if R > 2 {
            sums[2][j] = a2[j].sum();
        }
        if R > 3 {
            sums[3][j] = a3[j].sum();
        }
    }
    sums
}

/// [`dots`] in 512-bit vectors, up to four weight rows.
///
/// # Safety
/// The CPU must support avx512f; `w` holds `R * cols` values and each `x[j]` `cols`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn dots_avx512<T: Weight<V512>, const R: usize, const N: usize>(
    w: *const T,
    cols: usize,
    x: [*const f32; N],
) -> [[f32; N]; R] {
    dots::<V512, T, R, N>(w, cols, x)
}

/// [`dots`] in 256-bit vectors, up to three weight rows (AVX2 has 16 registers).
///
/// # Safety
/// The CPU must support avx2, fma and f16c; `w` holds `R * cols` values and each `x[j]`
/// `cols`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dots_avx2<T: Weight<V256>, const R: usize, const N: usize>(
    w: *const T,
    cols: usize,
    x: [*const f32; N],
) -> [[f32; N]; R] {
    const { assert!(R <= 3) };
    dots::<V256, T, R, N>(w, cols, x)
}
