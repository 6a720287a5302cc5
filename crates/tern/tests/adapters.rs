//! LoRA adapters against PEFT (reference.json files made by
//! scripts/fixtures/make_adapter_fixtures.py): adapted prompt log-probs within 1e-4 (f32; the
//! references are rounded to 6 significant digits), greedy ids identical, the same after
//! merging (on disk and in memory), mixed-adapter batches row-for-row equal to single runs,
//! the PEFT file format written back, the registry, and bad adapters refused by name.

mod common;

use candle_core::{DType, Tensor};
use common::*;
use std::path::Path;
use std::sync::Arc;
use tern::lora::merge::{merge_checkpoint, MergeOptions};
use tern::lora::{BatchAdapters, LoraAdapter};
use tern::{GenerateRequest, LoadOptions, LoadedModel};

/// Tolerance on log-probabilities, f32.
const TOL: f32 = 1e-4;
const ADAPTERS: &[&str] = &["llama_rslora_all", "qwen2_qv_bf16", "qwen3_rank_pattern"];

#[derive(serde::Deserialize)]
struct AdapterRef {
    base: String,
    input_ids: Vec<u32>,
    prompt_logprobs: Vec<Vec<f32>>,
    greedy_ids: Vec<u32>,
    greedy_logprobs: Vec<f32>,
}

