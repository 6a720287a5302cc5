//! AdamW with decoupled weight decay (as `torch.optim.AdamW`), global-norm gradient
//! clipping (as `torch.nn.utils.clip_grad_norm_`), and warmup + cosine/linear/constant
//! learning-rate schedules (as transformers' `get_*_schedule_with_warmup`).

use super::config::Schedule;
use crate::error::Result;
use candle_core::{Tensor, Var};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW over a fixed list of variables; its moments are plain tensors so checkpoints can
/// save and restore them.
#[derive(Debug)]
pub struct AdamW {
    /// Settings.
    pub params: AdamWParams,
    /// Steps taken.
    pub step: usize,
    /// First moments, one per variable.
    pub m: Vec<Tensor>,
    /// Second moments, one per variable.
    pub v: Vec<Tensor>,
}

impl AdamW {
    /// Zero moments for `vars`.
    pub fn new(vars: &[Var], params: AdamWParams) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        Ok(Self {
            params,
            step: 0,
            m: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: vars.iter().map(zeros).collect::<candle_core::Result<_>>()?,
        })
    }

    /// One update of every variable with its gradient at learning rate `lr`.
    pub fn step(&mut self, vars: &[Var], grads: &[Tensor], lr: f64) -> Result<()> {
        let p = self.params;
        self.step += 1;
        let bc1 = 1.0 - p.beta1.powi(self.step as i32);
        let bc2 = 1.0 - p.beta2.powi(self.step as i32);
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            self.m[i] = ((&self.m[i] * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            self.v[i] = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let x = (var.as_tensor() * (1.0 - lr * p.weight_decay))?;
            let denom = ((&self.v[i] / bc2)?.sqrt()? + p.eps)?;
            let upd = ((&self.m[i] / bc1)? / denom)?;
            var.set(&(x - (upd * lr)?)?)?;
        }
        Ok(())
    }
}

/// Scales `grads` so their global L2 norm is at most `max_norm` (0 = no clipping); returns
/// the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter() {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

/// The learning rate at optimizer step `step` (0-based) of `total`.
pub fn lr_at(base: f64, schedule: Schedule, warmup: usize, step: usize, total: usize) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / span;
    base * match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => (1.0 - progress).max(0.0),
        Schedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedules_match_transformers() {
        // get_cosine_schedule_with_warmup(warmup=2, total=10): 0, .5, 1, then a half cosine.
        let lr = |s| lr_at(1.0, Schedule::Cosine, 2, s, 10);
        assert_eq!((lr(0), lr(1), lr(2)), (0.0, 0.5, 1.0));
        assert!((lr(6) - 0.5).abs() < 1e-12);
        assert!((lr_at(1.0, Schedule::Linear, 0, 5, 10) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(1.0, Schedule::Constant, 0, 9, 10), 1.0);
    }

    #[test]
    fn adamw_first_step_is_sign_times_lr_plus_decay() {
        let v = Var::from_vec(vec![1.0f32, -2.0], 2, &Device::Cpu).unwrap();
        let g = Tensor::new(&[0.5f32, -3.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(
            std::slice::from_ref(&v),
            AdamWParams {
                weight_decay: 0.1,
                ..Default::default()
            },
        )
        .unwrap();
        opt.step(std::slice::from_ref(&v), &[g], 0.01).unwrap();
        // Step 1: m̂ = g, v̂ = g², so the update is lr * sign(g); decay first multiplies by
        // (1 - lr * wd).
        let got = v.as_tensor().to_vec1::<f32>().unwrap();
        assert!((got[0] - (1.0 * 0.999 - 0.01)).abs() < 1e-6, "{got:?}");
        assert!((got[1] - (-2.0 * 0.999 + 0.01)).abs() < 1e-6, "{got:?}");
        let mut gs = vec![Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap()];
        assert_eq!(clip_grad_norm(&mut gs, 1.0).unwrap(), 5.0);
        let c = gs[0].to_vec1::<f32>().unwrap();
        assert!((c[0] - 0.6).abs() < 1e-5 && (c[1] - 0.8).abs() < 1e-5);
    }
}
