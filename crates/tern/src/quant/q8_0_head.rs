//! GGML `Q8_0` as the output head: exact products (f32 activations) over weight rows
//! interleaved sixteen at a time by column.
//!
//! The head is multiplied exactly (see `q8_0.rs`), so its cost is f32 multiply-adds: 28M per
//! activation row on SmolLM2, a quarter of a batched decode step. In the row layout each FMA
//! also needed the activations loaded again and the sums reduced across lanes per row. Here
//! byte `16e + r` of a pair block is row `r`'s value `e`, so one widening load gives column
//! `e` of sixteen rows (a 512-bit vector; 256-bit kernels take eight of them, a group) and
//! one FMA against a broadcast activation serves all of them. With few
//! activation rows, several groups run together so that enough independent FMA chains are in
//! flight; every output sees the same operations in the same order however it is grouped, so
//! a row gives the same bits batched or alone. Bytes are the format's own, only reordered.

use super::{use_avx2, use_vnni, RowKernel, BLOCK};
use crate::error::{Result, TernError};
use candle_core::{Device, Tensor};
use half::f16;
use std::ops::Range;

/// Weight rows of a group: one 256-bit vector of results.
const ROWS: usize = 8;
/// Rows interleaved together: two groups, one 512-bit vector.
const PAIR_ROWS: usize = 2 * ROWS;
/// Bytes of one pair block: sixteen f16 scales, then 32 columns of sixteen int8 values. (With
/// each group's bytes on their own, a 512-bit kernel assembled every column from two 8-byte
/// loads: one single-row decode step spent ~30% of its time in the head, at ~5 vector
/// operations per 16 multiply-adds; one 16-byte widening load makes that 3.)
const PAIR_BLOCK: usize = 2 * PAIR_ROWS + BLOCK * PAIR_ROWS;
/// Groups per pool task (128 rows).
const GROUPS_PER_TASK: usize = 16;
/// How far ahead of the block being read the weights are prefetched, in bytes.
const PREFETCH: usize = 8192;

/// A `[rows, cols]` Q8_0 matrix laid out for exact products (the output head).
#[derive(Debug, Clone)]
pub struct Q8_0Head {
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl Q8_0Head {
    /// Repacks ggml Q8_0 bytes of a `[rows, cols]` matrix; `rows` must be a multiple of 8
    /// (an odd last group is padded with zero rows whose results are never stored).
    pub fn new(rows: usize, cols: usize, data: &[u8]) -> Result<Self> {
        let bb = super::q8_0::BLOCK_BYTES;
        let nb = cols / BLOCK;
        if !rows.is_multiple_of(ROWS) || !cols.is_multiple_of(BLOCK) || data.len() != rows * nb * bb
        {
            return Err(TernError::InvalidArgument(format!(
                "Q8_0 head [{rows}, {cols}] needs rows % {ROWS} == 0, cols % {BLOCK} == 0 and {} \
                 bytes, got {}",
                rows * nb * bb,
                data.len()
            )));
        }
        let mut out = vec![0u8; rows.div_ceil(PAIR_ROWS) * nb * PAIR_BLOCK];
        for (pair, dst) in out.chunks_exact_mut(nb * PAIR_BLOCK).enumerate() {
            for (b, pb) in dst.chunks_exact_mut(PAIR_BLOCK).enumerate() {
                for r in 0..PAIR_ROWS.min(rows - pair * PAIR_ROWS) {
                    let src = &data[((pair * PAIR_ROWS + r) * nb + b) * bb..][..bb];
                    pb[2 * r..2 * r + 2].copy_from_slice(&src[..2]);
                    for e in 0..BLOCK {
                        pb[2 * PAIR_ROWS + PAIR_ROWS * e + r] = src[2 + e];
                    }
                }
            }
        }
        Ok(Self {
            rows,
            cols,
            data: out,
        })
    }

    /// The bytes of the pair holding rows `16p..16p+16`, block after block.
    fn pair(&self, p: usize) -> &[u8] {
        let n = self.cols / BLOCK * PAIR_BLOCK;
        &self.data[p * n..(p + 1) * n]
    }

    /// Group `g` (rows `8g..8g+8`): its pair's bytes and which half of each pair block.
    fn group(&self, g: usize) -> Group<'_> {
        (self.pair(g / 2), g % 2)
    }

