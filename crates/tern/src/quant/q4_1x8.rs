//! GGML `Q4_1` in the eight-row layout (`x8.rs`): SmolLM2's own GGUF format.
//!
//! Group block (160 bytes, = 8 x 20): the eight rows' f16 scales, their eight f16 mins, then
//! four 32-byte chunks; chunk `c` holds bytes `4c..4c+4` of each row's 16 nibble bytes, row
//! after row. The low nibbles of chunk `c` are values `4c..4c+4`, the high ones values
//! `16+4c..16+4c+4` (ggml's nibble order). The int8 kernel sums a block's eight byte
//! multiply-adds in 16-bit lanes, which cannot overflow: 8 x 2 x 15 x 127 < 2^15.

use super::int8::Q8Row;
#[cfg(target_arch = "x86_64")]
use super::x8::{load_f16_pair, load_pair};
use super::x8::{X8Format, X8Matrix, ROWS};
use super::BLOCK;
use half::f16;

/// Q4_1 in eight-row groups.
#[derive(Debug, Clone, Copy)]
pub struct Q4_1x8;

/// A `[rows, cols]` Q4_1 matrix with its rows interleaved eight at a time.
pub type Q4_1x8Matrix = X8Matrix<Q4_1x8>;

impl X8Format for Q4_1x8 {
    const NAME: &'static str = "Q4_1";
    const BLOCK_BYTES: usize = super::q4_1::BLOCK_BYTES;

    fn repack(src: [&[u8]; ROWS], gb: &mut [u8]) {
        for (r, src) in src.iter().enumerate() {
            gb[2 * r..2 * r + 2].copy_from_slice(&src[0..2]);
            gb[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&src[2..4]);
            for c in 0..4 {
                let at = 32 + 32 * c + 4 * r;
                gb[at..at + 4].copy_from_slice(&src[4 + 4 * c..8 + 4 * c]);
            }
        }
    }

