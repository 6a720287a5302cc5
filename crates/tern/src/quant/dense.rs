//! Float weights times a few activation rows: batched decode and short prompts on the CPU.
//!
//! For 2–63 rows candle's GEMM packs the whole weight on every call and ran a batch of 2
//! slower than two single rows (SmolLM2 f32: 23 vs 31 tok/s). Decode is bound by reading the
//! weights, so this reads each weight row once and dots it with every activation row.
//!
//! A pass holds a block of weight rows times several activation rows in registers
//! (`dense_kernels.rs`: 3-4 x 8 with AVX-512, 3 x 4 with AVX2), so one load of each operand
//! serves several multiply-adds, and prefetches the weights 8 KB ahead. On SmolLM2 f32 (2-core
//! AVX-512 VM) that took eight decode rows from 50 to 29 ms a step and one row from 24 to 18.5
//! ms (the DRAM rate); the AVX2 pass alone, 36 and 19-20 ms (it had spent five loads on four
//! multiply-adds, with no prefetch). bf16 and f16 weights widen to f32 as they load.

#[cfg(target_arch = "x86_64")]
use super::dense_kernels::{dots_avx2, dots_avx512, Weight, V256, V512};
use super::{par_rows, use_avx2};
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

/// A weight element the product takes: f32, or bf16 / f16 widened to f32 as it is read
/// (exactly: every bf16 and f16 value is an f32 value).
#[cfg(target_arch = "x86_64")]
pub(crate) trait Element: Weight<V512> + Weight<V256> + Widen {}
#[cfg(target_arch = "x86_64")]
impl<T: Weight<V512> + Weight<V256> + Widen> Element for T {}
/// A weight element the product takes: f32, or bf16 / f16 widened to f32 as it is read.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) trait Element: Widen {}
#[cfg(not(target_arch = "x86_64"))]
impl<T: Widen> Element for T {}

/// One weight value as f32 (the scalar path).
pub(crate) trait Widen: Copy + Send + Sync + 'static {
    /// The value in f32.
    fn f32(self) -> f32;
}

impl Widen for f32 {
    fn f32(self) -> f32 {
        self
    }
}

impl Widen for half::bf16 {
    fn f32(self) -> f32 {
        self.to_f32()
    }
}

impl Widen for half::f16 {
    fn f32(self) -> f32 {
        self.to_f32()
    }
}

fn dot_scalar<T: Widen>(w: &[T], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(a, b)| a.f32() * b).sum()
}

/// A pass's kernel: `R` weight rows (`w`, `w + cols`, ...) dotted with `N` activation rows.
#[cfg(target_arch = "x86_64")]
type Dots<T, const R: usize, const N: usize> =
    unsafe fn(*const T, usize, [*const f32; N]) -> [[f32; N]; R];

/// One task's share of the product: weight rows `task` times activation rows `j..`, written to
/// `out[j * rows + r]`.
#[cfg(target_arch = "x86_64")]
struct Pass<'a, T> {
    w: &'a [T],
    rows: usize,
    cols: usize,
    xs: &'a [f32],
    j: usize,
    task: std::ops::Range<usize>,
    out: *mut f32,
}

/// Runs `p` for activation rows `p.j..p.j + N`: `R` weight rows per call of `dots`, the rest
/// one by one through `one`.
///
/// # Safety
/// The CPU must support what the kernels need; `p.out` has room for `[m, rows]` with
/// `p.j + N <= m`, and no other thread writes these elements.
#[cfg(target_arch = "x86_64")]
unsafe fn block<T, const R: usize, const N: usize>(
    (dots, one): (Dots<T, R, N>, Dots<T, 1, N>),
    p: &Pass<'_, T>,
) {
    let (w, cols, j) = (p.w.as_ptr(), p.cols, p.j);
    let x: [*const f32; N] = std::array::from_fn(|k| p.xs.as_ptr().add((j + k) * cols));
    let put = |r: usize, d: &[f32; N]| {
        for (k, v) in d.iter().enumerate() {
            *p.out.add((j + k) * p.rows + r) = *v;
        }
    };
    let mut r = p.task.start;
    while r < p.task.end {
        if r + R <= p.task.end {
            for (i, d) in dots(w.add(r * cols), cols, x).iter().enumerate() {
                put(r + i, d);
            }
            r += R;
        } else {
            put(r, &one(w.add(r * cols), cols, x)[0]);
            r += 1;
        }
    }
}

