//! GGML `Q4_1` matrices with an AVX2 matrix-vector product.
//!
//! candle 0.11 has SIMD dot products for Q4_0, Q8_0 and the k-quants but computes Q4_1 with
//! scalar code, which made decode of Q4_1 GGUF files (e.g. SmolLM2's) ~2x slower than
//! llama.cpp. The math is ggml's: activations are rounded per 32-block to int8 (`Q8_1`-style
//! with the block sum kept), and each block contributes `d_w*d_x*Σ q_w*q_x + m_w*s_x`.

use super::int8::{Int8Dot, Int8Format, Int8Matrix, Q8Row};
use super::BLOCK;
use half::f16;

/// Bytes per block: f16 scale, f16 min, 16 bytes of nibbles.
pub const BLOCK_BYTES: usize = 20;

/// The Q4_1 block format.
#[derive(Debug, Clone, Copy)]
pub struct Q4_1;

/// A `[rows, cols]` matrix of Q4_1 blocks, row-major, in ggml's byte layout.
pub type Q4_1Matrix = Int8Matrix<Q4_1>;

#[inline]
fn block_params(blk: &[u8]) -> (f32, f32) {
    let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
    let m = f16::from_le_bytes([blk[2], blk[3]]).to_f32();
    (d, m)
}

/// Portable reference of one row's dot product.
pub(crate) fn dot_scalar(row: &[u8], x: &Q8Row) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in row.chunks_exact(BLOCK_BYTES).enumerate() {
        let (d, m) = block_params(blk);
        let xq = &x.q[b * BLOCK..(b + 1) * BLOCK];
        let mut sumi = 0i32;
        for j in 0..16 {
            let byte = blk[4 + j];
            sumi += (byte & 0x0f) as i32 * xq[j] as i32 + (byte >> 4) as i32 * xq[j + 16] as i32;
        }
        acc += d * x.d[b] * sumi as f32 + m * x.s[b];
    }
    acc
}

impl Int8Dot for Q4_1 {
    fn dot_scalar(row: &[u8], x: &Q8Row) -> f32 {
        dot_scalar(row, x)
    }

    /// Dots of one weight row with `N` activation rows: each block is unpacked once.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dots<const N: usize>(row: &[u8], x: [&Q8Row; N]) -> [f32; N] {
        use std::arch::x86_64::*;
        let mut acc = [_mm256_setzero_ps(); N];
        let mut mins = [0f32; N];
        let low = _mm_set1_epi8(0x0f);
        for (b, blk) in row.chunks_exact(BLOCK_BYTES).enumerate() {
            // Both f16 block parameters (scale, min) converted in one instruction.
            let v = _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from_le_bytes([
                blk[0], blk[1], blk[2], blk[3],
            ])));
            let (d, m) = (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps(v, v, 1)));
            // 16 bytes of nibbles -> 32 unsigned bytes: low nibbles are elements 0..16, high 16..32.
            let packed = _mm_loadu_si128(blk.as_ptr().add(4) as *const __m128i);
            let lo = _mm_and_si128(packed, low);
            let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
            let w = _mm256_set_m128i(hi, lo);
            for k in 0..N {
                let xv = _mm256_loadu_si256(x[k].q.as_ptr().add(b * BLOCK) as *const __m256i);
                let prod = super::int8::mul_sum(w, xv);
                let scale = _mm256_set1_ps(d * x[k].d[b]);
                acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(prod), scale, acc[k]);
                mins[k] += m * x[k].s[b];
            }
        }
        std::array::from_fn(|k| super::hsum(acc[k]) + mins[k])
    }
}

impl Int8Format for Q4_1 {
    const NAME: &'static str = "Q4_1";
    const BLOCK_BYTES: usize = BLOCK_BYTES;

    fn dequantize_block(blk: &[u8], out: &mut Vec<f32>) {
        let (d, m) = block_params(blk);
        let q = &blk[4..];
        out.extend(q.iter().map(|b| d * (b & 0x0f) as f32 + m));
        out.extend(q.iter().map(|b| d * (b >> 4) as f32 + m));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::quant::RowKernel;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::Module;
    use candle_core::{Device, Tensor};

    /// Deterministic pseudo-normal values (no RNG state shared with other tests).
    pub(crate) fn det_values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                let mut u = 0f32;
                for _ in 0..4 {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    u += (state >> 40) as f32 / (1u64 << 24) as f32;
                }
                (u - 2.0) * 1.7
            })
            .collect()
    }

    fn pair(rows: usize, cols: usize) -> (Q4_1Matrix, QTensor) {
        let w = Tensor::from_vec(det_values(rows * cols, 1), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let m = Q4_1Matrix::new(rows, cols, q.data().unwrap().to_vec()).unwrap();
        (m, q)
    }

    #[test]
    fn dequantize_matches_candle() {
        let (m, q) = pair(8, 64);
        let a = m.dequantize(&Device::Cpu).unwrap();
        let b = q.dequantize(&Device::Cpu).unwrap();
        assert_eq!(crate::test_util::max_abs_diff(&a, &b), 0.0);
    }

    #[test]
    fn batched_rows_equal_single_rows() {
        crate::quant::tests::batch_equals_single_rows(&pair(70, 576).0);
    }

    #[test]
    fn matvec_is_exact_up_to_activation_rounding() {
        let (rows, cols) = (200, 576);
        let (m, q) = pair(rows, cols);
        let w = m
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let candle = QMatMul::from_qtensor(q).unwrap();
        for seed in 2..5 {
            let xs = det_values(cols, seed);
            let mut ours = vec![0f32; rows];
            m.matvec(&xs, &mut ours);
            let xq = crate::quant::int8::quantize_row(&xs);
            let x = Tensor::from_vec(xs.clone(), (1, cols), &Device::Cpu).unwrap();
            let theirs = candle
                .forward(&x)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for r in 0..rows {
                // The SIMD kernel computes exactly what the scalar one does.
                assert!(
                    (dot_scalar(m.row(r), &xq) - ours[r]).abs() < 1e-3,
                    "row {r}"
                );
                // Rounding x to int8 per block moves each x_i by at most d_b/2, so the result is
                // within sum_b d_b/2 * sum_i |w_i| of the exact product (plus float noise).
                let exact: f32 = w[r].iter().zip(&xs).map(|(a, b)| a * b).sum();
                let bound: f32 = (0..cols / BLOCK)
                    .map(|b| {
                        xq.d[b] / 2.0
                            * w[r][b * BLOCK..(b + 1) * BLOCK]
                                .iter()
                                .map(|v| v.abs())
                                .sum::<f32>()
                    })
                    .sum();
                assert!(
                    (ours[r] - exact).abs() <= bound + 1e-3,
                    "row {r}: {} > {bound}",
                    (ours[r] - exact).abs()
                );
                // candle's path rounds the same way (it keeps the block scale in f16, we in f32).
                assert!(
                    (ours[r] - theirs[r]).abs() < 0.1,
                    "row {r}: candle {} ours {}",
                    theirs[r],
                    ours[r]
                );
            }
        }
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(Q4_1Matrix::new(2, 30, vec![0; 40]).is_err());
        assert!(Q4_1Matrix::new(2, 32, vec![0; 39]).is_err());
    }
}
