//! Rebuilds a `tokenizers` tokenizer from the vocabulary embedded in a GGUF file.
//!
//! We emit the equivalent `tokenizer.json` and let the `tokenizers` crate parse it, so the
//! result is the same object a Hugging Face checkpoint would give. `gpt2`-type vocabularies
//! (byte-level BPE with merges) are exact; the pre-tokenizer regex follows
//! `tokenizer.ggml.pre` as llama.cpp does. `llama`-type (SentencePiece) vocabularies become a
//! Unigram model over the stored scores with byte fallback.

use super::Tokenizer;
use crate::checkpoint::GgufFile;
use crate::error::{Result, TernError};
use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as Json};

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

const GPT2_REGEX: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split(regex: &str) -> Json {
    json!({"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false})
}

fn byte_level(use_regex: bool) -> Json {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// The pre-tokenizer matching llama.cpp's handling of `tokenizer.ggml.pre`.
fn gpt2_pre_tokenizer(pre: &str) -> Json {
    match pre {
        "llama-bpe" | "llama3" | "smaug-bpe" => {
            json!({"type": "Sequence", "pretokenizers": [split(LLAMA3_REGEX), byte_level(false)]})
        }
        "qwen2" | "deepseek-r1-qwen" => {
            json!({"type": "Sequence", "pretokenizers": [split(QWEN2_REGEX), byte_level(false)]})
        }
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        // "default", "gpt-2" and unknown names: the classic GPT-2 split.
        _ => json!({"type": "Sequence", "pretokenizers": [split(GPT2_REGEX), byte_level(false)]}),
    }
}

/// The `tokenizer.ggml.pre` name for a `tokenizer.json` pre-tokenizer: the inverse of
/// [`gpt2_pre_tokenizer`], by the regex or digit split it uses; `default` (with a warning)
/// for ones llama.cpp has no name for.
pub fn pre_tokenizer_name(pre: &Json) -> &'static str {
    let parts: Vec<&Json> = match pre["type"].as_str() {
        Some("Sequence") => pre["pretokenizers"]
            .as_array()
            .into_iter()
            .flatten()
            .collect(),
        _ => vec![pre],
    };
    let regex = parts
        .iter()
        .find(|p| p["type"] == "Split")
        .and_then(|p| p["pattern"]["Regex"].as_str());
    let digits = parts
        .iter()
        .any(|p| p["type"] == "Digits" && p["individual_digits"] == true);
    let byte_level_regex = parts
        .iter()
        .any(|p| p["type"] == "ByteLevel" && p["use_regex"] != false);
    match regex {
        Some(r) if r == LLAMA3_REGEX => "llama-bpe",
        Some(r) if r == QWEN2_REGEX => "qwen2",
        Some(r) if r == GPT2_REGEX => "gpt-2",
        None if digits && byte_level_regex => "smollm",
        None if byte_level_regex && parts.len() == 1 => "gpt-2",
        _ => {
            tracing::warn!(
                "pre-tokenizer {pre} has no llama.cpp name; writing `default` (llama.cpp may split text differently)"
            );
            "default"
        }
    }
}

/// Builds the tokenizer stored in a GGUF file.
pub fn from_gguf(g: &GgufFile) -> Result<Tokenizer> {
    let md = g.metadata();
    let err = |key: &str, detail: &str| TernError::Config {
        file: g.path().to_path_buf(),
        key: key.into(),
        detail: detail.into(),
    };
    let strings = |key: &str| -> Result<Vec<String>> {
        match md.get(key) {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.to_string()
                        .cloned()
                        .map_err(|_| err(key, "expected strings"))
                })
                .collect(),
            _ => Err(err(key, "missing (the GGUF has no embedded tokenizer)")),
        }
    };
    let model = md
        .get("tokenizer.ggml.model")
        .and_then(|v| v.to_string().ok())
        .ok_or_else(|| {
            err(
                "tokenizer.ggml.model",
                "missing (the GGUF has no embedded tokenizer)",
            )
        })?
        .clone();
    let tokens = strings("tokenizer.ggml.tokens")?;
    let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a.iter().map(|v| v.to_i32().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
    let flag = |k: &str| md.get(k).and_then(|v| v.to_bool().ok());
    let tok = |i: Option<u32>| i.and_then(|i| tokens.get(i as usize)).cloned();
    let bos = tok(id("tokenizer.ggml.bos_token_id"));
    let eos = tok(id("tokenizer.ggml.eos_token_id"));
    let added: Vec<Json> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            matches!(
                types.get(*i),
                Some(&TOKEN_CONTROL) | Some(&TOKEN_USER_DEFINED)
            )
        })
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": types[i] == TOKEN_CONTROL})
        })
        .collect();
    let (model_json, normalizer, pre_tokenizer, decoder, add_bos_default) = match model.as_str() {
        "gpt2" => {
            let merges = strings("tokenizer.ggml.merges")?;
            let vocab: serde_json::Map<String, Json> = tokens
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), json!(i)))
                .collect();
            let pre = md
                .get("tokenizer.ggml.pre")
                .and_then(|v| v.to_string().ok())
                .cloned()
                .unwrap_or_else(|| "default".into());
            (
                json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                       "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                       "ignore_merges": false, "vocab": vocab, "merges": merges}),
                Json::Null,
                gpt2_pre_tokenizer(&pre),
                json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
                false,
            )
        }
        "llama" => {
            let scores: Vec<f64> = match md.get("tokenizer.ggml.scores") {
                Some(Value::Array(a)) => {
                    a.iter().map(|v| v.to_f32().unwrap_or(0.0) as f64).collect()
                }
                _ => vec![0.0; tokens.len()],
            };
            let vocab: Vec<Json> = tokens
                .iter()
                .zip(scores.iter().chain(std::iter::repeat(&0.0)))
                .map(|(t, s)| json!([t, s]))
                .collect();
            let add_space = flag("tokenizer.ggml.add_space_prefix").unwrap_or(true);
            let mut norm =
                vec![json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"})];
            if add_space {
                norm.insert(0, json!({"type": "Prepend", "prepend": "\u{2581}"}));
            }
            let mut dec = vec![
                json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                json!({"type": "ByteFallback"}),
                json!({"type": "Fuse"}),
            ];
            if add_space {
                dec.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
            }
            (
                json!({"type": "Unigram", "unk_id": id("tokenizer.ggml.unknown_token_id").unwrap_or(0),
                       "vocab": vocab, "byte_fallback": true}),
                json!({"type": "Sequence", "normalizers": norm}),
                Json::Null,
                json!({"type": "Sequence", "decoders": dec}),
                true,
            )
        }
        other => {
            return Err(err(
                "tokenizer.ggml.model",
                &format!("tokenizer type `{other}` is not supported (supported: gpt2, llama)"),
            ))
        }
    };
    let add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(add_bos_default);
    let post = match (&bos, add_bos) {
        (Some(b), true) => json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b.as_str(): {"id": b, "ids": [id("tokenizer.ggml.bos_token_id")], "tokens": [b]}}}),
        _ => Json::Null,
    };
    let doc = json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer, "post_processor": post,
        "decoder": decoder, "model": model_json});
    let bytes = serde_json::to_vec(&doc).expect("json value serialises");
    let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| {
        TernError::Tokenizer(format!("{}: embedded tokenizer: {e}", g.path().display()))
    })?;
    Ok(Tokenizer::new(inner, bos, eos))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file;

    /// A SentencePiece-style (`llama`) vocabulary: control tokens, byte-fallback pieces,
    /// and scored word pieces.
    fn write_spm_gguf(path: &std::path::Path, add_bos: bool) {
        let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
        let mut types = vec![2i32, 3, 3];
        let mut scores = vec![0f32, 0., 0.];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.);
        }
        for (piece, score) in [
            ("\u{2581}hello", -1.0f32),
            ("\u{2581}world", -1.5),
            ("\u{2581}", -3.0),
            ("h", -5.),
            ("e", -5.),
            ("l", -5.),
            ("o", -5.),
            ("w", -5.),
            ("r", -5.),
            ("d", -5.),
        ] {
            tokens.push(piece.into());
            types.push(1);
            scores.push(score);
        }
        let md = [
            ("tokenizer.ggml.model", Value::String("llama".into())),
            (
                "tokenizer.ggml.tokens",
                Value::Array(tokens.into_iter().map(Value::String).collect()),
            ),
            (
                "tokenizer.ggml.token_type",
                Value::Array(types.into_iter().map(Value::I32).collect()),
            ),
            (
                "tokenizer.ggml.scores",
                Value::Array(scores.into_iter().map(Value::F32).collect()),
            ),
            ("tokenizer.ggml.bos_token_id", Value::U32(1)),
            ("tokenizer.ggml.eos_token_id", Value::U32(2)),
            ("tokenizer.ggml.unknown_token_id", Value::U32(0)),
            ("tokenizer.ggml.add_bos_token", Value::Bool(add_bos)),
        ];
        let refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        gguf_file::write(&mut std::fs::File::create(path).unwrap(), &refs, &[]).unwrap();
    }

    #[test]
    fn sentencepiece_vocabulary_encodes_decodes_and_falls_back_to_bytes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("spm.gguf");
        write_spm_gguf(&p, true);
        let tok = from_gguf(&GgufFile::open(&p).unwrap()).unwrap();
        assert_eq!(tok.bos_token.as_deref(), Some("<s>"));
        assert_eq!(tok.eos_ids, vec![2]);
        let hello = tok.token_id("\u{2581}hello").unwrap();
        let world = tok.token_id("\u{2581}world").unwrap();
        assert_eq!(
            tok.encode("hello world", true).unwrap(),
            vec![1, hello, world]
        );
        assert_eq!(
            tok.encode("hello world", false).unwrap(),
            vec![hello, world]
        );
        assert_eq!(tok.decode(&[1, hello, world, 2]).unwrap(), "hello world");
        // "é" is not a piece: it becomes its two UTF-8 bytes and decodes back.
        let ids = tok.encode("hello é", false).unwrap();
        let c3 = tok.token_id("<0xC3>").unwrap();
        let a9 = tok.token_id("<0xA9>").unwrap();
        assert!(ids.windows(2).any(|w| w == [c3, a9]), "{ids:?}");
        assert_eq!(tok.decode(&ids).unwrap(), "hello é");
    }

    #[test]
    fn missing_tokenizer_metadata_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("none.gguf");
        let arch = Value::String("llama".into());
        gguf_file::write(
            &mut std::fs::File::create(&p).unwrap(),
            &[("general.architecture", &arch)],
            &[],
        )
        .unwrap();
        let e = from_gguf(&GgufFile::open(&p).unwrap()).unwrap_err();
        assert!(e.to_string().contains("tokenizer.ggml.model"), "{e}");
    }
}
