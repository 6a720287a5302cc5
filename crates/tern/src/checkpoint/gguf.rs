//! GGUF files (llama.cpp's format): metadata, tensor table, and weights mapped to the
//! Hugging Face names our decoder uses.
//!
//! llama.cpp's converter permutes the rows of `attn_q`/`attn_k` for the `llama` architecture
//! so its rope can rotate adjacent pairs; our decoder rotates halves like `transformers`, so
//! we undo the permutation on the raw rows (quantized blocks never straddle rows, so this
//! works for every block type without dequantizing).

use super::tensor_file::release_pages;
use super::weights::{LoadReport, Weight, Weights};
use crate::error::{Result, TernError};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{DType, Device};
use memmap2::Mmap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Architectures whose q/k rows llama.cpp permutes on conversion.
const PERMUTED_ARCHS: &[&str] = &["llama", "mistral"];

/// An opened GGUF file: mapped bytes plus the parsed header.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    content: Content,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

impl GgufFile {
    /// Maps and parses the header; the tensor table is checked against the file size.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                TernError::MissingFile {
                    path: path.to_path_buf(),
                    hint: "the GGUF model file".into(),
                }
            } else {
                TernError::io(path, e)
            }
        })?;
        // SAFETY: read-only map of a file tern never modifies in place.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| TernError::io(path, e))?;
        if mmap.len() < 4 || &mmap[..4] != b"GGUF" {
            return Err(TernError::Gguf {
                file: path.to_path_buf(),
                detail: "missing GGUF magic (not a GGUF file)".into(),
            });
        }
        let content = Content::read(&mut std::io::Cursor::new(&mmap[..])).map_err(|e| {
            let detail = crate::error::candle_message(e);
            if detail.contains("failed to fill whole buffer") || detail.contains("remaining") {
                TernError::Truncated {
                    file: path.to_path_buf(),
                    detail: format!("header: {detail}"),
                }
            } else {
                TernError::Gguf {
                    file: path.to_path_buf(),
                    detail,
                }
            }
        })?;
        let g = Self {
            path: path.to_path_buf(),
            mmap,
            content,
        };
        for name in g.content.tensor_infos.keys() {
            g.raw_range(name)?;
        }
        Ok(g)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All metadata key/values.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<String> {
        match self.content.metadata.get("general.architecture") {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(TernError::Config {
                file: self.path.clone(),
                key: "general.architecture".into(),
                detail: "missing or not a string".into(),
            }),
        }
    }

    /// Tensor names with their ggml dtype and shape (row-major, `[out, in]`).
    pub fn tensor_infos(&self) -> impl Iterator<Item = (&String, GgmlDType, &[usize])> {
        self.content
            .tensor_infos
            .iter()
            .map(|(n, t)| (n, t.ggml_dtype, t.shape.dims()))
    }

    /// A tensor as stored, in its own block type and row order (no q/k un-permutation), for
    /// writers that copy or requantize GGUF tensors; its mapped pages are released after.
    pub fn raw_tensor(&self, name: &str) -> Result<QTensor> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| TernError::MissingTensor {
                file: self.path.clone(),
                tensor: name.to_string(),
            })?;
        let range = self.raw_range(name)?;
        let q = qtensor_from_ggml(
            info.ggml_dtype,
            &self.mmap[range.clone()],
            info.shape.dims().to_vec(),
            &Device::Cpu,
        )
        .map_err(|e| TernError::Gguf {
            file: self.path.clone(),
            detail: format!("tensor `{name}`: {e}"),
        })?;
        release_pages(&self.mmap, range);
        Ok(q)
    }

    /// Byte range of a tensor inside the file, checked against the file size.
    fn raw_range(&self, name: &str) -> Result<std::ops::Range<usize>> {
        let info = &self.content.tensor_infos[name];
        let elems = info.shape.elem_count();
        let bs = info.ggml_dtype.block_size();
        if !elems.is_multiple_of(bs) {
            return Err(TernError::Gguf {
                file: self.path.clone(),
                detail: format!(
                    "tensor `{name}`: {elems} elements is not a multiple of the {:?} block size {bs}",
                    info.ggml_dtype
                ),
            });
        }
        let size = elems / bs * info.ggml_dtype.type_size();
        let start = self
            .content
            .tensor_data_offset
            .checked_add(info.offset)
            .ok_or_else(|| TernError::BadOffsets {
                file: self.path.clone(),
                tensor: name.into(),
                detail: "offset overflows".into(),
            })? as usize;
        let end = start.saturating_add(size);
        if end > self.mmap.len() {
            return Err(TernError::Truncated {
                file: self.path.clone(),
                detail: format!(
                    "tensor `{name}` needs bytes {start}..{end}, file has {}",
                    self.mmap.len()
                ),
            });
        }
        Ok(start..end)
    }

    /// Loads every tensor under its Hugging Face name. With `dequantize = Some(dtype)` all
    /// weights become float tensors of that dtype; otherwise quantized matrices stay quantized
    /// and 1-d tensors (norms, biases) become f32.
    pub fn load(
        &self,
        dequantize: Option<DType>,
        device: &Device,
    ) -> Result<(Weights, LoadReport)> {
        let start = Instant::now();
        let arch = self.architecture()?;
        let permute = PERMUTED_ARCHS.contains(&arch.as_str());
        let (n_head, n_kv) = head_counts(self, &arch)?;
        let names: Vec<&String> = self.content.tensor_infos.keys().collect();
        let bytes: u64 = names
            .iter()
            .map(|n| self.raw_range(n).map(|r| r.len() as u64).unwrap_or(0))
            .sum();
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(names.len().max(1))
            .min(8);
        let next = AtomicUsize::new(0);
        let compute = dequantize.unwrap_or(DType::F32);
        let results: Vec<Result<Vec<(String, Weight)>>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let mut out = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(name) = names.get(i) else { break };
                            let Some(hf) = hf_name(name) else { continue };
                            let heads = if !permute {
                                None
                            } else if name.ends_with("attn_q.weight") {
                                Some(n_head)
                            } else if name.ends_with("attn_k.weight") {
                                Some(n_kv)
                            } else {
                                None
                            };
                            let w = self.read_tensor(name, heads, dequantize, compute, device)?;
                            release_pages(&self.mmap, self.raw_range(name)?);
                            out.push((hf, w));
                        }
                        Ok(out)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("gguf loader thread panicked"))
                .collect()
        });
        let mut map = HashMap::new();
        for r in results {
            map.extend(r?);
        }
        let mut kinds: Vec<String> = self
            .content
            .tensor_infos
            .values()
            .map(|t| format!("{:?}", t.ggml_dtype))
            .collect();
        kinds.sort();
        kinds.dedup();
        let report = LoadReport {
            path: self.path.clone(),
            elapsed: start.elapsed(),
            bytes,
            tensors: map.len(),
            path_kind: format!(
                "gguf mmap, {threads} thread(s), {} {}",
                kinds.join(","),
                match dequantize {
                    Some(d) => format!("dequantized->{d:?}").to_lowercase(),
                    None => "kept quantized".into(),
                }
            ),
        };
        Ok((
            Weights::new(self.path.clone(), map, compute, device.clone()),
            report,
        ))
    }

    fn read_tensor(
        &self,
        name: &str,
        unpermute_heads: Option<usize>,
        dequantize: Option<DType>,
        compute: DType,
        device: &Device,
    ) -> Result<Weight> {
        let info = &self.content.tensor_infos[name];
        let raw = &self.mmap[self.raw_range(name)?];
        let dims = info.shape.dims().to_vec();
        let owned;
        let raw = match unpermute_heads {
            Some(h) if dims.len() == 2 => {
                owned = unpermute_rows(raw, dims[0], h).map_err(|detail| TernError::Gguf {
                    file: self.path.clone(),
                    detail: format!("tensor `{name}`: {detail}"),
                })?;
                &owned[..]
            }
            _ => raw,
        };
        let q = qtensor_from_ggml(info.ggml_dtype, raw, dims.clone(), device).map_err(|e| {
            TernError::Gguf {
                file: self.path.clone(),
                detail: format!("tensor `{name}`: {e}"),
            }
        })?;
        // F16 and BF16 matrices, the embedding table included, stay at half width on the CPU
        // (tern's kernel widens them as it multiplies or looks a row up; candle's path would
        // keep an f32 copy).
        let half = matches!(info.ggml_dtype, GgmlDType::F16 | GgmlDType::BF16);
        let keep_half = half && device.is_cpu();
        let float = info.ggml_dtype == GgmlDType::F32 || half && !keep_half;
        if dequantize.is_some() || dims.len() == 1 || float {
            Ok(Weight::Float(q.dequantize(device)?.to_dtype(compute)?))
        } else {
            Ok(Weight::Quant(Arc::new(q)))
        }
    }
}

