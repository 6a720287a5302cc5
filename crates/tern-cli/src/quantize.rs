//! `tern quantize`.

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use tern::model::gguf_export::{export_gguf, ExportOptions, ExportType};

/// Arguments of `tern quantize`.
#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// A Hugging Face model directory (or a Hub id ORG/NAME[@rev]), or a GGUF file to convert.
    #[arg(long)]
    pub model: PathBuf,
    /// The GGUF file to write (it appears only when complete).
    #[arg(long)]
    pub out: PathBuf,
    /// Storage of the linear layers: q8_0, q4_k, q4_0, q4_1, q5_0, or bf16 / f16 / f32 (float).
    #[arg(long = "type", value_name = "TYPE", default_value = "q8_0")]
    pub ty: ExportType,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
    /// Accept a GGUF input whose tensors are already quantized (they are dequantized and
    /// quantized again, adding a second rounding).
    #[arg(long)]
    pub allow_requantize: bool,
}

/// Runs `tern quantize`.
pub fn run(a: QuantizeArgs) -> Result<()> {
    let src = crate::resolve::model(&a.model)?;
    let opts = ExportOptions {
        ty: a.ty,
        force: a.force,
        allow_requantize: a.allow_requantize,
    };
    let r = export_gguf(&src, &a.out, &opts)
        .with_context(|| format!("quantizing {}", src.display()))?;
    let types: Vec<String> = r.types.iter().map(|(k, n)| format!("{n} {k}")).collect();
    println!(
        "wrote {} ({} tensors: {}; {:.1} MB from {:.1} MB) in {:.1} s",
        r.out.display(),
        r.tensors,
        types.join(", "),
        r.bytes_out as f64 / 1e6,
        r.bytes_in as f64 / 1e6,
        r.elapsed.as_secs_f64()
    );
    Ok(())
}
