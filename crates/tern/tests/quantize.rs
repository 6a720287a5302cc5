//! Quantization: `--quantize` at load time, and `tern quantize`'s GGUF export. A lossless
//! (f32) export of every fixture architecture must reproduce transformers' numbers, tokenizer
//! and chat template; a quantized export must hold the same weights as quantizing at load.

mod common;

use candle_core::quantized::QMatMul;
use common::*;
use tern::checkpoint::GgufFile;
use tern::model::gguf_export::{export_gguf, ExportType};
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
        let r = export_gguf(&fixture(arch), &p, ExportType::F32, false).unwrap();
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
    export_gguf(&src, &p, ExportType::F32, false).unwrap();
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
    let r = reference("llama");
    for q in [QuantType::Q8_0, QuantType::Q4K, QuantType::Q4_0] {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("llama.gguf");
        export_gguf(&fixture("llama"), &p, ExportType::Quant(q), false).unwrap();
        let g = GgufFile::open(&p).unwrap();
        let (w, _) = g.load(None, &candle_core::Device::Cpu).unwrap();
        let q_proj = "model.layers.0.self_attn.q_proj.weight";
        assert!(matches!(
            w.matmul(q_proj, &[64, 64]).unwrap(),
            QMatMul::QTensor(_)
        ));
        let from_file = load(&p, None);
        let at_load = load(&fixture("llama"), Some(q));
        assert!(at_load.model.is_quantized() && from_file.model.is_quantized());
        // Same quantized projections; only the embedding differs (f16 in the file, f32 at
        // load), which moved log-probs by 7e-3 on this fixture (the quantization itself moves
        // them by ~1).
        let a = prompt_logprobs(&from_file, &r.input_ids);
        let b = prompt_logprobs(&at_load, &r.input_ids);
        let worst = worst_row_diff(&a, &b);
        assert!(worst < 3e-2, "{q}: file vs load-time quantization {worst}");
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
    export_gguf(&fixture("qwen2"), &p, ExportType::F16, false).unwrap();
    let before = std::fs::read(&p).unwrap();
    let e = export_gguf(&fixture("qwen2"), &p, ExportType::F32, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), before);
    let e = export_gguf(&p, &d.path().join("x.gguf"), ExportType::F16, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already a GGUF"), "{e}");
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
}
