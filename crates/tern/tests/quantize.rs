//! Quantization: `--quantize` at load time, and `tern quantize`'s GGUF export. A lossless
//! (f32) export of every fixture architecture must reproduce transformers' numbers, tokenizer
//! and chat template; a quantized export must hold the same weights as quantizing at load.

mod common;

use common::*;
use tern::checkpoint::GgufFile;
use tern::model::gguf_export::{export_gguf, ExportOptions, ExportType};
use tern::model::layers::Embedding;
use tern::quant::QuantType;
use tern::{LoadOptions, LoadedModel, Prompt};

fn load(p: &std::path::Path, quantize: Option<QuantType>) -> LoadedModel {
    LoadedModel::load(
        p,
        &LoadOptions {
            quantize,
            ..Default::default()
        },
    )
    .unwrap()
}

fn prompt_logprobs(lm: &LoadedModel, ids: &[u32]) -> Vec<Vec<f32>> {
    logprobs(lm, ids, &mut lm.model.new_cache())
}

#[test]
fn lossless_export_of_every_architecture_matches_transformers() {
    for arch in ARCHS {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(format!("{arch}.gguf"));
        let r = export_gguf(&fixture(arch), &p, &ExportOptions::new(ExportType::F32)).unwrap();
        assert_eq!(r.types.keys().collect::<Vec<_>>(), ["F32"], "{arch}");
        let hf = load(&fixture(arch), None);
        let lm = load(&p, None);
        assert_eq!(lm.format, "gguf");
        let reference = reference(arch);
        // The embedded tokenizer, template and stop ids are the Hugging Face ones.
        assert_eq!(
            lm.tokenizer.encode(&reference.prompt, false).unwrap(),
            reference.input_ids,
            "{arch}: tokenizer"
        );
        assert_eq!(
            lm.encode_prompt(&Prompt::Chat(reference.chat.messages.clone()))
                .unwrap(),
            reference.chat.input_ids,
            "{arch}: chat template"
        );
        let (mut a, mut b) = (lm.eos_ids.clone(), hf.eos_ids.clone());
        a.sort();
        b.sort();
        assert_eq!(a, b, "{arch}: eos ids");
        // Weights, q/k permutation, rope settings (llama3's rope_freqs) and norms survive.
        let lp = prompt_logprobs(&lm, &reference.input_ids);
        let worst = worst_row_diff(&lp, &reference.prompt_logprobs);
        assert!(worst < 1e-4, "{arch}: gguf f32 vs transformers {worst}");
    }
}

#[test]
fn llama3_rope_scaling_travels_as_rope_freqs() {
    // The llama fixture with Llama 3.1 scaling whose original context is short enough that
    // the scaled, smoothed and unscaled frequency bands all occur at its head size.
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("llama31");
    std::fs::create_dir(&src).unwrap();
    for f in std::fs::read_dir(fixture("llama")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, src.join(f.file_name().unwrap())).unwrap();
    }
    let cfg_path = src.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let p = d.path().join("llama31.gguf");
    export_gguf(&src, &p, &ExportOptions::new(ExportType::F32)).unwrap();
    let g = GgufFile::open(&p).unwrap();
    assert!(g.tensor_infos().any(|(n, _, _)| n == "rope_freqs.weight"));
    let ids: Vec<u32> = (0..40).map(|i| (i * 7 % 300) as u32).collect();
    let (a, b) = (load(&src, None), load(&p, None));
    let plain = load(&fixture("llama"), None);
    let (la, lb) = (prompt_logprobs(&a, &ids), prompt_logprobs(&b, &ids));
    let worst = worst_row_diff(&la, &lb);
    assert!(worst < 1e-4, "scaled rope: safetensors vs gguf {worst}");
    // And the scaling matters here, so the comparison above is not vacuous.
    assert!(worst_row_diff(&la, &prompt_logprobs(&plain, &ids)) > 1e-2);
}

