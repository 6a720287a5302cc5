//! `tern bench serve`: starts the server in this process on 127.0.0.1:0 with random
//! adapters, drives it with the load generator at several concurrencies, once with every
//! request on one adapter and once with requests spread over several, and reports
//! throughput and latency for each.

use crate::loadgen::{self, LoadReport, LoadSpec};
use crate::{ServeConfig, ServeError, Server};
use std::sync::Arc;
use std::time::Duration;
use tern::bench::adapters::random_adapter;
use tern::LoadedModel;

/// Settings of the serving benchmark.
#[derive(Debug, Clone)]
pub struct ServeBenchOptions {
    /// Client concurrencies to measure.
    pub concurrency: Vec<usize>,
    /// Requests per measurement.
    pub requests: usize,
    /// Tokens per request.
    pub max_tokens: usize,
    /// Cap on each measurement's duration.
    pub max_duration: Duration,
    /// Adapters in the mixed case (random, all-linear).
    pub adapters: usize,
    /// Their rank.
    pub rank: usize,
    /// The server's batch size.
    pub max_batch: usize,
}

/// One measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServeBenchRow {
    /// `single` (one adapter) or `mixed` (requests spread over all adapters).
    pub scenario: &'static str,
    /// The load generator's report.
    pub report: LoadReport,
}

/// Prompts of a few lengths, cycled over the requests.
const PROMPTS: &[&str] = &[
    "The history of the printing press begins",
    "Write a short note to a friend about the weather in the mountains this week, and",
    "In a small village by the sea there lived an old fisherman who",
    "Rust is a systems programming language that",
];

/// Runs the benchmark on an already loaded model.
pub fn run(lm: Arc<LoadedModel>, o: &ServeBenchOptions) -> Result<Vec<ServeBenchRow>, ServeError> {
    let dir = tempfile::tempdir().map_err(|source| ServeError::Io {
        addr: "temp dir".into(),
        source,
    })?;
    let n = o.adapters.max(1);
    let mut adapters = Vec::new();
    for i in 0..n {
        let name = format!("a{i}");
        let path = dir.path().join(&name);
        random_adapter(&lm, &name, o.rank, i as u64 + 1)
            .and_then(|a| a.save(&path))
            .map_err(|source| ServeError::Adapter {
                name: name.clone(),
                source,
            })?;
        adapters.push((name, path));
    }
    let names: Vec<String> = adapters.iter().map(|a| a.0.clone()).collect();
    let cfg = ServeConfig {
        port: 0,
        model_name: "bench".into(),
        adapters,
        max_batch: o.max_batch,
        max_queue: o.requests.max(1024),
        max_tokens_limit: o.max_tokens,
        ..Default::default()
    };
    let rt = crate::runtime()?;
    let server = rt.block_on(Server::bind(lm, cfg))?;
    let url = format!("http://{}", server.local_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = rt.spawn(server.run(async move {
        let _ = stopped.await;
    }));
    let mut rows = Vec::new();
    for &c in &o.concurrency {
        for (scenario, models) in [("single", vec![names[0].clone()]), ("mixed", names.clone())] {
            let spec = LoadSpec {
                url: url.clone(),
                api_key: None,
                models,
                prompts: PROMPTS.iter().map(|s| s.to_string()).collect(),
                requests: o.requests,
                concurrency: c,
                max_duration: o.max_duration,
                max_tokens: o.max_tokens,
            };
            let report = loadgen::run(&spec).map_err(ServeError::Config)?;
            rows.push(ServeBenchRow { scenario, report });
        }
    }
    let _ = stop.send(());
    let _ = rt.block_on(serving);
    Ok(rows)
}
