//! A memory-mapped weights file and its tensors by name, whatever the container: tensors are
//! built straight from the mapped bytes (one copy, then a cast only if the dtype differs).

use super::safetensors::parse_header;
use super::torch_zip;
use crate::error::{Result, TernError};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where one tensor lives inside a weights file.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// Stored dtype.
    pub dtype: DType,
    /// Shape, row-major.
    pub shape: Vec<usize>,
    /// Byte range inside the data section.
    pub start: usize,
    /// End of the byte range (exclusive).
    pub end: usize,
}

/// One memory-mapped weights file (safetensors, or a legacy PyTorch zip) with its validated
/// index of tensors.
#[derive(Debug)]
pub struct TensorFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    entries: HashMap<String, TensorEntry>,
}

impl TensorFile {
    /// Maps the file and validates its index and every tensor's offsets: a safetensors
    /// header, or (for a zip) a legacy PyTorch pickle read without executing it.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                TernError::MissingFile {
                    path: path.to_path_buf(),
                    hint: "weights file named by the checkpoint".into(),
                }
            } else {
                TernError::io(path, e)
            }
        })?;
        // SAFETY: the map is read-only; tern never writes checkpoint files in place (writers
        // rename a fresh temp file over), so the bytes cannot change under us from our side.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| TernError::io(path, e))?;
        let (data_start, entries) = if mmap.starts_with(b"PK\x03\x04") {
            (0, torch_zip::index(path, &mmap)?)
        } else {
            parse_header(path, &mmap)?
        };
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start,
            entries,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All tensor entries by name.
    pub fn entries(&self) -> &HashMap<String, TensorEntry> {
        &self.entries
    }

    /// Size of the file in bytes.
    pub fn len_bytes(&self) -> usize {
        self.mmap.len()
    }

    /// The raw bytes of one tensor.
    pub fn bytes(&self, name: &str) -> Result<(&TensorEntry, &[u8])> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| TernError::MissingTensor {
                file: self.path.clone(),
                tensor: name.to_string(),
            })?;
        Ok((
            e,
            &self.mmap[self.data_start + e.start..self.data_start + e.end],
        ))
    }

    /// Drops tensor `name`'s mapped pages from the resident set once a caller holds its own
    /// copy (see [`release_pages`]).
    pub fn release(&self, name: &str) {
        if let Some(e) = self.entries.get(name) {
            release_pages(
                &self.mmap,
                self.data_start + e.start..self.data_start + e.end,
            );
        }
    }

    /// Builds a tensor on `device` in `dtype` from the mapped bytes (one copy, then a cast
    /// only if the stored dtype differs).
    pub fn tensor(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let (e, bytes) = self.bytes(name)?;
        let t = Tensor::from_raw_buffer(bytes, e.dtype, &e.shape, &Device::Cpu)?;
        let t = if e.dtype == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        };
        Ok(if device.is_cpu() {
            t
        } else {
            t.to_device(device)?
        })
    }
}

/// Drops the pages of `map` that lie wholly inside `range` from this process's resident set.
/// Every byte read through a map stays counted in RSS until the file is unmapped, so without
/// this a quantized load would peak at the float file's size (and any load at twice the
/// model's). A later read faults the pages back in from the page cache.
pub(crate) fn release_pages(map: &Mmap, range: std::ops::Range<usize>) {
    #[cfg(unix)]
    {
        const PAGE: usize = 4096;
        let start = range.start.next_multiple_of(PAGE);
        let end = range.end.min(map.len()) / PAGE * PAGE;
        if end > start {
            // SAFETY: the map is a read-only view of a file nobody writes while we run, so
            // dropping its pages loses nothing (they are re-read on access); callers hold no
            // slice into the range any more.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
    #[cfg(not(unix))]
    let _ = (map, range);
}
