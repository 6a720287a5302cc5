//! Checkpoints of a training run: the adapter, AdamW's moments and where in the data the run
//! was, written every `save_every` steps (oldest pruned) and read back by `--resume` so the
//! continued run is the same as an uninterrupted one.

use super::config::TrainConfig;
use super::data::Example;
use super::trainer::{State, Trainer};
use crate::checkpoint::safetensors::TensorFile;
use crate::checkpoint::writer::{write_atomic, write_bytes_atomic};
use crate::error::{Result, TernError};
use crate::lora::LoraAdapter;
use candle_core::{DType, Tensor};
use serde_json::Value;
use std::path::{Path, PathBuf};

impl Trainer<'_> {
    pub(super) fn save_checkpoint(&self, out: &Path) -> Result<PathBuf> {
        let dir = out.join(format!("checkpoint-{}", self.state.step));
        self.adapter.save(&dir)?;
        let mut t: Vec<(String, Tensor)> = Vec::new();
        for (i, n) in self.names.iter().enumerate() {
            t.push((format!("m.{n}"), self.opt.m[i].clone()));
            t.push((format!("v.{n}"), self.opt.v[i].clone()));
        }
        write_atomic(&dir.join("optimizer.safetensors"), &t)?;
        let st = serde_json::to_string_pretty(&(&self.state, self.opt.step)).expect("json");
        write_bytes_atomic(&dir.join("trainer_state.json"), st.as_bytes())?;
        // Keep only the newest `keep_checkpoints`.
        let mut all = checkpoints(out);
        while all.len() > self.cfg.keep_checkpoints.max(1) {
            let (_, old) = all.remove(0);
            let _ = std::fs::remove_dir_all(old);
        }
        Ok(dir)
    }

    /// Continues from a checkpoint directory written by this trainer.
    pub fn resume_from(&mut self, dir: &Path) -> Result<()> {
        let bad = |d: String| TernError::Config {
            file: dir.to_path_buf(),
            key: "resume".into(),
            detail: d,
        };
        let text = std::fs::read_to_string(dir.join("trainer_state.json"))
            .map_err(|e| TernError::io(dir.join("trainer_state.json"), e))?;
        let (state, opt_step): (State, usize) =
            serde_json::from_str(&text).map_err(|e| bad(format!("trainer_state.json: {e}")))?;
        let a = LoraAdapter::load(
            dir,
            "resume",
            self.lm.model.slots(),
            DType::F32,
            self.lm.model.device(),
        )?;
        let opt = TensorFile::open(&dir.join("optimizer.safetensors"))?;
        let dev = self.lm.model.device();
        for (i, n) in self.names.iter().enumerate() {
            let module = &self.modules[i / 2];
            let slot = self
                .lm
                .model
                .slots()
                .get(module)
                .ok_or_else(|| bad(format!("no module {module}")))?;
            let p = a.pair(slot).ok_or_else(|| bad(format!("the checkpoint has no weights for {module}; it was made with other target_modules")))?;
            let src = if i % 2 == 0 { &p.a } else { &p.bt };
            if src.dims() != self.vars[i].as_tensor().dims() {
                return Err(bad(format!(
                    "{n}: shape {:?} differs from this run's {:?} (other rank?)",
                    src.dims(),
                    self.vars[i].as_tensor().dims()
                )));
            }
            self.vars[i].set(src)?;
            self.opt.m[i] = opt.tensor(&format!("m.{n}"), DType::F32, dev)?;
            self.opt.v[i] = opt.tensor(&format!("v.{n}"), DType::F32, dev)?;
        }
        self.opt.step = opt_step;
        self.state = state;
        self.resumed = Some(dir.to_path_buf());
        Ok(())
    }

    /// Refuses to continue the checkpoint resumed from over `train` when that would not be
    /// the run it came from (other settings or data) or has nothing left to train; a fresh
    /// run passes. Checked before anything is written.
    pub fn check_resume(&self, train: &[Example]) -> Result<()> {
        let Some(dir) = &self.resumed else {
            return Ok(());
        };
        let bad = |key: &str, detail: String| TernError::Config {
            file: dir.clone(),
            key: key.into(),
            detail,
        };
        let again = "resume with the same settings, or start a new run (--force, or another --out)";
        if let Some(old) = &self.state.settings {
            for (key, now) in run_settings(&self.cfg, train) {
                match old.get(&key) {
                    Some(was) if *was != now => {
                        let what = match key.as_str() {
                            "data" => "other tokenized training data (the same file, max_seq_len, packing, train_on_prompt and eval_split are needed)".to_string(),
                            "examples" => format!("{was} training examples, this run's data has {now}"),
                            _ => format!("{was}, this run has {now}"),
                        };
                        return Err(bad(
                            &key,
                            format!("the checkpoint was made with {what}; {again}"),
                        ));
                    }
                    // Older checkpoints lack some settings: nothing to compare.
                    _ => {}
                }
            }
        }
        let (step, total) = (self.state.step, self.total_steps(train.len()));
        if step >= total {
            let (limit, raise) = match self.cfg.max_steps {
                Some(m) => (format!("--max-steps {m}"), "--max-steps"),
                None => (
                    format!("its {total} steps of --epochs {}", self.cfg.epochs),
                    "--epochs or pass --max-steps",
                ),
            };
            return Err(TernError::InvalidArgument(format!(
                "{}: checkpoint at step {step} has already reached {limit} (raise {raise} to train further)",
                dir.display()
            )));
        }
        let per_epoch = train.len().div_ceil(self.cfg.batch_size);
        if self.state.batch > per_epoch {
            return Err(bad(
                "resume",
                format!(
                    "the checkpoint is {} batches into epoch {}, but this data has {per_epoch} batches an epoch: it was made with other data or batch settings; {again}",
                    self.state.batch, self.state.epoch
                ),
            ));
        }
        Ok(())
    }
}

/// The settings a resumed run must share with its checkpoint to give the uninterrupted run's
/// result: what orders the data (seed, batches, the tokenized examples themselves) and what
/// shapes each update. Step limits may change: raising them is how a run is extended.
pub(super) fn run_settings(cfg: &TrainConfig, train: &[Example]) -> Vec<(String, Value)> {
    let all = serde_json::to_value(cfg).expect("config serializes");
    let mut v: Vec<(String, Value)> = ["seed", "batch_size", "grad_accum"]
        .iter()
        .map(|&k| (k.to_string(), all[k].clone()))
        .collect();
    v.push(("examples".into(), train.len().into()));
    v.push(("data".into(), fingerprint(train).into()));
    for k in [
        "lr",
        "lr_schedule",
        "warmup_ratio",
        "weight_decay",
        "max_grad_norm",
        "dropout",
        "rank",
        "alpha",
        "use_rslora",
        "target_modules",
    ] {
        v.push((k.to_string(), all[k].clone()));
    }
    v
}

/// FNV-1a over the examples' lengths, ids and target flags: stable across builds and
/// platforms, unlike std's hasher, and cheap next to one training step.
fn fingerprint(train: &[Example]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |x: u64| {
        for b in x.to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    for e in train {
        eat(e.ids.len() as u64);
        for (&id, &t) in e.ids.iter().zip(&e.target) {
            eat(u64::from(id) << 1 | u64::from(t));
        }
    }
    format!("{h:016x}")
}

/// Checkpoint directories under `out`, oldest first.
pub fn checkpoints(out: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().to_string();
            n.strip_prefix("checkpoint-")?
                .parse()
                .ok()
                .map(|s| (s, e.path()))
        })
        .collect();
    v.sort();
    v
}
