//! The `tern` binary on the workloads beyond one prompt: jsonl batch files, `tern chat`
//! through a pipe, beam search, and `tern quantize`.

mod common;

use common::*;
use std::process::Output;

#[test]
fn generate_runs_a_jsonl_file_in_batches_in_input_order() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let out = dir.path().join("out.jsonl");
    let prompts = ["hello world", "the cat", "abc def", "x"];
    let mut lines: Vec<String> = prompts
        .iter()
        .map(|p| serde_json::json!({"prompt": p}).to_string())
        .collect();
    lines.insert(2, r#"{"prompt": 7}"#.into());
    std::fs::write(&input, lines.join("\n")).unwrap();
    let model = fixture("llama");
    let m = model.to_str().unwrap();
    let args = |extra: &[&str]| -> Output {
        let mut v = vec![
            "generate",
            "--model",
            m,
            "--temperature",
            "0",
            "--max-tokens",
            "5",
            "--input",
            input.to_str().unwrap(),
            "--output-file",
            out.to_str().unwrap(),
            "--batch-size",
            "3",
        ];
        v.extend_from_slice(extra);
        tern(&v)
    };
    // By default a bad line fails the run, naming it, and writes nothing.
    let r = args(&[]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("in.jsonl:3:") && err.lines().count() == 1,
        "{err}"
    );
    assert!(!out.exists());
    // Skipping keeps every line, in order, the bad one as an error.
    let r = args(&["--on-error", "skip"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let got: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        got.iter()
            .map(|v| v["line"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert!(got[2]["error"].is_string());
    let texts: Vec<&serde_json::Value> = got.iter().filter(|v| v.get("text").is_some()).collect();
    for (v, p) in texts.iter().zip(prompts) {
        let solo = greedy(m, p, 5, false);
        let solo = String::from_utf8_lossy(&solo.stdout);
        assert_eq!(
            v["text"].as_str().unwrap(),
            solo.trim_end_matches('\n'),
            "{p}"
        );
    }
    assert!(String::from_utf8_lossy(&r.stderr).contains("5 rows (1 failed or skipped)"));
}

#[test]
fn chat_through_a_pipe_keeps_the_conversation_in_the_cache() {
    let model = fixture("smollm");
    let out = tern_with_stdin(
        &[
            "chat",
            "--temperature",
            "0",
            "--max-tokens",
            "6",
            "--system",
            "be terse",
            "--model",
            model.to_str().unwrap(),
        ],
        b"hello\nwhat is two plus two\nthanks\n/exit\n",
    );
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // "[prompt N tokens: R from the cache, P run; ...]" per turn.
    let turns: Vec<(usize, usize, usize)> = err
        .lines()
        .filter_map(|l| {
            let l = l.split("[prompt ").nth(1)?;
            let n: Vec<usize> = l
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|w| w.parse().ok())
                .collect();
            Some((n[0], n[1], n[2]))
        })
        .collect();
    assert_eq!(turns.len(), 3, "{err}");
    assert_eq!(turns[0].1, 0);
    for k in 1..3 {
        let (prompt, reused, run) = turns[k];
        assert_eq!(reused + run, prompt);
        // Every token of the previous prompt came from the cache; only newer ones ran.
        assert!(reused >= turns[k - 1].0, "turn {k}: {turns:?}");
    }
    // The first answer is what a one-shot run gives.
    let one = tern(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--chat",
        "hello",
        "--system",
        "be terse",
        "--temperature",
        "0",
        "--max-tokens",
        "6",
    ]);
    let first = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    assert_eq!(
        first,
        String::from_utf8_lossy(&one.stdout).trim_end_matches('\n')
    );
}

#[test]
fn generate_with_beams_prints_the_best_sequences_first() {
    let model = fixture("llama");
    let out = tern(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hello",
        "--num-beams",
        "4",
        "--num-return-sequences",
        "3",
        "--max-tokens",
        "6",
        "--no-repeat-ngram-size",
        "2",
        "--output",
        "jsonl",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    let scores: Vec<f64> = rows.iter().map(|r| r["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    let distinct: std::collections::HashSet<String> =
        rows.iter().map(|r| r["ids"].to_string()).collect();
    assert_eq!(distinct.len(), 3);
}

#[test]
fn quantize_writes_ggufs_that_generate_and_refuses_bad_requests() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("llama-q8_0.gguf");
    let model = fixture("llama");
    let m = model.to_str().unwrap();
    let o = tern(&[
        "quantize",
        "--model",
        m,
        "--out",
        out.to_str().unwrap(),
        "--type",
        "q8_0",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        said.contains("Q8_0") && said.contains("llama-q8_0.gguf"),
        "{said}"
    );
    let r = reference("llama");
    let prompt = r["prompt"].as_str().unwrap();
    assert_eq!(greedy_ids(out.to_str().unwrap(), prompt, 6, &[]).len(), 6);
    assert_eq!(greedy_ids(m, prompt, 6, &["--quantize", "q8_0"]).len(), 6);
    // A lossless export generates exactly what transformers did.
    let f32_out = d.path().join("llama-f32.gguf");
    let o = tern(&[
        "quantize",
        "--model",
        m,
        "--out",
        f32_out.to_str().unwrap(),
        "--type",
        "f32",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want: Vec<u64> = r["greedy_ids"].as_array().unwrap()[..6]
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(greedy_ids(f32_out.to_str().unwrap(), prompt, 6, &[]), want);
    // Bad input: an unknown type names the choices; a GGUF cannot be quantized again; an
    // existing output is kept.
    let o = tern(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "x",
        "--quantize",
        "q3",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("q8_0, q4_k"), "{e}");
    let before = std::fs::read(&out).unwrap();
    let o = tern(&["quantize", "--model", m, "--out", out.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), before);
    let o = tern(&[
        "generate",
        "--model",
        out.to_str().unwrap(),
        "--prompt",
        "x",
        "--quantize",
        "q8_0",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("already stored"), "{e}");
    // A quantized GGUF converts to another type only when asked to round twice.
    let q4 = d.path().join("q4.gguf");
    let args = [
        "quantize",
        "--model",
        out.to_str().unwrap(),
        "--out",
        q4.to_str().unwrap(),
    ];
    let o = tern(&[&args[..], &["--type", "q4_0"]].concat());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("--allow-requantize"),
        "{e}"
    );
    let o = tern(&[&args[..], &["--type", "q4_0", "--allow-requantize"]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(greedy_ids(q4.to_str().unwrap(), prompt, 3, &[]).len(), 3);
}
