//! Block formats repacked eight weight rows at a time: the matrix, its driver and what every
//! format shares.
//!
//! The row-layout int8 kernels (`int8.rs`) spend four or more vector operations per (weight
//! row, activation row, block), then a horizontal sum per row. Past a few activation rows that
//! work, not memory, set the pace: eight decode rows cost ~4.4x one on SmolLM2 Q4_1. Here a
//! group block holds the same 32 values of eight rows, four consecutive values per row in each
//! 32-byte chunk, so one byte multiply-add against a broadcast of four activation bytes serves
//! eight weight rows, and block scales apply to eight rows in one float operation. The same
//! layout gives prefill an exact f32 product that needs no dequantized copy of the matrix. The
//! idea is llama.cpp's interleaved `q4_0_8x8` layout; the code is ours. Bytes and memory are
//! the format's own, only reordered.

use super::int8::{with_quantized, Q8Row};
use super::{par_ranges, use_avx2, use_vnni, RowKernel, BLOCK, ROW_GROUP};
use crate::error::Result;
use candle_core::{Device, Tensor};
use std::marker::PhantomData;
use std::mem::MaybeUninit;

/// Weight rows interleaved together.
pub const ROWS: usize = 8;
/// Groups of eight rows per pool task (32 rows, as the row-layout kernels).
const GROUPS_PER_TASK: usize = 4;

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
    /// [`X8Format::exact8`] for two groups, results as in [`X8Format::dots16_vnni`]. Inlined
    /// into [`exact16_avx512`]; by default two calls of `exact8`, and a format's own body must
    /// give the same bits.
    ///
    /// # Safety
    /// Only to be called from [`exact16_avx512`].
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn exact16<const N: usize>(g0: &[u8], g1: &[u8], x: [&[f32]; N], out: [*mut f32; N]) {
        Self::exact8::<N>(g0, x, out);
        Self::exact8::<N>(g1, x, out.map(|p| p.wrapping_add(ROWS)));
    }
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
    macro_rules! pass {
        ($kernel:ident, $($n:literal)*) => {
            match n {
                $($n => $kernel::<F, $n>(
                    group,
                    std::array::from_fn(|k| &x[k]),
                    std::array::from_fn(|k| at(j + k)),
                ),)*
                _ => unreachable!("{n} rows in one pass"),
            }
        };
    }
    if vnni {
        pass!(dots8_vnni, 1 2 3 4 5 6 7 8)
    } else {
        pass!(dots8_avx2, 1 2 3 4)
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
    macro_rules! pass {
        ($($n:literal)*) => {
            match n {
                $($n => dots16_vnni::<F, $n>(
                    g0,
                    g1,
                    std::array::from_fn(|k| &x[k]),
                    std::array::from_fn(|k| at(j + k)),
                ),)*
                _ => unreachable!("{n} rows in one pass"),
            }
        };
    }
    pass!(1 2 3 4 5 6 7 8)
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

/// [`X8Format::exact8`] compiled with AVX-512VL's 32 vector registers (the same operations).
///
/// # Safety
/// As [`exact8_avx2`], and the CPU must support avx512f and avx512vl.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
unsafe fn exact8_avx512<F: X8Format, const N: usize>(
    group: &[u8],
    x: [&[f32]; N],
    out: [*mut f32; N],
) {
    F::exact8::<N>(group, x, out)
}

/// Activation rows `x(j)..x(j + n)` times `group` through [`exact8_avx512`] (`n` up to
/// [`ROWS`]) when `wide`, else [`exact8_avx2`] (`n` up to [`ROW_GROUP`]).
///
/// # Safety
/// As [`exact8_avx512`] when `wide`, else as [`exact8_avx2`]; `n` is at least 1 and at most
/// [`widest`]`(wide)`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exact8_on<'a, F: X8Format>(
    wide: bool,
    n: usize,
    group: &[u8],
    x: &dyn Fn(usize) -> &'a [f32],
    j: usize,
    at: &dyn Fn(usize) -> *mut f32,
) {
    macro_rules! pass {
        ($kernel:ident, $($n:literal)*) => {
            match n {
                $($n => $kernel::<F, $n>(
                    group,
                    std::array::from_fn(|k| x(j + k)),
                    std::array::from_fn(|k| at(j + k)),
                ),)*
                _ => unreachable!("{n} rows in one pass"),
            }
        };
    }
    if wide {
        pass!(exact8_avx512, 1 2 3 4 5 6 7 8)
    } else {
        pass!(exact8_avx2, 1 2 3 4)
    }
}

