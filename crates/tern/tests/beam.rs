//! Beam search against transformers' `generate(num_beams=...)` (reference.json made by
//! scripts/fixtures/make_beam_fixtures.py): identical sequences, scores within 1e-4.

mod common;

use common::*;
use tern::generate::beam::{beam_search, BeamParams, EarlyStopping};
use tern::{LoadOptions, LoadedModel};

#[derive(serde::Deserialize)]
struct Seq {
    ids: Vec<u32>,
    score: f32,
}

#[derive(serde::Deserialize)]
struct Case {
    model: String,
    prompt_ids: Vec<u32>,
    eos: u32,
    settings: serde_json::Value,
    sequences: Vec<Seq>,
}

#[derive(serde::Deserialize)]
struct Reference {
    cases: Vec<Case>,
}

#[test]
fn beam_search_matches_transformers() {
    let p = fixture("x")
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("beam/reference.json");
    let r: Reference = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    for (i, c) in r.cases.iter().enumerate() {
        let lm = LoadedModel::load(&fixture(&c.model), &LoadOptions::default()).unwrap();
        let s = &c.settings;
        let get = |k: &str| s.get(k);
        let mut bp = BeamParams::new(
            get("num_beams").unwrap().as_u64().unwrap() as usize,
            get("max_new_tokens").unwrap().as_u64().unwrap() as usize,
        );
        bp.num_return = get("num_return_sequences").map_or(1, |v| v.as_u64().unwrap() as usize);
        bp.length_penalty = get("length_penalty").map_or(1.0, |v| v.as_f64().unwrap() as f32);
        bp.no_repeat_ngram_size =
            get("no_repeat_ngram_size").map_or(0, |v| v.as_u64().unwrap() as usize);
        bp.early_stopping = match get("early_stopping") {
            Some(serde_json::Value::Bool(true)) => EarlyStopping::Finished,
            Some(serde_json::Value::String(n)) if n == "never" => EarlyStopping::Never,
            _ => EarlyStopping::Heuristic,
        };
        bp.eos_ids = Some(vec![c.eos]);
        let got = beam_search(&lm, &c.prompt_ids, &bp).unwrap();
        assert_eq!(got.len(), c.sequences.len(), "case {i}");
        for (g, w) in got.iter().zip(&c.sequences) {
            assert_eq!(g.ids, w.ids, "case {i} ({})", c.model);
            assert!(
                (g.score - w.score).abs() < 1e-4,
                "case {i}: score {} vs {}",
                g.score,
                w.score
            );
        }
    }
}
