//! Prompt prefixes already run, kept with their KV caches so a request that starts the same
//! way (a long system prompt, a few-shot preamble, an earlier turn) runs only the rest.
//! Entries are keyed by adapter (a cache computed with one adapter is wrong for another),
//! bounded by bytes, and evicted least recently used first.

use crate::error::Result;
use crate::lora::LoraAdapter;
use crate::model::Cache;
use std::sync::Arc;

struct Entry {
    adapter: Option<u64>,
    tokens: Vec<u32>,
    cache: Cache,
    bytes: usize,
    last_used: u64,
}

/// The cache of prompt prefixes.
pub struct PrefixCache {
    entries: Vec<Entry>,
    budget: usize,
    bytes: usize,
    min_tokens: usize,
    clock: u64,
}

impl std::fmt::Debug for PrefixCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixCache")
            .field("entries", &self.entries.len())
            .field("bytes", &self.bytes)
            .field("budget", &self.budget)
            .finish()
    }
}

/// Prompt tokens always left to run after a cached prefix: as many as make the quantized
/// layers take their exact prefill path (`DEQUANT_MIN_ROWS`), so a warm run computes what a
/// cold one does instead of rounding its activations to int8 like decode.
pub const MIN_SUFFIX: usize = crate::model::layers::DEQUANT_MIN_ROWS;

fn key(adapter: &Option<Arc<LoraAdapter>>) -> Option<u64> {
    adapter.as_ref().map(|a| a.version())
}

impl PrefixCache {
    /// Holds at most `budget` bytes of keys and values; prefixes shorter than `min_tokens`
    /// are neither stored nor reused (copying them costs about what running them does).
    pub fn new(budget: usize, min_tokens: usize) -> Self {
        Self {
            entries: Vec::new(),
            budget,
            bytes: 0,
            min_tokens: min_tokens.max(1),
            clock: 0,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// A private cache holding the longest stored prefix of `prompt` computed with the same
    /// adapter, leaving at least [`MIN_SUFFIX`] prompt tokens to run; `None` when nothing long
    /// enough matches.
    pub fn lookup(
        &mut self,
        adapter: &Option<Arc<LoraAdapter>>,
        prompt: &[u32],
    ) -> Result<Option<Cache>> {
        let k = key(adapter);
        let limit = prompt.len().saturating_sub(MIN_SUFFIX);
        let best = self
            .entries
            .iter_mut()
            .filter(|e| e.adapter == k)
            .map(|e| {
                let n = e
                    .tokens
                    .iter()
                    .zip(prompt)
                    .take_while(|(a, b)| a == b)
                    .count();
                (n.min(limit), e)
            })
            .max_by_key(|(n, _)| *n);
        match best {
            Some((n, e)) if n >= self.min_tokens => {
                self.clock += 1;
                e.last_used = self.clock;
                Ok(Some(e.cache.copy_prefix(n)?))
            }
            _ => Ok(None),
        }
    }

    /// Stores the cache of a prompt just run (`cache` holds exactly `prompt`).
    pub fn insert(
        &mut self,
        adapter: &Option<Arc<LoraAdapter>>,
        prompt: &[u32],
        cache: &Cache,
    ) -> Result<()> {
        if prompt.len() < self.min_tokens || cache.len() != prompt.len() {
            return Ok(());
        }
        let k = key(adapter);
        self.clock += 1;
        // An entry this prompt extends (or repeats) is superseded by it.
        if let Some(i) = self
            .entries
            .iter()
            .position(|e| e.adapter == k && prompt.starts_with(&e.tokens))
        {
            let e = self.entries.swap_remove(i);
            self.bytes -= e.bytes;
        } else if self
            .entries
            .iter_mut()
            .find(|e| e.adapter == k && e.tokens.starts_with(prompt))
            .map(|e| e.last_used = self.clock)
            .is_some()
        {
            return Ok(()); // a longer entry already holds it
        }
        let bytes = cache.bytes();
        if bytes > self.budget {
            return Ok(());
        }
        while self.bytes + bytes > self.budget {
            let Some((i, _)) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.last_used)
            else {
                break;
            };
            let e = self.entries.swap_remove(i);
            self.bytes -= e.bytes;
        }
        self.entries.push(Entry {
            adapter: k,
            tokens: prompt.to_vec(),
            cache: cache.copy_prefix(prompt.len())?,
            bytes,
            last_used: self.clock,
        });
        self.bytes += bytes;
        Ok(())
    }
}
