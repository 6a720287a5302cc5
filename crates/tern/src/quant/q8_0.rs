//! GGML `Q8_0` matrices, multiplied two ways.
//!
//! - Exact (the output head): activations stay f32. Rounding them to int8 flips near-tied
//!   greedy choices at the head (see `model::layers::DEQUANT_MIN_ROWS`); this keeps logits
//!   exact to the stored weights while still reading the weight at 8.5 bits per value.
//! - Rounding (decoder layers): activations rounded to int8 per block as ggml does, so a block
//!   is one int8 multiply-add; candle's own Q8_0 path decoded SmolLM2 at half llama.cpp's speed.

use super::int8::{matmul_int8, Int8Dot, Q8Row};
use super::{fill_grouped, par_rows, use_avx2, BlockRows, RowKernel, BLOCK, ROW_GROUP};
use crate::error::Result;
use candle_core::{Device, Tensor};
use half::f16;

/// Bytes per block: f16 scale then 32 int8 values.
pub const BLOCK_BYTES: usize = 34;
const ROWS_PER_TASK: usize = 256;

/// A `[rows, cols]` matrix of Q8_0 blocks in ggml's byte layout.
#[derive(Debug, Clone)]
pub struct Q8_0Matrix {
    blocks: BlockRows,
    /// Round activations to int8 (the fast layer kernel) instead of keeping them exact.
    rounding: bool,
}

/// Rows per task of the int8 kernel (the exact one does more work per row).
const ROWS_PER_TASK_INT8: usize = 32;

/// Portable reference of one row's int8 dot product.
pub(crate) fn dot_int8_scalar(row: &[u8], x: &Q8Row) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in row.chunks_exact(BLOCK_BYTES).enumerate() {
        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        let xq = &x.q[b * BLOCK..(b + 1) * BLOCK];
        let sumi: i32 = blk[2..]
            .iter()
            .zip(xq)
            .map(|(&w, &v)| w as i8 as i32 * v as i32)
            .sum();
        acc += d * x.d[b] * sumi as f32;
    }
    acc
}

/// Block `b` of `row` times every activation row, added into `acc`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block_into<const N: usize>(
    row: &[u8],
    x: &[&Q8Row; N],
    b: usize,
    acc: &mut [std::arch::x86_64::__m256; N],
) {
    use std::arch::x86_64::*;
    let blk = &row[b * BLOCK_BYTES..(b + 1) * BLOCK_BYTES];
    let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
        u16::from_le_bytes([blk[0], blk[1]]) as i32,
    )));
    let w = _mm256_loadu_si256(blk.as_ptr().add(2) as *const __m256i);
    super::int8::add_signed_block(w, d, x, b, acc);
}

impl Int8Dot for Q8_0Matrix {
    fn dot_scalar(row: &[u8], x: &Q8Row) -> f32 {
        dot_int8_scalar(row, x)
    }

    /// Dots of one weight row with `N` int8 activation rows.
    ///
    /// Even and odd blocks add into separate sums: with one, the chain of dependent multiply-adds
    /// set the pace of a single activation row (q8_0 decode measured +13% with two).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dots<const N: usize>(row: &[u8], x: [&Q8Row; N]) -> [f32; N] {
        use std::arch::x86_64::*;
        let (mut even, mut odd) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
        let blocks = row.len() / BLOCK_BYTES;
        for b in (0..blocks - blocks % 2).step_by(2) {
            block_into(row, &x, b, &mut even);
            block_into(row, &x, b + 1, &mut odd);
        }
        if blocks % 2 == 1 {
            block_into(row, &x, blocks - 1, &mut even);
        }
        std::array::from_fn(|k| super::hsum(_mm256_add_ps(even[k], odd[k])))
    }
}

fn dot_scalar(row: &[u8], x: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in row.chunks_exact(BLOCK_BYTES).enumerate() {
        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        let xs = &x[b * BLOCK..(b + 1) * BLOCK];
        let s: f32 = blk[2..]
            .iter()
            .zip(xs)
            .map(|(&q, &v)| q as i8 as f32 * v)
            .sum();
        acc += d * s;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2(row: &[u8], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_setzero_ps();
    for (b, blk) in row.chunks_exact(BLOCK_BYTES).enumerate() {
        let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            u16::from_le_bytes([blk[0], blk[1]]) as i32,
        )));
        let q = blk.as_ptr().add(2);
        let xp = x.as_ptr().add(b * BLOCK);
        let mut s = _mm256_setzero_ps();
        for k in 0..4 {
            let q8 = _mm_loadl_epi64(q.add(8 * k) as *const __m128i);
            let qf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8));
            s = _mm256_fmadd_ps(qf, _mm256_loadu_ps(xp.add(8 * k)), s);
        }
        acc = _mm256_fmadd_ps(s, _mm256_set1_ps(d), acc);
    }
    super::hsum(acc)
}

