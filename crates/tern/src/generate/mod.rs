//! Generation: prompts to token streams. Streaming is the primitive ([`Generator`] is an
//! iterator of [`StreamToken`]); the callback form and the collected form are built on it.

pub mod sampler;
pub mod stop;

pub use sampler::{Sampler, SamplingParams};
pub use stop::StopMatcher;

use crate::error::{Result, TernError};
use crate::lora::{BatchAdapters, LoraAdapter};
use crate::model::{Cache, LoadedModel};
use crate::tokenizer::{ChatMessage, IncrementalDecoder};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An EOS token or a stop string.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
}

impl FinishReason {
    /// The OpenAI-style name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// One generated token as it streams out.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamToken {
    /// Token id.
    pub id: u32,
    /// Text this token completes (UTF-8-correct; may be empty while a character is split
    /// across tokens or text is held back for a possible stop string).
    pub text: String,
    /// `log_softmax(raw logits)[id]`.
    pub logprob: f32,
    /// Set on the last token.
    pub finish_reason: Option<FinishReason>,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Prompt token ids.
    pub prompt_ids: Vec<u32>,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Whether EOS ids end the sequence (off for reference tests that run past EOS).
    pub stop_at_eos: bool,
    /// The LoRA adapter to generate with (`None`: the base model). The request holds this
    /// version until it finishes, whatever happens to the registry meanwhile.
    pub adapter: Option<Arc<LoraAdapter>>,
}

impl GenerateRequest {
    /// A greedy request with EOS stopping.
    pub fn new(prompt_ids: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt_ids,
            sampling: SamplingParams::default(),
            max_tokens,
            stop: vec![],
            stop_at_eos: true,
            adapter: None,
        }
    }

    /// The same request with an adapter.
    pub fn with_adapter(mut self, adapter: Option<Arc<LoraAdapter>>) -> Self {
        self.adapter = adapter;
        self
    }
}

/// What the user gives as input.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Raw text, tokenised with the tokenizer's special tokens (e.g. BOS).
    Text(String),
    /// A chat rendered through the model's chat template with the generation prompt.
    Chat(Vec<ChatMessage>),
}

impl LoadedModel {
    /// Tokenises a prompt the way `transformers` does (`apply_chat_template` for chats).
    pub fn encode_prompt(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Text(t) => self.tokenizer.encode(t, true),
            Prompt::Chat(messages) => {
                let tmpl = self.chat_template.as_ref().ok_or_else(|| {
                    TernError::InvalidArgument(format!(
                        "{} has no chat template; use a plain prompt instead of a chat",
                        self.source.display()
                    ))
                })?;
                let text = tmpl.render(
                    messages,
                    true,
                    self.tokenizer.bos_token.as_deref(),
                    self.tokenizer.eos_token.as_deref(),
                )?;
                self.tokenizer.encode(&text, false)
            }
        }
    }

    /// Starts streaming generation.
    pub fn generate(&self, req: GenerateRequest) -> Result<Generator<'_>> {
        Generator::new(self, req)
    }

    /// Runs generation to the end, calling `on_token` for each token as it is produced;
    /// returning `false` from the callback stops early.
    pub fn generate_with(
        &self,
        req: GenerateRequest,
        mut on_token: impl FnMut(&StreamToken) -> bool,
    ) -> Result<Completion> {
        let mut g = self.generate(req)?;
        let mut tokens = Vec::new();
        for t in g.by_ref() {
            let t = t?;
            let go_on = on_token(&t);
            tokens.push(t);
            if !go_on {
                break;
            }
        }
        Ok(Completion::from_tokens(tokens, g.stats()))
    }

    /// Runs generation to the end and returns everything at once (the same stream, collected).
    pub fn generate_collect(&self, req: GenerateRequest) -> Result<Completion> {
        self.generate_with(req, |_| true)
    }
}

/// Timings and counts of one generation.
#[derive(Debug, Clone, Copy, Default)]
pub struct GenStats {
    /// Prompt length.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Time to run the prompt through the model.
    pub prefill: Duration,
    /// Time from start to the first token being available.
    pub time_to_first_token: Duration,
    /// Time spent in decode steps after the first token.
    pub decode: Duration,
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Completion {
    /// Every token, in order.
    pub tokens: Vec<StreamToken>,
    /// The concatenated text.
    pub text: String,
    /// Why it ended (`None` if the caller stopped it).
    pub finish_reason: Option<FinishReason>,
    /// Counts and timings.
    pub stats: GenStats,
}

impl Completion {
    fn from_tokens(tokens: Vec<StreamToken>, stats: GenStats) -> Self {
        Self {
            text: tokens.iter().map(|t| t.text.as_str()).collect(),
            finish_reason: tokens.last().and_then(|t| t.finish_reason),
            tokens,
            stats,
        }
    }

