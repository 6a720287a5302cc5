//! `tern quantize` from a GGUF file: the file's metadata (tokenizer, template, architecture)
//! carried over unchanged, each tensor converted to the type the export plan gives it.
//!
//! Tensors stay in the file's own row order (llama.cpp's q/k permutation is already applied),
//! so nothing is un-permuted on the way. A tensor already in its target type is copied byte
//! for byte; a quantized one meant for another type is dequantized and quantized again only
//! with `allow_requantize`, as llama.cpp's `--allow-requantize`: the second rounding adds to
//! the first.

use super::gguf_export::{target_type, tensor_order_key, ExportOptions, ExportReport, ExportType};
use crate::checkpoint::gguf::hf_name;
use crate::checkpoint::gguf_write::{write_gguf, TensorPlan};
use crate::checkpoint::GgufFile;
use crate::error::{Result, TernError};
use crate::quant::scheme::quantize_tensor;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use candle_core::Device;
use std::path::Path;

fn is_float(t: GgmlDType) -> bool {
    matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// Writes `g` at `out` with its tensors converted as `o.ty` says.
pub(crate) fn requantize(g: &GgufFile, out: &Path, o: &ExportOptions) -> Result<ExportReport> {
    let arch = g.architecture()?;
    let layers = g
        .metadata()
        .get(&format!("{arch}.block_count"))
        .and_then(|v| v.to_u64().ok())
        .unwrap_or(0) as usize;
    let mut infos: Vec<(String, GgmlDType, Vec<usize>)> = g
        .tensor_infos()
        .map(|(n, t, d)| (n.clone(), t, d.to_vec()))
        .collect();
    infos.sort_by_key(|(n, _, _)| tensor_order_key(n));
    let mut plans = Vec::with_capacity(infos.len());
    let mut requantized = Vec::new();
    for (name, stored, dims) in &infos {
        // Tensors tern does not map (rope_freqs, ...) keep their stored type.
        let dtype = match hf_name(name) {
            Some(hf) if hf != "rope_freqs.weight" => target_type(o.ty, &hf, dims, layers),
            _ => *stored,
        };
        if dtype != *stored && !is_float(*stored) {
            requantized.push(format!("{name} ({stored:?} -> {dtype:?})"));
        }
        plans.push(TensorPlan {
            name: name.clone(),
            dims: dims.clone(),
            dtype,
        });
    }
    if !requantized.is_empty() && !o.allow_requantize {
        return Err(TernError::InvalidArgument(format!(
            "{} holds quantized tensors that --type {} would quantize again ({} of them, e.g. {}); pass --allow-requantize to accept the extra loss, or quantize the float checkpoint",
            g.path().display(),
            o.ty,
            requantized.len(),
            requantized[0]
        )));
    }
    let file_type = match o.ty {
        ExportType::F32 => 0,
        ExportType::F16 => 1,
        ExportType::Quant(q) => q.gguf_file_type(),
    };
    let mut meta: Vec<(String, Value)> = g
        .metadata()
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "general.file_type" | "general.quantization_version" | "general.alignment"
            )
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // A stable key order (the header's map has none), architecture first as llama.cpp writes.
    meta.sort_by(|a, b| {
        (a.0 != "general.architecture", &a.0).cmp(&(b.0 != "general.architecture", &b.0))
    });
    meta.push(("general.file_type".into(), Value::U32(file_type)));
    meta.push(("general.quantization_version".into(), Value::U32(2)));
    let bytes_in: u64 = infos
        .iter()
        .map(|(_, t, d)| (d.iter().product::<usize>() / t.block_size() * t.type_size()) as u64)
        .sum();
    let bytes_out = write_gguf(out, &meta, &plans, |k| {
        let (name, stored, _) = &infos[k];
        let q = g.raw_tensor(name)?;
        if plans[k].dtype == *stored {
            return Ok(q.data()?.into_owned());
        }
        let t = q.dequantize(&Device::Cpu)?;
        let q = quantize_tensor(name, &t, plans[k].dtype)?;
        Ok(q.data()?.into_owned())
    })?;
    Ok(ExportReport::new(out, &plans, bytes_in, bytes_out))
}