fn head_counts(g: &GgufFile, arch: &str) -> Result<(usize, usize)> {
    let get = |k: &str| -> Option<usize> {
        g.metadata()
            .get(&format!("{arch}.{k}"))
            .and_then(|v| v.to_u64().ok())
            .map(|v| v as usize)
    };
    let heads = get("attention.head_count").unwrap_or(1);
    Ok((heads, get("attention.head_count_kv").unwrap_or(heads)))
}

/// Undoes llama.cpp's q/k permutation: within each head, GGUF row `2j + s` is HF row
/// `s * half + j`.
fn unpermute_rows(raw: &[u8], rows: usize, heads: usize) -> std::result::Result<Vec<u8>, String> {
    if heads == 0
        || !rows.is_multiple_of(heads)
        || !(rows / heads).is_multiple_of(2)
        || !raw.len().is_multiple_of(rows)
    {
        return Err(format!(
            "{rows} rows cannot be split into {heads} heads of even size"
        ));
    }
    let row_bytes = raw.len() / rows;
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0u8; raw.len()];
    for h in 0..heads {
        for s in 0..2 {
            for j in 0..half {
                let dst = h * hd + s * half + j;
                let src = h * hd + 2 * j + s;
                out[dst * row_bytes..(dst + 1) * row_bytes]
                    .copy_from_slice(&raw[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    Ok(out)
}

/// Maps a GGUF tensor name to its Hugging Face name; `None` for tensors the decoder does not
/// use as weights (e.g. `rope_freqs.weight`, read separately).
pub fn hf_name(gguf: &str) -> Option<String> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        "rope_freqs.weight" => Some("rope_freqs.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = tail.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// The inverse of [`hf_name`], for writers of GGUF files.
pub fn gguf_name(hf: &str) -> Option<String> {
    let top = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (module, kind) = tail.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(heads, 2, hd/2, ...).swapaxes(1, 2) -> row 2j+s holds HF row s*half+j.
        let (heads, hd) = (2usize, 4usize);
        let rows = heads * hd;
        let hf: Vec<u8> = (0..rows as u8).collect();
        let mut gguf = vec![0u8; rows];
        for h in 0..heads {
            for j in 0..hd / 2 {
                for s in 0..2 {
                    gguf[h * hd + 2 * j + s] = hf[h * hd + s * (hd / 2) + j];
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, rows, heads).unwrap(), hf);
        assert!(unpermute_rows(&gguf, rows, 3).is_err());
    }

    #[test]
    fn names_round_trip() {
        for hf in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.3.self_attn.q_proj.bias",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.1.self_attn.k_norm.weight",
        ] {
            assert_eq!(hf_name(&gguf_name(hf).unwrap()).unwrap(), hf);
        }
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
    }
}
