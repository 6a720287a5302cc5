//! The Hugging Face checkpoint directory layout: which files exist and which hold weights.

use crate::error::{Result, TernError};
use std::path::{Path, PathBuf};

/// The files of a Hugging Face model directory.
#[derive(Debug, Clone)]
pub struct HfDir {
    /// The directory.
    pub dir: PathBuf,
    /// `config.json`.
    pub config: PathBuf,
    /// `generation_config.json`, when present.
    pub generation_config: Option<PathBuf>,
    /// `tokenizer.json`, when present.
    pub tokenizer: Option<PathBuf>,
    /// `tokenizer_config.json`, when present.
    pub tokenizer_config: Option<PathBuf>,
    /// `chat_template.jinja`, when present (newer checkpoints keep the template there).
    pub chat_template: Option<PathBuf>,
    /// The files holding the weights (one, or the shards of the index): safetensors, or
    /// legacy PyTorch pickles when the directory has no safetensors.
    pub weight_files: Vec<PathBuf>,
    /// The shard index (`model.safetensors.index.json`, or `pytorch_model.bin.index.json`
    /// for legacy checkpoints) when the weights are sharded.
    pub index: Option<PathBuf>,
}

fn existing(p: PathBuf) -> Option<PathBuf> {
    p.is_file().then_some(p)
}

impl HfDir {
    /// Finds the files of the checkpoint in `dir`; errors name what is missing.
    pub fn open(dir: &Path) -> Result<Self> {
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(TernError::MissingFile {
                path: config,
                hint: "a Hugging Face checkpoint directory needs config.json; pass the model directory or a .gguf file".into(),
            });
        }
        let index_path = dir.join("model.safetensors.index.json");
        let bin_index = dir.join("pytorch_model.bin.index.json");
        // Safetensors always win; legacy pickles only when there is nothing else.
        let (weight_files, index) = if index_path.is_file() {
            (shards_from_index(&index_path)?, Some(index_path))
        } else if dir.join("model.safetensors").is_file() {
            (vec![dir.join("model.safetensors")], None)
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| TernError::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            found.sort();
            if !found.is_empty() {
                (found, None)
            } else if bin_index.is_file() {
                (shards_from_index(&bin_index)?, Some(bin_index))
            } else if dir.join("pytorch_model.bin").is_file() {
                (vec![dir.join("pytorch_model.bin")], None)
            } else {
                return Err(TernError::MissingFile {
                    path: dir.join("model.safetensors"),
                    hint: "no model.safetensors, model.safetensors.index.json, *.safetensors or pytorch_model.bin in the directory".into(),
                });
            }
        };
        Ok(Self {
            config,
            generation_config: existing(dir.join("generation_config.json")),
            tokenizer: existing(dir.join("tokenizer.json")),
            tokenizer_config: existing(dir.join("tokenizer_config.json")),
            chat_template: existing(dir.join("chat_template.jinja")),
            weight_files,
            index,
            dir: dir.to_path_buf(),
        })
    }
}

/// Reads the shard list from a shard index and checks every shard exists.
fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| TernError::io(index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| TernError::Config {
        file: index.to_path_buf(),
        key: "(file)".into(),
        detail: format!("not valid JSON: {e}"),
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| TernError::Config {
            file: index.to_path_buf(),
            key: "weight_map".into(),
            detail: "missing or not an object of tensor name -> shard file".into(),
        })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for (tensor, shard) in map {
        let shard = shard.as_str().ok_or_else(|| TernError::Config {
            file: index.to_path_buf(),
            key: format!("weight_map.{tensor}"),
            detail: "shard file name must be a string".into(),
        })?;
        if shard.contains("..") || Path::new(shard).is_absolute() {
            return Err(TernError::Config {
                file: index.to_path_buf(),
                key: format!("weight_map.{tensor}"),
                detail: format!("shard path `{shard}` leaves the checkpoint directory"),
            });
        }
        let p = dir.join(shard);
        if !files.contains(&p) {
            if !p.is_file() {
                return Err(TernError::MissingFile {
                    path: p,
                    hint: format!("shard named in {} for tensor `{tensor}`", index.display()),
                });
            }
            files.push(p);
        }
    }
    files.sort();
    Ok(files)
}
