//! The OpenAI request and response bodies tern reads and writes. Fields tern does not know
//! are ignored (clients send many, e.g. `user`); fields it knows but cannot honour, set to
//! anything but their default, are refused by name rather than silently dropped.

use crate::error::ApiError;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tern::generate::SamplingParams;
use tern::ChatMessage;

/// Sampling and length settings shared by both endpoints.
#[derive(Debug, Deserialize, Default)]
pub struct CommonParams {
    /// Adapter name, the base model's name, or `base`.
    pub model: String,
    /// Stream SSE chunks.
    #[serde(default)]
    pub stream: bool,
    /// `{"include_usage": true}` adds a final usage chunk to a stream.
    pub stream_options: Option<StreamOptions>,
    /// Most tokens to generate.
    pub max_tokens: Option<u64>,
    /// The newer name of `max_tokens` (chat).
    pub max_completion_tokens: Option<u64>,
    /// Softmax temperature (OpenAI's default is 1).
    pub temperature: Option<f32>,
    /// Nucleus sampling.
    pub top_p: Option<f32>,
    /// Top-k (an extension, as in vLLM).
    pub top_k: Option<i64>,
    /// Min-p (an extension, as in vLLM).
    pub min_p: Option<f32>,
    /// Repetition penalty (an extension, as in vLLM).
    pub repetition_penalty: Option<f32>,
    /// A stop string or a list of them.
    pub stop: Option<Value>,
    /// RNG seed for sampling.
    pub seed: Option<u64>,
    /// Number of choices; only 1 is served.
    pub n: Option<u64>,
    /// Not supported when non-zero.
    pub presence_penalty: Option<f32>,
    /// Not supported when non-zero.
    pub frequency_penalty: Option<f32>,
    /// Not supported when set.
    pub logit_bias: Option<Value>,
    /// Not supported when true.
    pub logprobs: Option<Value>,
    /// Only `{"type": "text"}`: tern cannot constrain output to JSON.
    pub response_format: Option<Value>,
}

/// `stream_options`.
#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    /// Send a last chunk with token counts.
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<InMessage>,
    /// Not supported when non-empty.
    pub tools: Option<Vec<Value>>,
    /// Only valid with `logprobs: true`, which is itself refused.
    pub top_logprobs: Option<Value>,
    /// Everything else.
    #[serde(flatten)]
    pub common: CommonParams,
}

/// One incoming chat message; `content` is a string or a list of `{"type": "text"}` parts.
#[derive(Debug, Deserialize)]
pub struct InMessage {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The text.
    #[serde(default)]
    pub content: Value,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// A string, a one-string list, or a list of token ids.
    pub prompt: Value,
    /// Not supported when true.
    pub echo: Option<bool>,
    /// Not supported when set.
    pub suffix: Option<String>,
    /// Candidates to pick the best from; only 1 is served.
    pub best_of: Option<u64>,
    /// Everything else.
    #[serde(flatten)]
    pub common: CommonParams,
}

/// What to feed the model.
#[derive(Debug)]
pub enum PromptInput {
    /// Text or a chat, tokenised by the server.
    Prompt(tern::Prompt),
    /// Token ids given by the client.
    Ids(Vec<u32>),
}

/// The roles a chat message may have. `developer` is OpenAI's newer name for `system`
/// and is passed to the template as `system` (as OpenAI does for models without a
/// separate developer role), since chat templates do not know it.
const ROLES: &str = "system, developer, user, assistant, tool";

