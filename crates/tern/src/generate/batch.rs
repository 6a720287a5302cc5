//! Batch inference from a jsonl file: each line a `prompt` or a chat (`messages`), with
//! optional per-line sampling fields, run as batches through the [`Engine`] the server uses;
//! results come back in input order, a bad line is reported with its number.

use super::{
    Engine, EngineEvent, FinishReason, GenerateRequest, Prompt, SamplingParams, TokenSink,
};
use crate::error::{Result, TernError};
use crate::model::LoadedModel;
use crate::tokenizer::ChatMessage;
use serde::Deserialize;
use serde_json::Value;
use std::sync::mpsc;

/// One input line as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    id: Option<Value>,
    prompt: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<Vec<String>>,
}

/// Settings lines do not give.
#[derive(Debug, Clone)]
pub struct BatchDefaults {
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Token budget.
    pub max_tokens: usize,
    /// Stop strings.
    pub stop: Vec<String>,
}

/// A line ready to run.
#[derive(Debug, Clone)]
pub struct BatchItem {
    /// 1-based line number in the input.
    pub line: usize,
    /// The line's `id`, echoed in its result.
    pub id: Option<Value>,
    /// What to generate.
    pub request: GenerateRequest,
}

/// How one line ended.
#[derive(Debug, Clone)]
pub struct BatchResult {
    /// 1-based line number in the input.
    pub line: usize,
    /// The line's `id`.
    pub id: Option<Value>,
    /// The generated text and counts, or why there are none.
    pub outcome: std::result::Result<BatchOutput, String>,
}

/// A generated answer.
#[derive(Debug, Clone)]
pub struct BatchOutput {
    /// The text.
    pub text: String,
    /// Why it ended.
    pub finish_reason: Option<FinishReason>,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
}

impl BatchResult {
    /// The result as one output jsonl object.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::json!({ "line": self.line });
        if let Some(id) = &self.id {
            v["id"] = id.clone();
        }
        match &self.outcome {
            Ok(o) => {
                v["text"] = o.text.clone().into();
                v["finish_reason"] = o.finish_reason.map(FinishReason::as_str).into();
                v["prompt_tokens"] = o.prompt_tokens.into();
                v["completion_tokens"] = o.completion_tokens.into();
            }
            Err(e) => v["error"] = e.clone().into(),
        }
        v
    }
}

/// Parses and tokenises every non-blank line; a bad line is an `Err` naming its number.
pub fn parse_lines(
    lm: &LoadedModel,
    text: &str,
    defaults: &BatchDefaults,
) -> Vec<std::result::Result<BatchItem, (usize, String)>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            parse_line(lm, l, defaults)
                .map_err(|e| (i + 1, e))
                .map(|(id, request)| BatchItem {
                    line: i + 1,
                    id,
                    request,
                })
        })
        .collect()
}

fn parse_line(
    lm: &LoadedModel,
    text: &str,
    d: &BatchDefaults,
) -> std::result::Result<(Option<Value>, GenerateRequest), String> {
    let l: Line = serde_json::from_str(text).map_err(|e| format!("not a valid input line: {e}"))?;
    let prompt = match (l.prompt, l.messages) {
        (Some(p), None) => Prompt::Text(p),
        (None, Some(m)) if !m.is_empty() => Prompt::Chat(m),
        _ => {
            return Err(
                "give exactly one of `prompt` (text) or `messages` (a non-empty chat)".into(),
            )
        }
    };
    let ids = lm.encode_prompt(&prompt).map_err(|e| e.to_string())?;
    let s = &d.sampling;
    let req = GenerateRequest {
        prompt_ids: ids,
        sampling: SamplingParams {
            temperature: l.temperature.unwrap_or(s.temperature),
            top_k: l.top_k.unwrap_or(s.top_k),
            top_p: l.top_p.unwrap_or(s.top_p),
            min_p: l.min_p.unwrap_or(s.min_p),
            repetition_penalty: l.repetition_penalty.unwrap_or(s.repetition_penalty),
            seed: l.seed.unwrap_or(s.seed),
        },
        max_tokens: l.max_tokens.unwrap_or(d.max_tokens),
        stop: l.stop.unwrap_or_else(|| d.stop.clone()),
        stop_at_eos: true,
        adapter: None,
    };
    req.validate(lm).map_err(|e| e.to_string())?;
    Ok((l.id, req))
}

/// Events tagged with the item they belong to, into one channel.
struct Tagged(usize, mpsc::Sender<(usize, EngineEvent)>);

impl TokenSink for Tagged {
    fn send(&mut self, ev: EngineEvent) -> bool {
        self.1.send((self.0, ev)).is_ok()
    }
}

/// Runs every item through `engine` (whose queue must hold them all) and returns the results
/// in input order; `on_done` sees each result as it finishes, in completion order.
pub fn run(
    engine: &Engine,
    items: Vec<BatchItem>,
    mut on_done: impl FnMut(&BatchResult),
) -> Result<Vec<BatchResult>> {
    let (tx, rx) = mpsc::channel();
    let mut results: Vec<Option<BatchResult>> = vec![None; items.len()];
    let mut texts: Vec<String> = vec![String::new(); items.len()];
    let mut finish: Vec<Option<FinishReason>> = vec![None; items.len()];
    let mut pending = 0;
    for (i, it) in items.iter().enumerate() {
        match engine.submit(it.request.clone(), Tagged(i, tx.clone())) {
            Ok(()) => pending += 1,
            Err(e @ (TernError::Busy { .. } | TernError::ShuttingDown)) => return Err(e),
            Err(e) => {
                let r = BatchResult {
                    line: it.line,
                    id: it.id.clone(),
                    outcome: Err(e.to_string()),
                };
                on_done(&r);
                results[i] = Some(r);
            }
        }
    }
    drop(tx);
    while pending > 0 {
        let Ok((i, ev)) = rx.recv() else {
            return Err(TernError::InvalidArgument(
                "the engine stopped before every line finished".into(),
            ));
        };
        let outcome = match ev {
            EngineEvent::Token(t) => {
                texts[i].push_str(&t.text);
                finish[i] = t.finish_reason.or(finish[i]);
                continue;
            }
            EngineEvent::Done(s) => Ok(BatchOutput {
                text: std::mem::take(&mut texts[i]),
                finish_reason: finish[i],
                prompt_tokens: s.prompt_tokens,
                completion_tokens: s.completion_tokens,
            }),
            EngineEvent::Failed(e) => Err(e.to_string()),
        };
        pending -= 1;
        let r = BatchResult {
            line: items[i].line,
            id: items[i].id.clone(),
            outcome,
        };
        on_done(&r);
        results[i] = Some(r);
    }
    Ok(results.into_iter().flatten().collect())
}
