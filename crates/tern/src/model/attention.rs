//! Grouped-query attention with a KV cache, covering MHA (kv heads = heads), GQA and MQA,
//! optional qkv bias (Qwen2), per-head q/k norms (Qwen3) and a sliding window (Mistral).

use super::cache::append_kv;
use super::config::ModelConfig;
use super::layers::{Linear, RmsNorm};
use super::rope::Rope;
use crate::checkpoint::Weights;
use crate::error::Result;
use crate::lora::BatchAdapters;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::kv_cache::KvCache;

/// [`Attention::train_parts`]: q, k, v, o, `(heads, kv heads, head size)`, the window.
pub(crate) type TrainParts<'a> = ([&'a Linear; 4], (usize, usize, usize), Option<usize>);

/// One attention block.
#[derive(Debug, Clone)]
pub struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    window: Option<usize>,
}

impl Attention {
    /// Loads `{prefix}.{q,k,v,o}_proj` (+ `q_norm`/`k_norm` when the config says so).
    pub fn load(w: &Weights, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nq, nkv) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let norm =
            |n: &str| RmsNorm::load(w, &format!("{prefix}.{n}.weight"), hd, cfg.rms_norm_eps);
        Ok(Self {
            q: Linear::load(w, &format!("{prefix}.q_proj"), nq, h, cfg.qkv_bias)?,
            k: Linear::load(w, &format!("{prefix}.k_proj"), nkv, h, cfg.qkv_bias)?,
            v: Linear::load(w, &format!("{prefix}.v_proj"), nkv, h, cfg.qkv_bias)?,
            o: Linear::load(w, &format!("{prefix}.o_proj"), h, nq, cfg.o_bias)?,
            q_norm: if cfg.qk_norm {
                Some(norm("q_norm")?)
            } else {
                None
            },
            k_norm: if cfg.qk_norm {
                Some(norm("k_norm")?)
            } else {
                None
            },
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
            head_dim: hd,
            window: cfg.sliding_window,
        })
    }

    /// Attends `x` `[b, s, hidden]` at positions `offset..offset+s`, appending to `cache`.
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rope,
        cache: &mut KvCache,
        offset: usize,
        ad: &BatchAdapters,
    ) -> Result<Tensor> {
        let train = ad.is_training();
        if train && offset == 0 && super::train_ops::fits(x) && rope.is_f32() {
            let y = self.attend_train(x, rope, ad)?;
            return self.o.forward_with(&y, ad);
        }
        let (q, k, v) = self.qkv(x, ad)?;
        let y = self.attend(&q, &k, &v, rope, cache, offset, train)?;
        self.o.forward_with(&y, ad)
    }

    /// A training step's attention through the training ops (f32 on the CPU): q, k and v
    /// stay token-major `[b, s, heads * hd]` from the projections through rope to the
    /// attention op, with no transposed copies or reshapes between (each would be a node
    /// whose backward zero-fills and sums a gradient in candle's graph).
    fn attend_train(&self, x: &Tensor, rope: &Rope, ad: &BatchAdapters) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let hd = self.head_dim;
        let [q, k, v]: [Tensor; 3] = Linear::forward_many(&[&self.q, &self.k, &self.v], x, ad)?
            .try_into()
            .expect("one output per layer");
        let norm = |t: Tensor, n: usize, norm: &Option<RmsNorm>| -> Result<Tensor> {
            Ok(match norm {
                Some(nm) => nm
                    .forward_with(&t.reshape((b, s, n, hd))?, true)?
                    .reshape((b, s, n * hd))?,
                None => t,
            })
        };
        let q = rope.apply_token_major(&norm(q, self.heads, &self.q_norm)?, hd)?;
        let k = rope.apply_token_major(&norm(k, self.kv_heads, &self.k_norm)?, hd)?;
        Ok(super::train_ops::attention::causal_attention(
            &q,
            &k,
            &v,
            (self.heads, self.kv_heads, hd),
            self.window,
        )?)
    }

    /// The q, k, v projections of `x` `[b, s, hidden]` as `[b, heads, s, hd]` (q) and
    /// `[b, kv_heads, s, hd]` (k, v), with the per-head norms applied.
    fn qkv(&self, x: &Tensor, ad: &BatchAdapters) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, s, _) = x.dims3()?;
        let train = ad.is_training();
        let split = |t: Tensor, n: usize, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let t = t.reshape((b, s, n, self.head_dim))?;
            let t = match norm {
                Some(nm) => nm.forward_with(&t, train)?,
                None => t,
            };
            // One position: `[b, 1, n, hd]` is already `[b, n, 1, hd]` in memory, so a
            // reshape, not a transposed copy.
            if s == 1 {
                return Ok(t.reshape((b, n, 1, self.head_dim))?);
            }
            Ok(t.transpose(1, 2)?.contiguous()?)
        };
        let [q, k, v]: [Tensor; 3] = Linear::forward_many(&[&self.q, &self.k, &self.v], x, ad)?
            .try_into()
            .expect("one output per layer");
        Ok((
            split(q, self.heads, &self.q_norm)?,
            split(k, self.kv_heads, &self.k_norm)?,
            split(v, self.kv_heads, &None)?,
        ))
    }

    /// Decodes one new token for each of `b` independent sequences: `x` is `[b, 1, hidden]`,
    /// row `i` sits at position `offsets[i]` with its own cache `kvs[i]`. The projections
    /// run once for the whole batch (that is where the weights are read); attention runs per
    /// row, as the rows' histories differ in length.
    pub fn forward_rows(
        &self,
        x: &Tensor,
        rope: &Rope,
        kvs: &mut [&mut KvCache],
        offsets: &[usize],
        ad: &BatchAdapters,
    ) -> Result<Tensor> {
        let b = x.dim(0)?;
        debug_assert_eq!(x.dim(1)?, 1);
        debug_assert_eq!(kvs.len(), b);
        let (q, k, v) = self.qkv(x, ad)?;
        let row = |t: &Tensor, i| t.narrow(0, i, 1);
        if !(x.device().is_cpu() && q.dtype() == DType::F32) {
            let mut ys = Vec::with_capacity(b);
            for (i, kv) in kvs.iter_mut().enumerate() {
                let (q, k, v) = (row(&q, i)?, row(&k, i)?, row(&v, i)?);
                ys.push(self.attend(&q, &k, &v, rope, kv, offsets[i], false)?);
            }
            return self.o.forward_with(&Tensor::cat(&ys, 0)?, ad);
        }
        // One rope op and one attention dispatch for all rows; only the cache appends are
        // per row (each row has its own cache). Per row, rope, append and attention had been
        // about a dozen candle ops per layer (3-5% of an 8-row SmolLM2 step).
        let q = rope.apply_rows(&q, offsets)?;
        let k = rope.apply_rows(&k, offsets)?;
        let mut seen = Vec::with_capacity(b);
        for (i, kv) in kvs.iter_mut().enumerate() {
            seen.push(append_kv(kv, &row(&k, i)?, &row(&v, i)?)?);
        }
        let y = super::decode_attention::decode_attention_rows(&q, &seen, self.window)?
            .ok_or_else(|| {
                crate::error::TernError::InvalidArgument(
                    "decode rows: caches not in the expected layout".into(),
                )
            })?;
        self.o.forward_with(&y, ad)
    }

    /// Runs the prompts of several sequences flattened into `x` `[1, sum(lens), hidden]`:
    /// segment `i` (`lens[i]` tokens) continues from position `offsets[i]` of its own cache
    /// `kvs[i]`. Projections run once over all tokens; attention per segment.
    pub fn forward_segments(
        &self,
        x: &Tensor,
        rope: &Rope,
        kvs: &mut [&mut KvCache],
        offsets: &[usize],
        lens: &[usize],
        ad: &BatchAdapters,
    ) -> Result<Tensor> {
        let (q, k, v) = self.qkv(x, ad)?;
        let mut segs = Vec::with_capacity(lens.len());
        let mut start = 0;
        for ((kv, &off), &len) in kvs.iter_mut().zip(offsets).zip(lens) {
            let seg = |t: &Tensor| t.narrow(2, start, len)?.contiguous();
            segs.push(Self::rope_append(
                &seg(&q)?,
                &seg(&k)?,
                &seg(&v)?,
                rope,
                kv,
                off,
                false,
            )?);
            start += len;
        }
        // Every segment's attention in one pass of the pool where the layouts allow it.
        if let Some(y) = super::decode_attention::prompt_attention(&segs, self.window)? {
            return self.o.forward_with(&y.unsqueeze(0)?, ad);
        }
        let ys = segs
            .iter()
            .zip(offsets)
            .map(|((q, k, v), &off)| self.attention(q, k, v, off, false))
            .collect::<Result<Vec<_>>>()?;
        self.o.forward_with(&Tensor::cat(&ys, 1)?, ad)
    }

    /// Decodes one token for each of `b` beams that share a prompt: `prefix` holds the
    /// prompt's keys and values once (never copied per beam), `beams` the beams' own tokens
    /// (`[b, kv, g, hd]`, all beams being equally long), and the new token sits at position
    /// `pos` (prompt length + `g`). Attention is taken over both parts with one softmax.
    pub fn forward_beams(
        &self,
        x: &Tensor,
        rope: &Rope,
        prefix: &KvCache,
        beams: &mut KvCache,
        pos: usize,
        ad: &BatchAdapters,
    ) -> Result<Tensor> {
        let b = x.dim(0)?;
        let hd = self.head_dim;
        let rep = self.heads / self.kv_heads;
        let (q, k, v) = self.qkv(x, ad)?;
        let q = rope.apply(&q, pos, false)?;
        let k = rope.apply(&k, pos, false)?;
        let (kg, vg) = append_kv(beams, &k.contiguous()?, &v.contiguous()?)?;
        let (Some(kp), Some(vp)) = (prefix.k()?, prefix.v()?) else {
            return Err(crate::error::TernError::InvalidArgument(
                "beam decoding needs the prompt's cache".into(),
            ));
        };
        let p = kp.dim(2)?;
        let scale = 1.0 / (hd as f64).sqrt();
        // Prompt part: the beams' queries folded into rows, so one matmul per kv head reads
        // the shared keys once: [1, kv, b*rep, hd] x [1, kv, hd, p].
        let qf = q
            .reshape((b, self.kv_heads, rep, hd))?
            .transpose(0, 1)?
            .reshape((1, self.kv_heads, b * rep, hd))?
            .contiguous()?;
        let sp = (qf.matmul(&kp.contiguous()?.t()?)? * scale)?
            .reshape((self.kv_heads, b, rep, p))?
            .transpose(0, 1)?;
        // Own part: [b, kv, rep, hd] x [b, kv, hd, g].
        let qb = q.reshape((b, self.kv_heads, rep, hd))?;
        let sg = (qb.matmul(&kg.contiguous()?.t()?)? * scale)?;
        let mut att = Tensor::cat(&[&sp.contiguous()?, &sg], 3)?;
        if att.dtype() != DType::F32 {
            att = att.to_dtype(DType::F32)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?.to_dtype(vp.dtype())?;
        let g = kg.dim(2)?;
        let ap = att.narrow(3, 0, p)?;
        let ag = att.narrow(3, p, g)?.contiguous()?;
        let yp = ap
            .transpose(0, 1)?
            .reshape((1, self.kv_heads, b * rep, p))?
            .contiguous()?
            .matmul(&vp.contiguous()?)?
            .reshape((self.kv_heads, b, rep, hd))?
            .transpose(0, 1)?;
        let yg = ag.matmul(&vg.contiguous()?)?;
        let y = (yp + yg)?.reshape((b, 1, self.heads * hd))?;
        self.o.forward_with(&y, ad)
    }

    /// Rope, cache append and softmax attention for `q` `[b, heads, s, hd]` and `k`, `v`
    /// `[b, kv_heads, s, hd]` at positions `offset..`; returns `[b, s, heads * hd]`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rope: &Rope,
        cache: &mut KvCache,
        offset: usize,
        train: bool,
    ) -> Result<Tensor> {
        let (q, k, v) = Self::rope_append(q, k, v, rope, cache, offset, train)?;
        self.attention(&q, &k, &v, offset, train)
    }

    /// Rope on `q` and `k` at positions `offset..`, then (at inference) `k`, `v` appended to
    /// `cache`; returns `q` and the keys and values to attend to.
    #[allow(clippy::too_many_arguments)]
    fn rope_append(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rope: &Rope,
        cache: &mut KvCache,
        offset: usize,
        train: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let q = rope.apply(q, offset, train)?;
        let k = rope.apply(k, offset, train)?;
        // The cache writes in place, which gradients cannot pass; training runs whole
        // sequences, so it needs none.
        let (k, v) = if train {
            (k, v.clone())
        } else {
            append_kv(cache, &k, v)?
        };
        Ok((q, k, v))
    }

    /// Softmax attention of `q` `[b, heads, s, hd]` (positions `offset..`) over `k`, `v`
    /// `[b, kv_heads, t, hd]`; returns `[b, s, heads * hd]`.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        offset: usize,
        train: bool,
    ) -> Result<Tensor> {
        let (b, _, s, hd) = q.dims4()?;
        let t = k.dim(2)?;
        if !train && t == offset + s {
            use super::decode_attention::{decode_attention, prompt_attention};
            if s == 1 {
                if let Some(y) = decode_attention(q, k, v, self.window)? {
                    return Ok(y);
                }
            } else {
                let row = |t: &Tensor, i| t.narrow(0, i, 1);
                let segs = (0..b)
                    .map(|i| Ok((row(q, i)?, row(k, i)?, row(v, i)?)))
                    .collect::<Result<Vec<_>>>()?;
                if let Some(y) = prompt_attention(&segs, self.window)? {
                    return Ok(y.reshape((b, s, self.heads * hd))?);
                }
            }
        }
        // Heads of one kv group are adjacent, so folding them into the row dimension lets one
        // matmul per kv head serve the whole group without repeating k/v in memory.
        let rep = self.heads / self.kv_heads;
        let q = q.reshape((b, self.kv_heads, rep * s, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let k = k.contiguous()?;
        let v = v.contiguous()?;
        let mut att = (q.matmul(&k.t()?)? * scale)?;
        if att.dtype() != DType::F32 {
            att = att.to_dtype(DType::F32)?;
        }
        if let Some(mask) = attention_mask(s, t, offset, self.window, att.device())? {
            att = att
                .reshape((b, self.kv_heads, rep, s, t))?
                .broadcast_add(&mask)?
                .reshape((b, self.kv_heads, rep * s, t))?;
        }
        let att = if train {
            candle_nn::ops::softmax(&att, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&att)?
        }
        .to_dtype(v.dtype())?;
        let y = att.matmul(&v)?; // [b, kv, rep*s, hd]
        let y = y
            .reshape((b, self.heads, s, hd))?
            .transpose(1, 2)?
            .reshape((b, s, self.heads * hd))?;
        Ok(y)
    }

    /// Whether any projection keeps quantized weights.
    pub fn is_quantized(&self) -> bool {
        [&self.q, &self.k, &self.v, &self.o]
            .iter()
            .any(|l| l.is_quantized())
    }

    /// What a fused training layer takes: q, k, v, o and `(heads, kv heads, head size)`,
    /// with the window. `None` with per-head q/k norms (those run as candle-graph ops).
    pub(crate) fn train_parts(&self) -> Option<TrainParts<'_>> {
        if self.q_norm.is_some() || self.k_norm.is_some() {
            return None;
        }
        let heads = (self.heads, self.kv_heads, self.head_dim);
        Some(([&self.q, &self.k, &self.v, &self.o], heads, self.window))
    }

    /// Its four projections.
    pub fn linears_mut(&mut self) -> [&mut Linear; 4] {
        [&mut self.q, &mut self.k, &mut self.v, &mut self.o]
    }
}

