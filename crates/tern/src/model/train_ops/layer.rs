//! A training step's whole decoder layer (pre-norm attention, then the gated MLP, each around
//! its residual) as one op with its own backward.
//!
//! Through candle's graph the layer is ~15 of this module's sibling ops, and candle's
//! backward gives every edge between them a zero-filled gradient tensor and a sum into it:
//! ~8% of an `--f16-matmul` step on SmolLM2 (measured with that bookkeeping taken out of a
//! copy of candle: 520 -> 565 tok/s). As one op, the gradients pass between the parts as
//! plain buffers, and the LoRA variables' gradients go to the step's [`GradSink`], as a
//! checkpointed layer's do. The parts are the sibling ops' own kernels, so the values are
//! theirs to the bit.

use super::attention::CausalAttention;
use super::linear::{base, base_grad, lora_backward, lora_forward, HalfPacks, PairRef, WeightFn};
use super::pointwise::{add_into, rms_norm, rms_norm_grad, swiglu, swiglu_grad, RopeOp};
use super::{cpu_f32, f32_of, like};
use crate::lora::GradSink;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use std::sync::{Arc, Mutex};

#[cfg(test)]
thread_local! {
    /// Layers this thread has run as this op (tests check the op ran, not a fallback).
    pub(crate) static RUNS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// One projection of the layer: the frozen weight and, where adapted, its LoRA pair.
pub(crate) struct Proj {
    /// The frozen weight's f32 source.
    pub(crate) w: WeightFn,
    /// Set: the weight's products at half width from these packs.
    pub(crate) half: Option<Arc<HalfPacks>>,
    /// The adapter's pair on this projection, if any.
    pub(crate) pair: Option<ProjPair>,
}

/// A LoRA pair as a training step holds it.
pub(crate) struct ProjPair {
    /// `A` `[r, in]` (a variable).
    pub(crate) a: Tensor,
    /// `B^T` `[r, out]` (a variable).
    pub(crate) bt: Tensor,
    /// LoRA scale.
    pub(crate) scale: f32,
    /// Dropout keep-mask on the input (scaled by 1/(1-p)), one value per input element.
    pub(crate) mask: Option<Vec<f32>>,
}

impl ProjPair {
    /// Runs `f` on the pair's values.
    fn values<R>(
        &self,
        f: impl FnOnce(&PairRef) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        f32_of!(a = self.a);
        f32_of!(bt = self.bt);
        f(&PairRef {
            a,
            bt,
            r: self.a.dims2()?.0,
            scale: self.scale,
            mask: self.mask.as_deref(),
        })
    }
}

impl Proj {
    /// `x W^T (+ the pair's term)` for `x` `[rows, in]`, and the pair's bottleneck (empty
    /// without a pair).
    fn forward(&self, x: &[f32], rows: usize) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
        let Some(p) = &self.pair else {
            return Ok((base(x, rows, &self.w, &self.half, None)?.0, Vec::new()));
        };
        p.values(|pair| lora_forward(x, rows, &self.w, &self.half, pair))
    }

    /// The input gradient for the output gradient `g` (with `need_dx`), the pair's
    /// gradients added to `sink`.
    fn backward(
        &self,
        x: &[f32],
        rows: usize,
        t: Vec<f32>,
        g: &[f32],
        need_dx: bool,
        sink: &GradSink,
    ) -> candle_core::Result<Option<Vec<f32>>> {
        let Some(p) = &self.pair else {
            return need_dx
                .then(|| base_grad(g, rows, &self.w, &self.half, None))
                .transpose();
        };
        let (dx, da, dbt) =
            p.values(|pair| lora_backward(x, rows, &self.w, &self.half, pair, t, g, need_dx))?;
        sink.add(&p.a, &like(&p.a, da)?)
            .map_err(crate::TernError::into_candle)?;
        sink.add(&p.bt, &like(&p.bt, dbt)?)
            .map_err(crate::TernError::into_candle)?;
        Ok(dx)
    }
}

