//! `tern convert`.

use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;

/// Arguments of `tern convert`.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// A model or adapter directory with legacy `.bin` weights (or a Hub id ORG/NAME[@rev]).
    #[arg(long)]
    pub model: PathBuf,
    /// Output directory (written atomically: it appears only when complete).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
}

/// Runs `tern convert`.
pub fn run(a: ConvertArgs) -> Result<()> {
    let src = crate::resolve::model(&a.model).or_else(|_| crate::resolve::adapter(&a.model))?;
    let r = tern::checkpoint::convert::convert_dir(&src, &a.out, a.force)
        .with_context(|| format!("converting {}", src.display()))?;
    println!(
        "wrote {} {} tensors ({:.1} MB) as {} safetensors file{} to {}",
        r.tensors,
        r.kind,
        r.bytes as f64 / 1e6,
        r.files,
        if r.files == 1 { "" } else { "s" },
        r.out.display()
    );
    Ok(())
}
