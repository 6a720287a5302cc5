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
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};

/// The stored values.
#[derive(Debug)]
enum Values {
    Bf16(Vec<half::bf16>),
    F16(Vec<half::f16>),
}

/// A `[rows, cols]` matrix of bf16 or f16 values.
#[derive(Debug)]
pub struct HalfMatrix {
    rows: usize,
    cols: usize,
    values: Values,
}

impl HalfMatrix {
    /// From GGML's little-endian bytes of a `[rows, cols]` F16 or BF16 tensor.
    pub fn from_ggml(kind: GgmlDType, rows: usize, cols: usize, data: &[u8]) -> Result<Self> {
        if data.len() != rows * cols * 2 {
            return Err(TernError::InvalidArgument(format!(
                "{kind:?} matrix [{rows}, {cols}] needs {} bytes, got {}",
                rows * cols * 2,
                data.len()
            )));
        }
        let bits = data
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]));
        let values = match kind {
            GgmlDType::BF16 => Values::Bf16(bits.map(half::bf16::from_bits).collect()),
            GgmlDType::F16 => Values::F16(bits.map(half::f16::from_bits).collect()),
            other => {
                return Err(TernError::InvalidArgument(format!(
                    "a half-width matrix is F16 or BF16, not {other:?}"
                )))
            }
        };
        Ok(Self { rows, cols, values })
    }

    /// `out[j * rows + r] = W[r] · xs[j]`.
    fn product(&self, xs: &[f32], m: usize, out: &mut [f32]) {
        fn run<T: Element>(w: &[T], s: &HalfMatrix, xs: &[f32], m: usize, out: &mut [f32]) {
            dense::matmul_rows(w, s.rows, s.cols, xs, m, out)
        }
        match &self.values {
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

    fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let shape = (self.rows, self.cols);
        let t = match &self.values {
            Values::Bf16(w) => Tensor::from_slice(w, shape, device)?,
            Values::F16(w) => Tensor::from_slice(w, shape, device)?,
        };
        Ok(t.to_dtype(candle_core::DType::F32)?)
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
    use candle_core::quantized::QTensor;

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
            let q = QTensor::quantize(&w, kind).unwrap();
            let h = HalfMatrix::from_ggml(kind, rows, cols, &q.data().unwrap()).unwrap();
            let wide = h.dequantize(&Device::Cpu).unwrap();
            assert_eq!(
                wide.to_vec2::<f32>().unwrap(),
                q.dequantize(&Device::Cpu)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap()
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

    #[test]
    fn a_wrong_size_or_type_is_refused_by_name() {
        let e = HalfMatrix::from_ggml(GgmlDType::BF16, 2, 3, &[0; 10]).unwrap_err();
        assert!(e.to_string().contains("needs 12 bytes"), "{e}");
        let e = HalfMatrix::from_ggml(GgmlDType::Q8_0, 1, 1, &[0; 2]).unwrap_err();
        assert!(e.to_string().contains("F16 or BF16"), "{e}");
    }
}
