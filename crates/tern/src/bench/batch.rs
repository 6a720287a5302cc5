//! `tern bench batch`: the same prompts run one at a time and through the batched engine;
//! reports tokens/s of both and their ratio.

use crate::error::Result;
use crate::generate::{Engine, EngineConfig, EngineEvent, GenerateRequest};
use crate::lora::BatchAdapters;
use crate::model::{Cache, LoadOptions, LoadedModel};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// Rounds of both ways, interleaved; the ratio is the median of the rounds' own ratios.
    pub rounds: usize,
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
    /// Rounds run of each way.
    pub rounds: usize,
    /// Whether prompts ran through the int8 kernels ([`LoadOptions::int8_prompts`]).
    pub int8_prompts: bool,
    /// Whether logits ran through the int8 head ([`LoadOptions::quantized_head`]).
    pub quantized_head: bool,
    /// Tokens generated in all (each way).
    pub tokens: usize,
    /// One row at a time, tok/s (best round).
    pub sequential_tok_s: f64,
    /// Through the engine, tok/s (best round).
    pub batched_tok_s: f64,
    /// Median over the rounds of `batched / sequential` within each round (its two ways run
    /// back to back, so a shared machine's drift between rounds does not pair a fast phase of
    /// one way with a slow phase of the other).
    pub speedup: f64,
    /// The lowest and highest of the rounds' ratios.
    pub speedup_range: (f64, f64),
    /// Whether both ways produced the same tokens (greedy).
    pub same_tokens: bool,
    /// Milliseconds the best sequential round spent on prompts (its whole run: `tokens /
    /// sequential_tok_s`): the part batching gains least on, as a prompt's tokens already
    /// share each pass over the weights.
    pub sequential_prompt_ms: f64,
    /// Milliseconds the best batched round spent on prompts (engine steps' admissions).
    pub batched_prompt_ms: f64,
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
    // Nanoseconds the engine's steps spent on prompts since the last reset.
    let prompt_ns = Arc::new(AtomicU64::new(0));
    let seen = prompt_ns.clone();
    let engine = Engine::start(
        lm.clone(),
        EngineConfig {
            max_batch: o.batch.max(1),
            max_queue: reqs.len(),
            // Every round must run every prompt in full.
            prefix_cache_bytes: 0,
            on_step: Some(Arc::new(move |s| {
                seen.fetch_add(s.prefill.as_nanos() as u64, Ordering::Relaxed);
            })),
            ..Default::default()
        },
    )?;
    let (mut seq_s, mut batch_s) = (f64::INFINITY, f64::INFINITY);
    let (mut seq_prompt, mut batch_prompt) = (0.0, 0.0);
    let (mut tokens, mut same_tokens) = (0, true);
    let mut ratios = Vec::with_capacity(o.rounds.max(1));
    for _ in 0..o.rounds.max(1) {
        let t = Instant::now();
        let mut prompt = 0.0;
        let seq_ids: Vec<Vec<u32>> = reqs
            .iter()
            .map(|r| {
                let c = lm.generate_collect(r.clone())?;
                prompt += c.stats.prefill.as_secs_f64();
                Ok(c.ids())
            })
            .collect::<Result<Vec<_>>>()?;
        let seq = t.elapsed().as_secs_f64();
        if seq < seq_s {
            (seq_s, seq_prompt) = (seq, prompt);
        }
        prompt_ns.store(0, Ordering::Relaxed);
        let t = Instant::now();
        let batch_ids = run_engine(&engine, &reqs)?;
        let bat = t.elapsed().as_secs_f64();
        if bat < batch_s {
            (batch_s, batch_prompt) = (bat, prompt_ns.load(Ordering::Relaxed) as f64 * 1e-9);
        }
        ratios.push(seq / bat);
        tokens = seq_ids.iter().map(Vec::len).sum();
        same_tokens &= seq_ids == batch_ids;
    }
    ratios.sort_by(f64::total_cmp);
    let n = ratios.len();
    let median = (ratios[(n - 1) / 2] + ratios[n / 2]) / 2.0;
    let b = o.batch.max(1).min(reqs.len());
    let one = decode_ms(&lm, &reqs[..1], o.max_tokens)?;
    let many = decode_ms(&lm, &reqs[..b], o.max_tokens)?;
    let (seq, bat) = (tokens as f64 / seq_s, tokens as f64 / batch_s);
    Ok(BatchBench {
        model: path.display().to_string(),
        rows: o.rows,
        batch: o.batch,
        rounds: o.rounds.max(1),
        int8_prompts: load.int8_prompts,
        quantized_head: load.quantized_head,
        tokens,
        sequential_tok_s: seq,
        batched_tok_s: bat,
        speedup: median,
        speedup_range: (ratios[0], ratios[n - 1]),
        same_tokens,
        sequential_prompt_ms: seq_prompt * 1e3,
        batched_prompt_ms: batch_prompt * 1e3,
        decode_one_ms: one,
        decode_batch_ms: many,
        decode_speedup: b as f64 * one / many,
    })
}

/// Submits every request at once and collects each one's tokens, in request order.
fn run_engine(engine: &Engine, reqs: &[GenerateRequest]) -> Result<Vec<Vec<u32>>> {
    let rxs = reqs
        .iter()
        .map(|r| engine.submit_channel(r.clone()))
        .collect::<Result<Vec<_>>>()?;
    let mut out = Vec::with_capacity(rxs.len());
    for rx in rxs {
        let mut ids = Vec::new();
        for ev in rx {
            match ev {
                EngineEvent::Token(t) => ids.push(t.id),
                EngineEvent::Done(_) => break,
                EngineEvent::Failed(e) => return Err(e),
            }
        }
        out.push(ids);
    }
    Ok(out)
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
