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
fn log_softmax_at(logits: &[f32], id: usize, max: f32) -> f32 {
    (logits[id] - max) - sum_exp(logits, max).ln() as f32
}

/// Lanes of [`scan`]: values in runs of this many.
const LANES: usize = 8;

/// One pass over the logits: the largest value, the first index holding it, and whether any
/// value is NaN. [`LANES`] independent lanes each keep their own maximum and the first index
/// of it (vector compares and blends with AVX2); the lanes' results then give the first index
/// of the overall maximum, as [`argmax`] does. Three scalar passes (NaN check, argmax,
/// maximum) had cost ~60 us per row of a 49K vocabulary, serial between batched decode steps
/// (~5% of an eight-row SmolLM2 step).
fn scan(v: &[f32]) -> (f32, usize, bool) {
    let full = v.len() - v.len() % LANES;
    let (max, at, nan) = lanes(&v[..full]);
    let (mut best, mut first) = (f32::NEG_INFINITY, 0);
    for l in 0..LANES {
        if max[l] > best || (max[l] == best && at[l] < first) {
            (best, first) = (max[l], at[l]);
        }
    }
    let mut nan = nan;
    for (i, &x) in v[full..].iter().enumerate() {
        nan |= x.is_nan();
        if x > best {
            (best, first) = (x, full + i);
        }
    }
    (best, first, nan)
}

/// Each lane's maximum over `v` (a multiple of [`LANES`] long; -inf if it never rose above),
/// the first index of it (0 if never), and whether any value is NaN.
fn lanes(v: &[f32]) -> ([f32; LANES], [usize; LANES], bool) {
    #[cfg(target_arch = "x86_64")]
    if crate::quant::use_avx2() && v.len() <= u32::MAX as usize {
        // SAFETY: the CPU reports avx2, and indices fit the 32-bit lanes.
        return unsafe { lanes_avx2(v) };
    }
    lanes_portable(v)
}

/// [`lanes`] in plain Rust.
fn lanes_portable(v: &[f32]) -> ([f32; LANES], [usize; LANES], bool) {
    let (mut max, mut at, mut nan) = ([f32::NEG_INFINITY; LANES], [0; LANES], false);
    for (c, chunk) in v.chunks_exact(LANES).enumerate() {
        for l in 0..LANES {
            nan |= chunk[l].is_nan();
            if chunk[l] > max[l] {
                (max[l], at[l]) = (chunk[l], c * LANES + l);
            }
        }
    }
    (max, at, nan)
}

/// [`lanes`] with AVX2: a greater-than compare picks, per lane, the new value and its index.
///
/// # Safety
/// The CPU must support avx2; `v.len()` fits in a `u32`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn lanes_avx2(v: &[f32]) -> ([f32; LANES], [usize; LANES], bool) {
    use std::arch::x86_64::*;
    let mut max = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut at = _mm256_setzero_si256();
    let mut index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut nan = _mm256_setzero_ps();
    for chunk in v.chunks_exact(LANES) {
        let x = _mm256_loadu_ps(chunk.as_ptr());
        nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
        let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(x, max);
        max = _mm256_blendv_ps(max, x, gt);
        at = _mm256_blendv_epi8(at, index, _mm256_castps_si256(gt));
        index = _mm256_add_epi32(index, _mm256_set1_epi32(LANES as i32));
    }
    let (mut m, mut a) = ([0f32; LANES], [0u32; LANES]);
    _mm256_storeu_ps(m.as_mut_ptr(), max);
    _mm256_storeu_si256(a.as_mut_ptr() as *mut __m256i, at);
    (m, a.map(|i| i as usize), _mm256_movemask_ps(nan) != 0)
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
        let (max, first_max, nan) = scan(logits);
        if nan {
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
            match work {
                std::borrow::Cow::Borrowed(_) => first_max,
                std::borrow::Cow::Owned(_) => argmax(&work),
            }
        } else {
            self.sample_filtered(&work)
        };
        Ok(Sampled {
            id: id as u32,
            logprob: log_softmax_at(logits, id, max),
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

    /// The one-pass scan equals the three scalar passes it replaced: ties (first index wins),
    /// -inf everywhere, lengths off the lane count, a maximum in the tail, and NaN anywhere.
    #[test]
    fn one_pass_scan_equals_argmax_max_and_nan_check() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut cases: Vec<Vec<f32>> = vec![
            vec![f32::NEG_INFINITY; 19],
            vec![2.0; 16],
            vec![-1.0, 5.0],
            vec![0.0, -0.0, 0.0],
        ];
        for n in [1, 7, 8, 9, 17, 64, 1001] {
            // Few distinct values, so that ties are common.
            cases.push((0..n).map(|_| rng.random_range(-3..4) as f32).collect());
        }
        let mut tail = vec![1.0; 20];
        tail[17] = 9.0;
        cases.push(tail);
        let mut with_nan = cases[6].clone();
        with_nan[3] = f32::NAN;
        cases.push(with_nan);
        let mut nan_in_tail = vec![0.5; 11];
        nan_in_tail[10] = f32::NAN;
        cases.push(nan_in_tail);
        for v in &cases {
            let (max, first, nan) = scan(v);
            assert_eq!(nan, v.iter().any(|x| x.is_nan()), "{v:?}");
            let full = &v[..v.len() - v.len() % LANES];
            #[cfg(target_arch = "x86_64")]
            if crate::quant::use_avx2() {
                // SAFETY: avx2 is present; the lengths are small.
                let (m, a, n) = unsafe { lanes_avx2(full) };
                let (pm, pa, pn) = lanes_portable(full);
                assert_eq!((m.map(f32::to_bits), a, n), (pm.map(f32::to_bits), pa, pn));
            }
            if !nan {
                assert_eq!(first, argmax(v), "{v:?}");
                let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                assert_eq!(max.to_bits(), m.to_bits(), "{v:?}");
            }
        }
    }

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
