//! Causal (optionally windowed) grouped-query attention of a training step as one op.
//!
//! Arguments `q [b, s, heads * hd]`, `k`, `v [b, s, kv_heads * hd]` (rope already applied;
//! `[b, s, n, hd]` is taken too), out `[b, s, heads * hd]`. The inputs are token-major, as the projections write them: heads
//! are read in place through strided views, so no transposed copies (and no transpose or
//! reshape nodes, whose backward in candle's graph zero-fills and sums a gradient each) sit
//! between the projections and this op. Forward keeps the probabilities (`b * heads * s * s` values, a few MB
//! per layer) for backward, which is the textbook one: `dV = P^T dY`,
//! `dS = P ∘ (dY V^T - rowsum(P ∘ dY V^T))`, `dQ = c dS K`, `dK = c dS^T Q`, each product
//! only over the causal blocks that can be non-zero. Each (sequence,
//! head) pair is a task on candle's pool with single-threaded products; backward takes a
//! whole kv group per task so a group's `dK`/`dV` sums need no locks.

use super::{cpu_f32, f32_of, gemm1, gemm1_strided, like, par_for, Mat, SyncPtr, Unfilled};
use crate::quant::vexp::softmax_exp;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use std::sync::Mutex;

/// Query rows per causal block (see [`CausalAttention::blocks`]). At 128 positions and
/// head size 64 on SmolLM2, 32 made a training step ~3% faster than full products (blocks
/// of 32 are still large enough for the gemm crate's kernels; stacking a kv group's heads
/// into one taller product was no faster).
const ROW_BLOCK: usize = 32;

/// The op; see the module documentation.
pub(crate) struct CausalAttention {
    heads: usize,
    hd: usize,
    kv_heads: usize,
    window: Option<usize>,
    /// The softmax probabilities from forward, `[b, heads, s, s]`.
    probs: Mutex<Vec<f32>>,
}

/// Runs the op: `q [b, s, heads * hd]`, `k`, `v [b, s, kv_heads * hd]` -> `[b, s, heads *
/// hd]`.
pub(crate) fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (heads, kv_heads, hd): (usize, usize, usize),
    window: Option<usize>,
) -> candle_core::Result<Tensor> {
    let op = CausalAttention::new((heads, kv_heads, hd), window);
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// Head `hi` of sequence `bi` in a token-major `[b, s, n, hd]` buffer, as an `[s, hd]` view.
fn head_of(x: &[f32], bi: usize, s: usize, n: usize, hi: usize, hd: usize) -> Mat<'_> {
    Mat::strided(&x[(bi * s * n + hi) * hd..], s, hd, n * hd)
}

/// Writes `[s, hd]` rows `src` into head `hi` of the token-major `[.., n, hd]` buffer behind
/// `dst`, from token `t0` on.
///
/// # Safety
/// Those rows of `dst` must be valid and written by no one else meanwhile.
unsafe fn scatter_head(dst: SyncPtr, src: &[f32], t0: usize, n: usize, hi: usize, hd: usize) {
    for (i, r) in src.chunks_exact(hd).enumerate() {
        dst.slice(((t0 + i) * n + hi) * hd, hd).copy_from_slice(r);
    }
}

impl CausalAttention {
    /// `(b, s, heads, hd)`, once the inputs are checked against the op's head counts.
    fn dims(
        &self,
        q: &[usize],
        k: &[usize],
        v: &[usize],
    ) -> candle_core::Result<(usize, usize, usize, usize)> {
        let (h, kv, hd) = (self.heads, self.kv_heads, self.hd);
        if kv == 0 || h % kv != 0 {
            candle_core::bail!("causal-attention: {h} heads over {kv} kv heads")
        }
        let fits = |d: &[usize], n: usize| {
            d.len() >= 2
                && d[0] == q[0]
                && d[1] == q[1]
                && d[2..].iter().product::<usize>() == n * hd
        };
        if q.len() < 2 || !fits(q, h) || !fits(k, kv) || !fits(v, kv) {
            candle_core::bail!(
                "causal-attention: q {q:?} / k {k:?} / v {v:?} are not [b, s, heads * {hd}] \
                 with {h} and {kv} heads"
            )
        }
        Ok((q[0], q[1], h, hd))
    }

    /// The op for `heads` query heads over `kv_heads`, of `hd` values each.
    pub(super) fn new((heads, kv_heads, hd): (usize, usize, usize), window: Option<usize>) -> Self {
        Self {
            heads,
            hd,
            kv_heads,
            window,
            probs: Mutex::new(Vec::new()),
        }
    }

