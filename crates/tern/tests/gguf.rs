//! GGUF loading: a GGUF written here from a fixture checkpoint (q/k rows permuted the way
//! llama.cpp's converter does, tokenizer and chat template embedded) must behave exactly like
//! the safetensors twin; quantized variants must stay quantized and stay close.

mod common;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use common::*;
use std::path::{Path, PathBuf};
use tern::checkpoint::safetensors::TensorFile;
use tern::checkpoint::{gguf::gguf_name, GgufFile};
use tern::{LoadOptions, LoadedModel, Prompt};

/// llama.cpp's `permute`: within each head, HF row `s*half + j` goes to row `2j + s`.
fn permute_rows(t: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = t.dims2().unwrap();
    let hd = rows / heads;
    t.reshape((heads, 2, hd / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

/// Writes `fixture` as a llama-architecture GGUF with 2-d weights stored as `qtype`.
fn write_gguf(fixture_name: &str, out: &Path, qtype: GgmlDType) {
    let dir = fixture(fixture_name);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let heads = cfg["num_attention_heads"].as_u64().unwrap() as usize;
    let kv = cfg["num_key_value_heads"].as_u64().unwrap() as usize;
    let st = TensorFile::open(&dir.join("model.safetensors")).unwrap();
    let mut names: Vec<&String> = st.entries().keys().collect();
    names.sort();
    let mut tensors = Vec::new();
    for name in names {
        let Some(g) = gguf_name(name) else { continue };
        let mut t = st.tensor(name, DType::F32, &Device::Cpu).unwrap();
        if g.ends_with("attn_q.weight") {
            t = permute_rows(&t, heads);
        } else if g.ends_with("attn_k.weight") {
            t = permute_rows(&t, kv);
        }
        let q = if t.rank() == 2 {
            QTensor::quantize(&t, qtype).unwrap()
        } else {
            QTensor::quantize(&t, GgmlDType::F32).unwrap()
        };
        tensors.push((g, q));
    }
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap())
            .unwrap();
    let vocab = tok["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let mut types = vec![1i32; tokens.len()];
    for a in tok["added_tokens"].as_array().unwrap() {
        types[a["id"].as_u64().unwrap() as usize] = 3;
    }
    let merges: Vec<Value> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            serde_json::Value::Array(p) => Value::String(format!(
                "{} {}",
                p[0].as_str().unwrap(),
                p[1].as_str().unwrap()
            )),
            s => Value::String(s.as_str().unwrap().to_string()),
        })
        .collect();
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap())
            .unwrap();
    let u = |k: &str| Value::U32(cfg[k].as_u64().unwrap() as u32);
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", u("num_hidden_layers")),
        ("llama.context_length", u("max_position_embeddings")),
        ("llama.embedding_length", u("hidden_size")),
        ("llama.feed_forward_length", u("intermediate_size")),
        ("llama.attention.head_count", u("num_attention_heads")),
        ("llama.attention.head_count_kv", u("num_key_value_heads")),
        (
            "llama.rope.freq_base",
            Value::F32(cfg["rope_theta"].as_f64().unwrap() as f32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("default".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        ("tokenizer.ggml.merges", Value::Array(merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        (
            "tokenizer.chat_template",
            Value::String(tc["chat_template"].as_str().unwrap().into()),
        ),
    ];
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(out).unwrap();
    gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
}

fn prompt_logprobs(lm: &LoadedModel, ids: &[u32]) -> Vec<Vec<f32>> {
    logprobs(lm, ids, &mut lm.model.new_cache())
}

#[test]
fn f32_gguf_matches_its_safetensors_twin() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("llama.gguf");
    write_gguf("llama", &p, GgmlDType::F32);
    let lm = LoadedModel::load(&p, &LoadOptions::default()).unwrap();
    let r = reference("llama");
    // Embedded tokenizer and template reproduce the Hugging Face ones.
    assert_eq!(lm.tokenizer.encode(&r.prompt, false).unwrap(), r.input_ids);
    assert_eq!(
        lm.encode_prompt(&Prompt::Chat(r.chat.messages.clone()))
            .unwrap(),
        r.chat.input_ids
    );
    assert_eq!(lm.eos_ids, vec![2]);
    let lp = prompt_logprobs(&lm, &r.input_ids);
    let worst = lp
        .iter()
        .zip(&r.prompt_logprobs)
        .map(|(a, b)| max_abs_diff(a, b))
        .fold(0.0, f32::max);
    assert!(worst < 1e-4, "gguf f32 vs transformers: {worst}");
    let mut req = tern::GenerateRequest::new(r.input_ids.clone(), r.greedy_ids.len());
    req.stop_at_eos = false;
    assert_eq!(lm.generate_collect(req).unwrap().ids(), r.greedy_ids);
}

#[test]
fn quantized_gguf_stays_quantized_and_close() {
    let r = reference("smollm");
    for qtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4_1] {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("smollm.gguf");
        write_gguf("smollm", &p, qtype);
        let g = GgufFile::open(&p).unwrap();
        let (w, report) = g.load(None, &Device::Cpu).unwrap();
        assert!(
            report.path_kind.contains("kept quantized"),
            "{}",
            report.path_kind
        );
        let names: Vec<String> = w.names().cloned().collect();
        let q_proj = "model.layers.0.self_attn.q_proj.weight";
        assert!(names.contains(&q_proj.to_string()));
        assert!(matches!(
            w.matmul(q_proj, &[64, 64]).unwrap(),
            candle_core::quantized::QMatMul::QTensor(_)
        ));
        let quant = LoadedModel::load(&p, &LoadOptions::default()).unwrap();
        let deq = LoadedModel::load(
            &p,
            &LoadOptions {
                dtype: Some(DType::F32),
                ..Default::default()
            },
        )
        .unwrap();
        // Prefill is exact to the stored weights (the eight-row kernels' f32 product here), so
        // quantized and dequantized loads agree up to summation order.
        let a = prompt_logprobs(&quant, &r.input_ids);
        let b = prompt_logprobs(&deq, &r.input_ids);
        let same = a
            .iter()
            .zip(&b)
            .map(|(x, y)| max_abs_diff(x, y))
            .fold(0.0, f32::max);
        assert!(
            same < 1e-4,
            "{qtype:?}: quantized vs dequantized prefill {same}"
        );
        // Against the unquantized reference: a sanity bound only (the fixture's weights are
        // deliberately large, so it is very sensitive to rounding; measured means were 0.036
        // for Q8_0 and 0.52-0.59 for 4-bit). Exactness is checked above and in the f32 test.
        let mean: f32 = a
            .iter()
            .zip(&r.prompt_logprobs)
            .map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()).sum::<f32>())
            .sum::<f32>()
            / (a.len() * a[0].len()) as f32;
        let bound = if qtype == GgmlDType::Q8_0 { 0.1 } else { 1.0 };
        assert!(
            mean < bound,
            "{qtype:?}: mean |logprob diff| {mean} vs reference"
        );
        // Decode runs the int8 path; it must still produce a sensible stream.
        let out = quant
            .generate_collect(tern::GenerateRequest::new(r.input_ids.clone(), 4))
            .unwrap();
        assert!(!out.tokens.is_empty());
    }
}

