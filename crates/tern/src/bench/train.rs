//! `tern bench train`: LoRA training throughput and peak memory for a fixed recipe (rank 16
//! on every linear layer, batch 4 of 128-token sequences, AdamW), on synthetic text so it
//! needs no dataset.

use crate::error::Result;
use crate::model::{LoadOptions, LoadedModel};
use crate::train::data::{pad, Example};
use crate::train::{TrainConfig, Trainer};
use std::path::Path;
use std::time::Instant;

/// Settings of the training benchmark.
#[derive(Debug, Clone)]
pub struct TrainBenchOptions {
    /// LoRA rank.
    pub rank: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Timed optimizer steps (after one warm-up step).
    pub steps: usize,
    /// Recompute layers in backward.
    pub grad_checkpointing: bool,
    /// The frozen base's products in bf16.
    pub bf16_matmul: bool,
    /// The frozen base's products in fp16.
    pub f16_matmul: bool,
}

impl Default for TrainBenchOptions {
    fn default() -> Self {
        Self {
            rank: 16,
            batch: 4,
            seq_len: 128,
            steps: 3,
            grad_checkpointing: false,
            bf16_matmul: false,
            f16_matmul: false,
        }
    }
}

/// Results, measured in this process.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainBench {
    /// Checkpoint path.
    pub model: String,
    /// LoRA rank.
    pub rank: usize,
    /// Trainable parameters.
    pub trainable_params: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Whether layers were recomputed in backward.
    pub grad_checkpointing: bool,
    /// Whether the frozen base's products ran in bf16.
    pub bf16_matmul: bool,
    /// Whether the frozen base's products ran in fp16.
    pub f16_matmul: bool,
    /// Training tokens per second (forward, backward and optimizer).
    pub tokens_per_s: f64,
    /// Seconds per optimizer step.
    pub step_s: f64,
    /// Peak resident memory, MB.
    pub peak_rss_mb: f64,
}

/// Runs the training benchmark.
pub fn run(path: &Path, load: &LoadOptions, o: &TrainBenchOptions) -> Result<TrainBench> {
    let lm = LoadedModel::load(path, load)?;
    let text = "The quick brown fox jumps over the lazy dog while the river runs to the sea. "
        .repeat(o.seq_len);
    let mut ids = lm.tokenizer.encode(&text, false)?;
    ids.truncate(o.seq_len);
    let mut target = vec![true; ids.len()];
    target[0] = false;
    let ex = Example { ids, target };
    let batch = pad(&vec![&ex; o.batch], 0);
    let cfg = TrainConfig {
        rank: o.rank,
        alpha: 2.0 * o.rank as f64,
        grad_checkpointing: o.grad_checkpointing,
        bf16_matmul: o.bf16_matmul,
        f16_matmul: o.f16_matmul,
        ..Default::default()
    };
    let mut t = Trainer::new(&lm, cfg)?;
    t.step(std::slice::from_ref(&batch), 1e-4)?; // warm-up
    let start = Instant::now();
    for _ in 0..o.steps.max(1) {
        t.step(std::slice::from_ref(&batch), 1e-4)?;
    }
    let step_s = start.elapsed().as_secs_f64() / o.steps.max(1) as f64;
    Ok(TrainBench {
        model: path.display().to_string(),
        rank: o.rank,
        trainable_params: t.trainable_params(),
        batch: o.batch,
        seq_len: batch.len,
        grad_checkpointing: o.grad_checkpointing,
        bf16_matmul: o.bf16_matmul,
        f16_matmul: o.f16_matmul,
        tokens_per_s: batch.tokens as f64 / step_s,
        step_s,
        peak_rss_mb: crate::bench::peak_rss_bytes().unwrap_or(0) as f64 / 1e6,
    })
}