    /// Row `r`'s value at column `c`, as the block stores it: `(scale, q)`.
    fn value(&self, r: usize, c: usize) -> (f32, i8) {
        let pb = &self.pair(r / PAIR_ROWS)[c / BLOCK * PAIR_BLOCK..][..PAIR_BLOCK];
        let i = r % PAIR_ROWS;
        let d = f16::from_le_bytes([pb[2 * i], pb[2 * i + 1]]).to_f32();
        (d, pb[2 * PAIR_ROWS + PAIR_ROWS * (c % BLOCK) + i] as i8)
    }

    /// Portable form of the kernel's arithmetic for row `r`.
    fn dot_scalar(&self, r: usize, x: &[f32]) -> f32 {
        let mut acc = 0f32;
        for b in 0..self.cols / BLOCK {
            let mut s = 0f32;
            for e in 0..BLOCK {
                let c = b * BLOCK + e;
                s = (self.value(r, c).1 as f32).mul_add(x[c], s);
            }
            acc = s.mul_add(self.value(r, b * BLOCK).0, acc);
        }
        acc
    }

    /// Groups `gs` times activation rows `x`, `G` groups per kernel call; `at(k, g)` points at
    /// row `k`'s eight results for group `g`.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn sweep<const G: usize, const N: usize>(
        &self,
        gs: Range<usize>,
        x: [&[f32]; N],
        at: &dyn Fn(usize, usize) -> *mut f32,
        wide: bool,
    ) {
        let mut g = gs.start;
        while g + G <= gs.end {
            let groups = std::array::from_fn(|i| self.group(g + i));
            let out = std::array::from_fn(|i| std::array::from_fn(|k| at(k, g + i)));
            if wide {
                cols_avx512::<G, N>(groups, x, out)
            } else {
                cols_avx2::<G, N>(groups, x, out)
            }
            g += G;
        }
        for g in g..gs.end {
            let out = [std::array::from_fn(|k| at(k, g))];
            if wide {
                cols_avx512::<1, N>([self.group(g)], x, out)
            } else {
                cols_avx2::<1, N>([self.group(g)], x, out)
            }
        }
    }

    /// [`Self::sweep`] through [`cols16`]: `P` pairs of groups per call, the groups left
    /// over through [`cols_avx512`]. `gs` starts at an even group (a pair's first).
    ///
    /// # Safety
    /// As [`cols16`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn sweep16<const P: usize, const N: usize>(
        &self,
        gs: Range<usize>,
        x: [&[f32]; N],
        at: &dyn Fn(usize, usize) -> *mut f32,
    ) {
        debug_assert!(gs.start.is_multiple_of(2));
        let mut g = gs.start;
        while g + 2 * P <= gs.end {
            let groups = std::array::from_fn(|i| self.pair(g / 2 + i));
            let out = std::array::from_fn(|i| {
                [0, 1].map(|h| std::array::from_fn(|k| at(k, g + 2 * i + h)))
            });
            cols16::<P, N>(groups, x, out);
            g += 2 * P;
        }
        for g in g..gs.end {
            cols_avx512::<1, N>([self.group(g)], x, [std::array::from_fn(|k| at(k, g))]);
        }
    }
}

/// A group: its pair's bytes and its half of them (0: the pair's rows 0-7, 1: rows 8-15).
type Group<'a> = (&'a [u8], usize);

