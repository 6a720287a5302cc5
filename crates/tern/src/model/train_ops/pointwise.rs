//! The row-wise and element-wise ops of a training step: RMSNorm with a frozen weight, rope,
//! and the gated MLP's `silu(g) * u`. Each is one pass forward and one backward (candle's
//! differentiable forms are 5-8 ops each way).

use super::{cpu_f32, f32_of, like, par_for, SyncPtr, Unfilled};
use crate::quant::vexp::sigmoid;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};

/// Splits `n` items into pool tasks of `chunk` and runs `f(range)` on each.
fn par_chunks(n: usize, chunk: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    if n <= chunk {
        // One task: waking the pool would cost more than it shares (decode rows).
        return f(0..n);
    }
    par_for(
        n.div_ceil(chunk),
        |c| f(c * chunk..((c + 1) * chunk).min(n)),
    );
}

/// Elements per pool task for element-wise work.
const CHUNK: usize = 16 * 1024;

/// `x / rms(x) * w` over the last dimension; `w` is frozen (no gradient).
pub(crate) struct RmsNormOp {
    /// `[dim]`.
    pub(crate) w: Tensor,
    /// Added to the mean square.
    pub(crate) eps: f32,
}

/// `1 / sqrt(mean(x^2) + eps)` of one row.
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    1.0 / (ss / x.len() as f32 + eps).sqrt()
}

impl CustomOp1 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l)?;
        f32_of!(w = self.w);
        let d = w.len();
        if d == 0 || x.len() % d != 0 || l.dims().last() != Some(&d) {
            candle_core::bail!("rms-norm: input {:?} over a weight of {d}", l.dims())
        }
        Ok((CpuStorage::F32(rms_norm(x, w, self.eps)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        f32_of!(xv = x);
        f32_of!(g = grad);
        f32_of!(w = self.w);
        Ok(Some(like(x, rms_norm_grad(xv, g, w, self.eps, None))?))
    }
}

/// `x / rms(x) * w` for rows of `w.len()` values (which must divide `x.len()`).
pub(super) fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    let mut y = Unfilled::new(x.len());
    let yp = y.ptr();
    par_chunks(x.len() / d, 64, |rows| {
        for r in rows {
            let xr = &x[r * d..][..d];
            let inv = inv_rms(xr, eps);
            // SAFETY: row r is this task's.
            let yr = unsafe { yp.slice(r * d, d) };
            for ((o, a), b) in yr.iter_mut().zip(xr).zip(w) {
                *o = a * inv * b;
            }
        }
    });
    // SAFETY: the tasks wrote every row.
    unsafe { y.written() }
}

/// The input gradient of [`rms_norm`] for its output gradient `g`, plus `acc` when given (a
/// residual's gradient, summed in the same pass).
pub(super) fn rms_norm_grad(
    x: &[f32],
    g: &[f32],
    w: &[f32],
    eps: f32,
    acc: Option<&[f32]>,
) -> Vec<f32> {
    let d = w.len();
    let mut dx = Unfilled::new(x.len());
    let dp = dx.ptr();
    par_chunks(x.len() / d, 64, |rows| {
        for r in rows {
            let (xr, gr) = (&x[r * d..][..d], &g[r * d..][..d]);
            let inv = inv_rms(xr, eps);
            // d/dx of x_i * inv: inv * (gw_i - x_i * inv^2 * mean(gw * x)).
            let dot: f32 = gr.iter().zip(w).zip(xr).map(|((g, w), x)| g * w * x).sum();
            let c = inv * inv * dot / d as f32;
            // SAFETY: row r is this task's.
            let dr = unsafe { dp.slice(r * d, d) };
            for (((o, g), w), x) in dr.iter_mut().zip(gr).zip(w).zip(xr) {
                *o = inv * (g * w - x * c);
            }
            if let Some(a) = acc {
                dr.iter_mut()
                    .zip(&a[r * d..][..d])
                    .for_each(|(o, a)| *o += a);
            }
        }
    });
    // SAFETY: the tasks wrote every row.
    unsafe { dx.written() }
}

