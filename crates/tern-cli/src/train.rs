//! `tern train`: flags (or a YAML config) to `tern::train::run::run`, with a progress bar.

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::path::PathBuf;
use tern::train::TrainConfig;

/// Arguments of `tern train`: every key of the YAML config as a flag of the same name.
#[derive(Args, Debug, Serialize)]
pub struct TrainArgs {
    /// YAML file of settings; flags override it.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Continue from a checkpoint directory, or `latest` under --out.
    #[arg(long)]
    #[serde(skip)]
    pub resume: Option<String>,
    /// Start over in an --out that holds an earlier run: its checkpoints, metrics, adapter and
    /// loss.png are removed (other files are left alone).
    #[arg(long)]
    #[serde(skip)]
    pub force: bool,
    /// Base model: directory, .gguf file or Hub id.
    #[arg(long)]
    pub model: Option<String>,
    /// Training data (jsonl: text, prompt/completion, messages or alpaca lines).
    #[arg(long)]
    pub data: Option<String>,
    /// Output directory (adapter, metrics.jsonl, checkpoints).
    #[arg(long)]
    pub out: Option<String>,
    /// Peak learning rate [2e-4].
    #[arg(long, allow_hyphen_values = true)]
    pub lr: Option<f64>,
    /// Passes over the data [1].
    #[arg(long, allow_negative_numbers = true)]
    pub epochs: Option<usize>,
    /// Stop after this many optimizer steps.
    #[arg(long, allow_negative_numbers = true)]
    pub max_steps: Option<usize>,
    /// Sequences per micro-batch [4].
    #[arg(long, allow_negative_numbers = true)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step [1].
    #[arg(long, allow_negative_numbers = true)]
    pub grad_accum: Option<usize>,
    /// LoRA rank [16].
    #[arg(long, allow_negative_numbers = true)]
    pub rank: Option<usize>,
    /// LoRA alpha [32].
    #[arg(long, allow_hyphen_values = true)]
    pub alpha: Option<f64>,
    /// LoRA dropout [0].
    #[arg(long, allow_hyphen_values = true)]
    pub dropout: Option<f64>,
    /// Modules to adapt: `all-linear`, names (`q_proj` or `q_proj,v_proj`), or a regex over
    /// whole module names (`.*\.(q|v)_proj`) [all-linear].
    #[arg(long)]
    #[serde(skip)]
    pub target_modules: Option<String>,
    /// Scale by alpha / sqrt(rank).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub use_rslora: Option<bool>,
    /// Truncate longer examples [512].
    #[arg(long, allow_negative_numbers = true)]
    pub max_seq_len: Option<usize>,
    /// Share of steps warming up [0].
    #[arg(long, allow_hyphen_values = true)]
    pub warmup_ratio: Option<f64>,
    /// cosine, linear or constant [cosine].
    #[arg(long)]
    pub lr_schedule: Option<String>,
    /// AdamW decoupled weight decay [0].
    #[arg(long, allow_hyphen_values = true)]
    pub weight_decay: Option<f64>,
    /// Clip the global gradient norm (0 = off) [1].
    #[arg(long, allow_hyphen_values = true)]
    pub max_grad_norm: Option<f64>,
    /// Held-out jsonl for eval loss.
    #[arg(long)]
    pub eval_data: Option<String>,
    /// Share of --data held out for eval [0].
    #[arg(long, allow_hyphen_values = true)]
    pub eval_split: Option<f64>,
    /// Evaluate every N steps (0 = at the end).
    #[arg(long, allow_negative_numbers = true)]
    pub eval_every: Option<usize>,
    /// Stop after N evals without improvement (0 = never).
    #[arg(long, allow_negative_numbers = true)]
    pub early_stopping_patience: Option<usize>,
    /// Checkpoint every N steps (0 = none).
    #[arg(long, allow_negative_numbers = true)]
    pub save_every: Option<usize>,
    /// Checkpoints kept [2].
    #[arg(long, allow_negative_numbers = true)]
    pub keep_checkpoints: Option<usize>,
    /// Seed [42].
    #[arg(long, allow_negative_numbers = true)]
    pub seed: Option<u64>,
    /// Compute dtype of the frozen base (f32, bf16, f16).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Quantize the frozen base while loading (QLoRA): q8_0, q4_k, q4_0, q4_1, q5_0, or bf16 / f16
    /// (stored at half width, computed in f32).
    #[arg(long, value_name = "TYPE")]
    pub quantize: Option<String>,
    /// Recompute activations in backward to save memory.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub grad_checkpointing: Option<bool>,
    /// The frozen base's products in bf16 (CPUs with AVX512-BF16).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub bf16_matmul: Option<bool>,
    /// The frozen base's products in fp16 (CPUs with AVX512-FP16).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub f16_matmul: Option<bool>,
    /// Pack short examples together.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub packing: Option<bool>,
    /// Loss on prompt tokens too.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub train_on_prompt: Option<bool>,
}

