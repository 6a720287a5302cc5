//! tern: load Hugging Face and GGUF checkpoints of the Llama/Qwen family and stream tokens
//! from them; the library under the `tern` CLI and server.
//!
//! Modules go from the bottom up: `device` → `checkpoint` → `tokenizer` → `lora` → `quant` → `model` →
//! `generate` → `bench`; each uses only the ones before it.
#![warn(missing_docs)]

pub mod bench;
pub mod checkpoint;
pub mod device;
pub mod error;
pub mod generate;
pub mod lora;
pub mod model;
pub mod quant;
pub mod tokenizer;
pub mod train;

pub use device::DeviceKind;
pub use error::{Result, TernError};
pub use generate::{
    Completion, FinishReason, GenerateRequest, Prompt, SamplingParams, StreamToken,
};
pub use model::{LoadOptions, LoadedModel, ModelConfig};
pub use tokenizer::ChatMessage;

/// Helpers shared by the unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::Tensor;

    /// max |a - b| over two tensors of the same shape; NaN if any difference is NaN (candle's
    /// `max_all` passes over NaNs, which would hide a value an op never wrote).
    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d: Vec<f32> = (a - b)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        d.iter().fold(0f32, |m, v| {
            if m.is_nan() || v.is_nan() {
                f32::NAN
            } else {
                m.max(v.abs())
            }
        })
    }

    /// max |a - b| relative to max |b|.
    pub fn rel(a: &Tensor, b: &Tensor) -> f32 {
        max_abs_diff(a, b) / max_abs_diff(b, &b.zeros_like().unwrap()).max(1e-12)
    }
}
