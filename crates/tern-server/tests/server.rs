//! The server end to end over real HTTP (ureq) on 127.0.0.1:0: streaming and whole answers
//! equal the library's own generation, sixteen concurrent requests over two adapters and
//! the base equal the same requests alone, adapters come and go while requests run, and
//! every kind of bad input gets its status and an OpenAI-shaped error.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tern::lora::LoraAdapter;
use tern::{ChatMessage, GenerateRequest, LoadOptions, LoadedModel, Prompt};
use tern_server::{ServeConfig, Server};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tern/tests/fixtures")
}

fn llama() -> Arc<LoadedModel> {
    Arc::new(LoadedModel::load(&fixtures().join("models/llama"), &LoadOptions::default()).unwrap())
}

fn adapter_a() -> PathBuf {
    fixtures().join("adapters/llama_rslora_all")
}

/// Writes a second adapter for the llama base (the fixture's with B negated and halved).
fn write_adapter_b(lm: &LoadedModel, dir: &std::path::Path) {
    let a = lm.load_adapter(&adapter_a(), "a").unwrap();
    let tensors = a
        .modules()
        .map(|(m, p)| (m.to_string(), p.a.clone(), (p.b().unwrap() * -0.5).unwrap()))
        .collect();
    LoraAdapter::from_tensors("b", a.config().clone(), lm.model.slots(), tensors)
        .unwrap()
        .save(dir)
        .unwrap();
}

struct TestServer {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    fn start(lm: Arc<LoadedModel>, cfg: ServeConfig) -> Self {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let s = Server::bind(lm, cfg).await.unwrap();
                addr_tx.send(s.local_addr()).unwrap();
                s.run(async move {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
            })
        });
        let addr = addr_rx.recv().unwrap();
        Self {
            url: format!("http://{addr}"),
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config(adapters: Vec<(&str, PathBuf)>) -> ServeConfig {
    ServeConfig {
        port: 0,
        model_name: "llama".into(),
        adapters: adapters
            .into_iter()
            .map(|(n, p)| (n.to_string(), p))
            .collect(),
        ..Default::default()
    }
}

/// POSTs JSON; returns (status, body, retry-after).
fn post(url: &str, body: &Value) -> (u16, Value, Option<String>) {
    post_raw(url, &body.to_string(), None)
}

fn post_raw(url: &str, body: &str, key: Option<&str>) -> (u16, Value, Option<String>) {
    let mut r = ureq::post(url).set("Content-Type", "application/json");
    if let Some(k) = key {
        r = r.set("Authorization", &format!("Bearer {k}"));
    }
    answer(r.send_string(body))
}

fn answer(r: Result<ureq::Response, ureq::Error>) -> (u16, Value, Option<String>) {
    let resp = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = resp.status();
    let retry = resp.header("retry-after").map(str::to_string);
    let text = resp.into_string().unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, v, retry)
}

fn get(url: &str) -> (u16, Value) {
    let (s, v, _) = answer(ureq::get(url).call());
    (s, v)
}

/// Asserts the OpenAI error shape and returns the message.
fn error_message(v: &Value) -> String {
    let e = &v["error"];
    assert!(e["type"].is_string() && e["code"].is_string(), "{v}");
    e["message"].as_str().unwrap().to_string()
}

/// Reads an SSE stream to `[DONE]`; returns the parsed `data:` objects.
fn read_stream(resp: ureq::Response) -> Vec<Value> {
    let mut out = vec![];
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.unwrap();
        let Some(d) = line.strip_prefix("data: ") else {
            continue;
        };
        if d == "[DONE]" {
            return out;
        }
        out.push(serde_json::from_str(d).unwrap());
    }
    panic!("stream ended without [DONE]");
}

fn stream_post(url: &str, body: &Value) -> ureq::Response {
    ureq::post(url)
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .unwrap()
}

/// The library's own greedy answer for the same input.
fn solo_text(
    lm: &LoadedModel,
    prompt: Prompt,
    adapter: Option<Arc<LoraAdapter>>,
    n: usize,
) -> (String, String) {
    let ids = lm.encode_prompt(&prompt).unwrap();
    let out = lm
        .generate_collect(GenerateRequest::new(ids, n).with_adapter(adapter))
        .unwrap();
    (out.text, out.finish_reason.unwrap().as_str().to_string())
}

