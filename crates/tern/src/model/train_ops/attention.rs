//! Causal (optionally windowed) grouped-query attention of a training step as one op.
//!
//! Arguments `q [b, heads, s, hd]`, `k`, `v [b, kv_heads, s, hd]` (rope already applied), out
//! `[b, s, heads * hd]`. Forward keeps the probabilities (`b * heads * s * s` values, a few MB
//! per layer) for backward, which is the textbook one: `dV = P^T dY`,
//! `dS = P ∘ (dY V^T - rowsum(P ∘ dY V^T))`, `dQ = c dS K`, `dK = c dS^T Q`. Each (sequence,
//! head) pair is a task on candle's pool with single-threaded products; backward takes a
//! whole kv group per task so a group's `dK`/`dV` sums need no locks.

use super::{cpu_f32, f32_of, gemm1, like, par_for, Mat, SyncPtr};
use crate::quant::vexp::softmax_exp;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use std::sync::Mutex;

/// The op; see the module documentation.
pub(crate) struct CausalAttention {
    heads: usize,
    kv_heads: usize,
    window: Option<usize>,
    /// The softmax probabilities from forward, `[b, heads, s, s]`.
    probs: Mutex<Vec<f32>>,
}

/// Runs the op: `q [b, heads, s, hd]`, `k`, `v [b, kv_heads, s, hd]` -> `[b, s, heads * hd]`.
pub(crate) fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    window: Option<usize>,
) -> candle_core::Result<Tensor> {
    let op = CausalAttention {
        heads: q.dim(1)?,
        kv_heads: k.dim(1)?,
        window,
        probs: Mutex::new(Vec::new()),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

impl CausalAttention {
    /// First key position row `i` may see.
    fn lo(&self, i: usize) -> usize {
        self.window.map_or(0, |w| (i + 1).saturating_sub(w))
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, s, hd) = ql.shape().dims4()?;
        let kv = self.kv_heads;
        if kl.shape().dims4()? != (b, kv, s, hd) || vl.shape().dims4()? != (b, kv, s, hd) {
            candle_core::bail!(
                "causal-attention: k {:?} / v {:?} do not fit q {:?}",
                kl.dims(),
                vl.dims(),
                ql.dims()
            )
        }
        if h != self.heads || kv == 0 || h % kv != 0 {
            candle_core::bail!("causal-attention: {h} heads over {kv} kv heads")
        }
        let (q, k, v) = (cpu_f32(qs, ql)?, cpu_f32(ks, kl)?, cpu_f32(vs, vl)?);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut probs = vec![0f32; b * h * s * s];
        let mut y = vec![0f32; b * s * h * hd];
        let (pp, yp) = (SyncPtr::new(&mut probs), SyncPtr::new(&mut y));
        par_for(b * h, |task| {
            let (bi, hi) = (task / h, task % h);
            let g = hi / (h / kv);
            let qh = &q[task * s * hd..][..s * hd];
            let kg = &k[(bi * kv + g) * s * hd..][..s * hd];
            let vg = &v[(bi * kv + g) * s * hd..][..s * hd];
            // SAFETY: task `task` owns probabilities `[task * s * s, +s * s)`.
            let p = unsafe { pp.slice(task * s * s, s * s) };
            gemm1(
                p,
                Mat::new(qh, s, hd),
                Mat::new(kg, s, hd).t(),
                scale,
                false,
            );
            for i in 0..s {
                let row = &mut p[i * s..(i + 1) * s];
                let lo = self.lo(i);
                let m = row[lo..=i]
                    .iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max);
                let inv = 1.0 / softmax_exp(&mut row[lo..=i], m);
                row[lo..=i].iter_mut().for_each(|x| *x *= inv);
                row[..lo].fill(0.0);
                row[i + 1..].fill(0.0);
            }
            let mut yh = vec![0f32; s * hd];
            gemm1(&mut yh, Mat::new(p, s, s), Mat::new(vg, s, hd), 1.0, false);
            for (i, r) in yh.chunks_exact(hd).enumerate() {
                // SAFETY: row i of head hi in sequence bi is this task's alone.
                let dst = unsafe { yp.slice(((bi * s + i) * h + hi) * hd, hd) };
                dst.copy_from_slice(r);
            }
        });
        *self.probs.lock().unwrap_or_else(|e| e.into_inner()) = probs;
        Ok((CpuStorage::F32(y), Shape::from((b, s, h * hd))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, h, s, hd) = q.dims4()?;
        let kv = self.kv_heads;
        let rep = h / kv;
        let scale = 1.0 / (hd as f32).sqrt();
        f32_of!(g = grad);
        f32_of!(qv = q);
        f32_of!(kvv = k);
        f32_of!(vv = v);
        let probs = std::mem::take(&mut *self.probs.lock().unwrap_or_else(|e| e.into_inner()));
        if probs.len() != b * h * s * s {
            candle_core::bail!("causal-attention: backward without its forward")
        }
        let mut dq = vec![0f32; b * h * s * hd];
        let mut dk = vec![0f32; b * kv * s * hd];
        let mut dv = vec![0f32; b * kv * s * hd];
        let (dqp, dkp, dvp) = (
            SyncPtr::new(&mut dq),
            SyncPtr::new(&mut dk),
            SyncPtr::new(&mut dv),
        );
        par_for(b * kv, |task| {
            let bi = task / kv;
            let kg = &kvv[task * s * hd..][..s * hd];
            let vg = &vv[task * s * hd..][..s * hd];
            // SAFETY: kv group `task` (its dK, dV and its heads' dQ) belongs to this task.
            let (dkg, dvg) = unsafe {
                (
                    dkp.slice(task * s * hd, s * hd),
                    dvp.slice(task * s * hd, s * hd),
                )
            };
            let mut dy = vec![0f32; s * hd];
            let mut ds = vec![0f32; s * s];
            for hi in task % kv * rep..(task % kv + 1) * rep {
                let head = bi * h + hi;
                for (i, r) in dy.chunks_exact_mut(hd).enumerate() {
                    r.copy_from_slice(&g[((bi * s + i) * h + hi) * hd..][..hd]);
                }
                let p = &probs[head * s * s..][..s * s];
                gemm1(dvg, Mat::new(p, s, s).t(), Mat::new(&dy, s, hd), 1.0, true);
                gemm1(
                    &mut ds,
                    Mat::new(&dy, s, hd),
                    Mat::new(vg, s, hd).t(),
                    1.0,
                    false,
                );
                for (dr, pr) in ds.chunks_exact_mut(s).zip(p.chunks_exact(s)) {
                    let c: f32 = dr.iter().zip(pr).map(|(d, p)| d * p).sum();
                    dr.iter_mut().zip(pr).for_each(|(d, p)| *d = p * (*d - c));
                }
                let qh = &qv[head * s * hd..][..s * hd];
                // SAFETY: head `head`'s dQ rows belong to its kv group's task.
                let dqh = unsafe { dqp.slice(head * s * hd, s * hd) };
                gemm1(dqh, Mat::new(&ds, s, s), Mat::new(kg, s, hd), scale, false);
                gemm1(
                    dkg,
                    Mat::new(&ds, s, s).t(),
                    Mat::new(qh, s, hd),
                    scale,
                    true,
                );
            }
        });
        Ok((Some(like(q, dq)?), Some(like(k, dk)?), Some(like(v, dv)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{grads, rand, rel};
    use super::*;
    use crate::model::attention::attention_mask;
    use candle_core::D;

    /// The composed candle ops of the training path this op replaces.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, window: Option<usize>) -> Tensor {
        let (b, h, s, hd) = q.dims4().unwrap();
        let kv = k.dim(1).unwrap();
        let q = q.reshape((b, kv, h / kv * s, hd)).unwrap();
        let att = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
        let mask = attention_mask(s, s, 0, window, q.device())
            .unwrap()
            .unwrap();
        let att = att
            .reshape((b, kv, h / kv, s, s))
            .unwrap()
            .broadcast_add(&mask)
            .unwrap()
            .reshape((b, kv, h / kv * s, s))
            .unwrap();
        let p = candle_nn::ops::softmax(&att, D::Minus1).unwrap();
        p.matmul(v)
            .unwrap()
            .reshape((b, h, s, hd))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, s, h * hd))
            .unwrap()
    }

    #[test]
    fn attention_matches_candle_ops_forward_and_backward() {
        let (b, h, kv, s, hd) = (2, 6, 2, 9, 8);
        let q = rand(&[b, h, s, hd], 1);
        let k = rand(&[b, kv, s, hd], 2);
        let v = rand(&[b, kv, s, hd], 3);
        for window in [None, Some(4)] {
            let inputs = [q.clone(), k.clone(), v.clone()];
            let (want_y, want_g) = grads(|t| reference(&t[0], &t[1], &t[2], window), &inputs, 7);
            let (y, g) = grads(
                |t| causal_attention(&t[0], &t[1], &t[2], window).unwrap(),
                &inputs,
                7,
            );
            assert!(rel(&y, &want_y) < 1e-5, "window {window:?}");
            for (i, (g, w)) in g.iter().zip(&want_g).enumerate() {
                assert!(rel(g, w) < 1e-5, "gradient {i}, window {window:?}");
            }
        }
    }
}