    fn unpack(gb: &[u8], r: usize) -> (f32, f32, [i8; BLOCK]) {
        let d = f16::from_le_bytes([gb[2 * r], gb[2 * r + 1]]).to_f32();
        let m = f16::from_le_bytes([gb[16 + 2 * r], gb[17 + 2 * r]]).to_f32();
        let mut q = [0i8; BLOCK];
        for c in 0..4 {
            for i in 0..4 {
                let byte = gb[32 + 32 * c + 4 * r + i];
                q[4 * c + i] = (byte & 0x0f) as i8;
                q[16 + 4 * c + i] = (byte >> 4) as i8;
            }
        }
        (d, m, q)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dots8<const N: usize>(group: &[u8], x: [&Q8Row; N], out: [*mut f32; N]) {
        use std::arch::x86_64::*;
        let low = _mm256_set1_epi8(0x0f);
        let mut acc = [_mm256_setzero_ps(); N];
        for (b, gb) in group.chunks_exact(ROWS * Self::BLOCK_BYTES).enumerate() {
            let p = gb.as_ptr();
            let mut s16 = [_mm256_setzero_si256(); N];
            for c in 0..4 {
                let packed = _mm256_loadu_si256(p.add(32 + 32 * c) as *const __m256i);
                let lo = _mm256_and_si256(packed, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
                super::x8::add_nibble_chunk(lo, hi, &x, b, c, &mut s16);
            }
            let sums = s16.map(|s| _mm256_madd_epi16(s, _mm256_set1_epi16(1)));
            add_block(p, sums, &x, b, &mut acc);
        }
        super::x8::store_rows(&acc, out);
    }

    /// `vpdpbusd` adds each chunk's byte products straight into 32-bit sums (AVX2 needs a
    /// multiply-add to 16 bits, an add, and a widening per block). Low and high nibbles
    /// keep separate sums so that the dependent chains are twice as many.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dots8_vnni<const N: usize>(group: &[u8], x: [&Q8Row; N], out: [*mut f32; N]) {
        use std::arch::x86_64::*;
        let low = _mm256_set1_epi8(0x0f);
        let mut acc = [_mm256_setzero_ps(); N];
        for (b, gb) in group.chunks_exact(ROWS * Self::BLOCK_BYTES).enumerate() {
            let p = gb.as_ptr();
            super::x8::prefetch_ahead::<{ ROWS * Self::BLOCK_BYTES }>(p);
            let mut sl = [_mm256_setzero_si256(); N];
            let mut sh = [_mm256_setzero_si256(); N];
            for c in 0..4 {
                let packed = _mm256_loadu_si256(p.add(32 + 32 * c) as *const __m256i);
                let lo = _mm256_and_si256(packed, low);
                let hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
                for k in 0..N {
                    let xq = x[k].q.as_ptr().add(b * BLOCK);
                    let xl = _mm256_set1_epi32((xq.add(4 * c) as *const i32).read_unaligned());
                    let xh = _mm256_set1_epi32((xq.add(16 + 4 * c) as *const i32).read_unaligned());
                    sl[k] = _mm256_dpbusd_epi32(sl[k], lo, xl);
                    sh[k] = _mm256_dpbusd_epi32(sh[k], hi, xh);
                }
            }
            // The same integer sums as the AVX2 body's, so the same float steps follow.
            let sums = std::array::from_fn(|k| _mm256_add_epi32(sl[k], sh[k]));
            add_block(p, sums, &x, b, &mut acc);
        }
        super::x8::store_rows(&acc, out);
    }

    /// Two groups in 512-bit vectors: lane `r` of each vector is row `r` of `g0` for `r < 8`,
    /// row `r - 8` of `g1` above. Each lane runs the operations of [`Self::dots8_vnni`] in
    /// its order, so the bits are the same; the instructions are half as many, which is
    /// what Intel cores gain (256-bit vectors use two of their three vector ports, 512-bit
    /// ones the full width of two), while AMD's Zen 4 runs either at the same rate.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dots16_vnni<const N: usize>(
        g0: &[u8],
        g1: &[u8],
        x: [&Q8Row; N],
        out: [*mut f32; N],
    ) {
        use std::arch::x86_64::*;
        let gbb = ROWS * Self::BLOCK_BYTES;
        let low = _mm512_set1_epi8(0x0f);
        let mut acc = [_mm512_setzero_ps(); N];
        for b in 0..g0.len() / gbb {
            let (p0, p1) = (g0.as_ptr().add(b * gbb), g1.as_ptr().add(b * gbb));
            super::x8::prefetch_ahead::<{ ROWS * Self::BLOCK_BYTES }>(p0);
            super::x8::prefetch_ahead::<{ ROWS * Self::BLOCK_BYTES }>(p1);
            let mut sl = [_mm512_setzero_si512(); N];
            let mut sh = [_mm512_setzero_si512(); N];
            for c in 0..4 {
                let packed = load_pair(p0.add(32 + 32 * c), p1.add(32 + 32 * c));
                let lo = _mm512_and_si512(packed, low);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(packed), low);
                for k in 0..N {
                    let xq = x[k].q.as_ptr().add(b * BLOCK);
                    let xl = _mm512_set1_epi32((xq.add(4 * c) as *const i32).read_unaligned());
                    let xh = _mm512_set1_epi32((xq.add(16 + 4 * c) as *const i32).read_unaligned());
                    sl[k] = _mm512_dpbusd_epi32(sl[k], lo, xl);
                    sh[k] = _mm512_dpbusd_epi32(sh[k], hi, xh);
                }
            }
            let (d, m) = (load_f16_pair(p0, p1), load_f16_pair(p0.add(16), p1.add(16)));
            for k in 0..N {
                // As `add_block`, lane for lane.
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(*x[k].d.get_unchecked(b)));
                let sum = _mm512_cvtepi32_ps(_mm512_add_epi32(sl[k], sh[k]));
                acc[k] = _mm512_fmadd_ps(sum, scale, acc[k]);
                acc[k] = _mm512_fmadd_ps(m, _mm512_set1_ps(*x[k].s.get_unchecked(b)), acc[k]);
            }
        }
        for k in 0..N {
            _mm512_storeu_ps(out[k], acc[k]);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn exact8<const N: usize>(group: &[u8], x: [&[f32]; N], out: [*mut f32; N]) {
        use std::arch::x86_64::*;
        let low = _mm256_set1_epi32(0x0f);
        let mut acc = [_mm256_setzero_ps(); N];
        for (b, gb) in group.chunks_exact(ROWS * Self::BLOCK_BYTES).enumerate() {
            let p = gb.as_ptr();
            let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
            let m = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i));
            for c in 0..4 {
                // Lane r holds row r's four bytes of the chunk: nibble j (bits 4j..4j+4) is
                // value 4c + j/2 when j is even (a low nibble), 16 + 4c + j/2 when odd. (Unrolled
                // by hand with constant offsets, LLVM hoisted the activation loads until the
                // sums spilled, and prompts ran 15-25% slower.)
                let mut lanes = _mm256_loadu_si256(p.add(32 + 32 * c) as *const __m256i);
                for j in 0..8 {
                    let q = _mm256_cvtepi32_ps(_mm256_and_si256(lanes, low));
                    lanes = _mm256_srli_epi32::<4>(lanes);
                    // d * q is exact in f32, so this rounds once, as `d * q + m` does.
                    let w = _mm256_fmadd_ps(d, q, m);
                    let e = b * BLOCK + if j % 2 == 0 { 4 * c } else { 16 + 4 * c } + j / 2;
                    super::x8::add_column(w, &x, e, &mut acc);
                }
            }
        }
        super::x8::store_rows(&acc, out);
    }

    /// Lanes as in [`Self::dots16_vnni`]; each weight is computed as in [`Self::exact8`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dequant16(b0: &[u8], b1: &[u8], out: *mut f32, stride: usize) {
        use std::arch::x86_64::*;
        let low = _mm512_set1_epi32(0x0f);
        let (p0, p1) = (b0.as_ptr(), b1.as_ptr());
        let (d, m) = (load_f16_pair(p0, p1), load_f16_pair(p0.add(16), p1.add(16)));
        for c in 0..4 {
            let mut lanes = load_pair(p0.add(32 + 32 * c), p1.add(32 + 32 * c));
            for j in 0..8 {
                let q = _mm512_cvtepi32_ps(_mm512_and_si512(lanes, low));
                lanes = _mm512_srli_epi32::<4>(lanes);
                let e = if j % 2 == 0 { 4 * c } else { 16 + 4 * c } + j / 2;
                _mm512_storeu_ps(out.add(e * stride), _mm512_fmadd_ps(d, q, m));
            }
        }
    }
}

/// Adds block `b` of the group block at `p` to each activation row's sums: the integer dots
/// `sums[k]` times the eight rows' scales and row `k`'s, plus the rows' mins times row `k`'s
/// block sum.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn add_block<const N: usize>(
    p: *const u8,
    sums: [std::arch::x86_64::__m256i; N],
    x: &[&Q8Row; N],
    b: usize,
    acc: &mut [std::arch::x86_64::__m256; N],
) {
    use std::arch::x86_64::*;
    let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
    let m = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i));
    for k in 0..N {
        let scale = _mm256_mul_ps(d, _mm256_set1_ps(*x[k].d.get_unchecked(b)));
        acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[k]), scale, acc[k]);
        acc[k] = _mm256_fmadd_ps(m, _mm256_set1_ps(*x[k].s.get_unchecked(b)), acc[k]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    #[test]
    fn q4_1_in_eight_row_groups_holds() {
        crate::quant::x8::tests::x8_format_holds::<Q4_1x8>(
            GgmlDType::Q4_1,
            crate::quant::q4_1::dot_scalar,
        );
    }
}
