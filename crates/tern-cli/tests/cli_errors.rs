//! How the binary reports failure: one line whatever the environment says about backtraces,
//! no cause printed twice, a mistyped local path told apart from a Hub id, a closed output
//! pipe ending the process quietly instead of a panic, `generate` / `chat` flags and
//! commands that used to be ignored or misread, and benchmarks that reported nothing as a
//! result.

mod common;

use common::*;
use std::process::{Command, Stdio};

/// `tern quantize` of the llama fixture to an F16 GGUF at `out`.
fn quantize_llama(out: &str) -> std::process::Output {
    let model = fixture("llama");
    let model = model.to_str().unwrap();
    tern(&["quantize", "--model", model, "--out", out, "--type", "f16"])
}

/// A GGUF cut short is one line even under RUST_BACKTRACE=1 (candle attached its backtrace,
/// 40-odd lines, to the message).
#[test]
fn a_broken_file_is_one_line_with_backtraces_on() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("m.gguf");
    let o = quantize_llama(gguf.to_str().unwrap());
    assert!(o.status.success(), "{}", stderr(&o));
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(&gguf, &bytes[..200]).unwrap();
    let path = gguf.to_str().unwrap();
    for args in [
        vec!["generate", "--model", path, "--prompt", "hi"],
        vec!["inspect", path],
    ] {
        let o = tern_env(&args, &[("RUST_BACKTRACE", "1")]);
        let e = stderr(&o);
        assert!(!o.status.success(), "{args:?}");
        assert!(e.contains("truncated"), "{args:?}: {e}");
        assert_eq!(e.trim_end().lines().count(), 1, "{args:?}: {e}");
        // The file is named once, not by the caller's context and again by the error.
        assert_eq!(e.matches(path).count(), 1, "{args:?}: {e}");
    }
}

/// An OS error shows once (the error type printed it in its message and again as its cause).
#[test]
fn an_os_error_is_not_repeated() {
    let o = quantize_llama("/proc/tern-test/m.gguf");
    let e = stderr(&o);
    assert!(!o.status.success() && e.contains("/proc/tern-test"), "{e}");
    assert_eq!(e.matches("(os error").count(), 1, "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
}

/// `models/nope` is a local path with a typo as often as a Hub id: the message says both.
#[test]
fn a_mistyped_local_path_is_named_as_one() {
    let cache = tempfile::tempdir().unwrap();
    let o = tern_env(
        &["generate", "--model", "models/nope", "--prompt", "hi"],
        &[
            ("HF_HUB_OFFLINE", "1"),
            ("HF_HUB_CACHE", cache.path().to_str().unwrap()),
        ],
    );
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("no file or directory `models/nope` here"),
        "{e}"
    );
}

/// `tern ... 2>&1 | head -c 100`: when the reader goes away the process ends by SIGPIPE, as
/// other command-line tools do, not by a panic in the next print to stderr (exit 101).
#[cfg(unix)]
#[test]
fn a_closed_output_pipe_ends_quietly() {
    use std::os::fd::FromRawFd;
    use std::os::unix::process::ExitStatusExt;
    // The reading end is closed before the process starts, so its first write finds no
    // reader (closing it after spawn raced the write into the pipe's buffer).
    let mut fds = [0; 2];
    // SAFETY: pipe() fills both descriptors on success; each is owned exactly once below.
    let writer = unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0);
        libc::close(fds[0]);
        std::os::fd::OwnedFd::from_raw_fd(fds[1])
    };
    let status = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "generate",
            "--model",
            "/nonexistent/model",
            "--prompt",
            "hi",
        ])
        .stdout(Stdio::null())
        .stderr(writer)
        .status()
        .unwrap();
    assert_ne!(status.code(), Some(101), "panicked");
    assert_eq!(status.signal(), Some(libc::SIGPIPE), "{status:?}");
}

/// Flags `generate` used to ignore or misread are refused by name, before the model loads.
#[test]
fn generate_refuses_flags_it_would_ignore() {
    let model = fixture("llama");
    let model = model.to_str().unwrap();
    for (extra, needle) in [
        (
            vec!["--system", "be brief"],
            "--system is the system message of --chat",
        ),
        (vec!["--num-beams", "0"], "--num-beams must be at least 1"),
        (
            vec!["--num-return-sequences", "3"],
            "--num-return-sequences 3 needs",
        ),
        (vec!["--stop", ""], "--stop must not be empty"),
        (
            vec!["--num-beams", "2", "--length-penalty", "NaN"],
            "finite",
        ),
        // Negative values reach the range check instead of clap's "unexpected argument".
        (vec!["--top-p", "-0.1"], "top_p must be in (0, 1]"),
    ] {
        let mut args = vec!["generate", "--model", model, "--prompt", "hi"];
        args.extend(&extra);
        let o = tern(&args);
        let e = stderr(&o);
        assert!(
            !o.status.success() && e.contains(needle) && e.trim_end().lines().count() == 1,
            "{extra:?}: {e}"
        );
    }
}

/// In `tern chat`, a bare `/adapter` reports the adapter instead of dropping it, and
/// `--max-tokens 0` fails at start, not on every turn.
#[test]
fn chat_commands_do_what_they_say() {
    let model = fixture("llama");
    let adapter = adapter_fixture("llama_rslora_all");
    let o = tern_with_stdin(
        &[
            "chat",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--max-tokens",
            "2",
        ],
        b"/adapter\n/system\n/exit\n",
    );
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    let want = format!("(adapter: {}; /adapter PATH switches", adapter.display());
    assert!(e.contains(&want), "{e}");
    assert!(e.contains("(system message cleared)"), "{e}");
    let o = tern(&[
        "chat",
        "--model",
        model.to_str().unwrap(),
        "--max-tokens",
        "0",
    ]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("--max-tokens must be at least 1"),
        "{e}"
    );
}

/// A benchmark count below what it can measure is refused by name before anything loads
/// (zero decode tokens had silently run two, a zero batch failed in a tensor op), and a
/// load test in which no request succeeded exits non-zero naming the first failure instead
/// of printing a table of zeros as its result.
#[test]
fn bench_counts_too_small_and_a_dead_server_are_errors() {
    for (args, flag, min) in [
        (vec!["generate", "--gen-tokens", "1"], "--gen-tokens", 2),
        (vec!["adapters", "--batch", "0"], "--batch", 1),
        (vec!["train", "--steps", "0"], "--steps", 1),
        (vec!["serve", "--concurrency", "4,0"], "--concurrency", 1),
    ] {
        let mut all = vec!["bench"];
        all.extend(&args);
        all.extend(["--model", "no-such-model"]);
        let o = tern(&all);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?}");
        let want = format!("at least {min}");
        assert!(err.contains(flag) && err.contains(&want), "{args:?}: {err}");
    }
    // A port nothing listens on: bound, then let go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let o = tern(&[
        "bench",
        "serve",
        "--url",
        &url,
        "--concurrency",
        "1",
        "--requests",
        "2",
    ]);
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("no request succeeded") && err.contains(&url),
        "{err}"
    );
}
