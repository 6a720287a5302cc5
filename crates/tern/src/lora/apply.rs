//! The LoRA forward: `y = x W^T + scale * (x A^T) B^T` for one adapter over the whole batch
//! or a different adapter (or none) per batch row, without ever forming `B A`.

use super::adapter::{LoraAdapter, LoraPair};
use super::kernel::{apply_runs, RowRun, View};
use crate::error::Result;
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// A keep-mask scaled by 1/(1-p), seeded by the step's seed and the layer.
fn dropout_mask(dims: &[usize], p: f32, seed: u64, slot: usize, dev: &Device) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    Ok(Tensor::from_vec(dropout_keep(n, p, seed, slot), dims, dev)?)
}

/// The values of [`dropout_mask`], row-major.
pub(crate) fn dropout_keep(n: usize, p: f32, seed: u64, slot: usize) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        seed ^ (slot as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
    );
    let keep = 1.0 / (1.0 - p);
    (0..n)
        .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
        .collect()
}

/// A layer's LoRA pair for a training step and the dropout `(rate, seed)` on its input.
pub(crate) type TrainPair<'a> = (&'a LoraPair, Option<(f32, u64)>);

/// Below this many activation rows the fused CPU kernel runs; above it (prefill) the two thin
/// matmuls per adapter go through candle's GEMM, which wins once there is real arithmetic.
const KERNEL_MAX_ROWS: usize = 32;

/// The batch rows that share one adapter.
#[derive(Debug, Clone)]
struct Group {
    adapter: Arc<LoraAdapter>,
    /// Batch rows, ascending.
    rows: Vec<u32>,
    /// The same rows as a tensor for gather/scatter; `None` when the group is the whole batch.
    index: Option<Tensor>,
}

/// Which adapter each row of a batch uses, resolved once per forward pass and handed to every
/// linear layer. Holding the `Arc`s pins the adapter versions for the whole step.
#[derive(Debug, Clone, Default)]
pub struct BatchAdapters {
    groups: Vec<Group>,
    train: bool,
    /// LoRA dropout on the adapter's input while training: probability and mask seed.
    dropout: Option<(f32, u64)>,
    /// Where ops that compute the adapter variables' gradients outside candle's graph
    /// (fused decoder layers, checkpointed layers' recomputations) leave them.
    sink: Option<Arc<GradSink>>,
    /// Layers are recomputed in backward (gradient checkpointing; needs `sink`).
    checkpoint: bool,
    /// Rows are the positions of a flattened `[1, tokens, ..]` batch (several sequences'
    /// prompts run as one), not its first dimension.
    tokens: bool,
    /// A training step's frozen-base products at half width, if so.
    half_base: Option<HalfProducts>,
}

/// Half-width products for a training step's frozen base (f32 activations, adapter, norms,
/// attention and loss around them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HalfProducts {
    /// bf16 operands summed in f32 (CPUs with AVX512-BF16).
    Bf16,
    /// fp16 operands, fp16 sums of at most 128 products added in f32 (CPUs with AVX512-FP16).
    F16,
}

/// Gradients of variables collected outside the main backward pass (by fused decoder layers,
/// and checkpointed layers that recompute themselves), summed by tensor id.
#[derive(Debug, Default)]
pub struct GradSink(std::sync::Mutex<std::collections::HashMap<candle_core::TensorId, Tensor>>);

impl GradSink {
    /// Adds `g` to the gradient of `var`.
    pub fn add(&self, var: &Tensor, g: &Tensor) -> Result<()> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let g = g.detach();
        let sum = match m.remove(&var.id()) {
            Some(old) => (old + g)?,
            None => g,
        };
        m.insert(var.id(), sum);
        Ok(())
    }

    /// Takes the gradient collected for `var`, if any.
    pub fn take(&self, var: &Tensor) -> Option<Tensor> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&var.id())
    }
}

impl BatchAdapters {
    /// No adapter on any row.
    pub fn none() -> Self {
        Self::default()
    }

    /// The same adapter (or none) on every row.
    pub fn uniform(adapter: Option<Arc<LoraAdapter>>) -> Self {
        Self {
            train: false,
            dropout: None,
            sink: None,
            checkpoint: false,
            tokens: false,
            half_base: None,
            groups: adapter
                .into_iter()
                .map(|adapter| Group {
                    adapter,
                    rows: vec![],
                    index: None,
                })
                .collect(),
        }
    }

