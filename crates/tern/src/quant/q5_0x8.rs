//! GGML `Q5_0` in the eight-row layout (`x8.rs`): most of a Q4_K mix on SmolLM2, whose
//! 576-wide rows hold no whole 256-value k-quant block.
//!
//! Group block (176 bytes, = 8 x 22): the eight rows' f16 scales; the eight rows' 32 high bits,
//! reordered; then four 32-byte nibble chunks as Q4_1's (`q4_1x8.rs`). The high bits of row `r`
//! are reordered so that bit `h` of byte `j` belongs to the nibble `j` of half-chunk `h`
//! (`h = 2c` for chunk `c`'s low nibbles, `2c + 1` for its high ones): one shift and one mask
//! then give a whole half-chunk its fifth bits. The kernels take the 5-bit values unsigned,
//! `w = d (q - 16)` becomes `d q - 16 d`, which enters as Q4_1's min does. A block's 16-bit
//! sums hold four byte multiply-adds at most (4 x 2 x 31 x 127 < 2^15), so each half of the
//! block widens on its own.

use super::int8::Q8Row;
#[cfg(target_arch = "x86_64")]
use super::x8::{load_f16_pair, load_pair};
use super::x8::{X8Format, X8Matrix, ROWS};
use super::BLOCK;
use half::f16;

/// Q5_0 in eight-row groups.
#[derive(Debug, Clone, Copy)]
pub struct Q5_0x8;

/// A `[rows, cols]` Q5_0 matrix with its rows interleaved eight at a time.
pub type Q5_0x8Matrix = X8Matrix<Q5_0x8>;

/// The value index of nibble `j` of half-chunk `h`.
fn value_at(h: usize, j: usize) -> usize {
    4 * (h / 2) + 16 * (h % 2) + j
}

/// Where the chunks start in a group block.
const CHUNKS: usize = 48;

impl X8Format for Q5_0x8 {
    const NAME: &'static str = "Q5_0";
    const BLOCK_BYTES: usize = super::q5_0::BLOCK_BYTES;

    fn repack(src: [&[u8]; ROWS], gb: &mut [u8]) {
        for (r, src) in src.iter().enumerate() {
            gb[2 * r..2 * r + 2].copy_from_slice(&src[0..2]);
            let qh = u32::from_le_bytes([src[2], src[3], src[4], src[5]]);
            let mut hb = 0u32;
            for h in 0..8 {
                for j in 0..4 {
                    hb |= ((qh >> value_at(h, j)) & 1) << (8 * j + h);
                }
            }
            gb[16 + 4 * r..20 + 4 * r].copy_from_slice(&hb.to_le_bytes());
            for c in 0..4 {
                let at = CHUNKS + 32 * c + 4 * r;
                gb[at..at + 4].copy_from_slice(&src[6 + 4 * c..10 + 4 * c]);
            }
        }
    }

