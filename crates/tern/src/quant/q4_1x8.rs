//! GGML `Q4_1` matrices repacked eight weight rows at a time, for batched decode.
//!
//! The row-layout kernel (`q4_1.rs`) spends four vector operations per (weight row, activation
//! row, block): a multiply-add of bytes, one of words, a conversion and a float multiply-add,
//! then a horizontal sum per row. Past a few activation rows that work, not memory, sets the
//! pace: eight decode rows cost ~4.4x one. Here each 32-byte load holds four consecutive
//! values of eight weight rows, so one byte multiply-add against a broadcast of four
//! activation bytes serves eight weight rows, the block's eight products are summed in 16-bit
//! lanes (they cannot overflow: 8 x 2 x 15 x 127 < 2^15), and the block scale and min are
//! applied to eight rows by one float operation each. The idea is llama.cpp's interleaved
//! `q4_0_8x8` layout; the code is ours. The bytes and the memory are the same as Q4_1's, only
//! reordered.
//!
//! Layout, per group of eight rows and per block (160 bytes, = 8 x 20): the eight rows' f16
//! scales, their eight f16 mins, then four 32-byte chunks; chunk `c` holds bytes `4c..4c+4`
//! of each row's 16 nibble bytes, row after row. The low nibbles of chunk `c` are values
//! `4c..4c+4`, the high ones values `16+4c..16+4c+4` (ggml's nibble order).

use super::int8::{quantize_row, Q8Row};
use super::{q4_1, use_avx2, RowKernel, BLOCK, ROW_GROUP};
use crate::error::Result;
use candle_core::{Device, Tensor};
use half::f16;

/// Weight rows interleaved together.
pub const ROWS: usize = 8;
/// Bytes per group block: eight Q4_1 blocks.
const GROUP_BLOCK_BYTES: usize = ROWS * q4_1::BLOCK_BYTES;
/// Groups of eight rows per pool task (32 rows, as the row-layout kernel).
const GROUPS_PER_TASK: usize = 4;

