//! A description of a checkpoint read from its headers only (no weights loaded): what
//! `tern inspect` prints.

use super::config::ModelConfig;
use crate::checkpoint::{safetensors::TensorFile, Checkpoint};
use crate::error::Result;
use crate::tokenizer::{gguf::from_gguf, ChatTemplate, Tokenizer};
use std::collections::BTreeMap;
use std::path::Path;

/// What a checkpoint holds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Inspection {
    /// `hf` or `gguf`.
    pub format: String,
    /// Architecture family and key sizes, as text.
    pub architecture: String,
    /// Layers, hidden size, heads, kv heads, head dim, vocab, context.
    pub shape: String,
    /// Total parameters.
    pub parameters: u64,
    /// Tensor count per stored dtype (or GGML block type).
    pub dtypes: BTreeMap<String, usize>,
    /// Weight files (shards).
    pub files: Vec<String>,
    /// Bytes of weight files.
    pub bytes: u64,
    /// Tokenizer summary.
    pub tokenizer: String,
    /// Chat template summary.
    pub chat_template: String,
}

fn template_summary(t: Option<ChatTemplate>) -> String {
    match t {
        Some(t) => format!("yes ({} chars)", t.source().len()),
        None => "none".into(),
    }
}

fn tokenizer_summary(t: Result<Tokenizer>) -> String {
    match t {
        Ok(t) => format!(
            "{} tokens, bos {:?}, eos {:?}",
            t.vocab_size(),
            t.bos_token.as_deref().unwrap_or("-"),
            t.eos_token.as_deref().unwrap_or("-")
        ),
        Err(e) => format!("unavailable: {e}"),
    }
}

/// Inspects a checkpoint directory or GGUF file without loading its weights.
pub fn inspect(path: &Path) -> Result<Inspection> {
    let ck = Checkpoint::open(path)?;
    let mut dtypes = BTreeMap::new();
    let mut parameters = 0u64;
    let mut bytes = 0u64;
    let (format, cfg, files, tokenizer, chat_template) = match &ck {
        Checkpoint::Hf(d) => {
            let cfg = ModelConfig::from_hf_file(&d.config)?;
            for f in &d.weight_files {
                let st = TensorFile::open(f)?;
                bytes += st.len_bytes() as u64;
                for e in st.entries().values() {
                    *dtypes
                        .entry(format!("{:?}", e.dtype).to_lowercase())
                        .or_insert(0) += 1;
                    parameters += e.shape.iter().product::<usize>() as u64;
                }
            }
            let tok = match &d.tokenizer {
                Some(p) => Tokenizer::from_hf_files(p, d.tokenizer_config.as_deref()),
                None => Err(crate::TernError::InvalidArgument(
                    "no tokenizer.json".into(),
                )),
            };
            let tmpl = ChatTemplate::from_hf_files(
                d.chat_template.as_deref(),
                d.tokenizer_config.as_deref(),
            )
            .ok()
            .flatten();
            let files = d
                .weight_files
                .iter()
                .map(|f| f.display().to_string())
                .collect();
            ("hf", cfg, files, tok, tmpl)
        }
        Checkpoint::Gguf(g) => {
            let cfg = ModelConfig::from_gguf(g)?;
            for (_, dt, shape) in g.tensor_infos() {
                *dtypes.entry(format!("{dt:?}")).or_insert(0) += 1;
                parameters += shape.iter().product::<usize>() as u64;
            }
            bytes = std::fs::metadata(g.path()).map(|m| m.len()).unwrap_or(0);
            let tmpl = g
                .metadata()
                .get("tokenizer.chat_template")
                .and_then(|v| v.to_string().ok())
                .and_then(|s| ChatTemplate::new(s).ok());
            (
                "gguf",
                cfg,
                vec![g.path().display().to_string()],
                from_gguf(g),
                tmpl,
            )
        }
    };
    Ok(Inspection {
        format: format.into(),
        architecture: format!(
            "{:?}{}{}{}",
            cfg.family,
            if cfg.tie_word_embeddings { ", tied embeddings" } else { "" },
            if cfg.qkv_bias { ", qkv bias" } else { "" },
            if cfg.qk_norm { ", q/k norm" } else { "" }
        ),
        shape: format!(
            "{} layers, hidden {}, mlp {}, heads {}/{} kv, head_dim {}, vocab {}, context {}, rope theta {} ({:?})",
            cfg.num_layers,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.vocab_size,
            cfg.max_position_embeddings,
            cfg.rope_theta,
            cfg.rope_scaling
        ),
        parameters,
        dtypes,
        files,
        bytes,
        tokenizer: tokenizer_summary(tokenizer),
        chat_template: template_summary(chat_template),
    })
}
