//! Beam search, as `transformers` does it (`generate(num_beams=..., length_penalty=...,
//! no_repeat_ngram_size=..., early_stopping=...)`), so the same settings give the same
//! sequences. The beams share one copy of the prompt's KV cache; only their own tokens are
//! kept per beam (and reordered each step).

use super::sampler::log_softmax;
use crate::error::{Result, TernError};
use crate::lora::{BatchAdapters, LoraAdapter};
use crate::model::LoadedModel;
use std::sync::Arc;

/// When the search stops (transformers' `early_stopping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    /// Stop when no running beam is likely to beat the finished ones (`False`, the default).
    #[default]
    Heuristic,
    /// Stop as soon as `num_beams` hypotheses are finished (`True`).
    Finished,
    /// Only stop when no better hypothesis can exist (`"never"`).
    Never,
}

/// Beam search settings.
#[derive(Debug, Clone)]
pub struct BeamParams {
    /// Beams kept.
    pub num_beams: usize,
    /// Sequences returned, best first (at most `num_beams`).
    pub num_return: usize,
    /// Most tokens generated.
    pub max_tokens: usize,
    /// Finished scores are `sum log p / length^length_penalty`.
    pub length_penalty: f32,
    /// Never repeat an n-gram of this size (0 = off), prompt included.
    pub no_repeat_ngram_size: usize,
    /// Stopping rule.
    pub early_stopping: EarlyStopping,
    /// Token ids that finish a hypothesis (`None`: the model's EOS ids).
    pub eos_ids: Option<Vec<u32>>,
    /// The adapter, if any.
    pub adapter: Option<Arc<LoraAdapter>>,
}

impl BeamParams {
    /// `num_beams` beams, one sequence returned, transformers' other defaults.
    pub fn new(num_beams: usize, max_tokens: usize) -> Self {
        Self {
            num_beams,
            num_return: 1,
            max_tokens,
            length_penalty: 1.0,
            no_repeat_ngram_size: 0,
            early_stopping: EarlyStopping::Heuristic,
            eos_ids: None,
            adapter: None,
        }
    }
}

/// A returned sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Hypothesis {
    /// Generated ids (ending with the EOS id when it finished on one).
    pub ids: Vec<u32>,
    /// Its length-penalised score.
    pub score: f32,
}

/// transformers' stand-in for minus infinity in beam scores.
const NEG: f32 = -1.0e9;

/// Tokens banned after `seq` so that no n-gram of size `n` repeats.
fn banned(seq: &[u32], n: usize) -> Vec<u32> {
    if n == 0 || seq.len() + 1 < n {
        return vec![];
    }
    let tail = &seq[seq.len() + 1 - n..];
    let mut out = vec![];
    for w in seq.windows(n) {
        if &w[..n - 1] == tail {
            out.push(w[n - 1]);
        }
    }
    out
}

