//! `tern bench generate`: load time, prompt and decode throughput, time to first token, peak
//! memory, and what streaming costs over collecting the same tokens.

use crate::error::Result;
use crate::generate::GenerateRequest;
use crate::model::{LoadOptions, LoadedModel};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// Settings of one generation benchmark.
#[derive(Debug, Clone)]
pub struct GenerateBenchOptions {
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Tokens to decode per run.
    pub gen_tokens: usize,
    /// Timed runs per variant (the best is kept, to reject scheduler noise).
    pub runs: usize,
}

impl Default for GenerateBenchOptions {
    fn default() -> Self {
        Self {
            prompt_tokens: 128,
            gen_tokens: 64,
            runs: 3,
        }
    }
}

/// Results, all measured in this process.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerateBench {
    /// Checkpoint path.
    pub model: String,
    /// How the weights were read.
    pub load_path: String,
    /// Seconds to load (weights, tokenizer, model).
    pub load_s: f64,
    /// Weight bytes read.
    pub load_bytes: u64,
    /// Weight read rate.
    pub load_gb_s: f64,
    /// Prompt length used.
    pub prompt_tokens: usize,
    /// Tokens decoded per run.
    pub gen_tokens: usize,
    /// Prefill throughput.
    pub prompt_tok_s: f64,
    /// Time to first token (prefill + first sample), milliseconds.
    pub ttft_ms: f64,
    /// Decode throughput, collected.
    pub decode_tok_s: f64,
    /// Decode throughput when every token is streamed to a writer as it arrives.
    pub decode_tok_s_streamed: f64,
    /// `(collected - streamed) / collected` decode rate, percent (an A/B of whole runs, so
    /// it carries the run-to-run noise of the machine, often a few percent).
    pub streaming_overhead_pct: f64,
    /// Time spent inside the per-token streaming callback (formatting and writing each piece)
    /// as a percentage of decode time: the cost streaming adds, measured directly.
    pub stream_callback_pct: f64,
    /// Peak resident memory, MB.
    pub peak_rss_mb: f64,
}

/// Runs the generation benchmark on one checkpoint.
pub fn run(path: &Path, load: &LoadOptions, o: &GenerateBenchOptions) -> Result<GenerateBench> {
    let t = Instant::now();
    let lm = LoadedModel::load(path, load)?;
    let load_s = t.elapsed().as_secs_f64();
    // A deterministic prompt of the requested length: repeated ordinary text.
    let text = "The quick brown fox jumps over the lazy dog while the river runs to the sea. "
        .repeat(o.prompt_tokens);
    let mut ids = lm.tokenizer.encode(&text, false)?;
    ids.truncate(o.prompt_tokens.max(1));
    let req = || {
        let mut r = GenerateRequest::new(ids.clone(), o.gen_tokens.max(2));
        r.stop_at_eos = false;
        r
    };
    // Warm-up: first-touch page faults and allocator growth are not what we measure.
    lm.generate_collect(req())?;
    let (mut best_prompt, mut best_ttft, mut best_col, mut best_str) = (0f64, f64::MAX, 0f64, 0f64);
    let mut callback_share = f64::MAX;
    // Both variants are timed the same way: wall time of the whole call minus time to first
    // token, so sampling, detokenisation and (when streaming) the per-token callback count.
    let decode_rate = |wall: f64, s: &crate::generate::GenStats| {
        (s.completion_tokens - 1) as f64 / (wall - s.time_to_first_token.as_secs_f64())
    };
    for _ in 0..o.runs.max(1) {
        let t = Instant::now();
        let c = lm.generate_collect(req())?;
        let wall = t.elapsed().as_secs_f64();
        let s = c.stats;
        best_prompt = best_prompt.max(s.prompt_tokens as f64 / s.prefill.as_secs_f64());
        best_ttft = best_ttft.min(s.time_to_first_token.as_secs_f64());
        best_col = best_col.max(decode_rate(wall, &s));
        let mut out = std::io::BufWriter::new(std::io::sink());
        let mut in_callback = std::time::Duration::ZERO;
        let t = Instant::now();
        let st = lm.generate_with(req(), |tok| {
            let c = Instant::now();
            let _ = write!(out, "{}", tok.text);
            let _ = out.flush();
            in_callback += c.elapsed();
            true
        })?;
        let wall = t.elapsed().as_secs_f64();
        best_str = best_str.max(decode_rate(wall, &st.stats));
        let decode_wall = wall - st.stats.time_to_first_token.as_secs_f64();
        callback_share = callback_share.min(in_callback.as_secs_f64() / decode_wall * 100.0);
    }
    Ok(GenerateBench {
        model: path.display().to_string(),
        load_path: lm.report.path_kind.clone(),
        load_s,
        load_bytes: lm.report.bytes,
        load_gb_s: lm.report.gb_per_s(),
        prompt_tokens: ids.len(),
        gen_tokens: o.gen_tokens.max(2),
        prompt_tok_s: best_prompt,
        ttft_ms: best_ttft * 1e3,
        decode_tok_s: best_col,
        decode_tok_s_streamed: best_str,
        streaming_overhead_pct: (best_col - best_str) / best_col * 100.0,
        stream_callback_pct: callback_share,
        peak_rss_mb: crate::bench::peak_rss_bytes().unwrap_or(0) as f64 / 1e6,
    })
}
