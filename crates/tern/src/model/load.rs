//! Loading a checkpoint into a runnable bundle: model, tokenizer, chat template and the EOS
//! ids generation stops on.

use super::config::{id_list, ModelConfig};
use super::decoder::Model;
use crate::checkpoint::{weights::load_safetensors, Checkpoint, LoadReport};
use crate::device::{default_dtype, DeviceKind};
use crate::error::{Result, TernError};
use crate::lora::{AdapterRegistry, LoraAdapter};
use crate::quant::QuantType;
use crate::tokenizer::{gguf::from_gguf, ChatTemplate, Tokenizer};
use candle_core::DType;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How to load a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Compute dtype; `None` = f32 on CPU, bf16 on GPU; for GGUF, `None` keeps quantized
    /// weights quantized and `Some` dequantizes everything to that dtype.
    pub dtype: Option<DType>,
    /// Where to run.
    pub device: DeviceKind,
    /// For GGUF models with tied embeddings: compute logits through the int8 kernels
    /// (int8-rounded activations, as llama.cpp) instead of exactly from the stored blocks.
    pub quantized_head: bool,
    /// Run prompts through the int8 kernels too, rounding activations to 8 bits as decode
    /// (and llama.cpp) does: about half the prompt time on Q4_1, Q5_0 and Q8_0 weights, with
    /// logits no longer exact to the stored weights. Off: prompts multiply exactly.
    pub int8_prompts: bool,
    /// Storage dtype of LoRA adapters; `None` = the compute dtype, except f16 over a quantized
    /// base on the CPU (decode there is bound by bytes read, and f16 halves the adapter's;
    /// its rounding is far below the base's own).
    pub adapter_dtype: Option<DType>,
    /// Quantize a float checkpoint's projection matrices to this type while loading
    /// (embeddings and norms stay float); refused for GGUF files, which are quantized already.
    pub quantize: Option<QuantType>,
}

/// A model ready to generate with.
#[derive(Debug)]
pub struct LoadedModel {
    /// The network.
    pub model: Model,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template, if the checkpoint has one.
    pub chat_template: Option<ChatTemplate>,
    /// Token ids that end generation.
    pub eos_ids: Vec<u32>,
    /// How loading went.
    pub report: LoadReport,
    /// Where it came from.
    pub source: PathBuf,
    /// `hf` or `gguf`.
    pub format: &'static str,
    /// Storage dtype of adapters loaded for this model.
    pub adapter_dtype: DType,
}

fn read_json(p: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(p).map_err(|e| TernError::io(p, e))?;
    serde_json::from_str(&text).map_err(|e| TernError::Config {
        file: p.to_path_buf(),
        key: "(file)".into(),
        detail: format!("not valid JSON: {e}"),
    })
}

impl LoadedModel {
    /// Reads a PEFT adapter for this model, its weights in the model's dtype and device.
    pub fn load_adapter(&self, path: &Path, name: &str) -> Result<Arc<LoraAdapter>> {
        Ok(Arc::new(LoraAdapter::load(
            path,
            name,
            self.model.slots(),
            self.adapter_dtype,
            self.model.device(),
        )?))
    }

    /// A registry of named adapters for this model; `budget` caps resident adapter bytes.
    pub fn adapter_registry(&self, budget: Option<usize>) -> AdapterRegistry {
        AdapterRegistry::new(
            self.model.slots().clone(),
            self.adapter_dtype,
            self.model.device().clone(),
            budget,
        )
    }

    /// Loads a Hugging Face directory or a GGUF file.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let device = opts.device.resolve()?;
        let ck = Checkpoint::open(path)?;
        let (cfg, weights, report, tokenizer, chat_template, gen_eos, format) = match &ck {
            Checkpoint::Hf(d) => {
                let cfg = ModelConfig::from_hf_file(&d.config)?;
                let tok_path = d.tokenizer.as_ref().ok_or_else(|| TernError::MissingFile {
                    path: d.dir.join("tokenizer.json"),
                    hint: "the checkpoint needs its tokenizer.json to turn text into tokens".into(),
                })?;
                let tokenizer = Tokenizer::from_hf_files(tok_path, d.tokenizer_config.as_deref())?;
                let tmpl = ChatTemplate::from_hf_files(
                    d.chat_template.as_deref(),
                    d.tokenizer_config.as_deref(),
                )?;
                let gen_eos = match &d.generation_config {
                    Some(p) => id_list(read_json(p)?.get("eos_token_id")),
                    None => vec![],
                };
                let dtype = opts.dtype.unwrap_or_else(|| default_dtype(&device));
                let (w, r) =
                    load_safetensors(&d.dir, &d.weight_files, dtype, &device, opts.quantize)?;
                (cfg, w, r, tokenizer, tmpl, gen_eos, "hf")
            }
            Checkpoint::Gguf(g) => {
                if let Some(q) = opts.quantize {
                    return Err(TernError::InvalidArgument(format!(
                        "--quantize {q} applies to float checkpoints; {} is a GGUF file, already stored in its own types (drop --quantize, or pass the Hugging Face directory)",
                        path.display()
                    )));
                }
                let cfg = ModelConfig::from_gguf(g)?;
                let tokenizer = from_gguf(g)?;
                let tmpl = match g.metadata().get("tokenizer.chat_template") {
                    Some(v) => match v.to_string() {
                        Ok(s) => Some(ChatTemplate::new(s)?),
                        Err(_) => None,
                    },
                    None => None,
                };
                let (w, r) = g.load(opts.dtype, &device)?;
                (cfg, w, r, tokenizer, tmpl, vec![], "gguf")
            }
        };
        tracing::debug!("{report}");
        if tokenizer.vocab_size() > cfg.vocab_size {
            tracing::warn!(
                "tokenizer has {} tokens but the model only {} rows; ids past the model's vocabulary cannot be embedded",
                tokenizer.vocab_size(),
                cfg.vocab_size
            );
        }
        let mut model = Model::with_head(&cfg, &weights, opts.quantized_head)?;
        model.set_int8_prompts(opts.int8_prompts);
        // generation_config.json is what transformers stops on; without it, fall back to the
        // model config and the tokenizer's EOS token.
        let mut eos_ids = gen_eos;
        if eos_ids.is_empty() {
            eos_ids = cfg.eos_token_ids.clone();
            for id in &tokenizer.eos_ids {
                if !eos_ids.contains(id) {
                    eos_ids.push(*id);
                }
            }
        }
        let adapter_dtype =
            opts.adapter_dtype
                .unwrap_or(if model.is_quantized() && model.device().is_cpu() {
                    DType::F16
                } else {
                    model.dtype()
                });
        Ok(Self {
            adapter_dtype,
            model,
            tokenizer,
            chat_template,
            eos_ids,
            report,
            source: path.to_path_buf(),
            format,
        })
    }
}