/// A `[rows, cols]` Q4_1 matrix with its rows interleaved eight at a time.
#[derive(Debug, Clone)]
pub struct Q4_1x8Matrix {
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl Q4_1x8Matrix {
    /// Repacks ggml Q4_1 bytes of a `[rows, cols]` matrix; `rows` must be a multiple of 8
    /// (otherwise use the row-layout [`q4_1::Q4_1Matrix`]).
    pub fn new(rows: usize, cols: usize, data: &[u8]) -> Result<Self> {
        let nb = cols / BLOCK;
        if !rows.is_multiple_of(ROWS)
            || !cols.is_multiple_of(BLOCK)
            || data.len() != rows * nb * q4_1::BLOCK_BYTES
        {
            return Err(crate::TernError::InvalidArgument(format!(
                "Q4_1x8 matrix [{rows}, {cols}] needs rows % {ROWS} == 0, cols % {BLOCK} == 0 \
                 and {} bytes, got {}",
                rows * nb * q4_1::BLOCK_BYTES,
                data.len()
            )));
        }
        let row_bytes = nb * q4_1::BLOCK_BYTES;
        let mut out = vec![0u8; data.len()];
        for (g, dst) in out.chunks_exact_mut(nb * GROUP_BLOCK_BYTES).enumerate() {
            for (b, gb) in dst.chunks_exact_mut(GROUP_BLOCK_BYTES).enumerate() {
                for r in 0..ROWS {
                    let src = &data[(g * ROWS + r) * row_bytes + b * q4_1::BLOCK_BYTES..]
                        [..q4_1::BLOCK_BYTES];
                    gb[2 * r..2 * r + 2].copy_from_slice(&src[0..2]);
                    gb[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&src[2..4]);
                    for c in 0..4 {
                        let at = 32 + 32 * c + 4 * r;
                        gb[at..at + 4].copy_from_slice(&src[4 + 4 * c..8 + 4 * c]);
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

    /// The bytes of group `g` (rows `8g..8g+8`), block after block.
    fn group(&self, g: usize) -> &[u8] {
        let n = self.cols / BLOCK * GROUP_BLOCK_BYTES;
        &self.data[g * n..(g + 1) * n]
    }

    /// Row `r % 8` of group block `gb`: scale, min and the value at each of 32 positions.
    fn unpack(gb: &[u8], r: usize) -> (f32, f32, [u8; BLOCK]) {
        let d = f16::from_le_bytes([gb[2 * r], gb[2 * r + 1]]).to_f32();
        let m = f16::from_le_bytes([gb[16 + 2 * r], gb[17 + 2 * r]]).to_f32();
        let mut q = [0u8; BLOCK];
        for c in 0..4 {
            for i in 0..4 {
                let byte = gb[32 + 32 * c + 4 * r + i];
                q[4 * c + i] = byte & 0x0f;
                q[16 + 4 * c + i] = byte >> 4;
            }
        }
        (d, m, q)
    }

    /// Portable reference: row `r` times `x`, summed as the row-layout scalar kernel does.
    fn dot_scalar(&self, r: usize, x: &Q8Row) -> f32 {
        let mut acc = 0f32;
        for (b, gb) in self
            .group(r / ROWS)
            .chunks_exact(GROUP_BLOCK_BYTES)
            .enumerate()
        {
            let (d, m, q) = Self::unpack(gb, r % ROWS);
            let xq = &x.q[b * BLOCK..(b + 1) * BLOCK];
            let sumi: i32 = q.iter().zip(xq).map(|(&w, &v)| w as i32 * v as i32).sum();
            acc += d * x.d[b] * sumi as f32 + m * x.s[b];
        }
        acc
    }
}

/// The eight rows of `group` times `N` activation rows; `out[k]` receives row `k`'s eight
/// results. The same code serves every `N`, so a row gives the same bits batched or alone.
///
/// # Safety
/// The CPU must support avx2, fma and f16c; `group` holds `x[k].d.len()` group blocks and each
/// `out[k]` has room for 8 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots8_avx2<const N: usize>(group: &[u8], x: [&Q8Row; N], out: [*mut f32; N]) {
    use std::arch::x86_64::*;
    let low = _mm256_set1_epi8(0x0f);
    let mut acc = [_mm256_setzero_ps(); N];
    for (b, gb) in group.chunks_exact(GROUP_BLOCK_BYTES).enumerate() {
        let p = gb.as_ptr();
        let mut s16 = [_mm256_setzero_si256(); N];
        for c in 0..4 {
            let packed = _mm256_loadu_si256(p.add(32 + 32 * c) as *const __m256i);
            let lo = _mm256_and_si256(packed, low);
            let hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
            for k in 0..N {
                let xq = x[k].q.as_ptr().add(b * BLOCK);
                let xl = _mm256_set1_epi32((xq.add(4 * c) as *const i32).read_unaligned());
                let xh = _mm256_set1_epi32((xq.add(16 + 4 * c) as *const i32).read_unaligned());
                let pair =
                    _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
                s16[k] = _mm256_add_epi16(s16[k], pair);
            }
        }
        let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
        let m = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i));
        for k in 0..N {
            let sum = _mm256_madd_epi16(s16[k], _mm256_set1_epi16(1));
            let scale = _mm256_mul_ps(d, _mm256_set1_ps(x[k].d[b]));
            acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, acc[k]);
            acc[k] = _mm256_fmadd_ps(m, _mm256_set1_ps(x[k].s[b]), acc[k]);
        }
    }
    for k in 0..N {
        _mm256_storeu_ps(out[k], acc[k]);
    }
}

/// The eight rows of `group` times `N` f32 activation rows, exact to the stored weights: each
/// weight is rebuilt as `d * q + m` (one rounding, as [`RowKernel::dequantize`] gives it) and
/// multiplied in f32, so prefill needs no dequantized copy of the matrix. `out[k]` receives
/// row `k`'s eight results; every `N` gives a row the same bits.
///
/// # Safety
/// The CPU must support avx2, fma and f16c; each `x[k]` holds the group's columns and each
/// `out[k]` has room for 8 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exact8_avx2<const N: usize>(group: &[u8], x: [&[f32]; N], out: [*mut f32; N]) {
    use std::arch::x86_64::*;
    let low = _mm256_set1_epi32(0x0f);
    let mut acc = [_mm256_setzero_ps(); N];
    for (b, gb) in group.chunks_exact(GROUP_BLOCK_BYTES).enumerate() {
        let p = gb.as_ptr();
        let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
        let m = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i));
        for c in 0..4 {
            // Lane r holds row r's four bytes of the chunk: nibble j (bits 4j..4j+4) is value
            // 4c + j/2 when j is even (a low nibble), 16 + 4c + j/2 when odd. (Unrolled by
            // hand, with constant offsets, LLVM hoisted the activation loads until the sums
            // spilled, and prompts ran 15-25% slower.)
            let mut lanes = _mm256_loadu_si256(p.add(32 + 32 * c) as *const __m256i);
            for j in 0..8 {
                let q = _mm256_cvtepi32_ps(_mm256_and_si256(lanes, low));
                lanes = _mm256_srli_epi32::<4>(lanes);
                let w = _mm256_fmadd_ps(d, q, m);
                let e = b * BLOCK + if j % 2 == 0 { 4 * c } else { 16 + 4 * c } + j / 2;
                for k in 0..N {
                    acc[k] = _mm256_fmadd_ps(w, _mm256_set1_ps(*x[k].get_unchecked(e)), acc[k]);
                }
            }
        }
    }
    for k in 0..N {
        _mm256_storeu_ps(out[k], acc[k]);
    }
}

