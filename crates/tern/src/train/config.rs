//! `TrainConfig`: every setting of a LoRA training run, read from YAML and/or flags of the
//! same names (flags win). Unknown keys and bad values are refused with the valid choices.

use crate::error::{Result, TernError};
use crate::lora::{AdapterConfig, Targets};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Half a cosine down to zero.
    Cosine,
    /// Straight down to zero.
    Linear,
    /// Flat.
    Constant,
}

/// `target_modules`: a list of names, or one string (`all-linear` or a regex).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Names or name suffixes.
    List(Vec<String>),
    /// `all-linear`, or a regex over full module names.
    One(String),
}

/// Every setting of a training run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Base model: directory, .gguf file or Hub id.
    pub model: Option<String>,
    /// Training data, jsonl.
    pub data: Option<String>,
    /// Output directory for the adapter, metrics and checkpoints.
    pub out: Option<String>,
    /// Peak learning rate.
    pub lr: f64,
    /// Passes over the data.
    pub epochs: usize,
    /// Stop after this many optimizer steps (overrides epochs).
    pub max_steps: Option<usize>,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// LoRA rank.
    pub rank: usize,
    /// LoRA alpha.
    pub alpha: f64,
    /// LoRA dropout on the adapter's input.
    pub dropout: f64,
    /// Modules to adapt.
    pub target_modules: TargetModules,
    /// Scale by alpha / sqrt(rank).
    pub use_rslora: bool,
    /// Longer examples are truncated.
    pub max_seq_len: usize,
    /// Share of steps spent warming up linearly from 0.
    pub warmup_ratio: f64,
    /// Schedule after warmup.
    pub lr_schedule: Schedule,
    /// AdamW's decoupled weight decay.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = off).
    pub max_grad_norm: f64,
    /// Held-out jsonl for eval loss.
    pub eval_data: Option<String>,
    /// Share of the training data held out for eval when there is no eval_data.
    pub eval_split: f64,
    /// Evaluate every N optimizer steps (0 = at the end only, when there is eval data).
    pub eval_every: usize,
    /// Stop after this many evals without improvement (0 = never).
    pub early_stopping_patience: usize,
    /// Save a checkpoint every N optimizer steps (0 = only at the end).
    pub save_every: usize,
    /// Checkpoints kept on disk (oldest deleted first).
    pub keep_checkpoints: usize,
    /// Seed for initialisation, shuffling and dropout.
    pub seed: u64,
    /// Compute dtype of the frozen base (adapters train in f32).
    pub dtype: Option<String>,
    /// Quantize the frozen base's linear layers while loading (QLoRA): gradients flow through
    /// the dequantized weights to the input, never into them.
    pub quantize: Option<String>,
    /// Recompute each layer's activations in backward to save memory.
    pub grad_checkpointing: bool,
    /// The frozen base's matrix products in bf16 (f32 sums) on a CPU with AVX512-BF16, as
    /// torch's bf16 autocast; activations, attention, the loss and the adapter stay f32.
    pub bf16_matmul: bool,
    /// The frozen base's matrix products in fp16 on a CPU with AVX512-FP16 (fp16 sums of at
    /// most 128 products, added in f32): twice the f32 FMA's work per cycle where that unit
    /// runs at the f32 rate; activations, attention, the loss and the adapter stay f32.
    pub f16_matmul: bool,
    /// Pack several short examples into one sequence.
    pub packing: bool,
    /// Loss on every token instead of only completions / assistant turns.
    pub train_on_prompt: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: None,
            data: None,
            out: None,
            lr: 2e-4,
            epochs: 1,
            max_steps: None,
            batch_size: 4,
            grad_accum: 1,
            rank: 16,
            alpha: 32.0,
            dropout: 0.0,
            target_modules: TargetModules::One("all-linear".into()),
            use_rslora: false,
            max_seq_len: 512,
            warmup_ratio: 0.0,
            lr_schedule: Schedule::Cosine,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            eval_data: None,
            eval_split: 0.0,
            eval_every: 0,
            early_stopping_patience: 0,
            save_every: 0,
            keep_checkpoints: 2,
            seed: 42,
            dtype: None,
            quantize: None,
            grad_checkpointing: false,
            bf16_matmul: false,
            f16_matmul: false,
            packing: false,
            train_on_prompt: false,
        }
    }
}

/// A bad value for `key` of the train config.
pub(super) fn bad(key: &str, detail: String) -> TernError {
    TernError::Config {
        file: "train config".into(),
        key: key.into(),
        detail,
    }
}

