//! `tern convert`: a legacy PyTorch checkpoint or adapter (`pytorch_model.bin`, its sharded
//! index, `adapter_model.bin`) rewritten as safetensors, so it is migrated once and mapped
//! directly afterwards. Tensors keep their names, dtypes and bytes; the result appears at the
//! destination only when complete.

use super::hf_dir::HfDir;
use super::tensor_file::TensorFile;
use super::writer::{copy_side_files, write_shards, write_streaming, StagedDir, TensorSpec};
use crate::error::{Result, TernError};
use std::path::{Path, PathBuf};

/// What a conversion wrote.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    /// The written directory.
    pub out: PathBuf,
    /// `model` or `adapter`.
    pub kind: &'static str,
    /// Tensors written.
    pub tensors: usize,
    /// Safetensors files written.
    pub files: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
}

fn specs_of(f: &TensorFile) -> Vec<TensorSpec> {
    let mut v: Vec<TensorSpec> = f
        .entries()
        .iter()
        .map(|(n, e)| TensorSpec {
            name: n.clone(),
            dtype: e.dtype,
            shape: e.shape.clone(),
        })
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// Converts the model or adapter directory `src` into `out`.
pub fn convert_dir(src: &Path, out: &Path, force: bool) -> Result<ConvertReport> {
    if !src.is_dir() {
        return Err(TernError::InvalidArgument(format!(
            "{}: convert takes a model or adapter directory",
            src.display()
        )));
    }
    let staged = StagedDir::new(out, &[src], force)?;
    let adapter = src.join("adapter_config.json").is_file();
    let files: Vec<TensorFile> = if adapter {
        let w = ["adapter_model.safetensors", "adapter_model.bin"]
            .iter()
            .map(|n| src.join(n))
            .find(|p| p.is_file())
            .ok_or_else(|| TernError::MissingFile {
                path: src.join("adapter_model.bin"),
                hint: "an adapter directory needs adapter_model.safetensors or adapter_model.bin"
                    .into(),
            })?;
        vec![TensorFile::open(&w)?]
    } else {
        HfDir::open(src)?
            .weight_files
            .iter()
            .map(|p| TensorFile::open(p))
            .collect::<Result<_>>()?
    };
    let specs = if adapter {
        let specs = specs_of(&files[0]);
        write_streaming(
            &staged.path().join("adapter_model.safetensors"),
            &specs,
            |i| Ok(files[0].bytes(&specs[i].name)?.1.to_vec()),
        )?;
        specs
    } else {
        // One output shard per input file: the original sharding is kept.
        let mut specs = Vec::new();
        let mut groups = Vec::new();
        let mut owner = Vec::new();
        for (fi, f) in files.iter().enumerate() {
            let s = specs_of(f);
            groups.push((specs.len()..specs.len() + s.len()).collect::<Vec<_>>());
            owner.extend(std::iter::repeat_n(fi, s.len()));
            specs.extend(s);
        }
        write_shards(staged.path(), &specs, &groups, |i| {
            Ok(files[owner[i]].bytes(&specs[i].name)?.1.to_vec())
        })?;
        specs
    };
    copy_side_files(src, staged.path(), None)?;
    staged.commit()?;
    Ok(ConvertReport {
        out: out.to_path_buf(),
        kind: if adapter { "adapter" } else { "model" },
        tensors: specs.len(),
        bytes: specs.iter().map(|s| s.nbytes() as u64).sum(),
        files: if adapter { 1 } else { files.len() },
    })
}
