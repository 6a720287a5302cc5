//! `tern bench serve`: serving throughput and latency under a bounded load, in-process
//! (`--model`) or against a server already running on this machine (`--url`).

use crate::bench::at_least;
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tern_server::bench::{ServeBenchOptions, ServeBenchRow};
use tern_server::loadgen::{self, LoadSpec};

/// Arguments of `tern bench serve`.
#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["model", "url"])))]
pub struct ServeBenchArgs {
    /// Serve this model in-process (with random adapters) and load it.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Instead, load a server already running on this machine (loopback URLs only).
    #[arg(long)]
    pub url: Option<String>,
    /// With --url: `model` names to use round-robin (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "base")]
    pub models: Vec<String>,
    /// With --url: the server's API key.
    #[arg(long, env = "TERN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Client concurrencies (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32", value_parser = at_least(1))]
    pub concurrency: Vec<usize>,
    /// Requests per measurement.
    #[arg(long, default_value_t = 32, value_parser = at_least(1))]
    pub requests: usize,
    /// Tokens per request.
    #[arg(long, default_value_t = 32, value_parser = at_least(1))]
    pub max_tokens: usize,
    /// Cap on each measurement, in seconds (requests not sent by then are reported).
    #[arg(long, default_value_t = 120)]
    pub max_duration: u64,
    /// Random adapters requests are spread over in the mixed case.
    #[arg(long, default_value_t = 4)]
    pub adapters: usize,
    /// Their rank.
    #[arg(long, default_value_t = 16, value_parser = at_least(1))]
    pub rank: usize,
    /// The in-process server's batch size.
    #[arg(long, default_value_t = 32, value_parser = at_least(1))]
    pub max_batch: usize,
    #[command(flatten)]
    pub load: crate::load_args::LoadArgs,
}

fn print(rows: &[ServeBenchRow]) -> Result<()> {
    println!(
        "{:<8} {:>5} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "adapter", "conc", "ok/all", "req/s", "tok/s", "p50 ms", "p99 ms", "ttft p50", "ttft p99"
    );
    for r in rows {
        let p = &r.report;
        println!(
            "{:<8} {:>5} {:>7} {:>8.2} {:>8.1} {:>9.0} {:>9.0} {:>9.0} {:>9.0}",
            r.scenario,
            p.concurrency,
            format!("{}/{}", p.ok, p.ok + p.failed + p.not_sent),
            p.req_per_s,
            p.tok_per_s,
            p.latency_p50_ms,
            p.latency_p99_ms,
            p.ttft_p50_ms,
            p.ttft_p99_ms
        );
        if let Some(e) = &p.first_error {
            println!("         first error: {e}");
        }
    }
    for pair in rows.chunks(2) {
        if let [s, m] = pair {
            if s.scenario == "single" && m.scenario == "mixed" && s.report.tok_per_s > 0.0 {
                println!(
                    "concurrency {:>3}: mixed / single adapter throughput {:.2}x",
                    s.report.concurrency,
                    m.report.tok_per_s / s.report.tok_per_s
                );
            }
        }
    }
    println!("{}", serde_json::to_string(rows)?);
    Ok(())
}

/// Runs `tern bench serve`.
pub fn run(a: ServeBenchArgs) -> Result<()> {
    let cap = Duration::from_secs(a.max_duration);
    if let Some(url) = &a.url {
        let mut rows = Vec::new();
        for &c in &a.concurrency {
            let spec = LoadSpec {
                url: url.trim_end_matches('/').to_string(),
                api_key: a.api_key.clone(),
                models: a.models.clone(),
                prompts: vec!["The history of the printing press begins".into()],
                requests: a.requests,
                concurrency: c,
                max_duration: cap,
                max_tokens: a.max_tokens,
            };
            let report = loadgen::run(&spec).map_err(anyhow::Error::msg)?;
            rows.push(ServeBenchRow {
                scenario: "given",
                report,
            });
        }
        print(&rows)?;
        return none_failed_wholly(&rows);
    }
    let Some(model) = &a.model else {
        bail!("give --model PATH or --url URL");
    };
    let lm = crate::resolve::load(model, &a.load)?;
    let rows = tern_server::bench::run(
        Arc::new(lm),
        &ServeBenchOptions {
            concurrency: a.concurrency,
            requests: a.requests,
            max_tokens: a.max_tokens,
            max_duration: cap,
            adapters: a.adapters,
            rank: a.rank,
            max_batch: a.max_batch,
        },
    )?;
    print(&rows)?;
    none_failed_wholly(&rows)
}

/// A measurement in which no request succeeded (nothing listening, a wrong key or model) is
/// an error after the table, naming the first failure: a script must not read its zeros as
/// a result.
fn none_failed_wholly(rows: &[ServeBenchRow]) -> Result<()> {
    match rows.iter().find(|r| r.report.ok == 0) {
        Some(r) => bail!(
            "no request succeeded ({}, concurrency {}): {}",
            r.scenario,
            r.report.concurrency,
            r.report
                .first_error
                .as_deref()
                .unwrap_or("none was sent in time")
        ),
        None => Ok(()),
    }
}