/// Runs beam search from `prompt_ids`.
pub fn beam_search(
    lm: &LoadedModel,
    prompt_ids: &[u32],
    p: &BeamParams,
) -> Result<Vec<Hypothesis>> {
    let nb = p.num_beams;
    if nb == 0 || p.num_return == 0 || p.num_return > nb || p.max_tokens == 0 {
        return Err(TernError::InvalidArgument(format!(
            "beam search needs num_beams >= 1, 1 <= num_return ({}) <= num_beams ({nb}) and max_tokens >= 1",
            p.num_return
        )));
    }
    let probe = super::GenerateRequest::new(prompt_ids.to_vec(), p.max_tokens);
    probe.validate(lm)?;
    let eos = p.eos_ids.clone().unwrap_or_else(|| lm.eos_ids.clone());
    let prompt_len = prompt_ids.len();
    let max_len = (prompt_len + p.max_tokens).min(lm.model.config().max_position_embeddings);
    let keep = 2usize.max(1 + eos.len()) * nb;
    let single = BatchAdapters::uniform(p.adapter.clone());
    let mut prompt_cache = lm.model.new_cache();
    let first = lm.model.step_with(prompt_ids, &mut prompt_cache, &single)?;
    // Running beams: their sequences (prompt included) and scores; all start as the prompt,
    // only the first counting.
    let mut run_seqs: Vec<Vec<u32>> = vec![prompt_ids.to_vec(); nb];
    let mut run_scores: Vec<f32> = (0..nb).map(|i| if i == 0 { 0.0 } else { NEG }).collect();
    let mut logits: Vec<Vec<f32>> = vec![first; nb];
    let mut beams_cache = lm.model.new_cache();
    // Finished hypotheses: (sequence, score, finished?) slots, kept sorted best first.
    let mut fin: Vec<(Vec<u32>, f32, bool)> = vec![(vec![], NEG, false); nb];
    let mut improvable = true;
    let mut cur_len = prompt_len;
    loop {
        // Candidates over every (beam, token): accumulated log-probabilities.
        let mut cand: Vec<(f32, usize, u32)> = Vec::with_capacity(nb * 8);
        for (b, l) in logits.iter().enumerate() {
            let mut lp = log_softmax(l);
            for t in banned(&run_seqs[b], p.no_repeat_ngram_size) {
                lp[t as usize] = f32::NEG_INFINITY;
            }
            // Only the best `keep` per beam can make the global top `keep`.
            let mut idx: Vec<usize> = (0..lp.len()).collect();
            let k = keep.min(idx.len());
            idx.select_nth_unstable_by(k - 1, |&x, &y| lp[y].total_cmp(&lp[x]).then(x.cmp(&y)));
            for &t in &idx[..k] {
                cand.push((lp[t] + run_scores[b], b, t as u32));
            }
        }
        // Best first; ties keep the lower flat index, as torch.topk on CPU does.
        let vocab = logits[0].len();
        cand.sort_by(|x, y| {
            y.0.total_cmp(&x.0)
                .then((x.1 * vocab + x.2 as usize).cmp(&(y.1 * vocab + y.2 as usize)))
        });
        cand.truncate(keep);
        let hits: Vec<bool> = cand
            .iter()
            .map(|c| eos.contains(&c.2) || cur_len + 1 >= max_len)
            .collect();
        // Next running beams: the best candidates that did not stop.
        let mut order: Vec<usize> = (0..cand.len()).collect();
        order.sort_by(|&x, &y| {
            let sx = cand[x].0 + if hits[x] { NEG } else { 0.0 };
            let sy = cand[y].0 + if hits[y] { NEG } else { 0.0 };
            sy.total_cmp(&sx).then(x.cmp(&y))
        });
        let next: Vec<usize> = order[..nb].to_vec();
        // Finished: among the top `num_beams` candidates, those that stopped.
        let all_full = fin.iter().all(|f| f.2) && p.early_stopping == EarlyStopping::Finished;
        // As transformers: a Python float power, applied to f32 scores.
        let gen_len = ((cur_len + 1 - prompt_len) as f64).powf(p.length_penalty as f64) as f32;
        let mut merged = fin.clone();
        for (i, c) in cand.iter().enumerate() {
            let mut s = c.0 / gen_len;
            let just_finished = hits[i] && i < nb;
            if all_full {
                s += NEG;
            }
            if !improvable {
                s += NEG;
            }
            if !just_finished {
                s += NEG;
            }
            let mut seq = run_seqs[c.1].clone();
            seq.push(c.2);
            merged.push((seq, s, just_finished));
        }
        let mut mi: Vec<usize> = (0..merged.len()).collect();
        mi.sort_by(|&x, &y| merged[y].1.total_cmp(&merged[x].1).then(x.cmp(&y)));
        fin = mi[..nb].iter().map(|&i| merged[i].clone()).collect();
        // Advance the running beams.
        let new_seqs: Vec<Vec<u32>> = next
            .iter()
            .map(|&i| {
                let mut s = run_seqs[cand[i].1].clone();
                s.push(cand[i].2);
                s
            })
            .collect();
        run_scores = next
            .iter()
            .map(|&i| cand[i].0 + if hits[i] { NEG } else { 0.0 })
            .collect();
        let parents: Vec<u32> = next.iter().map(|&i| cand[i].1 as u32).collect();
        cur_len += 1;
        // Early-stop heuristic and the loop condition.
        let best_len = if p.early_stopping == EarlyStopping::Never && p.length_penalty > 0.0 {
            max_len - prompt_len
        } else {
            cur_len - prompt_len
        } as f64;
        let best_possible = run_scores[0] / best_len.powf(p.length_penalty as f64) as f32;
        let worst_fin = fin.iter().map(|f| f.1).fold(f32::INFINITY, f32::min);
        improvable = improvable
            && fin
                .iter()
                .any(|f| best_possible > if f.2 { worst_fin } else { NEG });
        let open = !(fin.iter().all(|f| f.2) && p.early_stopping == EarlyStopping::Finished);
        let can_continue = !hits.iter().all(|&h| h);
        run_seqs = new_seqs;
        if !(improvable && open && can_continue) {
            break;
        }
        // Run the chosen tokens: reorder the beams' own caches to their parents, then step.
        let ids: Vec<u32> = next.iter().map(|&i| cand[i].2).collect();
        beams_cache = beams_cache.select_rows(&parents)?;
        let per_beam = BatchAdapters::uniform(p.adapter.clone());
        let l = lm
            .model
            .decode_beams(&ids, &prompt_cache, &mut beams_cache, &per_beam)?;
        logits = l.to_vec2::<f32>()?;
    }
    Ok(fin
        .into_iter()
        .take(p.num_return)
        .map(|(seq, score, _)| Hypothesis {
            ids: seq[prompt_len.min(seq.len())..].to_vec(),
            score,
        })
        .collect())
}
