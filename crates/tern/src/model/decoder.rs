//! The one decoder for the Llama family and Qwen2/Qwen3: embedding, N pre-norm blocks of
//! attention + SwiGLU MLP, final norm, output head (tied or not). Architectures differ only
//! by `ModelConfig` switches.

use super::attention::Attention;
pub use super::cache::Cache;
use super::cache::KV_START;
use super::config::ModelConfig;
use super::layers::{Embedding, Linear, Mlp, RmsNorm};
use super::rope::Rope;
use crate::checkpoint::Weights;
use crate::error::{Result, TernError};
use crate::lora::{BatchAdapters, LoraAdapter, SlotTable};
use crate::quant::half_float::HalfMatrix;
use crate::quant::scheme::quantize_tensor;
use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Device, Tensor};
use candle_nn::kv_cache::KvCache;
use std::sync::Arc;

/// One pre-norm decoder layer: attention then MLP, each around a residual.
#[derive(Debug, Clone)]
pub(crate) struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    /// Runs the layer on `x` `[b, s, hidden]` at positions `offset..`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        kv: &mut KvCache,
        offset: usize,
        ad: &BatchAdapters,
    ) -> Result<Tensor> {
        let train = ad.is_training();
        if train && offset == 0 {
            let norms = [&self.attn_norm, &self.mlp_norm];
            if let Some(y) = super::train_layer::forward(norms, &self.attn, &self.mlp, x, rope, ad)?
            {
                return Ok(y);
            }
        }
        let h = self.attn.forward(
            &self.attn_norm.forward_with(x, train)?,
            rope,
            kv,
            offset,
            ad,
        )?;
        let (x, n) = if train {
            let x = (x + h)?;
            let n = self.mlp_norm.forward_with(&x, true)?;
            (x, n)
        } else {
            self.mlp_norm.add_forward(x, &h)?
        };
        let h = self.mlp.forward(&n, ad)?;
        Ok((x + h)?)
    }
}

impl Block {
    /// The layer around an inference attention variant (batched rows, beams, flattened
    /// prompts): `attn` gets the normed input, residuals and the MLP are as in `forward`.
    fn around(
        &self,
        x: &Tensor,
        ad: &BatchAdapters,
        attn: impl FnOnce(&Attention, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let h = attn(&self.attn, &self.attn_norm.forward(x)?)?;
        let (x, n) = self.mlp_norm.add_forward(x, &h)?;
        let h = self.mlp.forward(&n, ad)?;
        Ok((x + h)?)
    }
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
    slots: SlotTable,
    /// Versions of the adapters folded into the weights, in merge order.
    merged: Vec<u64>,
}

impl Model {
    /// Builds the model straight from loaded weights (nothing is randomly initialised).
    pub fn new(cfg: &ModelConfig, w: &Weights) -> Result<Self> {
        Self::with_head(cfg, w, false)
    }