/// Eight weight rows of each of `G` groups times `N` activation rows:
/// `out[i][k]` receives group `i`'s eight results for row `k`.
///
/// # Safety
/// AVX2, FMA and F16C must be present (the callers enable them); the groups have equally many
/// blocks, each `x[k]` that many columns, and each `out[i][k]` room for eight values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn cols<const G: usize, const N: usize>(
    groups: [Group<'_>; G],
    x: [&[f32]; N],
    out: [[*mut f32; N]; G],
) {
    use std::arch::x86_64::*;
    let nb = groups[0].0.len() / PAIR_BLOCK;
    let mut acc = [[_mm256_setzero_ps(); N]; G];
    for b in 0..nb {
        // Group `i`'s half of its pair block: scales at `p[i] + 16 h`, column `e` at
        // `p[i] + 32 + 16 e + 8 h`.
        let p: [*const u8; G] = std::array::from_fn(|i| groups[i].0.as_ptr().add(b * PAIR_BLOCK));
        for (i, pi) in p.into_iter().enumerate() {
            // A pair's two groups read one pair block: prefetch it once.
            if i > 0 && pi == p[i - 1] {
                continue;
            }
            for l in 0..PAIR_BLOCK.div_ceil(64) {
                _mm_prefetch::<_MM_HINT_T0>(pi.wrapping_add(PREFETCH + 64 * l) as *const i8);
            }
        }
        let mut s = [[_mm256_setzero_ps(); N]; G];
        for e in 0..BLOCK {
            let w: [__m256; G] = std::array::from_fn(|i| {
                let at = p[i].add(2 * PAIR_ROWS + PAIR_ROWS * e + ROWS * groups[i].1);
                let q = _mm_loadl_epi64(at as *const __m128i);
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))
            });
            for k in 0..N {
                let xv = _mm256_set1_ps(*x[k].get_unchecked(b * BLOCK + e));
                for i in 0..G {
                    s[i][k] = _mm256_fmadd_ps(w[i], xv, s[i][k]);
                }
            }
        }
        for i in 0..G {
            let at = p[i].add(2 * ROWS * groups[i].1);
            let d = _mm256_cvtph_ps(_mm_loadu_si128(at as *const __m128i));
            for k in 0..N {
                acc[i][k] = _mm256_fmadd_ps(s[i][k], d, acc[i][k]);
            }
        }
    }
    for i in 0..G {
        for k in 0..N {
            _mm256_storeu_ps(out[i][k], acc[i][k]);
        }
    }
}

/// [`cols`] compiled for AVX2 (16 vector registers: at most 4 rows x groups).
///
/// # Safety
/// As [`cols`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn cols_avx2<const G: usize, const N: usize>(
    groups: [Group<'_>; G],
    x: [&[f32]; N],
    out: [[*mut f32; N]; G],
) {
    cols::<G, N>(groups, x, out)
}

