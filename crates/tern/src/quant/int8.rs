//! The int8-activation kernels' shared parts: activation rows rounded to int8 per 32-block
//! (ggml's `Q8_1`, block sums kept for the formats with offsets) and the driver that hands
//! weight rows to a format's dot products, four activation rows per weight load.

use super::{fill_grouped, par_rows, use_avx2, BlockRows, RowKernel, BLOCK, ROW_GROUP};
use crate::error::Result;
use candle_core::{Device, Tensor};
use std::marker::PhantomData;

/// One row of activations rounded to int8 per block: `x ≈ d[b] * q`, `s[b] = d[b] * Σ q`.
#[derive(Default)]
pub struct Q8Row {
    /// Block scales.
    pub d: Vec<f32>,
    /// Block sums times scale.
    pub s: Vec<f32>,
    /// The int8 values.
    pub q: Vec<i8>,
}

/// [`quantize_row_into`] into a new row (the tests' form).
#[cfg(test)]
pub(crate) fn quantize_row(x: &[f32]) -> Q8Row {
    let mut r = Q8Row::default();
    quantize_row_into(x, &mut r);
    r
}

/// Rounds `x` to int8 per 32-block into `r` (reusing its vectors), as ggml does for the
/// activations of a quantized matmul.
///
/// It runs before every quantized matmul of a decode step on the calling thread, so it is
/// serial time: the AVX2 form (ties to even, as ggml's SIMD quantizer) took it from ~6% of
/// decode to under 1%.
fn quantize_row_into(x: &[f32], r: &mut Q8Row) {
    let nb = x.len() / BLOCK;
    r.d.resize(nb, 0.0);
    r.s.resize(nb, 0.0);
    r.q.resize(x.len(), 0);
    #[cfg(target_arch = "x86_64")]
    if use_avx2() {
        // SAFETY: only taken when the CPU reports avx2 (and fma, f16c); `r` was sized for
        // `x` above.
        return unsafe { quantize_blocks_avx2(x, r) };
    }
    for b in 0..nb {
        let xs = &x[b * BLOCK..(b + 1) * BLOCK];
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (i, v) in xs.iter().enumerate() {
            let q = (v * id).round() as i32;
            r.q[b * BLOCK + i] = q as i8;
            sum += q;
        }
        r.d[b] = d;
        r.s[b] = d * sum as f32;
    }
}

/// Activation values past which [`with_quantized`] lets its buffers go rather than keep them
/// for the thread's next call (a long prompt's rounded rows need not stay resident).
const KEEP_VALUES: usize = 1 << 20;

/// Rows from which [`with_quantized`] rounds on the worker pool (decode batches stay on the
/// calling thread: a dispatch costs about what rounding eight rows does).
const PAR_QUANTIZE_ROWS: usize = 16;

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<Q8Row>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on the rows of `xs` (`cols` values each) rounded by [`quantize_row_into`], in buffers
/// the calling thread reuses. A batched decode step rounds some 120 activation sets; fresh
/// vectors for each (three per row) cost ~4% of an eight-row SmolLM2 step in malloc and free.
pub(crate) fn with_quantized<R>(xs: &[f32], cols: usize, f: impl FnOnce(&[Q8Row]) -> R) -> R {
    // Taken out, not borrowed, so that a nested call (none today) finds an empty buffer
    // instead of a borrow error.
    let mut rows = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let m = xs.len() / cols.max(1);
    rows.resize_with(m, Q8Row::default);
    let cols = cols.max(1);
    if m >= PAR_QUANTIZE_ROWS {
        // A prompt's rows: rounded on every core (serial, ~4% of a batched prefill).
        let ptr = rows.as_mut_ptr() as usize;
        super::par_ranges(m, PAR_QUANTIZE_ROWS / 2, |task| {
            for i in task {
                // SAFETY: tasks get disjoint row indices below `m` = `rows.len()`, and
                // `rows` outlives the call, which returns when every task is done.
                let r = unsafe { &mut *(ptr as *mut Q8Row).add(i) };
                quantize_row_into(&xs[i * cols..(i + 1) * cols], r);
            }
        });
    } else {
        for (x, r) in xs.chunks_exact(cols).zip(rows.iter_mut()) {
            quantize_row_into(x, r);
        }
    }
    let out = f(&rows);
    if xs.len() <= KEEP_VALUES {
        SCRATCH.with(|s| *s.borrow_mut() = rows);
    }
    out
}

