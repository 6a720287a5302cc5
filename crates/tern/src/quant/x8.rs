//! Block formats repacked eight weight rows at a time: the matrix, its driver and what every
//! format shares.
//!
//! The row-layout int8 kernels (`int8.rs`) spend four or more vector operations per (weight
//! row, activation row, block), then a horizontal sum per row. Past a few activation rows that
//! work, not memory, set the pace: eight decode rows cost ~4.4x one on SmolLM2 Q4_1. Here a
//! group block holds the same 32 values of eight rows, four consecutive values per row in each
//! 32-byte chunk, so one byte multiply-add against a broadcast of four activation bytes serves
//! eight weight rows, and block scales apply to eight rows in one float operation. The same
//! layout gives prefill an exact f32 product that never holds a dequantized copy of the whole
//! matrix (at most a pool task's 32 rows, `x8_panel.rs`). The idea is llama.cpp's interleaved
//! `q4_0_8x8` layout; the code is ours. Bytes and memory are the format's own, only reordered.

use super::int8::{with_quantized, Q8Row};
use super::{par_ranges, use_avx2, use_vnni, RowKernel, BLOCK, ROW_GROUP};
use crate::error::Result;
use candle_core::{Device, Tensor};
use std::marker::PhantomData;

pub(crate) use super::x8_shared::{groups_dots, matmul_rows_shared, matmul_swiglu};

/// Weight rows interleaved together.
pub const ROWS: usize = 8;
/// Groups of eight rows per pool task (32 rows, as the row-layout kernels).
pub(crate) const GROUPS_PER_TASK: usize = 4;

/// A 32-value block format in its eight-row layout.
pub trait X8Format: std::fmt::Debug + Send + Sync + 'static {
    /// The format's name in errors (`Q4_1`).
    const NAME: &'static str;
    /// Bytes of one ggml block; a group block is eight of them.
    const BLOCK_BYTES: usize;
    /// Writes the group block `dst` from the eight rows' ggml blocks.
    fn repack(src: [&[u8]; ROWS], dst: &mut [u8]);
    /// Row `r` of group block `gb`: `(d, m, q)` with value `i` equal to `d * q[i] + m`.
    fn unpack(gb: &[u8], r: usize) -> (f32, f32, [i8; BLOCK]);
    /// The group's eight rows times `N` int8 activation rows; `out[k]` receives row `k`'s
    /// eight results. Inlined into [`dots8_avx2`], which enables AVX2; the same code serves
    /// every `N`, so a row gives the same bits batched or alone.
    ///
    /// # Safety
    /// Only to be called from [`dots8_avx2`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn dots8<const N: usize>(group: &[u8], x: [&Q8Row; N], out: [*mut f32; N]);
    /// [`X8Format::dots8`] for CPUs with AVX512-VNNI, inlined into [`dots8_vnni`]: the same
    /// integer block sums, so the same bits as `dots8`. By default `dots8` itself, which
    /// still gains AVX-512's 32 registers (eight activation rows in one pass).
    ///
    /// # Safety
    /// Only to be called from [`dots8_vnni`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dots8_vnni<const N: usize>(group: &[u8], x: [&Q8Row; N], out: [*mut f32; N]) {
        Self::dots8::<N>(group, x, out)
    }
    /// [`X8Format::dots8_vnni`] for two groups, `g0` and `g1`: `out[k]` receives row `k`'s
    /// sixteen results (`g0`'s eight, then `g1`'s). Inlined into [`dots16_vnni`]; by default
    /// two calls of `dots8_vnni`, and a format's own body must give the same bits.
    ///
    /// # Safety
    /// Only to be called from [`dots16_vnni`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn dots16_vnni<const N: usize>(
        g0: &[u8],
        g1: &[u8],
        x: [&Q8Row; N],
        out: [*mut f32; N],
    ) {
        Self::dots8_vnni::<N>(g0, x, out);
        Self::dots8_vnni::<N>(g1, x, out.map(|p| p.wrapping_add(ROWS)));
    }
    /// As [`X8Format::dots8`] with f32 activations, exact to the stored weights (each weight
    /// rebuilt as [`RowKernel::dequantize`] gives it). Inlined into [`exact8_avx2`].
    ///
    /// # Safety
    /// Only to be called from [`exact8_avx2`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn exact8<const N: usize>(group: &[u8], x: [&[f32]; N], out: [*mut f32; N]);
    /// Writes block `b0` of one group and `b1` of another as the stored weights in f32:
    /// column `e` (of the block's 32) at `out + e * stride`, `b0`'s eight rows then `b1`'s,
    /// each weight as [`RowKernel::dequantize`] gives it. Inlined into the panel fill of the
    /// exact product (`x8_panel.rs`).
    ///
    /// # Safety
    /// Only to be called from a function that enables AVX-512F and F16C; `out + e * stride`
    /// has room for sixteen values for every `e < 32`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn dequant16(b0: &[u8], b1: &[u8], out: *mut f32, stride: usize);
}

