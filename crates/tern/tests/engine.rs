//! The batched engine: many requests of different lengths, adapters and sampling settings
//! decoded together give exactly what each gives alone; the queue bound, callers that go
//! away, and shutdown.

mod common;

use common::*;
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::time::Duration;
use tern::generate::{Engine, EngineConfig, EngineEvent, SamplingParams, TokenSink};
use tern::{Completion, GenerateRequest, LoadOptions, LoadedModel, TernError};

/// Log-probability tolerance between batched and solo runs (f32; the batch changes only
/// the matmul shapes).
const TOL: f32 = 1e-4;

fn llama() -> Arc<LoadedModel> {
    Arc::new(LoadedModel::load(&fixture("llama"), &LoadOptions::default()).unwrap())
}

/// Collects a request's tokens until `Done` or `Failed`.
fn collect(rx: Receiver<EngineEvent>) -> Result<(Vec<u32>, Vec<f32>), TernError> {
    let (mut ids, mut lps) = (vec![], vec![]);
    for ev in rx {
        match ev {
            EngineEvent::Token(t) => {
                ids.push(t.id);
                lps.push(t.logprob);
            }
            EngineEvent::Done(s) => {
                assert_eq!(s.completion_tokens, ids.len());
                return Ok((ids, lps));
            }
            EngineEvent::Failed(e) => return Err(e),
        }
    }
    panic!("the engine dropped a request without a final event");
}

/// Sixteen requests: prompts of different lengths, three adapter choices, greedy and seeded
/// sampling, different token budgets.
fn mixed_requests(lm: &LoadedModel) -> Vec<GenerateRequest> {
    let a = lm
        .load_adapter(&adapter_dir("llama_rslora_all"), "a")
        .unwrap();
    let b = variant(lm, &a);
    let choices = [None, Some(a), Some(b)];
    (0..16)
        .map(|i| {
            let prompt: Vec<u32> = (0..3 + i * 2)
                .map(|j| ((i * 31 + j * 7) % 250) as u32 + 1)
                .collect();
            let mut r =
                GenerateRequest::new(prompt, 6 + i % 5).with_adapter(choices[i % 3].clone());
            r.stop_at_eos = false;
            if i % 4 == 3 {
                r.sampling = SamplingParams {
                    temperature: 0.8,
                    top_p: 0.9,
                    seed: i as u64,
                    ..Default::default()
                };
            }
            r
        })
        .collect()
}

fn solo(lm: &LoadedModel, r: &GenerateRequest) -> Completion {
    lm.generate_collect(r.clone()).unwrap()
}

#[test]
fn batched_requests_equal_the_same_requests_alone() {
    let lm = llama();
    let reqs = mixed_requests(&lm);
    // A batch smaller than the request count, so rows also join mid-flight.
    let cfg = EngineConfig {
        max_batch: 6,
        max_queue: 16,
        ..Default::default()
    };
    let engine = Engine::start(lm.clone(), cfg).unwrap();
    let rxs: Vec<_> = reqs
        .iter()
        .map(|r| engine.submit_channel(r.clone()).unwrap())
        .collect();
    let mut differ = 0;
    for (i, (r, rx)) in reqs.iter().zip(rxs).enumerate() {
        let (ids, lps) = collect(rx).unwrap();
        let want = solo(&lm, r);
        assert_eq!(ids, want.ids(), "request {i}: ids");
        let wl: Vec<f32> = want.tokens.iter().map(|t| t.logprob).collect();
        let d = max_abs_diff(&lps, &wl);
        assert!(d < TOL, "request {i}: logprobs differ by {d}");
        if r.adapter.is_some() {
            let base = solo(&lm, &r.clone().with_adapter(None));
            differ += usize::from(base.ids() != ids);
        }
    }
    assert!(differ > 3, "adapters changed only {differ} outputs");
    let s = engine.stats();
    assert_eq!((s.completed, s.aborted, s.queued), (16, 0, 0));
    // Fewer steps than tokens: rows really were decoded together.
    assert!(s.steps < s.generated_tokens / 2, "{s:?}");
}

/// A sink that says it has reached its gate, then waits there before delivering its first
/// event.
struct Gated {
    gate: Option<(mpsc::Sender<()>, Receiver<()>)>,
    tx: mpsc::Sender<EngineEvent>,
}