impl InMessage {
    /// The message as the chat template sees it.
    pub fn to_chat(&self, i: usize) -> Result<ChatMessage, ApiError> {
        let role = match self.role.as_str() {
            "system" | "user" | "assistant" | "tool" => self.role.as_str(),
            "developer" => "system",
            r => {
                // A role the template does not know renders as it pleases, or not at all.
                return Err(ApiError::bad_request(
                    "invalid_messages",
                    format!("messages[{i}].role `{r}` is not a chat role; use one of {ROLES}"),
                ));
            }
        };
        let content = match &self.content {
            Value::String(s) => s.clone(),
            // An assistant turn without content is a tool call in OpenAI's API, which tern
            // does not serve; every other role needs text. Rendering it as "" would change
            // the conversation silently.
            Value::Null => {
                return Err(ApiError::bad_request(
                    "invalid_content",
                    format!(
                    "messages[{i}] ({}) has no content: give it a string or a list of text parts",
                    self.role
                ),
                ))
            }
            Value::Array(parts) => {
                let mut text = String::new();
                for p in parts {
                    match (
                        p.get("type").and_then(Value::as_str),
                        p.get("text").and_then(Value::as_str),
                    ) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(ApiError::bad_request(
                                "invalid_content",
                                format!("messages[{i}].content: only text parts are supported"),
                            ))
                        }
                    }
                }
                text
            }
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_content",
                    format!("messages[{i}].content must be a string or a list of text parts"),
                ))
            }
        };
        Ok(ChatMessage {
            role: role.to_string(),
            content,
        })
    }
}

impl ChatRequest {
    /// The conversation for the chat template.
    pub fn prompt(&self) -> Result<PromptInput, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::bad_request(
                "invalid_messages",
                "messages is empty: send at least one message",
            ));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(unsupported("tools", "tool calling is not supported"));
        }
        // OpenAI refuses top_logprobs without logprobs; with it, logprobs is refused below.
        if self.top_logprobs.as_ref().is_some_and(|v| !v.is_null())
            && self.common.logprobs.as_ref() != Some(&Value::Bool(true))
        {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                "top_logprobs is only valid with logprobs: true (and logprobs are not returned by this server)",
            ));
        }
        let msgs = self
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| m.to_chat(i))
            .collect::<Result<_, _>>()?;
        Ok(PromptInput::Prompt(tern::Prompt::Chat(msgs)))
    }
}

impl CompletionRequest {
    /// The prompt as text or ids.
    pub fn prompt(&self) -> Result<PromptInput, ApiError> {
        if self.echo == Some(true) {
            return Err(unsupported("echo", "echo is not supported"));
        }
        if self.suffix.is_some() {
            return Err(unsupported("suffix", "suffix is not supported"));
        }
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(unsupported("best_of", "only best_of=1 is served"));
        }
        let bad = || {
            ApiError::bad_request(
                "invalid_prompt",
                "prompt must be a string, a list of one string, or a list of token ids",
            )
        };
        match &self.prompt {
            Value::String(s) => Ok(PromptInput::Prompt(tern::Prompt::Text(s.clone()))),
            Value::Array(items) if items.len() == 1 && items[0].is_string() => {
                Ok(PromptInput::Prompt(tern::Prompt::Text(
                    items[0].as_str().unwrap_or_default().to_string(),
                )))
            }
            Value::Array(items) if items.len() > 1 && items.iter().all(Value::is_string) => {
                Err(ApiError::bad_request(
                    "invalid_prompt",
                    "only one prompt per request is served; send one request per prompt",
                ))
            }
            Value::Array(items) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(bad)
                })
                .collect::<Result<Vec<u32>, _>>()
                .map(PromptInput::Ids),
            _ => Err(bad()),
        }
    }
}

fn unsupported(field: &str, what: &str) -> ApiError {
    ApiError::bad_request(
        "unsupported_parameter",
        format!("{field}: {what} by this server"),
    )
}

