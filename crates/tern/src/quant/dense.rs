//! f32 weights times a few activation rows: batched decode and short prompts on the CPU.
//!
//! For 2–63 rows candle's GEMM packs the whole weight on every call and ran a batch of 2
//! slower than two single rows (SmolLM2 f32: 23 vs 31 tok/s). Decode is bound by reading the
//! weights, so this reads each weight row once and dots it with every activation row.
//!
//! With AVX-512 a pass holds a block of weight rows times up to eight activation rows in
//! registers (`dots_avx512`): one load of each operand serves several multiply-adds, where
//! the AVX2 pass spent five loads on four, and the weights are prefetched well ahead. On
//! SmolLM2 f32 (2-core AVX-512 VM) that took eight decode rows from 50 to 29 ms a step and
//! one row from 24 to 18.5 ms (the DRAM rate).

use super::{fill_grouped, par_rows, use_avx2, ROW_GROUP};
use crate::error::Result;
use candle_core::{DType, Tensor};

/// Weight rows per pool task: sixteen rows of SmolLM2's widest input (1,536) are 96 KB, which
/// stay in L2 while each group of eight activation rows passes over them.
const ROWS_PER_TASK: usize = 16;
/// Activation rows per AVX-512 pass.
#[cfg(target_arch = "x86_64")]
const X_ROWS: usize = 8;
/// Most activation rows worth sending here rather than to candle's GEMM. Below this the GEMM's
/// packing of the whole weight on every call costs more than it saves; above, its blocking
/// wins (SmolLM2 f32 prompt prefill on a 2-core AVX-512 VM: 32 tokens 60 vs 192 ms, 256
/// tokens 409 vs 464 ms, 512 tokens 959 vs 719 ms).
pub const MAX_ROWS: usize = 256;

fn dot_scalar(w: &[f32], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(a, b)| a * b).sum()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4_avx2(w: &[f32], x: [&[f32]; ROW_GROUP]) -> [f32; ROW_GROUP] {
    use std::arch::x86_64::*;
    let n = w.len() / 8 * 8;
    let mut acc = [_mm256_setzero_ps(); ROW_GROUP];
    for i in (0..n).step_by(8) {
        let wv = _mm256_loadu_ps(w.as_ptr().add(i));
        for k in 0..ROW_GROUP {
            acc[k] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[k].as_ptr().add(i)), acc[k]);
        }
    }
    std::array::from_fn(|k| super::hsum(acc[k]) + dot_scalar(&w[n..], &x[k][n..]))
}

/// One row, summed in the same order as [`dot4_avx2`], so a row gives the same bits batched
/// or alone.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(w: &[f32], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = w.len() / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    for i in (0..n).step_by(8) {
        acc = _mm256_fmadd_ps(
            _mm256_loadu_ps(w.as_ptr().add(i)),
            _mm256_loadu_ps(x.as_ptr().add(i)),
            acc,
        );
    }
    super::hsum(acc) + dot_scalar(&w[n..], &x[n..])
}

/// A weight element type the AVX-512 pass widens to f32 as it loads it: f32, bf16 or f16
/// weights all multiply in f32 (a bf16 or f16 model reads half the bytes per token).
#[cfg(target_arch = "x86_64")]
pub(crate) trait Widen: Copy + Send + Sync + 'static {
    /// Zero in this type, to pad a partial last vector.
    const ZERO: Self;
    /// Elements in 8 KB, the weights' prefetch distance.
    const AHEAD: usize = 8192 / std::mem::size_of::<Self>();
    /// The 16 values at `p` as f32.
    ///
    /// # Safety
    /// Sixteen values are readable at `p`; inlined only into functions that enable avx512f.
    unsafe fn widen16(p: *const Self) -> std::arch::x86_64::__m512;
}

#[cfg(target_arch = "x86_64")]
impl Widen for f32 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    unsafe fn widen16(p: *const Self) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

