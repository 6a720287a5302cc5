//! A whole run from a `TrainConfig`: load the base and the data, hold out eval examples,
//! resume if asked, train, and report. What `tern train` calls.

use super::checkpoint::checkpoints;
use super::config::TrainConfig;
use super::data::{load_jsonl, pack, Example};
use super::trainer::{StepReport, TrainReport, Trainer};
use crate::checkpoint::hub::{resolve, HubOptions, RepoKind};
use crate::error::{Result, TernError};
use crate::model::{LoadOptions, LoadedModel};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::{Path, PathBuf};

fn need<'c>(v: &'c Option<String>, key: &str, hint: &str) -> Result<&'c str> {
    v.as_deref().ok_or_else(|| TernError::Config {
        file: "train config".into(),
        key: key.into(),
        detail: format!("missing: {hint}"),
    })
}

/// Training and eval examples as the config asks (split, packing).
pub fn datasets(cfg: &TrainConfig, lm: &LoadedModel) -> Result<(Vec<Example>, Vec<Example>)> {
    let data = need(&cfg.data, "data", "pass --data FILE.jsonl")?;
    let mut train = load_jsonl(Path::new(data), lm, cfg.max_seq_len, cfg.train_on_prompt)?;
    let mut eval = match &cfg.eval_data {
        Some(p) => load_jsonl(Path::new(p), lm, cfg.max_seq_len, cfg.train_on_prompt)?,
        None => vec![],
    };
    if eval.is_empty() && cfg.eval_split > 0.0 {
        train.shuffle(&mut StdRng::seed_from_u64(cfg.seed ^ 0x5eed));
        let n = ((train.len() as f64 * cfg.eval_split).round() as usize).clamp(1, train.len() - 1);
        eval = train.split_off(train.len() - n);
    }
    if cfg.packing {
        train = pack(&train, cfg.max_seq_len);
    }
    Ok((train, eval))
}

/// Runs training as configured; `resume` is a checkpoint directory or `latest` (the newest
/// under `out`).
pub fn run(
    cfg: &TrainConfig,
    resume: Option<&str>,
    on_start: impl FnOnce(&LoadedModel, &Trainer, usize, usize),
    on_step: impl FnMut(&StepReport),
) -> Result<TrainReport> {
    let model = need(&cfg.model, "model", "pass --model PATH or a Hub id")?;
    let out = PathBuf::from(need(&cfg.out, "out", "pass --out DIR for the adapter")?);
    let path = resolve(model, RepoKind::Model, &HubOptions::from_env())?;
    let dtype = cfg
        .dtype
        .as_deref()
        .map(crate::device::parse_dtype)
        .transpose()?;
    let lm = LoadedModel::load(
        &path,
        &LoadOptions {
            dtype,
            quantize: cfg.quantize.as_deref().map(str::parse).transpose()?,
            ..Default::default()
        },
    )?;
    let (train, eval) = datasets(cfg, &lm)?;
    let mut t = Trainer::new(&lm, cfg.clone())?;
    if let Some(r) = resume {
        let dir = if r == "latest" {
            checkpoints(&out)
                .pop()
                .map(|(_, d)| d)
                .ok_or_else(|| TernError::MissingFile {
                    path: out.join("checkpoint-*"),
                    hint:
                        "--resume latest needs a checkpoint from an earlier run with --save-every"
                            .into(),
                })?
        } else {
            PathBuf::from(r)
        };
        t.resume_from(&dir)?;
    }
    on_start(&lm, &t, train.len(), eval.len());
    t.run(&train, &eval, &out, on_step)
}
