//! AdamW with decoupled weight decay (as `torch.optim.AdamW`), global-norm gradient
//! clipping (as `torch.nn.utils.clip_grad_norm_`), and warmup + cosine/linear/constant
//! learning-rate schedules (as transformers' `get_*_schedule_with_warmup`).

use super::config::Schedule;
use crate::error::Result;
use candle_core::{DType, Tensor, Var};

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
        if self.step_cpu(vars, grads, lr, (bc1, bc2))? {
            return Ok(());
        }
        self.step_ops(vars, grads, lr, (bc1, bc2))
    }

    /// [`AdamW::step`]'s update through candle's element-wise ops (any device and dtype).
    fn step_ops(
        &mut self,
        vars: &[Var],
        grads: &[Tensor],
        lr: f64,
        (bc1, bc2): (f64, f64),
    ) -> Result<()> {
        let p = self.params;
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

    /// [`AdamW::step`] in one pass over each variable's values, the variables spread over
    /// candle's pool, where all of them are f32 on the CPU; false (nothing done) otherwise. As candle ops the update was ~16 element-wise passes per variable (and as
    /// many ops, times ~420 variables): ~3% of an `--f16-matmul` SmolLM2 step.
    fn step_cpu(
        &mut self,
        vars: &[Var],
        grads: &[Tensor],
        lr: f64,
        (bc1, bc2): (f64, f64),
    ) -> Result<bool> {
        let all: Vec<&Tensor> = vars
            .iter()
            .map(Var::as_tensor)
            .chain(grads)
            .chain(&self.m)
            .chain(&self.v)
            .collect();
        let n = vars.len();
        if grads.len() != n || !all.iter().all(|t| cpu_f32(t)) {
            return Ok(false);
        }
        let p = self.params;
        let (b1, b2, eps) = (p.beta1 as f32, p.beta2 as f32, p.eps as f32);
        let decay = (1.0 - lr * p.weight_decay) as f32;
        let (ibc1, ibc2, lr) = ((1.0 / bc1) as f32, (1.0 / bc2) as f32, lr as f32);
        type Out = (Vec<f32>, Vec<f32>, Vec<f32>);
        let slots: Vec<std::sync::Mutex<Option<Out>>> =
            (0..n).map(|_| Default::default()).collect();
        with_f32(&all, |sl| {
            crate::model::train_ops::par_for(n, |i| {
                let (x, g, m, v) = (sl[i], sl[n + i], sl[2 * n + i], sl[3 * n + i]);
                let len = x.len();
                let (mut xo, mut mo, mut vo) = (
                    Vec::with_capacity(len),
                    Vec::with_capacity(len),
                    Vec::with_capacity(len),
                );
                for (((&x, &g), &m), &v) in x.iter().zip(g).zip(m).zip(v) {
                    let m = m * b1 + g * (1.0 - b1);
                    let v = v * b2 + g * g * (1.0 - b2);
                    let upd = m * ibc1 / ((v * ibc2).sqrt() + eps);
                    xo.push(x * decay - upd * lr);
                    mo.push(m);
                    vo.push(v);
                }
                *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some((xo, mo, vo));
            });
        })?;
        for (i, slot) in slots.into_iter().enumerate() {
            let Some((x, m, v)) = slot.into_inner().unwrap_or_else(|e| e.into_inner()) else {
                return Err(crate::TernError::InvalidArgument(
                    "optimizer: a variable's update was not computed".into(),
                ));
            };
            let shape = vars[i].as_tensor().shape().clone();
            let dev = vars[i].as_tensor().device().clone();
            self.m[i] = Tensor::from_vec(m, shape.clone(), &dev)?;
            self.v[i] = Tensor::from_vec(v, shape.clone(), &dev)?;
            vars[i].set(&Tensor::from_vec(x, shape, &dev)?)?;
        }
        Ok(true)
    }
}

