//! The frozen base's products in bf16 on CPUs with AVX512-BF16 (`vdpbf16ps`: two bf16
//! products summed into each f32 lane, twice the multiply-adds of an f32 FMA per cycle).
//!
//! As torch's bf16 autocast does, both operands are rounded to bf16 and summed in f32
//! (relative error ~2e-3 against the f32 product); norms, attention, the loss and the adapter
//! stay f32. On this repo's 2-core Zen 4 machine the kernel ran SmolLM2's training shapes at
//! 280-420 GFLOP/s against 120-170 for the f32 GEMM. Not on every AVX512-BF16 core: on an
//! Intel Emerald Rapids VM `vdpbf16ps` issued at half the f32 FMA rate (86 vs 175 GFLOP/s on
//! one core), so there the f32 GEMM wins.
//!
//! Layout: `B` (the weight, fixed) is packed once into panels of [`NR`] columns holding, for
//! each pair of depth indices, the `NR` columns' two values side by side; `A` (the
//! activations) is converted row by row (a row's bf16 values in order are its pairs). A tile
//! keeps `MR x NR` sums in 24 registers; each depth pair costs 3 loads of `B`, 8 broadcasts
//! of `A` and 24 `vdpbf16ps`.

use super::{par_for, tiled_product, SyncPtr, Unfilled};

/// Rows of a tile.
const MR: usize = 8;
/// Registers of 16 columns per tile row.
const NV: usize = 3;
/// Columns of a tile.
const NR: usize = 16 * NV;

/// Whether this CPU has the instructions (AVX512-F/BW and AVX512-BF16).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Two bf16 values (round to nearest even) in one word, `lo` in the low half.
fn pair(lo: f32, hi: f32) -> u32 {
    half::bf16::from_f32(lo).to_bits() as u32 | (half::bf16::from_f32(hi).to_bits() as u32) << 16
}

/// A fixed `[k, n]` right-hand operand in bf16 panels.
#[derive(Debug)]
pub(crate) struct PackedB {
    k: usize,
    n: usize,
    /// `ceil(k / 2)`.
    k2: usize,
    /// Panel `p`, depth pair `q`, column `c` at `(p * k2 + q) * NR + c`.
    data: Vec<u32>,
}

impl PackedB {
    /// Packs `b(k, j)` for `k < depth`, `j < cols` (zero beyond).
    pub(crate) fn new(depth: usize, cols: usize, b: impl Fn(usize, usize) -> f32 + Sync) -> Self {
        let k2 = depth.div_ceil(2);
        let panels = cols.div_ceil(NR);
        let mut data = vec![0u32; panels * k2 * NR];
        let dp = SyncPtr::new(&mut data);
        par_for(panels, |p| {
            // SAFETY: panel p's words are this task's.
            let out = unsafe { dp.slice(p * k2 * NR, k2 * NR) };
            for c in 0..NR.min(cols - p * NR) {
                let j = p * NR + c;
                for q in 0..k2 {
                    let hi = if 2 * q + 1 < depth {
                        b(2 * q + 1, j)
                    } else {
                        0.0
                    };
                    out[q * NR + c] = pair(b(2 * q, j), hi);
                }
            }
        });
        Self {
            k: depth,
            n: cols,
            k2,
            data,
        }
    }

    /// `(k, n)`.
    pub(crate) fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }
}

/// `a b` for a row-major f32 `a` `[m, k]`, as a new row-major `[m, n]` buffer.
pub(crate) fn product(a: &[f32], m: usize, b: &PackedB) -> Vec<f32> {
    let (k, n, k2) = (b.k, b.n, b.k2);
    assert!(available() && a.len() == m * k);
    let blocks = m.div_ceil(MR);
    // A as bf16 rows of `k2` pairs (a row's bf16 values in order are its pairs), padded
    // with zero rows to whole blocks. Only the padding is zeroed here.
    let mut pa = Unfilled::<u32>::new(blocks * MR * k2);
    let pp = pa.ptr();
    // SAFETY: the padding rows lie inside the buffer; nothing else touches them.
    unsafe { pp.slice(m * k2, (blocks * MR - m) * k2).fill(0) };
    par_for(blocks, |blk| {
        for r in blk * MR..m.min((blk + 1) * MR) {
            // SAFETY: row r's words are this task's.
            to_bf16_pairs(&a[r * k..][..k], unsafe { pp.slice(r * k2, k2) });
        }
    });
    // SAFETY: the padding and every row of `a` were written.
    let pa = unsafe { pa.written() };
    // Not zero-filled: the tiles cover every (row, column) of the product exactly once.
    // SAFETY: `tile` writes exactly its rows x cols values.
    unsafe {
        tiled_product(m, n, (MR, NR), 1, |p, blk, _, rows, cols, c| {
            // SAFETY: `available()` holds; the tile's operands lie inside `pa` and `b.data`,
            // and its outputs inside the product (`tiled_product`'s tile).
            tile(
                pa.as_ptr().add(blk * MR * k2),
                b.data.as_ptr().add(p * k2 * NR),
                k2,
                c,
                n,
                rows,
                cols,
            )
        })
    }
}

