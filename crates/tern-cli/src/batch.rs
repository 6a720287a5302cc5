//! `tern generate --input FILE.jsonl`: a file of prompts through the batched engine.

use crate::generate::GenerateArgs;
use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tern::generate::batch::{self, BatchDefaults, BatchResult};
use tern::generate::{Engine, EngineConfig};
use tern::lora::LoraAdapter;
use tern::{LoadedModel, SamplingParams};

/// What a bad input line does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnError {
    /// Stop before writing anything, naming the line.
    Fail,
    /// Report it (stderr and an `error` line in the output) and go on.
    Skip,
}

/// Runs every line of `input`; writes results in input order to `output` (atomically) or
/// stdout.
pub fn run(
    a: &GenerateArgs,
    input: &Path,
    lm: LoadedModel,
    adapter: Option<Arc<LoraAdapter>>,
    sampling: SamplingParams,
) -> Result<()> {
    let text =
        std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let defaults = BatchDefaults {
        sampling,
        max_tokens: a.max_tokens,
        stop: a.stop.clone(),
    };
    let mut results: Vec<BatchResult> = Vec::new();
    let mut items = Vec::new();
    for parsed in batch::parse_lines(&lm, &text, &defaults) {
        match parsed {
            Ok(mut it) => {
                it.request.adapter = adapter.clone();
                items.push(it);
            }
            Err((line, e)) if a.on_error == OnError::Fail => {
                bail!(
                    "{}:{line}: {e} (--on-error skip to go on without it)",
                    input.display()
                )
            }
            Err((line, e)) => {
                eprintln!("{}:{line}: skipped: {e}", input.display());
                results.push(BatchResult {
                    line,
                    id: None,
                    outcome: Err(e),
                });
            }
        }
    }
    let rows = items.len();
    let engine = Engine::start(
        Arc::new(lm),
        EngineConfig {
            max_batch: a.batch_size.max(1),
            max_queue: rows,
            ..Default::default()
        },
    )?;
    let bar = ProgressBar::new(rows as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} rows, {msg} [{elapsed} < {eta}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let t = Instant::now();
    let mut tokens = 0;
    let mut failed = Vec::new();
    let done = batch::run(&engine, items, |r| {
        match &r.outcome {
            Ok(o) => tokens += o.completion_tokens,
            Err(e) => failed.push(format!("{}:{}: {e}", input.display(), r.line)),
        }
        bar.inc(1);
        bar.set_message(format!(
            "{:.1} tok/s",
            tokens as f64 / t.elapsed().as_secs_f64()
        ));
    })?;
    bar.finish_and_clear();
    let secs = t.elapsed().as_secs_f64();
    if a.on_error == OnError::Fail && !failed.is_empty() {
        bail!("{} (--on-error skip to keep the other results)", failed[0]);
    }
    for f in &failed {
        eprintln!("{f}: skipped");
    }
    results.extend(done);
    results.sort_by_key(|r| r.line);
    let mut out = String::new();
    for r in &results {
        out.push_str(&r.to_json().to_string());
        out.push('\n');
    }
    match &a.output_file {
        Some(p) => tern::checkpoint::writer::write_bytes_atomic(p, out.as_bytes())?,
        None => std::io::stdout().lock().write_all(out.as_bytes())?,
    }
    eprintln!(
        "{} rows ({} failed or skipped), {tokens} tokens in {secs:.2} s: {:.1} tok/s",
        results.len(),
        results.iter().filter(|r| r.outcome.is_err()).count(),
        tokens as f64 / secs.max(1e-9)
    );
    Ok(())
}