#[test]
fn chat_whole_and_streamed_equal_the_library() {
    let lm = llama();
    let server = TestServer::start(lm.clone(), config(vec![("a", adapter_a())]));
    let url = format!("{}/v1/chat/completions", server.url);
    let a = lm.load_adapter(&adapter_a(), "a").unwrap();
    for (model, adapter) in [("llama", None), ("a", Some(a))] {
        let msgs = vec![
            ChatMessage::new("system", "be brief"),
            ChatMessage::new("user", "hello there"),
        ];
        let (want, why) = solo_text(&lm, Prompt::Chat(msgs), adapter, 12);
        let body = json!({
            "model": model, "temperature": 0, "max_tokens": 12,
            "messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]}],
        });
        let (s, v, _) = post(&url, &body);
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["model"], model);
        assert_eq!(
            v["choices"][0]["message"]["content"],
            want.as_str(),
            "{model}"
        );
        assert_eq!(v["choices"][0]["finish_reason"], why.as_str());
        let u = &v["usage"];
        assert_eq!(
            u["total_tokens"],
            u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
        );

        let mut sb = body.clone();
        sb["stream"] = json!(true);
        sb["stream_options"] = json!({"include_usage": true});
        let chunks = read_stream(stream_post(&url, &sb));
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = chunks
            .iter()
            .filter_map(|c| {
                c["choices"].get(0)?["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        assert_eq!(text, want, "{model}: streamed text");
        assert!(chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk"));
        let last_choice = &chunks[chunks.len() - 2]["choices"][0];
        assert_eq!(last_choice["finish_reason"], why.as_str());
        assert_eq!(chunks.last().unwrap()["usage"], v["usage"], "usage chunk");
    }
}

#[test]
fn sixteen_concurrent_requests_equal_the_same_requests_alone() {
    let lm = llama();
    let tmp = tempfile::tempdir().unwrap();
    write_adapter_b(&lm, tmp.path());
    let server = TestServer::start(
        lm.clone(),
        ServeConfig {
            max_batch: 8,
            ..config(vec![("a", adapter_a()), ("b", tmp.path().to_path_buf())])
        },
    );
    let url = format!("{}/v1/completions", server.url);
    let models = ["llama", "a", "b"];
    let reqs: Vec<(String, Vec<u32>, usize)> = (0..16)
        .map(|i| {
            let ids = (0..2 + i)
                .map(|j| ((i * 37 + j * 11) % 200) as u32 + 3)
                .collect();
            (models[i % 3].to_string(), ids, 4 + i % 7)
        })
        .collect();
    let barrier = Arc::new(Barrier::new(reqs.len()));
    let answers: Vec<_> = reqs
        .iter()
        .cloned()
        .map(|(model, ids, n)| {
            let (url, barrier) = (url.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let body =
                    json!({"model": model, "prompt": ids, "max_tokens": n, "temperature": 0});
                post(&url, &body)
            })
        })
        .collect();
    let a = lm.load_adapter(&adapter_a(), "a").unwrap();
    let b = lm.load_adapter(tmp.path(), "b").unwrap();
    let mut by_adapter_differs = 0;
    for ((model, ids, n), h) in reqs.iter().zip(answers) {
        let (s, v, _) = h.join().unwrap();
        assert_eq!(s, 200, "{v}");
        let adapter = match model.as_str() {
            "a" => Some(a.clone()),
            "b" => Some(b.clone()),
            _ => None,
        };
        let solo = |ad| {
            let out = lm
                .generate_collect(GenerateRequest::new(ids.clone(), *n).with_adapter(ad))
                .unwrap();
            out.text
        };
        let want = solo(adapter.clone());
        assert_eq!(v["choices"][0]["text"], want.as_str(), "{model} {ids:?}");
        if adapter.is_some() && solo(None) != want {
            by_adapter_differs += 1;
        }
    }
    assert!(
        by_adapter_differs >= 5,
        "adapters changed only {by_adapter_differs} of 10 answers"
    );
    // Rows were batched: fewer decode steps than generated tokens.
    let metrics = ureq::get(&format!("{}/metrics", server.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let read = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in {metrics}"))
    };
    let (steps, tokens) = (
        read("tern_engine_steps_total"),
        read("tern_generated_tokens_total"),
    );
    assert!(
        steps < tokens * 0.75,
        "steps {steps} vs tokens {tokens}: nothing was batched"
    );
    assert!(
        metrics.contains("tern_requests_total{endpoint=\"/v1/completions\",status=\"200\"} 16"),
        "{metrics}"
    );
}

#[test]
fn adapters_load_and_unload_while_requests_run() {
    let lm = llama();
    let tmp = tempfile::tempdir().unwrap();
    write_adapter_b(&lm, tmp.path());
    let server = TestServer::start(lm.clone(), config(vec![("a", adapter_a())]));
    let (comp, adapters) = (
        format!("{}/v1/completions", server.url),
        format!("{}/v1/adapters", server.url),
    );
    let a = lm.load_adapter(&adapter_a(), "a").unwrap();
    let prompt: Vec<u32> = vec![5, 9, 13, 17];
    let long = 200;
    let (want_a, _) = {
        let out = lm
            .generate_collect(GenerateRequest::new(prompt.clone(), long).with_adapter(Some(a)))
            .unwrap();
        (out.text, ())
    };
    // A long streaming request on `a` is running...
    let running = stream_post(
        &comp,
        &json!({"model": "a", "prompt": prompt, "max_tokens": long, "temperature": 0, "stream": true}),
    );
    let mut lines = BufReader::new(running.into_reader()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("data: "), "{first}");
    // ...while `b` is loaded and used, and `a` is unloaded.
    let (s, v, _) = post(&adapters, &json!({"name": "b", "path": tmp.path()}));
    assert_eq!(s, 201, "{v}");
    let (s, v, _) = post(
        &comp,
        &json!({"model": "b", "prompt": prompt, "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(s, 200, "{v}");
    let (s, v, _) = answer(ureq::delete(&format!("{adapters}/a")).call());
    assert_eq!((s, &v["deleted"]), (200, &json!(true)), "{v}");
    let (_, models) = get(&format!("{}/v1/models", server.url));
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["llama", "b"]);
    // The running request finishes with the version it started with.
    let mut text = String::new();
    let first: Value = serde_json::from_str(first.strip_prefix("data: ").unwrap()).unwrap();
    text.push_str(first["choices"][0]["text"].as_str().unwrap());
    for l in lines {
        let l = l.unwrap();
        match l.strip_prefix("data: ") {
            Some("[DONE]") => break,
            Some(d) => {
                let v: Value = serde_json::from_str(d).unwrap();
                text.push_str(
                    v["choices"][0]["text"]
                        .as_str()
                        .unwrap_or_else(|| panic!("{v}")),
                );
            }
            None => {}
        }
    }
    assert_eq!(text, want_a);
    // `a` is gone now; a bad path and a clashing name are refused by name.
    let (s, v, _) = post(&comp, &json!({"model": "a", "prompt": "x"}));
    assert_eq!(s, 404, "{v}");
    assert!(error_message(&v).contains("`a` is not served"), "{v}");
    let (s, v, _) = answer(ureq::delete(&format!("{adapters}/a")).call());
    assert_eq!(s, 404, "{v}");
    let (s, v, _) = post(
        &adapters,
        &json!({"name": "c", "path": "/nonexistent/adapter"}),
    );
    assert_eq!(s, 400, "{v}");
    assert!(error_message(&v).contains("/nonexistent/adapter"), "{v}");
    let (s, v, _) = post(&adapters, &json!({"name": "base", "path": tmp.path()}));
    assert_eq!(s, 400, "{v}");
    // The base model is not an adapter and cannot be unloaded, under either name.
    for name in ["base", "llama"] {
        let (s, v, _) = answer(ureq::delete(&format!("{adapters}/{name}")).call());
        assert_eq!(s, 400, "{v}");
        let m = error_message(&v);
        assert!(m.contains("base model cannot be unloaded"), "{m}");
        assert!(!m.contains("load it first"), "{m}");
    }
    let m = ureq::get(&format!("{}/metrics", server.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        m.contains("tern_adapter_loads_total{result=\"ok\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("tern_adapter_loads_total{result=\"error\"} 1"),
        "{m}"
    );
}

#[test]
fn bad_input_gets_clear_errors_and_breaks_nothing() {
    let lm = llama();
    let mut server = TestServer::start(
        lm,
        ServeConfig {
            max_tokens_limit: 50,
            max_prompt_tokens: 20,
            max_body_bytes: 4096,
            ..config(vec![])
        },
    );
    let chat = format!("{}/v1/chat/completions", server.url);
    let comp = format!("{}/v1/completions", server.url);
    let msg = |s: &str| json!({"model": "llama", "messages": [{"role": "user", "content": s}], "max_tokens": 4});
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (chat.as_str(), "{not json".into(), 400, "invalid_json"),
        (
            chat.as_str(),
            json!({"model": "llama"}).to_string(),
            400,
            "invalid_json",
        ),
        (
            chat.as_str(),
            json!({"model": "llama", "messages": "hi"}).to_string(),
            400,
            "invalid_json",
        ),
        (
            chat.as_str(),
            json!({"model": "llama", "messages": []}).to_string(),
            400,
            "invalid_messages",
        ),
        (
            chat.as_str(),
            json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).to_string(),
            404,
            "model_not_found",
        ),
        (
            chat.as_str(),
            {
                let mut m = msg("x");
                m["max_tokens"] = json!(51);
                m.to_string()
            },
            400,
            "invalid_parameter",
        ),
        (
            chat.as_str(),
            {
                let mut m = msg("x");
                m["max_tokens"] = json!(0);
                m.to_string()
            },
            400,
            "invalid_parameter",
        ),
        (
            chat.as_str(),
            {
                let mut m = msg("x");
                m["n"] = json!(2);
                m.to_string()
            },
            400,
            "unsupported_parameter",
        ),
        (
            chat.as_str(),
            {
                let mut m = msg("x");
                m["temperature"] = json!(-1);
                m.to_string()
            },
            400,
            "invalid_parameter",
        ),
        (
            chat.as_str(),
            {
                let mut m = msg("x");
                m["stop"] = json!([1, 2]);
                m.to_string()
            },
            400,
            "invalid_parameter",
        ),
        (
            chat.as_str(),
            msg(&"word ".repeat(40)).to_string(),
            400,
            "context_length_exceeded",
        ),
        (
            chat.as_str(),
            msg(&"x".repeat(5000)).to_string(),
            413,
            "body_too_large",
        ),
        (
            comp.as_str(),
            json!({"model": "llama", "prompt": [1, -2]}).to_string(),
            400,
            "invalid_prompt",
        ),
        (
            comp.as_str(),
            json!({"model": "llama", "prompt": [1, 99999]}).to_string(),
            400,
            "invalid_request",
        ),
        (
            comp.as_str(),
            json!({"model": "llama", "prompt": ["a", "b"]}).to_string(),
            400,
            "invalid_prompt",
        ),
        (
            comp.as_str(),
            json!({"model": "llama", "prompt": "x", "echo": true}).to_string(),
            400,
            "unsupported_parameter",
        ),
        (
            comp.as_str(),
            json!({"model": "llama", "prompt": "x", "best_of": 2}).to_string(),
            400,
            "unsupported_parameter",
        ),
        (
            chat.as_str(),
            {
                let mut m = msg("x");
                m["response_format"] = json!({"type": "json_object"});
                m.to_string()
            },
            400,
            "unsupported_parameter",
        ),
        (
            chat.as_str(),
            {
                let mut m = msg("x");
                m["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "x"}});
                m.to_string()
            },
            400,
            "unsupported_parameter",
        ),
        (
            chat.as_str(),
            {
                let mut m = msg("x");
                m["top_logprobs"] = json!(2);
                m.to_string()
            },
            400,
            "invalid_parameter",
        ),
        (
            chat.as_str(),
            {
                let mut m = msg("x");
                m["max_completion_tokens"] = json!(5);
                m.to_string()
            },
            400,
            "invalid_parameter",
        ),
        (
            chat.as_str(),
            json!({"model": "llama", "messages": [{"role": "User", "content": "x"}]}).to_string(),
            400,
            "invalid_messages",
        ),
        (
            chat.as_str(),
            json!({"model": "llama", "messages": [{"role": "user", "content": null}]}).to_string(),
            400,
            "invalid_content",
        ),
        (
            chat.as_str(),
            json!({"model": "llama", "messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]}).to_string(),
            400,
            "invalid_content",
        ),
    ];
    for (url, body, status, code) in &cases {
        let (s, v, _) = post_raw(url, body, None);
        assert_eq!(
            (s, v["error"]["code"].as_str().unwrap_or("")),
            (*status, *code),
            "{body}: {v}"
        );
        let m = error_message(&v);
        assert!(!m.is_empty() && !m.contains('\n'), "{m}");
    }
    let (s, v) = get(&format!("{}/v1/nothing", server.url));
    assert_eq!(s, 404);
    error_message(&v);
    // Unknown fields are ignored (clients send many); the server still answers.
    let mut ok = msg("hello");
    ok["user"] = json!("someone");
    let (s, v, _) = post(&chat, &ok);
    assert_eq!(s, 200, "{v}");
    // Settings that change nothing are served: plain-text output, one candidate, the same
    // budget under both names.
    ok["response_format"] = json!({"type": "text"});
    ok["max_completion_tokens"] = json!(4);
    let (s, v, _) = post(&chat, &ok);
    assert_eq!(s, 200, "{v}");
    let (s, v, _) = post(
        &comp,
        &json!({"model": "llama", "prompt": "x", "best_of": 1, "max_tokens": 2}),
    );
    assert_eq!(s, 200, "{v}");
    let (s, v) = get(&format!("{}/health", server.url));
    assert_eq!((s, &v["status"]), (200, &json!("ok")));
    // After shutdown the port is closed.
    server.stop();
    assert!(ureq::get(&format!("{}/health", server.url)).call().is_err());
}

#[test]
fn api_key_is_required_when_set() {
    let server = TestServer::start(
        llama(),
        ServeConfig {
            api_key: Some("s3cret".into()),
            ..config(vec![])
        },
    );
    let url = format!("{}/v1/completions", server.url);
    let body = json!({"model": "base", "prompt": "hi", "max_tokens": 2}).to_string();
    for key in [None, Some("wrong"), Some("s3cre")] {
        let (s, v, _) = post_raw(&url, &body, key);
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (401, Some("invalid_api_key")),
            "{key:?}"
        );
    }
    let (s, v, _) = post_raw(&url, &body, Some("s3cret"));
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        get(&format!("{}/health", server.url)).0,
        200,
        "health stays open"
    );
}

#[test]
fn a_full_queue_answers_429_and_a_gone_client_frees_its_row() {
    let server = TestServer::start(
        llama(),
        ServeConfig {
            max_batch: 1,
            max_queue: 0,
            ..config(vec![])
        },
    );
    let url = format!("{}/v1/completions", server.url);
    let n = 6;
    let barrier = Arc::new(Barrier::new(n));
    let answers: Vec<_> = (0..n)
        .map(|i| {
            let (url, barrier) = (url.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                post(&url, &json!({"model": "base", "prompt": [3, 4, 5 + i], "max_tokens": 200, "temperature": 0}))
            })
        })
        .collect();
    let (mut ok, mut busy) = (0, 0);
    for h in answers {
        let (s, v, retry) = h.join().unwrap();
        match s {
            200 => ok += 1,
            429 => {
                busy += 1;
                assert_eq!(retry.as_deref(), Some("1"));
                assert!(error_message(&v).contains("retry later"), "{v}");
            }
            _ => panic!("{s}: {v}"),
        }
    }
    assert!(ok >= 1 && busy >= 1, "ok {ok}, busy {busy}");
    // A streaming client that goes away after one chunk: its row is freed, counted aborted.
    // The last answer can reach its client before the engine frees that row at its next step
    // boundary, so a 429 here is the limit still holding: retry briefly.
    let body = json!({"model": "base", "prompt": [7, 8], "max_tokens": 240, "temperature": 0, "stream": true});
    let t = Instant::now();
    let resp = loop {
        match ureq::post(&url)
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
        {
            Err(ureq::Error::Status(429, _)) if t.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            r => break r.unwrap(),
        }
    };
    let mut r = BufReader::new(resp.into_reader());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    drop(r);
    let t = Instant::now();
    loop {
        let (_, h) = get(&format!("{}/health", server.url));
        if h["aborted"] == 1 && h["running"] == 0 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "row not freed: {h}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn shutdown_cancels_running_streams_cleanly() {
    let mut server = TestServer::start(
        llama(),
        ServeConfig {
            shutdown_grace: Duration::ZERO,
            ..config(vec![])
        },
    );
    let url = format!("{}/v1/completions", server.url);
    let resp = stream_post(
        &url,
        &json!({"model": "base", "prompt": [7, 8], "max_tokens": 240, "temperature": 0, "stream": true}),
    );
    let mut lines = BufReader::new(resp.into_reader()).lines();
    lines.next().unwrap().unwrap();
    server.stop();
    // The stream ends with an error event and [DONE], not a dropped connection.
    let rest: Vec<String> = lines
        .map(|l| l.unwrap())
        .filter(|l| l.starts_with("data: "))
        .collect();
    assert_eq!(
        rest.last().map(String::as_str),
        Some("data: [DONE]"),
        "{rest:?}"
    );
    let err: Value =
        serde_json::from_str(rest[rest.len() - 2].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(err["error"]["code"], "shutting_down", "{err}");
}

#[test]
fn repeated_deterministic_requests_come_from_the_response_cache() {
    let server = TestServer::start(
        llama(),
        ServeConfig {
            response_cache_entries: 8,
            ..config(vec![])
        },
    );
    let url = format!("{}/v1/completions", server.url);
    let hits = || -> u64 {
        let m = ureq::get(&format!("{}/metrics", server.url))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        m.lines()
            .find_map(|l| {
                l.strip_prefix("tern_response_cache_hits_total ")?
                    .parse()
                    .ok()
            })
            .unwrap()
    };
    let greedy = json!({"model": "base", "prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0});
    let (_, first, _) = post(&url, &greedy);
    let (_, again, _) = post(&url, &greedy);
    assert_eq!(hits(), 1);
    assert_eq!(first["choices"], again["choices"]);
    assert_eq!(first["usage"], again["usage"]);
    // Streamed, the repeat gives the same text.
    let mut sb = greedy.clone();
    sb["stream"] = json!(true);
    let text: String = read_stream(stream_post(&url, &sb))
        .iter()
        .filter_map(|c| c["choices"].get(0)?["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, first["choices"][0]["text"].as_str().unwrap());
    assert_eq!(hits(), 2);
    // Sampling without a seed is never cached; with one it is.
    let unseeded =
        json!({"model": "base", "prompt": [5, 6, 7], "max_tokens": 6, "temperature": 1.0});
    post(&url, &unseeded);
    post(&url, &unseeded);
    assert_eq!(hits(), 2);
    let mut seeded = unseeded.clone();
    seeded["seed"] = json!(11);
    let (_, a, _) = post(&url, &seeded);
    let (_, b, _) = post(&url, &seeded);
    assert_eq!(hits(), 3);
    assert_eq!(a["choices"], b["choices"]);
}

/// Copies the fixture adapter into `dir` and lets `spoil` damage the copy.
fn spoiled_adapter(dir: &std::path::Path, spoil: impl FnOnce(&std::path::Path)) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(adapter_a().join(f), dir.join(f)).unwrap();
    }
    spoil(dir);
    dir.to_path_buf()
}

#[test]
fn a_corrupt_adapter_file_is_the_clients_400() {
    let server = TestServer::start(llama(), config(vec![]));
    let adapters = format!("{}/v1/adapters", server.url);
    let tmp = tempfile::tempdir().unwrap();
    let weights = |d: &std::path::Path| d.join("adapter_model.safetensors");
    let truncate = |len: u64| {
        move |d: &std::path::Path| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(weights(d))
                .unwrap();
            f.set_len(len).unwrap();
        }
    };
    let full = std::fs::metadata(weights(&adapter_a())).unwrap().len();
    type Spoil<'a> = Box<dyn FnOnce(&std::path::Path) + 'a>;
    let cases: Vec<(&str, Spoil)> = vec![
        ("empty", Box::new(truncate(0))),
        ("4 bytes", Box::new(truncate(4))),
        ("100 bytes", Box::new(truncate(100))),
        ("half", Box::new(truncate(full / 2))),
        ("one byte short", Box::new(truncate(full - 1))),
        (
            "garbled header",
            Box::new(|d: &std::path::Path| {
                let mut b = std::fs::read(weights(d)).unwrap();
                b[8..40].fill(b'#');
                std::fs::write(weights(d), b).unwrap();
            }),
        ),
        (
            "bad config",
            Box::new(|d: &std::path::Path| {
                std::fs::write(d.join("adapter_config.json"), "{\"r\": ").unwrap();
            }),
        ),
        (
            "garbage pickle",
            Box::new(|d: &std::path::Path| {
                std::fs::remove_file(weights(d)).unwrap();
                std::fs::write(d.join("adapter_model.bin"), b"PK\x03\x04 not a zip").unwrap();
            }),
        ),
    ];
    for (i, (what, spoil)) in cases.into_iter().enumerate() {
        let dir = spoiled_adapter(&tmp.path().join(i.to_string()), spoil);
        let (s, v, _) = post(&adapters, &json!({"name": "c", "path": dir}));
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (400, Some("invalid_adapter")),
            "{what}: {v}"
        );
        let m = error_message(&v);
        assert!(
            !m.contains('\n') && m.contains(tmp.path().to_str().unwrap()),
            "{what}: {m}"
        );
    }
    // Nothing was registered, and the server still serves.
    let (s, v) = get(&adapters);
    assert_eq!((s, &v["data"]), (200, &json!([])));
}

#[test]
fn wrong_methods_and_unknown_routes_get_json_errors() {
    let server = TestServer::start(llama(), config(vec![]));
    let u = |p: &str| format!("{}{p}", server.url);
    for (method, path, allowed) in [
        ("GET", "/v1/chat/completions", &["POST"][..]),
        ("GET", "/v1/completions", &["POST"]),
        ("PUT", "/v1/models", &["GET"]),
        ("DELETE", "/v1/adapters", &["GET", "POST"]),
        ("GET", "/v1/adapters/a", &["DELETE"]),
        ("POST", "/health", &["GET"]),
    ] {
        let (s, v, _) = answer(ureq::request(method, &u(path)).call());
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (405, Some("method_not_allowed")),
            "{method} {path}: {v}"
        );
        let m = error_message(&v);
        assert!(
            m.contains(&format!("{method} {path}")) && allowed.iter().all(|a| m.contains(a)),
            "{method} {path}: {m}"
        );
    }
    for (method, path) in [("GET", "/v1/nothing"), ("POST", "/v2/completions")] {
        let (s, v, _) = answer(ureq::request(method, &u(path)).call());
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (404, Some("not_found")),
            "{v}"
        );
        assert!(error_message(&v).contains(path), "{v}");
    }
    // A path segment that is not UTF-8 is answered in the same shape.
    let (s, v, _) = answer(ureq::delete(&u("/v1/adapters/%FF")).call());
    assert_eq!(s, 400, "{v}");
    error_message(&v);
    // The Allow header axum sets survives the rewrite.
    match ureq::get(&u("/v1/chat/completions")).call() {
        Err(ureq::Error::Status(405, r)) => assert_eq!(r.header("allow"), Some("POST")),
        r => panic!("{r:?}"),
    }
}

#[test]
fn settings_that_cannot_serve_as_meant_are_refused_at_start() {
    let lm = llama();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cases = [
        (
            ServeConfig {
                api_key: Some(String::new()),
                ..config(vec![])
            },
            "--api-key is empty",
        ),
        (
            ServeConfig {
                api_key: Some("key\n".into()),
                ..config(vec![])
            },
            "--api-key starts or ends with whitespace",
        ),
        (
            ServeConfig {
                max_body_bytes: 0,
                ..config(vec![])
            },
            "--max-body-bytes must be at least 1",
        ),
        (
            config(vec![("a", adapter_a()), ("a", PathBuf::from("/elsewhere"))]),
            "adapter name `a` is given twice",
        ),
    ];
    for (cfg, want) in cases {
        // ServeConfig::validate is what `tern serve` runs before loading the model.
        let early = cfg.validate().map(|_| ()).unwrap_err().to_string();
        let e = rt
            .block_on(Server::bind(lm.clone(), cfg))
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert_eq!(early, e);
        assert!(e.contains(want) && !e.contains('\n'), "{e}");
    }
}