/// Runs `tern train`.
pub fn run(a: TrainArgs) -> Result<()> {
    // JSON has no NaN or infinity: serialising would turn them into "not given", the default.
    for (flag, v) in [
        ("--lr", a.lr),
        ("--alpha", a.alpha),
        ("--dropout", a.dropout),
        ("--warmup-ratio", a.warmup_ratio),
        ("--weight-decay", a.weight_decay),
        ("--max-grad-norm", a.max_grad_norm),
        ("--eval-split", a.eval_split),
    ] {
        if let Some(v) = v.filter(|v| !v.is_finite()) {
            bail!("{flag} {v}: must be a finite number");
        }
    }
    let mut flags = serde_json::to_value(&a)?;
    if let Some(t) = &a.target_modules {
        // A plain name is that module (PEFT would read a lone string as a regex over whole
        // names, which `q_proj` never matches); regex syntax keeps the regex.
        let is_regex = t.contains([
            '\\', '^', '$', '*', '+', '?', '(', ')', '[', ']', '{', '}', '|',
        ]);
        let v = if t == "all-linear" || is_regex {
            serde_json::json!(t)
        } else {
            serde_json::json!(t.split(',').map(str::trim).collect::<Vec<_>>())
        };
        flags["target_modules"] = v;
    }
    let cfg = TrainConfig::load(a.config.as_deref(), flags)?;
    let bar = ProgressBar::hidden();
    let report = tern::train::run::run(
        &cfg,
        a.resume.as_deref(),
        a.force,
        |lm, t, n_train, n_eval| {
            let total = t.total_steps(n_train);
            eprintln!(
                "training a rank-{} LoRA ({} parameters) on {}: {}, {n_eval} for eval, {}",
                cfg.rank,
                t.trainable_params(),
                lm.source.display(),
                count(n_train, "example"),
                count(total, "step"),
            );
            bar.set_length(total as u64);
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
                )
                .expect("static template"),
            );
        },
        |r| {
            let eval = r
                .eval_loss
                .map(|e| format!(" eval {e:.4}"))
                .unwrap_or_default();
            bar.set_position(r.step as u64);
            bar.set_message(format!(
                "loss {:.4}{eval} lr {:.2e} {:.0} tok/s",
                r.loss, r.lr, r.tokens_per_s
            ));
        },
    )
    .context("training")?;
    bar.finish();
    println!(
        "{} steps, final loss {:.4}{}{}, {:.0} tok/s; adapter in {}",
        report.steps,
        report.final_loss,
        report
            .best_eval_loss
            .map(|e| format!(", best eval {e:.4}"))
            .unwrap_or_default(),
        if report.stopped_early {
            " (stopped early)"
        } else {
            ""
        },
        report.tokens_per_s,
        report.out.display()
    );
    Ok(())
}

/// `1 step`, `2 steps`.
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}