#[test]
fn quantized_export_holds_what_quantizing_at_load_gives() {
    use tern::checkpoint::Weight;
    let dev = candle_core::Device::Cpu;
    let dir = tern::checkpoint::HfDir::open(&fixture("llama")).unwrap();
    for q in [QuantType::Q8_0, QuantType::Q4K, QuantType::Q4_0] {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("llama.gguf");
        export_gguf(
            &fixture("llama"),
            &p,
            &ExportOptions::new(ExportType::Quant(q)),
        )
        .unwrap();
        let (file, _) = GgufFile::open(&p).unwrap().load(None, &dev).unwrap();
        let (at_load, _) = tern::checkpoint::weights::load_safetensors(
            &dir.dir,
            &dir.weight_files,
            candle_core::DType::F32,
            &dev,
            Some(q),
        )
        .unwrap();
        // Every quantized weight (projections, untied head) is stored in the file with the
        // same blocks quantizing at load gives, once the file's q/k row order is undone.
        let mut quantized = 0;
        for name in at_load.names() {
            let Some(Weight::Quant(a)) = at_load.weight(name) else {
                continue;
            };
            let dims = a.shape().dims().to_vec();
            let Some(Weight::Quant(b)) = file.weight(name) else {
                panic!("{q}: `{name}` is not quantized in the file");
            };
            assert_eq!(a.dtype(), b.dtype(), "{q}: {name}");
            let (x, y) = (
                at_load.float(name, &dims).unwrap(),
                file.float(name, &dims).unwrap(),
            );
            assert_eq!(tensor_max_abs_diff(&x, &y), 0.0, "{q}: {name}");
            quantized += 1;
        }
        assert_eq!(
            quantized,
            2 * 7 + 1,
            "{q}: 7 projections in 2 layers, and the head"
        );
        let lm = load(&p, None);
        assert!(lm.model.is_quantized());
        let out = lm
            .generate_collect(tern::GenerateRequest::new(reference("llama").input_ids, 4))
            .unwrap();
        assert!(!out.tokens.is_empty());
    }
}

#[test]
fn quantizing_at_load_keeps_norms_and_embeddings_float_and_stays_close() {
    let r = reference("smollm");
    let f32 = prompt_logprobs(&load(&fixture("smollm"), None), &r.input_ids);
    for (q, bound) in [(QuantType::Q8_0, 0.1), (QuantType::Q4_0, 1.0)] {
        let lm = load(&fixture("smollm"), Some(q));
        assert!(lm.model.is_quantized(), "{q}");
        assert!(lm.report.path_kind.contains(&format!("quantized to {q}")));
        let lp = prompt_logprobs(&lm, &r.input_ids);
        // A sanity bound: this fixture's weights are deliberately large, so it is far more
        // sensitive to rounding than a trained model (perplexity on SmolLM2 is measured by
        // `tern bench quality`).
        let mean: f32 = lp
            .iter()
            .zip(&f32)
            .map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()).sum::<f32>())
            .sum::<f32>()
            / (lp.len() * lp[0].len()) as f32;
        assert!(mean > 0.0 && mean < bound, "{q}: mean |diff| {mean}");
    }
}

#[test]
fn bad_requests_are_refused_by_name_and_write_nothing() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("m.gguf");
    export_gguf(&fixture("qwen2"), &p, &ExportOptions::new(ExportType::F16)).unwrap();
    let before = std::fs::read(&p).unwrap();
    let e = export_gguf(&fixture("qwen2"), &p, &ExportOptions::new(ExportType::F32))
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), before);
    let e = LoadedModel::load(
        &p,
        &LoadOptions {
            quantize: Some(QuantType::Q8_0),
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("--quantize q8_0") && e.contains("GGUF"), "{e}");
    let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "no temp files left behind");
    // --force never writes over a file the checkpoint is read from, nor over a directory.
    let copy = d.path().join("model");
    copy_dir(&fixture("qwen2"), &copy);
    let weights = copy.join("model.safetensors");
    let force = ExportOptions {
        force: true,
        ..ExportOptions::new(ExportType::F16)
    };
    let e = export_gguf(&copy, &weights, &force)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("is the input") && e.contains("choose another --out"),
        "{e}"
    );
    let e = export_gguf(&copy, d.path(), &force)
        .unwrap_err()
        .to_string();
    assert!(e.contains("is a directory"), "{e}");
    let e = export_gguf(&p, &p, &force).unwrap_err().to_string();
    assert!(e.contains("is the input"), "{e}");
    assert!(LoadedModel::load(&copy, &LoadOptions::default()).is_ok());
    // A missing parent directory is made, as the directory writers do.
    let nested = d.path().join("new/dir/m.gguf");
    export_gguf(&copy, &nested, &force).unwrap();
    assert!(nested.is_file());
}

