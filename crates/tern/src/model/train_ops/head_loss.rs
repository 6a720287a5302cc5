//! The output head and cross-entropy of a training step as one op: `nll_i = lse(h_i W^T) -
//! (h_i W^T)[t_i]` for a frozen head `W` `[vocab, hidden]`.
//!
//! Separately, the head writes `[n, vocab]` logits (100 MB at 512 positions of a 49k
//! vocabulary), the loss's backward as much again, and candle's graph a zero-filled tensor
//! and a sum of that size for the logits' gradient: ~400 MB of fresh, page-faulted memory a
//! step, plus the passes over it. Here the logits exist a chunk of rows at a time. As the
//! head is frozen, `d nll_i / d h_i = (softmax(h_i W^T) - onehot(t_i)) W` needs nothing from
//! later in the step, so forward computes it from the chunk while it is at hand (as Liger
//! Kernel's fused linear cross-entropy does) and backward only scales its rows.

use super::linear::{base, base_grad, HalfPacks, WeightFn};
use super::{cpu_f32, f32_of, like, par_for, SyncPtr};
use crate::quant::vexp::{exp_affine, sum_exp};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// Most logits one chunk holds (32 MB of f32), and most rows per chunk.
const CHUNK_VALUES: usize = 8 << 20;
const CHUNK_ROWS: usize = 128;

/// The op; see the module documentation.
pub(crate) struct HeadNll {
    w: WeightFn,
    half: Option<Arc<HalfPacks>>,
    targets: Vec<u32>,
    /// Whether forward computes the input gradient (training; not for eval loss).
    grad: bool,
    /// Most rows per chunk (0: as many as fit [`CHUNK_VALUES`], at most [`CHUNK_ROWS`]).
    chunk: usize,
    /// `d nll_i / d h_i` from forward, `[n, hidden]`.
    dh: Mutex<Vec<f32>>,
}

/// Per-row `-log softmax(h W^T)[target]` of `h` `[n, hidden]` (f32, CPU) for a frozen head;
/// with `grad`, backward gives `dL/dh`.
pub(crate) fn head_nll(
    h: &Tensor,
    targets: &[u32],
    w: WeightFn,
    half: Option<Arc<HalfPacks>>,
    grad: bool,
) -> candle_core::Result<Tensor> {
    h.contiguous()?.apply_op1(HeadNll {
        w,
        half,
        targets: targets.to_vec(),
        grad,
        chunk: 0,
        dh: Mutex::new(Vec::new()),
    })
}

/// `scale (softmax(row) - onehot(target))` into `out`: the gradient of `scale * nll` over a
/// row of logits whose log-sum-exp is `lse` (a target past the vocabulary counts as its last
/// entry, as the losses read it).
pub(crate) fn softmax_grad_row(out: &mut [f32], row: &[f32], lse: f32, target: u32, scale: f32) {
    exp_affine(out, row, 1.0, -lse, scale);
    out[target_index(target, row.len())] -= scale;
}

/// Where `target` sits in a row of `vocab` logits (clamped to the last).
pub(crate) fn target_index(target: u32, vocab: usize) -> usize {
    (target as usize).min(vocab - 1)
}

/// `log Σ exp(x)` of one row (shifted by its max; vectorised exponentials summed in f64).
pub(crate) fn lse(row: &[f32]) -> f32 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    m + sum_exp(row, m).ln() as f32
}