impl Q4_1x8Matrix {
    /// `out[j * rows + r] = W[r] · xs[j]` in f32, exact to the stored weights (the prefill
    /// path: no int8 rounding of the activations, and no dequantized copy of the matrix).
    fn matmul_exact(&self, xs: &[f32], m: usize, out: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        assert_eq!((xs.len(), out.len()), (m * cols, m * rows));
        let x = |j: usize| &xs[j * cols..(j + 1) * cols];
        self.for_groups(out, |g, at| {
            let group = self.group(g);
            #[cfg(target_arch = "x86_64")]
            if use_avx2() {
                let mut j = 0;
                // SAFETY (each call): avx2, fma and f16c are present; every x row has `cols`
                // values, and `at` gives this group's disjoint 8-value run of each output row.
                while j + 8 <= m {
                    unsafe {
                        exact8_avx2::<8>(
                            group,
                            std::array::from_fn(|k| x(j + k)),
                            std::array::from_fn(|k| at(j + k)),
                        )
                    };
                    j += 8;
                }
                while j + ROW_GROUP <= m {
                    unsafe {
                        exact8_avx2::<ROW_GROUP>(
                            group,
                            std::array::from_fn(|k| x(j + k)),
                            std::array::from_fn(|k| at(j + k)),
                        )
                    };
                    j += ROW_GROUP;
                }
                for j in j..m {
                    unsafe { exact8_avx2::<1>(group, [x(j)], [at(j)]) };
                }
                return;
            }
            for j in 0..m {
                for i in 0..ROWS {
                    let v = self.dot_exact_scalar(g * ROWS + i, x(j));
                    // SAFETY: as above.
                    unsafe { *at(j).add(i) = v };
                }
            }
        });
    }

    /// Portable reference of the exact product of row `r` with `x`.
    fn dot_exact_scalar(&self, r: usize, x: &[f32]) -> f32 {
        let mut acc = 0f32;
        for (b, gb) in self
            .group(r / ROWS)
            .chunks_exact(GROUP_BLOCK_BYTES)
            .enumerate()
        {
            let (d, m, q) = Self::unpack(gb, r % ROWS);
            for (i, &q) in q.iter().enumerate() {
                acc += (d * q as f32 + m) * x[b * BLOCK + i];
            }
        }
        acc
    }

    /// Runs `f(g, at)` for every group `g` on the worker pool, `GROUPS_PER_TASK` groups per
    /// task; `at(j)` points at activation row `j`'s results for the group's eight rows.
    fn for_groups(&self, out: &mut [f32], f: impl Fn(usize, &dyn Fn(usize) -> *mut f32) + Sync) {
        let rows = self.rows;
        let groups = rows / ROWS;
        let out_ptr = out.as_mut_ptr() as usize;
        candle_core::utils::barrier_pool().execute_chunked(
            groups.div_ceil(GROUPS_PER_TASK),
            |range| {
                let task = range.start * GROUPS_PER_TASK..(range.end * GROUPS_PER_TASK).min(groups);
                for g in task {
                    // Tasks cover disjoint groups, so each 8-value run has one writer; `out`
                    // outlives the call, which returns only when every task is done.
                    f(g, &|j| {
                        (out_ptr as *mut f32).wrapping_add(j * rows + g * ROWS)
                    });
                }
            },
        );
    }
}

impl RowKernel for Q4_1x8Matrix {
    fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn matmul_rows(&self, xs: &[f32], m: usize, out: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        assert_eq!((xs.len(), out.len()), (m * cols, m * rows));
        let xq: Vec<Q8Row> = xs.chunks_exact(cols).map(quantize_row).collect();
        self.for_groups(out, |g, at| {
            let group = self.group(g);
            #[cfg(target_arch = "x86_64")]
            if use_avx2() {
                let mut j = 0;
                // SAFETY (each call): avx2, fma and f16c are present; the activation rows
                // have the group's blocks, and `at` gives this group's disjoint 8-value run
                // of each output row.
                while j + ROW_GROUP <= m {
                    unsafe {
                        dots8_avx2::<ROW_GROUP>(
                            group,
                            std::array::from_fn(|k| &xq[j + k]),
                            std::array::from_fn(|k| at(j + k)),
                        )
                    };
                    j += ROW_GROUP;
                }
                for (j, x) in xq.iter().enumerate().skip(j) {
                    unsafe { dots8_avx2::<1>(group, [x], [at(j)]) };
                }
                return;
            }
            for (j, x) in xq.iter().enumerate() {
                for i in 0..ROWS {
                    let v = self.dot_scalar(g * ROWS + i, x);
                    // SAFETY: as above.
                    unsafe { *at(j).add(i) = v };
                }
            }
        });
    }

