//! `tern merge`.

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use tern::lora::merge::{merge_checkpoint, parse_size, MergeOptions};

/// Arguments of `tern merge`.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Base model: a Hugging Face checkpoint directory or Hub id.
    #[arg(long)]
    pub model: PathBuf,
    /// LoRA adapter: a PEFT directory or Hub id.
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output directory (written atomically: it appears only when complete).
    #[arg(long)]
    pub out: PathBuf,
    /// Output dtype of float weights: f32, bf16 or f16 (default: as stored in the base).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Largest safetensors shard, e.g. 2GB, 500MB, 5GiB.
    #[arg(long, default_value = "2GB")]
    pub shard_size: String,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
}

/// Runs `tern merge`.
pub fn run(a: MergeArgs) -> Result<()> {
    let opts = MergeOptions {
        dtype: a
            .dtype
            .as_deref()
            .map(tern::device::parse_dtype)
            .transpose()?,
        shard_size: parse_size(&a.shard_size)?,
        force: a.force,
    };
    let (model, adapter) = (
        crate::resolve::model(&a.model)?,
        crate::resolve::adapter(&a.adapter)?,
    );
    let r = merge_checkpoint(&model, &adapter, &a.out, &opts)
        .with_context(|| format!("merging {} into {}", a.adapter.display(), a.model.display()))?;
    println!(
        "merged {} of {} tensors into {} ({} shard{}, {:.1} MB) in {:.2} s",
        r.merged,
        r.tensors,
        r.out.display(),
        r.shards,
        if r.shards == 1 { "" } else { "s" },
        r.bytes as f64 / 1e6,
        r.elapsed.as_secs_f64()
    );
    Ok(())
}
