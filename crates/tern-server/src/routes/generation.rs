//! `POST /v1/chat/completions` and `POST /v1/completions`: validate, tokenise, queue in the
//! engine with the request's adapter, then answer at once or as an SSE stream.

use super::ApiJson;
use crate::error::ApiError;
use crate::openai::{ChatRequest, CommonParams, CompletionRequest, PromptInput, Usage};
use crate::AppState;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tern::generate::response_cache::{CachedResponse, ResponseKey};
use tern::generate::{EngineEvent, GenStats, TokenSink};
use tern::lora::LoraAdapter;
use tern::{FinishReason, GenerateRequest, StreamToken};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Which endpoint, for the response shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// Engine events into a tokio channel; a dropped receiver (the client went away) frees
/// the row at the engine's next step.
struct ChannelSink(UnboundedSender<EngineEvent>);

impl TokenSink for ChannelSink {
    fn send(&mut self, ev: EngineEvent) -> bool {
        self.0.send(ev).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// `POST /v1/chat/completions`.
pub async fn chat(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let prompt = req.prompt()?;
    generate(st, Kind::Chat, prompt, req.common).await
}

/// `POST /v1/completions`.
pub async fn completions(
    State(st): State<Arc<AppState>>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let prompt = req.prompt()?;
    generate(st, Kind::Completion, prompt, req.common).await
}

/// The adapter a request's `model` names: `None` for the base model.
fn resolve_model(st: &AppState, name: &str) -> Result<Option<Arc<LoraAdapter>>, ApiError> {
    if name == "base" || name == st.cfg.model_name {
        return Ok(None);
    }
    if name.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_model",
            format!(
                "`model` is required: `{}` (or `base`) or an adapter name",
                st.cfg.model_name
            ),
        ));
    }
    st.registry.get(name).map(Some).map_err(|_| {
        let mut known: Vec<String> = st.registry.list().into_iter().map(|a| a.name).collect();
        known.insert(0, st.cfg.model_name.clone());
        ApiError::model_not_found(format!(
            "model `{name}` is not served (served: {}); load an adapter with POST /v1/adapters",
            known.join(", ")
        ))
    })
}

fn too_long(msg: String) -> ApiError {
    ApiError::bad_request("context_length_exceeded", msg)
}

async fn generate(
    st: Arc<AppState>,
    kind: Kind,
    prompt: PromptInput,
    p: CommonParams,
) -> Result<Response, ApiError> {
    let t0 = Instant::now();
    let adapter = resolve_model(&st, &p.model)?;
    let sampling = p.sampling()?;
    let stop = p.stops()?;
    let ids = match prompt {
        PromptInput::Ids(ids) => ids,
        PromptInput::Prompt(pr) => {
            let lm = st.lm.clone();
            tokio::task::spawn_blocking(move || lm.encode_prompt(&pr))
                .await
                .map_err(|e| ApiError::bad_request("invalid_prompt", e.to_string()))??
        }
    };
    let ctx = st.lm.model.config().max_position_embeddings;
    let limit = st.cfg.max_prompt_tokens.min(ctx - 1);
    if ids.len() > limit {
        return Err(too_long(format!(
            "the prompt has {} tokens; this server takes at most {limit} (shorten it)",
            ids.len()
        )));
    }
    let room = ctx - ids.len();
    let max_tokens = match p.max_tokens()? {
        Some(0) => {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                "max_tokens must be at least 1",
            ))
        }
        Some(n) if n > st.cfg.max_tokens_limit as u64 => {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                format!(
                    "max_tokens is {n}; this server allows at most {} (--max-tokens-limit)",
                    st.cfg.max_tokens_limit
                ),
            ))
        }
        Some(n) => n as usize,
        None => st.cfg.max_tokens_limit.min(room),
    };
    let req = GenerateRequest {
        prompt_ids: ids,
        sampling,
        max_tokens,
        stop,
        stop_at_eos: true,
        adapter,
    };
    let prompt_tokens = req.prompt_ids.len();
    let (tx, rx) = unbounded_channel();
    let mut key = st
        .responses
        .as_ref()
        .and_then(|_| ResponseKey::of(&req, p.seed.is_some()));
    let hit = match (&st.responses, &key) {
        (Some(c), Some(k)) => c.get(k),
        _ => None,
    };
    match hit {
        // A repeat of a deterministic request: replay the stored answer as one token.
        Some(r) => {
            st.metrics.response_cache_hit();
            key = None;
            let _ = tx.send(EngineEvent::Token(StreamToken {
                id: 0,
                text: r.text,
                logprob: 0.0,
                finish_reason: r.finish_reason,
            }));
            let _ = tx.send(EngineEvent::Done(GenStats {
                prompt_tokens,
                completion_tokens: r.completion_tokens,
                ..Default::default()
            }));
        }
        None => st.engine.submit(req, ChannelSink(tx))?,
    }
    let meta = Meta {
        id: new_id(kind),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        model: p.model.clone(),
        kind,
        prompt_tokens,
        t0,
        first: None,
        key,
    };
    if p.stream {
        let include_usage = p.stream_options.as_ref().is_some_and(|o| o.include_usage);
        Ok(stream(st, meta, rx, include_usage).into_response())
    } else {
        collect(st, meta, rx).await
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn new_id(kind: Kind) -> String {
    let prefix = match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    };
    format!(
        "{prefix}-{:x}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// What every response object repeats, and the request's timing.
struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    prompt_tokens: usize,
    t0: Instant,
    first: Option<f64>,
    /// Where to store the answer when it finishes (deterministic requests, cache on).
    key: Option<ResponseKey>,
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id, "object": self.object(chunk), "created": self.created,
            "model": self.model, "choices": choices,
        })
    }

    /// One streamed choice: `delta` for chat, `text` for completions.
    fn chunk(&self, text: Option<&str>, role: bool, finish: Option<FinishReason>) -> Value {
        let finish = finish.map(FinishReason::as_str);
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                json!({ "index": 0, "delta": delta, "finish_reason": finish })
            }
            Kind::Completion => json!({
                "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish,
            }),
        };
        self.envelope(true, json!([choice]))
    }

    fn token_seen(&mut self) {
        if self.first.is_none() {
            self.first = Some(self.t0.elapsed().as_secs_f64());
        }
    }

    fn finish(
        &mut self,
        st: &AppState,
        text: &str,
        finish: Option<FinishReason>,
        completion_tokens: usize,
    ) {
        if let (Some(c), Some(k)) = (&st.responses, self.key.take()) {
            c.put(
                k,
                CachedResponse {
                    text: text.to_string(),
                    finish_reason: finish,
                    completion_tokens,
                },
            );
        }
        let total = self.t0.elapsed().as_secs_f64();
        st.metrics.generation(
            self.prompt_tokens,
            completion_tokens,
            self.first.unwrap_or(total),
            total,
        );
    }
}