/// [`block`] through kernel `$dots` with `$r` weight rows and `$n` activation rows per call.
#[cfg(target_arch = "x86_64")]
macro_rules! run {
    ($dots:ident::<$t:ty>, $p:expr, $r:literal, $n:literal) => {
        block::<$t, $r, $n>(($dots::<$t, $r, $n>, $dots::<$t, 1, $n>), $p)
    };
}

/// `out[j * rows + r] = w[r] · xs[j]`: runs `pass(n, p)` for every task of [`ROWS_PER_TASK`]
/// weight rows and every run of `n <= width` activation rows, on candle's worker pool.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn par_passes<T: Sync>(
    w: &[T],
    rows: usize,
    cols: usize,
    xs: &[f32],
    m: usize,
    out: &mut [f32],
    width: usize,
    pass: impl Fn(usize, &Pass<'_, T>) + Sync,
) {
    // The kernels read and write through raw pointers on these bounds.
    assert_eq!(
        (w.len(), xs.len(), out.len()),
        (rows * cols, m * cols, rows * m)
    );
    let out_ptr = out.as_mut_ptr() as usize;
    super::par_ranges(rows, ROWS_PER_TASK, |task| {
        let mut j = 0;
        while j < m {
            let n = (m - j).min(width);
            let (out, task) = (out_ptr as *mut f32, task.clone());
            pass(
                n,
                &Pass {
                    w,
                    rows,
                    cols,
                    xs,
                    j,
                    task,
                    out,
                },
            );
            j += n;
        }
    });
}

/// [`matmul_rows`] with AVX-512: each task takes [`ROWS_PER_TASK`] weight rows and passes
/// over them once per [`X_ROWS`] activation rows.
#[cfg(target_arch = "x86_64")]
fn matmul_rows_avx512<T: Weight<V512>>(
    w: &[T],
    rows: usize,
    cols: usize,
    xs: &[f32],
    m: usize,
    out: &mut [f32],
) {
    par_passes(w, rows, cols, xs, m, out, X_ROWS, |n, p| {
        // SAFETY: `use_avx512` said yes; tasks cover disjoint weight rows, so each output
        // element has one writer, and `out` outlives `par_passes`, which returns when every
        // task is done. Four weight rows per pass up to six activation rows (24 sums and five
        // operands in the 32 registers), three for seven or eight.
        unsafe {
            match n {
                1 => run!(dots_avx512::<T>, p, 4, 1),
                2 => run!(dots_avx512::<T>, p, 4, 2),
                3 => run!(dots_avx512::<T>, p, 4, 3),
                4 => run!(dots_avx512::<T>, p, 4, 4),
                5 => run!(dots_avx512::<T>, p, 4, 5),
                6 => run!(dots_avx512::<T>, p, 4, 6),
                7 => run!(dots_avx512::<T>, p, 3, 7),
                _ => run!(dots_avx512::<T>, p, 3, 8),
            }
        }
    });
}

/// `out[j * rows + r] = w[r] · xs[j]` for `w` `[rows, cols]` and `xs` `[m, cols]`.
pub(crate) fn matmul_rows<T: Element>(
    w: &[T],
    rows: usize,
    cols: usize,
    xs: &[f32],
    m: usize,
    out: &mut [f32],
) {
    assert_eq!((w.len(), xs.len()), (rows * cols, m * cols));
    assert_eq!(out.len(), rows * m);
    #[cfg(target_arch = "x86_64")]
    if super::use_avx512() {
        return matmul_rows_avx512(w, rows, cols, xs, m, out);
    }
    matmul_rows_avx2(w, rows, cols, xs, m, out)
}