    /// The causal blocks of an `s x s` score matrix: `(r0, rows, c0, cols)` for each block of
    /// query rows and the keys its rows may see (from the first row's window start to the
    /// last row). Blocks past the diagonal are all masked, so their products are skipped:
    /// at four row blocks, 10/16 of the full products' work.
    fn blocks(&self, s: usize) -> impl Iterator<Item = (usize, usize, usize, usize)> + '_ {
        (0..s.div_ceil(ROW_BLOCK)).map(move |rb| {
            let (r0, rh) = (rb * ROW_BLOCK, ROW_BLOCK.min(s - rb * ROW_BLOCK));
            let c0 = self.lo(r0);
            (r0, rh, c0, r0 + rh - c0)
        })
    }

    /// First key position row `i` may see.
    fn lo(&self, i: usize) -> usize {
        self.window.map_or(0, |w| (i + 1).saturating_sub(w))
    }

    /// Forward on token-major `q`, `k`, `v` of `b` sequences of `s` (sizes checked by the
    /// caller): the output `[b, s, heads * hd]` and the probabilities `[b, heads, s, s]`.
    pub(super) fn run(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        b: usize,
        s: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let (h, kv, hd) = (self.heads, self.kv_heads, self.hd);
        let scale = 1.0 / (hd as f32).sqrt();
        let (mut probs, mut y) = (Unfilled::new(b * h * s * s), Unfilled::new(b * s * h * hd));
        let (pp, yp) = (probs.ptr(), y.ptr());
        par_for(b * h, |task| {
            let (bi, hi) = (task / h, task % h);
            let g = hi / (h / kv);
            let qh = head_of(q, bi, s, h, hi, hd);
            let kg = head_of(k, bi, s, kv, g, hd);
            let vg = head_of(v, bi, s, kv, g, hd);
            // SAFETY: task `task` owns probabilities `[task * s * s, +s * s)`.
            let p = unsafe { pp.slice(task * s * s, s * s) };
            for (r0, rh, c0, w) in self.blocks(s) {
                let scores = &mut p[r0 * s + c0..];
                gemm1_strided(scores, s, qh.rows(r0, rh), kg.rows(c0, w).t(), scale, false);
            }
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
            for (r0, rh, c0, w) in self.blocks(s) {
                let pb = Mat::new(p, s, s).rows(r0, rh).cols(c0, w);
                gemm1(
                    &mut yh[r0 * hd..(r0 + rh) * hd],
                    pb,
                    vg.rows(c0, w),
                    1.0,
                    false,
                );
            }
            for (i, r) in yh.chunks_exact(hd).enumerate() {
                // SAFETY: row i of head hi in sequence bi is this task's alone.
                let dst = unsafe { yp.slice(((bi * s + i) * h + hi) * hd, hd) };
                dst.copy_from_slice(r);
            }
        });
        // SAFETY: each task wrote its head's probabilities (the product, then every row of
        // it) and its head's output rows.
        unsafe { (y.written(), probs.written()) }
    }

    /// Backward from the output gradient `g` and forward's `probs`: `(dq, dk, dv)`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn grads(
        &self,
        qv: &[f32],
        kvv: &[f32],
        vv: &[f32],
        probs: &[f32],
        g: &[f32],
        b: usize,
        s: usize,
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (h, kv, hd) = (self.heads, self.kv_heads, self.hd);
        let rep = h / kv;
        let scale = 1.0 / (hd as f32).sqrt();
        if probs.len() != b * h * s * s {
            candle_core::bail!("causal-attention: backward without its forward")
        }
        let (mut dq, mut dk, mut dv) = (
            Unfilled::new(b * h * s * hd),
            Unfilled::new(b * kv * s * hd),
            Unfilled::new(b * kv * s * hd),
        );
        let (dqp, dkp, dvp) = (dq.ptr(), dk.ptr(), dv.ptr());
        par_for(b * kv, |task| {
            let (bi, gi) = (task / kv, task % kv);
            let kg = head_of(kvv, bi, s, kv, gi, hd);
            let vg = head_of(vv, bi, s, kv, gi, hd);
            let (mut dkg, mut dvg) = (vec![0f32; s * hd], vec![0f32; s * hd]);
            let mut dqh = vec![0f32; s * hd];
            let mut dy = vec![0f32; s * hd];
            let mut ds = vec![0f32; s * s];
            for hi in gi * rep..(gi + 1) * rep {
                let head = bi * h + hi;
                for (i, r) in dy.chunks_exact_mut(hd).enumerate() {
                    r.copy_from_slice(&g[((bi * s + i) * h + hi) * hd..][..hd]);
                }
                let p = &probs[head * s * s..][..s * s];
                let qh = head_of(qv, bi, s, h, hi, hd);
                let dyh = Mat::new(&dy, s, hd);
                for (r0, rh, c0, w) in self.blocks(s) {
                    let (kb, vb) = (kg.rows(c0, w), vg.rows(c0, w));
                    let pb = Mat::new(p, s, s).rows(r0, rh).cols(c0, w);
                    let dvb = &mut dvg[c0 * hd..(c0 + w) * hd];
                    gemm1(dvb, pb.t(), dyh.rows(r0, rh), 1.0, true);
                    let dsb = &mut ds[r0 * s + c0..];
                    gemm1_strided(dsb, s, dyh.rows(r0, rh), vb.t(), 1.0, false);
                    for i in r0..r0 + rh {
                        let (dr, pr) = (&mut ds[i * s + c0..][..w], &p[i * s + c0..][..w]);
                        let c: f32 = dr.iter().zip(pr).map(|(d, p)| d * p).sum();
                        dr.iter_mut().zip(pr).for_each(|(d, p)| *d = p * (*d - c));
                    }
                    let dsb = Mat::new(&ds, s, s).rows(r0, rh).cols(c0, w);
                    let dqb = &mut dqh[r0 * hd..(r0 + rh) * hd];
                    gemm1(dqb, dsb, kb, scale, false);
                    let dkb = &mut dkg[c0 * hd..(c0 + w) * hd];
                    gemm1(dkb, dsb.t(), qh.rows(r0, rh), scale, true);
                }
                // SAFETY: head `hi`'s dQ rows belong to its kv group's task.
                unsafe { scatter_head(dqp, &dqh, bi * s, h, hi, hd) };
            }
            // SAFETY: kv group `gi`'s dK, dV rows belong to this task.
            unsafe {
                scatter_head(dkp, &dkg, bi * s, kv, gi, hd);
                scatter_head(dvp, &dvg, bi * s, kv, gi, hd);
            }
        });
        // SAFETY: each kv group's task scattered all rows of its heads' dQ and its dK, dV.
        let (dq, dk, dv) = unsafe { (dq.written(), dk.written(), dv.written()) };
        Ok((dq, dk, dv))
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
        let (b, s, h, hd) = self.dims(ql.dims(), kl.dims(), vl.dims())?;
        let (q, k, v) = (cpu_f32(qs, ql)?, cpu_f32(ks, kl)?, cpu_f32(vs, vl)?);
        let (y, probs) = self.run(q, k, v, b, s);
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
        let (b, s, _, _) = self.dims(q.dims(), k.dims(), v.dims())?;
        f32_of!(g = grad);
        f32_of!(qv = q);
        f32_of!(kv = k);
        f32_of!(vv = v);
        let probs = std::mem::take(&mut *self.probs.lock().unwrap_or_else(|e| e.into_inner()));
        let (dq, dk, dv) = self.grads(qv, kv, vv, &probs, g, b, s)?;
        Ok((Some(like(q, dq)?), Some(like(k, dk)?), Some(like(v, dv)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{grads, rand, rel};
    use super::*;
    use crate::model::attention::attention_mask;
    use candle_core::D;

    /// The composed candle ops of the training path this op replaces (on token-major
    /// inputs, transposed to heads-major first as that path did).
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, window: Option<usize>) -> Tensor {
        let heads = |t: &Tensor| t.transpose(1, 2).unwrap().contiguous().unwrap();
        let (q, k, v) = (heads(q), heads(k), heads(v));
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
        p.matmul(&v)
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
        // 70 positions: three causal row blocks, the last one partial; windows inside one
        // block and across two.
        for (s, windows) in [(9, [None, Some(4)]), (70, [None, Some(40)])] {
            same_as_candle(s, windows);
        }
    }

    fn same_as_candle(s: usize, windows: [Option<usize>; 2]) {
        let (b, h, kv, hd) = (2, 6, 2, 8);
        let q = rand(&[b, s, h, hd], 1);
        let k = rand(&[b, s, kv, hd], 2);
        let v = rand(&[b, s, kv, hd], 3);
        for window in windows {
            let inputs = [q.clone(), k.clone(), v.clone()];
            let (want_y, want_g) = grads(|t| reference(&t[0], &t[1], &t[2], window), &inputs, 7);
            let (y, g) = grads(
                |t| causal_attention(&t[0], &t[1], &t[2], (h, kv, hd), window).unwrap(),
                &inputs,
                7,
            );
            assert!(rel(&y, &want_y) < 1e-5, "s {s}, window {window:?}");
            for (i, (g, w)) in g.iter().zip(&want_g).enumerate() {
                assert!(rel(g, w) < 1e-5, "s {s}: gradient {i}, window {window:?}");
            }
        }
    }
}