/// What forward keeps for backward.
struct Saved {
    /// The attention's normed input.
    n1: Vec<f32>,
    /// Each projection's LoRA bottleneck, in [`DecoderLayer::projs`] order.
    t: [Vec<f32>; 7],
    /// q, k after rope, and v: the attention's inputs.
    qkv: [Vec<f32>; 3],
    /// The attention's probabilities.
    probs: Vec<f32>,
    /// The attention's output (o's input).
    att: Vec<f32>,
    /// The residual stream after attention.
    h: Vec<f32>,
    /// The MLP's normed input.
    n2: Vec<f32>,
    /// Gate and up outputs.
    gu: [Vec<f32>; 2],
    /// `silu(gate) * up` (down's input).
    act: Vec<f32>,
}

/// The op on the layer's input `[b, s, hidden]` (positions from 0); out `[b, s, hidden]`.
pub(crate) struct DecoderLayer {
    /// The attention's and the MLP's norms: weight `[hidden]` and epsilon.
    pub(crate) norms: [(Tensor, f32); 2],
    /// q, k, v, o, gate, up, down.
    pub(crate) projs: [Proj; 7],
    /// Rope tables `[s, hd / 2]` for the step's positions.
    pub(crate) cos: Tensor,
    /// See `cos`.
    pub(crate) sin: Tensor,
    /// Query heads, kv heads, head size.
    pub(crate) heads: (usize, usize, usize),
    /// Sliding attention window, if any.
    pub(crate) window: Option<usize>,
    /// Whether backward returns the input's gradient (not for the first layer, whose input
    /// is the frozen embedding's rows: that skips q/k/v's weight-sized products).
    pub(crate) need_dx: bool,
    /// Where the pairs' gradients go.
    pub(crate) sink: Arc<GradSink>,
    saved: Mutex<Option<Saved>>,
}

impl DecoderLayer {
    /// The op over these parts (see the fields).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        norms: [(Tensor, f32); 2],
        projs: [Proj; 7],
        (cos, sin): (Tensor, Tensor),
        heads: (usize, usize, usize),
        window: Option<usize>,
        need_dx: bool,
        sink: Arc<GradSink>,
    ) -> Self {
        Self {
            norms,
            projs,
            cos,
            sin,
            heads,
            window,
            need_dx,
            sink,
            saved: Mutex::new(None),
        }
    }

    /// Rope over token-major rows of `n` heads.
    fn rope(&self, n: usize) -> RopeOp {
        RopeOp {
            hd: self.heads.2,
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            per_pos: n,
        }
    }

    fn attention(&self) -> CausalAttention {
        let (h, kv, hd) = self.heads;
        CausalAttention::new((h, kv, hd), self.window)
    }

    /// `(b, s, hidden)` of an input, checked against the norms, the head counts and the
    /// rope tables.
    fn dims(&self, dims: &[usize]) -> candle_core::Result<(usize, usize, usize)> {
        let (h, kv, hd) = self.heads;
        let hidden = self.norms[0].0.elem_count();
        match dims {
            &[b, s, d]
                if d == hidden
                    && kv > 0
                    && h % kv == 0
                    && self.cos.dims() == [s, hd / 2]
                    && self.norms[1].0.elem_count() == hidden =>
            {
                Ok((b, s, d))
            }
            _ => candle_core::bail!(
                "decoder-layer: input {dims:?} for hidden {hidden}, {h} heads over {kv} of {hd}, \
                 rope tables {:?}",
                self.cos.dims()
            ),
        }
    }
}

