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

    /// max |a - b| over two tensors of the same shape.
    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// max |a - b| relative to max |b|.
    pub fn rel(a: &Tensor, b: &Tensor) -> f32 {
        max_abs_diff(a, b) / max_abs_diff(b, &b.zeros_like().unwrap()).max(1e-12)
    }
}