/// [`X8Format::exact16`] compiled with AVX-512.
///
/// # Safety
/// As [`exact8_avx512`] for both groups, and each `out[k]` has room for 16 values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
unsafe fn exact16_avx512<F: X8Format, const N: usize>(
    g0: &[u8],
    g1: &[u8],
    x: [&[f32]; N],
    out: [*mut f32; N],
) {
    F::exact16::<N>(g0, g1, x, out)
}

/// [`exact8_on`] for two groups through [`exact16_avx512`]: `at(j)` points at row `j`'s
/// sixteen results.
///
/// # Safety
/// As [`exact16_avx512`]; `n` is at least 1 and at most [`ROWS`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exact16_on<'a, F: X8Format>(
    n: usize,
    g0: &[u8],
    g1: &[u8],
    x: &dyn Fn(usize) -> &'a [f32],
    j: usize,
    at: &dyn Fn(usize) -> *mut f32,
) {
    macro_rules! pass {
        ($($n:literal)*) => {
            match n {
                $($n => exact16_avx512::<F, $n>(
                    g0,
                    g1,
                    std::array::from_fn(|k| x(j + k)),
                    std::array::from_fn(|k| at(j + k)),
                ),)*
                _ => unreachable!("{n} rows in one pass"),
            }
        };
    }
    pass!(1 2 3 4 5 6 7 8)
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

/// Prefetches the `BYTES` of weights that start 2 KB past `p`: at eight activation rows the
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

/// Groups `g..g + n` (`n` 1 or 2) of `k` times `xq`; `at(j)` points at row `j`'s `8 n`
/// results.
fn groups_dots(
    k: &dyn RowKernel,
    g: usize,
    n: usize,
    xq: &[Q8Row],
    at: &dyn Fn(usize) -> *mut f32,
) {
    if n == 2 {
        k.group_pair_dots(g, xq, at)
    } else {
        k.group_dots(g, xq, at)
    }
}

/// `outs[i] = xs W_i^T` (`[m, rows_i]`) for several matrices that read the same activation
/// rows (q/k/v, gate/up): the rows are rounded to int8 once and every matrix's groups go
/// through one pass of the worker pool, instead of one rounding and one pool dispatch per
/// matrix. Each output gets exactly what [`RowKernel::matmul_rows`] gives it, and every value
/// of it is written, so it may start uninitialised (zeroing the outputs was ~3% of a batched
/// decode step). `false` (and nothing written) unless every matrix has shared groups and
/// `cols` columns.
pub(crate) fn matmul_rows_shared(
    mats: &[&dyn RowKernel],
    xs: &[f32],
    m: usize,
    outs: &mut [&mut [MaybeUninit<f32>]],
) -> bool {
    let Some(cols) = mats.first().map(|k| k.dims().1) else {
        return false;
    };
    if mats.len() != outs.len()
        || xs.len() != m * cols
        || mats.iter().zip(outs.iter()).any(|(k, o)| {
            let (rows, c) = k.dims();
            c != cols || k.shared_groups() * ROWS != rows || o.len() != m * rows
        })
    {
        return false;
    }
    // Matrix `i`'s groups are units `first[i]..first[i + 1]` of one sequence; tasks take
    // GROUPS_PER_TASK consecutive units.
    let first: Vec<usize> = std::iter::once(0)
        .chain(mats.iter().scan(0, |n, k| {
            *n += k.shared_groups();
            Some(*n)
        }))
        .collect();
    let ptrs: Vec<usize> = outs.iter_mut().map(|o| o.as_mut_ptr() as usize).collect();
    with_quantized(xs, cols, |xq| {
        par_ranges(first[mats.len()], GROUPS_PER_TASK, |task| {
            let mut u = task.start;
            while u < task.end {
                let i = first.partition_point(|&f| f <= u) - 1;
                let (g, rows) = (u - first[i], mats[i].dims().0);
                let n = if u + 1 < task.end.min(first[i + 1]) {
                    2
                } else {
                    1
                };
                // Units are distinct (matrix, group) pairs, so each 8-value run has one
                // writer; the outputs outlive the call, which returns when every task is done.
                let at = |j: usize| (ptrs[i] as *mut f32).wrapping_add(j * rows + g * ROWS);
                groups_dots(mats[i], g, n, xq, &at);
                u += n;
            }
        })
    });
    true
}

/// `out = silu(xs G^T) * (xs U^T)` (`[m, rows]`) for a gated MLP's gate `G` and up `U`:
/// each pool task runs a group of both and applies the activation to its own eight columns.
/// The two products never become tensors, and the activation runs on every core instead of
/// on one after the pass (~3% of an eight-row SmolLM2 step). Each value is
/// [`super::vexp::swiglu`] of what [`RowKernel::matmul_rows`] gives the two matrices, and every
/// value is written. `false` (nothing written) unless both have shared groups and the same
/// shape with `cols` columns.
pub(crate) fn matmul_swiglu(
    gate: &dyn RowKernel,
    up: &dyn RowKernel,
    xs: &[f32],
    m: usize,
    out: &mut [MaybeUninit<f32>],
) -> bool {
    let (rows, cols) = gate.dims();
    if up.dims() != (rows, cols)
        || [gate, up].iter().any(|k| k.shared_groups() * ROWS != rows)
        || xs.len() != m * cols
        || out.len() != m * rows
    {
        return false;
    }
    let ptr = out.as_mut_ptr() as usize;
    with_quantized(xs, cols, |xq| {
        par_ranges(rows / ROWS, GROUPS_PER_TASK, |task| {
            // One or two groups' gate, up and activation: `m` rows of `n * 8` values each.
            let mut buf = vec![0f32; 3 * m * 2 * ROWS];
            let mut g = task.start;
            while g < task.end {
                let n = if g + 1 < task.end { 2 } else { 1 };
                let w = n * ROWS;
                let (gate8, rest) = buf.split_at_mut(m * w);
                let (up8, rest) = rest.split_at_mut(m * w);
                let y8 = &mut rest[..m * w];
                for (k, dst) in [(gate, &mut *gate8), (up, &mut *up8)] {
                    let p = dst.as_mut_ptr() as usize;
                    groups_dots(k, g, n, xq, &|j| (p as *mut f32).wrapping_add(j * w));
                }
                super::vexp::swiglu(y8, gate8, up8);
                for (j, y) in y8.chunks_exact(w).enumerate() {
                    // SAFETY: tasks cover disjoint groups, so each run of the output has one
                    // writer, and `out` outlives the call, which returns when every task is
                    // done.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            y.as_ptr(),
                            (ptr as *mut f32).add(j * rows + g * ROWS),
                            w,
                        )
                    };
                }
                g += n;
            }
        })
    });
    true
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
    fn group(&self, g: usize) -> &[u8] {
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
            let mut g = task.start;
            while g < task.end {
                let n = if g + 1 < task.end { 2 } else { 1 };
                // Tasks cover disjoint groups, so each 8-value run has one writer; `out`
                // outlives the call, which returns only when every task is done.
                f(g, n, &|j| {
                    (out_ptr as *mut f32).wrapping_add(j * rows + g * ROWS)
                });
                g += n;
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

    /// `out[j * rows + r] = W[r] · xs[j]` in f32, exact to the stored weights.
    fn matmul_exact_rows(&self, xs: &[f32], m: usize, out: &mut [f32]) -> bool {
        let (rows, cols) = (self.rows, self.cols);
        assert_eq!((xs.len(), out.len()), (m * cols, m * rows));
        let x = |j: usize| &xs[j * cols..(j + 1) * cols];
        self.for_groups(out, |g0, groups, at0| {
            #[cfg(target_arch = "x86_64")]
            if groups == 2 && use_vnni() {
                let (a, b) = (self.group(g0), self.group(g0 + 1));
                for (j, n) in passes(m, ROWS) {
                    // SAFETY: the AVX-512 features are present; `n` fits the kernel, every x
                    // row has `cols` values, and `at0` gives these groups' disjoint 16-value
                    // run of each output row.
                    unsafe { exact16_on::<F>(n, a, b, &x, j, at0) };
                }
                return;
            }
            for g in g0..g0 + groups {
                let at = |j: usize| at0(j).wrapping_add((g - g0) * ROWS);
                let group = self.group(g);
                #[cfg(target_arch = "x86_64")]
                if use_avx2() {
                    let wide = use_vnni();
                    for (j, n) in passes(m, widest(wide)) {
                        // SAFETY: avx2, fma and f16c are present (and AVX-512 where `wide`);
                        // `n` fits the kernel, every x row has `cols` values, and `at` gives
                        // this group's disjoint 8-value run of each output row.
                        unsafe { exact8_on::<F>(wide, n, group, &x, j, &at) };
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
pub(crate) mod tests {
    use super::*;
    use crate::quant::int8::quantize_row;
    use crate::quant::q4_1::tests::det_values;
    use candle_core::quantized::{GgmlDType, QTensor};

    /// `F`'s eight-row matrix of `rows x cols` pseudo-normal weights quantized by candle as
    /// `dtype`, with the ggml bytes and candle's tensor.
    pub(crate) fn pair<F: X8Format>(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
    ) -> (X8Matrix<F>, Vec<u8>, QTensor) {
        let w = Tensor::from_vec(det_values(rows * cols, 3), (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dtype).unwrap();
        let bytes = q.data().unwrap().to_vec();
        (X8Matrix::new(rows, cols, &bytes).unwrap(), bytes, q)
    }

    /// Everything an eight-row format must give: candle's dequantized values exactly; int8
    /// dots equal to `row_scalar` (the row-layout reference on the ggml bytes of row `r`) and
    /// to candle within rounding; an exact product equal to the dequantized matmul up to
    /// summation order, and the same bits for a row at any row count; refused bad shapes.
    pub(crate) fn x8_format_holds<F: X8Format>(
        dtype: GgmlDType,
        row_scalar: impl Fn(&[u8], &Q8Row) -> f32,
    ) {
        let (x8, bytes, q) = pair::<F>(dtype, 64, 576);
        let deq = x8.dequantize(&Device::Cpu).unwrap();
        let diff = crate::test_util::max_abs_diff;
        assert_eq!(diff(&deq, &q.dequantize(&Device::Cpu).unwrap()), 0.0);
        let row_bytes = 576 / BLOCK * F::BLOCK_BYTES;
        let xq = quantize_row(&det_values(576, 4));
        for r in 0..64 {
            let theirs = row_scalar(&bytes[r * row_bytes..(r + 1) * row_bytes], &xq);
            let ours = x8.dot_scalar(r, &xq);
            assert!(
                (ours - theirs).abs() < 1e-4 * theirs.abs().max(1.0),
                "row {r}"
            );
        }
        crate::quant::tests::int8_kernel_agrees(&x8, q, |r, x| x8.dot_scalar(r, x));
        #[cfg(target_arch = "x86_64")]
        if crate::quant::use_vnni() {
            // The VNNI body's integer sums equal the AVX2 body's: the same bits, for the four-
            // and the eight-row kernels.
            let xs: Vec<Q8Row> = (0..ROWS as u64)
                .map(|k| quantize_row(&det_values(576, 30 + k)))
                .collect();
            for g in 0..64 / ROWS {
                let (mut a, mut v) = ([[0f32; ROWS]; ROWS], [[0f32; ROWS]; ROWS]);
                let (mut a4, mut v4) = ([[0f32; ROWS]; 4], [[0f32; ROWS]; 4]);
                let ptrs = |o: &mut [[f32; ROWS]]| {
                    o.iter_mut().map(|r| r.as_mut_ptr()).collect::<Vec<_>>()
                };
                let (pa, pv, pa4, pv4) = (ptrs(&mut a), ptrs(&mut v), ptrs(&mut a4), ptrs(&mut v4));
                // SAFETY: the CPU has the features; each output has room for eight values.
                unsafe {
                    let xk = std::array::from_fn(|k| &xs[k]);
                    dots8_avx2::<F, ROWS>(x8.group(g), xk, std::array::from_fn(|k| pa[k]));
                    dots8_vnni::<F, ROWS>(x8.group(g), xk, std::array::from_fn(|k| pv[k]));
                    let x4 = std::array::from_fn(|k| &xs[k]);
                    dots8_avx2::<F, 4>(x8.group(g), x4, std::array::from_fn(|k| pa4[k]));
                    dots8_vnni::<F, 4>(x8.group(g), x4, std::array::from_fn(|k| pv4[k]));
                }
                assert_eq!(a, v, "group {g}");
                assert_eq!(a4, v4, "group {g}");
                assert_eq!(a4[..], a[..4], "group {g}");
            }
            // Two groups in one 512-bit pass: each group's bits as in its own pass, at every
            // row count.
            for g in (0..64 / ROWS).step_by(2) {
                let mut one = [[0f32; 2 * ROWS]; ROWS];
                for (h, group) in [x8.group(g), x8.group(g + 1)].into_iter().enumerate() {
                    // SAFETY: as above.
                    unsafe {
                        dots8_vnni::<F, ROWS>(
                            group,
                            std::array::from_fn(|k| &xs[k]),
                            std::array::from_fn(|k| one[k].as_mut_ptr().add(h * ROWS)),
                        )
                    };
                }
                for n in 1..=ROWS {
                    let mut two = vec![[f32::NAN; 2 * ROWS]; n];
                    let base = two.as_mut_ptr() as usize;
                    let at = |j: usize| (base as *mut [f32; 2 * ROWS]).wrapping_add(j) as *mut f32;
                    // SAFETY: as above; each output has room for sixteen values.
                    unsafe { dots16_on::<F>(n, x8.group(g), x8.group(g + 1), &xs, 0, &at) };
                    assert_eq!(two[..], one[..n], "groups {g}, {n} rows");
                }
            }
            // The same for the exact product.
            let xf: Vec<Vec<f32>> = (0..ROWS as u64).map(|k| det_values(576, 50 + k)).collect();
            let xr = |j: usize| xf[j].as_slice();
            for g in (0..64 / ROWS).step_by(2) {
                let mut one = [[0f32; 2 * ROWS]; ROWS];
                for (h, group) in [x8.group(g), x8.group(g + 1)].into_iter().enumerate() {
                    let base = one.as_mut_ptr() as usize;
                    let at = |j: usize| {
                        ((base as *mut [f32; 2 * ROWS]).wrapping_add(j) as *mut f32)
                            .wrapping_add(h * ROWS)
                    };
                    // SAFETY: as above.
                    unsafe { exact8_on::<F>(true, ROWS, group, &xr, 0, &at) };
                }
                for n in 1..=ROWS {
                    let mut two = vec![[f32::NAN; 2 * ROWS]; n];
                    let base = two.as_mut_ptr() as usize;
                    let at = |j: usize| (base as *mut [f32; 2 * ROWS]).wrapping_add(j) as *mut f32;
                    // SAFETY: as above.
                    unsafe { exact16_on::<F>(n, x8.group(g), x8.group(g + 1), &xr, 0, &at) };
                    assert_eq!(two[..], one[..n], "exact, groups {g}, {n} rows");
                }
            }
        }

        let (rows, cols) = (64, 576);
        let xs = det_values(17 * cols, 8);
        let mut alone = vec![0f32; 17 * rows];
        for j in 0..17 {
            let out = &mut alone[j * rows..(j + 1) * rows];
            assert!(x8.matmul_exact_rows(&xs[j * cols..(j + 1) * cols], 1, out));
        }
        // Passes of every width (full ones and the rest) give each row the bits it gets
        // alone.
        for m in 2..=17 {
            let mut out = vec![0f32; m * rows];
            assert!(x8.matmul_exact_rows(&xs[..m * cols], m, &mut out));
            assert_eq!(out, alone[..m * rows], "m = {m}");
        }
        let x = Tensor::from_vec(xs, (17, cols), &Device::Cpu).unwrap();
        let exact = x.matmul(&deq.t().unwrap()).unwrap();
        // Only f32 summation order separates them: ~1e-5 on sums of 576 products of ~3.
        assert!(diff(&x8.forward_exact(&x).unwrap().unwrap(), &exact) < 1e-3);
        let xr = x.get(3).unwrap().to_vec1::<f32>().unwrap();
        for r in 0..rows {
            assert!((x8.dot_exact_scalar(r, &xr) - alone[3 * rows + r]).abs() < 1e-3);
        }

        assert!(X8Matrix::<F>::new(1, 64, &bytes[..2 * F::BLOCK_BYTES]).is_err());
        assert!(X8Matrix::<F>::new(8, 60, &bytes[..8 * 2 * F::BLOCK_BYTES]).is_err());
        assert!(X8Matrix::<F>::new(8, 64, &bytes[..8 * 2 * F::BLOCK_BYTES - 1]).is_err());
    }

    /// `v` as the uninitialised output [`matmul_rows_shared`] takes (sound: the same layout,
    /// and only initialised values are written).
    fn as_uninit(v: &mut [f32]) -> &mut [MaybeUninit<f32>] {
        // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, and the slice stays initialised.
        unsafe { &mut *(v as *mut [f32] as *mut [MaybeUninit<f32>]) }
    }

    #[test]
    fn the_fused_gate_up_gives_the_bits_of_the_separate_products() {
        use crate::quant::q4_1x8::Q4_1x8;
        let cols = 576;
        let (g, _, _) = pair::<Q4_1x8>(GgmlDType::Q4_1, 64, cols);
        let (u, _, _) = pair::<Q4_1x8>(GgmlDType::Q4_1, 64, cols);
        for m in [1, 3, 8, 9] {
            let xs = det_values(m * cols, 70 + m as u64);
            let (mut gs, mut us) = (vec![0f32; m * 64], vec![0f32; m * 64]);
            g.matmul_rows(&xs, m, &mut gs);
            u.matmul_rows(&xs, m, &mut us);
            let mut want = vec![0f32; m * 64];
            crate::quant::vexp::swiglu(&mut want, &gs, &us);
            let mut got = vec![f32::NAN; m * 64];
            assert!(matmul_swiglu(&g, &u, &xs, m, as_uninit(&mut got)));
            assert_eq!(got, want, "m = {m}");
        }
        // Shapes that differ, or an output of the wrong size: declined, nothing written.
        let (other, _, _) = pair::<Q4_1x8>(GgmlDType::Q4_1, 8, cols);
        let xs = det_values(cols, 1);
        let mut o = vec![0f32; 64];
        assert!(!matmul_swiglu(&g, &other, &xs, 1, as_uninit(&mut o)));
        assert!(!matmul_swiglu(&g, &u, &xs, 1, as_uninit(&mut o[..8])));
        assert!(o.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn a_shared_pass_gives_each_matrix_its_own_bits() {
        use crate::quant::{q4_1x8::Q4_1x8, q8_0x8::Q8_0x8};
        let cols = 576;
        let (a, _, _) = pair::<Q4_1x8>(GgmlDType::Q4_1, 64, cols);
        let (b, _, _) = pair::<Q8_0x8>(GgmlDType::Q8_0, 24, cols);
        let (c, _, _) = pair::<Q4_1x8>(GgmlDType::Q4_1, 8, cols);
        let mats: [&dyn RowKernel; 3] = [&a, &b, &c];
        for m in [1, 3, 4, 8, 9] {
            let xs = det_values(m * cols, 40 + m as u64);
            let alone: Vec<Vec<f32>> = mats
                .iter()
                .map(|k| {
                    let mut out = vec![0f32; m * k.dims().0];
                    k.matmul_rows(&xs, m, &mut out);
                    out
                })
                .collect();
            let mut outs: Vec<Vec<f32>> = mats
                .iter()
                .map(|k| vec![f32::NAN; m * k.dims().0])
                .collect();
            let mut views: Vec<_> = outs.iter_mut().map(|o| as_uninit(o)).collect();
            assert!(matmul_rows_shared(&mats, &xs, m, &mut views));
            assert_eq!(outs, alone, "m = {m}");
        }
        // Different widths, or an output of the wrong size: declined, nothing written.
        let (narrow, _, _) = pair::<Q4_1x8>(GgmlDType::Q4_1, 8, 64);
        let xs = det_values(cols, 1);
        let mut o1 = vec![0f32; 64];
        let mut o2 = vec![0f32; 8];
        assert!(!matmul_rows_shared(
            &[&a, &narrow],
            &xs,
            1,
            &mut [as_uninit(&mut o1), as_uninit(&mut o2)]
        ));
        assert!(!matmul_rows_shared(
            &[&a],
            &xs,
            1,
            &mut [as_uninit(&mut o2)]
        ));
        assert!(o1.iter().chain(&o2).all(|&v| v == 0.0));
    }
}
