//! `tern quantize`: a Hugging Face checkpoint written as one GGUF file that tern and
//! llama.cpp both load, with the architecture metadata, tokenizer and chat template inside
//! (a GGUF input goes to `gguf_requantize.rs`).
//!
//! What llama.cpp's own converter does and we follow: q/k rows permuted for the `llama`
//! architecture (its rope rotates adjacent pairs), Llama 3 rope scaling stored as a
//! `rope_freqs` tensor, vocabularies padded to the embedding's rows with `[PAD{i}]` tokens,
//! Mistral written as `llama`. Tensors are read, quantized and written one at a time, so the
//! memory used is about one float tensor whatever the model's size.

use super::config::{id_list, Family, ModelConfig, RopeScaling};
use crate::checkpoint::gguf::gguf_name;
use crate::checkpoint::gguf_write::{write_gguf, TensorPlan};
use crate::checkpoint::tensor_file::TensorFile;
use crate::checkpoint::writer::refuse_replacing_inputs;
use crate::checkpoint::Checkpoint;
use crate::error::{Result, TernError};
use crate::quant::scheme::{plan, quantize_tensor, QuantType};
use crate::tokenizer::{gguf::pre_tokenizer_name, ChatTemplate, Tokenizer};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The storage a GGUF export asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportType {
    /// Every tensor in f32 (lossless).
    F32,
    /// Matrices in f16, vectors in f32.
    F16,
    /// Projections quantized (see [`crate::quant::scheme`]), the embedding Q8_0 (as llama.cpp
    /// stores it), other matrices f16, vectors f32.
    Quant(QuantType),
}

impl std::str::FromStr for ExportType {
    type Err = TernError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(ExportType::F32),
            "f16" => Ok(ExportType::F16),
            _ => s.parse::<QuantType>().map(ExportType::Quant).map_err(|_| {
                TernError::InvalidArgument(format!(
                    "unknown GGUF type `{s}`; choose one of f32, {}",
                    QuantType::ALL.map(|t| t.name()).join(", ")
                ))
            }),
        }
    }
}

impl std::fmt::Display for ExportType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExportType::F32 => f.write_str("f32"),
            ExportType::F16 => f.write_str("f16"),
            ExportType::Quant(q) => write!(f, "{q}"),
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportReport {
    /// The GGUF file.
    pub out: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Tensors per storage type (`Q8_0: 210`).
    pub types: BTreeMap<String, usize>,
    /// Bytes of the source weights.
    pub bytes_in: u64,
    /// Size of the file.
    pub bytes_out: u64,
    /// Wall time.
    #[serde(skip)]
    pub elapsed: Duration,
}

/// One tensor to write: where it comes from and what happens to it on the way.
struct Source {
    file: usize,
    hf: String,
    /// Rows to permute the way llama.cpp does, in this many heads.
    permute_heads: Option<usize>,
}

/// How an export writes.
#[derive(Debug, Clone, Copy)]
pub struct ExportOptions {
    /// Storage of the tensors.
    pub ty: ExportType,
    /// Replace an existing output file.
    pub force: bool,
    /// Accept a GGUF whose matrices are already quantized (their blocks are dequantized and
    /// quantized again, which loses more than quantizing float weights once).
    pub allow_requantize: bool,
}

impl ExportOptions {
    /// Options for `ty`, refusing to replace files or to requantize.
    pub fn new(ty: ExportType) -> Self {
        Self {
            ty,
            force: false,
            allow_requantize: false,
        }
    }
}

/// Writes the checkpoint at `src` (a Hugging Face directory, or a GGUF file to requantize) as
/// a GGUF file at `out`.
pub fn export_gguf(src: &Path, out: &Path, o: &ExportOptions) -> Result<ExportReport> {
    let start = Instant::now();
    if out.is_dir() {
        return Err(TernError::InvalidArgument(format!(
            "--out {} is a directory; name the .gguf file to write",
            out.display()
        )));
    }
    // The files a checkpoint directory is read from (a GGUF written beside them is not one).
    let mut inputs = vec![src.to_path_buf()];
    if src.is_dir() {
        for e in std::fs::read_dir(src).map_err(|e| TernError::io(src, e))? {
            let p = e.map_err(|e| TernError::io(src, e))?.path();
            if p.extension().is_none_or(|x| x != "gguf") {
                inputs.push(p);
            }
        }
    }
    refuse_replacing_inputs(out, &inputs.iter().map(|p| p.as_path()).collect::<Vec<_>>())?;
    if out.exists() && !o.force {
        return Err(TernError::InvalidArgument(format!(
            "{} already exists; pass --force to replace it, or choose another --out",
            out.display()
        )));
    }
    let mut report = match Checkpoint::open(src)? {
        Checkpoint::Hf(d) => from_hf(&d, out, o.ty)?,
        Checkpoint::Gguf(g) => super::gguf_requantize::requantize(&g, out, o)?,
    };
    report.elapsed = start.elapsed();
    Ok(report)
}