/// `x` in bf16 as `ceil(len / 2)` pairs (the last one's high half zero for an odd length).
fn to_bf16_pairs(x: &[f32], out: &mut [u32]) {
    assert_eq!(out.len(), x.len().div_ceil(2));
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has the instructions; `to_bf16_avx512` stays inside both slices.
        done = unsafe { to_bf16_avx512(x, out) };
    }
    for (q, o) in out.iter_mut().enumerate().skip(done / 2) {
        let hi = x.get(2 * q + 1).copied().unwrap_or(0.0);
        *o = pair(x[2 * q], hi);
    }
}

/// The first multiple of 32 values of `x` into `out`; returns how many values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn to_bf16_avx512(x: &[f32], out: &mut [u32]) -> usize {
    use std::arch::x86_64::*;
    let n = x.len() / 32 * 32;
    for i in (0..n).step_by(32) {
        let lo = _mm512_loadu_ps(x.as_ptr().add(i));
        let hi = _mm512_loadu_ps(x.as_ptr().add(i + 16));
        let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(out.as_mut_ptr().add(i / 2).cast(), v);
    }
    n
}

/// One `rows x cols` tile (at most `MR x NR`) of the product into `c` (row stride `ldc`);
/// `a` holds `MR` rows of `k2` pairs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn tile(
    a: *const u32,
    b: *const u32,
    k2: usize,
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    for q in 0..k2 {
        let bp = b.add(q * NR);
        let bv: [__m512bh; NV] =
            std::array::from_fn(|v| std::mem::transmute(_mm512_loadu_si512(bp.add(16 * v).cast())));
        for (i, row) in acc.iter_mut().enumerate() {
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(i * k2 + q) as i32));
            for (s, bvv) in row.iter_mut().zip(bv) {
                *s = _mm512_dpbf16_ps(*s, av, bvv);
            }
        }
    }
    let mut t = [0f32; NR];
    for (i, row) in acc.iter().enumerate().take(rows) {
        for (v, s) in row.iter().enumerate() {
            _mm512_storeu_ps(t.as_mut_ptr().add(16 * v), *s);
        }
        std::ptr::copy_nonoverlapping(t.as_ptr(), c.add(i * ldc), cols);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile(_: *const u32, _: *const u32, _: usize, _: *mut f32, _: usize, _: usize, _: usize) {
    unreachable!("bf16 products need x86-64 AVX512-BF16")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the f32 product of the bf16-rounded operands (the only difference is the
    /// summation order): ragged rows, columns and an odd depth.
    #[test]
    fn bf16_product_matches_the_rounded_f32_product() {
        if !available() {
            eprintln!("no AVX512-BF16 here; skipped");
            return;
        }
        let (m, k, n) = (19, 77, 101);
        let f = crate::model::train_ops::tests::spread;
        let a: Vec<f32> = (0..m * k).map(|i| f(i, 1)).collect();
        let w: Vec<f32> = (0..n * k).map(|i| f(i, 7)).collect(); // [n, k]: b = w^T
        let b = PackedB::new(k, n, |kk, j| w[j * k + kk]);
        let got = product(&a, m, &b);
        let r = |x: f32| half::bf16::from_f32(x).to_f32() as f64;
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|kk| r(a[i * k + kk]) * r(w[j * k + kk])).sum();
                let d = (got[i * n + j] as f64 - want).abs();
                assert!(
                    d < 1e-4 * (1.0 + want.abs()),
                    "({i}, {j}): {} vs {want}",
                    got[i * n + j]
                );
            }
        }
    }
}
