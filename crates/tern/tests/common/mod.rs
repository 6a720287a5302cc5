//! Shared helpers for the integration tests: fixture paths and reference files.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

pub const ARCHS: &[&str] = &["llama", "llama3", "mistral", "qwen2", "qwen3", "smollm"];

pub fn adapter_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/adapters")
        .join(name)
}

/// A second adapter for the llama base: the fixture's pairs with B negated and halved.
pub fn variant(
    lm: &tern::LoadedModel,
    a: &tern::lora::LoraAdapter,
) -> Arc<tern::lora::LoraAdapter> {
    let tensors = a
        .modules()
        .map(|(m, p)| (m.to_string(), p.a.clone(), (p.b().unwrap() * -0.5).unwrap()))
        .collect();
    Arc::new(
        tern::lora::LoraAdapter::from_tensors("neg", a.config().clone(), lm.model.slots(), tensors)
            .unwrap(),
    )
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

#[derive(serde::Deserialize)]
pub struct Chat {
    pub messages: Vec<tern::ChatMessage>,
    pub rendered: String,
    pub input_ids: Vec<u32>,
}

#[derive(serde::Deserialize)]
pub struct Reference {
    pub prompt: String,
    pub input_ids: Vec<u32>,
    pub prompt_logprobs: Vec<Vec<f32>>,
    pub greedy_ids: Vec<u32>,
    pub greedy_logprobs: Vec<f32>,
    pub chat: Chat,
}

pub fn reference(name: &str) -> Reference {
    let p = fixture(name).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// max |a - b| over two tensors of the same shape.
pub fn tensor_max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Log-probabilities `[seq, vocab]` for `ids` run after what `cache` holds.
pub fn logprobs(
    lm: &tern::LoadedModel,
    ids: &[u32],
    cache: &mut tern::model::Cache,
) -> Vec<Vec<f32>> {
    logprobs_with(lm, ids, cache, &tern::lora::BatchAdapters::none())
}

/// As [`logprobs`], with adapters.
pub fn logprobs_with(
    lm: &tern::LoadedModel,
    ids: &[u32],
    cache: &mut tern::model::Cache,
    ad: &tern::lora::BatchAdapters,
) -> Vec<Vec<f32>> {
    let t = candle_core::Tensor::new(ids, lm.model.device())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = lm.model.forward_all_with(&t, cache, ad).unwrap();
    tern::model::attention::log_softmax_last(&logits)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// The largest row-wise max |a - b| over two `[seq, vocab]` tables.
pub fn worst_row_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| max_abs_diff(x, y))
        .fold(0.0, f32::max)
}

/// `ids` as a batch of `n` identical rows on `dev`.
pub fn batch_of(ids: &[u32], n: usize, dev: &candle_core::Device) -> candle_core::Tensor {
    candle_core::Tensor::new(ids, dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .repeat((n, 1))
        .unwrap()
}

/// max |a - b| / max |b|.
pub fn rel(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    let d = tensor_max_abs_diff(a, b);
    let m = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d / m.max(1e-12)
}

/// A copy of the flat directory `from` at `to` (fixture models and adapters have no subdirectories).
pub fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}