/// Whether the one-pass updates take `t`: f32 on the CPU.
fn cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// Runs `f` on the values of f32 CPU tensors, each made contiguous (read-locked meanwhile).
fn with_f32<R>(tensors: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
    let ts = tensors
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let sl = guards
        .iter()
        .map(|(st, l)| crate::model::train_ops::storage_f32(st, l))
        .collect::<candle_core::Result<Vec<&[f32]>>>()?;
    Ok(f(&sl))
}

/// The sum of the squares of every value of `tensors`: in f64 over candle's pool where all
/// are f32 on the CPU, else through candle's ops (four per tensor).
fn sum_of_squares(tensors: &[Tensor]) -> Result<f64> {
    if !tensors.iter().all(cpu_f32) {
        let mut total = 0f64;
        for g in tensors {
            total += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        return Ok(total);
    }
    let sums: Vec<std::sync::Mutex<f64>> = tensors.iter().map(|_| Default::default()).collect();
    let all: Vec<&Tensor> = tensors.iter().collect();
    with_f32(&all, |sl| {
        crate::model::train_ops::par_for(sl.len(), |i| {
            let s: f64 = sl[i].iter().map(|&v| (v as f64) * (v as f64)).sum();
            *sums[i].lock().unwrap_or_else(|e| e.into_inner()) = s;
        })
    })?;
    Ok(sums
        .into_iter()
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .sum())
}

/// Scales `grads` so their global L2 norm is at most `max_norm` (0 = no clipping); returns
/// the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = sum_of_squares(grads)?.sqrt();
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
        // Through candle's ops (not f32): the same norm.
        let f64s = Tensor::new(&[3.0f64, 4.0], &Device::Cpu).unwrap();
        assert_eq!(clip_grad_norm(&mut [f64s], 0.0).unwrap(), 5.0);
        let c = gs[0].to_vec1::<f32>().unwrap();
        assert!((c[0] - 0.6).abs() < 1e-5 && (c[1] - 0.8).abs() < 1e-5);
    }

    /// The one-pass CPU update and candle's ops agree over several steps with weight decay
    /// (the ops are the path on other devices and dtypes).
    #[test]
    fn one_pass_update_matches_the_candle_ops() {
        let dev = Device::Cpu;
        let vals = |n: usize, s: f32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * s)
                .collect()
        };
        let vars = [
            Var::from_vec(vals(40, 1.0), (5, 8), &dev).unwrap(),
            Var::from_vec(vals(7, 2.0), 7, &dev).unwrap(),
        ];
        let twins: Vec<Var> = vars
            .iter()
            .map(|v| Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap())
            .collect();
        let params = AdamWParams {
            weight_decay: 0.05,
            ..Default::default()
        };
        let (mut a, mut b) = (
            AdamW::new(&vars, params).unwrap(),
            AdamW::new(&twins, params).unwrap(),
        );
        for step in 1..=4 {
            let grads: Vec<Tensor> = vars
                .iter()
                .map(|v| {
                    let n = v.as_tensor().elem_count();
                    Tensor::from_vec(vals(n + step, 0.3)[step..].to_vec(), v.shape(), &dev).unwrap()
                })
                .collect();
            a.step(&vars, &grads, 0.01).unwrap();
            b.step += 1;
            let bc = |beta: f64| 1.0 - beta.powi(b.step as i32);
            let bcs = (bc(params.beta1), bc(params.beta2));
            b.step_ops(&twins, &grads, 0.01, bcs).unwrap();
        }
        for (x, y) in vars.iter().zip(&twins) {
            let (x, y) = (x.as_tensor(), y.as_tensor());
            let d = (x - y).unwrap().abs().unwrap().max_all().unwrap();
            assert!(d.to_scalar::<f32>().unwrap() < 1e-6, "{x} vs {y}");
        }
        let moved = (vars[0].as_tensor() - Tensor::from_vec(vals(40, 1.0), (5, 8), &dev).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(
            moved.to_scalar::<f32>().unwrap() > 1e-3,
            "the variables did not move"
        );
    }
}