#[test]
fn every_block_type_round_trips_with_unpermuted_rows() {
    // 256-wide rows so k-quants fit; rows are permuted like llama.cpp's q projection.
    let heads = 2;
    let t = Tensor::randn(0f32, 1.0, (16, 256), &Device::Cpu).unwrap();
    for qtype in [
        GgmlDType::F32,
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ] {
        let q = QTensor::quantize(&permute_rows(&t, heads), qtype).unwrap();
        let expect = QTensor::quantize(&t, qtype)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        let emb = QTensor::quantize(
            &Tensor::zeros((4, 256), DType::F32, &Device::Cpu).unwrap(),
            GgmlDType::F32,
        )
        .unwrap();
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.gguf");
        let md = [
            ("general.architecture", Value::String("llama".into())),
            ("llama.attention.head_count", Value::U32(heads as u32)),
        ];
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        gguf_file::write(
            &mut std::fs::File::create(&p).unwrap(),
            &md_refs,
            &[("blk.0.attn_q.weight", &q), ("token_embd.weight", &emb)],
        )
        .unwrap();
        let (w, _) = GgufFile::open(&p)
            .unwrap()
            .load(None, &Device::Cpu)
            .unwrap();
        let got = w
            .float("model.layers.0.self_attn.q_proj.weight", &[16, 256])
            .unwrap();
        let diff = tensor_max_abs_diff(&got, &expect);
        assert!(diff < 1e-6, "{qtype:?}: {diff}");
        let kept = w
            .matmul("model.layers.0.self_attn.q_proj.weight", &[16, 256])
            .unwrap();
        // Only f32 becomes a float tensor: F16 and BF16 matrices stay at half width too.
        let is_q = matches!(kept, candle_core::quantized::QMatMul::QTensor(_));
        assert_eq!(is_q, qtype != GgmlDType::F32, "{qtype:?}");
    }
}