/// [`dot_avx2`] for four activation rows at once: each weight block is widened once.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot4_avx2(row: &[u8], x: [&[f32]; ROW_GROUP]) -> [f32; ROW_GROUP] {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); ROW_GROUP];
    for (b, blk) in row.chunks_exact(BLOCK_BYTES).enumerate() {
        let d = _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            u16::from_le_bytes([blk[0], blk[1]]) as i32,
        ))));
        let q = blk.as_ptr().add(2);
        let mut s = [_mm256_setzero_ps(); ROW_GROUP];
        for i in 0..4 {
            let q8 = _mm_loadl_epi64(q.add(8 * i) as *const __m128i);
            let qf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8));
            for k in 0..ROW_GROUP {
                let xv = _mm256_loadu_ps(x[k].as_ptr().add(b * BLOCK + 8 * i));
                s[k] = _mm256_fmadd_ps(qf, xv, s[k]);
            }
        }
        for k in 0..ROW_GROUP {
            acc[k] = _mm256_fmadd_ps(s[k], d, acc[k]);
        }
    }
    std::array::from_fn(|k| super::hsum(acc[k]))
}

impl Q8_0Matrix {
    /// Wraps ggml Q8_0 bytes for a `[rows, cols]` matrix, multiplied exactly (f32
    /// activations).
    pub fn new(rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        BlockRows::new("Q8_0", rows, cols, BLOCK_BYTES, data).map(|blocks| Self {
            blocks,
            rounding: false,
        })
    }

    /// As [`Q8_0Matrix::new`], multiplied with activations rounded to int8 per block (as ggml;
    /// for decoder layers, where it is about twice as fast).
    pub fn rounding(rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        Self::new(rows, cols, data).map(|m| Self {
            rounding: true,
            ..m
        })
    }

    fn row(&self, r: usize) -> &[u8] {
        self.blocks.row(r)
    }
}

impl RowKernel for Q8_0Matrix {
    fn dims(&self) -> (usize, usize) {
        (self.blocks.rows, self.blocks.cols)
    }

    fn matmul_rows(&self, xs: &[f32], m: usize, out: &mut [f32]) {
        if self.rounding {
            return matmul_int8::<Self>(&self.blocks, xs, m, out, ROWS_PER_TASK_INT8);
        }
        let (rows, cols) = (self.blocks.rows, self.blocks.cols);
        assert_eq!((xs.len(), out.len()), (m * cols, m * rows));
        let avx2 = use_avx2();
        par_rows(out, rows, m, ROWS_PER_TASK, |r, buf| {
            let w = self.row(r);
            let x = |j: usize| &xs[j * cols..(j + 1) * cols];
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: only taken when the CPU reports avx2, fma and f16c.
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

    fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let mut v = Vec::with_capacity(self.blocks.rows * self.blocks.cols);
        for blk in self.blocks.data.chunks_exact(BLOCK_BYTES) {
            let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            v.extend(blk[2..].iter().map(|&q| d * q as i8 as f32));
        }
        Ok(Tensor::from_vec(
            v,
            (self.blocks.rows, self.blocks.cols),
            device,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};

    #[test]
    fn exact_to_the_stored_weights() {
        let det = crate::quant::q4_1::tests::det_values;
        let w = Tensor::from_vec(det(300 * 576, 7), (300, 576), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let m = Q8_0Matrix::new(300, 576, q.data().unwrap().to_vec()).unwrap();
        let deq = q.dequantize(&Device::Cpu).unwrap();
        let diff = crate::test_util::max_abs_diff;
        assert_eq!(diff(&m.dequantize(&Device::Cpu).unwrap(), &deq), 0.0);
        let x = Tensor::from_vec(det(2 * 576, 8), (2, 576), &Device::Cpu).unwrap();
        let exact = x.matmul(&deq.t().unwrap()).unwrap();
        // Only float summation order separates the two: ~1e-5 on sums of 576 products.
        assert!(diff(&m.forward(&x).unwrap(), &exact) < 1e-3);
        let xs = x.get(0).unwrap().to_vec1::<f32>().unwrap();
        let mut out = vec![0f32; 300];
        m.matvec(&xs, &mut out);
        for (r, o) in out.iter().enumerate() {
            assert!((dot_scalar(m.row(r), &xs) - o).abs() < 1e-3);
        }
        assert!(Q8_0Matrix::new(2, 32, vec![0; 10]).is_err());
        crate::quant::tests::batch_equals_single_rows(&m);
    }

    #[test]
    fn rounding_kernel_equals_its_scalar_form_and_candle() {
        let det = crate::quant::q4_1::tests::det_values;
        let (rows, cols) = (96, 576);
        let w = Tensor::from_vec(det(rows * cols, 5), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let m = Q8_0Matrix::rounding(rows, cols, q.data().unwrap().to_vec()).unwrap();
        crate::quant::tests::int8_kernel_agrees(&m, q, |r, x| dot_int8_scalar(m.row(r), x));
    }
}
