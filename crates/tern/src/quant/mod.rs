//! Weight kernels tern provides itself, where candle's CPU backend has no SIMD path (Q4_1),
//! rounds activations where we need exact results (the Q8_0 output head), or re-packs the
//! whole weight for a handful of rows (float weights times decode rows and short prompts,
//! `dense.rs`).

pub mod dense;
#[cfg(target_arch = "x86_64")]
mod dense_kernels;
pub mod half_float;
pub mod int8;
pub mod q4_1;
pub mod q4_1x8;
pub mod q5_0;
pub mod q5_0x8;
pub mod q6_k;
pub mod q8_0;
pub mod q8_0_head;
pub mod q8_0x8;
pub mod scheme;
pub(crate) mod vexp;
pub mod x8;
#[cfg(target_arch = "x86_64")]
mod x8_panel;
mod x8_shared;

pub use scheme::QuantType;

use crate::error::Result;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::sync::Arc;

/// The rows of a `[rows, cols]` matrix stored as GGML blocks of `BLOCK` elements each.
#[derive(Debug, Clone)]
pub(crate) struct BlockRows {
    pub rows: usize,
    pub cols: usize,
    row_bytes: usize,
    pub data: Vec<u8>,
}

/// Elements per block in every type these kernels read.
pub(crate) const BLOCK: usize = 32;

impl BlockRows {
    /// Checks that `data` holds exactly `rows` rows of `cols / 32` blocks of `block_bytes`.
    pub fn new(
        kind: &str,
        rows: usize,
        cols: usize,
        block_bytes: usize,
        data: Vec<u8>,
    ) -> Result<Self> {
        let row_bytes = cols / BLOCK * block_bytes;
        if !cols.is_multiple_of(BLOCK) || data.len() != rows * row_bytes {
            return Err(crate::TernError::InvalidArgument(format!(
                "{kind} matrix [{rows}, {cols}] needs cols % {BLOCK} == 0 and {} bytes, got {}",
                rows * row_bytes,
                data.len()
            )));
        }
        Ok(Self {
            rows,
            cols,
            row_bytes,
            data,
        })
    }

    /// The bytes of row `r`.
    pub fn row(&self, r: usize) -> &[u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }
}

/// A quantized `[rows, cols]` matrix with a matrix-times-rows kernel of tern's own.
pub trait RowKernel: std::fmt::Debug + Send + Sync {
    /// `[rows, cols]`.
    fn dims(&self) -> (usize, usize);
    /// `out[j * rows + r] = W[r] · xs[j]` for `m` f32 activation rows `xs` `[m, cols]`. Each
    /// weight row is read once for all `m` activations, so a batch of decode rows costs one
    /// pass over the weights, not `m`.
    fn matmul_rows(&self, xs: &[f32], m: usize, out: &mut [f32]);
    /// The matrix in f32 `[rows, cols]`.
    fn dequantize(&self, device: &Device) -> Result<Tensor>;

    /// As [`RowKernel::matmul_rows`] but exact to the stored weights (f32 activations, no
    /// int8 rounding), if the kernel has such a path; `false` (and `out` untouched) if not,
    /// and the caller multiplies by [`RowKernel::dequantize`] instead.
    fn matmul_exact_rows(&self, _xs: &[f32], _m: usize, _out: &mut [f32]) -> bool {
        false
    }

    /// Eight-row groups this kernel can run from activations rounded elsewhere
    /// ([`x8::matmul_rows_shared`]); 0 if it has no such path.
    fn shared_groups(&self) -> usize {
        0
    }

    /// Group `g` (weight rows `8g..8g + 8`) times the int8 rows `xq`; `at(j)` points at
    /// activation row `j`'s eight results. Only called when [`RowKernel::shared_groups`] is
    /// above `g`.
    fn group_dots(&self, _g: usize, _xq: &[int8::Q8Row], _at: &dyn Fn(usize) -> *mut f32) {
        unreachable!("group_dots on a kernel without shared groups")
    }

