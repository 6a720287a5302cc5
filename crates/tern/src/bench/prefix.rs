//! `tern bench prefix`: time to first token for a prompt that starts with a long shared
//! prefix (a system prompt, a document), cold and then warm from the engine's prefix cache.

use crate::error::{Result, TernError};
use crate::generate::{Engine, EngineConfig, EngineEvent, GenerateRequest};
use crate::model::{LoadOptions, LoadedModel};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// What it measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PrefixBench {
    /// Model path.
    pub model: String,
    /// Tokens in the shared prefix.
    pub prefix_tokens: usize,
    /// Time to first token without the prefix cached, ms.
    pub cold_ttft_ms: f64,
    /// Time to first token with the prefix cached (best of the warm runs), ms.
    pub warm_ttft_ms: f64,
    /// `cold / warm`.
    pub speedup: f64,
    /// Whether the warm answers equal the same prompts run without the cache (greedy).
    pub same_tokens: bool,
}

fn ttft(engine: &Engine, req: GenerateRequest) -> Result<(f64, Vec<u32>)> {
    let t = Instant::now();
    let rx = engine.submit_channel(req)?;
    let (mut first, mut ids) = (None, Vec::new());
    for ev in rx {
        match ev {
            EngineEvent::Token(tok) => {
                first.get_or_insert_with(|| t.elapsed().as_secs_f64() * 1e3);
                ids.push(tok.id);
            }
            EngineEvent::Done(_) => break,
            EngineEvent::Failed(e) => return Err(e),
        }
    }
    Ok((first.unwrap_or(f64::NAN), ids))
}

/// Runs the benchmark with a prefix of about `prefix_tokens` tokens.
pub fn run(path: &Path, load: &LoadOptions, prefix_tokens: usize) -> Result<PrefixBench> {
    let lm = Arc::new(LoadedModel::load(path, load)?);
    let sentence = "The committee reviewed the quarterly report on water quality in the northern \
                    district and noted several points for the next meeting. ";
    let mut prefix = Vec::new();
    while prefix.len() < prefix_tokens {
        prefix.extend(lm.tokenizer.encode(sentence, false)?);
    }
    prefix.truncate(prefix_tokens);
    let ctx = lm.model.config().max_position_embeddings;
    if prefix_tokens + 32 >= ctx {
        return Err(TernError::InvalidArgument(format!(
            "a {prefix_tokens}-token prefix does not fit the model's context of {ctx}"
        )));
    }
    let questions = [
        "Question: what was reviewed?",
        "Question: which district?",
        "Question: what next?",
    ];
    let reqs: Vec<GenerateRequest> = questions
        .iter()
        .map(|q| {
            let ids = [prefix.clone(), lm.tokenizer.encode(q, false)?].concat();
            Ok(GenerateRequest::new(ids, 8))
        })
        .collect::<Result<_>>()?;
    let uncached = Engine::start(
        lm.clone(),
        EngineConfig {
            prefix_cache_bytes: 0,
            ..Default::default()
        },
    )?;
    let mut plain = Vec::new();
    for r in &reqs {
        plain.push(ttft(&uncached, r.clone())?.1);
    }
    drop(uncached);
    let engine = Engine::start(
        lm.clone(),
        EngineConfig {
            prefix_cache_bytes: 1 << 30,
            ..Default::default()
        },
    )?;
    let (cold, first) = ttft(&engine, reqs[0].clone())?;
    let mut warm = f64::INFINITY;
    let mut same = first == plain[0];
    for (r, p) in reqs.iter().zip(&plain).skip(1) {
        let (t, ids) = ttft(&engine, r.clone())?;
        warm = warm.min(t);
        same &= &ids == p;
    }
    Ok(PrefixBench {
        model: path.display().to_string(),
        prefix_tokens,
        cold_ttft_ms: cold,
        warm_ttft_ms: warm,
        speedup: cold / warm,
        same_tokens: same,
    })
}
