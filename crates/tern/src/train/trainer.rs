//! The training loop: LoRA pairs as variables over a frozen base, completion-only
//! cross-entropy, gradient accumulation, clipping, AdamW, the schedule, eval with early
//! stopping, checkpoints that resume to the same result, and the PEFT adapter at the end.

use super::config::{TargetModules, TrainConfig};
use super::data::{epoch_batches, pad, Batch, Example};
use super::optim::{clip_grad_norm, lr_at, AdamW, AdamWParams};
use crate::error::{Result, TernError};
use crate::lora::{AdapterConfig, BatchAdapters, GradSink, HalfProducts, LoraAdapter};
use crate::model::LoadedModel;
use candle_core::{DType, Tensor, Var, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// What one optimizer step did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepReport {
    /// Steps done (1-based).
    pub step: usize,
    /// Steps the run will take.
    pub total_steps: usize,
    /// Epoch (0-based).
    pub epoch: usize,
    /// Mean loss over the step's target tokens.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens (padding excluded) per second over the step.
    pub tokens_per_s: f64,
    /// Eval loss, when this step evaluated.
    pub eval_loss: Option<f64>,
    /// Seconds since the run started.
    pub elapsed_s: f64,
}

/// How a run ended.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainReport {
    /// Optimizer steps done.
    pub steps: usize,
    /// Loss of the last step.
    pub final_loss: f64,
    /// Best eval loss, when there was eval data.
    pub best_eval_loss: Option<f64>,
    /// Whether early stopping ended it.
    pub stopped_early: bool,
    /// Tokens trained on.
    pub tokens: usize,
    /// Wall seconds of the loop.
    pub elapsed_s: f64,
    /// Tokens per second over the loop.
    pub tokens_per_s: f64,
    /// Where the adapter is.
    pub out: PathBuf,
}

/// Where a checkpoint left off.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct State {
    pub(super) step: usize,
    pub(super) epoch: usize,
    /// Batches of `epoch` already consumed.
    pub(super) batch: usize,
    pub(super) best_eval: Option<f64>,
    pub(super) bad_evals: usize,
    pub(super) tokens: usize,
    /// What a resume must share with this run (`checkpoint::run_settings`); absent in
    /// checkpoints written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) settings: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A LoRA training run over one loaded base model.
pub struct Trainer<'a> {
    pub(super) lm: &'a LoadedModel,
    pub(super) cfg: TrainConfig,
    pub(super) vars: Vec<Var>,
    pub(super) names: Vec<String>,
    /// Module of each `A`/`B^T` pair (`vars[2 i]`, `vars[2 i + 1]`).
    pub(super) modules: Vec<String>,
    pub(super) adapter: Arc<LoraAdapter>,
    pub(super) opt: AdamW,
    pub(super) state: State,
    /// The checkpoint this run resumed from, if any.
    pub(super) resumed: Option<PathBuf>,
}