fn adapter_ref(name: &str) -> AdapterRef {
    let p = adapter_dir(name).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn load(path: &Path) -> LoadedModel {
    LoadedModel::load(path, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"))
}

/// Log-probs `[seq, vocab]` of one row run with `ad`.
fn lp_with(lm: &LoadedModel, ids: &[u32], ad: &BatchAdapters) -> Vec<Vec<f32>> {
    logprobs_with(lm, ids, &mut lm.model.new_cache(), ad)
}

#[test]
fn adapted_logprobs_and_greedy_match_peft() {
    for name in ADAPTERS {
        let r = adapter_ref(name);
        let lm = load(&fixture(&r.base));
        let a = lm.load_adapter(&adapter_dir(name), name).unwrap();
        let lp = lp_with(&lm, &r.input_ids, &BatchAdapters::uniform(Some(a.clone())));
        let d = worst_row_diff(&lp, &r.prompt_logprobs);
        assert!(d < TOL, "{name}: max |logprob - peft| = {d}");
        // The base alone is far from the reference: the adapter is really applied.
        let base = lp_with(&lm, &r.input_ids, &BatchAdapters::none());
        assert!(
            worst_row_diff(&base, &r.prompt_logprobs) > 0.1,
            "{name}: adapter has no effect"
        );

        let mut req =
            GenerateRequest::new(r.input_ids.clone(), r.greedy_ids.len()).with_adapter(Some(a));
        req.stop_at_eos = false;
        let out = lm.generate_collect(req).unwrap();
        assert_eq!(out.ids(), r.greedy_ids, "{name}: greedy ids");
        let lps: Vec<f32> = out.tokens.iter().map(|t| t.logprob).collect();
        let d = max_abs_diff(&lps, &r.greedy_logprobs);
        assert!(d < TOL, "{name}: greedy logprob diff {d}");
    }
}

#[test]
fn merged_checkpoints_match_peft() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ADAPTERS {
        let r = adapter_ref(name);
        let out = tmp.path().join(format!("{name}-merged"));
        // Keep f32 so the comparison measures the merge, not rounding to a half type; a small
        // shard size forces the sharded layout with its index.
        let opts = MergeOptions {
            dtype: Some(DType::F32),
            shard_size: 60_000,
            force: false,
        };
        let rep = merge_checkpoint(&fixture(&r.base), &adapter_dir(name), &out, &opts).unwrap();
        assert!(rep.merged > 0 && rep.shards > 1, "{name}: {rep:?}");
        assert!(out.join("model.safetensors.index.json").is_file());
        assert!(out.join("tokenizer.json").is_file() && out.join("config.json").is_file());
        let lm = load(&out);
        let d = worst_row_diff(
            &lp_with(&lm, &r.input_ids, &BatchAdapters::none()),
            &r.prompt_logprobs,
        );
        assert!(
            d < TOL,
            "{name}: merged checkpoint differs from peft by {d}"
        );
        // Nothing but the output directory is left behind.
        let stray: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(stray.is_empty(), "temp files left: {stray:?}");
    }
}

#[test]
fn merge_keeps_stored_dtype_and_refuses_to_clobber() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let r = adapter_ref("qwen2_qv_bf16");
    merge_checkpoint(
        &fixture("qwen2"),
        &adapter_dir("qwen2_qv_bf16"),
        &out,
        &MergeOptions::default(),
    )
    .unwrap();
    assert!(out.join("model.safetensors").is_file());
    // A second merge to the same place is refused and leaves the first intact.
    let err = merge_checkpoint(
        &fixture("qwen2"),
        &adapter_dir("qwen2_qv_bf16"),
        &out,
        &MergeOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--force"), "{err}");
    let lm = load(&out);
    let d = worst_row_diff(
        &lp_with(&lm, &r.input_ids, &BatchAdapters::none()),
        &r.prompt_logprobs,
    );
    assert!(d < TOL, "{d}");
    // A failing merge (adapter does not fit the base) leaves nothing at the destination.
    let out2 = tmp.path().join("m2");
    let err = merge_checkpoint(
        &fixture("llama"),
        &adapter_dir("qwen2_qv_bf16"),
        &out2,
        &MergeOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("v_proj"), "{err}");
    assert!(!out2.exists());
    // --force replaces atomically.
    let opts = MergeOptions {
        force: true,
        dtype: Some(DType::BF16),
        ..Default::default()
    };
    merge_checkpoint(
        &fixture("qwen2"),
        &adapter_dir("qwen2_qv_bf16"),
        &out,
        &opts,
    )
    .unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert!(cfg.to_string().contains("bfloat16"), "{cfg}");
}

/// `--force` replaces the output, never an input: not the adapter, not a directory holding
/// the base. Both are refused by name before anything is written, and both inputs survive.
#[test]
fn force_never_replaces_what_merge_reads() {
    let tmp = tempfile::tempdir().unwrap();
    let parent = tmp.path().join("work");
    let (base, adapter) = (parent.join("base"), parent.join("adapter"));
    copy_dir(&fixture("qwen2"), &base);
    copy_dir(&adapter_dir("qwen2_qv_bf16"), &adapter);
    let force = MergeOptions {
        force: true,
        ..Default::default()
    };
    for (out, how, input) in [(&parent, "contains", &base), (&adapter, "is", &adapter)] {
        let e = merge_checkpoint(&base, &adapter, out, &force)
            .unwrap_err()
            .to_string();
        let want = format!(
            "--out {} {how} the input {}",
            out.display(),
            input.display()
        );
        assert!(
            e.contains(&want) && e.contains("choose another --out"),
            "{e}"
        );
    }
    assert!(base.join("model.safetensors").is_file() && base.join("config.json").is_file());
    assert!(adapter.join("adapter_model.safetensors").is_file());
    // A new directory inside the base's parent is fine.
    merge_checkpoint(&base, &adapter, &parent.join("merged"), &force).unwrap();
}

/// An adapter holding a NaN (a diverged run's output) is refused by module name before a
/// merge writes anything.
#[test]
fn merge_refuses_an_adapter_holding_nan() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    copy_dir(&adapter_dir("qwen2_qv_bf16"), &adapter);
    let file = adapter.join("adapter_model.safetensors");
    let mut tensors: Vec<(String, Tensor)> =
        candle_core::safetensors::load(&file, &candle_core::Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let (name, t) = tensors
        .iter_mut()
        .find(|(n, _)| n.contains("lora_B"))
        .unwrap();
    let module = name.split(".lora_B").next().unwrap().to_string();
    let mut v: Vec<f32> = t
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    v[1] = f32::NAN;
    *t = Tensor::from_vec(v, t.shape(), t.device())
        .unwrap()
        .to_dtype(t.dtype())
        .unwrap();
    tern::checkpoint::safetensors::write_atomic(&file, &tensors).unwrap();
    let out = tmp.path().join("merged");
    let e = merge_checkpoint(&fixture("qwen2"), &adapter, &out, &MergeOptions::default())
        .unwrap_err()
        .to_string();
    let module = module.trim_start_matches("base_model.model.");
    assert!(e.contains(module) && e.contains("NaN"), "{e}");
    assert!(!out.exists());
}

#[test]
fn in_memory_merge_and_unmerge() {
    let r = adapter_ref("llama_rslora_all");
    let mut lm = load(&fixture("llama"));
    let base = lp_with(&lm, &r.input_ids, &BatchAdapters::none());
    let a = lm
        .load_adapter(&adapter_dir("llama_rslora_all"), "a")
        .unwrap();
    lm.model.merge_adapter(&a).unwrap();
    assert!(
        lm.model.merge_adapter(&a).is_err(),
        "double merge must be refused"
    );
    let d = worst_row_diff(
        &lp_with(&lm, &r.input_ids, &BatchAdapters::none()),
        &r.prompt_logprobs,
    );
    assert!(d < TOL, "merged in memory: {d}");
    lm.model.unmerge_adapter(&a).unwrap();
    let d = worst_row_diff(&lp_with(&lm, &r.input_ids, &BatchAdapters::none()), &base);
    assert!(d < TOL, "unmerged: {d}");
}

#[test]
fn mixed_adapter_batch_rows_equal_single_runs() {
    let r = adapter_ref("llama_rslora_all");
    let lm = load(&fixture("llama"));
    let a = lm
        .load_adapter(&adapter_dir("llama_rslora_all"), "a")
        .unwrap();
    let b = variant(&lm, &a);
    let rows = vec![Some(a.clone()), None, Some(b.clone()), Some(a.clone())];
    let dev = lm.model.device();
    let n = rows.len();
    let ids = &r.input_ids;
    let batch = batch_of(ids, n, dev);
    let ad = BatchAdapters::per_row(&rows, dev).unwrap();
    let mut cache = lm.model.new_cache();
    // Prefill of the whole batch (the gather/scatter path), then decode steps (the fused
    // kernel), each row compared with the same row run alone.
    let mut logits = vec![lm.model.forward_last_with(&batch, &mut cache, &ad).unwrap()];
    let steps = [5u32, 17, 42];
    for &t in &steps {
        let x = Tensor::new(vec![t; n], dev).unwrap().unsqueeze(1).unwrap();
        logits.push(lm.model.forward_last_with(&x, &mut cache, &ad).unwrap());
    }
    for (i, row) in rows.iter().enumerate() {
        let solo = BatchAdapters::uniform(row.clone());
        let mut c = lm.model.new_cache();
        let mut want = vec![lm.model.step_with(ids, &mut c, &solo).unwrap()];
        for &t in &steps {
            want.push(lm.model.step_with(&[t], &mut c, &solo).unwrap());
        }
        for (s, (got, w)) in logits.iter().zip(&want).enumerate() {
            let got = got.get(i).unwrap().to_vec1::<f32>().unwrap();
            let d = max_abs_diff(&got, w);
            assert!(d < TOL, "row {i} step {s}: batch vs alone differ by {d}");
        }
    }
    // The rows really differ from each other.
    let l0 = logits[0].get(0).unwrap().to_vec1::<f32>().unwrap();
    let l2 = logits[0].get(2).unwrap().to_vec1::<f32>().unwrap();
    assert!(max_abs_diff(&l0, &l2) > 0.1);
}

#[test]
fn saved_adapters_are_peft_files_and_load_back() {
    let tmp = tempfile::tempdir().unwrap();
    for name in ADAPTERS {
        let r = adapter_ref(name);
        let lm = load(&fixture(&r.base));
        let a = lm.load_adapter(&adapter_dir(name), name).unwrap();
        let out = tmp.path().join(name);
        a.save(&out).unwrap();
        // Same tensor names as PEFT writes (without the in-memory adapter name).
        let keys = |p: &Path| {
            let f = tern::checkpoint::safetensors::TensorFile::open(
                &p.join("adapter_model.safetensors"),
            )
            .unwrap();
            let mut k: Vec<String> = f
                .entries()
                .keys()
                .map(|k| k.replace(".default.", "."))
                .collect();
            k.sort();
            k
        };
        assert_eq!(keys(&out), keys(&adapter_dir(name)), "{name}");
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        let back = lm.load_adapter(&out, "back").unwrap();
        let d = worst_row_diff(
            &lp_with(&lm, &r.input_ids, &BatchAdapters::uniform(Some(back))),
            &r.prompt_logprobs,
        );
        assert!(d < TOL, "{name}: reloaded copy differs by {d}");
    }
}

#[test]
fn registry_swaps_keeps_versions_and_evicts() {
    let lm = load(&fixture("llama"));
    let dir = adapter_dir("llama_rslora_all");
    let one = lm.load_adapter(&dir, "x").unwrap().bytes();
    let reg = lm.adapter_registry(Some(one + one / 2));
    let a1 = reg.load("a", &dir).unwrap();
    assert!(Arc::ptr_eq(&reg.get("a").unwrap(), &a1));
    // Reloading a name gives a new version; the holder of the old one keeps it.
    let held = reg.get("a").unwrap();
    let a2 = reg.load("a", &dir).unwrap();
    assert_ne!(held.version(), a2.version());
    assert_eq!(reg.get("a").unwrap().version(), a2.version());
    drop((held, a1, a2));
    // The budget fits one adapter: loading `b` evicts the unused `a`, which comes back
    // from disk when asked for.
    reg.load("b", &dir).unwrap();
    let info = reg.list();
    assert_eq!(
        info.iter()
            .map(|i| (i.name.as_str(), i.resident))
            .collect::<Vec<_>>(),
        [("a", false), ("b", true)]
    );
    assert!(reg.resident_bytes() <= one + one / 2);
    let a = reg.get("a").unwrap();
    assert!(reg.list().iter().find(|i| i.name == "a").unwrap().resident);
    // With `a` in use, `b` cannot evict it: a clear error instead of breaking a request.
    let err = reg.load("b", &dir).unwrap_err().to_string();
    assert!(err.contains("budget"), "{err}");
    drop(a);
    reg.unload("a").unwrap();
    let err = reg.get("a").unwrap_err().to_string();
    assert!(err.contains("unknown adapter `a`"), "{err}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn bad_adapters_are_refused_by_name() {
    let lm = load(&fixture("llama"));
    let tmp = tempfile::tempdir().unwrap();
    let err = |p: &Path| lm.load_adapter(p, "x").unwrap_err().to_string();

    // Made for another model: qwen2's v_proj is [32, 64], llama's [64, 64].
    let e = err(&adapter_dir("qwen2_qv_bf16"));
    assert!(e.contains("v_proj") && e.contains("[64, 64]"), "{e}");

    let e = err(&tmp.path().join("nowhere"));
    assert!(e.contains("adapter_config.json"), "{e}");

    let edit = |name: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let d = tmp.path().join(name);
        copy_dir(&adapter_dir("llama_rslora_all"), &d);
        let p = d.join("adapter_config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, v.to_string()).unwrap();
        d
    };
    let e = err(&edit("dora", &|v| v["use_dora"] = true.into()));
    assert!(e.contains("DoRA"), "{e}");
    let e = err(&edit("mts", &|v| {
        v["modules_to_save"] = serde_json::json!(["lm_head"])
    }));
    assert!(e.contains("modules_to_save"), "{e}");
    let e = err(&edit("bias", &|v| v["bias"] = "lora_only".into()));
    assert!(e.contains("bias"), "{e}");
    // A rank that disagrees with the file's tensors.
    let e = err(&edit("rank", &|v| v["r"] = 4.into()));
    assert!(e.contains("rank is 4"), "{e}");

    // An embedding LoRA tensor.
    let d = tmp.path().join("emb");
    copy_dir(&adapter_dir("llama_rslora_all"), &d);
    let t = Tensor::zeros((4, 320), DType::F32, &candle_core::Device::Cpu).unwrap();
    tern::checkpoint::safetensors::write_atomic(
        &d.join("adapter_model.safetensors"),
        &[(
            "base_model.model.model.embed_tokens.lora_embedding_A".into(),
            t,
        )],
    )
    .unwrap();
    let e = err(&d);
    assert!(e.contains("embedding"), "{e}");

    // Merging needs a safetensors base directory.
    let gguf = tmp.path().join("m.gguf");
    std::fs::write(&gguf, b"GGUF").unwrap();
    let e = merge_checkpoint(
        &gguf,
        &adapter_dir("llama_rslora_all"),
        &tmp.path().join("o"),
        &MergeOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("GGUF bases are not supported"), "{e}");

    // A truncated weights file is a typed safetensors error, not a panic.
    let d = tmp.path().join("trunc");
    copy_dir(&adapter_dir("llama_rslora_all"), &d);
    let p = d.join("adapter_model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(&d);
    assert!(e.contains("adapter_model.safetensors"), "{e}");
}

#[test]
fn adapters_load_and_unload_while_generation_runs() {
    let r = adapter_ref("llama_rslora_all");
    let lm = load(&fixture("llama"));
    let dir = adapter_dir("llama_rslora_all");
    let reg = lm.adapter_registry(None);
    reg.load("a", &dir).unwrap();
    let run = |a: Arc<LoraAdapter>| {
        let mut req =
            GenerateRequest::new(r.input_ids.clone(), r.greedy_ids.len()).with_adapter(Some(a));
        req.stop_at_eos = false;
        lm.generate_collect(req).unwrap().ids()
    };
    std::thread::scope(|s| {
        let gen = s.spawn(|| {
            (0..4)
                .map(|_| run(reg.get("a").unwrap()))
                .collect::<Vec<_>>()
        });
        // Meanwhile: reload the name, add and drop others. In-flight requests hold their copy.
        for i in 0..6 {
            reg.load("a", &dir).unwrap();
            reg.load(&format!("tmp{i}"), &dir).unwrap();
            reg.unload(&format!("tmp{i}")).unwrap();
        }
        for ids in gen.join().unwrap() {
            assert_eq!(ids, r.greedy_ids);
        }
    });
    let held = reg.get("a").unwrap();
    reg.unload("a").unwrap();
    assert_eq!(
        run(held),
        r.greedy_ids,
        "an unloaded adapter still serves its holder"
    );
    assert_eq!(reg.list().len(), 0);
}