/// Every block of `x` into `r` (sized for `x`). One call per row, not per block: called per
/// block, the function's entry and exit were most of the time it took.
///
/// # Safety
/// The CPU must support avx2, fma and f16c.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_blocks_avx2(x: &[f32], r: &mut Q8Row) {
    let nb = x.len() / BLOCK;
    assert!(r.d.len() >= nb && r.s.len() >= nb && r.q.len() >= nb * BLOCK);
    for b in 0..nb {
        let (d, sum) = quantize_block(x.as_ptr().add(b * BLOCK), r.q.as_mut_ptr().add(b * BLOCK));
        *r.d.get_unchecked_mut(b) = d;
        *r.s.get_unchecked_mut(b) = d * sum as f32;
    }
}

/// One 32-value block rounded to int8 at `q`; returns its scale and the sum of its values.
/// Inlined into [`quantize_blocks_avx2`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn quantize_block(x: *const f32, q: *mut i8) -> (f32, i32) {
    use std::arch::x86_64::*;
    let v: [__m256; 4] = std::array::from_fn(|k| _mm256_loadu_ps(x.add(8 * k)));
    let sign = _mm256_set1_ps(-0.0);
    let abs = |a| _mm256_andnot_ps(sign, a);
    let m = _mm256_max_ps(
        _mm256_max_ps(abs(v[0]), abs(v[1])),
        _mm256_max_ps(abs(v[2]), abs(v[3])),
    );
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
    let i: [__m256i; 4] = std::array::from_fn(|k| {
        _mm256_cvtps_epi32(_mm256_round_ps(
            _mm256_mul_ps(v[k], id),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        ))
    });
    let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    let s4 = _mm_add_epi32(
        _mm256_castsi256_si128(sum),
        _mm256_extracti128_si256(sum, 1),
    );
    let s2 = _mm_add_epi32(s4, _mm_unpackhi_epi64(s4, s4));
    let total = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 1)));
    // Packing works within 128-bit lanes; the final permute puts the values back in order.
    let p16a = _mm256_packs_epi32(i[0], i[1]);
    let p16b = _mm256_packs_epi32(i[2], i[3]);
    let p8 = _mm256_packs_epi16(p16a, p16b);
    let ordered = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q as *mut __m256i, ordered);
    (d, total)
}

/// A block format's dot products of one weight row with int8 activation rows.
pub trait Int8Dot: Sync {
    /// Portable reference.
    fn dot_scalar(row: &[u8], x: &Q8Row) -> f32;
    /// Dots of one weight row with `N` activation rows, each weight block unpacked once.
    /// Written with AVX2 intrinsics and inlined into [`dots_avx2`], which enables them; the
    /// same code serves every `N`, so a row gives the same bits batched or alone.
    ///
    /// # Safety
    /// Only to be called from [`dots_avx2`].
    #[cfg(target_arch = "x86_64")]
    unsafe fn dots<const N: usize>(row: &[u8], x: [&Q8Row; N]) -> [f32; N];
}

/// [`Int8Dot::dots`] compiled for AVX2.
///
/// (An AVX512-VNNI form, `vpdpbusd` for `maddubs` + `madd`, measured within 5% either way on
/// a Zen 4 core and was dropped.)
///
/// # Safety
/// The CPU must support avx2, fma and f16c.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dots_avx2<K: Int8Dot, const N: usize>(row: &[u8], x: [&Q8Row; N]) -> [f32; N] {
    K::dots::<N>(row, x)
}

/// The eight i32 sums of four adjacent products of unsigned `a` and signed `b` bytes. No block
/// format here reaches `maddubs`'s i16 saturation (|w|, |x| <= 127 give at most 32258).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn mul_sum(
    a: std::arch::x86_64::__m256i,
    b: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1))
}