#[test]
fn adapters_over_a_quantized_base_are_kept_in_f16() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("llama.gguf");
    write_gguf("llama", &p, GgmlDType::Q8_0);
    let adapter =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/adapters/llama_rslora_all");
    let f16 = LoadedModel::load(&p, &LoadOptions::default()).unwrap();
    assert_eq!(f16.adapter_dtype, DType::F16);
    let f32 = LoadedModel::load(
        &p,
        &LoadOptions {
            adapter_dtype: Some(DType::F32),
            ..Default::default()
        },
    )
    .unwrap();
    let (a16, a32) = (
        f16.load_adapter(&adapter, "a").unwrap(),
        f32.load_adapter(&adapter, "a").unwrap(),
    );
    assert_eq!(a16.bytes() * 2, a32.bytes());
    // Same base, adapter rounded to f16 or not: prefill and a few decode steps (the fused
    // kernel's f16 path) stay within f16 rounding of the adapter.
    let ids = reference("llama").input_ids;
    let run = |lm: &LoadedModel, a| {
        let ad = tern::lora::BatchAdapters::uniform(Some(a));
        let mut c = lm.model.new_cache();
        let mut out = vec![lm.model.step_with(&ids, &mut c, &ad).unwrap()];
        for t in [3u32, 9, 27] {
            out.push(lm.model.step_with(&[t], &mut c, &ad).unwrap());
        }
        out
    };
    let (x, y) = (run(&f16, a16), run(&f32, a32));
    // Measured: 0.033 at prefill (f16 rounding alone: prefill dequantizes the base exactly),
    // 0.01-0.11 at decode, where int8 activation rounding amplifies the difference. This
    // fixture is deliberately sensitive (its adapter moves log-probs by ~10).
    for (i, (p, q)) in x.iter().zip(&y).enumerate() {
        let d = max_abs_diff(p, q);
        let bound = if i == 0 { 0.05 } else { 0.25 };
        assert!(
            d < bound,
            "step {i}: f16 adapter storage moved logits by {d}"
        );
        assert_eq!(
            tern::generate::sampler::argmax(p),
            tern::generate::sampler::argmax(q),
            "step {i}: greedy choice"
        );
    }
}

#[test]
fn int8_prompts_match_decoding_the_prompt_token_by_token() {
    let r = reference("smollm");
    for qtype in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("smollm.gguf");
        write_gguf("smollm", &p, qtype);
        let exact = LoadedModel::load(&p, &LoadOptions::default()).unwrap();
        let int8 = LoadedModel::load(
            &p,
            &LoadOptions {
                int8_prompts: true,
                ..Default::default()
            },
        )
        .unwrap();
        let prompt = prompt_logprobs(&int8, &r.input_ids);
        // One position at a time is the decode path, which always rounds activations to int8.
        let mut cache = exact.model.new_cache();
        let stepped: Vec<Vec<f32>> = r
            .input_ids
            .iter()
            .flat_map(|&id| logprobs(&exact, &[id], &mut cache))
            .collect();
        let worst = prompt
            .iter()
            .zip(&stepped)
            .map(|(a, b)| max_abs_diff(a, b))
            .fold(0.0, f32::max);
        // Same kernels, same per-row rounding; only the attention's summation order differs
        // (measured 2e-6 and 3e-6; the exact product differs from both by 0.2-0.25 here).
        assert!(
            worst < 1e-4,
            "{qtype:?}: int8 prompt vs decode steps {worst}"
        );
        // And it is not the exact product (the option took effect).
        let off = prompt
            .iter()
            .zip(&prompt_logprobs(&exact, &r.input_ids))
            .map(|(a, b)| max_abs_diff(a, b))
            .fold(0.0, f32::max);
        assert!(
            off > 1e-3,
            "{qtype:?}: int8 prompts equal the exact ones ({off})"
        );
    }
}