/// `dst += src`, element-wise on the pool (a residual connection).
pub(super) fn add_into(dst: &mut [f32], src: &[f32]) {
    assert_eq!(dst.len(), src.len());
    let dp = SyncPtr::new(dst);
    par_chunks(src.len(), CHUNK, |r| {
        // SAFETY: the range is this task's.
        let d = unsafe { dp.slice(r.start, r.len()) };
        d.iter_mut().zip(&src[r]).for_each(|(d, s)| *d += s);
    });
}

/// Rope on rows of `hd` values (the halves rotated, as `rope_slow`), `cos`/`sin` `[s, hd/2]`:
/// `[b, heads, s, hd]` with `per_pos` 1, or token-major `[b, s, heads * hd]` with `per_pos`
/// the head count (rows of one position are adjacent there).
pub(crate) struct RopeOp {
    /// Values per row (the head size).
    pub(crate) hd: usize,
    /// `[s, hd / 2]`.
    pub(crate) cos: Tensor,
    /// `[s, hd / 2]`.
    pub(crate) sin: Tensor,
    /// Consecutive rows at one position.
    pub(crate) per_pos: usize,
}

impl RopeOp {
    /// Rotates every `[hd]` row of `x` by its position's angles; `sign` -1 rotates back
    /// (the backward of a rotation is its inverse).
    pub(super) fn rotate(
        &self,
        x: &[f32],
        dims: &[usize],
        sign: f32,
    ) -> candle_core::Result<Vec<f32>> {
        let hd = self.hd;
        f32_of!(cos = self.cos);
        f32_of!(sin = self.sin);
        let half = hd / 2;
        let s = cos.len() / half.max(1);
        let per = self.per_pos.max(1);
        if !hd.is_multiple_of(2)
            || sin.len() != cos.len()
            || !x.len().is_multiple_of((hd * s * per).max(1))
        {
            candle_core::bail!(
                "rope: tables of {} for input {dims:?}, {per} rows per position",
                cos.len()
            )
        }
        let mut y = Unfilled::new(x.len());
        let yp = y.ptr();
        par_chunks(x.len() / hd, 64, |rows| {
            for r in rows {
                let p = r / per % s;
                let (c, sn) = (&cos[p * half..][..half], &sin[p * half..][..half]);
                let (x1, x2) = x[r * hd..][..hd].split_at(half);
                // SAFETY: row r is this task's.
                let (y1, y2) = unsafe { yp.slice(r * hd, hd) }.split_at_mut(half);
                for i in 0..half {
                    let sv = sign * sn[i];
                    y1[i] = x1[i] * c[i] - x2[i] * sv;
                    y2[i] = x2[i] * c[i] + x1[i] * sv;
                }
            }
        });
        // SAFETY: the tasks wrote every row.
        Ok(unsafe { y.written() })
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = self.rotate(cpu_f32(s, l)?, l.dims(), 1.0)?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        f32_of!(g = grad);
        Ok(Some(like(x, self.rotate(g, x.dims(), -1.0)?)?))
    }
}

/// `silu(g) * u`, the gated MLP's activation, with arguments `(g, u)`.
pub(crate) struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u) = (cpu_f32(gs, gl)?, cpu_f32(us, ul)?);
        if gl.dims() != ul.dims() {
            candle_core::bail!("swiglu: gate {:?} and up {:?} differ", gl.dims(), ul.dims())
        }
        Ok((CpuStorage::F32(swiglu(g, u)), gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        f32_of!(gv = g);
        f32_of!(uv = u);
        f32_of!(dy = grad);
        let (dg, du) = swiglu_grad(gv, uv, dy);
        Ok((Some(like(g, dg)?), Some(like(u, du)?)))
    }
}

/// `silu(g) * u` element-wise (`g`, `u` of one length).
pub(super) fn swiglu(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut y = Unfilled::new(g.len());
    let yp = y.ptr();
    par_chunks(g.len(), CHUNK, |r| {
        // SAFETY: the range is this task's.
        let yr = unsafe { yp.slice(r.start, r.len()) };
        crate::quant::vexp::swiglu(yr, &g[r.clone()], &u[r]);
    });
    // SAFETY: the tasks wrote every value.
    unsafe { y.written() }
}