/// Calls `$kernel::<F, W>` for the pass width `W` equal to `$n` among the listed ones, with
/// the leading arguments, then the activation rows `x(0..W)` and outputs `at(j..j + W)` as
/// arrays (a kernel's width is a const parameter, so each width is its own arm).
#[cfg(target_arch = "x86_64")]
macro_rules! by_width {
    ($n:expr, $call:tt, $($w:literal)*) => {
        match $n {
            $($w => by_width!(@call $w, $call),)*
            n => unreachable!("{n} rows in one pass"),
        }
    };
    (@call $w:literal, ($kernel:ident($($lead:expr),+; $x:expr, $j:expr, $at:expr))) => {
        $kernel::<F, $w>(
            $($lead,)+
            std::array::from_fn($x),
            std::array::from_fn(|k| $at($j + k)),
        )
    };
}

/// [`X8Format::dots8`] compiled for AVX2.
///
/// # Safety
/// The CPU must support avx2, fma and f16c; `group` holds `x[k].d.len()` group blocks and each
/// `out[k]` has room for 8 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots8_avx2<F: X8Format, const N: usize>(
    group: &[u8],
    x: [&Q8Row; N],
    out: [*mut f32; N],
) {
    F::dots8::<N>(group, x, out)
}

/// [`X8Format::dots8_vnni`] compiled for AVX512-VNNI.
///
/// # Safety
/// As [`dots8_avx2`], and the CPU must support avx512f, avx512bw, avx512vl and avx512vnni.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn dots8_vnni<F: X8Format, const N: usize>(
    group: &[u8],
    x: [&Q8Row; N],
    out: [*mut f32; N],
) {
    F::dots8_vnni::<N>(group, x, out)
}

/// Activation rows `x[..n]` (rows `j..j + n` of the call) times `group` through
/// [`dots8_vnni`] (`n` up to [`ROWS`]) or [`dots8_avx2`] (`n` up to [`ROW_GROUP`]); `at(j)`
/// points at row `j`'s results for the group.
///
/// # Safety
/// As [`dots8_vnni`] when `vnni`, else as [`dots8_avx2`]; `n` is at least 1 and at most
/// [`widest`]`(vnni)`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dots8_on<F: X8Format>(
    vnni: bool,
    n: usize,
    group: &[u8],
    x: &[Q8Row],
    j: usize,
    at: &dyn Fn(usize) -> *mut f32,
) {
    let x = |k| &x[k];
    if vnni {
        by_width!(n, (dots8_vnni(group; x, j, at)), 1 2 3 4 5 6 7 8)
    } else {
        by_width!(n, (dots8_avx2(group; x, j, at)), 1 2 3 4)
    }
}

/// [`X8Format::dots16_vnni`] compiled for AVX512-VNNI.
///
/// # Safety
/// As [`dots8_vnni`] for both groups, and each `out[k]` has room for 16 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn dots16_vnni<F: X8Format, const N: usize>(
    g0: &[u8],
    g1: &[u8],
    x: [&Q8Row; N],
    out: [*mut f32; N],
) {
    F::dots16_vnni::<N>(g0, g1, x, out)
}

/// [`dots8_on`] for two groups through [`dots16_vnni`]: `at(j)` points at row `j`'s sixteen
/// results.
///
/// # Safety
/// As [`dots16_vnni`]; `n` is at least 1 and at most [`ROWS`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dots16_on<F: X8Format>(
    n: usize,
    g0: &[u8],
    g1: &[u8],
    x: &[Q8Row],
    j: usize,
    at: &dyn Fn(usize) -> *mut f32,
) {
    let x = |k| &x[k];
    by_width!(n, (dots16_vnni(g0, g1; x, j, at)), 1 2 3 4 5 6 7 8)
}

/// The most activation rows one kernel pass takes: [`ROWS`] with AVX-512's 32 registers,
/// [`ROW_GROUP`] with AVX2's 16.
fn widest(avx512: bool) -> usize {
    if avx512 {
        ROWS
    } else {
        ROW_GROUP
    }
}