/// The storage a tensor of this Hugging Face name and shape gets under `ty`, in a model of
/// `layers` layers.
pub(crate) fn target_type(ty: ExportType, name: &str, dims: &[usize], layers: usize) -> GgmlDType {
    match (ty, dims.len()) {
        (_, 1) | (ExportType::F32, _) => GgmlDType::F32,
        (ExportType::F16, _) => GgmlDType::F16,
        // Every matrix in the half-width type, the embedding too.
        (ExportType::Quant(q), _) if q.is_half_float() => q.ggml(),
        // The embedding as llama.cpp stores it: Q8_0, which tern also multiplies by exactly
        // when it serves as the tied output head.
        (ExportType::Quant(_), _)
            if name == "model.embed_tokens.weight" && dims[1].is_multiple_of(32) =>
        {
            GgmlDType::Q8_0
        }
        (ExportType::Quant(q), _) => plan(q, name, dims, layers).unwrap_or(GgmlDType::F16),
    }
}

impl ExportReport {
    /// The report of a file written from `plans` (the caller sets `elapsed`).
    pub(crate) fn new(out: &Path, plans: &[TensorPlan], bytes_in: u64, bytes_out: u64) -> Self {
        let mut types = BTreeMap::new();
        for p in plans {
            *types.entry(format!("{:?}", p.dtype)).or_insert(0) += 1;
        }
        Self {
            out: out.to_path_buf(),
            tensors: plans.len(),
            types,
            bytes_in,
            bytes_out,
            elapsed: Duration::ZERO,
        }
    }
}

fn from_hf(d: &crate::checkpoint::HfDir, out: &Path, ty: ExportType) -> Result<ExportReport> {
    let cfg = ModelConfig::from_hf_file(&d.config)?;
    let arch = match cfg.family {
        Family::Llama | Family::Mistral => "llama",
        Family::Qwen2 => "qwen2",
        Family::Qwen3 => "qwen3",
    };
    let files: Vec<TensorFile> = d
        .weight_files
        .iter()
        .map(|f| TensorFile::open(f))
        .collect::<Result<_>>()?;
    let mut sources = Vec::new();
    let mut plans = Vec::new();
    let mut bytes_in = 0u64;
    for (i, f) in files.iter().enumerate() {
        for (name, e) in f.entries() {
            let Some(g) = gguf_name(name) else {
                tracing::debug!("not written to GGUF: {name}");
                continue;
            };
            bytes_in += (e.end - e.start) as u64;
            let dims = e.shape.clone();
            let dtype = target_type(ty, name, &dims, cfg.num_layers);
            let permute_heads = match () {
                _ if arch != "llama" || dims.len() != 2 => None,
                _ if g.ends_with("attn_q.weight") => Some(cfg.num_heads),
                _ if g.ends_with("attn_k.weight") => Some(cfg.num_kv_heads),
                _ => None,
            };
            sources.push(Source {
                file: i,
                hf: name.clone(),
                permute_heads,
            });
            plans.push(TensorPlan {
                name: g,
                dims,
                dtype,
            });
        }
    }
    let rope_freqs = llama3_rope_divisors(&cfg);
    if let Some(r) = &rope_freqs {
        plans.push(TensorPlan {
            name: "rope_freqs.weight".into(),
            dims: vec![r.len()],
            dtype: GgmlDType::F32,
        });
    }
    // llama.cpp's order: embedding, blocks by number, then the final norm and head.
    let mut order: Vec<usize> = (0..plans.len()).collect();
    order.sort_by_key(|&i| tensor_order_key(&plans[i].name));
    let plans: Vec<TensorPlan> = order.iter().map(|&i| plans[i].clone()).collect();
    let meta = metadata(d, &cfg, arch, ty)?;
    let device = Device::Cpu;
    let bytes_out = write_gguf(out, &meta, &plans, |k| {
        let i = order[k];
        let p = &plans[k];
        if i >= sources.len() {
            let r = rope_freqs.as_ref().expect("only rope_freqs has no source");
            return Ok(r.iter().flat_map(|x| x.to_le_bytes()).collect());
        }
        let s = &sources[i];
        let mut t = files[s.file].tensor(&s.hf, DType::F32, &device)?;
        files[s.file].release(&s.hf);
        if let Some(h) = s.permute_heads {
            t = permute_rows(&t, h).map_err(|detail| {
                TernError::InvalidArgument(format!("tensor `{}`: {detail}", s.hf))
            })?;
        }
        let q = quantize_tensor(&s.hf, &t, p.dtype)?;
        Ok(q.data()?.into_owned())
    })?;
    Ok(ExportReport::new(out, &plans, bytes_in, bytes_out))
}

