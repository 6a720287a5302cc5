//! Streaming text is UTF-8-correct: characters split across byte-level tokens are never
//! emitted half-way, and the pieces add up to decoding everything at once.

mod common;

use common::fixture;
use tern::tokenizer::{IncrementalDecoder, Tokenizer};

#[test]
fn split_characters_are_held_until_complete() {
    let dir = fixture("llama");
    let tok = Tokenizer::from_hf_files(&dir.join("tokenizer.json"), None).unwrap();
    let text = "naïve café, 日本 and ünïcödé 🦀 text";
    let ids = tok.encode(text, false).unwrap();
    // The fixture vocabulary is tiny, so multi-byte characters are spread over byte tokens.
    assert!(ids.len() > text.chars().count() / 2, "{ids:?}");
    let mut dec = IncrementalDecoder::new(&[]);
    let mut pieces = Vec::new();
    for &id in &ids {
        pieces.push(dec.push(&tok, id).unwrap());
    }
    pieces.push(dec.flush(&tok).unwrap());
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    assert!(
        pieces.iter().any(|p| p.is_empty()),
        "some tokens must have been held back"
    );
    assert_eq!(pieces.concat(), text);
    assert_eq!(pieces.concat(), tok.decode(&ids).unwrap());
}

#[test]
fn context_tokens_do_not_leak_into_the_output() {
    let dir = fixture("qwen2");
    let tok = Tokenizer::from_hf_files(&dir.join("tokenizer.json"), None).unwrap();
    let prompt = tok.encode("The prompt before", false).unwrap();
    let gen = tok.encode(" and the answer 日本", false).unwrap();
    let mut dec = IncrementalDecoder::new(&prompt);
    let mut out = String::new();
    for &id in &gen {
        out.push_str(&dec.push(&tok, id).unwrap());
    }
    out.push_str(&dec.flush(&tok).unwrap());
    assert_eq!(out, " and the answer 日本");
}
