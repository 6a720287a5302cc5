//! A whole run from a `TrainConfig`: load the base and the data, hold out eval examples,
//! resume if asked, train, and report. What `tern train` calls.

use super::checkpoint::checkpoints;
use super::config::TrainConfig;
use super::data::{load_jsonl, pack, Example};
use super::trainer::{StepReport, TrainReport, Trainer};
use crate::checkpoint::hub::{resolve, HubOptions, RepoKind};
use crate::error::{Result, TernError};
use crate::lora::adapter::{CONFIG_FILE, WEIGHTS_FILE};
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
        if train.len() < 2 {
            return Err(TernError::Config {
                file: data.into(),
                key: "eval_split".into(),
                detail: format!(
                    "holding out eval examples needs at least 2 examples, this file has {} usable; drop eval_split or pass eval_data",
                    train.len()
                ),
            });
        }
        train.shuffle(&mut StdRng::seed_from_u64(cfg.seed ^ 0x5eed));
        let n = ((train.len() as f64 * cfg.eval_split).round() as usize).clamp(1, train.len() - 1);
        eval = train.split_off(train.len() - n);
    }
    if cfg.packing {
        train = pack(&train, cfg.max_seq_len);
    }
    Ok((train, eval))
}

/// Refuses an `out` that holds files unless this run continues there (`resume`) or replaces
/// the earlier run's outputs (`force`): otherwise two runs would mix their adapter, metrics
/// and checkpoints, and pruning would delete the wrong run's.
fn check_out(out: &Path, resume: bool, force: bool) -> Result<()> {
    let bad = |detail: &str| TernError::Config {
        file: out.to_path_buf(),
        key: "out".into(),
        detail: detail.into(),
    };
    if resume && force {
        return Err(bad(
            "--force starts a new run and --resume continues one; pass only one",
        ));
    }
    if out.exists() && !out.is_dir() {
        return Err(bad("is a file, not a directory; pass another --out"));
    }
    let occupied = out.is_dir()
        && std::fs::read_dir(out)
            .map_err(|e| TernError::io(out, e))?
            .next()
            .is_some();
    if occupied && !resume && !force {
        return Err(bad("already holds files (an earlier run?); pass --resume latest to continue it, --force to replace its outputs, or another --out"));
    }
    Ok(())
}

/// Removes an earlier run's outputs from `out`: its checkpoints, metrics, adapter and loss
/// plot, and nothing else that may live there.
fn clear_outputs(out: &Path) -> Result<()> {
    for (_, dir) in checkpoints(out) {
        std::fs::remove_dir_all(&dir).map_err(|e| TernError::io(&dir, e))?;
    }
    for f in [CONFIG_FILE, WEIGHTS_FILE, "metrics.jsonl", "loss.png"] {
        let p = out.join(f);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(TernError::io(&p, e)),
            _ => {}
        }
    }
    Ok(())
}

/// Runs training as configured; `resume` is a checkpoint directory or `latest` (the newest
/// under `out`); `force` replaces an earlier run's outputs in `out`, which otherwise must
/// be empty when not resuming.
pub fn run(
    cfg: &TrainConfig,
    resume: Option<&str>,
    force: bool,
    on_start: impl FnOnce(&LoadedModel, &Trainer, usize, usize),
    on_step: impl FnMut(&StepReport),
) -> Result<TrainReport> {
    cfg.validate()?;
    let model = need(&cfg.model, "model", "pass --model PATH or a Hub id")?;
    let out = PathBuf::from(need(&cfg.out, "out", "pass --out DIR for the adapter")?);
    check_out(&out, resume.is_some(), force)?;
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
    t.check_resume(&train)?;
    if force {
        clear_outputs(&out)?;
    }
    on_start(&lm, &t, train.len(), eval.len());
    t.run(&train, &eval, &out, on_step)
}