/// [`cols`] with AVX-512's 32 vector registers (8 rows x groups); the same operations.
///
/// # Safety
/// As [`cols`], and the CPU must support avx512f and avx512vl.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
unsafe fn cols_avx512<const G: usize, const N: usize>(
    groups: [Group<'_>; G],
    x: [&[f32]; N],
    out: [[*mut f32; N]; G],
) {
    cols::<G, N>(groups, x, out)
}

/// [`cols`] with 512-bit vectors over `P` pairs of groups: lane `r` of pair `i` is the pair's
/// row `r` (group `2i`'s rows, then group `2i + 1`'s), and each lane runs [`cols`]'
/// operations in its order, so the bits are the same. Intel cores run 512-bit FMAs at twice
/// the 256-bit rate (two ports at full width, where 256-bit ones get two of three ports at
/// half); AMD's Zen 4 runs either at one rate.
///
/// # Safety
/// As [`cols`], and the CPU must support avx512f.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
unsafe fn cols16<const P: usize, const N: usize>(
    pairs: [&[u8]; P],
    x: [&[f32]; N],
    out: [[[*mut f32; N]; 2]; P],
) {
    use std::arch::x86_64::*;
    let nb = pairs[0].len() / PAIR_BLOCK;
    let mut acc = [[_mm512_setzero_ps(); N]; P];
    for b in 0..nb {
        let p: [*const u8; P] = std::array::from_fn(|i| pairs[i].as_ptr().add(b * PAIR_BLOCK));
        for pi in p {
            for l in 0..PAIR_BLOCK.div_ceil(64) {
                _mm_prefetch::<_MM_HINT_T0>(pi.wrapping_add(PREFETCH + 64 * l) as *const i8);
            }
        }
        let mut s = [[_mm512_setzero_ps(); N]; P];
        for e in 0..BLOCK {
            let w: [__m512; P] = std::array::from_fn(|i| {
                let q = _mm_loadu_si128(p[i].add(2 * PAIR_ROWS + PAIR_ROWS * e) as *const __m128i);
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q))
            });
            for k in 0..N {
                let xv = _mm512_set1_ps(*x[k].get_unchecked(b * BLOCK + e));
                for i in 0..P {
                    s[i][k] = _mm512_fmadd_ps(w[i], xv, s[i][k]);
                }
            }
        }
        for i in 0..P {
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(p[i] as *const __m256i));
            for k in 0..N {
                acc[i][k] = _mm512_fmadd_ps(s[i][k], d, acc[i][k]);
            }
        }
    }
    for i in 0..P {
        for k in 0..N {
            let v = acc[i][k];
            _mm256_storeu_ps(out[i][0][k], _mm512_castps512_ps256(v));
            let hi = _mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v));
            _mm256_storeu_ps(out[i][1][k], _mm256_castpd_ps(hi));
        }
    }
}

impl RowKernel for Q8_0Head {
    fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn matmul_rows(&self, xs: &[f32], m: usize, out: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        assert_eq!((xs.len(), out.len()), (m * cols, m * rows));
        let x = |j: usize| &xs[j * cols..(j + 1) * cols];
        let groups = rows / ROWS;
        let out_ptr = out.as_mut_ptr() as usize;
        super::par_ranges(groups, GROUPS_PER_TASK, |gs| {
            #[cfg(target_arch = "x86_64")]
            if use_avx2() {
                let wide = use_vnni();
                let mut j = 0;
                // Tasks cover disjoint groups, so each 8-value run has one writer; `out`
                // outlives the call, which returns only when every task is done.
                let at = |j: usize| {
                    move |k: usize, g: usize| {
                        (out_ptr as *mut f32).wrapping_add((j + k) * rows + g * ROWS)
                    }
                };
                // SAFETY (each sweep): AVX2, FMA and F16C are present (and AVX-512 where
                // `wide`); rows and groups are in bounds, outputs as above.
                unsafe {
                    if wide {
                        while j + 8 <= m {
                            let xk = std::array::from_fn(|k| x(j + k));
                            self.sweep16::<1, 8>(gs.clone(), xk, &at(j));
                            j += 8;
                        }
                    }
                    while j + 4 <= m {
                        let xk = std::array::from_fn(|k| x(j + k));
                        if wide {
                            self.sweep16::<2, 4>(gs.clone(), xk, &at(j));
                        } else {
                            self.sweep::<1, 4>(gs.clone(), xk, &at(j), wide);
                        }
                        j += 4;
                    }
                    for j in j..m {
                        if wide {
                            self.sweep16::<4, 1>(gs.clone(), [x(j)], &at(j));
                        } else {
                            self.sweep::<4, 1>(gs.clone(), [x(j)], &at(j), wide);
                        }
                    }
                }
                return;
            }
            for g in gs {
                for j in 0..m {
                    for i in 0..ROWS {
                        let v = self.dot_scalar(g * ROWS + i, x(j));
                        // SAFETY: as above.
                        unsafe { *(out_ptr as *mut f32).add(j * rows + g * ROWS + i) = v };
                    }
                }
            }
        });
    }

