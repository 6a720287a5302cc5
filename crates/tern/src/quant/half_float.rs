//! bf16 and f16 weights with f32 activations: half the bytes of an f32 weight per token, and
//! the same results as the f32 weight holding the same values.
//!
//! Each weight widens to f32 as the product reads it (exact: every bf16 and f16 value is an
//! f32 value), and the activations stay f32, unlike llama.cpp's CPU path, which rounds them to
//! the weight's type first. Up to [`dense::MAX_ROWS`] rows run through the few-row product
//! (`dense.rs`); longer prompts decline, and the layer multiplies the widened copy through
//! candle's GEMM, as an f32 weight does at that length. So a model stored this way gives, bit
//! for bit, what the f32 model with the rounded weights gives.

use super::dense::{self, Element};
use super::RowKernel;
use crate::error::{Result, TernError};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::slice::HalfFloatSliceExt;
use std::sync::Arc;

/// A `[rows, cols]` matrix of bf16 or f16 values, read in place from the loaded tensor (no
/// copy: a second one had put the load's peak above the f32 model's).
#[derive(Debug)]
pub struct HalfMatrix {
    rows: usize,
    cols: usize,
    q: Arc<QTensor>,
}

/// The stored values, borrowed.
enum Values<'a> {
    Bf16(&'a [half::bf16]),
    F16(&'a [half::f16]),
}

impl Values<'_> {
    /// Widens the values at `span` into `dst` (exact; SIMD where the CPU has it).
    fn widen(&self, span: std::ops::Range<usize>, dst: &mut [f32]) {
        match self {
            Values::Bf16(v) => v[span].convert_to_f32_slice(dst),
            Values::F16(v) => v[span].convert_to_f32_slice(dst),
        }
    }
}

impl HalfMatrix {
    /// Over a `[rows, cols]` F16 or BF16 tensor in CPU memory.
    pub fn new(q: Arc<QTensor>) -> Result<Self> {
        let bad = |what: String| TernError::InvalidArgument(format!("half-width matrix: {what}"));
        if !matches!(q.dtype(), GgmlDType::F16 | GgmlDType::BF16) {
            return Err(bad(format!("{:?} is not F16 or BF16", q.dtype())));
        }
        if !q.device().is_cpu() {
            return Err(bad("the weights must be in CPU memory".into()));
        }
        let (rows, cols) = q.shape().dims2()?;
        let m = Self { rows, cols, q };
        let n = match m.values()? {
            Values::Bf16(v) => v.len(),
            Values::F16(v) => v.len(),
        };
        if n != rows * cols {
            return Err(bad(format!("[{rows}, {cols}] holds {n} values")));
        }
        Ok(m)
    }

    /// The values in place (CPU storage is a typed buffer, so whole and aligned).
    fn values(&self) -> Result<Values<'_>> {
        let std::borrow::Cow::Borrowed(bytes) = self.q.data()? else {
            return Err(TernError::InvalidArgument(
                "half-width matrix: the weights must be in CPU memory".into(),
            ));
        };
        // SAFETY: bf16 and f16 are plain 16-bit words (any bit pattern is a value);
        // `align_to` only hands out the aligned middle, and a ragged edge is refused below.
        let (v, ok) = unsafe {
            match self.q.dtype() {
                GgmlDType::BF16 => {
                    let (a, v, b) = bytes.align_to::<half::bf16>();
                    (Values::Bf16(v), a.is_empty() && b.is_empty())
                }
                _ => {
                    let (a, v, b) = bytes.align_to::<half::f16>();
                    (Values::F16(v), a.is_empty() && b.is_empty())
                }
            }
        };
        if !ok {
            return Err(TernError::InvalidArgument(
                "half-width matrix: storage not aligned to 16-bit values".into(),
            ));
        }
        Ok(v)
    }

    /// Rows `ids` widened to f32, one after another (the embedding's lookups: the same
    /// values the head multiplies by, so a tied table is stored once).
    pub fn rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; ids.len() * self.cols];
        let values = self.values()?;
        for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(self.cols)) {
            let r = id as usize;
            if r >= self.rows {
                return Err(TernError::InvalidArgument(format!(
                    "token id {id} is outside the embedding of {} rows",
                    self.rows
                )));
            }
            let span = r * self.cols..(r + 1) * self.cols;
            values.widen(span, dst);
        }
        Ok(out)
    }

    /// `out[j * rows + r] = W[r] · xs[j]`.
    fn product(&self, xs: &[f32], m: usize, out: &mut [f32]) {
        fn run<T: Element>(w: &[T], s: &HalfMatrix, xs: &[f32], m: usize, out: &mut [f32]) {
            dense::matmul_rows(w, s.rows, s.cols, xs, m, out)
        }
        // `new` read the values once, and CPU storage does not move or change.
        match self.values().expect("checked by HalfMatrix::new") {
            Values::Bf16(w) => run(w, self, xs, m, out),
            Values::F16(w) => run(w, self, xs, m, out),
        }
    }
}

