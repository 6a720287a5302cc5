//! Checkpoints of a training run: the adapter, AdamW's moments and where in the data the run
//! was, written every `save_every` steps (oldest pruned) and read back by `--resume` so the
//! continued run is the same as an uninterrupted one.

use super::trainer::{State, Trainer};
use crate::checkpoint::safetensors::TensorFile;
use crate::checkpoint::writer::{write_atomic, write_bytes_atomic};
use crate::error::{Result, TernError};
use crate::lora::LoraAdapter;
use candle_core::{DType, Tensor};
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
        Ok(())
    }
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