    /// The head's product is exact already.
    fn matmul_exact_rows(&self, xs: &[f32], m: usize, out: &mut [f32]) -> bool {
        self.matmul_rows(xs, m, out);
        true
    }

    fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let (rows, cols) = (self.rows, self.cols);
        let mut v = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            v.extend((0..cols).map(|c| {
                let (d, q) = self.value(r, c);
                d * q as f32
            }));
        }
        Ok(Tensor::from_vec(v, (rows, cols), device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::q8_0::Q8_0Matrix;
    use candle_core::quantized::{GgmlDType, QTensor};

    /// The repacked head holds candle's values exactly, its products equal the exact product
    /// up to f32 summation order and its own scalar form closely, and every row gets the same
    /// bits at any row count (all the kernel's groupings).
    #[test]
    fn exact_products_and_the_same_bits_at_any_row_count() {
        let det = crate::quant::q4_1::tests::det_values;
        let (rows, cols) = (8 * 37, 576);
        let w = Tensor::from_vec(det(rows * cols, 9), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let bytes = q.data().unwrap().to_vec();
        let head = Q8_0Head::new(rows, cols, &bytes).unwrap();
        let deq = q.dequantize(&Device::Cpu).unwrap();
        let diff = crate::test_util::max_abs_diff;
        assert_eq!(diff(&head.dequantize(&Device::Cpu).unwrap(), &deq), 0.0);

        let xs = det(13 * cols, 10);
        let x = Tensor::from_vec(xs.clone(), (13, cols), &Device::Cpu).unwrap();
        let exact = x.matmul(&deq.t().unwrap()).unwrap();
        // Only f32 summation order separates them: ~1e-5 on sums of 576 products of ~3.
        assert!(diff(&head.forward(&x).unwrap(), &exact) < 1e-3);
        let old = Q8_0Matrix::new(rows, cols, bytes).unwrap();
        assert!(diff(&head.forward(&x).unwrap(), &old.forward(&x).unwrap()) < 1e-3);
        let mut one = vec![0f32; rows];
        head.matvec(&xs[..cols], &mut one);
        for (r, o) in one.iter().enumerate() {
            assert!(
                (head.dot_scalar(r, &xs[..cols]) - o).abs() < 1e-3,
                "row {r}"
            );
        }
        crate::quant::tests::batch_equals_single_rows(&head);
        #[cfg(target_arch = "x86_64")]
        if use_vnni() {
            // Pairs of groups in 512-bit vectors: the bits of the 256-bit kernel, in its
            // AVX-512 and AVX2 builds (37 groups: an odd one alone in the last pair).
            let x: [&[f32]; 8] = std::array::from_fn(|k| &xs[k * cols..(k + 1) * cols]);
            let outs: Vec<Vec<f32>> = (0..3)
                .map(|mode| {
                    let mut o = vec![mode as f32; 8 * rows];
                    let p = o.as_mut_ptr() as usize;
                    let at = |k: usize, g: usize| (p as *mut f32).wrapping_add(k * rows + g * ROWS);
                    let gs = 0..rows / ROWS;
                    // SAFETY: the CPU has the features; groups and outputs are in bounds.
                    unsafe {
                        match mode {
                            0 => head.sweep16::<1, 8>(gs, x, &at),
                            1 => head.sweep::<1, 8>(gs, x, &at, true),
                            _ => head.sweep::<1, 8>(gs, x, &at, false),
                        }
                    }
                    o
                })
                .collect();
            assert_eq!(outs[0], outs[1]);
            assert_eq!(outs[0], outs[2]);
        }
        assert!(Q8_0Head::new(4, 32, &[0; 4 * 34]).is_err());
        assert!(Q8_0Head::new(8, 30, &[0; 8 * 34]).is_err());
        assert!(Q8_0Head::new(8, 32, &[0; 8 * 34 - 1]).is_err());
    }
}
