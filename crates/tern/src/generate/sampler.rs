//! Turning logits into the next token: greedy, or temperature sampling with top-k, top-p,
//! min-p and a repetition penalty, from a seeded RNG so runs repeat exactly.

use crate::error::{Result, TernError};
use crate::quant::vexp::sum_exp;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings; `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 picks the most likely token.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p (1 = off).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the best one (0 = off).
    pub min_p: f32,
    /// Penalty for tokens already seen (1 = off), as in `transformers`.
    pub repetition_penalty: f32,
    /// RNG seed.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Checks every field's range, naming the one at fault.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(TernError::InvalidArgument(m));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// A sampler with its RNG state.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// The chosen token and its log-probability under the raw logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampled {
    /// Token id.
    pub id: u32,
    /// `log_softmax(raw logits)[id]`.
    pub logprob: f32,
}

/// `log_softmax` of a whole row.
pub(crate) fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = sum_exp(logits, max).ln() as f32;
    logits.iter().map(|&l| (l - max) - lse).collect()
}

/// Every decoded token pays this, a sum over the whole vocabulary (vectorised: through libm
/// it was ~3% of a SmolLM2 decode step on the critical thread).
fn log_softmax_at(logits: &[f32], id: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (logits[id] - max) - sum_exp(logits, max).ln() as f32
}

impl Sampler {
    /// Builds a sampler after validating the parameters.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Self { params, rng })
    }

    /// Picks the next token from `logits`, given the tokens seen so far (for the penalty).
    pub fn sample(&mut self, logits: &[f32], seen: &[u32]) -> Result<Sampled> {
        if logits.is_empty() {
            return Err(TernError::InvalidArgument("empty logits".into()));
        }
        if logits.iter().any(|l| l.is_nan()) {
            return Err(TernError::InvalidArgument(
                "model produced NaN logits".into(),
            ));
        }
        let p = &self.params;
        let mut work: std::borrow::Cow<[f32]> = std::borrow::Cow::Borrowed(logits);
        if p.repetition_penalty != 1.0 {
            let w = work.to_mut();
            for &t in seen {
                if let Some(l) = w.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        let id = if p.temperature == 0.0 {
            argmax(&work)
        } else {
            self.sample_filtered(&work)
        };
        Ok(Sampled {
            id: id as u32,
            logprob: log_softmax_at(logits, id),
        })
    }

    fn sample_filtered(&mut self, logits: &[f32]) -> usize {
        let p = &self.params;
        let mut cand: Vec<(usize, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i, l / p.temperature))
            .collect();
        // Sorting the whole vocabulary for every token (~1-2 ms for 49K entries, a sizeable
        // share of a small model's decode step) only where a filter needs the order: top-k
        // selects its k first and sorts those; plain temperature sampling needs no order.
        let desc = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1);
        let top_k = p.top_k > 0 && p.top_k < cand.len();
        if top_k {
            cand.select_nth_unstable_by(p.top_k - 1, desc);
            cand.truncate(p.top_k);
        }
        if top_k || p.top_p < 1.0 || p.min_p > 0.0 {
            cand.sort_unstable_by(desc);
        }
        let max = cand.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.1));
        let mut probs: Vec<f32> = cand.iter().map(|(_, l)| (l - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        let mut keep = probs.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, pr) in probs.iter().enumerate() {
                acc += pr;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            keep = keep.min(probs.iter().take_while(|&&x| x >= floor).count().max(1));
        }
        let probs = &probs[..keep];
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, pr) in probs.iter().enumerate() {
            r -= pr;
            if r <= 0.0 {
                return cand[i].0;
            }
        }
        cand[keep - 1].0
    }
}

/// Index of the largest value (first on ties, as torch's argmax).
pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_picks_max_and_reports_logprob() {
        let mut s = Sampler::new(params(0.0)).unwrap();
        let r = s.sample(&[0.0, 2.0, 1.0], &[]).unwrap();
        assert_eq!(r.id, 1);
        let expect = 2.0 - (1f32 + 2f32.exp() + 1f32.exp()).ln();
        assert!((r.logprob - expect).abs() < 1e-6);
    }

    #[test]
    fn repetition_penalty_changes_the_choice() {
        let p = SamplingParams {
            repetition_penalty: 4.0,
            ..params(0.0)
        };
        let mut s = Sampler::new(p).unwrap();
        assert_eq!(s.sample(&[1.0, 2.0, 1.5], &[1]).unwrap().id, 2);
    }

    #[test]
    fn filters_restrict_the_support_and_seed_repeats() {
        let logits = [3.0, 2.9, 0.0, -1.0, 2.8];
        for (k, top_p, min_p, allowed) in [
            (2, 1.0, 0.0, vec![0, 1]),
            (0, 0.5, 0.0, vec![0, 1]),
            (0, 1.0, 0.5, vec![0, 1, 4]),
        ] {
            let p = SamplingParams {
                top_k: k,
                top_p,
                min_p,
                seed: 7,
                ..params(1.0)
            };
            let mut s = Sampler::new(p.clone()).unwrap();
            let a: Vec<u32> = (0..200)
                .map(|_| s.sample(&logits, &[]).unwrap().id)
                .collect();
            assert!(a.iter().all(|i| allowed.contains(&(*i as usize))), "{a:?}");
            let mut s2 = Sampler::new(p).unwrap();
            let b: Vec<u32> = (0..200)
                .map(|_| s2.sample(&logits, &[]).unwrap().id)
                .collect();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn unsorted_and_selected_candidates_sample_the_right_distribution() {
        // Plain temperature sampling (no sort): frequencies follow the softmax.
        let mut s = Sampler::new(SamplingParams {
            seed: 3,
            ..params(1.0)
        })
        .unwrap();
        let logits = [0.0, 3f32.ln(), f32::NEG_INFINITY];
        let n = 8000;
        let ones = (0..n)
            .filter(|_| s.sample(&logits, &[]).unwrap().id == 1)
            .count();
        let freq = ones as f64 / n as f64;
        assert!((freq - 0.75).abs() < 0.03, "P(1) = {freq}, expected 0.75");
        // Top-k by selection over a large vocabulary keeps exactly the k largest.
        let big: Vec<f32> = (0..5000)
            .map(|i| ((i * 7919) % 5000) as f32 / 1000.0)
            .collect();
        let mut top: Vec<usize> = (0..big.len()).collect();
        top.sort_by(|&a, &b| big[b].total_cmp(&big[a]));
        let mut s = Sampler::new(SamplingParams {
            top_k: 5,
            seed: 4,
            ..params(0.5)
        })
        .unwrap();
        let seen: std::collections::BTreeSet<usize> = (0..400)
            .map(|_| s.sample(&big, &[]).unwrap().id as usize)
            .collect();
        assert!(seen.iter().all(|i| top[..5].contains(i)), "{seen:?}");
        assert!(seen.len() >= 3, "{seen:?}");
    }

    #[test]
    fn bad_params_are_refused() {
        assert!(Sampler::new(params(-1.0)).is_err());
        assert!(Sampler::new(SamplingParams {
            top_p: 0.0,
            ..params(1.0)
        })
        .is_err());
        assert!(Sampler::new(SamplingParams {
            min_p: 2.0,
            ..params(1.0)
        })
        .is_err());
    }
}
