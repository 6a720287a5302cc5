//! A conversation that keeps its KV cache between turns: each turn renders the whole
//! conversation through the chat template (so the model sees exactly what a fresh run would),
//! then runs only the tokens after the longest prefix already in the cache.

use super::{Completion, GenerateRequest, Prompt, SamplingParams, Sequence, StreamToken};
use crate::error::{Result, TernError};
use crate::lora::{BatchAdapters, LoraAdapter};
use crate::model::{Cache, LoadedModel};
use crate::tokenizer::ChatMessage;
use std::sync::Arc;
use std::time::Instant;

/// What one turn cost.
#[derive(Debug, Clone)]
pub struct Turn {
    /// The answer.
    pub completion: Completion,
    /// Prompt tokens found in the cache from earlier turns.
    pub reused_tokens: usize,
    /// Prompt tokens run this turn.
    pub prefilled_tokens: usize,
}

/// A chat with one model, its history and its cache.
pub struct ChatSession<'a> {
    lm: &'a LoadedModel,
    system: Option<String>,
    messages: Vec<ChatMessage>,
    adapter: Option<Arc<LoraAdapter>>,
    /// Sampling settings for every answer.
    pub sampling: SamplingParams,
    /// Most tokens per answer.
    pub max_tokens: usize,
    cache: Cache,
    /// The tokens the cache holds, in order.
    cached: Vec<u32>,
}

impl<'a> ChatSession<'a> {
    /// An empty conversation.
    pub fn new(lm: &'a LoadedModel, system: Option<String>) -> Self {
        Self {
            lm,
            system,
            messages: vec![],
            adapter: None,
            sampling: SamplingParams::default(),
            max_tokens: 512,
            cache: lm.model.new_cache(),
            cached: vec![],
        }
    }

    /// The conversation so far (without the system message).
    pub fn messages(&self) -> &[ChatMessage] {
        &self.messages
    }

    /// Forgets the conversation (the system message stays).
    pub fn reset(&mut self) {
        self.messages.clear();
        self.cache.reset();
        self.cached.clear();
    }

    /// Replaces the system message (the cache is reused up to where the text changes).
    pub fn set_system(&mut self, system: Option<String>) {
        self.system = system;
    }

    /// Switches adapter; the cache is dropped, since it was computed with the old one.
    pub fn set_adapter(&mut self, adapter: Option<Arc<LoraAdapter>>) {
        self.adapter = adapter;
        self.cache.reset();
        self.cached.clear();
    }

    /// Adds `user` to the conversation and answers it, streaming tokens to `on_token`
    /// (returning `false` stops the answer early; what was said so far is kept).
    pub fn send(
        &mut self,
        user: &str,
        mut on_token: impl FnMut(&StreamToken) -> bool,
    ) -> Result<Turn> {
        let mut all = Vec::with_capacity(self.messages.len() + 2);
        if let Some(s) = &self.system {
            all.push(ChatMessage::new("system", s));
        }
        all.extend(self.messages.iter().cloned());
        all.push(ChatMessage::new("user", user));
        let ids = self.lm.encode_prompt(&Prompt::Chat(all))?;
        // The usual cause is the conversation's length, not the message: say so.
        let ctx = self.lm.model.config().max_position_embeddings;
        if ids.len() >= ctx {
            return Err(TernError::InvalidArgument(format!(
                "the conversation with this message is {} tokens; the model's context is {ctx} (reset the conversation to go on)",
                ids.len()
            )));
        }
        // The longest prefix already run, leaving enough tokens to run that the turn computes
        // what a fresh run would (see `prefix_cache::MIN_SUFFIX`).
        let reused = self
            .cached
            .iter()
            .zip(&ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(ids.len().saturating_sub(super::prefix_cache::MIN_SUFFIX));
        self.cache.truncate(reused)?;
        self.cached.truncate(reused);
        let mut req =
            GenerateRequest::new(ids.clone(), self.max_tokens).with_adapter(self.adapter.clone());
        req.sampling = self.sampling.clone();
        let cache = std::mem::replace(&mut self.cache, self.lm.model.new_cache());
        let mut seq = Sequence::resume(self.lm, req, cache)?;
        let ad = BatchAdapters::uniform(self.adapter.clone());
        let mut tokens = Vec::new();
        let mut logits = seq.prefill(self.lm, &ad)?;
        loop {
            let t = seq.accept(self.lm, &logits)?;
            let go_on = on_token(&t);
            tokens.push(t);
            if seq.is_done() || !go_on {
                break;
            }
            let Some(next) = seq.next_input() else { break };
            let t0 = Instant::now();
            logits = self.lm.model.step_with(&[next], &mut seq.cache, &ad)?;
            seq.add_decode_time(t0.elapsed());
        }
        let stats = seq.stats();
        // The cache now holds the prompt and every answer token but the last (never fed).
        let fed = seq.cache.len();
        self.cached = ids;
        self.cached
            .extend(tokens.iter().map(|t| t.id).take(fed - self.cached.len()));
        self.cache = std::mem::replace(&mut seq.cache, self.lm.model.new_cache());
        let completion = Completion::from_tokens(tokens, stats);
        self.messages.push(ChatMessage::new("user", user));
        self.messages
            .push(ChatMessage::new("assistant", &completion.text));
        Ok(Turn {
            reused_tokens: reused,
            prefilled_tokens: stats.prompt_tokens - reused,
            completion,
        })
    }
}