impl CustomOp1 for DecoderLayer {
    fn name(&self) -> &'static str {
        "decoder-layer"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(st, l)?;
        let (b, s, _) = self.dims(l.dims())?;
        #[cfg(test)]
        RUNS.with(|r| r.set(r.get() + 1));
        let (h, kv, hd) = self.heads;
        let rows = b * s;
        let [pq, pk, pv, po, pg, pu, pd] = &self.projs;
        f32_of!(w1 = self.norms[0].0);
        f32_of!(w2 = self.norms[1].0);
        let n1 = rms_norm(x, w1, self.norms[0].1);
        let (q, tq) = pq.forward(&n1, rows)?;
        let (k, tk) = pk.forward(&n1, rows)?;
        let (v, tv) = pv.forward(&n1, rows)?;
        if q.len() != rows * h * hd || k.len() != rows * kv * hd || v.len() != k.len() {
            candle_core::bail!(
                "decoder-layer: q/k/v of {}/{}/{} values per row for {h} and {kv} heads of {hd}",
                q.len() / rows.max(1),
                k.len() / rows.max(1),
                v.len() / rows.max(1)
            )
        }
        let q = self.rope(h).rotate(&q, l.dims(), 1.0)?;
        let k = self.rope(kv).rotate(&k, l.dims(), 1.0)?;
        let (att, probs) = self.attention().run(&q, &k, &v, b, s);
        let (mut hs, to) = po.forward(&att, rows)?;
        if hs.len() != x.len() {
            candle_core::bail!("decoder-layer: o_proj's output does not match the hidden size")
        }
        add_into(&mut hs, x);
        let n2 = rms_norm(&hs, w2, self.norms[1].1);
        let (g, tg) = pg.forward(&n2, rows)?;
        let (u, tu) = pu.forward(&n2, rows)?;
        if g.len() != u.len() {
            candle_core::bail!("decoder-layer: gate_proj and up_proj outputs differ")
        }
        let act = swiglu(&g, &u);
        let (mut y, td) = pd.forward(&act, rows)?;
        if y.len() != x.len() {
            candle_core::bail!("decoder-layer: down_proj's output does not match the hidden size")
        }
        add_into(&mut y, &hs);
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Saved {
            n1,
            t: [tq, tk, tv, to, tg, tu, td],
            qkv: [q, k, v],
            probs,
            att,
            h: hs,
            n2,
            gu: [g, u],
            act,
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let Some(sv) = self.saved.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            candle_core::bail!("decoder-layer: backward without its forward")
        };
        let (b, s, _) = self.dims(x.dims())?;
        let (h, kv, _) = self.heads;
        let rows = b * s;
        let [pq, pk, pv, po, pg, pu, pd] = &self.projs;
        let [tq, tk, tv, to, tg, tu, td] = sv.t;
        let sink = &*self.sink;
        f32_of!(dy = grad);
        let need = |dx: Option<Vec<f32>>| {
            dx.ok_or_else(|| candle_core::Error::Msg("decoder-layer: no input gradient".into()))
        };
        // The MLP, from its output back to the residual stream after attention.
        let dact = need(pd.backward(&sv.act, rows, td, dy, true, sink)?)?;
        let [g, u] = &sv.gu;
        let (dg, du) = swiglu_grad(g, u, &dact);
        let mut dn2 = need(pg.backward(&sv.n2, rows, tg, &dg, true, sink)?)?;
        add_into(
            &mut dn2,
            &need(pu.backward(&sv.n2, rows, tu, &du, true, sink)?)?,
        );
        f32_of!(w2 = self.norms[1].0);
        let dh = rms_norm_grad(&sv.h, &dn2, w2, self.norms[1].1, Some(dy));
        // Attention, back to the layer's normed input.
        let datt = need(po.backward(&sv.att, rows, to, &dh, true, sink)?)?;
        let [q, k, v] = &sv.qkv;
        let (dq, dk, dv) = self.attention().grads(q, k, v, &sv.probs, &datt, b, s)?;
        let dq = self.rope(h).rotate(&dq, x.dims(), -1.0)?;
        let dk = self.rope(kv).rotate(&dk, x.dims(), -1.0)?;
        let nd = self.need_dx;
        let parts = [
            pq.backward(&sv.n1, rows, tq, &dq, nd, sink)?,
            pk.backward(&sv.n1, rows, tk, &dk, nd, sink)?,
            pv.backward(&sv.n1, rows, tv, &dv, nd, sink)?,
        ];
        let [Some(mut dn1), Some(dk1), Some(dv1)] = parts else {
            return Ok(None);
        };
        add_into(&mut dn1, &dk1);
        add_into(&mut dn1, &dv1);
        f32_of!(xv = x);
        f32_of!(w1 = self.norms[0].0);
        let dx = rms_norm_grad(xv, &dn1, w1, self.norms[0].1, Some(&dh));
        Ok(Some(like(x, dx)?))
    }
}