#[test]
fn perplexity_windows_score_each_token_once_against_transformers() {
    let r = reference("llama");
    let lm = load(&fixture("llama"), None);
    let ids = &r.input_ids;
    // transformers' own log-probs of each next token, over the whole prompt in one window.
    let want: f64 = -(0..ids.len() - 1)
        .map(|i| r.prompt_logprobs[i][ids[i + 1] as usize] as f64)
        .sum::<f64>()
        / (ids.len() - 1) as f64;
    let whole = tern::bench::quality::mean_nll(&lm, ids, ids.len()).unwrap();
    assert!((whole - want).abs() < 1e-4, "{whole} vs {want}");
    // Short windows: every token still scored once, with less context (so a different mean),
    // and the first window alone is exactly transformers' numbers for its tokens.
    let short = tern::bench::quality::mean_nll(&lm, ids, 4).unwrap();
    assert!(
        short.is_finite() && (short - whole).abs() > 1e-3,
        "{short} vs {whole}"
    );
    let head = tern::bench::quality::mean_nll(&lm, &ids[..4], 4).unwrap();
    let head_want = -(0..3)
        .map(|i| r.prompt_logprobs[i][ids[i + 1] as usize] as f64)
        .sum::<f64>()
        / 3.0;
    assert!((head - head_want).abs() < 1e-4);
    assert!(tern::bench::quality::mean_nll(&lm, &ids[..1], 4).is_err());
}

#[test]
fn a_gguf_converts_like_its_checkpoint_and_requantizing_needs_consent() {
    let d = tempfile::tempdir().unwrap();
    let path = |n: &str| d.path().join(n);
    let q8 = ExportOptions::new(ExportType::Quant(QuantType::Q8_0));
    export_gguf(
        &fixture("llama"),
        &path("f32.gguf"),
        &ExportOptions::new(ExportType::F32),
    )
    .unwrap();
    export_gguf(&fixture("llama"), &path("direct.gguf"), &q8).unwrap();
    export_gguf(&path("f32.gguf"), &path("via.gguf"), &q8).unwrap();
    // From the f32 GGUF or from the checkpoint: the same types and the same blocks.
    let dev = candle_core::Device::Cpu;
    let (a, _) = GgufFile::open(&path("direct.gguf"))
        .unwrap()
        .load(None, &dev)
        .unwrap();
    let (b, _) = GgufFile::open(&path("via.gguf"))
        .unwrap()
        .load(None, &dev)
        .unwrap();
    let mut names: Vec<&String> = a.names().collect();
    names.sort();
    assert_eq!(names.len(), b.names().count());
    for name in names {
        let dims = match a.weight(name).unwrap() {
            tern::checkpoint::Weight::Quant(q) => q.shape().dims().to_vec(),
            tern::checkpoint::Weight::Float(t) => t.dims().to_vec(),
        };
        let (x, y) = (a.float(name, &dims).unwrap(), b.float(name, &dims).unwrap());
        assert_eq!(tensor_max_abs_diff(&x, &y), 0.0, "{name}");
    }
    let r = reference("llama");
    let via = load(&path("via.gguf"), None);
    assert_eq!(via.tokenizer.encode(&r.prompt, false).unwrap(), r.input_ids);
    let lp = prompt_logprobs(&via, &r.input_ids);
    let lq = prompt_logprobs(&load(&path("direct.gguf"), None), &r.input_ids);
    assert_eq!(lp, lq);
    // The same type again copies the blocks; another type must be asked for.
    export_gguf(&path("via.gguf"), &path("again.gguf"), &q8).unwrap();
    let q4 = ExportOptions::new(ExportType::Quant(QuantType::Q4_0));
    let e = export_gguf(&path("via.gguf"), &path("q4.gguf"), &q4)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("--allow-requantize") && e.contains("Q8_0 -> Q4_0"),
        "{e}"
    );
    assert!(!path("q4.gguf").exists());
    let ok = ExportOptions {
        allow_requantize: true,
        ..q4
    };
    export_gguf(&path("via.gguf"), &path("q4.gguf"), &ok).unwrap();
    assert!(load(&path("q4.gguf"), None).model.is_quantized());
}

/// A copy of fixture `arch` whose 2-d tensors `pick` names are rounded to `dtype` (and stored
/// back as f32): the f32 model a half-width load must reproduce.
fn rounded_copy(
    arch: &str,
    dtype: candle_core::DType,
    pick: fn(&str) -> bool,
) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(fixture(arch)).unwrap() {
        let f = f.unwrap().path();
        let name = f.file_name().unwrap().to_str().unwrap().to_string();
        if name == "model.safetensors" {
            let dev = candle_core::Device::Cpu;
            let mut ts = candle_core::safetensors::load(&f, &dev).unwrap();
            for (n, t) in ts.iter_mut() {
                if t.rank() == 2 && pick(n) {
                    *t = t
                        .to_dtype(dtype)
                        .unwrap()
                        .to_dtype(candle_core::DType::F32)
                        .unwrap();
                }
            }
            candle_core::safetensors::save(&ts, d.path().join(&name)).unwrap();
        } else {
            std::fs::copy(&f, d.path().join(&name)).unwrap();
        }
    }
    d
}