#[cfg(target_arch = "x86_64")]
impl Widen for half::bf16 {
    const ZERO: Self = half::bf16::ZERO;
    /// A bf16 is the top half of the f32 with the same value: widen and shift, exactly.
    #[inline(always)]
    unsafe fn widen16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
}

#[cfg(target_arch = "x86_64")]
impl Widen for half::f16 {
    const ZERO: Self = half::f16::ZERO;
    #[inline(always)]
    unsafe fn widen16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

/// The last `n < 16` values at `p` as f32, the missing lanes zero (so they add nothing).
///
/// # Safety
/// As [`Widen::widen16`], for `n` values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn widen_tail<T: Widen>(p: *const T, n: usize) -> std::arch::x86_64::__m512 {
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
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_avx512<T: Widen, const R: usize, const N: usize>(
    w: *const T,
    cols: usize,
    x: [*const f32; N],
) -> [[f32; N]; R] {
    use std::arch::x86_64::*;
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

/// Rows `task` of the product, activation rows `j..j + N`, `R` weight rows per pass (the rest
/// one by one), written to `out[j * rows + r]`.
///
/// # Safety
/// The CPU must support avx512f; `out` has room for `[m, rows]` with `j + N <= m`, and no
/// other thread writes these elements.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn block_avx512<T: Widen, const R: usize, const N: usize>(
    w: &[T],
    rows: usize,
    cols: usize,
    xs: &[f32],
    j: usize,
    task: std::ops::Range<usize>,
    out: *mut f32,
) {
    let x: [*const f32; N] = std::array::from_fn(|k| xs.as_ptr().add((j + k) * cols));
    let mut r = task.start;
    while r < task.end {
        let put = |r: usize, d: &[f32; N]| {
            for (k, v) in d.iter().enumerate() {
                *out.add((j + k) * rows + r) = *v;
            }
        };
        if r + R <= task.end {
            let d = dots_avx512::<T, R, N>(w.as_ptr().add(r * cols), cols, x);
            for (i, d) in d.iter().enumerate() {
                put(r + i, d);
            }
            r += R;
        } else {
            put(
                r,
                &dots_avx512::<T, 1, N>(w.as_ptr().add(r * cols), cols, x)[0],
            );
            r += 1;
        }
    }
}

/// [`matmul_rows`] with AVX-512: each task takes [`ROWS_PER_TASK`] weight rows and passes
/// over them once per [`X_ROWS`] activation rows.
#[cfg(target_arch = "x86_64")]
fn matmul_rows_avx512<T: Widen>(
    w: &[T],
    rows: usize,
    cols: usize,
    xs: &[f32],
    m: usize,
    out: &mut [f32],
) {
    // The kernels read and write through raw pointers on these bounds.
    assert_eq!(
        (w.len(), xs.len(), out.len()),
        (rows * cols, m * cols, rows * m)
    );
    let out_ptr = out.as_mut_ptr() as usize;
    super::par_ranges(rows, ROWS_PER_TASK, |task| {
        let out = out_ptr as *mut f32;
        let mut j = 0;
        while j < m {
            let n = (m - j).min(X_ROWS);
            let t = task.clone();
            // SAFETY: `use_avx512` said yes; tasks cover disjoint weight rows, so each output
            // element has one writer, and `out` outlives `par_ranges`, which returns when every
            // task is done. Four weight rows per pass up to six activation rows (24 sums and
            // five operands in the 32 registers), three for seven or eight.
            unsafe {
                match n {
                    1 => block_avx512::<T, 4, 1>(w, rows, cols, xs, j, t, out),
                    2 => block_avx512::<T, 4, 2>(w, rows, cols, xs, j, t, out),
                    3 => block_avx512::<T, 4, 3>(w, rows, cols, xs, j, t, out),
                    4 => block_avx512::<T, 4, 4>(w, rows, cols, xs, j, t, out),
                    5 => block_avx512::<T, 4, 5>(w, rows, cols, xs, j, t, out),
                    6 => block_avx512::<T, 4, 6>(w, rows, cols, xs, j, t, out),
                    7 => block_avx512::<T, 3, 7>(w, rows, cols, xs, j, t, out),
                    _ => block_avx512::<T, 3, 8>(w, rows, cols, xs, j, t, out),
                }
            }
            j += n;
        }
    });
}

/// `out[j * rows + r] = w[r] · xs[j]` for `w` `[rows, cols]` and `xs` `[m, cols]`.
pub fn matmul_rows(w: &[f32], rows: usize, cols: usize, xs: &[f32], m: usize, out: &mut [f32]) {
    assert_eq!((w.len(), xs.len()), (rows * cols, m * cols));
    assert_eq!(out.len(), rows * m);
    #[cfg(target_arch = "x86_64")]
    if super::use_avx512() {
        return matmul_rows_avx512(w, rows, cols, xs, m, out);
    }
    matmul_rows_avx2(w, rows, cols, xs, m, out)
}

/// [`matmul_rows`] without AVX-512: four activation rows per pass with AVX2, else scalar.
fn matmul_rows_avx2(w: &[f32], rows: usize, cols: usize, xs: &[f32], m: usize, out: &mut [f32]) {
    let avx2 = use_avx2();
    par_rows(out, rows, m, ROWS_PER_TASK, |r, buf| {
        let w = &w[r * cols..(r + 1) * cols];
        let x = |j: usize| &xs[j * cols..(j + 1) * cols];
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: only taken when the CPU reports avx2 and fma.
            let four = |j: usize| unsafe { dot4_avx2(w, std::array::from_fn(|k| x(j + k))) };
            // SAFETY: as above.
            let one = |j: usize| unsafe { dot_avx2(w, x(j)) };
            return fill_grouped(buf, four, one);
        }
        let _ = avx2;
        for (j, o) in buf.iter_mut().enumerate() {
            *o = dot_scalar(w, x(j));
        }
    });
}