impl TrainConfig {
    /// The settings of `file` (YAML) with `overrides` (a JSON object of flags) on top.
    pub fn load(file: Option<&Path>, overrides: serde_json::Value) -> Result<Self> {
        let mut map = serde_json::Map::new();
        if let Some(f) = file {
            let text = std::fs::read_to_string(f).map_err(|e| TernError::io(f, e))?;
            let opts = serde_saphyr::options! { with_snippet: false };
            let v: serde_json::Value =
                serde_saphyr::from_str_with_options(&text, opts).map_err(|e| {
                    TernError::Config {
                        file: f.to_path_buf(),
                        key: "(file)".into(),
                        detail: one_line(&e.to_string()),
                    }
                })?;
            match v {
                serde_json::Value::Object(m) => map = m,
                serde_json::Value::Null => {}
                _ => {
                    return Err(bad(
                        "(file)",
                        format!("{} must be a YAML mapping of key: value", f.display()),
                    ))
                }
            }
        }
        if let serde_json::Value::Object(o) = overrides {
            map.extend(o.into_iter().filter(|(_, v)| !v.is_null()));
        }
        let cfg: Self = serde_json::from_value(serde_json::Value::Object(map)).map_err(|e| {
            TernError::Config {
                file: file.map_or_else(|| "flags".into(), Path::to_path_buf),
                key: "(config)".into(),
                detail: one_line(&e.to_string()),
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The half width the frozen base's products run at (`None`: f32); bf16 wins if both are
    /// set, which [`TrainConfig::validate`] refuses.
    pub fn half_products(&self) -> Option<crate::lora::HalfProducts> {
        use crate::lora::HalfProducts;
        (self.bf16_matmul.then_some(HalfProducts::Bf16))
            .or(self.f16_matmul.then_some(HalfProducts::F16))
    }

    /// Checks ranges; errors name the key and what is allowed.
    pub fn validate(&self) -> Result<()> {
        if self.bf16_matmul && self.f16_matmul {
            return Err(bad(
                "f16_matmul",
                "bf16_matmul is on too; pick one of --bf16-matmul and --f16-matmul".into(),
            ));
        }
        let pos = |k: &str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(bad(k, format!("must be > 0, got {v}")))
            }
        };
        let unit = |k: &str, v: f64, hi_open: bool| {
            let ok = v >= 0.0 && if hi_open { v < 1.0 } else { v <= 1.0 };
            if ok {
                Ok(())
            } else {
                Err(bad(
                    k,
                    format!(
                        "must be in [0, 1{}, got {v}",
                        if hi_open { ")" } else { "]" }
                    ),
                ))
            }
        };
        pos("lr", self.lr)?;
        pos("alpha", self.alpha)?;
        for (k, v) in [
            ("epochs", self.epochs),
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("rank", self.rank),
            ("max_seq_len", self.max_seq_len),
        ] {
            if v == 0 {
                return Err(bad(k, "must be at least 1".into()));
            }
        }
        if self.max_steps == Some(0) {
            return Err(bad("max_steps", "must be at least 1 when given".into()));
        }
        unit("dropout", self.dropout, true)?;
        unit("warmup_ratio", self.warmup_ratio, false)?;
        unit("eval_split", self.eval_split, true)?;
        for (k, v) in [
            ("weight_decay", self.weight_decay),
            ("max_grad_norm", self.max_grad_norm),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(bad(
                    k,
                    format!("must be a finite number, not negative, got {v}"),
                ));
            }
        }
        for (k, v) in [
            ("model", &self.model),
            ("data", &self.data),
            ("out", &self.out),
            ("eval_data", &self.eval_data),
        ] {
            // An empty path is the current directory to the OS: never what was meant.
            if v.as_deref().is_some_and(|p| p.trim().is_empty()) {
                return Err(bad(k, "is empty; give a path".into()));
            }
        }
        if let Some(d) = &self.dtype {
            crate::device::parse_dtype(d)?;
        }
        if let Some(q) = &self.quantize {
            q.parse::<crate::quant::QuantType>()?;
        }
        self.adapter_config()?;
        Ok(())
    }

    /// The PEFT config of the adapter this run trains.
    pub fn adapter_config(&self) -> Result<AdapterConfig> {
        let targets = match &self.target_modules {
            TargetModules::One(s) if s == "all-linear" => Targets::AllLinear,
            TargetModules::One(s) => {
                Targets::Regex(regex::Regex::new(&format!("^(?:{s})$")).map_err(|e| {
                    bad(
                        "target_modules",
                        format!("not `all-linear`, a list of names, or a valid regex: {e}"),
                    )
                })?)
            }
            TargetModules::List(l) if l.is_empty() => {
                return Err(bad(
                    "target_modules",
                    "must name at least one module (or be `all-linear`)".into(),
                ))
            }
            TargetModules::List(l) => Targets::List(l.clone()),
        };
        let mut c = AdapterConfig::new(self.rank, self.alpha, targets).with_rslora(self.use_rslora);
        if let Some(m) = &self.model {
            c = c.with_base_model(m);
        }
        Ok(c.with_dropout(self.dropout))
    }
}

/// The first line of a multi-line parser message, for one-line errors.
fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn flags_override_the_file_and_bad_input_names_the_choices() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("c.yaml");
        std::fs::write(
            &f,
            "lr: 1.0e-3\nrank: 8\ntarget_modules: [q_proj, v_proj]\nlr_schedule: linear\n",
        )
        .unwrap();
        let c = TrainConfig::load(Some(&f), json!({"rank": 4, "epochs": null})).unwrap();
        assert_eq!(
            (c.lr, c.rank, c.lr_schedule, c.epochs),
            (1e-3, 4, Schedule::Linear, 1)
        );
        assert_eq!(
            c.target_modules,
            TargetModules::List(vec!["q_proj".into(), "v_proj".into()])
        );

        std::fs::write(&f, "lr: 1.0e-3\nrnak: 8\n").unwrap();
        let e = TrainConfig::load(Some(&f), json!({}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown field `rnak`") && e.contains("rank") && !e.contains('\n'),
            "{e}"
        );
        let e = TrainConfig::load(None, json!({"lr_schedule": "step"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cosine") && e.contains("constant"), "{e}");
        let e = TrainConfig::load(None, json!({"dropout": 1.5}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("dropout") && e.contains("[0, 1)"), "{e}");
        let e = TrainConfig::load(None, json!({"batch_size": 0}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("batch_size"), "{e}");
    }
}
