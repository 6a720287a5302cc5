//! The training ops against candle's ops, and half-width base products against f32, through whole
//! training steps on the fixture models.

use super::*;
use crate::model::train_ops;
use crate::test_util::rel;
use crate::train::data::Batch;

/// Two rows of 11 tokens, the second ending in two pads, as a padded batch does.
fn test_batch(lm: &LoadedModel) -> Batch {
    let vocab = lm.model.config().vocab_size as u32;
    let (rows, len) = (2, 11);
    let ids: Vec<u32> = (0..rows * len)
        .map(|i| (i as u32 * 7919 + 3) % vocab)
        .collect();
    let target: Vec<bool> = (0..rows * len).map(|i| i < 2 * len - 2).collect();
    Batch {
        rows,
        len,
        ids,
        target,
        tokens: 2 * len - 2,
    }
}

/// bf16 base products keep a step's loss and gradients within bf16 rounding of the f32
/// step's; on a CPU without AVX512-BF16 the setting is refused by name.
#[test]
fn bf16_matmul_tracks_the_f32_step_or_is_refused() {
    half_products_track_the_f32_step(HalfProducts::Bf16);
}

/// fp16 base products (64-term fp16 sums) do the same; without AVX512-FP16, refused by name.
#[test]
fn f16_matmul_tracks_the_f32_step_or_is_refused() {
    half_products_track_the_f32_step(HalfProducts::F16);
}

/// Both half widths at once are refused before any loading, naming both flags.
#[test]
fn bf16_and_f16_matmul_together_are_refused() {
    let cfg = TrainConfig {
        bf16_matmul: true,
        f16_matmul: true,
        ..Default::default()
    };
    let err = cfg.validate().expect_err("refused").to_string();
    assert!(
        err.contains("--bf16-matmul") && err.contains("--f16-matmul"),
        "{err}"
    );
}

fn half_products_track_the_f32_step(kind: HalfProducts) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    let lm = LoadedModel::load(&root.join("llama"), &Default::default()).unwrap();
    let (key, isa) = match kind {
        HalfProducts::Bf16 => ("bf16_matmul", "AVX512-BF16"),
        HalfProducts::F16 => ("f16_matmul", "AVX512-FP16"),
    };
    let cfg = |on: bool| TrainConfig {
        rank: 4,
        alpha: 8.0,
        bf16_matmul: on && kind == HalfProducts::Bf16,
        f16_matmul: on && kind == HalfProducts::F16,
        ..Default::default()
    };
    if !train_ops::linear::available(kind) {
        let err = Trainer::new(&lm, cfg(true))
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains(key) && err.contains(isa), "{err}");
        return;
    }
    let batch = test_batch(&lm);
    let b = std::slice::from_ref(&batch);
    // At initialisation B is zero: the loss is the base's alone, and dB carries the whole
    // backward pass through the base's half-width products.
    let (l0, g0) = Trainer::new(&lm, cfg(false))
        .unwrap()
        .loss_and_grads(b)
        .unwrap();
    let (l1, g1) = Trainer::new(&lm, cfg(true))
        .unwrap()
        .loss_and_grads(b)
        .unwrap();
    assert!(((l1 - l0) / l0).abs() < 1e-2, "{kind:?}: loss {l1} vs {l0}");
    assert!(l1 != l0, "{kind:?}: the half-width products did not run");
    // Rounding of activations and gradients, amplified by this fixture's large random
    // weights (initializer range 0.2): with bf16 most gradients land within 1-3% of the f32
    // ones, the worst (a small dB deep in the backward pass) ~7%. A wrong pack or transpose
    // is O(1).
    let mut errs: Vec<f32> = g1
        .iter()
        .zip(&g0)
        .filter(|(_, w)| {
            w.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        })
        .map(|(a, w)| rel(a, w))
        .collect();
    errs.sort_by(f32::total_cmp);
    assert!(!errs.is_empty());
    eprintln!(
        "{kind:?}: loss {l1} vs {l0}; gradient errors median {} worst {}",
        errs[errs.len() / 2],
        errs[errs.len() - 1]
    );
    assert!(
        errs[errs.len() / 2] < 3e-2,
        "{kind:?}: median gradient error {errs:?}"
    );
    assert!(
        errs[errs.len() - 1] < 0.15,
        "{kind:?}: worst gradient error {errs:?}"
    );
}

/// On every fixture architecture (GQA, qkv biases, per-head q/k norms, llama3 rope, a
/// tied head), a training step's loss and every LoRA gradient through tern's training ops
/// (whole decoder layers as one op where they fit) equal those through candle's
/// differentiable ops, after one step so that neither half
/// of any pair is zero. (No fixture slides its attention window; the attention op's own
/// test covers a window.)
#[test]
fn training_ops_match_candle_ops_on_every_architecture() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models");
    for arch in ["llama", "llama3", "mistral", "qwen2", "qwen3", "smollm"] {
        let lm = LoadedModel::load(&root.join(arch), &Default::default()).unwrap();
        let cfg = TrainConfig {
            rank: 4,
            alpha: 8.0,
            ..Default::default()
        };
        let mut t = Trainer::new(&lm, cfg).unwrap();
        let batch = test_batch(&lm);
        let b = std::slice::from_ref(&batch);
        t.step(b, 1e-2).unwrap();
        let runs = || train_ops::layer::RUNS.with(|r| r.get());
        let before = runs();
        let (l0, g0) = t.loss_and_grads(b).unwrap();
        // Each layer ran as one op where nothing in it needs the candle-op path (qkv
        // biases, per-head q/k norms).
        let fused = !matches!(arch, "qwen2" | "qwen3");
        let layers = lm.model.config().num_layers;
        assert_eq!(runs() - before, if fused { layers } else { 0 }, "{arch}");
        let (l1, g1) = train_ops::without(|| t.loss_and_grads(b)).unwrap();
        assert!(((l0 - l1) / l1).abs() < 1e-5, "{arch}: loss {l0} vs {l1}");
        for (n, (a, w)) in t.var_names().iter().zip(g0.iter().zip(&g1)) {
            let e = rel(a, w);
            assert!(
                e < 1e-4,
                "{arch}: {n} differs by {e} (relative to its largest)"
            );
        }
    }
}
