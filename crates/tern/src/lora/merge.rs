//! `tern merge`: an adapter folded into its base checkpoint, written as a Hugging Face
//! directory any loader reads.
//!
//! Tensors stream from the mapped base files to the output one at a time (a merge never
//! holds a second copy of the model), `W + scale * B A` computed in f32 and rounded once to
//! the output dtype. Everything is written into a temp directory beside the destination and
//! renamed into place at the end, so an interrupted merge leaves nothing at the destination.

use super::adapter::{LoraAdapter, SlotTable};
use crate::checkpoint::safetensors::TensorFile;
use crate::checkpoint::writer::{
    copy_side_files, tensor_bytes, write_shards, StagedDir, TensorSpec,
};
use crate::checkpoint::HfDir;
use crate::error::{Result, TernError};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How to merge.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Output dtype of float tensors; `None` keeps each tensor's stored dtype.
    pub dtype: Option<DType>,
    /// Largest shard in bytes (a single larger tensor gets a shard of its own).
    pub shard_size: u64,
    /// Replace an existing destination.
    pub force: bool,
}

impl Default for MergeOptions {
    fn default() -> Self {
        Self {
            dtype: None,
            shard_size: 2_000_000_000,
            force: false,
        }
    }
}

/// What a merge did.
#[derive(Debug, Clone)]
pub struct MergeReport {
    /// The written directory.
    pub out: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Of which had the adapter folded in.
    pub merged: usize,
    /// Safetensors files written.
    pub shards: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Parses a size such as `2GB`, `500MB`, `200KB`, `1.5GiB` or a byte count.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.trim().parse().map_err(|_| {
        TernError::InvalidArgument(format!(
            "size `{s}`: expected a number with an optional unit (e.g. 2GB, 500MB, 5GiB)"
        ))
    })?;
    let mult: f64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => {
            return Err(TernError::InvalidArgument(format!(
                "size `{s}`: unknown unit `{unit}` (use B, KB, MB, GB, KiB, MiB or GiB)"
            )))
        }
    };
    if n <= 0.0 || !n.is_finite() {
        return Err(TernError::InvalidArgument(format!(
            "size `{s}` must be positive"
        )));
    }
    Ok((n * mult) as u64)
}

/// The linear layers of a checkpoint, from its tensor headers alone.
pub fn slots_from_headers<'a>(
    entries: impl Iterator<Item = (&'a String, &'a [usize])>,
) -> SlotTable {
    let mut named: Vec<(&String, &[usize])> = entries
        .filter(|(n, s)| n.ends_with(".weight") && s.len() == 2 && !n.contains("embed_tokens"))
        .collect();
    named.sort();
    let mut slots = SlotTable::default();
    for (n, s) in named {
        let module = n.trim_end_matches(".weight");
        slots.push(module, s[0], s[1], module == "lm_head");
    }
    slots
}

/// Refuses an adapter holding NaN or infinite values, naming the first module: folded in,
/// they would spread through every output of its layer, and the written checkpoint would
/// look whole until it generated garbage.
fn refuse_non_finite(lora: &LoraAdapter, dir: &Path) -> Result<()> {
    for (module, p) in lora.modules() {
        for (half, t) in [("lora_A", &p.a), ("lora_B", &p.bt)] {
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            if let Some(x) = v.iter().find(|x| !x.is_finite()) {
                return Err(TernError::InvalidArgument(format!(
                    "{}: `{module}.{half}` holds {x}: the adapter is corrupt or its training \
                     diverged; merge a good checkpoint of it instead",
                    dir.display()
                )));
            }
        }
    }
    Ok(())
}

/// Folds the adapter at `adapter` into the Hugging Face checkpoint at `model` and writes the
/// result to `out`.
pub fn merge_checkpoint(
    model: &Path,
    adapter: &Path,
    out: &Path,
    opts: &MergeOptions,
) -> Result<MergeReport> {
    let t0 = Instant::now();
    if !model.is_dir() {
        return Err(TernError::InvalidArgument(format!(
            "{}: merge needs a Hugging Face model directory (safetensors) as its base; GGUF bases are not supported",
            model.display()
        )));
    }
    // Before any work: a clobbered or impossible destination fails at once.
    let staged = StagedDir::new(out, &[model, adapter], opts.force)?;
    let base = HfDir::open(model)?;
    let files = base
        .weight_files
        .iter()
        .map(|p| TensorFile::open(p))
        .collect::<Result<Vec<_>>>()?;
    let mut tensors: Vec<(String, usize)> = files
        .iter()
        .enumerate()
        .flat_map(|(i, f)| f.entries().keys().map(move |k| (k.clone(), i)))
        .collect();
    tensors.sort();
    let slots = slots_from_headers(
        files
            .iter()
            .flat_map(|f| f.entries().iter().map(|(k, e)| (k, e.shape.as_slice()))),
    );
    let lora = LoraAdapter::load(adapter, "merge", &slots, DType::F32, &Device::Cpu)?;
    refuse_non_finite(&lora, adapter)?;

    // Plan: specs in name order, split into shards.
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(n, fi)| {
            let e = &files[*fi].entries()[n];
            let float = matches!(e.dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64);
            TensorSpec {
                name: n.clone(),
                dtype: opts.dtype.filter(|_| float).unwrap_or(e.dtype),
                shape: e.shape.clone(),
            }
        })
        .collect();
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut size = 0u64;
    for (i, s) in specs.iter().enumerate() {
        let n = s.nbytes() as u64;
        if size > 0 && size + n > opts.shard_size {
            shards.push(vec![]);
            size = 0;
        }
        shards.last_mut().expect("one shard at least").push(i);
        size += n;
    }
    let total: u64 = specs.iter().map(|s| s.nbytes() as u64).sum();

    let mut merged = 0;
    write_shards(staged.path(), &specs, &shards, |i| {
        let spec = &specs[i];
        let (name, fi) = &tensors[i];
        let file = &files[*fi];
        let module = name.strip_suffix(".weight").unwrap_or(name);
        match slots.get(module).and_then(|s| lora.pair(s)) {
            Some(p) => {
                merged += 1;
                let w = file.tensor(name, DType::F32, &Device::Cpu)?;
                let w: Tensor = (w + p.delta_weight()?)?;
                tensor_bytes(&w.to_dtype(spec.dtype)?)
            }
            None if file.entries()[name].dtype == spec.dtype => Ok(file.bytes(name)?.1.to_vec()),
            None => tensor_bytes(&file.tensor(name, spec.dtype, &Device::Cpu)?),
        }
    })?;
    copy_side_files(&base.dir, staged.path(), opts.dtype)?;
    staged.commit()?;
    Ok(MergeReport {
        out: out.to_path_buf(),
        tensors: specs.len(),
        merged,
        shards: shards.len(),
        bytes: total,
        elapsed: t0.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("200KB").unwrap(), 200_000);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("2XB")
            .unwrap_err()
            .to_string()
            .contains("unknown unit"));
        assert!(parse_size("-1GB").is_err());
    }
}
