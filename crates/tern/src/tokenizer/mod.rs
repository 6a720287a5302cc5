//! Tokenizers (from `tokenizer.json` or rebuilt from GGUF metadata), chat templates, and
//! incremental UTF-8-correct decoding for streaming.

pub mod chat;
pub mod gguf;
pub mod stream;

pub use chat::{ChatMessage, ChatTemplate};
pub use stream::IncrementalDecoder;

use crate::error::{Result, TernError};
use serde_json::Value as Json;
use std::path::Path;

/// A tokenizer plus the special tokens generation needs to know about.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// BOS token text, if the model has one.
    pub bos_token: Option<String>,
    /// EOS token text, if the model has one.
    pub eos_token: Option<String>,
    /// EOS ids the tokenizer config names (merged with the generation config's by callers).
    pub eos_ids: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab_size())
            .field("bos", &self.bos_token)
            .field("eos", &self.eos_token)
            .finish()
    }
}

/// Reads a special-token entry that may be a plain string or an AddedToken object.
pub(crate) fn token_text(v: Option<&Json>) -> Option<String> {
    match v? {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl Tokenizer {
    /// Wraps a `tokenizers` tokenizer with its special tokens.
    pub fn new(inner: tokenizers::Tokenizer, bos: Option<String>, eos: Option<String>) -> Self {
        let eos_ids = eos.iter().filter_map(|t| inner.token_to_id(t)).collect();
        Self {
            inner,
            bos_token: bos,
            eos_token: eos,
            eos_ids,
        }
    }

    /// Loads `tokenizer.json`, taking special tokens from `tokenizer_config.json` if given.
    pub fn from_hf_files(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| TernError::Tokenizer(format!("{}: {e}", tokenizer_json.display())))?;
        let cfg = match tokenizer_config {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| TernError::io(p, e))?;
                serde_json::from_str::<Json>(&text).map_err(|e| TernError::Config {
                    file: p.to_path_buf(),
                    key: "(file)".into(),
                    detail: format!("not valid JSON: {e}"),
                })?
            }
            None => Json::Null,
        };
        Ok(Self::new(
            inner,
            token_text(cfg.get("bos_token")),
            token_text(cfg.get("eos_token")),
        ))
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Encodes text; `add_special` applies the tokenizer's post-processor (e.g. a BOS).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, add_special)
            .map_err(|e| TernError::Tokenizer(format!("encode: {e}")))?
            .get_ids()
            .to_vec())
    }

    /// Decodes ids to text, dropping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TernError::Tokenizer(format!("decode: {e}")))
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