    /// One entry per batch row.
    pub fn per_row(rows: &[Option<Arc<LoraAdapter>>], device: &Device) -> Result<Self> {
        let mut groups: Vec<Group> = Vec::new();
        for (i, a) in rows.iter().enumerate() {
            let Some(a) = a else { continue };
            match groups.iter_mut().find(|g| Arc::ptr_eq(&g.adapter, a)) {
                Some(g) => g.rows.push(i as u32),
                None => groups.push(Group {
                    adapter: a.clone(),
                    rows: vec![i as u32],
                    index: None,
                }),
            }
        }
        for g in &mut groups {
            if g.rows.len() < rows.len() {
                g.index = Some(Tensor::new(g.rows.as_slice(), device)?);
            }
        }
        Ok(Self {
            groups,
            train: false,
            dropout: None,
            sink: None,
            checkpoint: false,
            tokens: false,
            half_base: None,
        })
    }

    /// One entry per token of a flattened `[1, tokens, ..]` input: `rows[t]` is the adapter
    /// of token `t` (several prompts, each with its adapter, run as one sequence of tokens).
    pub fn per_token(rows: &[Option<Arc<LoraAdapter>>], device: &Device) -> Result<Self> {
        let mut s = Self::per_row(rows, device)?;
        s.tokens = true;
        Ok(s)
    }

    /// The same, for a training step: the forward pass uses only differentiable ops
    /// (candle's fused rope, softmax and RMSNorm have no backward) and no KV cache.
    pub fn for_training(mut self) -> Self {
        self.train = true;
        self
    }

    /// Drops each input element of the adapters with probability `p` (scaling the rest by
    /// 1/(1-p)), as PEFT's `lora_dropout`; masks come from `seed` and the layer, so a step
    /// replays exactly (resume gives the same run).
    pub fn with_dropout(mut self, p: f32, seed: u64) -> Self {
        if p > 0.0 {
            self.dropout = Some((p, seed));
        }
        self
    }

    /// The frozen base's products at half width while training (`None`: f32).
    pub fn with_half_base(mut self, kind: Option<HalfProducts>) -> Self {
        self.half_base = kind;
        self
    }

    /// The half width the frozen base's training products run at, if any.
    pub fn half_base(&self) -> Option<HalfProducts> {
        self.half_base.filter(|_| self.train)
    }

    /// Lets a training step's ops leave the adapter variables' gradients in `sink` instead
    /// of candle's gradient store (the caller adds both): on the CPU each decoder layer then
    /// runs as one op.
    pub fn with_grad_sink(mut self, sink: Arc<GradSink>) -> Self {
        self.sink = Some(sink);
        self
    }

    /// The gradient sink, while training.
    pub fn grad_sink(&self) -> Option<&Arc<GradSink>> {
        self.sink.as_ref().filter(|_| self.train)
    }

    /// Recompute each decoder layer in backward instead of keeping its activations; the
    /// adapter variables' gradients from those recomputations go to the grad sink (see
    /// [`BatchAdapters::with_grad_sink`]; without one, layers are not checkpointed).
    pub fn with_checkpointing(mut self) -> Self {
        self.checkpoint = true;
        self
    }

    /// The gradient sink when checkpointing.
    pub fn checkpoint_sink(&self) -> Option<&Arc<GradSink>> {
        self.grad_sink().filter(|_| self.checkpoint)
    }

    /// The same adapters without checkpointing (what a recomputed layer runs with).
    pub fn without_checkpointing(&self) -> Self {
        Self {
            checkpoint: false,
            ..self.clone()
        }
    }

    /// The adapters' tensors (the variables, when training).
    pub fn tensors(&self) -> Vec<Tensor> {
        let mut v = Vec::new();
        for g in &self.groups {
            for (_, p) in g.adapter.modules() {
                v.push(p.a.clone());
                v.push(p.bt.clone());
            }
        }
        v
    }

    /// Whether this pass must be differentiable.
    pub fn is_training(&self) -> bool {
        self.train
    }

