//! GGML `Q5_0` matrices with an AVX2 kernel over int8 activations.
//!
//! Q5_0 is what llama.cpp's Q4_K mixes fall back to for matrices whose rows do not hold whole
//! 256-element k-quant blocks (all of SmolLM2's 576-wide projections), and candle 0.11 computes
//! it with scalar code: a Q4_K SmolLM2 decoded at a fifth of llama.cpp's speed.
//!
//! A block is an f16 scale `d`, 32 high bits `qh` and 16 bytes of low nibbles; element `j` is
//! `d * ((nibble_j | bit_j << 4) - 16)`. With activations `x ≈ d_x q_x` the block contributes
//! `d d_x Σ (w5 - 16) q_x`, the signed 5-bit values multiplied as int8 (as ggml does).

use super::int8::{Int8Dot, Int8Format, Int8Matrix, Q8Row};
use super::BLOCK;
use half::f16;

/// Bytes per block: f16 scale, 4 bytes of high bits, 16 bytes of nibbles.
pub const BLOCK_BYTES: usize = 22;

/// The Q5_0 block format.
#[derive(Debug, Clone, Copy)]
pub struct Q5_0;

/// A `[rows, cols]` matrix of Q5_0 blocks, row-major, in ggml's byte layout.
pub type Q5_0Matrix = Int8Matrix<Q5_0>;

fn parts(blk: &[u8]) -> (f32, u32, &[u8]) {
    let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
    let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
    (d, qh, &blk[6..22])
}

/// The 32 unsigned 5-bit values of a block.
fn values(qh: u32, qs: &[u8]) -> [u8; BLOCK] {
    std::array::from_fn(|j| {
        let nib = if j < 16 {
            qs[j] & 0x0f
        } else {
            qs[j - 16] >> 4
        };
        nib | ((((qh >> j) & 1) as u8) << 4)
    })
}

/// Portable reference of one row's int8 dot product.
pub(crate) fn dot_scalar(row: &[u8], x: &Q8Row) -> f32 {
    let mut acc = 0f32;
    for (b, blk) in row.chunks_exact(BLOCK_BYTES).enumerate() {
        let (d, qh, qs) = parts(blk);
        let w = values(qh, qs);
        let xq = &x.q[b * BLOCK..(b + 1) * BLOCK];
        let sumi: i32 = w
            .iter()
            .zip(xq)
            .map(|(&a, &b)| (a as i32 - 16) * b as i32)
            .sum();
        acc += d * x.d[b] * sumi as f32;
    }
    acc
}

/// A block's 32 values `w5 - 16` as signed bytes in one register (element j in byte j) and
/// its scale.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack(blk: &[u8]) -> (std::arch::x86_64::__m256i, f32) {
    use std::arch::x86_64::*;
    let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
        u16::from_le_bytes([blk[0], blk[1]]) as i32,
    )));
    let qh = i32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
    let packed = _mm_loadu_si128(blk.as_ptr().add(6) as *const __m128i);
    let low = _mm_set1_epi8(0x0f);
    let nibbles = _mm256_set_m128i(
        _mm_and_si128(_mm_srli_epi16(packed, 4), low),
        _mm_and_si128(packed, low),
    );
    // Spread bit j of qh to byte j: byte j gets qh's byte j/8, then each byte keeps its bit.
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(qh),
        _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0,
        ),
    );
    let bit = _mm256_set1_epi64x(0x8040201008040201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    // The signed value w5 - 16 straight away: a clear high bit makes the byte `nibble | 0xF0`
    // (nibble - 16 as i8), a set one leaves the nibble. No per-block correction term then,
    // whose scalar chain of dependent adds had set the pace of the whole loop.
    let high = _mm256_andnot_si256(set, _mm256_set1_epi8(0xF0u8 as i8));
    (_mm256_or_si256(nibbles, high), d)
}

impl Int8Dot for Q5_0 {
    fn dot_scalar(row: &[u8], x: &Q8Row) -> f32 {
        dot_scalar(row, x)
    }

    /// Dots of one weight row with `N` activation rows (each block unpacked once).
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dots<const N: usize>(row: &[u8], x: [&Q8Row; N]) -> [f32; N] {
        use std::arch::x86_64::*;
        let mut acc = [_mm256_setzero_ps(); N];
        for (b, blk) in row.chunks_exact(BLOCK_BYTES).enumerate() {
            let (w, d) = unpack(blk);
            super::int8::add_signed_block(w, d, &x, b, &mut acc);
        }
        std::array::from_fn(|k| super::hsum(acc[k]))
    }
}

impl Int8Format for Q5_0 {
    const NAME: &'static str = "Q5_0";
    const BLOCK_BYTES: usize = BLOCK_BYTES;

    fn dequantize_block(blk: &[u8], out: &mut Vec<f32>) {
        let (d, qh, qs) = parts(blk);
        out.extend(values(qh, qs).iter().map(|&q| d * (q as f32 - 16.0)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::q4_1::tests::det_values;
    use crate::quant::RowKernel;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn pair(rows: usize, cols: usize) -> (Q5_0Matrix, QTensor) {
        let w = Tensor::from_vec(det_values(rows * cols, 3), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q5_0).unwrap();
        let m = Q5_0Matrix::new(rows, cols, q.data().unwrap().to_vec()).unwrap();
        (m, q)
    }

    #[test]
    fn dequantize_matches_candle() {
        let (m, q) = pair(8, 576);
        let a = m.dequantize(&Device::Cpu).unwrap();
        let b = q.dequantize(&Device::Cpu).unwrap();
        assert_eq!(crate::test_util::max_abs_diff(&a, &b), 0.0);
    }

    #[test]
    fn simd_equals_scalar_and_candle_within_rounding() {
        let (m, q) = pair(96, 576);
        crate::quant::tests::int8_kernel_agrees(&m, q, |r, x| dot_scalar(m.row(r), x));
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(Q5_0Matrix::new(2, 30, vec![0; 44]).is_err());
        assert!(Q5_0Matrix::new(2, 32, vec![0; 43]).is_err());
    }
}
