//! A bounded load generator for an OpenAI-compatible server on this machine: a fixed number
//! of streamed completion requests from a fixed number of client threads, stopped early by
//! a duration cap, loopback addresses only (it is a measuring tool, not a flood).

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Base URL, e.g. `http://127.0.0.1:8080` (loopback only).
    pub url: String,
    /// Bearer key, if the server wants one.
    pub api_key: Option<String>,
    /// `model` values, used round-robin (one entry: every request the same).
    pub models: Vec<String>,
    /// Prompts, used round-robin.
    pub prompts: Vec<String>,
    /// Requests to send in all.
    pub requests: usize,
    /// Client threads sending at once.
    pub concurrency: usize,
    /// Stop sending new requests after this long.
    pub max_duration: Duration,
    /// `max_tokens` of every request (greedy, so runs repeat).
    pub max_tokens: usize,
}

/// What came back.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoadReport {
    /// Client threads.
    pub concurrency: usize,
    /// Requests answered in full.
    pub ok: usize,
    /// Requests that failed (status or transport), with the first error.
    pub failed: usize,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// Requests not sent because the duration cap was reached.
    pub not_sent: usize,
    /// Wall time from first send to last answer, seconds.
    pub wall_s: f64,
    /// Completed requests per second.
    pub req_per_s: f64,
    /// Generated tokens per second (from the servers' usage counts).
    pub tok_per_s: f64,
    /// Median and 99th-percentile request latency, ms.
    pub latency_p50_ms: f64,
    /// 99th-percentile request latency, ms.
    pub latency_p99_ms: f64,
    /// Median time to first streamed token, ms.
    pub ttft_p50_ms: f64,
    /// 99th-percentile time to first streamed token, ms.
    pub ttft_p99_ms: f64,
}

/// Refuses URLs that do not point at this machine.
pub fn check_loopback(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs on this machine are load-tested"))?;
    let host = rest.split('/').next().unwrap_or("");
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    let ok = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{url}: the load generator only targets loopback (127.0.0.1, ::1, localhost)"
        ))
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One streamed request: (latency, time to first token, generated tokens).
fn one(agent: &ureq::Agent, spec: &LoadSpec, i: usize) -> Result<(f64, f64, usize), String> {
    let body = json!({
        "model": spec.models[i % spec.models.len()],
        "prompt": spec.prompts[i % spec.prompts.len()],
        "max_tokens": spec.max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let t = Instant::now();
    let mut req = agent
        .post(&format!("{}/v1/completions", spec.url))
        .set("Content-Type", "application/json");
    if let Some(k) = &spec.api_key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let resp = req.send_string(&body.to_string()).map_err(|e| match e {
        ureq::Error::Status(s, r) => format!("{s}: {}", r.into_string().unwrap_or_default()),
        e => e.to_string(),
    })?;
    let (mut ttft, mut tokens) = (None, None);
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.map_err(|e| e.to_string())?;
        let Some(d) = line.strip_prefix("data: ") else {
            continue;
        };
        if d == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(d).map_err(|e| e.to_string())?;
        if let Some(e) = v.get("error") {
            return Err(e.to_string());
        }
        ttft.get_or_insert_with(|| t.elapsed().as_secs_f64());
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            tokens = Some(n as usize);
        }
    }
    let tokens = tokens.ok_or("the stream had no usage chunk")?;
    let lat = t.elapsed().as_secs_f64();
    Ok((lat, ttft.unwrap_or(lat), tokens))
}

/// Sends the load and measures it.
pub fn run(spec: &LoadSpec) -> Result<LoadReport, String> {
    check_loopback(&spec.url)?;
    if spec.models.is_empty() || spec.prompts.is_empty() || spec.concurrency == 0 {
        return Err("give at least one model, one prompt and a concurrency of 1 or more".into());
    }
    let agent = ureq::AgentBuilder::new()
        .max_idle_connections_per_host(spec.concurrency)
        .build();
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    let errors = Mutex::new(Vec::new());
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..spec.concurrency {
            s.spawn(|| loop {
                if start.elapsed() >= spec.max_duration {
                    break;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= spec.requests {
                    break;
                }
                match one(&agent, spec, i) {
                    Ok(r) => results.lock().unwrap_or_else(|p| p.into_inner()).push(r),
                    Err(e) => errors.lock().unwrap_or_else(|p| p.into_inner()).push(e),
                }
            });
        }
    });
    let wall = start.elapsed().as_secs_f64();
    let results = results.into_inner().unwrap_or_else(|p| p.into_inner());
    let errors = errors.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut lat: Vec<f64> = results.iter().map(|r| r.0 * 1e3).collect();
    let mut ttft: Vec<f64> = results.iter().map(|r| r.1 * 1e3).collect();
    lat.sort_by(f64::total_cmp);
    ttft.sort_by(f64::total_cmp);
    let tokens: usize = results.iter().map(|r| r.2).sum();
    let sent = next.load(Ordering::SeqCst).min(spec.requests);
    Ok(LoadReport {
        concurrency: spec.concurrency,
        ok: results.len(),
        failed: errors.len(),
        first_error: errors.first().cloned(),
        not_sent: spec.requests - sent,
        wall_s: wall,
        req_per_s: results.len() as f64 / wall,
        tok_per_s: tokens as f64 / wall,
        latency_p50_ms: percentile(&lat, 50.0),
        latency_p99_ms: percentile(&lat, 99.0),
        ttft_p50_ms: percentile(&ttft, 50.0),
        ttft_p99_ms: percentile(&ttft, 99.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_urls_are_accepted() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://localhost:1/x",
            "http://[::1]:80",
            "http://127.1.2.3",
        ] {
            assert!(check_loopback(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:8080",
            "https://127.0.0.1",
            "http://example.com",
            "127.0.0.1:80",
        ] {
            assert!(check_loopback(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[7.0], 99.0), 7.0);
    }
}
