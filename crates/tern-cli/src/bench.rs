//! `tern bench`: measured numbers as a table plus one JSON line.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use tern::bench::generate::GenerateBenchOptions;
use tern::LoadOptions;

/// What to measure.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Load time, prompt and decode tok/s, time to first token, peak RSS, streaming overhead.
    Generate(GenerateBenchArgs),
}

/// Arguments of `tern bench generate`.
#[derive(Args, Debug)]
pub struct GenerateBenchArgs {
    /// A Hugging Face checkpoint directory or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens to decode per run.
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    /// Timed runs (best kept).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Compute dtype (for GGUF: dequantize to it).
    #[arg(long)]
    pub dtype: Option<String>,
    /// GGUF with tied embeddings: compute logits through candle's quantized matmul, rounding
    /// activations to int8 as llama.cpp does (default: exact logits from the stored blocks).
    #[arg(long)]
    pub quantized_head: bool,
}

/// Runs a benchmark.
pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Generate(a) => {
            let dtype = a
                .dtype
                .as_deref()
                .map(tern::device::parse_dtype)
                .transpose()?;
            let opts = GenerateBenchOptions {
                prompt_tokens: a.prompt_tokens,
                gen_tokens: a.gen_tokens,
                runs: a.runs,
            };
            let r = tern::bench::generate::run(
                &a.model,
                &LoadOptions {
                    dtype,
                    quantized_head: a.quantized_head,
                    ..Default::default()
                },
                &opts,
            )
            .with_context(|| format!("benchmarking {}", a.model.display()))?;
            let rows = [
                ("model", r.model.clone()),
                ("load path", r.load_path.clone()),
                (
                    "load",
                    format!(
                        "{:.3} s ({:.1} MB, {:.2} GB/s)",
                        r.load_s,
                        r.load_bytes as f64 / 1e6,
                        r.load_gb_s
                    ),
                ),
                (
                    "prompt",
                    format!("{:.1} tok/s ({} tokens)", r.prompt_tok_s, r.prompt_tokens),
                ),
                ("first token", format!("{:.1} ms", r.ttft_ms)),
                (
                    "decode",
                    format!("{:.1} tok/s ({} tokens)", r.decode_tok_s, r.gen_tokens),
                ),
                (
                    "decode stream",
                    format!("{:.1} tok/s", r.decode_tok_s_streamed),
                ),
                (
                    "stream cost",
                    format!("{:+.2} % (A/B of whole runs)", r.streaming_overhead_pct),
                ),
                (
                    "stream work",
                    format!(
                        "{:.4} % of decode time (timed directly)",
                        r.stream_callback_pct
                    ),
                ),
                ("peak RSS", format!("{:.0} MB", r.peak_rss_mb)),
            ];
            for (k, v) in rows {
                println!("{k:<14} {v}");
            }
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
    }
}
