//! Cross-entropy over the vocabulary as one fused op with its own backward.
//!
//! Through candle's ops, `-log_softmax(logits)[target]` makes about five vocabulary-wide
//! temporaries (max, shifted, exp, log-sum, result) and as many again in backward; at 49k
//! tokens x 512 positions each is 100 MB of fresh, page-faulted memory. This op reads the
//! logits once forward (one f32 per row out) and writes the gradient once backward.

use crate::error::Result;
use crate::model::train_ops::head_loss::{lse, softmax_grad_row, target_index};
use crate::model::train_ops::{par_for, SyncPtr};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

/// Negative log-likelihood of `targets` `[n]` under `logits` `[n, vocab]` (f32), per row.
pub fn nll_rows(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    Ok(logits.contiguous()?.apply_op1(CrossEntropy {
        targets: targets.to_vec(),
        lse: Default::default(),
    })?)
}

struct CrossEntropy {
    targets: Vec<u32>,
    /// Each row's `log Σ exp(x)` from forward, for backward (one vocabulary pass fewer).
    lse: std::sync::Mutex<Vec<f32>>,
}

fn rows<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<(&'a [f32], usize)> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("cross-entropy takes f32 logits")
    };
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("cross-entropy: logits not contiguous".into()))?;
    let vocab = *l.dims().last().unwrap_or(&1);
    Ok((&v[a..b], vocab))
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, vocab) = rows(s, l)?;
        let n = self.targets.len();
        if x.len() != n * vocab {
            candle_core::bail!(
                "cross-entropy: {} logits for {n} targets of {vocab}",
                x.len()
            );
        }
        let mut out = vec![0f32; n];
        let mut lses = vec![0f32; n];
        let (op, lp) = (SyncPtr::new(&mut out), SyncPtr::new(&mut lses));
        par_for(n, |i| {
            let row = &x[i * vocab..(i + 1) * vocab];
            let l = lse(row);
            let t = target_index(self.targets[i], vocab);
            // SAFETY: each row index is written by exactly one task.
            unsafe {
                op.slice(i, 1)[0] = l - row[t];
                lp.slice(i, 1)[0] = l;
            }
        });
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = lses;
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g: Vec<f32> = grad.to_vec1()?;
        let (st, l) = arg.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*st else {
            candle_core::bail!("cross-entropy backward runs on the CPU")
        };
        let (x, vocab) = rows(s, l)?;
        let n = self.targets.len();
        let lses = std::mem::take(&mut *self.lse.lock().unwrap_or_else(|e| e.into_inner()));
        if lses.len() != n {
            candle_core::bail!("cross-entropy: backward without its forward")
        }
        let mut out = vec![0f32; n * vocab];
        let op = SyncPtr::new(&mut out);
        par_for(n, |i| {
            let row = &x[i * vocab..(i + 1) * vocab];
            let l = lses[i];
            // SAFETY: row i's slice of `out` is written by this task only.
            let o = unsafe { op.slice(i * vocab, vocab) };
            softmax_grad_row(o, row, l, self.targets[i], g[i]);
        });
        Ok(Some(Tensor::from_vec(out, arg.shape(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn matches_log_softmax_and_its_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_vec(
            (0..3 * 7)
                .map(|i| ((i * 13 % 11) as f32 - 5.0) / 2.0)
                .collect(),
            (3, 7),
            &dev,
        )
        .unwrap();
        let t = [2u32, 0, 6];
        let ours = nll_rows(x.as_tensor(), &t).unwrap();
        let lsm = candle_nn::ops::log_softmax(x.as_tensor(), D::Minus1).unwrap();
        let want = lsm
            .gather(&Tensor::new(&t, &dev).unwrap().unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap()
            .neg()
            .unwrap();
        let d = crate::test_util::max_abs_diff(&ours, &want);
        assert!(d < 1e-6, "{d}");
        let w = Tensor::new(&[1.0f32, 0.5, 2.0], &dev).unwrap();
        let g1 = (ours * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (want * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, b) = (
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        let d = crate::test_util::max_abs_diff(a, b);
        assert!(d < 1e-6, "{d}");
    }
}
