//! `ModelConfig`: the switches that describe every supported decoder, read from a Hugging Face
//! `config.json` (4.x style `rope_theta`/`rope_scaling`/`torch_dtype` or 5.x style
//! `rope_parameters`/`dtype`) or from GGUF metadata.

use crate::checkpoint::GgufFile;
use crate::error::{Result, TernError};
use serde_json::Value as Json;
use std::path::Path;

/// The architectures one decoder covers.
pub const SUPPORTED: &str = "llama, mistral, qwen2, qwen3 (and GGUF llama/mistral/qwen2/qwen3)";

/// Which family a checkpoint belongs to; only names, the behaviour lives in the switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama 2/3, SmolLM, and anything `LlamaForCausalLM`.
    Llama,
    /// Mistral (Llama with a sliding window).
    Mistral,
    /// Qwen2 / Qwen2.5 (qkv bias).
    Qwen2,
    /// Qwen3 (q/k RMS norms, explicit head_dim).
    Qwen3,
}

/// How rotary frequencies are scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain rope.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// Scale factor.
        factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        /// Scale factor.
        factor: f64,
        /// Low frequency factor.
        low_freq_factor: f64,
        /// High frequency factor.
        high_freq_factor: f64,
        /// Context length the model was trained at.
        original_max_position_embeddings: f64,
    },
    /// Per-frequency divisors stored in a GGUF `rope_freqs.weight` tensor.
    FreqFactors,
}

/// Everything the decoder needs to know about a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The family (for reporting).
    pub family: Family,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than `num_heads`, MQA when 1).
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rope base.
    pub rope_theta: f64,
    /// Rope scaling.
    pub rope_scaling: RopeScaling,
    /// Longest context the model supports.
    pub max_position_embeddings: usize,
    /// The output projection shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias.
    pub qkv_bias: bool,
    /// The output projection carries a bias.
    pub o_bias: bool,
    /// MLP projections carry a bias.
    pub mlp_bias: bool,
    /// Per-head RMS norms on q and k before rope (Qwen3).
    pub qk_norm: bool,
    /// Sliding attention window, if any (Mistral).
    pub sliding_window: Option<usize>,
    /// BOS token id from the config, if any.
    pub bos_token_id: Option<u32>,
    /// EOS ids from the config (may be several).
    pub eos_token_ids: Vec<u32>,
    /// Dtype the checkpoint was saved in, as the config names it.
    pub stored_dtype: Option<String>,
}

struct Fields<'a> {
    file: &'a Path,
    v: &'a Json,
}

impl Fields<'_> {
    fn err(&self, key: &str, detail: impl Into<String>) -> TernError {
        TernError::Config {
            file: self.file.to_path_buf(),
            key: key.into(),
            detail: detail.into(),
        }
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.v.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(x) => x
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(key, format!("expected a non-negative integer, got {x}"))),
        }
    }
    fn usize(&self, key: &str) -> Result<usize> {
        match self.opt_usize(key)? {
            Some(0) => Err(self.err(key, "must be greater than 0")),
            Some(n) => Ok(n),
            None => Err(self.err(key, "missing (required for this architecture)")),
        }
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.v.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(x) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a number, got {x}"))),
        }
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.v.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(x) => x
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected true or false, got {x}"))),
        }
    }
}