/// [`matmul_rows`] without AVX-512: three weight rows times up to four activation rows per
/// AVX2 pass (twelve sums and four operands fill the 16 registers; two weight rows ran eight
/// SmolLM2 f32 rows 3% slower), else (no AVX2, or not x86) one scalar dot per pair.
fn matmul_rows_avx2<T: Element>(
    w: &[T],
    rows: usize,
    cols: usize,
    xs: &[f32],
    m: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        par_passes(w, rows, cols, xs, m, out, 4, |n, p| {
            // SAFETY: `use_avx2` said yes (avx2, fma, f16c); tasks cover disjoint weight rows, so
            // each output element has one writer, and `out` outlives `par_passes`.
            unsafe {
                match n {
                    1 => run!(dots_avx2::<T>, p, 3, 1),
                    2 => run!(dots_avx2::<T>, p, 3, 2),
                    3 => run!(dots_avx2::<T>, p, 3, 3),
                    _ => run!(dots_avx2::<T>, p, 3, 4),
                }
            }
        });
        return;
    }
    par_rows(out, rows, m, ROWS_PER_TASK, |r, buf| {
        let w = &w[r * cols..(r + 1) * cols];
        for (j, o) in buf.iter_mut().enumerate() {
            *o = dot_scalar(w, &xs[j * cols..(j + 1) * cols]);
        }
    });
}

/// `x W^T` on the CPU for a weight `[rows, cols]` and activations `[.., cols]` of the same
/// dtype: f32, or bf16 / f16 where AVX2 is present (multiplied in f32, the result rounded to
/// that dtype once; candle's bf16 product decoded SmolLM2 at 7.5 tok/s). `None` for any
/// other kind of tensor.
pub fn forward(w: &Tensor, x: &Tensor) -> Result<Option<Tensor>> {
    if w.dtype() != x.dtype() || !w.device().is_cpu() {
        return Ok(None);
    }
    let half_width = matches!(w.dtype(), DType::BF16 | DType::F16);
    if !(w.dtype() == DType::F32 || half_width && use_avx2()) {
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
        DType::F32 => {
            let w = &cpu.as_slice::<f32>()?[start..end];
            matmul_rows(w, rows, cols, &xs, m, &mut out)
        }
        DType::BF16 => {
            let w = &cpu.as_slice::<half::bf16>()?[start..end];
            matmul_rows(w, rows, cols, &xs, m, &mut out)
        }
        DType::F16 => {
            let w = &cpu.as_slice::<half::f16>()?[start..end];
            matmul_rows(w, rows, cols, &xs, m, &mut out)
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

    /// A product path: `matmul_rows`'s arguments, for weights of type `T`.
    type Path<T> = fn(&[T], usize, usize, &[f32], usize, &mut [f32]);

    /// Every path this CPU can run: AVX-512 where present, and the AVX2 (or scalar) one.
    fn paths<T: Element>() -> Vec<(&'static str, Path<T>)> {
        let mut p: Vec<(&'static str, Path<T>)> = vec![("avx2", matmul_rows_avx2::<T>)];
        #[cfg(target_arch = "x86_64")]
        if crate::quant::use_avx512() {
            p.push(("avx512", matmul_rows_avx512::<T>));
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
                for (name, path) in paths::<f32>() {
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

    /// Each path's product over `w` (f32, or the half type it was rounded to) next to the f32
    /// product over the widened values.
    fn both<T: Element>(w: &[T], wide: &[f32], rows: usize, cols: usize, xs: &[f32], m: usize) {
        for ((name, path), (_, f32_path)) in paths::<T>().into_iter().zip(paths::<f32>()) {
            let (mut got, mut want) = (vec![0f32; m * rows], vec![0f32; m * rows]);
            path(w, rows, cols, xs, m, &mut got);
            f32_path(wide, rows, cols, xs, m, &mut want);
            assert_eq!(got, want, "{name}");
        }
    }

    /// bf16 and f16 weights widen exactly to f32, so every path's products must equal, bit for
    /// bit, its f32 products over the widened weights; `forward` then rounds once to the dtype.
    #[test]
    fn half_weights_give_the_f32_paths_bits() {
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
            match dtype {
                DType::BF16 => {
                    let wv = w.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap();
                    both(&wv, &widev, rows, cols, &xv, m);
                }
                _ => {
                    let wv = w.flatten_all().unwrap().to_vec1::<half::f16>().unwrap();
                    both(&wv, &widev, rows, cols, &xv, m);
                }
            }
            if !use_avx2() {
                continue; // `forward` leaves half weights to candle here
            }
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