    /// Groups `g` and `g + 1` times `xq`; `at(j)` points at activation row `j`'s sixteen
    /// results. Two [`RowKernel::group_dots`] calls unless a kernel runs both at once, with
    /// the same bits.
    fn group_pair_dots(&self, g: usize, xq: &[int8::Q8Row], at: &dyn Fn(usize) -> *mut f32) {
        self.group_dots(g, xq, at);
        self.group_dots(g + 1, xq, &|j| at(j).wrapping_add(x8::ROWS));
    }

    /// `out[r] = W[r] · x` for one activation row.
    fn matvec(&self, x: &[f32], out: &mut [f32]) {
        self.matmul_rows(x, 1, out)
    }

    /// `x W^T` for `x` `[.., cols]` in f32 through [`RowKernel::matmul_exact_rows`]; `None`
    /// if the kernel has no exact product.
    fn forward_exact(&self, x: &Tensor) -> Result<Option<Tensor>> {
        apply_rows(self.dims(), x, |xs, m, out| {
            self.matmul_exact_rows(xs, m, out)
        })
    }

    /// `x W^T` for `x` `[.., cols]` in f32.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = apply_rows(self.dims(), x, |xs, m, out| {
            self.matmul_rows(xs, m, out);
            true
        })?;
        y.ok_or_else(|| {
            crate::TernError::InvalidArgument(format!(
                "quantized matmul: input {:?} is not readable as f32 rows",
                x.dims()
            ))
        })
    }
}

/// Runs `f(xs, m, out)` over `x` `[.., cols]` flattened to `m` rows and shapes `out` as
/// `[.., rows]`; `None` when `f` declines.
fn apply_rows(
    (rows, cols): (usize, usize),
    x: &Tensor,
    f: impl FnOnce(&[f32], usize, &mut [f32]) -> bool,
) -> Result<Option<Tensor>> {
    // Read in place when it can be: a prompt's copy was ~5% of an exact prefill.
    let x = x.contiguous()?;
    let copy = (!x.device().is_cpu() || x.dtype() != candle_core::DType::F32)
        .then(|| x.flatten_all()?.to_vec1::<f32>())
        .transpose()?;
    let (storage, layout) = x.storage_and_layout();
    let xs: &[f32] = match (&copy, &*storage, layout.contiguous_offsets()) {
        (Some(v), _, _) => v,
        (None, candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => {
            &v[a..b]
        }
        _ => return Ok(None),
    };
    let m = xs.len() / cols;
    let mut out = vec![0f32; m * rows];
    if !f(xs, m, &mut out) {
        return Ok(None);
    }
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = rows;
    Ok(Some(Tensor::from_vec(out, dims, x.device())?))
}

/// tern's kernel for a decoder layer's quantized CPU weight, where it has one (Q4_1, Q5_0 and
/// Q8_0, whose candle paths are scalar or about half llama.cpp's speed; F16 and BF16, which
/// candle widens to an f32 copy); `None` leaves the weight to candle (the k-quants, whose SIMD
/// paths candle has).
pub fn layer_kernel(q: &Arc<QTensor>) -> Option<Arc<dyn RowKernel>> {
    // The kernels are CPU code; on a GPU the weight stays with candle's device kernels.
    if !q.device().is_cpu() {
        return None;
    }
    let (rows, cols) = q.shape().dims2().ok()?;
    let data = q.data().ok()?;
    let k: Arc<dyn RowKernel> = match q.dtype() {
        // Repacked eight rows at a time: several times less work per activation row (batched
        // decode, and an exact prefill product).
        GgmlDType::Q4_1 if rows.is_multiple_of(x8::ROWS) => {
            Arc::new(q4_1x8::Q4_1x8Matrix::new(rows, cols, &data).ok()?)
        }
        GgmlDType::Q4_1 => Arc::new(q4_1::Q4_1Matrix::new(rows, cols, data.to_vec()).ok()?),
        GgmlDType::Q5_0 if rows.is_multiple_of(x8::ROWS) => {
            Arc::new(q5_0x8::Q5_0x8Matrix::new(rows, cols, &data).ok()?)
        }
        GgmlDType::Q5_0 => Arc::new(q5_0::Q5_0Matrix::new(rows, cols, data.to_vec()).ok()?),
        GgmlDType::Q8_0 if rows.is_multiple_of(x8::ROWS) => {
            Arc::new(q8_0x8::Q8_0x8Matrix::new(rows, cols, &data).ok()?)
        }
        GgmlDType::Q8_0 => Arc::new(q8_0::Q8_0Matrix::rounding(rows, cols, data.to_vec()).ok()?),
        // Half the bytes of the f32 copy candle would make, with the same results.
        GgmlDType::BF16 | GgmlDType::F16 => Arc::new(half_float::HalfMatrix::new(q.clone()).ok()?),
        _ => return None,
    };
    Some(k)
}

/// Runs `f` over `0..n` split into ranges of `per_task` items (the last one shorter), as
/// tasks of candle's worker pool; returns when every task is done.
pub(crate) fn par_ranges(n: usize, per_task: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(per_task), |tasks| {
        f(tasks.start * per_task..(tasks.end * per_task).min(n))
    });
}

