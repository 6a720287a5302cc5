//! `tern inspect`.

use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// Arguments of `tern inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A Hugging Face checkpoint directory or a .gguf file.
    pub path: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Runs `tern inspect`.
pub fn run(a: InspectArgs) -> Result<()> {
    let i = tern::model::inspect::inspect(&crate::resolve::model(&a.path)?)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&i)?);
        return Ok(());
    }
    let dtypes: Vec<String> = i.dtypes.iter().map(|(k, v)| format!("{k} x{v}")).collect();
    let rows = [
        ("format", i.format.clone()),
        ("architecture", i.architecture.clone()),
        ("shape", i.shape.clone()),
        (
            "parameters",
            format!("{:.1} M ({})", i.parameters as f64 / 1e6, i.parameters),
        ),
        ("dtypes", dtypes.join(", ")),
        (
            "files",
            format!("{} ({:.1} MB)", i.files.join(", "), i.bytes as f64 / 1e6),
        ),
        ("tokenizer", i.tokenizer.clone()),
        ("chat template", i.chat_template.clone()),
    ];
    for (k, v) in rows {
        println!("{k:<14} {v}");
    }
    Ok(())
}