async fn collect(
    st: Arc<AppState>,
    mut meta: Meta,
    mut rx: UnboundedReceiver<EngineEvent>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut finish = None;
    loop {
        match rx.recv().await {
            Some(EngineEvent::Token(t)) => {
                meta.token_seen();
                text.push_str(&t.text);
                finish = t.finish_reason.or(finish);
            }
            Some(EngineEvent::Done(stats)) => {
                meta.finish(&st, &text, finish, stats.completion_tokens);
                let finish = finish.map(FinishReason::as_str);
                let choice = match meta.kind {
                    Kind::Chat => json!({
                        "index": 0, "message": { "role": "assistant", "content": text },
                        "finish_reason": finish,
                    }),
                    Kind::Completion => json!({
                        "index": 0, "text": text, "logprobs": null, "finish_reason": finish,
                    }),
                };
                let mut body = meta.envelope(false, json!([choice]));
                body["usage"] = json!(Usage::new(meta.prompt_tokens, stats.completion_tokens));
                return Ok(Json(body).into_response());
            }
            Some(EngineEvent::Failed(e)) => return Err(e.into()),
            None => {
                return Err(ApiError::new(
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "internal_error",
                    "the engine stopped before the request finished",
                ))
            }
        }
    }
}

struct StreamState {
    st: Arc<AppState>,
    meta: Meta,
    rx: UnboundedReceiver<EngineEvent>,
    out: VecDeque<Event>,
    started: bool,
    ended: bool,
    include_usage: bool,
    text: String,
    finish: Option<FinishReason>,
}

fn data(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

fn stream(
    st: Arc<AppState>,
    meta: Meta,
    rx: UnboundedReceiver<EngineEvent>,
    include_usage: bool,
) -> Sse<impl futures_util::Stream<Item = Result<Event, Infallible>>> {
    let state = StreamState {
        st,
        meta,
        rx,
        out: VecDeque::new(),
        started: false,
        ended: false,
        include_usage,
        text: String::new(),
        finish: None,
    };
    let s = futures_util::stream::unfold(state, |mut s| async move {
        loop {
            if let Some(e) = s.out.pop_front() {
                return Some((Ok(e), s));
            }
            if s.ended {
                return None;
            }
            s.next_events().await;
        }
    });
    Sse::new(s).keep_alive(KeepAlive::default())
}

impl StreamState {
    /// Turns the next engine event into SSE events.
    async fn next_events(&mut self) {
        let m = &mut self.meta;
        if !self.started && m.kind == Kind::Chat {
            self.out.push_back(data(&m.chunk(Some(""), true, None)));
        }
        self.started = true;
        match self.rx.recv().await {
            Some(EngineEvent::Token(t)) => {
                m.token_seen();
                self.text.push_str(&t.text);
                self.finish = t.finish_reason.or(self.finish);
                if !t.text.is_empty() {
                    self.out
                        .push_back(data(&m.chunk(Some(&t.text), false, None)));
                }
                if t.finish_reason.is_some() {
                    self.out
                        .push_back(data(&m.chunk(None, false, t.finish_reason)));
                }
            }
            Some(EngineEvent::Done(stats)) => {
                m.finish(&self.st, &self.text, self.finish, stats.completion_tokens);
                if self.include_usage {
                    let mut u = m.envelope(true, json!([]));
                    u["usage"] = json!(Usage::new(m.prompt_tokens, stats.completion_tokens));
                    self.out.push_back(data(&u));
                }
                self.end();
            }
            Some(EngineEvent::Failed(e)) => {
                self.out.push_back(data(&ApiError::from(e).body()));
                self.end();
            }
            None => self.end(),
        }
    }

    fn end(&mut self) {
        self.out.push_back(Event::default().data("[DONE]"));
        self.ended = true;
    }
}