/// Fills `out[j * rows + r]` for every weight row `r < rows` and activation row `j < m`:
/// `dots(r, buf)` writes row `r`'s `m` results into `buf` (so a kernel can reuse one load of
/// the weight row for several activations). `rows_per_task` weight rows go to each task, on
/// candle's worker pool (a second pool on the same cores made the two fight: ~20% of decode
/// time went to the scheduler).
pub(crate) fn par_rows(
    out: &mut [f32],
    rows: usize,
    m: usize,
    rows_per_task: usize,
    dots: impl Fn(usize, &mut [f32]) + Sync,
) {
    assert_eq!(out.len(), rows * m);
    let out_ptr = out.as_mut_ptr() as usize;
    par_ranges(rows, rows_per_task, |task| {
        let mut buf = vec![0f32; m];
        for r in task {
            dots(r, &mut buf);
            for (j, v) in buf.iter().enumerate() {
                // SAFETY: tasks cover disjoint weight rows, so each element `j * rows + r` has
                // exactly one writer, and `out` outlives the call, which returns only when
                // every task is done.
                unsafe { *(out_ptr as *mut f32).add(j * rows + r) = *v };
            }
        }
    });
}

/// Activation rows handled together by the register-blocked kernels.
pub(crate) const ROW_GROUP: usize = 4;

/// Fills `buf[j]` for every activation row `j`: [`ROW_GROUP`] rows at a time with `four(j)`
/// (rows `j..j + ROW_GROUP`), the rest one by one with `one(j)`.
pub(crate) fn fill_grouped(
    buf: &mut [f32],
    four: impl Fn(usize) -> [f32; ROW_GROUP],
    one: impl Fn(usize) -> f32,
) {
    let mut j = 0;
    while j + ROW_GROUP <= buf.len() {
        buf[j..j + ROW_GROUP].copy_from_slice(&four(j));
        j += ROW_GROUP;
    }
    for (i, o) in buf.iter_mut().enumerate().skip(j) {
        *o = one(i);
    }
}