/// `x W^T` on the CPU for a weight `[rows, cols]` and activations `[.., cols]` of the same
/// dtype: f32, or bf16 / f16 where AVX-512 is present (multiplied in f32, the result rounded
/// to that dtype once; candle's bf16 product decoded SmolLM2 at 7.5 tok/s). `None` for any
/// other kind of tensor.
pub fn forward(w: &Tensor, x: &Tensor) -> Result<Option<Tensor>> {
    if w.dtype() != x.dtype() || !w.device().is_cpu() {
        return Ok(None);
    }
    let half = matches!(w.dtype(), DType::BF16 | DType::F16);
    if !(w.dtype() == DType::F32 || half && super::use_avx512()) {
        return Ok(None);
    }
    let (rows, cols) = w.dims2()?;
    let (storage, layout) = w.storage_and_layout();
    let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    else {
        return Ok(None);
    };
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let m = xs.len() / cols;
    let mut out = vec![0f32; m * rows];
    match w.dtype() {
        DType::F32 => matmul_rows(
            &cpu.as_slice::<f32>()?[start..end],
            rows,
            cols,
            &xs,
            m,
            &mut out,
        ),
        #[cfg(target_arch = "x86_64")]
        DType::BF16 => {
            let w = &cpu.as_slice::<half::bf16>()?[start..end];
            matmul_rows_avx512(w, rows, cols, &xs, m, &mut out)
        }
        #[cfg(target_arch = "x86_64")]
        DType::F16 => {
            let w = &cpu.as_slice::<half::f16>()?[start..end];
            matmul_rows_avx512(w, rows, cols, &xs, m, &mut out)
        }
        _ => return Ok(None),
    }
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = rows;
    Ok(Some(
        Tensor::from_vec(out, dims, x.device())?.to_dtype(x.dtype())?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A product path: `matmul_rows`'s arguments.
    type Path = fn(&[f32], usize, usize, &[f32], usize, &mut [f32]);

    /// Every path this CPU can run: AVX-512 where present, and the AVX2 (or scalar) one.
    fn paths() -> Vec<(&'static str, Path)> {
        let mut p: Vec<(&'static str, Path)> = vec![("avx2", matmul_rows_avx2)];
        #[cfg(target_arch = "x86_64")]
        if crate::quant::use_avx512() {
            p.push(("avx512", matmul_rows_avx512));
        }
        p
    }

    #[test]
    fn matches_candle_matmul_for_every_row_count() {
        // 37 rows leave tasks and weight-row blocks with remainders; 100 columns end in a
        // partial vector, 64 do not; up to 19 activation rows cross two passes of eight.
        for (rows, cols) in [(37, 100), (21, 64)] {
            let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
            let wv = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for m in 1..=19 {
                let x = Tensor::randn(0f32, 1.0, (m, cols), &Device::Cpu).unwrap();
                let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let want = x.matmul(&w.t().unwrap()).unwrap();
                let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for (name, path) in paths() {
                    let mut got = vec![0f32; m * rows];
                    path(&wv, rows, cols, &xv, m, &mut got);
                    let d = got
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0, f32::max);
                    assert!(d < 1e-4, "{name} [{rows}, {cols}] m={m}: {d}");
                    // Each row gives the same bits as alone.
                    for j in 0..m {
                        let mut one = vec![0f32; rows];
                        path(&wv, rows, cols, &xv[j * cols..(j + 1) * cols], 1, &mut one);
                        let batched: Vec<f32> = (0..rows).map(|r| got[j * rows + r]).collect();
                        assert_eq!(one, batched, "{name} [{rows}, {cols}] m={m} row {j}");
                    }
                }
            }
        }
    }

    /// bf16 and f16 weights widen exactly to f32, so their products must equal, bit for bit,
    /// the f32 path's over the widened weights; `forward` then rounds once to the dtype.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn half_weights_give_the_f32_paths_bits() {
        if !crate::quant::use_avx512() {
            eprintln!("skipped: no AVX-512 (bf16 and f16 weights stay on candle's product)");
            return;
        }
        let (rows, cols, m) = (37, 100, 11);
        let x = Tensor::randn(0f32, 1.0, (m, cols), &Device::Cpu).unwrap();
        let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let wide = w.to_dtype(DType::F32).unwrap();
            let widev = wide.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut want = vec![0f32; m * rows];
            matmul_rows_avx512(&widev, rows, cols, &xv, m, &mut want);
            let mut got = vec![0f32; m * rows];
            match dtype {
                DType::BF16 => {
                    let wv = w.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap();
                    matmul_rows_avx512(&wv, rows, cols, &xv, m, &mut got);
                }
                _ => {
                    let wv = w.flatten_all().unwrap().to_vec1::<half::f16>().unwrap();
                    matmul_rows_avx512(&wv, rows, cols, &xv, m, &mut got);
                }
            }
            assert_eq!(got, want, "{dtype:?}");
            // Through `forward`, in the dtype: the f32 sums rounded once.
            let xd = x.to_dtype(dtype).unwrap();
            let y = forward(&w, &xd).unwrap().expect("a half-width path");
            assert_eq!(y.dtype(), dtype);
            let exact = xd
                .to_dtype(DType::F32)
                .unwrap()
                .matmul(&wide.t().unwrap())
                .unwrap();
            let d = crate::test_util::max_abs_diff(&y.to_dtype(DType::F32).unwrap(), &exact);
            // One rounding of |y| < ~40 to 8 (bf16) or 11 (f16) significant bits.
            assert!(d < 0.25, "{dtype:?}: {d}");
        }
    }

    #[test]
    fn forward_keeps_the_leading_dims() {
        let w = Tensor::randn(0f32, 1.0, (5, 16), &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 16), &Device::Cpu).unwrap();
        let got = forward(&w, &x).unwrap().unwrap();
        let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        assert_eq!(got.dims(), &[2, 3, 5]);
        assert!(crate::test_util::max_abs_diff(&got, &want) < 1e-5);
    }
}
