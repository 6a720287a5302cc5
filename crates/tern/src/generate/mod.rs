//! Generation: prompts to token streams. Streaming is the primitive ([`Generator`] is an
//! iterator of [`StreamToken`]); the callback form and the collected form are built on it.

pub mod batch;
pub mod beam;
pub mod chat;
pub mod engine;
pub mod prefix_cache;
pub mod response_cache;
pub mod sampler;
pub mod sequence;
pub mod stop;

pub use engine::{Engine, EngineConfig, EngineEvent, EngineStats, TokenSink};
pub use sampler::{Sampler, SamplingParams};
pub use sequence::Sequence;
pub use stop::StopMatcher;

use crate::error::{Result, TernError};
use crate::lora::{BatchAdapters, LoraAdapter};
use crate::model::LoadedModel;
use crate::tokenizer::ChatMessage;
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
    pub(crate) fn from_tokens(tokens: Vec<StreamToken>, stats: GenStats) -> Self {
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
    seq: Sequence,
    adapters: BatchAdapters,
}

impl<'a> Generator<'a> {
    fn new(lm: &'a LoadedModel, req: GenerateRequest) -> Result<Self> {
        let adapters = BatchAdapters::uniform(req.adapter.clone());
        Ok(Self {
            seq: Sequence::new(lm, req)?,
            lm,
            adapters,
        })
    }

    /// Counts and timings so far.
    pub fn stats(&self) -> GenStats {
        self.seq.stats()
    }

    fn step(&mut self) -> Result<StreamToken> {
        let logits = match self.seq.next_input() {
            None => self.seq.prefill(self.lm, &self.adapters)?,
            Some(id) => {
                let t = Instant::now();
                let l = self
                    .lm
                    .model
                    .step_with(&[id], &mut self.seq.cache, &self.adapters)?;
                self.seq.add_decode_time(t.elapsed());
                l
            }
        };
        self.seq.accept(self.lm, &logits)
    }
}

impl Iterator for Generator<'_> {
    type Item = Result<StreamToken>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.seq.is_done() {
            return None;
        }
        let r = self.step();
        if r.is_err() {
            self.seq.abort();
        }
        Some(r)
    }
}
