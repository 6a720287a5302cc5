//! `tern bench adapters`: what LoRA costs at inference. Switch time between resident
//! adapters, load time from disk, decode speed base vs unmerged vs merged, and a batch whose
//! rows use distinct adapters vs one adapter.

use crate::error::Result;
use crate::generate::GenerateRequest;
use crate::lora::{AdapterConfig, BatchAdapters, LoraAdapter, Targets};
use crate::model::{LoadOptions, LoadedModel};
use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Settings of the adapter benchmark.
#[derive(Debug, Clone)]
pub struct AdapterBenchOptions {
    /// A PEFT adapter to measure; `None` makes random all-linear adapters of `rank`.
    pub adapter: Option<PathBuf>,
    /// Rank of the generated adapters.
    pub rank: usize,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Tokens decoded per run.
    pub gen_tokens: usize,
    /// Timed runs per variant (best kept).
    pub runs: usize,
    /// Rows of the batched comparison.
    pub batch: usize,
}

impl Default for AdapterBenchOptions {
    fn default() -> Self {
        Self {
            adapter: None,
            rank: 16,
            prompt_tokens: 32,
            gen_tokens: 64,
            runs: 3,
            batch: 4,
        }
    }
}

/// Results, all measured in this process.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AdapterBench {
    /// Checkpoint path.
    pub model: String,
    /// Where the adapter came from (`random r=16 all-linear` or a path).
    pub adapter: String,
    /// Storage dtype of the adapter weights.
    pub adapter_dtype: String,
    /// Adapter weight size, MB.
    pub adapter_mb: f64,
    /// Median time to read the adapter from disk (page cache warm) and bind it, ms.
    pub load_ms: f64,
    /// Mean time to switch between two resident adapters: registry lookup by name to a
    /// batch spec ready for the next forward pass, ns.
    pub switch_ns: f64,
    /// Decode tok/s without an adapter.
    pub decode_base_tok_s: f64,
    /// Decode tok/s with the adapter applied per token (unmerged).
    pub decode_unmerged_tok_s: f64,
    /// Decode tok/s switching between two adapters on every token.
    pub decode_alternating_tok_s: f64,
    /// Decode tok/s with the adapter merged into the weights.
    pub decode_merged_tok_s: f64,
    /// Unmerged slowdown against the base, percent.
    pub unmerged_overhead_pct: f64,
    /// Rows of the batched comparison.
    pub batch: usize,
    /// Batched decode tok/s (all rows), every row with the same adapter.
    pub batch_one_adapter_tok_s: f64,
    /// Batched decode tok/s (all rows), every row with its own adapter.
    pub batch_distinct_tok_s: f64,
    /// Distinct-adapter slowdown against one adapter, percent.
    pub batch_distinct_overhead_pct: f64,
    /// Peak resident memory, MB.
    pub peak_rss_mb: f64,
}

/// A random adapter on every attention and MLP projection (the head excluded).
pub fn random_adapter(lm: &LoadedModel, name: &str, rank: usize, seed: u64) -> Result<LoraAdapter> {
    let mut rng = StdRng::seed_from_u64(seed);
    let dev = lm.model.device();
    let dtype = lm.model.dtype();
    let slots = lm.model.slots();
    let mut tensors = Vec::new();
    for s in slots.iter().filter(|s| !s.is_head) {
        let mut rand = |n: usize, sd: f32| -> Vec<f32> {
            (0..n)
                .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * sd)
                .collect()
        };
        let a = Tensor::from_vec(rand(rank * s.in_dim, 0.05), (rank, s.in_dim), dev)?
            .to_dtype(dtype)?;
        let b = Tensor::from_vec(rand(s.out_dim * rank, 0.05), (s.out_dim, rank), dev)?
            .to_dtype(dtype)?;
        tensors.push((s.name.clone(), a, b));
    }
    let cfg = AdapterConfig::new(rank, 2.0 * rank as f64, Targets::AllLinear);
    LoraAdapter::from_tensors(name, cfg, slots, tensors)
}

/// Decode rate of one greedy generation.
fn decode_rate(
    lm: &LoadedModel,
    ids: &[u32],
    gen: usize,
    adapter: Option<Arc<LoraAdapter>>,
) -> Result<f64> {
    let mut r = GenerateRequest::new(ids.to_vec(), gen).with_adapter(adapter);
    r.stop_at_eos = false;
    let s = lm.generate_collect(r)?.stats;
    Ok((s.completion_tokens - 1) as f64 / s.decode.as_secs_f64().max(1e-9))
}

/// Best decode rate of one sequence that switches adapter on every token.
fn alternating_rate(
    lm: &LoadedModel,
    ids: &[u32],
    gen: usize,
    pair: [&Arc<LoraAdapter>; 2],
) -> Result<f64> {
    let mut best = 0f64;
    {
        let mut cache = lm.model.new_cache();
        let first = BatchAdapters::uniform(Some(pair[0].clone()));
        let mut next =
            crate::generate::sampler::argmax(&lm.model.step_with(ids, &mut cache, &first)?) as u32;
        let t = Instant::now();
        for i in 0..gen - 1 {
            let ad = BatchAdapters::uniform(Some(pair[(i + 1) % 2].clone()));
            next =
                crate::generate::sampler::argmax(&lm.model.step_with(&[next], &mut cache, &ad)?)
                    as u32;
        }
        best = best.max((gen - 1) as f64 / t.elapsed().as_secs_f64());
    }
    Ok(best)
}