/// The gradients `(dg, du)` of [`swiglu`] for its output gradient `dy`.
pub(super) fn swiglu_grad(gv: &[f32], uv: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let n = gv.len();
    let (mut dg, mut du) = (Unfilled::new(n), Unfilled::new(n));
    let (gp, up) = (dg.ptr(), du.ptr());
    par_chunks(n, CHUNK, |r| {
        // SAFETY: the range is this task's.
        let (dgr, dur) = unsafe { (gp.slice(r.start, r.len()), up.slice(r.start, r.len())) };
        sigmoid(dgr, &gv[r.clone()]);
        for (i, j) in r.enumerate() {
            let (a, b, d, sg) = (gv[j], uv[j], dy[j], dgr[i]);
            dur[i] = d * a * sg;
            dgr[i] = d * b * sg * (1.0 + a * (1.0 - sg));
        }
    });
    // SAFETY: the tasks wrote every value (`dg` before reading it back).
    unsafe { (dg.written(), du.written()) }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{grads, rand, rel};
    use super::*;

    /// `op` and `reference` agree on `x`, forward and backward, within `tol` (relative).
    fn same_as(
        op: impl Fn(&Tensor) -> Tensor,
        reference: impl Fn(&Tensor) -> Tensor,
        x: &Tensor,
        tol: f32,
    ) {
        let (want_y, want_g) = grads(|t| reference(&t[0]), std::slice::from_ref(x), 3);
        let (y, g) = grads(|t| op(&t[0]), std::slice::from_ref(x), 3);
        assert!(rel(&y, &want_y) < tol, "forward");
        assert!(rel(&g[0], &want_g[0]) < tol, "backward");
    }

    #[test]
    fn rms_norm_matches_candle_forward_and_backward() {
        let w = rand(&[16], 2);
        let op = |x: &Tensor| {
            let w = w.clone();
            x.apply_op1(RmsNormOp { w, eps: 1e-5 }).unwrap()
        };
        let reference = |x: &Tensor| candle_nn::ops::rms_norm_slow(x, &w, 1e-5).unwrap();
        same_as(op, reference, &rand(&[3, 5, 16], 1), 1e-5);
    }

    #[test]
    fn rope_matches_candle_forward_and_backward() {
        let (cos, sin) = (rand(&[7, 4], 2), rand(&[7, 4], 3));
        let op = |x: &Tensor| {
            let (cos, sin) = (cos.clone(), sin.clone());
            x.apply_op1(RopeOp {
                cos,
                sin,
                hd: 8,
                per_pos: 1,
            })
            .unwrap()
        };
        let reference = |x: &Tensor| candle_nn::rotary_emb::rope_slow(x, &cos, &sin).unwrap();
        same_as(op, reference, &rand(&[2, 3, 7, 8], 1), 1e-6);
        // Token-major `[b, s, heads * hd]`: the same rotation as on the transposed input.
        let token_major = |x: &Tensor| {
            let (cos, sin) = (cos.clone(), sin.clone());
            let t = x.transpose(1, 2).unwrap().contiguous().unwrap();
            t.reshape((2, 7, 24))
                .unwrap()
                .apply_op1(RopeOp {
                    cos,
                    sin,
                    hd: 8,
                    per_pos: 3,
                })
                .unwrap()
                .reshape((2, 7, 3, 8))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
        };
        same_as(token_major, reference, &rand(&[2, 3, 7, 8], 4), 1e-6);
    }

    #[test]
    fn swiglu_matches_candle_forward_and_backward() {
        let g = (rand(&[40_000], 1) * 6.0).unwrap();
        let u = rand(&[40_000], 2);
        let (want_y, want_g) = grads(
            |t| (t[0].silu().unwrap() * &t[1]).unwrap(),
            &[g.clone(), u.clone()],
            3,
        );
        let (y, gr) = grads(
            |t| t[0].apply_op2(&t[1], SwiGlu).unwrap(),
            &[g.clone(), u.clone()],
            3,
        );
        assert!(rel(&y, &want_y) < 1e-6);
        assert!(rel(&gr[0], &want_g[0]) < 1e-5);
        assert!(rel(&gr[1], &want_g[1]) < 1e-6);
    }
}
