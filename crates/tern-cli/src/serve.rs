//! `tern serve`: loads the model, then hands it to the tern-server crate.

use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tern_server::ServeConfig;

/// Arguments of `tern serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model: a Hugging Face checkpoint directory, a .gguf file, or a Hub id.
    #[arg(long)]
    pub model: PathBuf,
    /// An adapter to serve from the start, as NAME=PATH (repeatable; PATH may be a Hub id).
    /// Requests pick it with `"model": "NAME"`.
    #[arg(long, value_name = "NAME=PATH")]
    pub adapter: Vec<String>,
    /// Address to listen on (loopback by default; anything else exposes the server).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* (default: env TERN_API_KEY, else none);
    /// an empty key is refused, not taken as none.
    #[arg(long, env = "TERN_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The name the base model is served under (default: the model's directory or file
    /// name); `base` always works too.
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Most rows decoded together.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Most requests waiting for a batch slot; more get 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Largest max_tokens a request may ask for (and the default when it asks none).
    #[arg(long, default_value_t = 2048)]
    pub max_tokens_limit: usize,
    /// Longest prompt, in tokens.
    #[arg(long, default_value_t = 8192)]
    pub max_prompt_tokens: usize,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Seconds running requests may take to finish after SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace: u64,
    /// Cap on memory for resident adapters (e.g. 2GB); idle ones are evicted, least
    /// recently used first, and reloaded from disk when asked for.
    #[arg(long)]
    pub adapter_budget: Option<String>,
    /// Memory for the KV cache of prompt prefixes already run (a shared system prompt is
    /// then run once); 0 turns it off.
    #[arg(long, default_value = "256MB")]
    pub prefix_cache: String,
    /// Keep the answers of this many deterministic requests (greedy, or with a `seed`) and
    /// answer exact repeats from memory; 0 turns it off.
    #[arg(long, default_value_t = 0)]
    pub response_cache: usize,
    /// Memory those answers may take.
    #[arg(long, default_value = "64MB")]
    pub response_cache_bytes: String,
    #[command(flatten)]
    pub load: crate::load_args::LoadArgs,
}

fn parse_adapter(s: &str) -> Result<(String, PathBuf)> {
    let Some((name, path)) = s.split_once('=') else {
        bail!("--adapter `{s}`: give NAME=PATH, e.g. --adapter pirate=out/pirate");
    };
    Ok((name.to_string(), PathBuf::from(path)))
}

/// Runs `tern serve` until SIGTERM or Ctrl-C.
pub fn run(a: ServeArgs) -> Result<()> {
    let adapters = a
        .adapter
        .iter()
        .map(|s| parse_adapter(s))
        .collect::<Result<Vec<_>>>()?;
    let adapter_budget = a
        .adapter_budget
        .as_deref()
        .map(tern::lora::merge::parse_size)
        .transpose()?
        .map(|b| b as usize);
    let model_name = a.served_model_name.clone().unwrap_or_else(|| {
        a.model
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
            .unwrap_or_else(|| "tern".into())
    });
    let mut cfg = ServeConfig {
        host: a.host,
        port: a.port,
        // An empty key is refused by validate(), not taken as "no key": the operator asked
        // for one (typically `--api-key "$KEY"` with KEY unset).
        api_key: a.api_key,
        model_name,
        adapters,
        max_batch: a.max_batch,
        max_queue: a.max_queue,
        max_tokens_limit: a.max_tokens_limit,
        max_prompt_tokens: a.max_prompt_tokens,
        max_body_bytes: a.max_body_bytes,
        shutdown_grace: Duration::from_secs(a.shutdown_grace),
        adapter_budget,
        prefix_cache_bytes: tern::lora::merge::parse_size(&a.prefix_cache)? as usize,
        response_cache_entries: a.response_cache,
        response_cache_bytes: tern::lora::merge::parse_size(&a.response_cache_bytes)? as usize,
    };
    // Settings are checked before a model load or a Hub download that may take minutes.
    cfg.validate()?;
    for (_, path) in &mut cfg.adapters {
        *path = crate::resolve::adapter(path)?;
    }
    let lm = crate::resolve::load(&a.model, &a.load)?;
    let keyed = cfg.api_key.is_some();
    let name = cfg.model_name.clone();
    tern_server::serve_until_signal(Arc::new(lm), cfg, |addr| {
        // On stdout so scripts can read the address (with --port 0).
        println!(
            "tern serve: model `{name}` at http://{addr} (API key {})",
            if keyed { "required" } else { "not set" }
        );
    })?;
    Ok(())
}
