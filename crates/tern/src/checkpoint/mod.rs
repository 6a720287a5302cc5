//! Finding and reading weights: Hugging Face directories (single or sharded safetensors) and
//! GGUF files, into [`Weights`] keyed by Hugging Face tensor names.

pub mod convert;
pub mod gguf;
pub mod gguf_write;
pub mod hf_dir;
pub mod hub;
pub mod pending;
pub mod pickle;
pub mod safetensors;
pub mod tensor_file;
pub mod torch_zip;
pub mod weights;
pub mod writer;

pub use gguf::GgufFile;
pub use hf_dir::HfDir;
pub use weights::{LoadReport, Weight, Weights};

use crate::error::{Result, TernError};
use std::path::Path;

/// A checkpoint on disk, in one of the formats tern reads.
#[derive(Debug)]
pub enum Checkpoint {
    /// A Hugging Face model directory.
    Hf(HfDir),
    /// A single GGUF file.
    Gguf(GgufFile),
}

impl Checkpoint {
    /// Opens `path`: a directory is read as a Hugging Face checkpoint, a file as GGUF.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Ok(Checkpoint::Hf(HfDir::open(path)?))
        } else if path.is_file() {
            Ok(Checkpoint::Gguf(GgufFile::open(path)?))
        } else {
            Err(TernError::MissingFile {
                path: path.to_path_buf(),
                hint: "pass a Hugging Face model directory or a .gguf file".into(),
            })
        }
    }
}