/// Adds block `b` to each activation row's sum: 32 signed weight bytes `w` with scale `d`
/// times row `k`'s block `b` into `acc[k]` (the formats whose values are signed bytes once
/// unpacked: Q8_0, Q5_0).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn add_signed_block<const N: usize>(
    w: std::arch::x86_64::__m256i,
    d: f32,
    x: &[&Q8Row; N],
    b: usize,
    acc: &mut [std::arch::x86_64::__m256; N],
) {
    use std::arch::x86_64::*;
    // The unsigned side is |w|; x carries w's sign.
    let aw = _mm256_sign_epi8(w, w);
    for k in 0..N {
        let xv = _mm256_loadu_si256(x[k].q.as_ptr().add(b * BLOCK) as *const __m256i);
        let prod = mul_sum(aw, _mm256_sign_epi8(xv, w));
        let scale = _mm256_set1_ps(d * x[k].d[b]);
        acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(prod), scale, acc[k]);
    }
}

/// `out[j * rows + r] = W[r] · xs[j]` for a matrix of `K` blocks, with the activations rounded
/// to int8 once per call; `per_task` weight rows go to each pool task.
pub(crate) fn matmul_int8<K: Int8Dot>(
    w: &BlockRows,
    xs: &[f32],
    m: usize,
    out: &mut [f32],
    per_task: usize,
) {
    let (rows, cols) = (w.rows, w.cols);
    assert_eq!((xs.len(), out.len()), (m * cols, m * rows));
    let avx2 = use_avx2();
    with_quantized(xs, cols, |xq| {
        par_rows(out, rows, m, per_task, |r, buf| {
            let row = w.row(r);
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: only taken when the CPU reports avx2, fma and f16c.
                let four = |j: usize| unsafe {
                    dots_avx2::<K, ROW_GROUP>(row, std::array::from_fn(|k| &xq[j + k]))
                };
                // SAFETY: as above.
                let one = |j: usize| unsafe { dots_avx2::<K, 1>(row, [&xq[j]])[0] };
                return fill_grouped(buf, four, one);
            }
            let _ = avx2;
            for (j, o) in buf.iter_mut().enumerate() {
                *o = K::dot_scalar(row, &xq[j]);
            }
        })
    });
}

/// A GGML block format whose matrices [`Int8Matrix`] multiplies with int8 activations.
pub trait Int8Format: Int8Dot + std::fmt::Debug + Send + 'static {
    /// The format's name in errors (`Q4_1`).
    const NAME: &'static str;
    /// Bytes per 32-element block.
    const BLOCK_BYTES: usize;
    /// Appends a block's 32 values.
    fn dequantize_block(blk: &[u8], out: &mut Vec<f32>);
}

/// Weight rows per pool task: enough work that handing tasks out stays a small cost.
const ROWS_PER_TASK: usize = 32;

/// A `[rows, cols]` matrix of `F` blocks, row-major, in ggml's byte layout.
#[derive(Debug, Clone)]
pub struct Int8Matrix<F> {
    blocks: BlockRows,
    format: PhantomData<F>,
}

impl<F: Int8Format> Int8Matrix<F> {
    /// Wraps ggml bytes of a `[rows, cols]` matrix.
    pub fn new(rows: usize, cols: usize, data: Vec<u8>) -> Result<Self> {
        BlockRows::new(F::NAME, rows, cols, F::BLOCK_BYTES, data).map(|blocks| Self {
            blocks,
            format: PhantomData,
        })
    }

    /// The bytes of weight row `r`.
    #[cfg(test)]
    pub(crate) fn row(&self, r: usize) -> &[u8] {
        self.blocks.row(r)
    }
}

impl<F: Int8Format> RowKernel for Int8Matrix<F> {
    fn dims(&self) -> (usize, usize) {
        (self.blocks.rows, self.blocks.cols)
    }

    fn matmul_rows(&self, xs: &[f32], m: usize, out: &mut [f32]) {
        matmul_int8::<F>(&self.blocks, xs, m, out, ROWS_PER_TASK)
    }

    fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let mut v = Vec::with_capacity(self.blocks.rows * self.blocks.cols);
        for blk in self.blocks.data.chunks_exact(F::BLOCK_BYTES) {
            F::dequantize_block(blk, &mut v);
        }
        Ok(Tensor::from_vec(
            v,
            (self.blocks.rows, self.blocks.cols),
            device,
        )?)
    }
}