    fn unpack(gb: &[u8], r: usize) -> (f32, f32, [i8; BLOCK]) {
        let d = f16::from_le_bytes([gb[2 * r], gb[2 * r + 1]]).to_f32();
        let hb = u32::from_le_bytes(gb[16 + 4 * r..20 + 4 * r].try_into().expect("4 bytes"));
        let mut q = [0i8; BLOCK];
        for h in 0..8 {
            for j in 0..4 {
                let byte = gb[CHUNKS + 32 * (h / 2) + 4 * r + j];
                let nib = if h % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                let high = ((hb >> (8 * j + h)) & 1) as u8;
                q[value_at(h, j)] = (nib | high << 4) as i8 - 16;
            }
        }
        (d, 0.0, q)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dots8<const N: usize>(group: &[u8], x: [&Q8Row; N], out: [*mut f32; N]) {
        use std::arch::x86_64::*;
        let (low, bit4) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x10));
        let mut acc = [_mm256_setzero_ps(); N];
        for (b, gb) in group.chunks_exact(ROWS * Self::BLOCK_BYTES).enumerate() {
            let p = gb.as_ptr();
            let qh = _mm256_loadu_si256(p.add(16) as *const __m256i);
            let mut s32 = [_mm256_setzero_si256(); N];
            for half in 0..2 {
                let mut hb = high_bits(qh, half);
                let mut s16 = [_mm256_setzero_si256(); N];
                for c in 2 * half..2 * half + 2 {
                    let packed = _mm256_loadu_si256(p.add(CHUNKS + 32 * c) as *const __m256i);
                    let lo =
                        _mm256_or_si256(_mm256_and_si256(packed, low), _mm256_and_si256(hb, bit4));
                    hb = _mm256_srli_epi32::<1>(hb);
                    let hi = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(packed, 4), low),
                        _mm256_and_si256(hb, bit4),
                    );
                    hb = _mm256_srli_epi32::<1>(hb);
                    super::x8::add_nibble_chunk(lo, hi, &x, b, c, &mut s16);
                }
                for k in 0..N {
                    s32[k] =
                        _mm256_add_epi32(s32[k], _mm256_madd_epi16(s16[k], _mm256_set1_epi16(1)));
                }
            }
            let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
            let m = _mm256_mul_ps(d, _mm256_set1_ps(-16.0));
            for k in 0..N {
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(x[k].d[b]));
                acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32[k]), scale, acc[k]);
                acc[k] = _mm256_fmadd_ps(m, _mm256_set1_ps(x[k].s[b]), acc[k]);
            }
        }
        super::x8::store_rows(&acc, out);
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn exact8<const N: usize>(group: &[u8], x: [&[f32]; N], out: [*mut f32; N]) {
        use std::arch::x86_64::*;
        let (low, bit4) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x10));
        let mut acc = [_mm256_setzero_ps(); N];
        for (b, gb) in group.chunks_exact(ROWS * Self::BLOCK_BYTES).enumerate() {
            let p = gb.as_ptr();
            let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
            // d q and -16 d are exact, and so is their sum d (q - 16): the stored weight.
            let m = _mm256_mul_ps(d, _mm256_set1_ps(-16.0));
            let qh = _mm256_loadu_si256(p.add(16) as *const __m256i);
            let mut hb = high_bits(qh, 0);
            for c in 0..4 {
                if c == 2 {
                    hb = high_bits(qh, 1);
                }
                let packed = _mm256_loadu_si256(p.add(CHUNKS + 32 * c) as *const __m256i);
                let lo = _mm256_or_si256(_mm256_and_si256(packed, low), _mm256_and_si256(hb, bit4));
                hb = _mm256_srli_epi32::<1>(hb);
                let hi = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(packed, 4), low),
                    _mm256_and_si256(hb, bit4),
                );
                hb = _mm256_srli_epi32::<1>(hb);
                let at = b * BLOCK + 4 * c;
                exact_bytes(lo, d, m, &x, at, &mut acc);
                exact_bytes(hi, d, m, &x, at + 16, &mut acc);
            }
        }
        super::x8::store_rows(&acc, out);
    }

    /// Sixteen rows' weights at a time, each as [`Self::exact8`] computes it.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dequant16(b0: &[u8], b1: &[u8], out: *mut f32, stride: usize) {
        use std::arch::x86_64::*;
        let (low, bit4, byte) = (
            _mm512_set1_epi8(0x0f),
            _mm512_set1_epi8(0x10),
            _mm512_set1_epi32(0xff),
        );
        let (p0, p1) = (b0.as_ptr(), b1.as_ptr());
        let d = load_f16_pair(p0, p1);
        let m = _mm512_mul_ps(d, _mm512_set1_ps(-16.0));
        let qh = load_pair(p0.add(16), p1.add(16));
        // As `high_bits`: bit 4 of each byte first holds half-chunk 0's bit, then 4's.
        let mut hb = _mm512_slli_epi32::<4>(qh);
        for c in 0..4 {
            if c == 2 {
                hb = qh;
            }
            let packed = load_pair(p0.add(CHUNKS + 32 * c), p1.add(CHUNKS + 32 * c));
            let lo = _mm512_or_si512(_mm512_and_si512(packed, low), _mm512_and_si512(hb, bit4));
            hb = _mm512_srli_epi32::<1>(hb);
            let hi = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16::<4>(packed), low),
                _mm512_and_si512(hb, bit4),
            );
            hb = _mm512_srli_epi32::<1>(hb);
            for (mut v, at) in [(lo, 4 * c), (hi, 16 + 4 * c)] {
                for j in 0..4 {
                    let q = _mm512_cvtepi32_ps(_mm512_and_si512(v, byte));
                    v = _mm512_srli_epi32::<8>(v);
                    _mm512_storeu_ps(out.add((at + j) * stride), _mm512_fmadd_ps(d, q, m));
                }
            }
        }
    }
}

/// The reordered high bits shifted so that bit 4 of each byte holds half-chunk `4 * half`'s
/// bit; each right shift by one then brings the next half-chunk's. (One shift for all eight
/// would push byte 3's upper bits out of the lane.)
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn high_bits(qh: std::arch::x86_64::__m256i, half: usize) -> std::arch::x86_64::__m256i {
    if half == 0 {
        std::arch::x86_64::_mm256_slli_epi32::<4>(qh)
    } else {
        qh
    }
}

/// Adds the four values per lane of `v` (byte `j` of lane `r` is row `r`'s 5-bit value at
/// column `at + j`) times the activations to the sums.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exact_bytes<const N: usize>(
    mut v: std::arch::x86_64::__m256i,
    d: std::arch::x86_64::__m256,
    m: std::arch::x86_64::__m256,
    x: &[&[f32]; N],
    at: usize,
    acc: &mut [std::arch::x86_64::__m256; N],
) {
    use std::arch::x86_64::*;
    let byte = _mm256_set1_epi32(0xff);
    for j in 0..4 {
        let q = _mm256_cvtepi32_ps(_mm256_and_si256(v, byte));
        v = _mm256_srli_epi32::<8>(v);
        let w = _mm256_fmadd_ps(d, q, m);
        super::x8::add_column(w, x, at + j, acc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    #[test]
    fn q5_0_in_eight_row_groups_holds() {
        crate::quant::x8::tests::x8_format_holds::<Q5_0x8>(
            GgmlDType::Q5_0,
            crate::quant::q5_0::dot_scalar,
        );
    }
}
