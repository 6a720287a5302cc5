//! `--model` / `--adapter` values: local paths, or Hugging Face Hub ids resolved through the
//! local Hugging Face cache (downloaded into it unless `HF_HUB_OFFLINE=1`).

use anyhow::Result;
use std::path::{Path, PathBuf};
use tern::checkpoint::hub::{resolve, HubOptions, RepoKind};

fn go(p: &Path, kind: RepoKind) -> Result<PathBuf> {
    let spec = p.to_string_lossy();
    Ok(resolve(&spec, kind, &HubOptions::from_env())?)
}

/// A model directory, .gguf file or Hub id, as a local path.
pub fn model(p: &Path) -> Result<PathBuf> {
    go(p, RepoKind::Model)
}

/// An adapter directory or Hub id, as a local path.
pub fn adapter(p: &Path) -> Result<PathBuf> {
    go(p, RepoKind::Adapter)
}

/// Loads `--model` (a path or Hub id) as `--dtype`/`--quantize` say, naming it on failure.
pub fn load(p: &Path, flags: &crate::load_args::LoadArgs) -> Result<tern::LoadedModel> {
    tern::LoadedModel::load(&model(p)?, &flags.options()?).map_err(|e| {
        // Most load errors name their file already; the rest get the model's path.
        let named = e.to_string().contains(&*p.to_string_lossy());
        let e = anyhow::Error::from(e);
        if named {
            e
        } else {
            e.context(format!("loading {}", p.display()))
        }
    })
}
