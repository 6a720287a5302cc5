//! A sequence's KV cache: one candle `KvCache` per layer, grown geometrically.

use crate::error::Result;
use candle_core::Tensor;
use candle_nn::kv_cache::KvCache;

/// Positions a fresh per-layer KV buffer holds; [`append_kv`] doubles it as needed. (A fixed
/// 512 had every new sequence zero 24 MB on SmolLM2 before its first token, 134 MB on a
/// Llama-3-8B shape, however short the request.)
pub(crate) const KV_START: usize = 64;

/// `kv.append(k, v)` (`[b, kv_heads, s, head_dim]`), first moving a full cache into a buffer
/// at least twice as large: geometric growth copies each position O(1) times, where candle's
/// fixed growth step would copy the whole cache every step's worth of tokens.
pub(crate) fn append_kv(kv: &mut KvCache, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    let need = kv.current_seq_len() + k.dim(2)?;
    let cap = kv.k_cache().max_seq_len();
    if need > cap {
        let mut grown = KvCache::new(2, (2 * cap).max(need.next_multiple_of(KV_START)));
        if let (Some(ok), Some(ov), true) = (kv.k()?, kv.v()?, kv.current_seq_len() > 0) {
            grown.append(&ok.contiguous()?, &ov.contiguous()?)?;
        }
        *kv = grown;
    }
    Ok(kv.append(k, v)?)
}

/// Per-sequence attention state: one KV buffer per layer plus the position reached.
#[derive(Debug, Clone)]
pub struct Cache {
    pub(crate) layers: Vec<KvCache>,
    pub(crate) pos: usize,
}

impl Cache {
    /// Number of tokens already in the cache.
    pub fn len(&self) -> usize {
        self.pos
    }

    /// Whether nothing has been run yet.
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Forgets everything, keeping the buffers.
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| l.reset());
        self.pos = 0;
    }

    /// An independent copy of the first `len` positions (the buffers of a clone would be
    /// shared, and appends write in place).
    pub fn copy_prefix(&self, len: usize) -> Result<Cache> {
        let len = len.min(self.pos);
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let mut c = KvCache::new(2, KV_START.max(len.next_multiple_of(KV_START)));
            if let (Some(k), Some(v), true) = (l.k()?, l.v()?, len > 0) {
                c.append(
                    &k.narrow(2, 0, len)?.contiguous()?,
                    &v.narrow(2, 0, len)?.contiguous()?,
                )?;
            }
            layers.push(c);
        }
        Ok(Cache { layers, pos: len })
    }

    /// Bytes of keys and values held for the positions in use.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .filter_map(|l| l.k().ok().flatten())
            .map(|k| 2 * k.elem_count() * k.dtype().size_in_bytes())
            .sum()
    }

    /// Reorders (and repeats) batch rows: row `i` of the result is row `rows[i]` of this
    /// cache (beam search keeping the best continuations).
    pub fn select_rows(&self, rows: &[u32]) -> Result<Cache> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let mut c = KvCache::new(2, KV_START);
            if let (Some(k), Some(v)) = (l.k()?, l.v()?) {
                let idx = Tensor::new(rows, k.device())?;
                append_kv(
                    &mut c,
                    &k.contiguous()?.index_select(&idx, 0)?,
                    &v.contiguous()?.index_select(&idx, 0)?,
                )?;
            }
            layers.push(c);
        }
        Ok(Cache {
            layers,
            pos: self.pos,
        })
    }

    /// Keeps only the first `len` positions (a shared prefix), so a sequence that diverges
    /// from what was cached runs again only from the divergence.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.pos {
            return Ok(());
        }
        for l in &mut self.layers {
            // candle's cache has no truncation: copy the prefix into fresh buffers (cheap next
            // to running the tokens again).
            let kept = match (l.k()?, l.v()?) {
                (Some(k), Some(v)) if len > 0 => Some((
                    k.narrow(2, 0, len)?.contiguous()?,
                    v.narrow(2, 0, len)?.contiguous()?,
                )),
                _ => None,
            };
            l.reset();
            if let Some((k, v)) = kept {
                append_kv(l, &k, &v)?;
            }
        }
        self.pos = len;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn kv_buffers_grow_geometrically_and_keep_every_position() {
        let dev = Device::Cpu;
        let all = |n: usize, base: f32| {
            let v: Vec<f32> = (0..2 * 3 * n * 4).map(|i| base + i as f32).collect();
            Tensor::from_vec(v, (2, 3, n, 4), &dev).unwrap()
        };
        let (k, v) = (all(300, 0.0), all(300, 1e5));
        let mut kv = KvCache::new(2, KV_START);
        let (mut at, mut caps) = (0, vec![]);
        // Pieces of 1 (decode), odd sizes and one past the whole buffer at once.
        for n in [1, 5, 58, 1, 100, 135] {
            let (ko, vo) = append_kv(
                &mut kv,
                &k.narrow(2, at, n).unwrap().contiguous().unwrap(),
                &v.narrow(2, at, n).unwrap().contiguous().unwrap(),
            )
            .unwrap();
            at += n;
            let diff = crate::test_util::max_abs_diff;
            assert_eq!(ko.dim(2).unwrap(), at);
            assert_eq!(diff(&ko, &k.narrow(2, 0, at).unwrap()), 0.0);
            assert_eq!(diff(&vo, &v.narrow(2, 0, at).unwrap()), 0.0);
            caps.push(kv.k_cache().max_seq_len());
        }
        // 64 holds the first 64 positions; then doubling, or the need when that is more.
        assert_eq!(caps, vec![64, 64, 64, 128, 256, 512]);
    }
}
