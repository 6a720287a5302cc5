//! Helpers shared by the CLI test binaries: running `tern`, fixture paths, greedy ids.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn tern(args: &[&str]) -> Output {
    tern_env(args, &[])
}

/// A run's stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `tern` with extra environment variables.
pub fn tern_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run tern")
}

/// `tern` with `input` written to its stdin (then closed).
pub fn tern_with_stdin(args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tern");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// `tern generate` greedy on `model` for `prompt`, as text or jsonl.
pub fn greedy(model: &str, prompt: &str, max_tokens: usize, jsonl: bool) -> Output {
    greedy_with(model, prompt, max_tokens, jsonl, &[])
}

/// As [`greedy`], with extra arguments.
pub fn greedy_with(
    model: &str,
    prompt: &str,
    max_tokens: usize,
    jsonl: bool,
    extra: &[&str],
) -> Output {
    let n = max_tokens.to_string();
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--max-tokens",
        &n,
    ];
    if jsonl {
        args.extend(["--output", "jsonl"]);
    }
    args.extend_from_slice(extra);
    tern(&args)
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tern/tests/fixtures/models")
        .join(name)
}

pub fn reference(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("reference.json")).unwrap())
        .unwrap()
}

pub fn adapter_fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tern/tests/fixtures/adapters")
        .join(name)
}

/// Greedy ids from `tern generate ... --output jsonl` with extra arguments.
pub fn greedy_ids(model: &str, prompt: &str, n: usize, extra: &[&str]) -> Vec<u64> {
    jsonl_ids(greedy_with(model, prompt, n, true, extra))
}

/// The token ids of a successful `--output jsonl` run.
pub fn jsonl_ids(o: Output) -> Vec<u64> {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["id"].as_u64())
        .collect()
}