/// Batched decode rate (tokens of all rows per second) with `rows` adapters.
fn batch_rate(
    lm: &LoadedModel,
    ids: &[u32],
    gen: usize,
    rows: &[Option<Arc<LoraAdapter>>],
) -> Result<f64> {
    let dev = lm.model.device();
    let n = rows.len();
    let ad = BatchAdapters::per_row(rows, dev)?;
    let prompt = Tensor::new(ids, dev)?.unsqueeze(0)?.repeat((n, 1))?;
    let mut cache = lm.model.new_cache();
    let mut logits = lm.model.forward_last_with(&prompt, &mut cache, &ad)?;
    let t = Instant::now();
    for _ in 0..gen - 1 {
        let next = logits.argmax(candle_core::D::Minus1)?.unsqueeze(1)?;
        logits = lm.model.forward_last_with(&next, &mut cache, &ad)?;
    }
    Ok(((gen - 1) * n) as f64 / t.elapsed().as_secs_f64())
}

/// Runs the adapter benchmark on one checkpoint.
pub fn run(path: &Path, load: &LoadOptions, o: &AdapterBenchOptions) -> Result<AdapterBench> {
    let mut lm = LoadedModel::load(path, load)?;
    let gen = o.gen_tokens.max(2);
    let text = "The quick brown fox jumps over the lazy dog while the river runs to the sea. "
        .repeat(o.prompt_tokens);
    let mut ids = lm.tokenizer.encode(&text, false)?;
    ids.truncate(o.prompt_tokens.max(1));

    // Adapters on disk: the given one, or random ones written in PEFT format.
    let tmp = tempfile::tempdir().map_err(|e| crate::TernError::io(std::env::temp_dir(), e))?;
    let n = o.batch.max(2);
    let (dirs, label): (Vec<PathBuf>, String) = match &o.adapter {
        Some(p) => (vec![p.clone(); n], p.display().to_string()),
        None => {
            let dirs = (0..n)
                .map(|i| {
                    let d = tmp.path().join(format!("a{i}"));
                    random_adapter(&lm, "r", o.rank, i as u64)?.save(&d)?;
                    Ok(d)
                })
                .collect::<Result<Vec<_>>>()?;
            (dirs, format!("random r={} all-linear", o.rank))
        }
    };

    let mut loads = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let a = lm.load_adapter(&dirs[0], "a")?;
        loads.push(t.elapsed().as_secs_f64() * 1e3);
        drop(a);
    }
    loads.sort_by(f64::total_cmp);

    let reg = lm.adapter_registry(None);
    let names: Vec<String> = (0..n).map(|i| format!("a{i}")).collect();
    let adapters = names
        .iter()
        .zip(&dirs)
        .map(|(name, d)| reg.load(name, d))
        .collect::<Result<Vec<_>>>()?;
    let iters = 200_000;
    let t = Instant::now();
    for i in 0..iters {
        let a = reg.get(&names[i % 2])?;
        std::hint::black_box(BatchAdapters::uniform(Some(a)));
    }
    let switch_ns = t.elapsed().as_secs_f64() * 1e9 / iters as f64;

    // Variants interleaved run by run, best of each kept: this machine's speed drifts by
    // several percent over seconds, which back-to-back blocks would book as LoRA cost.
    let (mut base, mut unmerged, mut alternating) = (0f64, 0f64, 0f64);
    decode_rate(&lm, &ids, gen, Some(adapters[0].clone()))?; // warm-up
    for _ in 0..o.runs.max(1) {
        base = base.max(decode_rate(&lm, &ids, gen, None)?);
        unmerged = unmerged.max(decode_rate(&lm, &ids, gen, Some(adapters[0].clone()))?);
        alternating = alternating.max(alternating_rate(
            &lm,
            &ids,
            gen,
            [&adapters[0], &adapters[1]],
        )?);
    }
    let one: Vec<_> = (0..o.batch).map(|_| Some(adapters[0].clone())).collect();
    let distinct: Vec<_> = (0..o.batch)
        .map(|i| Some(adapters[i % n].clone()))
        .collect();
    let (mut batch_one, mut batch_distinct) = (0f64, 0f64);
    batch_rate(&lm, &ids, gen, &distinct)?; // warm-up
    for _ in 0..o.runs.max(1) {
        batch_one = batch_one.max(batch_rate(&lm, &ids, gen, &one)?);
        batch_distinct = batch_distinct.max(batch_rate(&lm, &ids, gen, &distinct)?);
    }
    // Last: merging can turn quantized layers into float ones for good.
    lm.model.merge_adapter(&adapters[0])?;
    let mut merged = 0f64;
    for _ in 0..o.runs.max(1) + 1 {
        merged = merged.max(decode_rate(&lm, &ids, gen, None)?);
    }

    Ok(AdapterBench {
        model: path.display().to_string(),
        adapter: label,
        adapter_dtype: format!("{:?}", lm.adapter_dtype).to_lowercase(),
        adapter_mb: adapters[0].bytes() as f64 / 1e6,
        load_ms: loads[loads.len() / 2],
        switch_ns,
        decode_base_tok_s: base,
        decode_unmerged_tok_s: unmerged,
        decode_alternating_tok_s: alternating,
        decode_merged_tok_s: merged,
        unmerged_overhead_pct: (base - unmerged) / base * 100.0,
        batch: o.batch,
        batch_one_adapter_tok_s: batch_one,
        batch_distinct_tok_s: batch_distinct,
        batch_distinct_overhead_pct: (batch_one - batch_distinct) / batch_one * 100.0,
        peak_rss_mb: crate::bench::peak_rss_bytes().unwrap_or(0) as f64 / 1e6,
    })
}