/// The model's linear modules by their last name (`q_proj, k_proj, ...`), for errors.
fn module_names(lm: &LoadedModel) -> String {
    let mut names: Vec<&str> = Vec::new();
    for s in lm.model.slots().iter() {
        let n = s.name.rsplit('.').next().unwrap_or(&s.name);
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names.join(", ")
}

fn nan_error(step: usize, out: &Path) -> TernError {
    TernError::InvalidArgument(format!(
        "loss became NaN/inf at step {step}; stopped without writing over the last good checkpoint in {} (lower --lr or --max-grad-norm)",
        out.display()
    ))
}

impl<'a> Trainer<'a> {
    /// A fresh adapter as PEFT initialises one: `A` Kaiming-uniform, `B` zero.
    pub fn new(lm: &'a LoadedModel, cfg: TrainConfig) -> Result<Self> {
        let acfg = cfg.adapter_config()?;
        let dev = lm.model.device();
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        // PEFT drops a list entry that matches nothing as long as another matches; here a
        // misspelt name would silently train fewer modules than asked, so it is refused.
        if let TargetModules::List(l) = &cfg.target_modules {
            let slots = lm.model.slots();
            if let Some(t) = l.iter().find(|t| {
                !slots
                    .iter()
                    .any(|s| s.name == **t || s.name.ends_with(&format!(".{t}")))
            }) {
                return Err(super::config::bad(
                    "target_modules",
                    format!(
                        "`{t}` names no linear layer of this model (its modules: {})",
                        module_names(lm)
                    ),
                ));
            }
        }
        let mut pairs = Vec::new();
        for s in lm.model.slots().iter() {
            if !acfg.targets(&s.name, s.is_head) {
                continue;
            }
            let r = acfg.rank_for(&s.name);
            let bound = 1.0 / (s.in_dim as f32).sqrt();
            let a: Vec<f32> = (0..r * s.in_dim)
                .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound)
                .collect();
            pairs.push((
                s.name.clone(),
                Tensor::from_vec(a, (r, s.in_dim), dev)?,
                Tensor::zeros((r, s.out_dim), DType::F32, dev)?,
            ));
        }
        if pairs.is_empty() {
            let (what, hint) = match &cfg.target_modules {
                TargetModules::One(re) => (
                    format!("regex `{re}`"),
                    " (a string is a regex over whole names such as model.layers.0.self_attn.q_proj, as in PEFT; a list [q_proj] names modules)",
                ),
                TargetModules::List(l) => (format!("[{}]", l.join(", ")), ""),
            };
            return Err(super::config::bad(
                "target_modules",
                format!(
                    "{what} selects no linear layer of this model (its modules: {}){hint}",
                    module_names(lm)
                ),
            ));
        }
        Self::with_pairs(lm, cfg, acfg, pairs)
    }

    /// Starts from a saved PEFT adapter (its weights become the variables).
    pub fn from_adapter(lm: &'a LoadedModel, cfg: TrainConfig, dir: &Path) -> Result<Self> {
        let a = LoraAdapter::load(
            dir,
            "train",
            lm.model.slots(),
            DType::F32,
            lm.model.device(),
        )?;
        let pairs = a
            .modules()
            .map(|(m, p)| (m.to_string(), p.a.clone(), p.bt.clone()))
            .collect();
        // The file's own config (ranks, alphas, targets) stays the output's.
        Self::with_pairs(lm, cfg, a.config().clone(), pairs)
    }

    fn with_pairs(
        lm: &'a LoadedModel,
        cfg: TrainConfig,
        acfg: AdapterConfig,
        pairs: Vec<(String, Tensor, Tensor)>,
    ) -> Result<Self> {
        if let Some(kind) = cfg.half_products() {
            let (key, flag, isa) = match kind {
                HalfProducts::Bf16 => ("bf16_matmul", "--bf16-matmul", "AVX512-BF16"),
                HalfProducts::F16 => ("f16_matmul", "--f16-matmul", "AVX512-FP16"),
            };
            let m = &lm.model;
            let why = if !m.device().is_cpu() || m.dtype() != DType::F32 {
                Some(format!(
                    "runs on the CPU over an f32 base, not {:?}",
                    m.dtype()
                ))
            } else if !crate::model::train_ops::linear::available(kind) {
                Some(format!("needs a CPU with {isa}, which this one lacks"))
            } else {
                None
            };
            if let Some(detail) = why {
                return Err(super::config::bad(key, format!("{detail}; drop {flag}")));
            }
        }
        let mut vars = Vec::new();
        let mut names = Vec::new();
        let mut modules = Vec::new();
        let mut tensors = Vec::new();
        for (m, a, bt) in pairs {
            let (a, bt) = (
                Var::from_tensor(&a.to_dtype(DType::F32)?)?,
                Var::from_tensor(&bt.to_dtype(DType::F32)?)?,
            );
            names.push(format!("base_model.model.{m}.lora_A.weight"));
            names.push(format!("base_model.model.{m}.lora_B.weight"));
            tensors.push((m.clone(), a.as_tensor().clone(), bt.as_tensor().clone()));
            modules.push(m);
            vars.push(a);
            vars.push(bt);
        }
        let adapter = Arc::new(LoraAdapter::from_pairs(
            "train",
            acfg,
            lm.model.slots(),
            tensors,
        )?);
        let opt = AdamW::new(
            &vars,
            AdamWParams {
                weight_decay: cfg.weight_decay,
                ..Default::default()
            },
        )?;
        Ok(Self {
            lm,
            cfg,
            vars,
            names,
            modules,
            adapter,
            opt,
            state: State::default(),
            resumed: None,
        })
    }

    /// The adapter being trained (its tensors are the variables).
    pub fn adapter(&self) -> &Arc<LoraAdapter> {
        &self.adapter
    }

    /// Trainable variables, `A` and `B^T` of each module in turn.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// Number of trainable parameters.
    pub fn trainable_params(&self) -> usize {
        self.vars.iter().map(|v| v.as_tensor().elem_count()).sum()
    }

    /// PEFT names of the variables (`…lora_A.weight`, `…lora_B.weight`; B's is transposed).
    pub fn var_names(&self) -> &[String] {
        &self.names
    }

    /// Summed negative log-likelihood of the batch's target tokens, and their count.
    fn batch_nll(
        &self,
        b: &Batch,
        train: bool,
        seed: u64,
    ) -> Result<(Tensor, usize, Option<Arc<GradSink>>)> {
        let model = &self.lm.model;
        let dev = model.device();
        let ids = Tensor::from_vec(b.ids.clone(), (b.rows, b.len), dev)?;
        let mut ad = BatchAdapters::uniform(Some(self.adapter.clone()))
            .with_half_base(self.cfg.half_products());
        let mut sink = None;
        if train {
            ad = ad
                .for_training()
                .with_dropout(self.cfg.dropout as f32, seed);
            // Fused and checkpointed layers deliver their variables' gradients on the side.
            let s = Arc::new(GradSink::default());
            ad = ad.with_grad_sink(s.clone());
            if self.cfg.grad_checkpointing {
                ad = ad.with_checkpointing();
            }
            sink = Some(s);
        }
        let h = model.forward_hidden_with(&ids, &mut model.new_cache(), &ad)?;
        // Position p predicts token p + 1: only target positions reach the output head.
        let (mut pos, mut tgt) = (Vec::new(), Vec::new());
        for r in 0..b.rows {
            for p in 0..b.len.saturating_sub(1) {
                if b.target[r * b.len + p + 1] {
                    pos.push((r * b.len + p) as u32);
                    tgt.push(b.ids[r * b.len + p + 1]);
                }
            }
        }
        let n = pos.len();
        if n == 0 {
            return Ok((Tensor::zeros((), DType::F32, dev)?, 0, None));
        }
        let hidden = h.dim(D::Minus1)?;
        let sel = h
            .reshape((b.rows * b.len, hidden))?
            .index_select(&Tensor::new(pos, dev)?, 0)?;
        if let Some(nll) = model.head_nll(&sel, &tgt, &ad, train)? {
            return Ok((nll.sum_all()?, n, sink));
        }
        let logits = model.logits(&sel, &ad)?;
        let nll = if dev.is_cpu() {
            super::loss::nll_rows(&logits, &tgt)?
        } else {
            let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            lsm.gather(&Tensor::new(tgt, dev)?.unsqueeze(1)?, 1)?
                .neg()?
        };
        Ok((nll.sum_all()?, n, sink))
    }

    /// Mean loss over the target tokens of `batches` and its gradient for every variable.
    pub fn loss_and_grads(&self, batches: &[Batch]) -> Result<(f64, Vec<Tensor>)> {
        let total: usize = batches
            .iter()
            .map(|b| b.target.iter().filter(|&&t| t).count())
            .sum();
        // A variable's first gradient is taken as it comes (a zero-filled start and a sum
        // were two passes over every variable a step).
        let mut grads: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        let add = |g: &mut Option<Tensor>, d: Tensor| -> Result<()> {
            *g = Some(match g.take() {
                Some(s) => (s + d)?,
                None => d,
            });
            Ok(())
        };
        let mut loss = 0f64;
        for (i, b) in batches.iter().enumerate() {
            // Dropout masks depend on (seed, step, micro-batch) only: resumable.
            let seed = self.cfg.seed ^ ((self.opt.step as u64) << 20) ^ i as u64;
            let (nll, n, sink) = self.batch_nll(b, true, seed)?;
            if n == 0 {
                continue;
            }
            let l = (nll / total.max(1) as f64)?;
            loss += l.to_scalar::<f32>()? as f64;
            let gs = l.backward()?;
            for (g, v) in grads.iter_mut().zip(&self.vars) {
                if let Some(d) = gs.get(v.as_tensor()) {
                    // Detached: a gradient still linked to this step's graph would keep every
                    // activation alive through the optimizer's moments, step after step.
                    add(g, d.detach())?;
                }
                // Fused and checkpointed layers deliver theirs on the side.
                if let Some(d) = sink.as_ref().and_then(|s| s.take(v.as_tensor())) {
                    add(g, d)?;
                }
            }
        }
        let grads = grads
            .into_iter()
            .zip(&self.vars)
            .map(|(g, v)| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?;
        Ok((loss, grads))
    }

    /// One optimizer step over `batches` (one per accumulation micro-step) at rate `lr`;
    /// returns the loss and the gradient norm before clipping.
    pub fn step(&mut self, batches: &[Batch], lr: f64) -> Result<(f64, f64)> {
        let (loss, mut grads) = self.loss_and_grads(batches)?;
        if !loss.is_finite() {
            return Err(TernError::InvalidArgument(format!("loss is {loss}")));
        }
        let norm = clip_grad_norm(&mut grads, self.cfg.max_grad_norm)?;
        if !norm.is_finite() {
            return Err(TernError::InvalidArgument(format!(
                "gradient norm is {norm}"
            )));
        }
        self.opt.step(&self.vars, &grads, lr)?;
        Ok((loss, norm))
    }

    /// Mean loss over the target tokens of `examples` (no gradients).
    pub fn eval_loss(&self, examples: &[Example]) -> Result<f64> {
        let (mut sum, mut n) = (0f64, 0usize);
        let pad_id = self.pad_id();
        for chunk in examples.chunks(self.cfg.batch_size) {
            let refs: Vec<&Example> = chunk.iter().collect();
            let (nll, k, _) = self.batch_nll(&pad(&refs, pad_id), false, 0)?;
            sum += nll.to_scalar::<f32>()? as f64;
            n += k;
        }
        Ok(sum / n.max(1) as f64)
    }

    fn pad_id(&self) -> u32 {
        self.lm.eos_ids.first().copied().unwrap_or(0)
    }

    /// Steps the run takes over `n` training examples.
    pub fn total_steps(&self, n: usize) -> usize {
        let per_epoch = n
            .div_ceil(self.cfg.batch_size)
            .div_ceil(self.cfg.grad_accum);
        self.cfg.max_steps.unwrap_or(per_epoch * self.cfg.epochs)
    }

    /// Trains on `train`, evaluating on `eval` (may be empty), writing the adapter, metrics
    /// and checkpoints under `out`; `on_step` sees every step.
    pub fn run(
        &mut self,
        train: &[Example],
        eval: &[Example],
        out: &Path,
        mut on_step: impl FnMut(&StepReport),
    ) -> Result<TrainReport> {
        self.check_resume(train)?;
        let settings = super::checkpoint::run_settings(&self.cfg, train);
        self.state.settings = Some(settings.into_iter().collect());
        std::fs::create_dir_all(out).map_err(|e| TernError::io(out, e))?;
        let metrics_path = out.join("metrics.jsonl");
        let mut metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(self.state.step > 0)
            .write(true)
            .truncate(self.state.step == 0)
            .open(&metrics_path)
            .map_err(|e| TernError::io(&metrics_path, e))?;
        let total = self.total_steps(train.len());
        let warmup = (self.cfg.warmup_ratio * total as f64).ceil() as usize;
        let (bs, accum) = (self.cfg.batch_size, self.cfg.grad_accum);
        let pad_id = self.pad_id();
        let t0 = Instant::now();
        let start_tokens = self.state.tokens;
        let mut last_loss = f64::NAN;
        let mut stopped_early = false;
        let eval_every = if eval.is_empty() {
            0
        } else {
            self.cfg.eval_every
        };
        let mut epoch = self.state.epoch;
        'outer: while self.state.step < total {
            // An epoch's order depends only on (seed, epoch): a resumed run sees the same.
            let order = epoch_batches(train, bs, self.cfg.seed.wrapping_add(epoch as u64));
            let skip = if epoch == self.state.epoch {
                self.state.batch
            } else {
                0
            };
            let groups: Vec<&[Vec<usize>]> = order[skip..].chunks(accum).collect();
            // Padding runs ahead on a worker thread, a few steps deep.
            let result: Result<bool> = std::thread::scope(|s| {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Batch>>(4);
                s.spawn(move || {
                    for g in groups {
                        let batches = g
                            .iter()
                            .map(|idx| {
                                pad(&idx.iter().map(|&i| &train[i]).collect::<Vec<_>>(), pad_id)
                            })
                            .collect();
                        if tx.send(batches).is_err() {
                            break;
                        }
                    }
                });
                for batches in rx {
                    if self.state.step >= total {
                        return Ok(true);
                    }
                    let ts = Instant::now();
                    let lr = lr_at(
                        self.cfg.lr,
                        self.cfg.lr_schedule,
                        warmup,
                        self.state.step,
                        total,
                    );
                    let (loss, norm) = self
                        .step(&batches, lr)
                        .map_err(|_| nan_error(self.state.step + 1, out))?;
                    let tokens: usize = batches.iter().map(|b| b.tokens).sum();
                    self.state.step += 1;
                    self.state.batch += batches.len();
                    self.state.tokens += tokens;
                    last_loss = loss;
                    let mut eval_loss = None;
                    let at_end = self.state.step == total;
                    if !eval.is_empty()
                        && ((eval_every > 0 && self.state.step.is_multiple_of(eval_every))
                            || at_end)
                    {
                        let e = self.eval_loss(eval)?;
                        eval_loss = Some(e);
                        if self.state.best_eval.is_none_or(|b| e < b) {
                            self.state.best_eval = Some(e);
                            self.state.bad_evals = 0;
                            self.adapter.save(out)?; // the best adapter is the output
                        } else {
                            self.state.bad_evals += 1;
                        }
                    }
                    let r = StepReport {
                        step: self.state.step,
                        total_steps: total,
                        epoch,
                        loss,
                        lr,
                        grad_norm: norm,
                        tokens_per_s: tokens as f64 / ts.elapsed().as_secs_f64(),
                        eval_loss,
                        elapsed_s: t0.elapsed().as_secs_f64(),
                    };
                    writeln!(metrics, "{}", serde_json::to_string(&r).expect("json"))
                        .map_err(|e| TernError::io(&metrics_path, e))?;
                    on_step(&r);
                    if self.cfg.save_every > 0
                        && self.state.step.is_multiple_of(self.cfg.save_every)
                    {
                        self.save_checkpoint(out)?;
                    }
                    let patience = self.cfg.early_stopping_patience;
                    if patience > 0 && self.state.bad_evals >= patience {
                        stopped_early = true;
                        return Ok(true);
                    }
                }
                Ok(false)
            });
            if result? {
                break 'outer;
            }
            epoch += 1;
            self.state.epoch = epoch;
            self.state.batch = 0;
        }
        if eval.is_empty() {
            self.adapter.save(out)?;
        }
        self.plot(out, &metrics_path)?;
        let elapsed = t0.elapsed().as_secs_f64();
        let tokens = self.state.tokens - start_tokens;
        Ok(TrainReport {
            steps: self.state.step,
            final_loss: last_loss,
            best_eval_loss: self.state.best_eval,
            stopped_early,
            tokens,
            elapsed_s: elapsed,
            tokens_per_s: tokens as f64 / elapsed.max(1e-9),
            out: out.to_path_buf(),
        })
    }
}

impl Trainer<'_> {
    /// `loss.png` from the run's metrics (all of them, across resumes).
    fn plot(&self, out: &Path, metrics: &Path) -> Result<()> {
        let text = std::fs::read_to_string(metrics).map_err(|e| TernError::io(metrics, e))?;
        let (mut loss, mut eval) = (Vec::new(), Vec::new());
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            loss.push(v["loss"].as_f64().unwrap_or(f64::NAN));
            if let Some(e) = v["eval_loss"].as_f64() {
                eval.push((loss.len(), e));
            }
        }
        super::plot::loss_png(&out.join("loss.png"), &loss, &eval)
    }
}

#[cfg(test)]
mod tests;