impl CommonParams {
    /// Sampling settings, refusing values tern cannot honour.
    pub fn sampling(&self) -> Result<SamplingParams, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(unsupported("n", "only n=1 is served"));
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if v.is_some_and(|v| v != 0.0) {
                return Err(unsupported(
                    name,
                    "only 0 is supported (use repetition_penalty)",
                ));
            }
        }
        if self
            .logit_bias
            .as_ref()
            .is_some_and(|v| !v.is_null() && v.as_object().is_none_or(|o| !o.is_empty()))
        {
            return Err(unsupported("logit_bias", "logit_bias is not supported"));
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| !(v.is_null() || v == &Value::Bool(false)))
        {
            return Err(unsupported("logprobs", "logprobs are not returned"));
        }
        if let Some(f) = self.response_format.as_ref().filter(|f| !f.is_null()) {
            match f.get("type").and_then(Value::as_str) {
                Some("text") => {}
                Some(t @ ("json_object" | "json_schema")) => {
                    return Err(unsupported(
                        "response_format",
                        &format!("type `{t}` (output constrained to JSON) is not supported"),
                    ))
                }
                _ => {
                    return Err(ApiError::bad_request(
                        "invalid_parameter",
                        "response_format must be {\"type\": \"text\"} (json_object and json_schema are not supported)",
                    ))
                }
            }
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(ApiError::bad_request(
                    "invalid_parameter",
                    format!("top_k must be >= 0 or -1, got {k}"),
                ))
            }
        };
        let p = SamplingParams {
            // OpenAI's default temperature is 1.
            temperature: self.temperature.unwrap_or(1.0),
            top_k,
            top_p: self.top_p.unwrap_or(1.0),
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            seed: self.seed.unwrap_or_else(rand_seed),
        };
        p.validate()
            .map_err(|e| ApiError::bad_request("invalid_parameter", e.to_string()))?;
        Ok(p)
    }

    /// Stop strings.
    pub fn stops(&self) -> Result<Vec<String>, ApiError> {
        let bad = || {
            ApiError::bad_request(
                "invalid_parameter",
                "stop must be a string or a list of at most 4 strings",
            )
        };
        let stops = match &self.stop {
            None | Some(Value::Null) => vec![],
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(bad()),
        };
        if stops.len() > 4 {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                format!("stop holds {} strings; at most 4 are allowed", stops.len()),
            ));
        }
        if stops.iter().any(String::is_empty) {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                "stop strings must not be empty: give the text to stop at, or leave stop out",
            ));
        }
        Ok(stops)
    }

    /// The requested token budget, if any; `max_tokens` and `max_completion_tokens` may
    /// both be given only with the same value (which one should win is a guess).
    pub fn max_tokens(&self) -> Result<Option<u64>, ApiError> {
        match (self.max_tokens, self.max_completion_tokens) {
            (Some(a), Some(b)) if a != b => Err(ApiError::bad_request(
                "invalid_parameter",
                format!(
                    "max_tokens ({a}) and max_completion_tokens ({b}) differ: give one of them"
                ),
            )),
            (a, b) => Ok(b.or(a)),
        }
    }
}

/// A seed for requests that give none, so unseeded sampling differs between requests.
fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// Token counts.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

impl Usage {
    /// Counts for a prompt and a completion.
    pub fn new(prompt: usize, completion: usize) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(body: Value) -> ChatRequest {
        serde_json::from_value(body).unwrap()
    }

    fn refusal(r: Result<impl std::fmt::Debug, ApiError>) -> (&'static str, String) {
        let e = r.unwrap_err();
        assert_eq!(e.status, 400);
        (e.code, e.message)
    }

    #[test]
    fn a_role_the_template_does_not_know_is_refused_by_name() {
        let r = chat(json!({"model": "m", "messages": [
            {"role": "user", "content": "a"}, {"role": "function", "content": "b"}]}));
        let (code, m) = refusal(r.prompt());
        assert_eq!(code, "invalid_messages");
        assert!(m.contains("messages[1].role `function`"), "{m}");
        assert!(
            m.contains("system, developer, user, assistant, tool"),
            "{m}"
        );
    }

    #[test]
    fn developer_is_sent_to_the_template_as_system() {
        let r = chat(json!({"model": "m", "messages": [
            {"role": "developer", "content": "rules"}, {"role": "user", "content": "q"}]}));
        let Ok(PromptInput::Prompt(tern::Prompt::Chat(msgs))) = r.prompt() else {
            panic!("not a chat");
        };
        assert_eq!(msgs[0].role, "system");
        assert_eq!(msgs[0].content, "rules");
    }