/// `(first row, rows)` of each kernel pass over `m` activation rows: full passes of `widest`
/// rows, then one pass of what is left. Every pass decodes the group's weights once, so a
/// remainder taken one row at a time cost as much as several full passes (three leftover rows
/// of a 111-token prompt were 12% of its time).
fn passes(m: usize, widest: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..m).step_by(widest).map(move |j| (j, widest.min(m - j)))
}

/// `(first group, groups)` over the groups `r`, two at a time and one left over where `r` is
/// odd: how tasks feed the two-group kernels.
pub(crate) fn pairs(r: std::ops::Range<usize>) -> impl Iterator<Item = (usize, usize)> {
    passes(r.len(), 2).map(move |(i, n)| (r.start + i, n))
}

/// [`X8Format::exact8`] compiled for AVX2.
///
/// # Safety
/// As [`dots8_avx2`]; each `x[k]` holds the group's columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exact8_avx2<F: X8Format, const N: usize>(
    group: &[u8],
    x: [&[f32]; N],
    out: [*mut f32; N],
) {
    F::exact8::<N>(group, x, out)
}

/// Activation rows `x(j)..x(j + n)` times `group` through [`exact8_avx2`].
///
/// # Safety
/// As [`exact8_avx2`]; `n` is at least 1 and at most [`ROW_GROUP`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exact8_on<'a, F: X8Format>(
    n: usize,
    group: &[u8],
    x: &dyn Fn(usize) -> &'a [f32],
    j: usize,
    at: &dyn Fn(usize) -> *mut f32,
) {
    by_width!(n, (exact8_avx2(group; |k| x(j + k), j, at)), 1 2 3 4)
}

/// Adds `w` (the eight rows' weights at column `e`) times each activation row's value there.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn add_column<const N: usize>(
    w: std::arch::x86_64::__m256,
    x: &[&[f32]; N],
    e: usize,
    acc: &mut [std::arch::x86_64::__m256; N],
) {
    use std::arch::x86_64::*;
    for k in 0..N {
        acc[k] = _mm256_fmadd_ps(w, _mm256_set1_ps(*x[k].get_unchecked(e)), acc[k]);
    }
}

/// Adds a chunk of unsigned values (byte `j` of lane `r`: row `r`'s value at column `4c + j`
/// in `lo`, `16 + 4c + j` in `hi`) times each activation row's int8 values to its 16-bit sums.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn add_nibble_chunk<const N: usize>(
    lo: std::arch::x86_64::__m256i,
    hi: std::arch::x86_64::__m256i,
    x: &[&Q8Row; N],
    b: usize,
    c: usize,
    s16: &mut [std::arch::x86_64::__m256i; N],
) {
    use std::arch::x86_64::*;
    for k in 0..N {
        let xq = x[k].q.as_ptr().add(b * BLOCK);
        let xl = _mm256_set1_epi32((xq.add(4 * c) as *const i32).read_unaligned());
        let xh = _mm256_set1_epi32((xq.add(16 + 4 * c) as *const i32).read_unaligned());
        let pair = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
        s16[k] = _mm256_add_epi16(s16[k], pair);
    }
}

/// Prefetches the `BYTES` of weights that start 8 KB past `p`: at eight activation rows the
/// kernels waited on weight loads the hardware prefetcher starts too late (about +5% on
/// SmolLM2's batched decode step, best of 15 runs).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn prefetch_ahead<const BYTES: usize>(p: *const u8) {
    use std::arch::x86_64::*;
    const AHEAD: usize = 8192;
    for l in 0..BYTES.div_ceil(64) {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(AHEAD + 64 * l) as *const i8);
    }
}

/// The 32 bytes at `a` and the 32 at `b` as one 512-bit vector (`a` low): the same chunk of
/// two groups, lane for lane as the 16-row kernels need it.
///
/// # Safety
/// Both reads must be in bounds; the caller enables AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn load_pair(a: *const u8, b: *const u8) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let lo = _mm256_loadu_si256(a as *const __m256i);
    let hi = _mm256_loadu_si256(b as *const __m256i);
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

/// Eight f16 at `a` and eight at `b` as sixteen f32 (`a` low): two groups' scales.
///
/// # Safety
/// Both reads must be in bounds; the caller enables AVX-512F and F16C.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn load_f16_pair(a: *const u8, b: *const u8) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let lo = _mm_loadu_si128(a as *const __m128i);
    let hi = _mm_loadu_si128(b as *const __m128i);
    _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(_mm256_castsi128_si256(lo), hi))
}