    /// For a training step's fused linear at `slot`: `Some(None)` when no row has a pair
    /// there, `Some(Some((pair, dropout)))` when one adapter covers every row, `None` when
    /// rows differ (the candle-op path handles those).
    pub(crate) fn whole_batch_pair(&self, slot: Option<usize>) -> Option<Option<TrainPair<'_>>> {
        let Some(slot) = slot else {
            return Some(None);
        };
        let with: Vec<&Group> = self
            .groups
            .iter()
            .filter(|g| g.adapter.pair(slot).is_some())
            .collect();
        match with.as_slice() {
            [] => Some(None),
            [g] if g.index.is_none() && !self.tokens => g
                .adapter
                .pair(slot)
                .map(|p| Some((p, self.dropout.filter(|_| self.train)))),
            _ => None,
        }
    }

    /// Whether no row has an adapter.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// The distinct adapters in use.
    pub fn adapters(&self) -> impl Iterator<Item = &Arc<LoraAdapter>> {
        self.groups.iter().map(|g| &g.adapter)
    }

    /// `y + delta` for the linear layer in `slot`; `x` is `[batch, .., in]` and `y`
    /// `[batch, .., out]`, the base layer's output.
    pub fn apply(&self, slot: usize, x: &Tensor, y: Tensor) -> Result<Tensor> {
        if !self.groups.iter().any(|g| g.adapter.pair(slot).is_some()) {
            return Ok(y);
        }
        if self.tokens {
            // Each token its own row: [1, t, d] -> [t, 1, d] and back.
            let t = x.elem_count() / x.dim(candle_core::D::Minus1)?.max(1);
            let shape = y.shape().clone();
            let x = x.reshape((t, 1, ()))?;
            let y = y.reshape((t, 1, ()))?;
            let rows = Self {
                tokens: false,
                ..self.clone()
            };
            return rows.apply(slot, &x, y)?.reshape(shape).map_err(Into::into);
        }
        if let Some(out) = self.apply_kernel(slot, x, &y)? {
            return Ok(out);
        }
        self.apply_ops(slot, x, y)
    }

    /// The fused path: f32 on the CPU, few rows, no gradients wanted.
    fn apply_kernel(&self, slot: usize, x: &Tensor, y: &Tensor) -> Result<Option<Tensor>> {
        let in_dim = x.dim(candle_core::D::Minus1)?;
        let out_dim = y.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / in_dim.max(1);
        if self.train || rows > KERNEL_MAX_ROWS || !x.device().is_cpu() || x.dtype() != DType::F32 {
            return Ok(None);
        }
        let batch = x.dim(0)?;
        let per_item = rows / batch.max(1);
        let x = x.contiguous()?;
        let Some(xv) = View::of(&x) else {
            return Ok(None);
        };
        let Some(xs) = xv.f32() else {
            return Ok(None);
        };
        let mut views = Vec::new();
        for g in &self.groups {
            if let Some(p) = g.adapter.pair(slot) {
                if p.a.is_variable() || p.bt.is_variable() {
                    return Ok(None); // training wants the differentiable path
                }
                match (View::of(&p.a), View::of(&p.bt)) {
                    (Some(a), Some(bt)) => views.push((g, a, bt, p.scale as f32)),
                    _ => return Ok(None),
                }
            }
        }
        let mut runs = Vec::new();
        for (g, a, bt, scale) in &views {
            let (a, bt) = (a.values(), bt.values());
            if g.index.is_none() {
                runs.push(RowRun {
                    start: 0,
                    len: rows,
                    a,
                    bt,
                    scale: *scale,
                });
            } else {
                for &r in &g.rows {
                    let start = r as usize * per_item;
                    runs.push(RowRun {
                        start,
                        len: per_item,
                        a,
                        bt,
                        scale: *scale,
                    });
                }
            }
        }
        let mut out = y.flatten_all()?.to_vec1::<f32>()?;
        apply_runs(xs, &mut out, in_dim, out_dim, &runs);
        Ok(Some(Tensor::from_vec(out, y.shape(), y.device())?))
    }

    /// The general path through candle ops (any device and dtype; differentiable).
    fn apply_ops(&self, slot: usize, x: &Tensor, mut y: Tensor) -> Result<Tensor> {
        for g in &self.groups {
            let Some(p) = g.adapter.pair(slot) else {
                continue;
            };
            let mut xg = match &g.index {
                Some(idx) => x.index_select(idx, 0)?,
                None => x.clone(),
            };
            if let (true, Some((rate, seed))) = (self.train, self.dropout) {
                let mask = dropout_mask(xg.dims(), rate, seed, slot, xg.device())?;
                xg = (xg * mask.to_dtype(x.dtype())?)?;
            }
            // Pairs kept in f16 over a quantized base are widened for the GEMM.
            let (a, bt) = (p.a.to_dtype(x.dtype())?, p.bt.to_dtype(x.dtype())?);
            let t = (xg.broadcast_matmul(&a.t()?)? * p.scale)?;
            let d = t.broadcast_matmul(&bt)?;
            y = match &g.index {
                Some(idx) => y.index_add(idx, &d, 0)?,
                None => (y + d)?,
            };
        }
        Ok(y)
    }
}
