//! Exact-response cache for deterministic requests: the same prompt, adapter and settings
//! (greedy, or sampled with a seed the client fixed) give the same tokens, so a repeat is
//! answered from memory. Bounded by entries and bytes, least recently used evicted first.

use super::{FinishReason, GenerateRequest};
use std::collections::HashMap;
use std::sync::Mutex;

/// What identifies an answer: everything that decides its tokens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResponseKey {
    adapter: Option<u64>,
    prompt: Vec<u32>,
    sampling: [u64; 6],
    max_tokens: usize,
    stop: Vec<String>,
    stop_at_eos: bool,
}

impl ResponseKey {
    /// The key of `req`; `seeded` says whether its seed was chosen by the client (an
    /// unseeded sampled request is not deterministic and gets no key).
    pub fn of(req: &GenerateRequest, seeded: bool) -> Option<Self> {
        let s = &req.sampling;
        let greedy = s.temperature == 0.0;
        if !greedy && !seeded {
            return None;
        }
        Some(Self {
            adapter: req.adapter.as_ref().map(|a| a.version()),
            prompt: req.prompt_ids.clone(),
            sampling: [
                u64::from(s.temperature.to_bits()),
                s.top_k as u64,
                u64::from(s.top_p.to_bits()),
                u64::from(s.min_p.to_bits()),
                u64::from(s.repetition_penalty.to_bits()),
                // Greedy picks ignore the seed.
                if greedy { 0 } else { s.seed },
            ],
            max_tokens: req.max_tokens,
            stop: req.stop.clone(),
            stop_at_eos: req.stop_at_eos,
        })
    }

    fn bytes(&self) -> usize {
        self.prompt.len() * 4 + self.stop.iter().map(String::len).sum::<usize>() + 96
    }
}

/// A finished answer.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedResponse {
    /// The text.
    pub text: String,
    /// Why it ended.
    pub finish_reason: Option<FinishReason>,
    /// Tokens generated.
    pub completion_tokens: usize,
}

struct Inner {
    map: HashMap<ResponseKey, (CachedResponse, u64)>,
    bytes: usize,
    clock: u64,
}

/// The cache; safe to share between request handlers.
pub struct ResponseCache {
    max_entries: usize,
    max_bytes: usize,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("max_entries", &self.max_entries)
            .field("max_bytes", &self.max_bytes)
            .finish()
    }
}

impl ResponseCache {
    /// Holds at most `max_entries` answers and `max_bytes` of keys and texts.
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            max_entries,
            max_bytes,
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                bytes: 0,
                clock: 0,
            }),
        }
    }

    /// The stored answer for `key`, if any.
    pub fn get(&self, key: &ResponseKey) -> Option<CachedResponse> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.clock += 1;
        let now = g.clock;
        g.map.get_mut(key).map(|(r, used)| {
            *used = now;
            r.clone()
        })
    }

    /// Stores an answer, evicting the least recently used ones beyond the bounds.
    pub fn put(&self, key: ResponseKey, resp: CachedResponse) {
        let size = key.bytes() + resp.text.len();
        if self.max_entries == 0 || size > self.max_bytes {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.clock += 1;
        let now = g.clock;
        if let Some((old, _)) = g.map.remove(&key) {
            g.bytes -= key.bytes() + old.text.len();
        }
        while g.map.len() >= self.max_entries || g.bytes + size > self.max_bytes {
            let Some(k) = g
                .map
                .iter()
                .min_by_key(|(_, (_, u))| *u)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((r, _)) = g.map.remove(&k) {
                g.bytes -= k.bytes() + r.text.len();
            }
        }
        g.bytes += size;
        g.map.insert(key, (resp, now));
    }

    /// Answers held.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::SamplingParams;

    fn resp(t: &str) -> CachedResponse {
        CachedResponse {
            text: t.into(),
            finish_reason: Some(FinishReason::Stop),
            completion_tokens: 1,
        }
    }

    #[test]
    fn keys_only_for_deterministic_requests_and_lru_bounds() {
        let greedy = GenerateRequest::new(vec![1, 2, 3], 4);
        let mut sampled = greedy.clone();
        sampled.sampling = SamplingParams {
            temperature: 0.7,
            seed: 5,
            ..Default::default()
        };
        assert!(ResponseKey::of(&greedy, false).is_some());
        assert!(
            ResponseKey::of(&sampled, false).is_none(),
            "unseeded sampling"
        );
        let ks = ResponseKey::of(&sampled, true).unwrap();
        let mut other_seed = sampled.clone();
        other_seed.sampling.seed = 6;
        assert_ne!(Some(&ks), ResponseKey::of(&other_seed, true).as_ref());
        let mut greedy_seeded = greedy.clone();
        greedy_seeded.sampling.seed = 99;
        assert_eq!(
            ResponseKey::of(&greedy, false),
            ResponseKey::of(&greedy_seeded, true)
        );

        let c = ResponseCache::new(2, 1 << 20);
        let key = |p: u32| ResponseKey::of(&GenerateRequest::new(vec![p], 4), false).unwrap();
        c.put(key(1), resp("a"));
        c.put(key(2), resp("b"));
        assert_eq!(c.get(&key(1)), Some(resp("a"))); // 1 is now the most recent
        c.put(key(3), resp("c"));
        assert_eq!(c.get(&key(2)), None, "least recently used went first");
        assert_eq!(c.len(), 2);
        let tiny = ResponseCache::new(100, 300);
        tiny.put(key(1), resp(&"x".repeat(150)));
        tiny.put(key(2), resp(&"y".repeat(150)));
        assert_eq!(tiny.len(), 1, "byte bound");
        tiny.put(key(3), resp(&"z".repeat(500)));
        assert_eq!(tiny.get(&key(3)), None, "larger than the whole budget");
    }
}