/// Token ids that may be one integer or a list (as in `eos_token_id`).
pub fn id_list(v: Option<&Json>) -> Vec<u32> {
    match v {
        Some(Json::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Json::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TernError::io(path, e))?;
        let v: Json = serde_json::from_str(&text).map_err(|e| TernError::Config {
            file: path.to_path_buf(),
            key: "(file)".into(),
            detail: format!("not valid JSON: {e}"),
        })?;
        Self::from_hf_json(path, &v)
    }

    /// Reads a parsed `config.json`; `path` is only used in errors.
    pub fn from_hf_json(path: &Path, v: &Json) -> Result<Self> {
        let f = Fields { file: path, v };
        let model_type = v
            .get("model_type")
            .and_then(|m| m.as_str())
            .ok_or_else(|| f.err("model_type", "missing; cannot tell the architecture"))?;
        let family = match model_type {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            other => {
                return Err(TernError::UnsupportedArchitecture {
                    file: path.to_path_buf(),
                    arch: other.to_string(),
                    supported: SUPPORTED.into(),
                })
            }
        };
        let hidden_size = f.usize("hidden_size")?;
        let num_heads = f.usize("num_attention_heads")?;
        let num_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(f.err(
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
            ));
        }
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_heads == 0 => hidden_size / num_heads,
            None => {
                return Err(f.err(
                    "head_dim",
                    "missing and hidden_size is not a multiple of num_attention_heads",
                ))
            }
        };
        if head_dim % 2 != 0 {
            return Err(f.err("head_dim", format!("{head_dim} must be even for rope")));
        }
        // 5.x keeps rope settings in `rope_parameters`; 4.x has `rope_theta` + `rope_scaling`.
        let rope_params = v.get("rope_parameters").filter(|p| p.is_object());
        let rope_theta = match rope_params.and_then(|p| p.get("rope_theta")) {
            Some(t) => t
                .as_f64()
                .ok_or_else(|| f.err("rope_parameters.rope_theta", "expected a number"))?,
            None => f.opt_f64("rope_theta")?.unwrap_or(10000.0),
        };
        let scaling = rope_params.or(v.get("rope_scaling").filter(|s| s.is_object()));
        let rope_scaling = match scaling {
            Some(s) => parse_rope_scaling(&f, s)?,
            None => RopeScaling::None,
        };
        let sliding_window = match family {
            Family::Mistral => f.opt_usize("sliding_window")?,
            Family::Qwen2 | Family::Qwen3 if f.opt_bool("use_sliding_window")?.unwrap_or(false) => {
                return Err(f.err(
                    "use_sliding_window",
                    "sliding-window Qwen layers are not supported yet (set it to false for full attention)",
                ))
            }
            _ => None,
        };
        let attention_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        let eos = id_list(v.get("eos_token_id"));
        Ok(Self {
            family,
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_layers: f.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias: family == Family::Qwen2 || attention_bias,
            o_bias: family != Family::Qwen2 && attention_bias,
            mlp_bias: f.opt_bool("mlp_bias")?.unwrap_or(false),
            qk_norm: family == Family::Qwen3,
            sliding_window,
            bos_token_id: v
                .get("bos_token_id")
                .and_then(|x| x.as_u64())
                .map(|x| x as u32),
            eos_token_ids: eos,
            stored_dtype: v
                .get("dtype")
                .or(v.get("torch_dtype"))
                .and_then(|d| d.as_str())
                .map(String::from),
        })
    }

    /// Reads the model shape from GGUF metadata (`{arch}.block_count` and friends).
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let arch = g.architecture()?;
        let family = match arch.as_str() {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            other => {
                return Err(TernError::UnsupportedArchitecture {
                    file: g.path().to_path_buf(),
                    arch: other.to_string(),
                    supported: SUPPORTED.into(),
                })
            }
        };
        let md = g.metadata();
        let err = |key: &str, detail: &str| TernError::Config {
            file: g.path().to_path_buf(),
            key: key.into(),
            detail: detail.into(),
        };
        let opt_u = |k: &str| -> Option<usize> {
            md.get(&format!("{arch}.{k}"))
                .and_then(|v| v.to_u64().ok())
                .map(|v| v as usize)
        };
        let req_u = |k: &str| -> Result<usize> {
            match opt_u(k) {
                Some(0) => Err(err(&format!("{arch}.{k}"), "must be greater than 0")),
                Some(v) => Ok(v),
                None => Err(err(&format!("{arch}.{k}"), "missing or not an integer")),
            }
        };
        let opt_f = |k: &str| -> Option<f64> {
            md.get(&format!("{arch}.{k}")).and_then(|v| {
                v.to_f32()
                    .ok()
                    .map(|x| x as f64)
                    .or_else(|| v.to_f64().ok())
            })
        };
        let hidden_size = req_u("embedding_length")?;
        let num_heads = req_u("attention.head_count")?;
        let num_kv_heads = opt_u("attention.head_count_kv").unwrap_or(num_heads);
        if num_heads % num_kv_heads.max(1) != 0 || num_kv_heads == 0 {
            return Err(err(
                &format!("{arch}.attention.head_count_kv"),
                "must divide attention.head_count",
            ));
        }
        let head_dim = opt_u("attention.key_length").unwrap_or(hidden_size / num_heads);
        let names: Vec<&String> = g.tensor_infos().map(|(n, _, _)| n).collect();
        let has = |n: &str| names.iter().any(|x| x.as_str() == n);
        let vocab_size = g
            .tensor_infos()
            .find(|(n, _, _)| n.as_str() == "token_embd.weight")
            .map(|(_, _, s)| s[0])
            .ok_or_else(|| TernError::MissingTensor {
                file: g.path().to_path_buf(),
                tensor: "token_embd.weight".into(),
            })?;
        let rope_scaling = if has("rope_freqs.weight") {
            RopeScaling::FreqFactors
        } else {
            match md
                .get(&format!("{arch}.rope.scaling.type"))
                .and_then(|v| v.to_string().ok())
            {
                Some(t) if t == "linear" => RopeScaling::Linear {
                    factor: opt_f("rope.scaling.factor").unwrap_or(1.0),
                },
                Some(t) if t != "none" => {
                    return Err(err(
                        &format!("{arch}.rope.scaling.type"),
                        &format!(
                            "rope scaling `{t}` is not supported (supported: none, linear, llama3)"
                        ),
                    ))
                }
                _ => RopeScaling::None,
            }
        };
        let token_id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let mut eos = vec![];
        for k in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Some(id) = token_id(k) {
                if !eos.contains(&id) {
                    eos.push(id);
                }
            }
        }
        Ok(Self {
            family,
            vocab_size,
            hidden_size,
            intermediate_size: req_u("feed_forward_length")?,
            num_layers: req_u("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: opt_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: opt_f("rope.freq_base").unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: opt_u("context_length").unwrap_or(4096),
            tie_word_embeddings: !has("output.weight"),
            qkv_bias: has("blk.0.attn_q.bias"),
            o_bias: has("blk.0.attn_output.bias"),
            mlp_bias: has("blk.0.ffn_up.bias"),
            qk_norm: has("blk.0.attn_q_norm.weight"),
            sliding_window: opt_u("attention.sliding_window"),
            bos_token_id: token_id("tokenizer.ggml.bos_token_id"),
            eos_token_ids: eos,
            stored_dtype: None,
        })
    }
}

