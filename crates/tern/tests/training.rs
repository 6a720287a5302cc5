//! LoRA training against PEFT/torch (scripts/fixtures/make_train_fixtures.py): loss and every
//! LoRA gradient for a padded, completion-only batch within 1e-4 relative, the clipped AdamW
//! step after it; memorisation; resume equal to an uninterrupted run; NaN stops cleanly;
//! data formats and bad lines.

mod common;

use candle_core::{DType, Device};
use common::*;
use std::path::{Path, PathBuf};
use tern::checkpoint::safetensors::TensorFile;
use tern::train::data::{load_jsonl, Batch};
use tern::train::{TrainConfig, Trainer};
use tern::{GenerateRequest, LoadOptions, LoadedModel};

fn train_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/train")
        .join(name)
}

#[derive(serde::Deserialize)]
struct Ref {
    input_ids: Vec<Vec<u32>>,
    labels: Vec<Vec<i64>>,
    loss: f64,
    grad_norm: f64,
    loss_after_step: f64,
}

fn train_reference() -> Ref {
    serde_json::from_str(&std::fs::read_to_string(train_fixture("reference.json")).unwrap())
        .unwrap()
}

/// The fixture's padded batch: targets where torch's labels are not -100.
fn reference_batch(r: &Ref) -> Batch {
    Batch {
        rows: r.input_ids.len(),
        len: r.input_ids[0].len(),
        ids: r.input_ids.concat(),
        target: r.labels.concat().iter().map(|&l| l != -100).collect(),
        tokens: 0,
    }
}

fn load(p: &Path) -> LoadedModel {
    LoadedModel::load(p, &LoadOptions::default()).unwrap()
}

fn cfg(v: serde_json::Value) -> TrainConfig {
    TrainConfig::load(None, v).unwrap()
}

#[test]
fn loss_grads_and_step_match_peft() {
    let r = train_reference();
    let lm = load(&fixture("llama"));
    let c = cfg(serde_json::json!({"weight_decay": 0.1, "max_grad_norm": 0.5}));
    let mut t = Trainer::from_adapter(&lm, c, &train_fixture("adapter_init")).unwrap();
    let batch = reference_batch(&r);
    let (loss, grads) = t.loss_and_grads(std::slice::from_ref(&batch)).unwrap();
    assert!(
        ((loss - r.loss) / r.loss).abs() < 1e-4,
        "loss {loss} vs torch {}",
        r.loss
    );
    let want = TensorFile::open(&train_fixture("grads.safetensors")).unwrap();
    for (name, g) in t.var_names().iter().zip(&grads) {
        let w = want.tensor(name, DType::F32, &Device::Cpu).unwrap();
        // tern trains B transposed.
        let g = if name.contains("lora_B") {
            g.t().unwrap()
        } else {
            g.clone()
        };
        let e = rel(&g, &w);
        assert!(e < 1e-4, "{name}: relative gradient error {e}");
    }
    let (_, norm) = t.step(std::slice::from_ref(&batch), 1e-2).unwrap();
    assert!(
        ((norm - r.grad_norm) / r.grad_norm).abs() < 1e-4,
        "grad norm {norm} vs {}",
        r.grad_norm
    );
    let after = TensorFile::open(&train_fixture("after_step.safetensors")).unwrap();
    for (name, v) in t.var_names().iter().zip(t.vars()) {
        let w = after.tensor(name, DType::F32, &Device::Cpu).unwrap();
        let v = if name.contains("lora_B") {
            v.as_tensor().t().unwrap()
        } else {
            v.as_tensor().clone()
        };
        let d = tensor_max_abs_diff(&v, &w);
        assert!(d < 1e-6, "{name}: after one AdamW step differs by {d}");
    }
    let (loss2, _) = t.loss_and_grads(&[batch]).unwrap();
    assert!(
        ((loss2 - r.loss_after_step) / r.loss_after_step).abs() < 1e-4,
        "{loss2} vs {}",
        r.loss_after_step
    );
}

fn memorise_cfg() -> serde_json::Value {
    serde_json::json!({"rank": 8, "alpha": 16, "lr": 1e-2, "epochs": 60, "batch_size": 4,
                       "lr_schedule": "constant", "max_grad_norm": 1.0, "seed": 7})
}

