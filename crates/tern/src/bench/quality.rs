//! `tern bench quality`: perplexity of a fixed English text (shipped in the binary) under a
//! model as stored and quantized several ways, so a quantization's cost is one number.
//!
//! The text is scored in windows of `ctx` tokens that overlap by half; each token is scored
//! once, with at least half a window of context before it (except in the first window), as
//! Hugging Face's perplexity guide does. Logits come from the prompt path, which multiplies
//! by the stored weights exactly (quantized ones dequantized), so the figure measures the
//! weights, not the decode kernels' activation rounding; rows marked "int8 prompts" measure
//! that rounding as well.

use crate::error::{Result, TernError};
use crate::lora::BatchAdapters;
use crate::model::attention::log_softmax_last;
use crate::model::{LoadOptions, LoadedModel};
use crate::quant::QuantType;
use candle_core::{Tensor, D};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The scored text: about 1,400 words of plain expository prose written for this benchmark.
pub const TEXT: &str = include_str!("data/perplexity.txt");

/// One model to score.
#[derive(Debug, Clone)]
pub struct QualityVariant {
    /// Label in the table (`f32`, `q8_0`, a file name).
    pub label: String,
    /// Checkpoint.
    pub path: PathBuf,
    /// Quantization at load, if any.
    pub quantize: Option<QuantType>,
    /// Score through the int8 prompt products ([`LoadOptions::int8_prompts`]) instead of
    /// the exact ones: what that option costs.
    pub int8_prompts: bool,
}

/// One row of the result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QualityRow {
    /// What was scored.
    pub label: String,
    /// exp(mean negative log-likelihood per token).
    pub perplexity: f64,
    /// Change against the first row, percent.
    pub delta_pct: f64,
    /// Seconds to load and score.
    pub seconds: f64,
}

/// The whole measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QualityBench {
    /// Tokens of the text (by the first variant's tokenizer).
    pub tokens: usize,
    /// Window length.
    pub ctx: usize,
    /// One row per variant, the first being the reference for `delta_pct`.
    pub rows: Vec<QualityRow>,
}

/// Mean negative log-likelihood of `ids[1..]` under `lm`, in windows of `ctx`.
pub fn mean_nll(lm: &LoadedModel, ids: &[u32], ctx: usize) -> Result<f64> {
    let ctx = ctx.max(2);
    let stride = (ctx / 2).max(1);
    let (mut sum, mut count) = (0f64, 0usize);
    // `scored` = index of the next target token not yet scored.
    let mut scored = 1;
    let mut begin = 0;
    while scored < ids.len() {
        let end = (begin + ctx).min(ids.len());
        let window = &ids[begin..end];
        let input = Tensor::new(window, lm.model.device())?.unsqueeze(0)?;
        let logits =
            lm.model
                .forward_all_with(&input, &mut lm.model.new_cache(), &BatchAdapters::none())?;
        let lp = log_softmax_last(&logits)?.squeeze(0)?;
        // Position i of the window predicts window[i + 1] = ids[begin + i + 1].
        let first = scored - begin - 1;
        let n = window.len() - 1 - first;
        let targets = Tensor::new(&window[first + 1..], lp.device())?.unsqueeze(1)?;
        let picked = lp.narrow(0, first, n)?.gather(&targets, D::Minus1)?;
        sum -= picked
            .to_dtype(candle_core::DType::F64)?
            .sum_all()?
            .to_scalar::<f64>()?;
        count += n;
        scored = end;
        if end == ids.len() {
            break;
        }
        begin += stride;
    }
    if count == 0 {
        return Err(TernError::InvalidArgument(
            "the text is too short to score (needs at least 2 tokens)".into(),
        ));
    }
    Ok(sum / count as f64)
}

/// Scores [`TEXT`] under each variant (loaded one at a time).
pub fn run(variants: &[QualityVariant], load: &LoadOptions, ctx: usize) -> Result<QualityBench> {
    let mut rows: Vec<QualityRow> = Vec::new();
    let mut tokens = 0;
    for v in variants {
        let t = Instant::now();
        let lm = LoadedModel::load(
            &v.path,
            &LoadOptions {
                quantize: v.quantize,
                int8_prompts: v.int8_prompts,
                ..load.clone()
            },
        )?;
        let ids = lm.tokenizer.encode(TEXT, true)?;
        if tokens == 0 {
            tokens = ids.len();
        }
        let ppl = mean_nll(&lm, &ids, ctx)?.exp();
        let base = rows.first().map(|r| r.perplexity).unwrap_or(ppl);
        rows.push(QualityRow {
            label: v.label.clone(),
            perplexity: ppl,
            delta_pct: (ppl / base - 1.0) * 100.0,
            seconds: t.elapsed().as_secs_f64(),
        });
    }
    Ok(QualityBench { tokens, ctx, rows })
}

/// The variants `tern bench quality` scores by default for a model: as stored, then each type.
pub fn variants(path: &Path, types: &[QuantType]) -> Vec<QualityVariant> {
    let stored = QualityVariant {
        label: "as stored".into(),
        path: path.to_path_buf(),
        quantize: None,
        int8_prompts: false,
    };
    std::iter::once(stored)
        .chain(types.iter().map(|&q| QualityVariant {
            label: q.to_string(),
            path: path.to_path_buf(),
            quantize: Some(q),
            int8_prompts: false,
        }))
        .collect()
}

/// `variants` with each quantized one (a GGUF file or a quantize-at-load type) followed by
/// itself scored through the int8 prompt products.
pub fn with_int8_prompts(variants: Vec<QualityVariant>) -> Vec<QualityVariant> {
    let mut out = Vec::with_capacity(variants.len() * 2);
    for v in variants {
        let quantized = v.quantize.is_some()
            || v.path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        let int8 = quantized.then(|| QualityVariant {
            label: format!("{}, int8 prompts", v.label),
            int8_prompts: true,
            ..v.clone()
        });
        out.push(v);
        out.extend(int8);
    }
    out
}
