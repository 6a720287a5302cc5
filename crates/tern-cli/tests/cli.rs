//! The `tern` binary as a user runs it: help without a model, the jsonl contract against the
//! transformers reference, plain text streaming, one-line errors, adapters, training, and
//! `tern serve` answering over HTTP and stopping cleanly on SIGTERM.

mod common;

use common::*;
use std::path::PathBuf;
use std::process::Command;

#[test]
fn adapters_generate_merge_and_match_peft() {
    let r: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter_fixture("llama_rslora_all").join("reference.json"))
            .unwrap(),
    )
    .unwrap();
    let model = fixture("llama");
    let model = model.to_str().unwrap();
    let adapter = adapter_fixture("llama_rslora_all");
    let adapter = adapter.to_str().unwrap();
    let prompt = r["prompt"].as_str().unwrap();
    let want: Vec<u64> = r["greedy_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let got = greedy_ids(model, prompt, 8, &["--adapter", adapter]);
    assert!(
        !got.is_empty() && want.starts_with(&got),
        "{got:?} vs peft {want:?}"
    );
    let merged_in_memory = greedy_ids(model, prompt, 8, &["--adapter", adapter, "--merge-adapter"]);
    assert_eq!(merged_in_memory, got);

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let o = tern(&[
        "merge",
        "--model",
        model,
        "--adapter",
        adapter,
        "--out",
        out.to_str().unwrap(),
        "--dtype",
        "f32",
        "--shard-size",
        "100KB",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let msg = String::from_utf8(o.stdout).unwrap();
    assert!(
        msg.contains("merged 14 of") && msg.contains("shards"),
        "{msg}"
    );
    assert_eq!(greedy_ids(out.to_str().unwrap(), prompt, 8, &[]), got);
    // The base alone answers differently: the adapter did something.
    assert_ne!(greedy_ids(model, prompt, 8, &[]), got);
}

#[test]
fn help_and_completions_need_no_model() {
    let o = tern(&["--help"]);
    assert!(o.status.success());
    let s = String::from_utf8(o.stdout).unwrap();
    for cmd in [
        "generate",
        "merge",
        "convert",
        "inspect",
        "bench",
        "completions",
    ] {
        assert!(s.contains(cmd), "{s}");
    }
    let o = tern(&["generate", "--help"]);
    let s = String::from_utf8(o.stdout).unwrap();
    for flag in [
        "--model",
        "--chat",
        "--system",
        "--top-p",
        "--min-p",
        "--repetition-penalty",
        "--seed",
        "--dtype",
        "--output",
    ] {
        assert!(s.contains(flag), "missing {flag}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let o = tern(&["completions", shell]);
        assert!(o.status.success() && o.stdout.len() > 500, "{shell}");
    }
}

#[test]
fn jsonl_output_matches_the_reference() {
    let r = reference("llama");
    let model = fixture("llama");
    let o = greedy(
        model.to_str().unwrap(),
        r["prompt"].as_str().unwrap(),
        8,
        true,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 9);
    for (i, l) in lines[..8].iter().enumerate() {
        assert_eq!(l["id"], r["greedy_ids"][i], "token {i}");
        let d = (l["logprob"].as_f64().unwrap() - r["greedy_logprobs"][i].as_f64().unwrap()).abs();
        assert!(d < 1e-4, "logprob {i}: {d}");
        assert!(l["text"].is_string());
        assert_eq!(l.as_object().unwrap().len(), 3);
    }
    let last = &lines[8];
    assert_eq!(last["finish_reason"], "length");
    assert_eq!(
        last["prompt_tokens"],
        r["input_ids"].as_array().unwrap().len()
    );
    assert_eq!(last["completion_tokens"], 8);
}

#[test]
fn text_output_streams_the_same_tokens() {
    let r = reference("qwen2");
    let model = fixture("qwen2");
    let jsonl = greedy(
        model.to_str().unwrap(),
        r["prompt"].as_str().unwrap(),
        6,
        true,
    );
    let pieces: String = String::from_utf8(jsonl.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["text"].as_str().map(String::from))
        .collect();
    let text = greedy(
        model.to_str().unwrap(),
        r["prompt"].as_str().unwrap(),
        6,
        false,
    );
    assert!(text.status.success());
    assert_eq!(
        String::from_utf8(text.stdout).unwrap(),
        format!("{pieces}\n")
    );
}

#[test]
fn chat_and_sampling_flags_work() {
    let model = fixture("smollm");
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--chat",
        "Hi there",
        "--system",
        "You are terse.",
        "--temperature",
        "0.8",
        "--top-k",
        "20",
        "--top-p",
        "0.9",
        "--min-p",
        "0.05",
        "--repetition-penalty",
        "1.1",
        "--seed",
        "3",
        "--max-tokens",
        "5",
        "--output",
        "jsonl",
    ];
    let o = tern(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout, tern(&args).stdout, "same seed, same tokens");
    let out = String::from_utf8(o.stdout).unwrap();
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let r = reference("smollm");
    assert_eq!(
        last["prompt_tokens"],
        r["chat"]["input_ids"].as_array().unwrap().len()
    );
}

#[test]
fn inspect_describes_without_loading() {
    let o = tern(&["inspect", fixture("llama3").to_str().unwrap()]);
    assert!(o.status.success());
    let s = String::from_utf8(o.stdout).unwrap();
    assert!(
        s.contains("Llama")
            && s.contains("model-00003-of-00003.safetensors")
            && s.contains("heads 4/2"),
        "{s}"
    );
    let o = tern(&["inspect", "--json", fixture("qwen3").to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["dtypes"]["f16"].as_u64().unwrap() > 0);
}

#[test]
fn errors_are_one_clear_line() {
    let llama = fixture("llama");
    let llama = llama.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["generate", "--model", "/no/such/model", "--prompt", "x"],
            "/no/such/model",
        ),
        (
            vec!["bench", "train", "--model", llama, "--quantized-head"],
            "not how it trains",
        ),
        (
            vec![
                "generate",
                "--model",
                llama,
                "--prompt",
                "x",
                "--temperature",
                "-1",
            ],
            "temperature",
        ),
        (
            vec![
                "generate", "--model", llama, "--prompt", "x", "--dtype", "f8",
            ],
            "f8",
        ),
        (
            vec![
                "generate",
                "--model",
                llama,
                "--prompt",
                "x",
                "--adapter",
                "a",
            ],
            "not a Hub id",
        ),
        (
            vec![
                "merge",
                "--model",
                llama,
                "--adapter",
                "a",
                "--out",
                "o",
                "--shard-size",
                "2XB",
            ],
            "unknown unit",
        ),
        (
            vec![
                "generate",
                "--model",
                llama,
                "--prompt",
                "x",
                "--max-tokens",
                "0",
            ],
            "max_tokens",
        ),
    ];
    for (args, needle) in cases {
        let o = tern(&args);
        assert!(!o.status.success(), "{args:?}");
        let err = String::from_utf8(o.stderr).unwrap();
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn hub_ids_from_the_cache_and_legacy_bin_conversion() {
    let tmp = tempfile::tempdir().unwrap();
    // A Hugging Face cache holding the llama fixture as `org/llama`.
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = tmp.path().join("hub/models--org--llama");
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    for e in std::fs::read_dir(fixture("llama")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), snap.join(e.file_name())).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let cache = tmp.path().join("hub");
    let env = [
        ("HF_HUB_CACHE", cache.to_str().unwrap()),
        ("HF_HUB_OFFLINE", "1"),
    ];
    let o = tern_env(
        &[
            "generate",
            "--model",
            "org/llama",
            "--prompt",
            "The quick",
            "--temperature",
            "0",
            "--max-tokens",
            "4",
            "--output",
            "jsonl",
        ],
        &env,
    );
    let by_path = greedy_ids(fixture("llama").to_str().unwrap(), "The quick", 4, &[]);
    assert_eq!(jsonl_ids(o), by_path);
    let o = tern_env(
        &["generate", "--model", "org/missing", "--prompt", "x"],
        &env,
    );
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(
        !o.status.success()
            && err.contains("HF_HUB_OFFLINE")
            && err.trim_end().lines().count() == 1,
        "{err}"
    );

    // A legacy pickle checkpoint runs directly and converts to safetensors.
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tern/tests/fixtures/bin/smollm");
    let out = tmp.path().join("smollm-st");
    let o = tern(&[
        "convert",
        "--model",
        bin.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.join("model.safetensors").is_file());
    let r = reference("smollm");
    let prompt = r["prompt"].as_str().unwrap();
    let a = greedy_ids(bin.to_str().unwrap(), prompt, 6, &[]);
    assert_eq!(a, greedy_ids(out.to_str().unwrap(), prompt, 6, &[]));
    assert_eq!(
        a,
        greedy_ids(fixture("smollm").to_str().unwrap(), prompt, 6, &[])
    );
}

#[test]
fn train_from_yaml_and_flags_writes_a_peft_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let train_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tern/tests/fixtures/train");
    let out = tmp.path().join("adapter");
    let cfg = tmp.path().join("train.yaml");
    std::fs::write(
        &cfg,
        format!(
            "model: {}\ndata: {}\nrank: 8\nalpha: 16\nlr: 1.0e-2\nepochs: 60\nlr_schedule: constant\n",
            fixture("llama").display(),
            train_dir.join("memorise.jsonl").display()
        ),
    )
    .unwrap();
    // Flags override the file (batch size, output); the run memorises the pairs.
    let o = tern(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--batch-size",
        "4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("60 steps"));
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let o = tern(&[
        "generate",
        "--model",
        fixture("llama").to_str().unwrap(),
        "--prompt",
        "Q: cat",
        "--temperature",
        "0",
        "--adapter",
        out.to_str().unwrap(),
    ]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim_end(), " A: dog.");

    // Bad keys and values: one line naming the choices.
    std::fs::write(&cfg, "rnak: 8\n").unwrap();
    for (args, needle) in [
        (
            vec!["train", "--config", cfg.to_str().unwrap()],
            "unknown field `rnak`",
        ),
        (
            vec!["train", "--lr-schedule", "step"],
            "`cosine`, `linear`, `constant`",
        ),
        (vec!["train", "--data", "x.jsonl"], "--model"),
    ] {
        let o = tern(&args);
        let err = String::from_utf8(o.stderr).unwrap();
        assert!(
            !o.status.success() && err.contains(needle) && err.trim_end().lines().count() == 1,
            "{args:?}: {err}"
        );
    }
}

#[test]
fn serve_answers_over_http_and_exits_cleanly_on_sigterm() {
    use std::io::{BufRead, BufReader};
    let adapter = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tern/tests/fixtures/adapters/llama_rslora_all");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["serve", "--port", "0", "--api-key", "k", "--model"])
        .arg(fixture("llama"))
        .arg("--adapter")
        .arg(format!("a={}", adapter.display()))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // "tern serve: model `llama` at http://127.0.0.1:PORT (API key required)"
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    assert!(
        line.contains("`llama`") && line.contains("required"),
        "{line}"
    );
    let body = r#"{"model": "a", "prompt": "hello", "max_tokens": 3, "temperature": 0}"#;
    let resp = ureq::post(&format!("{url}/v1/completions"))
        .set("Authorization", "Bearer k")
        .set("Content-Type", "application/json")
        .send_string(body)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&resp.into_string().unwrap()).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 3, "{v}");
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");

    let out = tern(&["serve", "--model", "x", "--adapter", "nonsense"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("NAME=PATH") && err.lines().count() == 1,
        "{err}"
    );
}

/// Every file under `dir` with its bytes, to tell whether a refused run touched anything.
fn snapshot(dir: &std::path::Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            v.extend(snapshot(&p));
        } else {
            v.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
    v.sort();
    v
}

/// A refused `tern train`: one line naming `needle`, no panic, nothing written where it ran.
fn train_refused(args: &[&str], needle: &str) {
    let cwd = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_tern"))
        .arg("train")
        .args(args)
        .current_dir(cwd.path())
        .output()
        .unwrap();
    assert_eq!(
        std::fs::read_dir(cwd.path()).unwrap().count(),
        0,
        "{args:?} wrote to its cwd"
    );
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(
        !o.status.success() && err.contains(needle) && err.trim_end().lines().count() == 1,
        "{args:?}: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn train_output_dirs_and_resume_are_guarded() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("llama");
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tern/tests/fixtures/train/memorise.jsonl");
    let out = tmp.path().join("run");
    let other = tmp.path().join("other.jsonl");
    std::fs::write(&other, "{\"text\": \"hello world\"}\n{\"text\": \"bye\"}\n").unwrap();
    let (model, data, out_s, other) = (
        model.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
        other.to_str().unwrap(),
    );
    let base = ["--model", model, "--out", out_s, "--rank", "4"];
    let run = |extra: &[&str]| tern(&[&["train"], &base[..], &["--data", data], extra].concat());
    let o = run(&["--batch-size", "2", "--max-steps", "4", "--save-every", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let before = snapshot(&out);

    // A second run into the same --out would overwrite the first and prune its checkpoints.
    let args = [&base[..], &["--data", data, "--batch-size", "2"]].concat();
    train_refused(&args, "--force");
    // A checkpoint at or past --max-steps has nothing left to train.
    for steps in ["3", "4"] {
        let a = [&args[..], &["--resume", "latest", "--max-steps", steps]].concat();
        train_refused(&a, &format!("already reached --max-steps {steps}"));
    }
    // Resuming with other data or batches would not continue the same run.
    let a = [
        &base[..],
        &["--data", data, "--resume", "latest", "--max-steps", "6"],
    ]
    .concat();
    let a = [&a[..], &["--batch-size", "4"]].concat();
    train_refused(&a, "batch_size");
    let a = [&base[..], &["--data", other, "--batch-size", "2"]].concat();
    train_refused(
        &[&a[..], &["--resume", "latest", "--max-steps", "6"]].concat(),
        "4 training examples, this run's data has 2",
    );
    let a = [
        &args[..],
        &["--resume", "latest", "--max-steps", "6", "--lr", "1e-3"],
    ]
    .concat();
    train_refused(&a, "lr");
    assert!(snapshot(&out) == before, "a refused run changed {out_s}");

    // The same settings continue; --force starts over, removing only tern's own files.
    let o = run(&[
        "--batch-size",
        "2",
        "--resume",
        "latest",
        "--max-steps",
        "6",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("6 steps"));
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let o = run(&["--force", "--max-steps", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 1);
    assert!(!out.join("checkpoint-6").exists() && !out.join("checkpoint-4").exists());
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    train_refused(
        &[
            &base[..],
            &["--data", data, "--force", "--resume", "latest"],
        ]
        .concat(),
        "--force",
    );
}

#[test]
fn train_refuses_bad_values_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixture("llama");
    let model = model.to_str().unwrap();
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tern/tests/fixtures/train/memorise.jsonl");
    let data = data.to_str().unwrap();
    let out = tmp.path().join("o");
    let out = out.to_str().unwrap();
    let one = tmp.path().join("one.jsonl");
    std::fs::write(&one, "{\"text\": \"hello world\"}").unwrap();
    let base = ["--model", model, "--data", data, "--max-steps", "1"];
    fn cat<'a>(a: &[&'a str], b: &[&'a str]) -> Vec<&'a str> {
        [a, b].concat()
    }
    train_refused(&cat(&base, &["--out", ""]), "out");
    let base = [&base[..], &["--out", out]].concat();
    let cfg = tmp.path().join("c.yaml");
    std::fs::write(&cfg, "out: \"\"\n").unwrap();
    let c = cfg.to_str().unwrap();
    train_refused(&["--model", model, "--data", data, "--config", c], "out");
    train_refused(
        &[
            "--model",
            model,
            "--data",
            one.to_str().unwrap(),
            "--out",
            out,
            "--eval-split",
            "0.5",
        ],
        "at least 2 examples",
    );
    for flag in [
        "--lr",
        "--alpha",
        "--dropout",
        "--warmup-ratio",
        "--eval-split",
        "--weight-decay",
        "--max-grad-norm",
    ] {
        for v in ["nan", "inf", "-inf"] {
            train_refused(&cat(&base, &[flag, v]), "finite");
            train_refused(&cat(&base, &[&format!("{flag}={v}")]), flag);
        }
    }
    train_refused(&cat(&base, &["--lr", "-1"]), "must be > 0");
    train_refused(&cat(&base, &["--weight-decay", "-0.5"]), "negative");
    train_refused(
        &cat(&base, &["--target-modules", "q_prj"]),
        "q_proj, k_proj",
    );
    train_refused(&cat(&base, &["--target-modules", "q_proj,v_prj"]), "v_prj");
    assert!(
        !std::path::Path::new(out).exists(),
        "a refused run wrote {out}"
    );

    // One name is that module, as a list of one is.
    let o = tern(&cat(
        &["train"],
        &cat(&base, &["--target-modules", "q_proj", "--rank", "4"]),
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    let c: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(PathBuf::from(out).join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(c["target_modules"], serde_json::json!(["q_proj"]), "{c}");
}

#[test]
fn train_says_why_examples_are_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("d.jsonl");
    let long = "word ".repeat(40);
    std::fs::write(
        &data,
        [
            r#"{"text": "The quick brown fox jumps over the lazy dog"}"#.to_string(),
            r#"{"messages": [{"role": "user", "content": "Hi"}]}"#.to_string(),
            format!(r#"{{"messages": [{{"role": "user", "content": "{long}"}}, {{"role": "assistant", "content": "ok"}}]}}"#),
        ]
        .join("\n"),
    )
    .unwrap();
    let out = tmp.path().join("o");
    let o = tern(&[
        "train",
        "--model",
        fixture("llama").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-steps",
        "1",
        "--max-seq-len",
        "16",
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("1 example has no assistant turn or completion"),
        "{err}"
    );
    assert!(
        err.contains("1 example has no target tokens left after truncation to 16"),
        "{err}"
    );
}