#[test]
fn training_memorises_prompt_completion_pairs() {
    let tmp = memorise_and_check(&load(&fixture("llama")));
    let png = std::fs::read(tmp.path().join("loss.png")).unwrap();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000,
        "loss curve"
    );
}

#[test]
fn qlora_over_a_q8_0_base_memorises_and_leaves_the_base_alone() {
    let opts = LoadOptions {
        quantize: Some(tern::quant::QuantType::Q8_0),
        ..Default::default()
    };
    let lm = LoadedModel::load(&fixture("llama"), &opts).unwrap();
    assert!(lm.model.is_quantized());
    let ids = train_reference().input_ids[0].clone();
    let before = logprobs(&lm, &ids, &mut lm.model.new_cache());
    memorise_and_check(&lm);
    // Gradients reach the input through the dequantized weights, never the weights.
    let after = logprobs(&lm, &ids, &mut lm.model.new_cache());
    assert_eq!(before, after, "the frozen base changed");
}

/// Trains `memorise.jsonl` into a fresh adapter on `lm` and checks every completion comes
/// back greedily and stops; returns the output directory.
fn memorise_and_check(lm: &LoadedModel) -> tempfile::TempDir {
    let data = load_jsonl(&train_fixture("memorise.jsonl"), lm, 64, false).unwrap();
    let mut t = Trainer::new(lm, cfg(memorise_cfg())).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let rep = t.run(&data, &[], tmp.path(), |_| {}).unwrap();
    assert!(rep.final_loss < 0.05, "final loss {}", rep.final_loss);
    let a = lm.load_adapter(tmp.path(), "trained").unwrap();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(train_fixture("memorise.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for l in &lines {
        let prompt = lm
            .tokenizer
            .encode(l["prompt"].as_str().unwrap(), true)
            .unwrap();
        let out = lm
            .generate_collect(GenerateRequest::new(prompt, 12).with_adapter(Some(a.clone())))
            .unwrap();
        assert_eq!(out.text, l["completion"].as_str().unwrap(), "{l}");
        assert_eq!(
            out.finish_reason,
            Some(tern::FinishReason::Stop),
            "it learned to stop"
        );
    }
    // metrics.jsonl has one line per step.
    let m = std::fs::read_to_string(tmp.path().join("metrics.jsonl")).unwrap();
    assert_eq!(m.lines().count(), rep.steps);
    tmp
}

#[test]
fn resume_continues_to_the_same_adapter() {
    let lm = load(&fixture("llama"));
    let data = load_jsonl(&train_fixture("memorise.jsonl"), &lm, 64, false).unwrap();
    let c = serde_json::json!({"rank": 4, "lr": 5e-3, "max_steps": 6, "batch_size": 2, "save_every": 3,
                               "keep_checkpoints": 5, "warmup_ratio": 0.3, "weight_decay": 0.01});
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut t = Trainer::new(&lm, cfg(c.clone())).unwrap();
    t.run(&data, &[], a.path(), |_| {}).unwrap();
    // An interrupted run: the same config, started again from its step-3 checkpoint.
    let mut t2 = Trainer::new(&lm, cfg(c.clone())).unwrap();
    t2.resume_from(&a.path().join("checkpoint-3")).unwrap();
    t2.run(&data, &[], b.path(), |_| {}).unwrap();
    for (x, y) in t.vars().iter().zip(t2.vars()) {
        let d = tensor_max_abs_diff(x.as_tensor(), y.as_tensor());
        assert_eq!(d, 0.0, "resumed run differs");
    }
}

#[test]
fn nan_loss_stops_with_a_clear_error_and_keeps_checkpoints() {
    let lm = load(&fixture("llama"));
    let data = load_jsonl(&train_fixture("memorise.jsonl"), &lm, 64, false).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut t = Trainer::new(&lm, cfg(serde_json::json!({"lr": 1e30, "max_steps": 20, "batch_size": 2, "save_every": 1, "max_grad_norm": 0}))).unwrap();
    let e = t
        .run(&data, &[], tmp.path(), |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("NaN") && e.contains("lower --lr"), "{e}");
    for (_, dir) in tern::train::checkpoint::checkpoints(tmp.path()) {
        let a = lm.load_adapter(&dir, "x").unwrap();
        for (_, p) in a.modules() {
            assert!(p
                .a
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .is_finite());
        }
    }
}

#[test]
fn data_formats_masks_and_bad_lines() {
    let lm = load(&fixture("llama"));
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("d.jsonl");
    std::fs::write(
        &p,
        [
            r#"{"text": "The quick brown fox"}"#,
            r#"{"prompt": "Hi", "completion": " there"}"#,
            r#"{"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#,
            r#"{"instruction": "Say hi", "input": "", "output": "hi"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let d = load_jsonl(&p, &lm, 512, false).unwrap();
    assert_eq!(d.len(), 4);
    let targets = |i: usize| {
        d[i].ids
            .iter()
            .zip(&d[i].target)
            .filter(|(_, &t)| t)
            .map(|(&id, _)| id)
            .collect::<Vec<u32>>()
    };
    // text: everything but the first token; prompt/completion: the completion and EOS.
    assert_eq!(targets(0).len(), d[0].ids.len() - 1);
    let mut want = lm.tokenizer.encode(" there", false).unwrap();
    want.push(lm.eos_ids[0]);
    assert_eq!(targets(1), want);
    // chat: only the assistant's content and its end-of-turn tokens.
    let text = lm.tokenizer.decode(&targets(2)).unwrap();
    assert!(
        text.starts_with("Hello") && !text.contains("terse"),
        "{text:?}"
    );
    let text = lm.tokenizer.decode(&targets(3)).unwrap();
    assert!(text.starts_with("hi"), "{text:?}");

    std::fs::write(&p, "{\"text\": \"ok\"}\n{\"prompt\": \"x\"}\n").unwrap();
    let e = load_jsonl(&p, &lm, 512, false).unwrap_err().to_string();
    assert!(
        e.contains("line 2") && e.contains("prompt") && e.contains("completion"),
        "{e}"
    );
    std::fs::write(&p, "{\"text\": \"ok\"}\nnot json\n").unwrap();
    let e = load_jsonl(&p, &lm, 512, false).unwrap_err().to_string();
    assert!(e.contains("line 2") && e.contains("not valid JSON"), "{e}");
}

#[test]
fn lora_dropout_is_seeded_and_only_in_training() {
    let r = train_reference();
    let lm = load(&fixture("llama"));
    let batch = reference_batch(&r);
    let run = |p: f64| {
        let t = Trainer::from_adapter(
            &lm,
            cfg(serde_json::json!({ "dropout": p })),
            &train_fixture("adapter_init"),
        )
        .unwrap();
        t.loss_and_grads(std::slice::from_ref(&batch)).unwrap().0
    };
    let (a, b, none) = (run(0.3), run(0.3), run(0.0));
    assert_eq!(a, b, "same seed, same masks");
    assert!(
        (a - none).abs() > 1e-3,
        "dropout changed nothing: {a} vs {none}"
    );
    assert!(((none - r.loss) / r.loss).abs() < 1e-4);
}

#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let r = train_reference();
    let lm = load(&fixture("llama"));
    let batch = reference_batch(&r);
    let grads = |gc: bool| {
        let c = cfg(serde_json::json!({ "grad_checkpointing": gc, "dropout": 0.2 }));
        let t = Trainer::from_adapter(&lm, c, &train_fixture("adapter_init")).unwrap();
        t.loss_and_grads(std::slice::from_ref(&batch)).unwrap()
    };
    let ((l0, g0), (l1, g1)) = (grads(false), grads(true));
    assert!((l0 - l1).abs() < 1e-6, "{l0} vs {l1}");
    for (a, b) in g0.iter().zip(&g1) {
        let e = rel(b, a);
        assert!(e < 1e-5, "checkpointed gradient differs by {e} (relative)");
    }
}

#[test]
fn eval_keeps_the_best_adapter_and_stops_early() {
    let lm = load(&fixture("llama"));
    let data = load_jsonl(&train_fixture("memorise.jsonl"), &lm, 64, false).unwrap();
    // Held-out text the memorisation can only make worse.
    let tmp = tempfile::tempdir().unwrap();
    let ev = tmp.path().join("eval.jsonl");
    std::fs::write(
        &ev,
        "{\"text\": \"The quick brown fox jumps over the lazy dog. café\"}\n",
    )
    .unwrap();
    let eval = load_jsonl(&ev, &lm, 64, false).unwrap();
    let c = cfg(
        serde_json::json!({"rank": 8, "lr": 1e-2, "epochs": 100, "lr_schedule": "constant",
                                   "eval_every": 1, "early_stopping_patience": 3}),
    );
    let mut t = Trainer::new(&lm, c).unwrap();
    let out = tmp.path().join("out");
    let mut evals = Vec::new();
    let rep = t
        .run(&data, &eval, &out, |r| evals.push(r.eval_loss.unwrap()))
        .unwrap();
    assert!(rep.stopped_early && rep.steps < 100, "{rep:?}");
    let best = evals.iter().copied().fold(f64::MAX, f64::min);
    assert_eq!(rep.best_eval_loss, Some(best));
    // The adapter on disk is the best one, not the last.
    let t2 = Trainer::from_adapter(&lm, cfg(serde_json::json!({})), &out).unwrap();
    assert!((t2.eval_loss(&eval).unwrap() - best).abs() < 1e-4);
}

#[test]
fn chat_roles_are_checked_and_a_bom_is_skipped() {
    let lm = load(&fixture("llama"));
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("d.jsonl");
    std::fs::write(&p, "\u{feff}{\"text\": \"The quick brown fox\"}\n").unwrap();
    assert_eq!(load_jsonl(&p, &lm, 512, false).unwrap().len(), 1);
    for role in ["wizard", "User", "Assistant"] {
        let line = format!(
            r#"{{"messages": [{{"role": "{role}", "content": "Hi"}}, {{"role": "assistant", "content": "Hello"}}]}}"#
        );
        std::fs::write(&p, format!("{{\"text\": \"ok then\"}}\n{line}\n")).unwrap();
        let e = load_jsonl(&p, &lm, 512, false).unwrap_err().to_string();
        assert!(
            e.contains("line 2")
                && e.contains(&format!("`{role}`"))
                && e.contains("system, user, assistant"),
            "{e}"
        );
    }
}

/// A checkpoint resumed with other batches or data is refused by setting, with the old and
/// new values, instead of indexing past the new data's batches; an old checkpoint that
/// recorded no settings still resumes, and is still refused when its place in the data no
/// longer exists.
#[test]
fn resume_refuses_other_settings() {
    let lm = load(&fixture("llama"));
    let data = load_jsonl(&train_fixture("memorise.jsonl"), &lm, 64, false).unwrap();
    let c = serde_json::json!({"rank": 4, "max_steps": 3, "batch_size": 1, "save_every": 3});
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    Trainer::new(&lm, cfg(c.clone()))
        .unwrap()
        .run(&data, &[], &a, |_| {})
        .unwrap();
    let ck = a.join("checkpoint-3");
    let resume = |c: serde_json::Value, data: &[tern::train::data::Example]| {
        let mut t = Trainer::new(&lm, cfg(c)).unwrap();
        t.resume_from(&ck).unwrap();
        t.run(data, &[], &b, |_| {}).map(|r| r.steps)
    };
    let mut more = c.clone();
    more["max_steps"] = 6.into();
    let mut bigger = more.clone();
    bigger["batch_size"] = 4.into();
    let e = resume(bigger.clone(), &data).unwrap_err().to_string();
    assert!(
        e.contains("batch_size") && e.contains('1') && e.contains('4'),
        "{e}"
    );
    let e = resume(more.clone(), &data[..2]).unwrap_err().to_string();
    assert!(
        e.contains("examples") && e.contains('4') && e.contains('2'),
        "{e}"
    );
    let mut reordered = data.clone();
    reordered.swap(0, 1);
    let e = resume(more.clone(), &reordered).unwrap_err().to_string();
    assert!(e.contains("data"), "{e}");
    assert!(!b.exists(), "a refused resume wrote its output");
    assert_eq!(resume(more.clone(), &data).unwrap(), 6);

    // A checkpoint from before settings were recorded: three batches into an epoch that now
    // has one.
    let state = ck.join("trainer_state.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    v[0].as_object_mut().unwrap().remove("settings");
    std::fs::write(&state, v.to_string()).unwrap();
    let e = resume(bigger, &data).unwrap_err().to_string();
    assert!(e.contains("other data or batch settings"), "{e}");
    assert_eq!(resume(more, &data).unwrap(), 6);
}
