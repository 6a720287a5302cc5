//! f32 weights times a few activation rows: batched decode on the CPU.
//!
//! For 2–63 rows candle's GEMM packs the whole weight on every call and ran a batch of 2
//! slower than two single rows (SmolLM2 f32: 23 vs 31 tok/s). Decode is bound by reading the
//! weights, so this reads each weight row once and dots it with every activation row, four
//! at a time in registers.

use super::{fill_grouped, par_rows, use_avx2, ROW_GROUP};
use crate::error::Result;
use candle_core::{DType, Tensor};

const ROWS_PER_TASK: usize = 16;

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

/// `out[j * rows + r] = w[r] · xs[j]` for `w` `[rows, cols]` and `xs` `[m, cols]`.
pub fn matmul_rows(w: &[f32], rows: usize, cols: usize, xs: &[f32], m: usize, out: &mut [f32]) {
    assert_eq!((w.len(), xs.len()), (rows * cols, m * cols));
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

/// `x W^T` for an f32 weight `[rows, cols]` and f32 activations `[.., cols]` on the CPU, or
/// `None` when the tensors are not of that kind.
pub fn forward(w: &Tensor, x: &Tensor) -> Result<Option<Tensor>> {
    if w.dtype() != DType::F32 || x.dtype() != DType::F32 || !w.device().is_cpu() {
        return Ok(None);
    }
    let (rows, cols) = w.dims2()?;
    let (storage, layout) = w.storage_and_layout();
    let (candle_core::Storage::Cpu(cpu), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    else {
        return Ok(None);
    };
    let w = &cpu.as_slice::<f32>()?[start..end];
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let m = xs.len() / cols;
    let mut out = vec![0f32; m * rows];
    matmul_rows(w, rows, cols, &xs, m, &mut out);
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = rows;
    Ok(Some(Tensor::from_vec(out, dims, x.device())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_matmul_for_every_row_count() {
        let (rows, cols) = (37, 100);
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
        for m in 1..=9 {
            let x = Tensor::randn(0f32, 1.0, (m, 1, cols), &Device::Cpu).unwrap();
            let got = forward(&w, &x).unwrap().unwrap();
            let want = x.broadcast_matmul(&w.t().unwrap()).unwrap();
            assert_eq!(got.dims(), want.dims());
            let d = crate::test_util::max_abs_diff(&got, &want);
            assert!(d < 1e-4, "m={m}: {d}");
            // Each row gives the same bits as alone.
            for j in 0..m {
                let one = forward(&w, &x.get(j).unwrap()).unwrap().unwrap();
                let d = crate::test_util::max_abs_diff(&one, &got.get(j).unwrap());
                assert_eq!(d, 0.0, "m={m} row {j}");
            }
        }
    }
}