/// Stores each activation row's eight sums.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn store_rows<const N: usize>(
    acc: &[std::arch::x86_64::__m256; N],
    out: [*mut f32; N],
) {
    for k in 0..N {
        std::arch::x86_64::_mm256_storeu_ps(out[k], acc[k]);
    }
}

/// A `[rows, cols]` matrix of `F` blocks with its rows interleaved eight at a time.
#[derive(Debug, Clone)]
pub struct X8Matrix<F> {
    rows: usize,
    cols: usize,
    data: Vec<u8>,
    format: PhantomData<F>,
}

impl<F: X8Format> X8Matrix<F> {
    /// Repacks ggml bytes of a `[rows, cols]` matrix; `rows` must be a multiple of 8
    /// (otherwise use the format's row-layout matrix).
    pub fn new(rows: usize, cols: usize, data: &[u8]) -> Result<Self> {
        let nb = cols / BLOCK;
        let row_bytes = nb * F::BLOCK_BYTES;
        if !rows.is_multiple_of(ROWS)
            || !cols.is_multiple_of(BLOCK)
            || data.len() != rows * row_bytes
        {
            return Err(crate::TernError::InvalidArgument(format!(
                "{} matrix [{rows}, {cols}] in eight-row groups needs rows % {ROWS} == 0, cols % \
                 {BLOCK} == 0 and {} bytes, got {}",
                F::NAME,
                rows * row_bytes,
                data.len()
            )));
        }
        let mut out = vec![0u8; data.len()];
        let gbb = ROWS * F::BLOCK_BYTES;
        for (g, dst) in out.chunks_exact_mut(nb * gbb).enumerate() {
            for (b, gb) in dst.chunks_exact_mut(gbb).enumerate() {
                let src = std::array::from_fn(|r| {
                    &data[(g * ROWS + r) * row_bytes + b * F::BLOCK_BYTES..][..F::BLOCK_BYTES]
                });
                F::repack(src, gb);
            }
        }
        Ok(Self {
            rows,
            cols,
            data: out,
            format: PhantomData,
        })
    }

    /// The bytes of group `g` (rows `8g..8g+8`), block after block.
    pub(super) fn group(&self, g: usize) -> &[u8] {
        let n = self.cols / BLOCK * ROWS * F::BLOCK_BYTES;
        &self.data[g * n..(g + 1) * n]
    }

    /// Row `r`'s blocks, unpacked.
    fn row_blocks(&self, r: usize) -> impl Iterator<Item = (f32, f32, [i8; BLOCK])> + '_ {
        self.group(r / ROWS)
            .chunks_exact(ROWS * F::BLOCK_BYTES)
            .map(move |gb| F::unpack(gb, r % ROWS))
    }

    /// Portable reference: row `r` times int8 activations.
    pub(crate) fn dot_scalar(&self, r: usize, x: &Q8Row) -> f32 {
        let mut acc = 0f32;
        for (b, (d, m, q)) in self.row_blocks(r).enumerate() {
            let xq = &x.q[b * BLOCK..(b + 1) * BLOCK];
            let sumi: i32 = q.iter().zip(xq).map(|(&w, &v)| w as i32 * v as i32).sum();
            acc += d * x.d[b] * sumi as f32 + m * x.s[b];
        }
        acc
    }

    /// Portable reference: row `r` times f32 activations, exactly.
    pub(crate) fn dot_exact_scalar(&self, r: usize, x: &[f32]) -> f32 {
        let mut acc = 0f32;
        for (b, (d, m, q)) in self.row_blocks(r).enumerate() {
            for (i, &q) in q.iter().enumerate() {
                acc += (d * q as f32 + m) * x[b * BLOCK + i];
            }
        }
        acc
    }

    /// Runs `f(g, n, at)` for groups `g..g + n` (`n` 1 or 2: pairs where a task has them) on
    /// the worker pool, [`GROUPS_PER_TASK`] groups per task; `at(j)` points at activation row
    /// `j`'s results for the groups' `8 n` rows.
    fn for_groups(
        &self,
        out: &mut [f32],
        f: impl Fn(usize, usize, &dyn Fn(usize) -> *mut f32) + Sync,
    ) {
        let rows = self.rows;
        let groups = rows / ROWS;
        let out_ptr = out.as_mut_ptr() as usize;
        par_ranges(groups, GROUPS_PER_TASK, |task| {
            for (g, n) in pairs(task) {
                // Tasks cover disjoint groups, so each 8-value run has one writer; `out`
                // outlives the call, which returns only when every task is done.
                f(g, n, &|j| {
                    (out_ptr as *mut f32).wrapping_add(j * rows + g * ROWS)
                });
            }
        });
    }
}