/// Sorts `token_embd`, then `blk.N.*` by N, then everything else.
pub(crate) fn tensor_order_key(name: &str) -> (usize, usize, String) {
    if name.starts_with("token_embd") {
        return (0, 0, name.into());
    }
    if let Some(rest) = name.strip_prefix("blk.") {
        let n = rest.split('.').next().and_then(|n| n.parse().ok());
        if let Some(n) = n {
            return (1, n, name.into());
        }
    }
    (2, 0, name.into())
}

/// llama.cpp's q/k permutation: within each head, HF row `s * half + j` goes to row `2j + s`.
fn permute_rows(t: &Tensor, heads: usize) -> std::result::Result<Tensor, String> {
    let (rows, cols) = t.dims2().map_err(|e| e.to_string())?;
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(format!(
            "{rows} rows cannot be split into {heads} heads of even size"
        ));
    }
    let hd = rows / heads;
    let go = || -> candle_core::Result<Tensor> {
        t.reshape((heads, 2, hd / 2, cols))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((rows, cols))
    };
    go().map_err(|e| e.to_string())
}

/// Llama 3 rope scaling as the per-frequency divisors llama.cpp reads from `rope_freqs`.
fn llama3_rope_divisors(cfg: &ModelConfig) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings: old,
    } = cfg.rope_scaling
    else {
        return None;
    };
    let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
    let half = cfg.head_dim / 2;
    Some(
        (0..half)
            .map(|i| {
                let freq = 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let div = if wavelen < high_wavelen {
                    1.0
                } else if wavelen > low_wavelen {
                    factor
                } else {
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    1.0 / ((1.0 - smooth) / factor + smooth)
                };
                div as f32
            })
            .collect(),
    )
}

fn read_json(p: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(p).map_err(|e| TernError::io(p, e))?;
    serde_json::from_str(&text).map_err(|e| TernError::Config {
        file: p.to_path_buf(),
        key: "(file)".into(),
        detail: format!("not valid JSON: {e}"),
    })
}

