//! The SIMD kernels of `dense.rs`: a block of weight rows dotted with a few activation rows,
//! every sum in one vector of lanes then added across, so that each (weight row, activation
//! row) pair gets the same operations, and bits, however the rows are blocked.

use std::arch::x86_64::*;

/// A weight element type the AVX-512 pass widens to f32 as it loads it: f32, bf16 or f16
/// weights all multiply in f32 (a bf16 or f16 model reads half the bytes per token).
pub(crate) trait Widen: Copy + Send + Sync + 'static {
    /// Zero in this type, to pad a partial last vector.
    const ZERO: Self;
    /// Elements in 8 KB, the weights' prefetch distance.
    const AHEAD: usize = 8192 / std::mem::size_of::<Self>();
    /// The 16 values at `p` as f32.
    ///
    /// # Safety
    /// Sixteen values are readable at `p`; inlined only into functions that enable avx512f.
    unsafe fn widen16(p: *const Self) -> __m512;
}

impl Widen for f32 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    unsafe fn widen16(p: *const Self) -> __m512 {
        _mm512_loadu_ps(p)
    }
}

impl Widen for half::bf16 {
    const ZERO: Self = half::bf16::ZERO;
    /// A bf16 is the top half of the f32 with the same value: widen and shift, exactly.
    #[inline(always)]
    unsafe fn widen16(p: *const Self) -> __m512 {
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

impl Widen for half::f16 {
    const ZERO: Self = half::f16::ZERO;
    #[inline(always)]
    unsafe fn widen16(p: *const Self) -> __m512 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

/// The last `n < 16` values at `p` as f32, the missing lanes zero (so they add nothing).
///
/// # Safety
/// As [`Widen::widen16`], for `n` values.
#[inline(always)]
unsafe fn widen_tail<T: Widen>(p: *const T, n: usize) -> __m512 {
    let mut buf = [T::ZERO; 16];
    std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n);
    T::widen16(buf.as_ptr())
}

/// `R` weight rows (`w`, `w + cols`, ...) dotted with `N` activation rows: `acc[r][j]` sums
/// `w[r] · x[j]` in 16 f32 lanes over the columns, the last partial vector zero-padded, then
/// adds the lanes. Every (weight row, activation row) pair runs the same operations in the
/// same order whatever `R` and `N` are, so a row gives the same bits batched or alone.
///
/// # Safety
/// The CPU must support avx512f; `w` holds `R * cols` values and each `x[j]` `cols`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn dots_avx512<T: Widen, const R: usize, const N: usize>(
    w: *const T,
    cols: usize,
    x: [*const f32; N],
) -> [[f32; N]; R] {
    // One array of sums per weight row (at most four): with a two-dimensional array LLVM kept
    // the sums on the stack, a store per multiply-add. No closures: a closure does not inherit
    // `target_feature`, and LLVM left them as calls passing vectors through memory.
    const { assert!(R >= 1 && R <= 4) };
    let z = _mm512_setzero_ps();
    let (mut a0, mut a1, mut a2, mut a3) = ([z; N], [z; N], [z; N], [z; N]);
    macro_rules! columns {
        ($i:expr, |$p:ident| $load:expr) => {{
            let i = $i;
            let w0 = {
                let $p = w.add(i);
                $load
            };
            let w1 = if R > 1 {
                let $p = w.add(cols + i);
                $load
            } else {
                z
            };
            let w2 = if R > 2 {
                let $p = w.add(2 * cols + i);
                $load
            } else {
                z
            };
            let w3 = if R > 3 {
                let $p = w.add(3 * cols + i);
                $load
            } else {
                z
            };
            for j in 0..N {
                let xv = {
                    let $p = x[j].add(i);
                    $load
                };
                a0[j] = _mm512_fmadd_ps(w0, xv, a0[j]);
                if R > 1 {
                    a1[j] = _mm512_fmadd_ps(w1, xv, a1[j]);
                }
                if R > 2 {
                    a2[j] = _mm512_fmadd_ps(w2, xv, a2[j]);
                }
                if R > 3 {
                    a3[j] = _mm512_fmadd_ps(w3, xv, a3[j]);
                }
            }
        }};
    }
    let full = cols / 16 * 16;
    let mut i = 0;
    while i < full {
        // Each weight row's stream 8 KB ahead: at eight activation rows the hardware
        // prefetcher alone left the step waiting on DRAM (SmolLM2 f32, 43.6 -> 33.8 ms).
        for r in 0..R {
            _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add(r * cols + i + T::AHEAD) as *const i8);
        }
        columns!(i, |p| Widen::widen16(p));
        i += 16;
    }
    if full < cols {
        columns!(full, |p| widen_tail(p, cols - full));
    }
    let mut sums = [[0f32; N]; R];
    for j in 0..N {
        sums[0][j] = _mm512_reduce_add_ps(a0[j]);
        if R > 1 {
            sums[1][j] = _mm512_reduce_add_ps(a1[j]);
        }
        if R > 2 {
            sums[2][j] = _mm512_reduce_add_ps(a2[j]);
        }
        if R > 3 {
            sums[3][j] = _mm512_reduce_add_ps(a3[j]);
        }
    }
    sums
}

/// [`dots_avx512`] in AVX2's 8-lane vectors, for f32 weights (at most three weight rows: 16
/// registers).
///
/// # Safety
/// The CPU must support avx2 and fma; `w` holds `R * cols` values and each `x[j]` `cols`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn dots_avx2<const R: usize, const N: usize>(
    w: *const f32,
    cols: usize,
    x: [*const f32; N],
) -> [[f32; N]; R] {
    const { assert!(R >= 1 && R <= 3) };
    let z = _mm256_setzero_ps();
    let (mut a0, mut a1, mut a2) = ([z; N], [z; N], [z; N]);
    macro_rules! columns {
        ($i:expr, |$p:ident| $load:expr) => {{
            let i = $i;
            let w0 = {
                let $p = w.add(i);
                $load
            };
            let w1 = if R > 1 {
                let $p = w.add(cols + i);
                $load
            } else {
                z
            };
            let w2 = if R > 2 {
                let $p = w.add(2 * cols + i);
                $load
            } else {
                z
            };
            for j in 0..N {
                let xv = {
                    let $p = x[j].add(i);
                    $load
                };
                a0[j] = _mm256_fmadd_ps(w0, xv, a0[j]);
                if R > 1 {
                    a1[j] = _mm256_fmadd_ps(w1, xv, a1[j]);
                }
                if R > 2 {
                    a2[j] = _mm256_fmadd_ps(w2, xv, a2[j]);
                }
            }
        }};
    }
    let full = cols / 8 * 8;
    let mut i = 0;
    while i < full {
        if i % 16 == 0 {
            // One prefetch per cache line, 8 KB ahead, as the AVX-512 pass.
            for r in 0..R {
                _mm_prefetch::<_MM_HINT_T1>(w.wrapping_add(r * cols + i + 2048) as *const i8);
            }
        }
        columns!(i, |p| _mm256_loadu_ps(p));
        i += 8;
    }
    if full < cols {
        columns!(full, |p| {
            // The partial last vector zero-padded: the missing lanes add nothing.
            let mut buf = [0f32; 8];
            std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), cols - full);
            _mm256_loadu_ps(buf.as_ptr())
        });
    }
    let mut sums = [[0f32; N]; R];
    for j in 0..N {
        sums[0][j] = super::hsum(a0[j]);
        if R > 1 {
            sums[1][j] = super::hsum(a1[j]);
        }
        if R > 2 {
            sums[2][j] = super::hsum(a2[j]);
        }
    }
    sums
}