/// The embedding's storage, named.
fn kind(e: &Embedding) -> &'static str {
    match e {
        Embedding::Float(_) => "float",
        Embedding::Quant(_) => "GGML blocks",
        Embedding::Half(_) => "half width",
    }
}

/// Logits for `ids` as one row, and for a batch of two rows of 200 positions (400 rows: past
/// the few-row product, where half-width weights multiply as a widened copy).
fn short_and_long(lm: &LoadedModel, ids: &[u32]) -> (Vec<Vec<f32>>, Vec<f32>) {
    let long: Vec<u32> = ids.iter().copied().cycle().take(200).collect();
    let x = batch_of(&long, 2, lm.model.device());
    let logits = lm
        .model
        .forward_all_with(
            &x,
            &mut lm.model.new_cache(),
            &tern::lora::BatchAdapters::none(),
        )
        .unwrap();
    let long = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (prompt_logprobs(lm, ids), long)
}

/// `--quantize bf16` / `f16` stores the projections, the embedding table and an untied head at
/// half width (a tied head multiplies by the table) and multiplies them with f32 activations,
/// widening each weight exactly: the logits must be, bit for bit, those of the f32 model whose
/// weights hold the rounded values, for a short prompt and past the few-row product.
#[test]
fn half_width_storage_gives_the_f32_model_with_those_values() {
    let matrix = |n: &str| {
        n.ends_with("_proj.weight") || n == "lm_head.weight" || n == "model.embed_tokens.weight"
    };
    for arch in ["llama", "qwen3", "smollm"] {
        let ids = reference(arch).input_ids;
        for (q, dtype) in [
            (QuantType::Bf16, candle_core::DType::BF16),
            (QuantType::F16, candle_core::DType::F16),
        ] {
            let half = load(&fixture(arch), Some(q));
            assert!(
                half.model.is_quantized(),
                "{arch} {q}: stored at half width"
            );
            let table = half.model.embedding();
            assert!(
                matches!(table, Embedding::Half(_)),
                "{arch} {q}: the table at half width, not {}",
                kind(table)
            );
            let copy = rounded_copy(arch, dtype, matrix);
            let want = load(copy.path(), None);
            let (a, b) = (short_and_long(&half, &ids), short_and_long(&want, &ids));
            assert!(a.0 == b.0, "{arch} {q}: prompt logprobs differ");
            assert!(a.1 == b.1, "{arch} {q}: batched 400-row logits differ");
            // And the rounding is real (qwen3's fixture is stored in f16 already).
            if !(arch == "qwen3" && q == QuantType::F16) {
                let f32_model = prompt_logprobs(&load(&fixture(arch), None), &ids);
                let d = worst_row_diff(&a.0, &f32_model);
                assert!(d > 1e-4, "{arch} {q}: the same as the f32 model ({d})");
            }
        }
    }
}

/// An F16 GGUF keeps its matrices, the embedding table included, at half width when loaded and
/// gives the f32 model with those values, tied head (smollm) or not (llama).
#[test]
fn an_f16_gguf_runs_at_half_width_with_the_same_logits() {
    for arch in ["llama", "smollm"] {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.gguf");
        export_gguf(&fixture(arch), &p, &ExportOptions::new(ExportType::F16)).unwrap();
        let lm = load(&p, None);
        assert!(lm.model.is_quantized(), "{arch}: matrices kept at f16");
        let table = lm.model.embedding();
        assert!(
            matches!(table, Embedding::Half(_)),
            "{arch}: table {}",
            kind(table)
        );
        let copy = rounded_copy(arch, candle_core::DType::F16, |_| true);
        let want = load(copy.path(), None);
        let ids = reference(arch).input_ids;
        let (a, b) = (short_and_long(&lm, &ids), short_and_long(&want, &ids));
        assert!(a.0 == b.0, "{arch}: prompt logprobs differ");
        assert!(a.1 == b.1, "{arch}: batched 400-row logits differ");
    }
}
