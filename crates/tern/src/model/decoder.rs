//! The one decoder for the Llama family and Qwen2/Qwen3: embedding, N pre-norm blocks of
//! attention + SwiGLU MLP, final norm, output head (tied or not). Architectures differ only
//! by `ModelConfig` switches.

use super::attention::Attention;
use super::config::ModelConfig;
use super::layers::{Embedding, Linear, Mlp, RmsNorm};
use super::rope::Rope;
use crate::checkpoint::Weights;
use crate::error::{Result, TernError};
use crate::quant::q8_0::Q8_0Matrix;
use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Device, Tensor};
use candle_nn::kv_cache::KvCache;

/// Growth step of the per-layer KV buffers, in tokens.
const KV_CHUNK: usize = 512;

/// Per-sequence attention state: one KV buffer per layer plus the position reached.
#[derive(Debug, Clone)]
pub struct Cache {
    layers: Vec<KvCache>,
    pos: usize,
}

impl Cache {
    /// Number of tokens already in the cache.
    pub fn len(&self) -> usize {
        self.pos
    }

    /// Whether nothing has been run yet.
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Forgets everything, keeping the buffers.
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| l.reset());
        self.pos = 0;
    }
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: Mlp,
}

/// A decoder-only causal language model.
#[derive(Debug, Clone)]
pub struct Model {
    cfg: ModelConfig,
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    rope: Rope,
    dtype: DType,
    device: Device,
}

impl Model {
    /// Builds the model straight from loaded weights (nothing is randomly initialised).
    pub fn new(cfg: &ModelConfig, w: &Weights) -> Result<Self> {
        Self::with_head(cfg, w, false)
    }

    /// As [`Model::new`]; with `quantized_head`, a tied quantized embedding serves as the
    /// output head through candle's quantized matmul (int8-rounded activations, as llama.cpp).
    pub fn with_head(cfg: &ModelConfig, w: &Weights, quantized_head: bool) -> Result<Self> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let stored = w.matmul("model.embed_tokens.weight", &[v, h])?;
        let tied = cfg.tie_word_embeddings && !w.contains("lm_head.weight");
        let (embed, lm_head) = match stored {
            QMatMul::QTensor(q) if tied && !quantized_head && q.dtype() != GgmlDType::Q8_0 => {
                // No exact kernel for this block type: the float table serves both lookups and
                // an exact head (int8 activation rounding flips near-tied greedy choices).
                let t = w.float("model.embed_tokens.weight", &[v, h])?;
                (
                    Embedding::Float(t.clone()),
                    Linear::new(QMatMul::Tensor(t), None),
                )
            }
            // On GPUs QTensor::data() copies to the host, so row lookups stay CPU-only for now.
            QMatMul::QTensor(q) if w.device().is_cpu() => {
                let head = if !tied {
                    Linear::load(w, "lm_head", v, h, false)?
                } else if quantized_head {
                    Linear::new(QMatMul::QTensor(q.clone()), None)
                } else {
                    // Exact logits from the 8-bit blocks, reading 30% of an f32 copy's bytes.
                    Linear::exact_q8_0(Q8_0Matrix::new(v, h, q.data()?.to_vec())?)
                };
                (Embedding::Quant(q), head)
            }
            other => {
                let t = w.float("model.embed_tokens.weight", &[v, h])?;
                let head = if tied {
                    Linear::new(other, None)
                } else {
                    Linear::load(w, "lm_head", v, h, false)?
                };
                (Embedding::Float(t), head)
            }
        };
        let freq_factors = if w.contains("rope_freqs.weight") {
            let t = w.float("rope_freqs.weight", &[cfg.head_dim / 2])?;
            Some(t.to_dtype(DType::F32)?.to_vec1::<f32>()?)
        } else {
            None
        };
        let rope = Rope::new(
            cfg,
            freq_factors.as_deref(),
            cfg.max_position_embeddings,
            w.dtype(),
            w.device(),
        )?;
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(Block {
                    attn_norm: RmsNorm::load(
                        w,
                        &format!("{p}.input_layernorm.weight"),
                        h,
                        cfg.rms_norm_eps,
                    )?,
                    attn: Attention::load(w, &format!("{p}.self_attn"), cfg)?,
                    mlp_norm: RmsNorm::load(
                        w,
                        &format!("{p}.post_attention_layernorm.weight"),
                        h,
                        cfg.rms_norm_eps,
                    )?,
                    mlp: Mlp::load(w, &format!("{p}.mlp"), cfg)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm: RmsNorm::load(w, "model.norm.weight", h, cfg.rms_norm_eps)?,
            lm_head,
            rope,
            dtype: w.dtype(),
            device: w.device().clone(),
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The device it runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// A fresh, empty cache for one sequence (or one batch of equal-length rows).
    pub fn new_cache(&self) -> Cache {
        Cache {
            layers: (0..self.cfg.num_layers)
                .map(|_| KvCache::new(2, KV_CHUNK))
                .collect(),
            pos: 0,
        }
    }

    /// Runs `ids` `[batch, seq]` after what `cache` holds; returns final hidden states
    /// `[batch, seq, hidden]`.
    pub fn forward_hidden(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        if s == 0 {
            return Err(TernError::InvalidArgument(
                "empty input: no tokens to run".into(),
            ));
        }
        let offset = cache.pos;
        let mut x = self
            .embed
            .lookup(&ids.flatten_all()?, self.dtype)?
            .reshape((b, s, self.cfg.hidden_size))?;
        for (blk, kv) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            let h = blk
                .attn
                .forward(&blk.attn_norm.forward(&x)?, &self.rope, kv, offset)?;
            x = (x + h)?;
            let h = blk.mlp.forward(&blk.mlp_norm.forward(&x)?)?;
            x = (x + h)?;
        }
        cache.pos += s;
        self.norm.forward(&x)
    }

    /// Output logits in f32 for hidden states `[.., hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden)?.to_dtype(DType::F32)?)
    }

    /// Logits `[batch, seq, vocab]` for every position of `ids`.
    pub fn forward_all(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let h = self.forward_hidden(ids, cache)?;
        self.logits(&h)
    }

    /// Logits `[batch, vocab]` of the last position only (the generation step).
    pub fn forward_last(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        let h = self.forward_hidden(ids, cache)?;
        let s = h.dim(1)?;
        self.logits(&h.narrow(1, s - 1, 1)?.squeeze(1)?)
    }

    /// Convenience: logits of the last position for a token slice, as a vector.
    pub fn step(&self, ids: &[u32], cache: &mut Cache) -> Result<Vec<f32>> {
        let t = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        Ok(self.forward_last(&t, cache)?.squeeze(0)?.to_vec1::<f32>()?)
    }
}