/// Whether the AVX2 + FMA + F16C kernels can run on this CPU.
pub(crate) fn use_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether AVX-512F kernels can run on this CPU (on top of [`use_avx2`]).
pub(crate) fn use_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX512.get_or_init(|| use_avx2() && is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the eight-row int8 kernels can use AVX512-VNNI (`vpdpbusd` on 256-bit vectors, and
/// AVX-512's 32 vector registers): on top of [`use_avx2`].
pub(crate) fn use_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *VNNI.get_or_init(|| {
            use_avx2()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Sum of the 8 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::RowKernel;

    /// An int8 kernel over `q`'s blocks: its SIMD product equals `scalar` (the portable dot of
    /// weight row `r` with the same int8 activations), candle's quantized matmul within
    /// rounding (candle keeps activation scales in f16), and batched rows equal single ones.
    pub(crate) fn int8_kernel_agrees(
        k: &dyn RowKernel,
        q: candle_core::quantized::QTensor,
        scalar: impl Fn(usize, &crate::quant::int8::Q8Row) -> f32,
    ) {
        use candle_core::Module;
        let (rows, cols) = k.dims();
        let xs = crate::quant::q4_1::tests::det_values(cols, 9);
        let mut ours = vec![0f32; rows];
        k.matvec(&xs, &mut ours);
        let xq = crate::quant::int8::quantize_row(&xs);
        let x = candle_core::Tensor::from_vec(xs, (1, cols), &candle_core::Device::Cpu).unwrap();
        let candle = candle_core::quantized::QMatMul::from_qtensor(q).unwrap();
        let theirs = candle.forward(&x).unwrap().flatten_all().unwrap();
        let theirs = theirs.to_vec1::<f32>().unwrap();
        for r in 0..rows {
            let s = scalar(r, &xq);
            assert!(
                (s - ours[r]).abs() < 1e-3 * s.abs().max(1.0),
                "row {r}: scalar {s} simd {}",
                ours[r]
            );
            let t = theirs[r];
            assert!((ours[r] - t).abs() < 0.05 * t.abs().max(1.0), "row {r}");
        }
        batch_equals_single_rows(k);
    }

    #[test]
    fn simd_activation_rounding_equals_the_scalar_one() {
        let xs = crate::quant::q4_1::tests::det_values(32 * 40, 17);
        let simd = crate::quant::int8::quantize_row(&xs);
        for (b, x) in xs.chunks_exact(32).enumerate() {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            assert_eq!(simd.d[b], d);
            let q: Vec<i8> = x.iter().map(|v| (v / d).round_ties_even() as i8).collect();
            // 1/d then multiply (as the SIMD form does) may differ from a division by one ulp,
            // which can move a value sitting on a rounding boundary by one step.
            for (i, (a, e)) in simd.q[b * 32..(b + 1) * 32].iter().zip(&q).enumerate() {
                assert!(
                    (*a as i32 - *e as i32).abs() <= 1,
                    "block {b} value {i}: {a} vs {e}"
                );
            }
            let sum: i32 = simd.q[b * 32..(b + 1) * 32].iter().map(|&v| v as i32).sum();
            assert_eq!(simd.s[b], d * sum as f32);
        }
        let zeros = crate::quant::int8::quantize_row(&[0f32; 64]);
        assert!(zeros.q.iter().all(|&v| v == 0) && zeros.d == [0.0, 0.0]);
    }

    /// A batch through `matmul_rows` gives each row bit for bit what it gives alone, for
    /// every row count around the register group (so batched decode equals solo decode).
    pub(crate) fn batch_equals_single_rows(k: &dyn RowKernel) {
        let (rows, cols) = k.dims();
        let det = crate::quant::q4_1::tests::det_values;
        // Past 16 rows the activations are rounded on the pool (int8::with_quantized).
        for m in (1..=9).chain([20, 37]) {
            let xs = det(m * cols, m as u64 + 11);
            let mut batch = vec![0f32; m * rows];
            k.matmul_rows(&xs, m, &mut batch);
            for j in 0..m {
                let mut one = vec![0f32; rows];
                k.matvec(&xs[j * cols..(j + 1) * cols], &mut one);
                assert_eq!(&batch[j * rows..(j + 1) * rows], &one[..], "m={m} row {j}");
            }
        }
    }
}
