//! One sequence's generation state — sampler, text decoding, stop strings, finish rules —
//! apart from how its logits are computed, so the single-sequence [`super::Generator`] and
//! the batched [`super::Engine`] turn logits into tokens the same way.

use super::{FinishReason, GenStats, GenerateRequest, Sampler, StopMatcher, StreamToken};
use crate::error::{Result, TernError};
use crate::model::{Cache, LoadedModel};
use crate::tokenizer::IncrementalDecoder;
use std::time::Instant;

/// A request being generated: its KV cache and everything between logits and text.
pub struct Sequence {
    /// The request as given.
    pub req: GenerateRequest,
    /// Its KV cache.
    pub cache: Cache,
    sampler: Sampler,
    seen: Vec<u32>,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    to_feed: Option<u32>,
    done: bool,
    started: Instant,
    stats: GenStats,
}

impl GenerateRequest {
    /// Checks the request against the model: a non-empty prompt within the context and the
    /// vocabulary, `max_tokens >= 1`, valid sampling settings.
    pub fn validate(&self, lm: &LoadedModel) -> Result<()> {
        if self.prompt_ids.is_empty() {
            return Err(TernError::InvalidArgument(
                "the prompt is empty: give at least one token".into(),
            ));
        }
        if self.max_tokens == 0 {
            return Err(TernError::InvalidArgument(
                "max_tokens must be at least 1".into(),
            ));
        }
        let ctx = lm.model.config().max_position_embeddings;
        if self.prompt_ids.len() >= ctx {
            return Err(TernError::InvalidArgument(format!(
                "the prompt has {} tokens; the model's context is {ctx} (shorten the prompt)",
                self.prompt_ids.len()
            )));
        }
        let vocab = lm.model.config().vocab_size as u32;
        if let Some(bad) = self.prompt_ids.iter().find(|&&i| i >= vocab) {
            return Err(TernError::InvalidArgument(format!(
                "prompt token id {bad} is outside the model's vocabulary of {vocab}"
            )));
        }
        self.sampling.validate()
    }
}

impl Sequence {
    /// Validates `req` and prepares an empty cache for it.
    pub fn new(lm: &LoadedModel, req: GenerateRequest) -> Result<Self> {
        req.validate(lm)?;
        Ok(Self {
            sampler: Sampler::new(req.sampling.clone())?,
            seen: req.prompt_ids.clone(),
            decoder: IncrementalDecoder::new(&req.prompt_ids),
            stops: StopMatcher::new(&req.stop),
            cache: lm.model.new_cache(),
            to_feed: None,
            done: false,
            started: Instant::now(),
            stats: GenStats {
                prompt_tokens: req.prompt_ids.len(),
                ..Default::default()
            },
            req,
        })
    }

    /// As [`Sequence::new`], continuing `cache`, which must hold a prefix of the prompt (a
    /// conversation's earlier turns): only the rest of the prompt is run.
    pub fn resume(lm: &LoadedModel, req: GenerateRequest, cache: Cache) -> Result<Self> {
        if cache.len() >= req.prompt_ids.len() {
            return Err(TernError::InvalidArgument(format!(
                "the cache holds {} tokens, the prompt {}: at least one prompt token must be new",
                cache.len(),
                req.prompt_ids.len()
            )));
        }
        let mut s = Self::new(lm, req)?;
        s.cache = cache;
        Ok(s)
    }

    /// Counts and timings so far.
    pub fn stats(&self) -> GenStats {
        self.stats
    }

    /// Whether the last token ended the sequence.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The token to run next (after prefill); `None` before prefill and once done.
    pub fn next_input(&self) -> Option<u32> {
        self.to_feed
    }

    /// Runs the prompt (what the cache does not hold yet) through the model; returns the last
    /// position's logits.
    pub fn prefill(
        &mut self,
        lm: &LoadedModel,
        ad: &crate::lora::BatchAdapters,
    ) -> Result<Vec<f32>> {
        let t = Instant::now();
        let start = self.cache.len();
        let l = lm
            .model
            .step_with(&self.req.prompt_ids[start..], &mut self.cache, ad)?;
        self.prefilled(t);
        Ok(l)
    }

    /// Records that the prompt was run (by a caller batching several prompts) from
    /// `started` until now.
    pub fn prefilled(&mut self, started: Instant) {
        self.started = started;
        self.stats.prefill = started.elapsed();
    }

    /// Adds time spent in a decode step that included this sequence.
    pub fn add_decode_time(&mut self, d: std::time::Duration) {
        self.stats.decode += d;
    }

    /// Samples from `logits` and applies the stop rules: the next token, its text, and its
    /// finish reason when it is the last.
    pub fn accept(&mut self, lm: &LoadedModel, logits: &[f32]) -> Result<StreamToken> {
        let s = self.sampler.sample(logits, &self.seen)?;
        self.stats.completion_tokens += 1;
        let generated = self.stats.completion_tokens;
        if generated == 1 {
            self.stats.time_to_first_token = self.started.elapsed();
        }
        self.seen.push(s.id);
        self.to_feed = None;
        let tok = &lm.tokenizer;
        let mut finish = None;
        let mut text;
        if self.req.stop_at_eos && lm.eos_ids.contains(&s.id) {
            text = self.stops.feed(&self.decoder.flush(tok)?).0;
            text.push_str(&self.stops.flush());
            finish = Some(FinishReason::Stop);
        } else {
            let piece = self.decoder.push(tok, s.id)?;
            let (t, hit) = self.stops.feed(&piece);
            text = t;
            if hit {
                finish = Some(FinishReason::Stop);
            } else if generated >= self.req.max_tokens
                || self.cache.len() + 1 >= lm.model.config().max_position_embeddings
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

    /// Marks the sequence finished (after an error, or when its caller went away).
    pub fn abort(&mut self) {
        self.done = true;
        self.to_feed = None;
    }
}
