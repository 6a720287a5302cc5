//! `tern`: the command-line face of the tern library. Parsing arguments loads nothing; each
//! subcommand loads what it needs.

mod batch;
mod bench;
mod bench_serve;
mod chat;
mod convert;
mod generate;
mod inspect;
mod load_args;
mod merge;
mod quantize;
mod resolve;
mod serve;
mod train;

use clap::{CommandFactory, Parser, Subcommand};
use std::process::ExitCode;

/// Train, serve and ship LoRA adapters for open LLMs.
#[derive(Parser, Debug)]
#[command(name = "tern", version, about, long_about = None)]
struct Cli {
    /// Log more (-v: load report and timings; -vv: everything).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Stream tokens from a model (Hugging Face directory, .gguf file or Hub id).
    Generate(generate::GenerateArgs),
    /// Chat interactively; the conversation stays in the KV cache between turns.
    Chat(chat::ChatArgs),
    /// LoRA-train an adapter on jsonl data (settings from --config YAML and/or flags).
    Train(Box<train::TrainArgs>),
    /// Serve the model over an OpenAI-compatible HTTP API, with adapters picked per request.
    Serve(serve::ServeArgs),
    /// Fold a LoRA adapter into its base and write a Hugging Face checkpoint.
    Merge(merge::MergeArgs),
    /// Rewrite a legacy PyTorch (.bin) checkpoint or adapter as safetensors.
    Convert(convert::ConvertArgs),
    /// Write a Hugging Face checkpoint as a quantized GGUF file (tern and llama.cpp load it).
    Quantize(quantize::QuantizeArgs),
    /// Describe a checkpoint: architecture, parameters, dtypes, files, tokenizer, template.
    Inspect(inspect::InspectArgs),
    /// Measure load, prompt and decode speed, memory and streaming overhead.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Print a shell completion script.
    Completions {
        /// Shell to complete for.
        shell: clap_complete::Shell,
    },
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "tern=debug,warn",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// Ends the process quietly, as other command-line tools do, when what it prints to goes away
/// (`tern generate ... | head -1`): Rust ignores SIGPIPE, so the next print panicked instead.
/// Not for the server and benchmarks, whose sockets must not end the process.
fn quiet_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: restores the default action of one signal, before any other thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Keeps freed memory in the process instead of handing it back to the kernel after every
/// tensor: a training step allocates and frees gigabytes of activations and gradients, and
/// glibc's defaults turned half its time into page faults (SmolLM2 LoRA: 50 -> 65 tok/s).
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's thresholds; called once before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// The error and its causes joined by ": ", leaving out a cause the text already holds (an
/// error that shows its source in its own message would otherwise print it twice).
pub(crate) fn one_line(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if text.contains(&s) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&s);
    }
    text
}

/// Ctrl-C removes the temp files and directories the atomic writers have in flight before
/// the process ends (each had left a `.NAME.tmp-*` beside its output), and exits 130 as a
/// shell expects. Not for `chat` (its own handler stops a reply) or `serve` (tokio's).
fn clean_up_on_interrupt() {
    let _ = ctrlc::set_handler(|| {
        tern::checkpoint::pending::remove_pending();
        std::process::exit(130);
    });
}

fn main() -> ExitCode {
    // candle attaches a backtrace to every error it makes when RUST_BACKTRACE is set (dozens
    // of lines inside a one-line message, and a capture per error even when it is handled);
    // panics still print theirs, which RUST_BACKTRACE alone governs.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_) | Command::Bench(_)) {
        quiet_on_closed_pipe();
    }
    if matches!(cli.command, Command::Train(_) | Command::Bench(_)) {
        tune_allocator();
    }
    init_logging(cli.verbose);
    // Single-threaded here, before any model code: see the function's doc for why.
    if matches!(
        cli.command,
        Command::Generate(_)
            | Command::Bench(_)
            | Command::Merge(_)
            | Command::Train(_)
            | Command::Serve(_)
            | Command::Chat(_)
    ) {
        tern::device::pin_cpu_threads();
    }
    // After that: the handler is a thread of its own.
    if matches!(
        cli.command,
        Command::Generate(_)
            | Command::Merge(_)
            | Command::Train(_)
            | Command::Convert(_)
            | Command::Quantize(_)
    ) {
        clean_up_on_interrupt();
    }
    let result = match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Train(a) => train::run(*a),
        Command::Convert(a) => convert::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Bench(b) => bench::run(b),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "tern", &mut std::io::stdout());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}