impl<F: X8Format> RowKernel for X8Matrix<F> {
    fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn matmul_rows(&self, xs: &[f32], m: usize, out: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        assert_eq!((xs.len(), out.len()), (m * cols, m * rows));
        with_quantized(xs, cols, |xq| {
            self.for_groups(out, |g, n, at| groups_dots(self, g, n, xq, at))
        });
    }

    fn shared_groups(&self) -> usize {
        self.rows / ROWS
    }

    fn group_dots(&self, g: usize, xq: &[Q8Row], at: &dyn Fn(usize) -> *mut f32) {
        let m = xq.len();
        let group = self.group(g);
        #[cfg(target_arch = "x86_64")]
        if use_avx2() {
            let vnni = use_vnni();
            for (j, n) in passes(m, widest(vnni)) {
                // SAFETY: avx2, fma and f16c are present, and the AVX-512 features where
                // `vnni`; `n` fits the kernel, the activation rows have the group's blocks,
                // and `at` gives this group's disjoint 8-value run of each output row.
                unsafe { dots8_on::<F>(vnni, n, group, &xq[j..], j, at) };
            }
            return;
        }
        for (j, x) in xq.iter().enumerate() {
            for i in 0..ROWS {
                let v = self.dot_scalar(g * ROWS + i, x);
                // SAFETY: `at(j)` points at 8 writable values only this group writes.
                unsafe { *at(j).add(i) = v };
            }
        }
    }

    fn group_pair_dots(&self, g: usize, xq: &[Q8Row], at: &dyn Fn(usize) -> *mut f32) {
        #[cfg(target_arch = "x86_64")]
        if use_vnni() {
            let (g0, g1) = (self.group(g), self.group(g + 1));
            for (j, n) in passes(xq.len(), ROWS) {
                // SAFETY: the AVX-512 features are present; `n` fits the kernel, the
                // activation rows have the groups' blocks, and `at` gives these groups'
                // disjoint 16-value run of each output row.
                unsafe { dots16_on::<F>(n, g0, g1, &xq[j..], j, at) };
            }
            return;
        }
        self.group_dots(g, xq, at);
        self.group_dots(g + 1, xq, &|j| at(j).wrapping_add(ROWS));
    }

    /// `out[j * rows + r] = W[r] · xs[j]` in f32, exact to the stored weights. With AVX-512
    /// through a dequantized panel (`x8_panel.rs`); with AVX2 each pass of four rows
    /// rebuilds the weights it multiplies.
    fn matmul_exact_rows(&self, xs: &[f32], m: usize, out: &mut [f32]) -> bool {
        let (rows, cols) = (self.rows, self.cols);
        assert_eq!((xs.len(), out.len()), (m * cols, m * rows));
        #[cfg(target_arch = "x86_64")]
        if use_vnni() {
            super::x8_panel::matmul_exact(self, xs, m, out);
            return true;
        }
        let x = |j: usize| &xs[j * cols..(j + 1) * cols];
        self.for_groups(out, |g0, groups, at0| {
            for g in g0..g0 + groups {
                let at = |j: usize| at0(j).wrapping_add((g - g0) * ROWS);
                let group = self.group(g);
                #[cfg(target_arch = "x86_64")]
                if use_avx2() {
                    for (j, n) in passes(m, ROW_GROUP) {
                        // SAFETY: avx2, fma and f16c are present; `n` fits the kernel, every x
                        // row has `cols` values, and `at` gives this group's disjoint 8-value
                        // run of each output row.
                        unsafe { exact8_on::<F>(n, group, &x, j, &at) };
                    }
                    continue;
                }
                for j in 0..m {
                    for i in 0..ROWS {
                        let v = self.dot_exact_scalar(g * ROWS + i, x(j));
                        // SAFETY: as above.
                        unsafe { *at(j).add(i) = v };
                    }
                }
            }
        });
        true
    }

    fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let (rows, cols) = (self.rows, self.cols);
        let mut v = vec![0f32; rows * cols];
        for (r, dst) in v.chunks_exact_mut(cols).enumerate() {
            for ((d, m, q), dst) in self.row_blocks(r).zip(dst.chunks_exact_mut(BLOCK)) {
                for (o, &q) in dst.iter_mut().zip(&q) {
                    *o = d * q as f32 + m;
                }
            }
        }
        Ok(Tensor::from_vec(v, (rows, cols), device)?)
    }
}

#[cfg(test)]
#[path = "x8_tests.rs"]
pub(crate) mod tests;