impl TokenSink for Gated {
    fn send(&mut self, ev: EngineEvent) -> bool {
        if let Some((arrived, open)) = self.gate.take() {
            let _ = arrived.send(());
            let _ = open.recv();
        }
        self.tx.send(ev).is_ok()
    }
}

fn long_request() -> GenerateRequest {
    let mut r = GenerateRequest::new(vec![5, 6, 7], 100_000);
    r.stop_at_eos = false;
    r
}

#[test]
fn a_full_queue_is_refused_and_a_gone_caller_frees_its_row() {
    let lm = llama();
    let ctx = lm.model.config().max_position_embeddings;
    let cfg = EngineConfig {
        max_batch: 1,
        max_queue: 1,
        ..Default::default()
    };
    let engine = Engine::start(lm, cfg).unwrap();
    // One running (it runs to the context length), one waiting, the third refused. The
    // first request's sink holds the worker at its first token, between taking the request
    // off the queue and counting it as running: the counts must hold there too.
    let (gate_tx, gate) = mpsc::channel::<()>();
    let (at_gate_tx, at_gate) = mpsc::channel::<()>();
    let (first_tx, first) = mpsc::channel();
    let sink = Gated {
        gate: Some((at_gate_tx, gate)),
        tx: first_tx,
    };
    engine.submit(long_request(), sink).unwrap();
    at_gate.recv().unwrap();
    let second = engine.submit_channel(long_request()).unwrap();
    let err = engine.submit_channel(long_request()).unwrap_err();
    assert!(matches!(err, TernError::Busy { limit: 1, .. }), "{err}");
    assert!(err.to_string().contains("retry later"), "{err}");
    gate_tx.send(()).unwrap();
    // The first caller goes away: its row is freed and the waiting one runs.
    first.recv().unwrap();
    drop(first);
    let (ids, _) = collect(second).unwrap();
    assert_eq!(ids.len(), ctx - 3, "ran to the context length");
    let s = engine.stats();
    assert_eq!((s.completed, s.aborted), (1, 1), "{s:?}");
    // Invalid requests are refused before queueing.
    let e = engine
        .submit_channel(GenerateRequest::new(vec![], 4))
        .unwrap_err();
    assert!(e.to_string().contains("prompt is empty"), "{e}");
}