    #[test]
    fn a_message_without_content_is_refused() {
        for m in [
            json!({"role": "assistant"}),
            json!({"role": "user", "content": null}),
        ] {
            let r = chat(json!({"model": "m", "messages": [m]}));
            let (code, msg) = refusal(r.prompt());
            assert_eq!(code, "invalid_content");
            assert!(
                msg.contains("messages[0]") && msg.contains("no content"),
                "{msg}"
            );
        }
        let r = chat(json!({"model": "m", "messages": [{"role": "assistant", "content": ""}]}));
        assert!(r.prompt().is_ok(), "an empty string is content");
    }

    #[test]
    fn top_logprobs_needs_logprobs() {
        let r = chat(
            json!({"model": "m", "messages": [{"role": "user", "content": "q"}],
            "top_logprobs": 3}),
        );
        let (code, m) = refusal(r.prompt());
        assert_eq!(code, "invalid_parameter");
        assert!(
            m.contains("top_logprobs") && m.contains("logprobs: true"),
            "{m}"
        );
        // With logprobs: true the request gets past here and logprobs is refused by name.
        let r = chat(
            json!({"model": "m", "messages": [{"role": "user", "content": "q"}],
            "top_logprobs": 3, "logprobs": true}),
        );
        assert!(r.prompt().is_ok());
        let (code, m) = refusal(r.common.sampling());
        assert_eq!(code, "unsupported_parameter");
        assert!(m.starts_with("logprobs:"), "{m}");
    }

    #[test]
    fn only_text_response_format_is_served() {
        let with = |f: Value| {
            chat(json!({"model": "m", "messages": [], "response_format": f}))
                .common
                .sampling()
        };
        assert!(with(json!({"type": "text"})).is_ok());
        assert!(with(Value::Null).is_ok());
        for t in ["json_object", "json_schema"] {
            let (code, m) = refusal(with(json!({"type": t})));
            assert_eq!(code, "unsupported_parameter");
            assert!(m.starts_with("response_format:") && m.contains(t), "{m}");
        }
        let (code, _) = refusal(with(json!("json")));
        assert_eq!(code, "invalid_parameter");
    }

    #[test]
    fn best_of_above_one_is_refused_like_n() {
        let r: CompletionRequest =
            serde_json::from_value(json!({"model": "m", "prompt": "x", "best_of": 3})).unwrap();
        let (code, m) = refusal(r.prompt());
        assert_eq!(code, "unsupported_parameter");
        assert!(m.starts_with("best_of:"), "{m}");
    }

    #[test]
    fn each_bad_stop_gets_its_own_reason() {
        let stops = |v: Value| {
            serde_json::from_value::<CommonParams>(json!({"model": "m", "stop": v}))
                .unwrap()
                .stops()
        };
        assert_eq!(stops(json!("x")).unwrap(), ["x"]);
        assert_eq!(stops(Value::Null).unwrap(), Vec::<String>::new());
        for (v, want) in [
            (json!(""), "must not be empty"),
            (json!(["a", ""]), "must not be empty"),
            (
                json!(["a", "b", "c", "d", "e"]),
                "stop holds 5 strings; at most 4",
            ),
            (json!(7), "must be a string or a list"),
            (json!(["a", 1]), "must be a string or a list"),
        ] {
            let (code, m) = refusal(stops(v.clone()));
            assert_eq!(code, "invalid_parameter");
            assert!(m.contains(want), "{v}: {m}");
        }
    }

    #[test]
    fn two_different_token_budgets_are_refused_naming_both() {
        let p = |a: Value, b: Value| {
            serde_json::from_value::<CommonParams>(
                json!({"model": "m", "max_tokens": a, "max_completion_tokens": b}),
            )
            .unwrap()
            .max_tokens()
        };
        assert_eq!(p(json!(5), json!(5)).unwrap(), Some(5));
        assert_eq!(p(json!(5), Value::Null).unwrap(), Some(5));
        assert_eq!(p(Value::Null, json!(6)).unwrap(), Some(6));
        let (code, m) = refusal(p(json!(5), json!(6)));
        assert_eq!(code, "invalid_parameter");
        assert!(
            m.contains("max_tokens (5)") && m.contains("max_completion_tokens (6)"),
            "{m}"
        );
    }
}
