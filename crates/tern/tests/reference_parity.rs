//! Numerics against Hugging Face `transformers` (reference.json files made by
//! scripts/fixtures/make_fixtures.py): every architecture's prompt log-probs within 1e-4
//! (f32; the references are rounded to 6 significant digits, worth up to ~5e-5 of that),
//! greedy ids identical, chat template rendering and tokenisation identical.

mod common;

use common::*;
use tern::{GenerateRequest, LoadOptions, LoadedModel, Prompt};

/// Tolerance on log-probabilities, f32.
const TOL: f32 = 1e-4;

fn load(name: &str) -> LoadedModel {
    LoadedModel::load(&fixture(name), &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn prompt_logprobs_match_transformers() {
    for name in ARCHS {
        let lm = load(name);
        let r = reference(name);
        assert_eq!(
            lm.tokenizer.encode(&r.prompt, false).unwrap(),
            r.input_ids,
            "{name}: tokenisation"
        );
        let lp = logprobs(&lm, &r.input_ids, &mut lm.model.new_cache());
        let worst = worst_row_diff(&lp, &r.prompt_logprobs);
        assert!(worst < TOL, "{name}: max |logprob - reference| = {worst}");
    }
}

#[test]
fn greedy_ids_and_logprobs_match_transformers() {
    for name in ARCHS {
        let lm = load(name);
        let r = reference(name);
        let mut req = GenerateRequest::new(r.input_ids.clone(), r.greedy_ids.len());
        // The reference ran past EOS; so do we.
        req.stop_at_eos = false;
        let out = lm.generate_collect(req).unwrap();
        assert_eq!(out.ids(), r.greedy_ids, "{name}: greedy ids");
        let lps: Vec<f32> = out.tokens.iter().map(|t| t.logprob).collect();
        let d = max_abs_diff(&lps, &r.greedy_logprobs);
        assert!(d < TOL, "{name}: greedy logprob diff {d}");
        assert_eq!(out.finish_reason, Some(tern::FinishReason::Length));
        // The streamed pieces add up to decoding all ids at once.
        assert_eq!(
            out.text,
            lm.tokenizer.decode(&out.ids()).unwrap(),
            "{name}: streamed text"
        );
    }
}

#[test]
fn chat_template_renders_and_tokenises_like_transformers() {
    for name in ARCHS {
        let lm = load(name);
        let r = reference(name);
        let tmpl = lm
            .chat_template
            .as_ref()
            .unwrap_or_else(|| panic!("{name}: no template"));
        let (bos, eos) = (
            lm.tokenizer.bos_token.as_deref(),
            lm.tokenizer.eos_token.as_deref(),
        );
        assert_eq!(
            tmpl.render(&r.chat.messages, true, bos, eos).unwrap(),
            r.chat.rendered,
            "{name}"
        );
        let ids = lm
            .encode_prompt(&Prompt::Chat(r.chat.messages.clone()))
            .unwrap();
        assert_eq!(ids, r.chat.input_ids, "{name}");
    }
}

#[test]
fn chunked_prefill_equals_one_shot() {
    // Running the prompt in two pieces exercises the cache offset and the offset causal mask.
    let lm = load("llama3");
    let r = reference("llama3");
    let (a, b) = r.input_ids.split_at(10);
    let mut cache = lm.model.new_cache();
    logprobs(&lm, a, &mut cache);
    let lp = logprobs(&lm, b, &mut cache);
    let worst = worst_row_diff(&lp, &r.prompt_logprobs[10..]);
    assert!(worst < TOL, "chunked prefill: {worst}");
}

#[test]
fn eos_from_generation_config_list_stops_generation() {
    // llama3's generation_config lists two eos ids; smollm's greedy continuation hits eos 2.
    assert_eq!(load("llama3").eos_ids, vec![0, 2]);
    let lm = load("smollm");
    let r = reference("smollm");
    let out = lm
        .generate_collect(GenerateRequest::new(r.input_ids.clone(), 64))
        .unwrap();
    let first_eos = r
        .greedy_ids
        .iter()
        .position(|i| lm.eos_ids.contains(i))
        .unwrap();
    assert_eq!(out.ids(), r.greedy_ids[..=first_eos].to_vec());
    assert_eq!(out.finish_reason, Some(tern::FinishReason::Stop));
    // The EOS token adds no text of its own; what it flushes still decodes like the whole.
    assert_eq!(out.text, lm.tokenizer.decode(&out.ids()).unwrap());
}

#[test]
fn bf16_compute_stays_close() {
    let opts = LoadOptions {
        dtype: Some(candle_core::DType::BF16),
        ..Default::default()
    };
    let lm = LoadedModel::load(&fixture("qwen2"), &opts).unwrap();
    let r = reference("qwen2");
    let lp = logprobs(&lm, &r.input_ids, &mut lm.model.new_cache());
    // bf16 keeps 8 bits of mantissa: on average a few hundredths of a nat is what it can give,
    // and a clear winner must not change.
    let (mut sum, mut n) = (0f32, 0usize);
    for (a, b) in lp.iter().zip(&r.prompt_logprobs) {
        sum += a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>();
        n += a.len();
        let am = tern::generate::sampler::argmax;
        let mut sorted = b.clone();
        sorted.sort_by(|x, y| y.total_cmp(x));
        if sorted[0] - sorted[1] > 0.5 {
            assert_eq!(am(a), am(b), "a clear winner changed under bf16");
        }
    }
    assert!(sum / (n as f32) < 0.05, "bf16 mean diff {}", sum / n as f32);
}