    fn matmul_exact_rows(&self, xs: &[f32], m: usize, out: &mut [f32]) -> bool {
        self.matmul_exact(xs, m, out);
        true
    }

    fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let (rows, cols) = (self.rows, self.cols);
        let mut v = vec![0f32; rows * cols];
        for g in 0..rows / ROWS {
            for (b, gb) in self.group(g).chunks_exact(GROUP_BLOCK_BYTES).enumerate() {
                for r in 0..ROWS {
                    let (d, m, q) = Self::unpack(gb, r);
                    let dst = &mut v[(g * ROWS + r) * cols + b * BLOCK..][..BLOCK];
                    for (o, &q) in dst.iter_mut().zip(&q) {
                        *o = d * q as f32 + m;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(v, (rows, cols), device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::q4_1::tests::det_values;
    use crate::quant::q4_1::Q4_1Matrix;
    use candle_core::quantized::{GgmlDType, QTensor};

    fn pair(rows: usize, cols: usize) -> (Q4_1x8Matrix, Q4_1Matrix, QTensor) {
        let w = Tensor::from_vec(det_values(rows * cols, 3), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let bytes = q.data().unwrap().to_vec();
        let x8 = Q4_1x8Matrix::new(rows, cols, &bytes).unwrap();
        (x8, Q4_1Matrix::new(rows, cols, bytes).unwrap(), q)
    }

    #[test]
    fn dequantizes_to_candles_values() {
        let (x8, _, q) = pair(24, 96);
        let a = x8.dequantize(&Device::Cpu).unwrap();
        let b = q.dequantize(&Device::Cpu).unwrap();
        assert_eq!(crate::test_util::max_abs_diff(&a, &b), 0.0);
    }

    #[test]
    fn agrees_with_the_row_layout_kernel_and_candle() {
        let (x8, rows, q) = pair(64, 576);
        // The scalar form reads the repacked bytes; the row-layout scalar kernel the originals.
        let xq = quantize_row(&det_values(576, 4));
        for r in 0..64 {
            assert_eq!(
                x8.dot_scalar(r, &xq),
                crate::quant::q4_1::dot_scalar(rows.row(r), &xq)
            );
        }
        crate::quant::tests::int8_kernel_agrees(&x8, q, |r, x| x8.dot_scalar(r, x));
    }

    #[test]
    fn exact_product_is_the_dequantized_product_and_the_same_for_any_row_count() {
        let (rows, cols) = (48, 576);
        let (x8, _, _) = pair(rows, cols);
        let deq = x8.dequantize(&Device::Cpu).unwrap();
        let xs = det_values(17 * cols, 8);
        let mut alone = vec![0f32; 17 * rows];
        for j in 0..17 {
            assert!(x8.matmul_exact_rows(
                &xs[j * cols..(j + 1) * cols],
                1,
                &mut alone[j * rows..(j + 1) * rows]
            ));
        }
        // Every row count (8-row, 4-row and single-row kernels mixed) gives each row the bits
        // it gets alone.
        for m in [2, 4, 5, 8, 9, 12, 17] {
            let mut out = vec![0f32; m * rows];
            assert!(x8.matmul_exact_rows(&xs[..m * cols], m, &mut out));
            assert_eq!(out, alone[..m * rows], "m = {m}");
        }
        let x = Tensor::from_vec(xs, (17, cols), &Device::Cpu).unwrap();
        let exact = x.matmul(&deq.t().unwrap()).unwrap();
        let ours = x8.forward_exact(&x).unwrap().unwrap();
        // Only f32 summation order separates them: ~1e-5 on sums of 576 products of ~3.
        assert!(crate::test_util::max_abs_diff(&ours, &exact) < 1e-3);
        let xr = x.get(3).unwrap().to_vec1::<f32>().unwrap();
        for r in 0..rows {
            assert!((x8.dot_exact_scalar(r, &xr) - alone[3 * rows + r]).abs() < 1e-3);
        }
    }

    #[test]
    fn bad_shapes_are_refused() {
        let (_, rows, _) = pair(8, 64);
        let bytes = rows.row(0).to_vec();
        assert!(Q4_1x8Matrix::new(1, 64, &bytes).is_err());
        assert!(Q4_1x8Matrix::new(8, 60, &[0; 8 * 40]).is_err());
        assert!(Q4_1x8Matrix::new(8, 64, &[0; 8 * 40 - 1]).is_err());
    }
}