/// GGUF token types (llama.cpp `llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// Architecture, tokenizer and template metadata.
fn metadata(
    d: &crate::checkpoint::HfDir,
    cfg: &ModelConfig,
    arch: &str,
    ty: ExportType,
) -> Result<Vec<(String, Value)>> {
    let tok_path = d.tokenizer.as_ref().ok_or_else(|| TernError::MissingFile {
        path: d.dir.join("tokenizer.json"),
        hint: "a GGUF file carries its tokenizer; the checkpoint needs tokenizer.json".into(),
    })?;
    let tj = read_json(tok_path)?;
    let model = &tj["model"];
    let bad = |detail: String| TernError::Config {
        file: tok_path.clone(),
        key: "model".into(),
        detail,
    };
    if model["type"].as_str() != Some("BPE") || model["byte_fallback"].as_bool() == Some(true) {
        return Err(bad(format!(
            "only byte-level BPE tokenizers (GPT-2 style, as Llama 3, Qwen and SmolLM use) can be written to GGUF; this one is {}{}",
            model["type"].as_str().unwrap_or("unknown"),
            if model["byte_fallback"].as_bool() == Some(true) { " with byte fallback (SentencePiece style)" } else { "" }
        )));
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| bad("`vocab` is missing or not an object".into()))?;
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; cfg.vocab_size];
    let mut place = |id: u64, text: &str, ty: i32| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            bad(format!(
                "token `{text}` has id {id}, past the model's {} embedding rows",
                cfg.vocab_size
            ))
        })?;
        *slot = Some((text.to_string(), ty));
        Ok(())
    };
    for (text, id) in vocab {
        place(id.as_u64().unwrap_or(u64::MAX), text, NORMAL)?;
    }
    for a in tj["added_tokens"].as_array().into_iter().flatten() {
        let special = a["special"].as_bool().unwrap_or(false);
        place(
            a["id"].as_u64().unwrap_or(u64::MAX),
            a["content"].as_str().unwrap_or_default(),
            if special { CONTROL } else { USER_DEFINED },
        )?;
    }
    let (tokens, types): (Vec<Value>, Vec<Value>) = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let (text, ty) = t.unwrap_or((format!("[PAD{i}]"), UNUSED));
            (Value::String(text), Value::I32(ty))
        })
        .unzip();
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .map(Value::String)
        .collect();
    let tokenizer = Tokenizer::from_hf_files(tok_path, d.tokenizer_config.as_deref())?;
    let template =
        ChatTemplate::from_hf_files(d.chat_template.as_deref(), d.tokenizer_config.as_deref())?;
    let mut eos = match &d.generation_config {
        Some(p) => id_list(read_json(p)?.get("eos_token_id")),
        None => vec![],
    };
    if eos.is_empty() {
        eos = cfg.eos_token_ids.clone();
    }
    if eos.is_empty() {
        eos = tokenizer.eos_ids.clone();
    }
    let bos = cfg.bos_token_id.or_else(|| {
        tokenizer
            .bos_token
            .as_deref()
            .and_then(|t| tokenizer.token_id(t))
    });
    // Whether the tokenizer itself puts BOS in front (llama.cpp asks the file).
    let add_bos = match bos {
        Some(b) => tokenizer.encode("a", true)?.first() == Some(&b),
        None => false,
    };
    let u = |v: usize| Value::U32(v as u32);
    let k = |s: &str| format!("{arch}.{s}");
    let file_type = match ty {
        ExportType::F32 => 0,
        ExportType::F16 => 1,
        ExportType::Quant(q) => q.gguf_file_type(),
    };
    let name = d
        .dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model")
        .to_string();
    let mut m: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(name)),
        ("general.file_type".into(), Value::U32(file_type)),
        ("general.quantization_version".into(), Value::U32(2)),
        (k("vocab_size"), u(cfg.vocab_size)),
        (k("context_length"), u(cfg.max_position_embeddings)),
        (k("embedding_length"), u(cfg.hidden_size)),
        (k("feed_forward_length"), u(cfg.intermediate_size)),
        (k("block_count"), u(cfg.num_layers)),
        (k("attention.head_count"), u(cfg.num_heads)),
        (k("attention.head_count_kv"), u(cfg.num_kv_heads)),
        (k("attention.key_length"), u(cfg.head_dim)),
        (k("attention.value_length"), u(cfg.head_dim)),
        (k("rope.dimension_count"), u(cfg.head_dim)),
        (k("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
    ];
    if let RopeScaling::Linear { factor } = cfg.rope_scaling {
        m.push((k("rope.scaling.type"), Value::String("linear".into())));
        m.push((k("rope.scaling.factor"), Value::F32(factor as f32)));
    }
    m.extend([
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.pre".into(),
            Value::String(pre_tokenizer_name(&tj["pre_tokenizer"]).into()),
        ),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)),
    ]);
    if let Some(b) = bos {
        m.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(&e) = eos.first() {
        m.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    // A second stop id (Llama 3's <|eot_id|>) is what llama.cpp calls end-of-turn.
    if let Some(&e) = eos.get(1..).and_then(|r| r.last()) {
        m.push(("tokenizer.ggml.eot_token_id".into(), Value::U32(e)));
    }
    if let Some(t) = template {
        m.push((
            "tokenizer.chat_template".into(),
            Value::String(t.source().to_string()),
        ));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_types_parse() {
        assert_eq!("F16".parse::<ExportType>().unwrap(), ExportType::F16);
        assert_eq!(
            "q4_k".parse::<ExportType>().unwrap(),
            ExportType::Quant(QuantType::Q4K)
        );
        assert_eq!(
            "bf16".parse::<ExportType>().unwrap(),
            ExportType::Quant(QuantType::Bf16)
        );
        let e = "int3".parse::<ExportType>().unwrap_err().to_string();
        assert!(e.contains("f32, q8_0") && e.ends_with("bf16, f16"), "{e}");
    }

    #[test]
    fn order_puts_blocks_by_number() {
        let mut v = vec!["output.weight", "blk.10.a", "blk.2.a", "token_embd.weight"];
        v.sort_by_key(|n| tensor_order_key(n));
        assert_eq!(
            v,
            ["token_embd.weight", "blk.2.a", "blk.10.a", "output.weight"]
        );
    }
}
