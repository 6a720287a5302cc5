//! `--dtype`, `--quantize`, `--int8-prompts` and `--quantized-head`: how every command that
//! runs a model loads it.

use anyhow::Result;
use clap::Args;
use tern::quant::QuantType;
use tern::LoadOptions;

/// Load flags shared by `generate`, `chat`, `serve` and the benchmarks.
#[derive(Args, Debug, Clone, Default)]
pub struct LoadArgs {
    /// Compute dtype: f32, bf16 or f16 (for GGUF: dequantize to it; default keeps it quantized).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Quantize a float checkpoint's linear layers while loading: q8_0, q4_k, q4_0, q4_1 or
    /// q5_0 (embeddings and norms stay float); or bf16 / f16, the embedding table too, stored
    /// at half width and multiplied with f32 activations (same results as f32 weights holding
    /// those values).
    #[arg(long, value_name = "TYPE")]
    pub quantize: Option<QuantType>,
    /// Run prompts through the int8 kernels as decode does (activations rounded to 8 bits,
    /// as llama.cpp): about half the prompt time on Q4_1, Q5_0 and Q8_0 weights; default:
    /// prompts multiply exactly with the stored weights.
    #[arg(long)]
    pub int8_prompts: bool,
    /// GGUF with tied embeddings: compute logits through the int8 Q8_0 kernel, rounding
    /// activations to int8 as llama.cpp does (default: exact logits from the stored blocks).
    #[arg(long)]
    pub quantized_head: bool,
}

impl LoadArgs {
    /// The library's load options for these flags.
    pub fn options(&self) -> Result<LoadOptions> {
        Ok(LoadOptions {
            dtype: self
                .dtype
                .as_deref()
                .map(tern::device::parse_dtype)
                .transpose()?,
            quantize: self.quantize,
            int8_prompts: self.int8_prompts,
            quantized_head: self.quantized_head,
            ..Default::default()
        })
    }
}
