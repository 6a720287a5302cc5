//! RMSNorm. Training and other dtypes use ops with a backward or candle's; inference on the
//! CPU in f32 uses a row kernel here, optionally fused with the residual add before it. In a
//! batched decode step candle's norm (a scalar sum per row) and the separate add were ~4% of
//! the serial time between the pool's passes.

use super::train_ops::storage_f32;
use crate::error::Result;
use candle_core::{DType, Tensor};

/// Rows per pool task for long inputs (prompts); fewer run on the calling thread.
const ROWS_PER_TASK: usize = 64;

/// Root-mean-square layer norm.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    w: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// Weight and epsilon as a fused training layer takes them (`None` unless f32).
    pub(crate) fn train_parts(&self) -> Option<(Tensor, f32)> {
        (self.w.dtype() == DType::F32).then(|| (self.w.clone(), self.eps))
    }

    /// Loads `{name}` of shape `[dim]`.
    pub fn load(w: &crate::checkpoint::Weights, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            w: w.float(name, &[dim])?,
            eps: eps as f32,
        })
    }

    /// Normalises over the last dimension; `differentiable` uses an op with a backward
    /// (tern's on the CPU in f32, else candle's plain ops: candle's fused kernel has none).
    pub fn forward_with(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        if differentiable {
            if super::train_ops::fits(x) && self.w.dtype() == DType::F32 {
                let op = super::train_ops::pointwise::RmsNormOp {
                    w: self.w.clone(),
                    eps: self.eps,
                };
                return Ok(x.contiguous()?.apply_op1(op)?);
            }
            return Ok(candle_nn::ops::rms_norm_slow(x, &self.w, self.eps)?);
        }
        self.forward(x)
    }

    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some((_, y)) = self.fused(x, None)? {
            return Ok(y);
        }
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.w,
            self.eps,
        )?)
    }

    /// `(x + h, norm(x + h))`: a residual add and the norm after it, in one pass at
    /// inference (the same values as the add, then [`RmsNorm::forward`]).
    pub fn add_forward(&self, x: &Tensor, h: &Tensor) -> Result<(Tensor, Tensor)> {
        if x.dims() == h.dims() {
            if let Some((Some(sum), y)) = self.fused(x, Some(h))? {
                return Ok((sum, y));
            }
        }
        let sum = (x + h)?;
        let y = self.forward(&sum)?;
        Ok((sum, y))
    }

    /// The CPU f32 kernel: `norm(x)`, or with `h` also `x + h` first; `None` for other
    /// dtypes or devices.
    fn fused(&self, x: &Tensor, h: Option<&Tensor>) -> Result<Option<(Option<Tensor>, Tensor)>> {
        let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        if !f32_cpu(x) || !f32_cpu(&self.w) || h.is_some_and(|h| !f32_cpu(h)) {
            return Ok(None);
        }
        let dim = self.w.elem_count();
        if x.dims().last() != Some(&dim) || dim == 0 {
            return Ok(None);
        }
        let w = self.w.contiguous()?;
        let (x, h) = (x.contiguous()?, h.map(Tensor::contiguous).transpose()?);
        let (xg, xl) = x.storage_and_layout();
        let (wg, wl) = w.storage_and_layout();
        let hg = h.as_ref().map(|h| h.storage_and_layout());
        let (Some(xs), Some(ws)) = (storage_f32(&xg, xl).ok(), storage_f32(&wg, wl).ok()) else {
            return Ok(None);
        };
        let hs = match &hg {
            Some((g, l)) => match storage_f32(g, l).ok() {
                Some(s) => Some(s),
                None => return Ok(None),
            },
            None => None,
        };
        let n = xs.len();
        let mut sum = hs.map(|_| vec![0f32; n]);
        let mut out = vec![0f32; n];
        let (sp, op) = (
            sum.as_mut().map(|s| s.as_mut_ptr() as usize),
            out.as_mut_ptr() as usize,
        );
        let rows = n / dim;
        let run = |r: std::ops::Range<usize>| {
            let span = r.start * dim..r.end * dim;
            // SAFETY: tasks get disjoint row ranges of `out` and `sum`, which outlive the
            // call (it returns when every task is done).
            let o = unsafe {
                std::slice::from_raw_parts_mut((op as *mut f32).add(span.start), span.len())
            };
            let src: &[f32] = match (hs, sp) {
                (Some(hs), Some(sp)) => {
                    // SAFETY: as `o`, for `sum`.
                    let s = unsafe {
                        std::slice::from_raw_parts_mut((sp as *mut f32).add(span.start), span.len())
                    };
                    for ((s, &a), &b) in s.iter_mut().zip(&xs[span.clone()]).zip(&hs[span.clone()])
                    {
                        *s = a + b;
                    }
                    s
                }
                _ => &xs[span.clone()],
            };
            for (src, dst) in src.chunks_exact(dim).zip(o.chunks_exact_mut(dim)) {
                rms_row(src, ws, self.eps, dst);
            }
        };
        if rows > ROWS_PER_TASK {
            crate::quant::par_ranges(rows, ROWS_PER_TASK, run);
        } else {
            run(0..rows);
        }
        let like = |v: Vec<f32>| Tensor::from_vec(v, x.dims(), x.device());
        Ok(Some((sum.map(like).transpose()?, like(out)?)))
    }
}

/// `dst = src / rms(src) * w`, the sum of squares in eight partial sums (the compiler
/// vectorises them; candle's single running sum waited on each add).
fn rms_row(src: &[f32], w: &[f32], eps: f32, dst: &mut [f32]) {
    let mut acc = [0f32; 8];
    let chunks = src.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    let sum2 = acc.iter().sum::<f32>() + tail;
    let inv = 1.0 / (sum2 / src.len() as f32 + eps).sqrt();
    for ((d, &s), &w) in dst.iter_mut().zip(src).zip(w) {
        *d = s * inv * w;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn norm(dim: usize) -> RmsNorm {
        let w: Vec<f32> = (0..dim).map(|i| 0.5 + (i % 7) as f32 / 10.0).collect();
        RmsNorm {
            w: Tensor::from_vec(w, dim, &Device::Cpu).unwrap(),
            eps: 1e-5,
        }
    }

    fn values(shape: (usize, usize, usize), seed: u32) -> Tensor {
        let n = shape.0 * shape.1 * shape.2;
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 300.0 - 1.6)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Decode rows, a prompt long enough for the pool, and a width with a remainder past the
    /// eight partial sums: the kernel equals candle's norm within f32 rounding, and the fused
    /// add gives exactly the add and exactly the unfused norm of it.
    #[test]
    fn the_fused_add_and_norm_equal_the_separate_ops() {
        for shape in [(8, 1, 576), (1, 150, 64), (2, 3, 37)] {
            let n = norm(shape.2);
            let (x, h) = (values(shape, 1), values(shape, 2));
            let ours = n.forward(&x).unwrap();
            let candle = candle_nn::ops::rms_norm(&x, &n.w, n.eps).unwrap();
            let d = crate::test_util::max_abs_diff(&ours, &candle);
            assert!(d < 1e-5, "{shape:?}: {d}");
            let (sum, y) = n.add_forward(&x, &h).unwrap();
            let want = (&x + &h).unwrap();
            let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(bits(&sum), bits(&want), "{shape:?}");
            assert_eq!(bits(&y), bits(&n.forward(&want).unwrap()), "{shape:?}");
        }
        // Other dtypes take candle's ops.
        let n = norm(16);
        let x = values((1, 2, 16), 3).to_dtype(DType::BF16).unwrap();
        assert!(n.fused(&x, None).unwrap().is_none());
    }
}