impl RowKernel for HalfMatrix {
    fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    fn matmul_rows(&self, xs: &[f32], m: usize, out: &mut [f32]) {
        self.product(xs, m, out)
    }

    /// Widened on candle's worker pool (candle's own dequantize is one thread, element by
    /// element: ~0.15 s of a 512-token SmolLM2 prompt, which widens every matrix).
    fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let cols = self.cols;
        let mut out = vec![0f32; self.rows * cols];
        let dst = out.as_mut_ptr() as usize;
        let values = self.values()?;
        super::par_ranges(self.rows, 64, |rows| {
            let span = rows.start * cols..rows.end * cols;
            // SAFETY: tasks widen disjoint row ranges, and `out` outlives the call, which
            // returns only when every task is done.
            let dst = unsafe {
                std::slice::from_raw_parts_mut((dst as *mut f32).add(span.start), span.len())
            };
            values.widen(span, dst);
        });
        Ok(Tensor::from_vec(out, (self.rows, cols), device)?)
    }

    /// Already exact; past [`dense::MAX_ROWS`] rows the caller's GEMM over the widened copy
    /// is faster, as for an f32 weight.
    fn matmul_exact_rows(&self, xs: &[f32], m: usize, out: &mut [f32]) -> bool {
        if m > dense::MAX_ROWS {
            return false;
        }
        self.product(xs, m, out);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both types against the f32 product of the widened weight (the same kernel on the same
    /// values, so the same bits), for one row, a batch, and a prompt long enough to decline.
    #[test]
    fn half_weights_give_the_f32_weights_bits() {
        let (rows, cols) = (37, 100);
        let f = |i: usize| ((i * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0;
        let w = Tensor::from_vec(
            (0..rows * cols).map(f).collect(),
            (rows, cols),
            &Device::Cpu,
        )
        .unwrap();
        for kind in [GgmlDType::BF16, GgmlDType::F16] {
            let h = HalfMatrix::new(Arc::new(QTensor::quantize(&w, kind).unwrap())).unwrap();
            // The widened values are the rounded ones.
            let dtype = match kind {
                GgmlDType::BF16 => candle_core::DType::BF16,
                _ => candle_core::DType::F16,
            };
            let rounded = w.to_dtype(dtype).unwrap().to_dtype(candle_core::DType::F32);
            let wide = h.dequantize(&Device::Cpu).unwrap();
            assert_eq!(
                wide.to_vec2::<f32>().unwrap(),
                rounded.unwrap().to_vec2::<f32>().unwrap()
            );
            let wide: Vec<f32> = wide.flatten_all().unwrap().to_vec1().unwrap();
            for m in [1, 8, 19] {
                let xs: Vec<f32> = (0..m * cols).map(|i| f(i + 7)).collect();
                let (mut got, mut want) = (vec![0f32; m * rows], vec![0f32; m * rows]);
                h.matmul_rows(&xs, m, &mut got);
                dense::matmul_rows(&wide, rows, cols, &xs, m, &mut want);
                assert_eq!(got, want, "{kind:?}, {m} rows");
                assert!(h.matmul_exact_rows(&xs, m, &mut got));
                assert_eq!(got, want, "{kind:?}, {m} rows, exact");
            }
            let m = dense::MAX_ROWS + 1;
            let xs = vec![0.5f32; m * cols];
            assert!(!h.matmul_exact_rows(&xs, m, &mut vec![0f32; m * rows]));
        }
    }

    /// Looked-up rows are the widened table's rows; an id past the table is refused by value.
    #[test]
    fn rows_are_the_widened_rows() {
        let (rows, cols) = (11, 40);
        let w = Tensor::from_vec(
            (0..rows * cols)
                .map(|i| (i as f32 * 0.37).sin() * 3.0)
                .collect(),
            (rows, cols),
            &Device::Cpu,
        )
        .unwrap();
        for kind in [GgmlDType::BF16, GgmlDType::F16] {
            let h = HalfMatrix::new(Arc::new(QTensor::quantize(&w, kind).unwrap())).unwrap();
            let wide = h
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let ids = [3u32, 0, 10, 3];
            let got = h.rows(&ids).unwrap();
            let want: Vec<f32> = ids.iter().flat_map(|&i| wide[i as usize].clone()).collect();
            assert_eq!(got, want, "{kind:?}");
            let e = h.rows(&[2, 11]).unwrap_err().to_string();
            assert!(
                e.contains("token id 11 is outside the embedding of 11 rows"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_block_type_is_refused_by_name() {
        let w = Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        let q = Arc::new(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap());
        let e = HalfMatrix::new(q).unwrap_err();
        assert!(e.to_string().contains("Q8_0 is not F16 or BF16"), "{e}");
    }
}
