//! `/metrics` in the Prometheus text format: request and token counters, queue depth and
//! running rows (read from the engine at scrape time), batch-size and latency histograms,
//! adapter loads.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use tern::generate::EngineStats;

type Labels = Vec<(String, String)>;

/// Every metric the server exports.
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<Labels, Counter>,
    adapter_loads: Family<Labels, Counter>,
    prompt_tokens: Counter,
    generated_tokens: Counter,
    queue_depth: Gauge,
    running: Gauge,
    batch_size: Histogram,
    request_seconds: Histogram,
    ttft_seconds: Histogram,
    steps: Counter<u64, AtomicU64>,
    response_hits: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers everything under the `tern_` prefix.
    pub fn new() -> Self {
        let mut reg = Registry::with_prefix("tern");
        let m = Self {
            requests: Family::default(),
            adapter_loads: Family::default(),
            prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            queue_depth: Gauge::default(),
            running: Gauge::default(),
            batch_size: Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]),
            request_seconds: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            ttft_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            steps: Counter::default(),
            response_hits: Counter::default(),
            registry: Mutex::new(Registry::default()),
        };
        reg.register(
            "requests",
            "HTTP requests by endpoint and status",
            m.requests.clone(),
        );
        reg.register(
            "adapter_loads",
            "Adapter loads by result",
            m.adapter_loads.clone(),
        );
        reg.register(
            "prompt_tokens",
            "Prompt tokens run",
            m.prompt_tokens.clone(),
        );
        reg.register(
            "generated_tokens",
            "Tokens generated",
            m.generated_tokens.clone(),
        );
        reg.register(
            "queue_depth",
            "Requests waiting for a batch slot",
            m.queue_depth.clone(),
        );
        reg.register(
            "running_rows",
            "Rows in the running batch",
            m.running.clone(),
        );
        reg.register("batch_size", "Rows per decode step", m.batch_size.clone());
        reg.register(
            "request_duration_seconds",
            "Time from request to last token",
            m.request_seconds.clone(),
        );
        reg.register(
            "time_to_first_token_seconds",
            "Time from request to first token",
            m.ttft_seconds.clone(),
        );
        reg.register("engine_steps", "Engine decode steps", m.steps.clone());
        reg.register(
            "response_cache_hits",
            "Requests answered from the response cache",
            m.response_hits.clone(),
        );
        *m.registry.lock().unwrap_or_else(|p| p.into_inner()) = reg;
        m
    }

    /// Counts a finished HTTP request.
    pub fn request(&self, endpoint: &str, status: u16) {
        self.requests
            .get_or_create(&vec![
                ("endpoint".into(), endpoint.into()),
                ("status".into(), status.to_string()),
            ])
            .inc();
    }

    /// Counts an adapter load attempt.
    pub fn adapter_load(&self, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.adapter_loads
            .get_or_create(&vec![("result".into(), result.into())])
            .inc();
    }

    /// Counts a request answered from the response cache.
    pub fn response_cache_hit(&self) {
        self.response_hits.inc();
    }

    /// Records one engine step's batch size.
    pub fn step(&self, rows: usize) {
        if rows > 0 {
            self.batch_size.observe(rows as f64);
            self.steps.inc();
        }
    }

    /// Records a finished generation.
    pub fn generation(&self, prompt: usize, generated: usize, ttft: f64, total: f64) {
        self.prompt_tokens.inc_by(prompt as u64);
        self.generated_tokens.inc_by(generated as u64);
        self.ttft_seconds.observe(ttft);
        self.request_seconds.observe(total);
    }

    /// The text exposition, with gauges read from `engine` now.
    pub fn render(&self, engine: EngineStats) -> String {
        self.queue_depth.set(engine.queued as i64);
        self.running.set(engine.running as i64);
        let mut out = String::new();
        let reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &reg);
        out
    }
}