impl CustomOp1 for HeadNll {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l)?;
        let (n, hidden) = l.shape().dims2()?;
        if self.targets.len() != n {
            candle_core::bail!(
                "head-cross-entropy: {} targets for {n} rows",
                self.targets.len()
            )
        }
        // A quantized head is dequantized once here, not per chunk.
        let (wf, vocab): (WeightFn, usize) = match &self.half {
            Some(p) => (self.w.clone(), p.fwd.dims().1),
            None => {
                let t = self.w.as_ref()()?;
                let vocab = t.dims2()?.0;
                (Arc::new(move || Ok(t.clone())), vocab)
            }
        };
        let per = match self.chunk {
            0 => (CHUNK_VALUES / vocab.max(1)).clamp(1, CHUNK_ROWS),
            c => c,
        };
        let mut nll = vec![0f32; n];
        let mut dh = if self.grad {
            vec![0f32; n * hidden]
        } else {
            Vec::new()
        };
        let mut d = Vec::new();
        let mut r0 = 0;
        while r0 < n {
            let rows = per.min(n - r0);
            let xs = &x[r0 * hidden..(r0 + rows) * hidden];
            let (logits, _) = base(xs, rows, &wf, &self.half, None)?;
            let targets = &self.targets[r0..r0 + rows];
            if self.grad {
                d.resize(rows * vocab, 0.0);
            }
            let (np, dp) = (SyncPtr::new(&mut nll[r0..r0 + rows]), SyncPtr::new(&mut d));
            par_for(rows, |i| {
                let row = &logits[i * vocab..(i + 1) * vocab];
                let l = lse(row);
                // SAFETY: row i of the chunk (its loss and its gradient row) is this task's.
                unsafe { np.slice(i, 1)[0] = l - row[target_index(targets[i], vocab)] };
                if self.grad {
                    // SAFETY: as above.
                    let o = unsafe { dp.slice(i * vocab, vocab) };
                    softmax_grad_row(o, row, l, targets[i], 1.0);
                }
            });
            if self.grad {
                drop(logits);
                let d = &d[..rows * vocab];
                // `softmax - onehot` lies within ±1: the half-width product needs no pass to
                // find each block's largest value.
                let g = match &self.half {
                    Some(p) => p.bwd.product_within(d, rows, None, Some(1.0)),
                    None => base_grad(d, rows, &wf, &self.half, None)?,
                };
                dh[r0 * hidden..(r0 + rows) * hidden].copy_from_slice(&g);
            }
            r0 += rows;
        }
        *self.dh.lock().unwrap_or_else(|e| e.into_inner()) = dh;
        Ok((CpuStorage::F32(nll), Shape::from(n)))
    }

    fn bwd(&self, h: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let mut dh = std::mem::take(&mut *self.dh.lock().unwrap_or_else(|e| e.into_inner()));
        let hidden = h.dim(1)?;
        if !self.grad || dh.len() != h.elem_count() {
            candle_core::bail!("head-cross-entropy: backward without a training forward")
        }
        f32_of!(g = grad);
        for (row, &gi) in dh.chunks_exact_mut(hidden).zip(g) {
            row.iter_mut().for_each(|v| *v *= gi);
        }
        Ok(Some(like(h, dh)?))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{grads, rand, rel};
    use super::*;

    /// `-log_softmax(h W^T)[t]` through candle's ops.
    fn reference(h: &Tensor, w: &Tensor, targets: &[u32]) -> Tensor {
        let logits = h.matmul(&w.t().unwrap()).unwrap();
        let t = Tensor::new(targets, h.device())
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        candle_nn::ops::log_softmax(&logits, 1)
            .unwrap()
            .gather(&t, 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap()
    }

    fn op(w: &Tensor, targets: &[u32], grad: bool, chunk: usize) -> HeadNll {
        let w = w.clone();
        HeadNll {
            w: Arc::new(move || Ok(w.clone())),
            half: None,
            targets: targets.to_vec(),
            grad,
            chunk,
            dh: Mutex::new(Vec::new()),
        }
    }

    #[test]
    fn matches_the_head_then_cross_entropy_forward_and_backward() {
        let (n, hidden, vocab) = (11, 16, 37);
        let w = rand(&[vocab, hidden], 1);
        let h = rand(&[n, hidden], 2);
        let targets: Vec<u32> = (0..n as u32).map(|i| i * 7 % vocab as u32).collect();
        let (want_y, want_g) = grads(
            |t| reference(&t[0], &w, &targets),
            std::slice::from_ref(&h),
            4,
        );
        // Chunks of 4 rows (two whole ones and a short last one), then one chunk.
        for chunk in [4, 0] {
            let (y, g) = grads(
                |t| t[0].apply_op1(op(&w, &targets, true, chunk)).unwrap(),
                std::slice::from_ref(&h),
                4,
            );
            assert!(rel(&y, &want_y) < 1e-5, "forward, chunk {chunk}");
            assert!(rel(&g[0], &want_g[0]) < 1e-5, "backward, chunk {chunk}");
        }
        // Without `grad` (an eval loss) the values are the same.
        let y = h.apply_op1(op(&w, &targets, false, 4)).unwrap();
        assert!(rel(&y, &want_y) < 1e-5);
    }
}