    /// Generated ids.
    pub fn ids(&self) -> Vec<u32> {
        self.tokens.iter().map(|t| t.id).collect()
    }
}

/// Streaming generation over one sequence: each `next()` runs at most one model step.
pub struct Generator<'a> {
    lm: &'a LoadedModel,
    req: GenerateRequest,
    cache: Cache,
    adapters: BatchAdapters,
    sampler: Sampler,
    seen: Vec<u32>,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    to_feed: Option<u32>,
    generated: usize,
    done: bool,
    started: Instant,
    stats: GenStats,
}

impl<'a> Generator<'a> {
    fn new(lm: &'a LoadedModel, req: GenerateRequest) -> Result<Self> {
        if req.prompt_ids.is_empty() {
            return Err(TernError::InvalidArgument(
                "the prompt is empty: give at least one token".into(),
            ));
        }
        if req.max_tokens == 0 {
            return Err(TernError::InvalidArgument(
                "max_tokens must be at least 1".into(),
            ));
        }
        let ctx = lm.model.config().max_position_embeddings;
        if req.prompt_ids.len() >= ctx {
            return Err(TernError::InvalidArgument(format!(
                "the prompt has {} tokens; the model's context is {ctx} (shorten the prompt)",
                req.prompt_ids.len()
            )));
        }
        let vocab = lm.model.config().vocab_size as u32;
        if let Some(bad) = req.prompt_ids.iter().find(|&&i| i >= vocab) {
            return Err(TernError::InvalidArgument(format!(
                "prompt token id {bad} is outside the model's vocabulary of {vocab}"
            )));
        }
        Ok(Self {
            sampler: Sampler::new(req.sampling.clone())?,
            seen: req.prompt_ids.clone(),
            decoder: IncrementalDecoder::new(&req.prompt_ids),
            stops: StopMatcher::new(&req.stop),
            cache: lm.model.new_cache(),
            adapters: BatchAdapters::uniform(req.adapter.clone()),
            to_feed: None,
            generated: 0,
            done: false,
            started: Instant::now(),
            stats: GenStats {
                prompt_tokens: req.prompt_ids.len(),
                ..Default::default()
            },
            lm,
            req,
        })
    }

    /// Counts and timings so far.
    pub fn stats(&self) -> GenStats {
        self.stats
    }

    fn step(&mut self) -> Result<StreamToken> {
        let logits = match self.to_feed.take() {
            None => {
                let t = Instant::now();
                self.started = t;
                let l = self.lm.model.step_with(
                    &self.req.prompt_ids,
                    &mut self.cache,
                    &self.adapters,
                )?;
                self.stats.prefill = t.elapsed();
                l
            }
            Some(id) => {
                let t = Instant::now();
                let l = self
                    .lm
                    .model
                    .step_with(&[id], &mut self.cache, &self.adapters)?;
                self.stats.decode += t.elapsed();
                l
            }
        };
        let s = self.sampler.sample(&logits, &self.seen)?;
        self.generated += 1;
        self.stats.completion_tokens = self.generated;
        if self.generated == 1 {
            self.stats.time_to_first_token = self.started.elapsed();
        }
        self.seen.push(s.id);
        let tok = &self.lm.tokenizer;
        let mut finish = None;
        let mut text;
        if self.req.stop_at_eos && self.lm.eos_ids.contains(&s.id) {
            text = self.stops.feed(&self.decoder.flush(tok)?).0;
            text.push_str(&self.stops.flush());
            finish = Some(FinishReason::Stop);
        } else {
            let piece = self.decoder.push(tok, s.id)?;
            let (t, hit) = self.stops.feed(&piece);
            text = t;
            if hit {
                finish = Some(FinishReason::Stop);
            } else if self.generated >= self.req.max_tokens
                || self.cache.len() + 1 >= self.lm.model.config().max_position_embeddings
            {
                let (t, hit) = self.stops.feed(&self.decoder.flush(tok)?);
                text.push_str(&t);
                if !hit {
                    text.push_str(&self.stops.flush());
                }
                finish = Some(if hit {
                    FinishReason::Stop
                } else {
                    FinishReason::Length
                });
            } else {
                self.to_feed = Some(s.id);
            }
        }
        self.done = finish.is_some();
        Ok(StreamToken {
            id: s.id,
            text,
            logprob: s.logprob,
            finish_reason: finish,
        })
    }
}

impl Iterator for Generator<'_> {
    type Item = Result<StreamToken>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = self.step();
        if r.is_err() {
            self.done = true;
        }
        Some(r)
    }
}
