//! GGML `Q8_0` in the eight-row layout (`x8.rs`).
//!
//! Group block (272 bytes, = 8 x 34): the eight rows' f16 scales, then eight 32-byte chunks;
//! chunk `c` holds values `4c..4c+4` of each row, row after row. The values are signed, so
//! the byte multiply-add takes `|w|` and the activations with `w`'s sign; its 16-bit sums
//! can reach 2 x 128 x 127, so each chunk widens to 32 bits at once (two would overflow).

use super::int8::Q8Row;
#[cfg(target_arch = "x86_64")]
use super::x8::{load_f16_pair, load_pair};
use super::x8::{X8Format, X8Matrix, ROWS};
use super::BLOCK;
use half::f16;

/// Q8_0 in eight-row groups.
#[derive(Debug, Clone, Copy)]
pub struct Q8_0x8;

/// A `[rows, cols]` Q8_0 matrix with its rows interleaved eight at a time.
pub type Q8_0x8Matrix = X8Matrix<Q8_0x8>;

impl X8Format for Q8_0x8 {
    const NAME: &'static str = "Q8_0";
    const BLOCK_BYTES: usize = super::q8_0::BLOCK_BYTES;

    fn repack(src: [&[u8]; ROWS], gb: &mut [u8]) {
        for (r, src) in src.iter().enumerate() {
            gb[2 * r..2 * r + 2].copy_from_slice(&src[0..2]);
            for c in 0..8 {
                let at = 16 + 32 * c + 4 * r;
                gb[at..at + 4].copy_from_slice(&src[2 + 4 * c..6 + 4 * c]);
            }
        }
    }

    fn unpack(gb: &[u8], r: usize) -> (f32, f32, [i8; BLOCK]) {
        let d = f16::from_le_bytes([gb[2 * r], gb[2 * r + 1]]).to_f32();
        let q = std::array::from_fn(|i| gb[16 + 32 * (i / 4) + 4 * r + i % 4] as i8);
        (d, 0.0, q)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dots8<const N: usize>(group: &[u8], x: [&Q8Row; N], out: [*mut f32; N]) {
        use std::arch::x86_64::*;
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); N];
        for (b, gb) in group.chunks_exact(ROWS * Self::BLOCK_BYTES).enumerate() {
            let p = gb.as_ptr();
            let mut s32 = [_mm256_setzero_si256(); N];
            for c in 0..8 {
                let w = _mm256_loadu_si256(p.add(16 + 32 * c) as *const __m256i);
                let aw = _mm256_sign_epi8(w, w);
                for k in 0..N {
                    let xq = x[k].q.as_ptr().add(b * BLOCK + 4 * c);
                    let xv = _mm256_set1_epi32((xq as *const i32).read_unaligned());
                    let prod = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w));
                    s32[k] = _mm256_add_epi32(s32[k], _mm256_madd_epi16(prod, ones));
                }
            }
            let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
            for k in 0..N {
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(x[k].d[b]));
                acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[k]), scale, acc[k]);
            }
        }
        super::x8::store_rows(&acc, out);
    }

    /// `vpdpbusd` of `|w|` and the activations with `w`'s sign adds each chunk's four
    /// products straight into 32-bit sums, where AVX2 needs a multiply-add to 16 bits, a
    /// widening multiply-add and an add. The integer sums are the AVX2 body's (no 16-bit pair
    /// reaches saturation: 2 x 128 x 127 < 2^15), so the same float steps follow. Even and
    /// odd chunks keep separate sums so that twice as many dependent chains are in flight.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dots8_vnni<const N: usize>(group: &[u8], x: [&Q8Row; N], out: [*mut f32; N]) {
        use std::arch::x86_64::*;
        let mut acc = [_mm256_setzero_ps(); N];
        for (b, gb) in group.chunks_exact(ROWS * Self::BLOCK_BYTES).enumerate() {
            let p = gb.as_ptr();
            super::x8::prefetch_ahead::<{ ROWS * Self::BLOCK_BYTES }>(p);
            let mut even = [_mm256_setzero_si256(); N];
            let mut odd = [_mm256_setzero_si256(); N];
            for c in (0..8).step_by(2) {
                let w0 = _mm256_loadu_si256(p.add(16 + 32 * c) as *const __m256i);
                let w1 = _mm256_loadu_si256(p.add(48 + 32 * c) as *const __m256i);
                let (a0, a1) = (_mm256_abs_epi8(w0), _mm256_abs_epi8(w1));
                for k in 0..N {
                    let xq = x[k].q.as_ptr().add(b * BLOCK + 4 * c) as *const i32;
                    let x0 = _mm256_set1_epi32(xq.read_unaligned());
                    let x1 = _mm256_set1_epi32(xq.add(1).read_unaligned());
                    even[k] = _mm256_dpbusd_epi32(even[k], a0, _mm256_sign_epi8(x0, w0));
                    odd[k] = _mm256_dpbusd_epi32(odd[k], a1, _mm256_sign_epi8(x1, w1));
                }
            }
            let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
            for k in 0..N {
                let s32 = _mm256_add_epi32(even[k], odd[k]);
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(*x[k].d.get_unchecked(b)));
                acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), scale, acc[k]);
            }
        }
        super::x8::store_rows(&acc, out);
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn exact8<const N: usize>(group: &[u8], x: [&[f32]; N], out: [*mut f32; N]) {
        use std::arch::x86_64::*;
        let mut acc = [_mm256_setzero_ps(); N];
        for (b, gb) in group.chunks_exact(ROWS * Self::BLOCK_BYTES).enumerate() {
            let p = gb.as_ptr();
            let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
            for c in 0..8 {
                // Lane r holds row r's values 4c..4c+4, one per byte.
                let mut lanes = _mm256_loadu_si256(p.add(16 + 32 * c) as *const __m256i);
                for j in 0..4 {
                    let q = _mm256_srai_epi32::<24>(_mm256_slli_epi32::<24>(lanes));
                    lanes = _mm256_srli_epi32::<8>(lanes);
                    // d * q is exact in f32: the stored weight, as dequantizing gives it.
                    let w = _mm256_mul_ps(d, _mm256_cvtepi32_ps(q));
                    let e = b * BLOCK + 4 * c + j;
                    super::x8::add_column(w, &x, e, &mut acc);
                }
            }
        }
        super::x8::store_rows(&acc, out);
    }

    /// Sixteen rows' weights at a time, each as [`Self::exact8`] computes it.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dequant16(b0: &[u8], b1: &[u8], out: *mut f32, stride: usize) {
        use std::arch::x86_64::*;
        let (p0, p1) = (b0.as_ptr(), b1.as_ptr());
        let d = load_f16_pair(p0, p1);
        for c in 0..8 {
            let mut lanes = load_pair(p0.add(16 + 32 * c), p1.add(16 + 32 * c));
            for j in 0..4 {
                let q = _mm512_srai_epi32::<24>(_mm512_slli_epi32::<24>(lanes));
                lanes = _mm512_srli_epi32::<8>(lanes);
                let w = _mm512_mul_ps(d, _mm512_cvtepi32_ps(q));
                _mm512_storeu_ps(out.add((4 * c + j) * stride), w);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    #[test]
    fn q8_0_in_eight_row_groups_holds() {
        crate::quant::x8::tests::x8_format_holds::<Q8_0x8>(
            GgmlDType::Q8_0,
            crate::quant::q8_0::dot_int8_scalar,
        );
    }
}