/// Additive mask `[s, t]` (0 or -inf) for `s` queries at positions `offset..offset+s` over
/// `t` cached keys: causal, and windowed when the model slides. `None` when nothing is masked.
pub fn attention_mask(
    s: usize,
    t: usize,
    offset: usize,
    window: Option<usize>,
    dev: &Device,
) -> Result<Option<Tensor>> {
    let windowed = window.is_some_and(|w| t > w);
    if s == 1 && !windowed {
        return Ok(None);
    }
    let w = window.unwrap_or(usize::MAX);
    let mut m = vec![0f32; s * t];
    for i in 0..s {
        let pos = offset + i;
        for j in 0..t {
            if j > pos || pos - j >= w {
                m[i * t + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Some(Tensor::from_vec(m, (s, t), dev)?))
}

/// Softmax over the last dimension in f32 for callers outside attention.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let max = x.max_keepdim(D::Minus1)?;
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(m: &Tensor) -> Vec<Vec<u8>> {
        m.to_vec2::<f32>()
            .unwrap()
            .iter()
            .map(|r| r.iter().map(|&x| u8::from(x == 0.0)).collect())
            .collect()
    }

    #[test]
    fn causal_and_sliding_masks() {
        let d = Device::Cpu;
        assert!(attention_mask(1, 5, 4, None, &d).unwrap().is_none());
        let m = attention_mask(3, 3, 0, None, &d).unwrap().unwrap();
        assert_eq!(
            allowed(&m),
            vec![vec![1, 0, 0], vec![1, 1, 0], vec![1, 1, 1]]
        );
        // Two queries at positions 3 and 4 after a 3-token cache, window 2.
        let m = attention_mask(2, 5, 3, Some(2), &d).unwrap().unwrap();
        assert_eq!(allowed(&m), vec![vec![0, 0, 1, 1, 0], vec![0, 0, 0, 1, 1]]);
        // A single decode step still needs a mask once the cache outgrows the window.
        let m = attention_mask(1, 4, 3, Some(2), &d).unwrap().unwrap();
        assert_eq!(allowed(&m), vec![vec![0, 0, 1, 1]]);
    }
}
