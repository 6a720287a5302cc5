//! `tern bench batch`: the same prompts run one at a time and through the batched engine;
//! reports tokens/s of both and their ratio.

use crate::error::Result;
use crate::generate::{Engine, EngineConfig, EngineEvent, GenerateRequest};
use crate::lora::BatchAdapters;
use crate::model::{Cache, LoadOptions, LoadedModel};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Settings of the batch benchmark.
#[derive(Debug, Clone)]
pub struct BatchBenchOptions {
    /// Prompts (each a different short text).
    pub rows: usize,
    /// Rows decoded together by the engine.
    pub batch: usize,
    /// Tokens generated per row (EOS ignored, so every row generates them all).
    pub max_tokens: usize,
}

/// What it measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BatchBench {
    /// Model path.
    pub model: String,
    /// Rows and batch size.
    pub rows: usize,
    /// Rows decoded together.
    pub batch: usize,
    /// Tokens generated in all (each way).
    pub tokens: usize,
    /// One row at a time, tok/s.
    pub sequential_tok_s: f64,
    /// Through the engine, tok/s.
    pub batched_tok_s: f64,
    /// `batched / sequential`.
    pub speedup: f64,
    /// Whether both ways produced the same tokens (greedy).
    pub same_tokens: bool,
    /// Decode steps alone (no prompts, no sampling), one row: ms per step.
    pub decode_one_ms: f64,
    /// Decode steps alone, `batch` rows together: ms per step.
    pub decode_batch_ms: f64,
    /// `batch * decode_one_ms / decode_batch_ms`: the decode steps' own ratio.
    pub decode_speedup: f64,
}

/// Runs the benchmark.
pub fn run(path: &Path, load: &LoadOptions, o: &BatchBenchOptions) -> Result<BatchBench> {
    let lm = Arc::new(LoadedModel::load(path, load)?);
    let reqs: Vec<GenerateRequest> = (0..o.rows)
        .map(|i| {
            let prompt = format!("Item {i}: a short note about the number {}.", i * 7 + 3);
            let mut r = GenerateRequest::new(lm.tokenizer.encode(&prompt, true)?, o.max_tokens);
            r.stop_at_eos = false;
            Ok(r)
        })
        .collect::<Result<_>>()?;
    let t = Instant::now();
    let mut seq_ids = Vec::new();
    for r in &reqs {
        seq_ids.push(lm.generate_collect(r.clone())?.ids());
    }
    let seq_s = t.elapsed().as_secs_f64();
    let engine = Engine::start(
        lm.clone(),
        EngineConfig {
            max_batch: o.batch.max(1),
            max_queue: reqs.len(),
            ..Default::default()
        },
    )?;
    let t = Instant::now();
    let rxs = reqs
        .iter()
        .map(|r| engine.submit_channel(r.clone()))
        .collect::<Result<Vec<_>>>()?;
    let mut batch_ids = Vec::new();
    for rx in rxs {
        let mut ids = Vec::new();
        for ev in rx {
            match ev {
                EngineEvent::Token(t) => ids.push(t.id),
                EngineEvent::Done(_) => break,
                EngineEvent::Failed(e) => return Err(e),
            }
        }
        batch_ids.push(ids);
    }
    let batch_s = t.elapsed().as_secs_f64();
    let b = o.batch.max(1).min(reqs.len());
    let one = decode_ms(&lm, &reqs[..1], o.max_tokens)?;
    let many = decode_ms(&lm, &reqs[..b], o.max_tokens)?;
    let tokens: usize = seq_ids.iter().map(Vec::len).sum();
    let (seq, bat) = (tokens as f64 / seq_s, tokens as f64 / batch_s);
    Ok(BatchBench {
        model: path.display().to_string(),
        rows: o.rows,
        batch: o.batch,
        tokens,
        sequential_tok_s: seq,
        batched_tok_s: bat,
        speedup: bat / seq,
        same_tokens: seq_ids == batch_ids,
        decode_one_ms: one,
        decode_batch_ms: many,
        decode_speedup: b as f64 * one / many,
    })
}

/// Milliseconds per decode step of `reqs` run together after their prompts: the best of
/// three runs of `steps - 1` steps (the prompts and sampling are what the whole-run ratio
/// adds; this isolates the batched step itself).
fn decode_ms(lm: &LoadedModel, reqs: &[GenerateRequest], steps: usize) -> Result<f64> {
    let m = &lm.model;
    let prompts: Vec<&[u32]> = reqs.iter().map(|r| r.prompt_ids.as_slice()).collect();
    let ids: Vec<u32> = prompts.iter().map(|p| p[p.len() - 1]).collect();
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let mut caches: Vec<_> = reqs.iter().map(|_| m.new_cache()).collect();
        let mut rows: Vec<&mut Cache> = caches.iter_mut().collect();
        m.prefill_rows(&prompts, &mut rows, &vec![None; reqs.len()])?;
        let t = Instant::now();
        for _ in 1..steps.max(2) {
            m.decode_rows(&ids, &mut rows, &BatchAdapters::none())?;
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e3 / (steps.max(2) - 1) as f64);
    }
    Ok(best)
}