fn parse_rope_scaling(f: &Fields, s: &Json) -> Result<RopeScaling> {
    let key = if f.v.get("rope_parameters").is_some() {
        "rope_parameters"
    } else {
        "rope_scaling"
    };
    let kind = s
        .get("rope_type")
        .or(s.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |k: &str| -> Result<f64> {
        s.get(k)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| f.err(&format!("{key}.{k}"), "missing or not a number"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(f.err(
            &format!("{key}.rope_type"),
            format!("rope type `{other}` is not supported (supported: default, linear, llama3)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Json {
        json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
               "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 320})
    }

    #[test]
    fn reads_both_config_styles() {
        let mut v4 = base();
        v4["rope_theta"] = json!(500000.0);
        v4["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32});
        v4["torch_dtype"] = json!("bfloat16");
        let mut v5 = base();
        v5["rope_parameters"] = json!({"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32});
        v5["dtype"] = json!("bfloat16");
        let a = ModelConfig::from_hf_json(Path::new("c.json"), &v4).unwrap();
        let b = ModelConfig::from_hf_json(Path::new("c.json"), &v5).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.rope_theta, 500000.0);
        assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { .. }));
        assert_eq!(a.stored_dtype.as_deref(), Some("bfloat16"));
        assert_eq!((a.num_kv_heads, a.head_dim), (4, 16));
    }

    #[test]
    fn bad_configs_name_the_field() {
        let mut v = base();
        v["model_type"] = json!("gpt_neox");
        assert!(matches!(
            ModelConfig::from_hf_json(Path::new("c.json"), &v),
            Err(TernError::UnsupportedArchitecture { .. })
        ));
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = ModelConfig::from_hf_json(Path::new("c.json"), &v).unwrap_err();
        assert!(e.to_string().contains("`hidden_size`"), "{e}");
        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        assert!(ModelConfig::from_hf_json(Path::new("c.json"), &v).is_err());
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let e = ModelConfig::from_hf_json(Path::new("c.json"), &v).unwrap_err();
        assert!(e.to_string().contains("yarn"), "{e}");
    }

    #[test]
    fn eos_may_be_a_list() {
        assert_eq!(id_list(Some(&json!([0, 2]))), vec![0, 2]);
        assert_eq!(id_list(Some(&json!(7))), vec![7]);
        assert!(id_list(None).is_empty());
    }
}