#[test]
fn shutdown_cancels_what_does_not_finish_in_time() {
    let lm = llama();
    let engine = Engine::start(
        lm,
        EngineConfig {
            max_batch: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let running = engine.submit_channel(long_request()).unwrap();
    let waiting = engine.submit_channel(long_request()).unwrap();
    running.recv().unwrap();
    engine.shutdown(Duration::ZERO);
    assert!(matches!(collect(running), Err(TernError::Cancelled(_))));
    assert!(matches!(collect(waiting), Err(TernError::ShuttingDown)));
    let e = engine.submit_channel(long_request()).unwrap_err();
    assert!(matches!(e, TernError::ShuttingDown), "{e}");
    // A started request with some grace finishes normally.
    let engine = Engine::start(llama(), EngineConfig::default()).unwrap();
    let mut req = GenerateRequest::new(vec![5, 6, 7], 40);
    req.stop_at_eos = false;
    let short = engine.submit_channel(req).unwrap();
    while engine.stats().running == 0 && engine.stats().completed == 0 {
        std::thread::yield_now();
    }
    engine.shutdown(Duration::from_secs(30));
    assert_eq!(collect(short).unwrap().0.len(), 40);
}

#[test]
fn prompts_run_together_equal_prompts_run_alone() {
    let lm = llama();
    let a = lm
        .load_adapter(&adapter_dir("llama_rslora_all"), "a")
        .unwrap();
    let b = variant(&lm, &a);
    let prompts: Vec<Vec<u32>> = vec![
        vec![3, 9, 27],
        (1..12).collect(),
        vec![200],
        (40..60).collect(),
    ];
    let adapters = vec![Some(a.clone()), None, Some(b), Some(a)];
    // Rows 2 and 3 continue caches that already hold tokens (offsets differ per row).
    let history: Vec<Vec<u32>> = vec![vec![], vec![], vec![7, 8, 9, 10, 11], vec![5]];
    // A new cache per use: caches write in place, so clones would share buffers.
    let cache = |i: usize| {
        let mut c = lm.model.new_cache();
        if !history[i].is_empty() {
            let ad = tern::lora::BatchAdapters::uniform(adapters[i].clone());
            lm.model.step_with(&history[i], &mut c, &ad).unwrap();
        }
        c
    };
    let solo: Vec<Vec<f32>> = (0..prompts.len())
        .map(|i| {
            let ad = tern::lora::BatchAdapters::uniform(adapters[i].clone());
            lm.model.step_with(&prompts[i], &mut cache(i), &ad).unwrap()
        })
        .collect();
    let mut caches: Vec<_> = (0..prompts.len()).map(cache).collect();
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut cache_refs: Vec<_> = caches.iter_mut().collect();
    let got = lm
        .model
        .prefill_rows(&refs, &mut cache_refs, &adapters)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (i, (g, w)) in got.iter().zip(&solo).enumerate() {
        let d = max_abs_diff(g, w);
        assert!(d < TOL, "prompt {i}: together vs alone differ by {d}");
    }
    for (c, (h, p)) in caches.iter().zip(history.iter().zip(&prompts)) {
        assert_eq!(c.len(), h.len() + p.len());
    }
    // The rows really differ (adapters and prompts are applied per row).
    assert!(max_abs_diff(&got[0], &got[3]) > 0.1);
}

#[test]
fn prompts_past_the_few_row_product_give_each_prompt_its_bits_alone() {
    // Together these prompts pass `dense::MAX_ROWS` rows, past which f32 products go to a GEMM
    // whose sums differ in the last bits; each prompt must still get exactly what it gets
    // alone. (The fixture's context, 256, is what keeps a single prompt under the limit.)
    let lm = llama();
    let max = tern::quant::dense::MAX_ROWS;
    let prompts: Vec<Vec<u32>> = [max / 2, max / 3, 5, max - 10, max / 2]
        .iter()
        .enumerate()
        .map(|(i, &n)| (0..n as u32).map(|t| (t * 7 + i as u32) % 250).collect())
        .collect();
    let run = |ps: &[Vec<u32>]| {
        let mut caches: Vec<_> = ps.iter().map(|_| lm.model.new_cache()).collect();
        let mut refs: Vec<_> = caches.iter_mut().collect();
        let ps: Vec<&[u32]> = ps.iter().map(Vec::as_slice).collect();
        let out = lm.model.prefill_rows(&ps, &mut refs, &vec![None; ps.len()]);
        let lens: Vec<usize> = caches.iter().map(|c| c.len()).collect();
        (out.unwrap().to_vec2::<f32>().unwrap(), lens)
    };
    let (together, lens) = run(&prompts);
    assert_eq!(lens, prompts.iter().map(Vec::len).collect::<Vec<_>>());
    for (i, p) in prompts.iter().enumerate() {
        let (alone, _) = run(std::slice::from_ref(p));
        assert_eq!(together[i], alone[0], "prompt {i} ({} tokens)", p.len());
    }
}

#[test]
fn batch_file_lines_equal_single_runs_in_input_order() {
    use tern::generate::batch::{self, BatchDefaults};
    let lm = llama();
    let input = [
        r#"{"id": "a", "prompt": "hello world", "max_tokens": 5}"#,
        r#"{"messages": [{"role": "user", "content": "hi"}]}"#,
        "",
        r#"{"prompt": "abc", "temperature": 0.7, "seed": 3, "stop": ["zz"]}"#,
        r#"{"prompt": 3}"#,
        r#"{"prompt": "x", "bogus": 1}"#,
        r#"{"prompt": "x", "messages": []}"#,
        r#"{"prompt": "one more", "top_k": 5, "temperature": 1.0}"#,
    ]
    .join("\n");
    let defaults = BatchDefaults {
        sampling: SamplingParams::default(),
        max_tokens: 6,
        stop: vec![],
    };
    let parsed = batch::parse_lines(&lm, &input, &defaults);
    let bad: Vec<usize> = parsed
        .iter()
        .filter_map(|p| p.as_ref().err().map(|e| e.0))
        .collect();
    assert_eq!(bad, [5, 6, 7], "bad lines by number");
    let items: Vec<_> = parsed.into_iter().flatten().collect();
    assert_eq!(
        items.iter().map(|i| i.line).collect::<Vec<_>>(),
        [1, 2, 4, 8]
    );
    assert_eq!(items[0].request.max_tokens, 5);
    assert_eq!(items[2].request.sampling.seed, 3);
    let engine = Engine::start(
        lm.clone(),
        EngineConfig {
            max_batch: 3,
            max_queue: items.len(),
            ..Default::default()
        },
    )
    .unwrap();
    let mut seen = 0;
    let results = batch::run(&engine, items.clone(), |_| seen += 1).unwrap();
    assert_eq!(seen, 4);
    for (r, it) in results.iter().zip(&items) {
        assert_eq!(r.line, it.line);
        let got = r.outcome.as_ref().unwrap();
        let want = solo(&lm, &it.request);
        assert_eq!(got.text, want.text, "line {}", it.line);
        assert_eq!(got.completion_tokens, want.tokens.len());
    }
    assert_eq!(results[0].to_json()["id"], "a");
}

#[test]
fn a_shared_prompt_prefix_is_run_once_and_changes_nothing() {
    let lm = llama();
    let a = lm
        .load_adapter(&adapter_dir("llama_rslora_all"), "a")
        .unwrap();
    let engine = Engine::start(lm.clone(), EngineConfig::default()).unwrap();
    let prefix: Vec<u32> = (0..60).map(|i| (i * 13 % 250) as u32 + 1).collect();
    let req = |suffix: &[u32], adapter: Option<Arc<tern::lora::LoraAdapter>>| {
        let mut r =
            GenerateRequest::new([prefix.as_slice(), suffix].concat(), 8).with_adapter(adapter);
        r.stop_at_eos = false;
        r
    };
    let run = |r: &GenerateRequest| collect(engine.submit_channel(r.clone()).unwrap()).unwrap();
    // Cold, then warm with another suffix, then the same prefix under an adapter (no reuse:
    // its keys and values differ), then the adapter again (reuse).
    let (s1, s2, s3): (Vec<u32>, Vec<u32>, Vec<u32>) =
        ((7..17).collect(), (100..110).collect(), (42..52).collect());
    let reqs = [
        req(&s1, None),
        req(&s2, None),
        req(&s1, Some(a.clone())),
        req(&s3, Some(a)),
    ];
    let mut stats = vec![];
    for r in &reqs {
        let (ids, lps) = run(r);
        let want = solo(&lm, r);
        assert_eq!(ids, want.ids());
        let wl: Vec<f32> = want.tokens.iter().map(|t| t.logprob).collect();
        assert!(max_abs_diff(&lps, &wl) < TOL);
        let s = engine.stats();
        stats.push((s.prefix_hits, s.prefix_tokens));
    }
    assert_eq!(stats, [(0, 0), (1, 60), (1, 60), (2, 120)]);
}

#[test]
fn the_prefix_cache_keeps_to_its_byte_budget() {
    let lm = llama();
    let prompt = |seed: u32| -> Vec<u32> { (0..50).map(|i| (i * 7 + seed) % 250 + 1).collect() };
    let mut c = lm.model.new_cache();
    lm.model.step(&prompt(1), &mut c).unwrap();
    // Room for one 50-token prompt, not two.
    let engine = Engine::start(
        lm.clone(),
        EngineConfig {
            prefix_cache_bytes: c.bytes() * 3 / 2,
            ..Default::default()
        },
    )
    .unwrap();
    let run = |seed: u32| {
        let mut p = prompt(seed);
        p.extend(300..310);
        collect(engine.submit_channel(GenerateRequest::new(p, 2)).unwrap()).unwrap();
        engine.stats().prefix_hits
    };
    assert_eq!(run(1), 0);
    assert_eq!(run(1), 1, "the first prefix is reused");
    assert_eq!(run(2), 1, "a second one evicts it");
    assert_eq!(run(1), 1, "so the first misses again");
    assert_eq!(run(1), 2);
}

/// `tern bench batch` on a fixture: both ways give the same tokens, and each way's prompt
/// time is a positive part of its run (the engine's steps report their prompt time).
#[test]
fn the_batch_benchmark_splits_out_prompt_time() {
    use tern::bench::batch::{run, BatchBenchOptions};
    let o = BatchBenchOptions {
        rows: 4,
        batch: 2,
        max_tokens: 3,
        rounds: 1,
    };
    let r = run(&fixture("llama"), &LoadOptions::default(), &o).unwrap();
    assert!(r.same_tokens);
    assert_eq!(r.tokens, 12);
    for (prompt_ms, tok_s) in [
        (r.sequential_prompt_ms, r.sequential_tok_s),
        (r.batched_prompt_ms, r.batched_tok_s),
    ] {
        let run_ms = r.tokens as f64 / tok_s * 1e3;
        assert!(
            prompt_ms > 0.0 && prompt_ms < run_ms,
            "{prompt_ms} of {run_ms} ms"
        );
    }
}