    /// As [`Model::new`]; with `quantized_head`, a tied quantized embedding serves as the
    /// output head through the int8 kernels (int8-rounded activations, as llama.cpp).
    pub fn with_head(cfg: &ModelConfig, w: &Weights, quantized_head: bool) -> Result<Self> {
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        let stored = w.matmul("model.embed_tokens.weight", &[v, h])?;
        let tied = cfg.tie_word_embeddings && !w.contains("lm_head.weight");
        let (embed, lm_head) = match stored {
            // bf16/f16 (`--quantize bf16|f16`, or a half-width GGUF): lookups widen the rows
            // they need, and a tied head multiplies by the same tensor, exact (f32 sums), so
            // the table is held once, at half width, instead of as f32 plus a head copy.
            QMatMul::QTensor(q)
                if matches!(q.dtype(), GgmlDType::BF16 | GgmlDType::F16) && w.device().is_cpu() =>
            {
                let head = if tied {
                    Linear::new(QMatMul::QTensor(q.clone()), None).named("lm_head")
                } else {
                    Linear::load(w, "lm_head", v, h, false)?
                };
                (Embedding::Half(Arc::new(HalfMatrix::new(q)?)), head)
            }
            QMatMul::QTensor(q) if tied && !quantized_head && q.dtype() != GgmlDType::Q8_0 => {
                // No exact kernel for this block type: the float table serves both lookups and
                // an exact head (int8 activation rounding flips near-tied greedy choices).
                let t = w.float("model.embed_tokens.weight", &[v, h])?;
                (
                    Embedding::Float(t.clone()),
                    Linear::new(QMatMul::Tensor(t), None).named("lm_head"),
                )
            }
            // On GPUs QTensor::data() copies to the host, so row lookups stay CPU-only for now.
            QMatMul::QTensor(q) if w.device().is_cpu() => {
                let head = if !tied {
                    Linear::load(w, "lm_head", v, h, false)?
                } else if quantized_head {
                    Linear::new(QMatMul::QTensor(q.clone()), None).named("lm_head")
                } else {
                    // Exact logits from the 8-bit blocks, reading 30% of an f32 copy's bytes.
                    Linear::exact_q8_0(v, h, q.data()?.to_vec())?
                };
                (Embedding::Quant(q), head)
            }
            other => {
                let t = w.float("model.embed_tokens.weight", &[v, h])?;
                // Quantized at load, the lookups keep the float table and a tied head gets its
                // own copy, as an untied head would have been quantized.
                let quantized_tied = w.quantized_to().filter(|_| tied && w.device().is_cpu());
                let head = match quantized_tied {
                    // Q8_0: a quarter of the f32 table's bytes per token (SmolLM2's f32 head
                    // was 30% of its quantized decode time).
                    Some(_) => {
                        let q = quantize_tensor("lm_head.weight", &t, GgmlDType::Q8_0)?;
                        Linear::exact_q8_0(v, h, q.data()?.to_vec())?
                    }
                    None if tied => Linear::new(other, None).named("lm_head"),
                    None => Linear::load(w, "lm_head", v, h, false)?,
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
        let mut m = Self {
            cfg: cfg.clone(),
            embed,
            blocks,
            norm: RmsNorm::load(w, "model.norm.weight", h, cfg.rms_norm_eps)?,
            lm_head,
            rope,
            dtype: w.dtype(),
            device: w.device().clone(),
            slots: SlotTable::default(),
            merged: vec![],
        };
        let mut slots = SlotTable::default();
        for (l, is_head) in m.linears_mut() {
            let (out_dim, in_dim) = l.dims()?;
            let slot = slots.push(l.name(), out_dim, in_dim, is_head);
            l.set_slot(slot);
        }
        m.slots = slots;
        Ok(m)
    }

    /// Every linear layer, with whether it is the output head.
    fn linears_mut(&mut self) -> Vec<(&mut Linear, bool)> {
        let mut v: Vec<(&mut Linear, bool)> = Vec::new();
        for b in &mut self.blocks {
            v.extend(b.attn.linears_mut().into_iter().map(|l| (l, false)));
            v.extend(b.mlp.linears_mut().into_iter().map(|l| (l, false)));
        }
        v.push((&mut self.lm_head, true));
        v
    }

    /// Runs prompts through the int8 kernels as decode does (see
    /// [`Linear::set_int8_prompts`]); the output head keeps its own setting.
    pub fn set_int8_prompts(&mut self, on: bool) {
        for (l, is_head) in self.linears_mut() {
            if !is_head {
                l.set_int8_prompts(on);
            }
        }
    }

    /// Whether any linear layer keeps quantized weights.
    pub fn is_quantized(&self) -> bool {
        self.blocks
            .iter()
            .any(|b| b.attn.is_quantized() || b.mlp.is_quantized())
    }

    /// The token embedding (its storage: float, GGML blocks or half width).
    pub fn embedding(&self) -> &Embedding {
        &self.embed
    }

    /// The linear layers adapters can attach to, numbered.
    pub fn slots(&self) -> &SlotTable {
        &self.slots
    }

    /// Folds `adapter` into the weights (zero per-token cost afterwards; quantized layers it
    /// touches become float). Undo with [`Model::unmerge_adapter`].
    pub fn merge_adapter(&mut self, adapter: &LoraAdapter) -> Result<()> {
        if self.merged.contains(&adapter.version()) {
            return Err(TernError::InvalidArgument(format!(
                "adapter `{}` is already merged",
                adapter.name()
            )));
        }
        self.fold(adapter, 1.0)?;
        self.merged.push(adapter.version());
        Ok(())
    }

    /// Subtracts a merged adapter again (exact up to f32 rounding of the weights).
    pub fn unmerge_adapter(&mut self, adapter: &LoraAdapter) -> Result<()> {
        let Some(pos) = self.merged.iter().position(|v| *v == adapter.version()) else {
            return Err(TernError::InvalidArgument(format!(
                "adapter `{}` is not merged into this model",
                adapter.name()
            )));
        };
        self.fold(adapter, -1.0)?;
        self.merged.remove(pos);
        Ok(())
    }

    fn fold(&mut self, adapter: &LoraAdapter, sign: f64) -> Result<()> {
        let dtype = self.dtype;
        let mut dequantized = 0;
        for (l, _) in self.linears_mut() {
            let Some(slot) = l.slot() else { continue };
            if let Some(p) = adapter.pair(slot) {
                dequantized += usize::from(l.is_quantized());
                l.merge(p, sign, dtype)?;
            }
        }
        if dequantized > 0 {
            tracing::warn!(
                "merging `{}` turned {dequantized} quantized layers into {dtype:?} (more memory, slower decode); serve it unmerged to keep them quantized",
                adapter.name()
            );
        }
        Ok(())
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
                .map(|_| KvCache::new(2, KV_START))
                .collect(),
            pos: 0,
        }
    }

    /// Runs `ids` `[batch, seq]` after what `cache` holds; returns final hidden states
    /// `[batch, seq, hidden]`.
    pub fn forward_hidden(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        self.forward_hidden_with(ids, cache, &BatchAdapters::none())
    }

    /// As [`Model::forward_hidden`], each batch row with its adapter.
    pub fn forward_hidden_with(
        &self,
        ids: &Tensor,
        cache: &mut Cache,
        ad: &BatchAdapters,
    ) -> Result<Tensor> {
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
        let train = ad.is_training();
        for (blk, kv) in self.blocks.iter().zip(cache.layers.iter_mut()) {
            x = if let (true, Some(sink), true) = (train, ad.checkpoint_sink(), x.device().is_cpu())
            {
                super::checkpointing::Recompute {
                    block: blk.clone(),
                    rope: self.rope.clone(),
                    adapters: ad.without_checkpointing(),
                    sink: sink.clone(),
                }
                .forward(&x)?
            } else {
                blk.forward(&x, &self.rope, kv, offset, ad)?
            };
        }
        if !train {
            cache.pos += s;
        }
        self.norm.forward_with(&x, train)
    }

    /// Output logits in f32 for hidden states `[batch, .., hidden]`.
    pub fn logits(&self, hidden: &Tensor, ad: &BatchAdapters) -> Result<Tensor> {
        Ok(self
            .lm_head
            .forward_with(hidden, ad)?
            .to_dtype(DType::F32)?)
    }

    /// A training step's `-log softmax(logits)[target]` per row of final hidden states `h`
    /// `[n, hidden]`, with the output head and the loss as one op that never holds all the
    /// logits (f32 on the CPU, a head without bias or adapter); `grad` readies its backward.
    /// `None` where that op does not apply.
    pub(crate) fn head_nll(
        &self,
        h: &Tensor,
        targets: &[u32],
        ad: &BatchAdapters,
        grad: bool,
    ) -> Result<Option<Tensor>> {
        self.lm_head.head_nll(h, targets, ad, grad)
    }

    /// Logits `[batch, seq, vocab]` for every position of `ids`.
    pub fn forward_all(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        self.forward_all_with(ids, cache, &BatchAdapters::none())
    }

    /// As [`Model::forward_all`], each batch row with its adapter.
    pub fn forward_all_with(
        &self,
        ids: &Tensor,
        cache: &mut Cache,
        ad: &BatchAdapters,
    ) -> Result<Tensor> {
        let h = self.forward_hidden_with(ids, cache, ad)?;
        self.logits(&h, ad)
    }

    /// Logits `[batch, vocab]` of the last position only (the generation step).
    pub fn forward_last(&self, ids: &Tensor, cache: &mut Cache) -> Result<Tensor> {
        self.forward_last_with(ids, cache, &BatchAdapters::none())
    }

    /// As [`Model::forward_last`], each batch row with its adapter.
    pub fn forward_last_with(
        &self,
        ids: &Tensor,
        cache: &mut Cache,
        ad: &BatchAdapters,
    ) -> Result<Tensor> {
        let h = self.forward_hidden_with(ids, cache, ad)?;
        let s = h.dim(1)?;
        self.logits(&h.narrow(1, s - 1, 1)?.squeeze(1)?, ad)
    }

    /// One decode step for many independent sequences at once (continuous batching):
    /// `ids[i]` is appended to `caches[i]`, whatever its length, with row `i`'s adapter
    /// from `ad`. Returns logits `[rows, vocab]` in f32.
    pub fn decode_rows(
        &self,
        ids: &[u32],
        caches: &mut [&mut Cache],
        ad: &BatchAdapters,
    ) -> Result<Tensor> {
        if ids.is_empty() || ids.len() != caches.len() {
            return Err(TernError::InvalidArgument(format!(
                "decode_rows needs one cache per token, got {} tokens and {} caches",
                ids.len(),
                caches.len()
            )));
        }
        let b = ids.len();
        let offsets: Vec<usize> = caches.iter().map(|c| c.pos).collect();
        let ids = Tensor::new(ids, &self.device)?;
        let mut x = self
            .embed
            .lookup(&ids, self.dtype)?
            .reshape((b, 1, self.cfg.hidden_size))?;
        for (l, blk) in self.blocks.iter().enumerate() {
            let mut kvs: Vec<&mut KvCache> = caches.iter_mut().map(|c| &mut c.layers[l]).collect();
            x = blk.around(&x, ad, |a, n| {
                a.forward_rows(n, &self.rope, &mut kvs, &offsets, ad)
            })?;
        }
        caches.iter_mut().for_each(|c| c.pos += 1);
        let h = self.norm.forward(&x)?.squeeze(1)?;
        self.logits(&h, ad)
    }

    /// Runs the prompts of several sequences at once, each after what its cache holds and
    /// with its own adapter: the weights are read once for all of them (attention stays per
    /// sequence), in runs of at most [`crate::quant::dense::MAX_ROWS`] positions unless a
    /// prompt is longer. Returns the logits of each prompt's last position, `[prompts, vocab]`.
    pub fn prefill_rows(
        &self,
        prompts: &[&[u32]],
        caches: &mut [&mut Cache],
        adapters: &[Option<Arc<LoraAdapter>>],
    ) -> Result<Tensor> {
        let n = prompts.len();
        if n == 0
            || caches.len() != n
            || adapters.len() != n
            || prompts.iter().any(|p| p.is_empty())
        {
            return Err(TernError::InvalidArgument(format!(
                "prefill_rows needs one non-empty prompt, cache and adapter entry per row, got \
                 {n} prompts, {} caches, {} adapters",
                caches.len(),
                adapters.len()
            )));
        }
        let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
        let total: usize = lens.iter().sum();
        let limit = crate::quant::dense::MAX_ROWS;
        if n > 1 && total > limit {
            // Float products of up to `limit` rows and longer ones take different kernels,
            // whose sums differ in the last bits; runs of prompts that fit in `limit` (a longer
            // one alone) keep each prompt on the product it gets alone.
            let mut logits = Vec::new();
            let mut start = 0;
            while start < n {
                let (mut end, mut rows) = (start + 1, lens[start]);
                while end < n && rows + lens[end] <= limit {
                    rows += lens[end];
                    end += 1;
                }
                let run = &mut caches[start..end];
                logits.push(self.prefill_rows(&prompts[start..end], run, &adapters[start..end])?);
                start = end;
            }
            return Ok(Tensor::cat(&logits, 0)?);
        }
        let offsets: Vec<usize> = caches.iter().map(|c| c.pos).collect();
        let per_token: Vec<Option<Arc<LoraAdapter>>> = adapters
            .iter()
            .zip(&lens)
            .flat_map(|(a, &l)| std::iter::repeat_n(a.clone(), l))
            .collect();
        let ad = BatchAdapters::per_token(&per_token, &self.device)?;
        let ids: Vec<u32> = prompts.concat();
        let ids = Tensor::new(ids.as_slice(), &self.device)?;
        let mut x =
            self.embed
                .lookup(&ids, self.dtype)?
                .reshape((1, total, self.cfg.hidden_size))?;
        for (l, blk) in self.blocks.iter().enumerate() {
            let mut kvs: Vec<&mut KvCache> = caches.iter_mut().map(|c| &mut c.layers[l]).collect();
            x = blk.around(&x, &ad, |a, n| {
                a.forward_segments(n, &self.rope, &mut kvs, &offsets, &lens, &ad)
            })?;
        }
        for (c, &l) in caches.iter_mut().zip(&lens) {
            c.pos += l;
        }
        let last: Vec<u32> = lens
            .iter()
            .scan(0u32, |end, &l| {
                *end += l as u32;
                Some(*end - 1)
            })
            .collect();
        let last = Tensor::new(last.as_slice(), &self.device)?;
        let h = self.norm.forward(&x.squeeze(0)?.index_select(&last, 0)?)?;
        self.logits(&h, &BatchAdapters::per_row(adapters, &self.device)?)
    }

    /// One beam-search step: `ids[i]` is appended to beam `i`, whose tokens after the prompt
    /// are in `beams` (a batch of equally long rows); the prompt itself is read from
    /// `prompt`, shared by all beams. Returns logits `[beams, vocab]` in f32.
    pub fn decode_beams(
        &self,
        ids: &[u32],
        prompt: &Cache,
        beams: &mut Cache,
        ad: &BatchAdapters,
    ) -> Result<Tensor> {
        let b = ids.len();
        if prompt.pos == 0
            || self
                .cfg
                .sliding_window
                .is_some_and(|w| prompt.pos + beams.pos + 1 > w)
        {
            return Err(TernError::InvalidArgument(
                "beam decoding needs a non-empty prompt cache inside the attention window".into(),
            ));
        }
        let pos = prompt.pos + beams.pos;
        let ids = Tensor::new(ids, &self.device)?;
        let mut x = self
            .embed
            .lookup(&ids, self.dtype)?
            .reshape((b, 1, self.cfg.hidden_size))?;
        for ((blk, pre), own) in self
            .blocks
            .iter()
            .zip(&prompt.layers)
            .zip(&mut beams.layers)
        {
            x = blk.around(&x, ad, |a, n| {
                a.forward_beams(n, &self.rope, pre, own, pos, ad)
            })?;
        }
        beams.pos += 1;
        let h = self.norm.forward(&x)?.squeeze(1)?;
        self.logits(&h, ad)
    }

    /// Convenience: logits of the last position for a token slice, as a vector.
    pub fn step(&self, ids: &[u32], cache: &mut Cache) -> Result<Vec<f32>> {
        self.step_with(ids, cache, &BatchAdapters::none())
    }

    /// As [`Model::step`], with an adapter.
    pub fn step_with(
        &self,
        ids: &[u32],
        cache: &mut Cache,
        ad: &BatchAdapters,
    ) -> Result<Vec<f32>> {
        let t = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        Ok(self
            .forward_last_with(&t, cache, ad)?
            .squeeze(0)?
            .to_vec1::<f32>()?)
    }
}
