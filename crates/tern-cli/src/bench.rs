//! `tern bench`: measured numbers as a table plus one JSON line.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use tern::bench::generate::GenerateBenchOptions;
use tern::LoadOptions;

/// A count flag that must be at least `min`: clap refuses less, naming the flag and the
/// bound (a zero had run a default silently, or failed deep inside with an unrelated error).
pub(crate) fn at_least(
    min: usize,
) -> impl Fn(&str) -> std::result::Result<usize, String> + Clone + Send + Sync + 'static {
    move |s| match s.parse::<usize>() {
        Ok(n) if n >= min => Ok(n),
        Ok(_) => Err(format!("must be at least {min}")),
        Err(e) => Err(e.to_string()),
    }
}

/// What to measure.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Load time, prompt and decode tok/s, time to first token, peak RSS, streaming overhead.
    Generate(GenerateBenchArgs),
    /// LoRA at inference: adapter switch and load time, decode base vs unmerged vs merged,
    /// a batch of distinct adapters vs one.
    Adapters(AdapterBenchArgs),
    /// LoRA training tokens/s and peak RSS (rank 16 all-linear, batch 4 x 128 tokens).
    Train(TrainBenchArgs),
    /// Serving throughput and p50/p99 latency at several concurrencies, one adapter vs many.
    Serve(crate::bench_serve::ServeBenchArgs),
    /// The same prompts one at a time and batched through the engine: tok/s and the ratio.
    Batch(BatchBenchArgs),
    /// Time to first token with a long shared prompt prefix, cold vs from the prefix cache.
    Prefix(PrefixBenchArgs),
    /// Perplexity of a fixed text as stored and quantized (the cost of each type).
    Quality(QualityBenchArgs),
}

/// Arguments of `tern bench quality`.
#[derive(Args, Debug)]
pub struct QualityBenchArgs {
    /// A Hugging Face checkpoint directory, a .gguf file or a Hub id.
    #[arg(long)]
    pub model: PathBuf,
    /// Quantization types to score against the model as stored (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "q8_0,q4_k")]
    pub types: Vec<tern::quant::QuantType>,
    /// GGUF files to score as well (e.g. written by `tern quantize` or llama.cpp).
    #[arg(long)]
    pub gguf: Vec<PathBuf>,
    /// Tokens per scoring window (windows overlap by half).
    #[arg(long, default_value_t = 512, value_parser = at_least(2))]
    pub ctx: usize,
    /// Compute dtype.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Also score each quantized variant with its prompts through the int8 kernels (what
    /// `--int8-prompts` costs).
    #[arg(long)]
    pub int8_prompts: bool,
}

fn quality(a: QualityBenchArgs) -> Result<()> {
    let model = crate::resolve::model(&a.model)?;
    let types = if model.is_file() { vec![] } else { a.types };
    let mut variants = tern::bench::quality::variants(&model, &types);
    for g in &a.gguf {
        variants.push(tern::bench::quality::QualityVariant {
            label: g
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: g.clone(),
            quantize: None,
            int8_prompts: false,
        });
    }
    if a.int8_prompts {
        variants = tern::bench::quality::with_int8_prompts(variants);
    }
    let load = crate::load_args::LoadArgs {
        dtype: a.dtype,
        ..Default::default()
    };
    let r = tern::bench::quality::run(&variants, &load.options()?, a.ctx)
        .with_context(|| format!("scoring {}", a.model.display()))?;
    println!(
        "text           {} tokens, windows of {} (bench/data/perplexity.txt)",
        r.tokens, r.ctx
    );
    let w = r
        .rows
        .iter()
        .map(|row| row.label.len())
        .max()
        .unwrap_or(0)
        .max(14);
    for row in &r.rows {
        println!(
            "{:<w$} perplexity {:>9.4}  {:>+7.2} %  ({:.1} s)",
            row.label, row.perplexity, row.delta_pct, row.seconds
        );
    }
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

/// Arguments of `tern bench prefix`.
#[derive(Args, Debug)]
pub struct PrefixBenchArgs {
    /// A Hugging Face checkpoint directory, a .gguf file or a Hub id.
    #[arg(long)]
    pub model: PathBuf,
    /// Tokens in the shared prefix.
    #[arg(long, default_value_t = 1000, value_parser = at_least(1))]
    pub prefix_tokens: usize,
    #[command(flatten)]
    pub load: crate::load_args::LoadArgs,
}

fn prefix(a: PrefixBenchArgs) -> Result<()> {
    let r = tern::bench::prefix::run(
        &crate::resolve::model(&a.model)?,
        &a.load.options()?,
        a.prefix_tokens,
    )
    .with_context(|| format!("benchmarking {}", a.model.display()))?;
    println!("shared prefix  {} tokens", r.prefix_tokens);
    println!("cold TTFT      {:.1} ms", r.cold_ttft_ms);
    println!("warm TTFT      {:.1} ms", r.warm_ttft_ms);
    println!("speedup        {:.1}x", r.speedup);
    println!("same tokens    {}", r.same_tokens);
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

/// Arguments of `tern bench batch`.
#[derive(Args, Debug)]
pub struct BatchBenchArgs {
    /// A Hugging Face checkpoint directory, a .gguf file or a Hub id.
    #[arg(long)]
    pub model: PathBuf,
    /// Prompts.
    #[arg(long, default_value_t = 16, value_parser = at_least(1))]
    pub rows: usize,
    /// Rows decoded together.
    #[arg(long, default_value_t = 8, value_parser = at_least(1))]
    pub batch: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 32, value_parser = at_least(1))]
    pub max_tokens: usize,
    /// Rounds of both ways, interleaved; the speedup is the median of each round's own ratio
    /// (a shared machine's speed drifts between runs), tok/s the best round of each way.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    #[command(flatten)]
    pub load: crate::load_args::LoadArgs,
}

fn batch(a: BatchBenchArgs) -> Result<()> {
    let r = tern::bench::batch::run(
        &crate::resolve::model(&a.model)?,
        &a.load.options()?,
        &tern::bench::batch::BatchBenchOptions {
            rows: a.rows,
            batch: a.batch,
            max_tokens: a.max_tokens,
            rounds: a.rounds as usize,
        },
    )
    .with_context(|| format!("benchmarking {}", a.model.display()))?;
    println!(
        "rows           {} x {} tokens, {} rounds{}",
        r.rows,
        a.max_tokens,
        r.rounds,
        match (r.int8_prompts, r.quantized_head) {
            (false, false) => "",
            (true, false) => ", int8 prompts",
            (false, true) => ", int8 head",
            (true, true) => ", int8 prompts and head",
        }
    );
    println!("sequential     {:.1} tok/s", r.sequential_tok_s);
    println!("batch of {:<5} {:.1} tok/s", r.batch, r.batched_tok_s);
    println!(
        "speedup        {:.2}x (median of the rounds' ratios; {:.2}-{:.2}x)",
        r.speedup, r.speedup_range.0, r.speedup_range.1
    );
    println!("same tokens    {}", r.same_tokens);
    // Each way's best round: its whole run from its tok/s, and the part that was prompts.
    let run_ms = |tok_s: f64| r.tokens as f64 / tok_s * 1e3;
    println!(
        "prompts        sequential {:.0} of {:.0} ms, batched {:.0} of {:.0} ms",
        r.sequential_prompt_ms,
        run_ms(r.sequential_tok_s),
        r.batched_prompt_ms,
        run_ms(r.batched_tok_s)
    );
    println!(
        "decode steps   1 row {:.2} ms, {} rows {:.2} ms: {:.2}x",
        r.decode_one_ms, r.batch, r.decode_batch_ms, r.decode_speedup
    );
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

/// Arguments of `tern bench train`.
#[derive(Args, Debug)]
pub struct TrainBenchArgs {
    /// A Hugging Face checkpoint directory, a .gguf file or a Hub id.
    #[arg(long)]
    pub model: PathBuf,
    /// LoRA rank.
    #[arg(long, default_value_t = 16, value_parser = at_least(1))]
    pub rank: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 4, value_parser = at_least(1))]
    pub batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 128, value_parser = at_least(2))]
    pub seq_len: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 3, value_parser = at_least(1))]
    pub steps: usize,
    /// Recompute each layer in backward (less memory, more compute).
    #[arg(long)]
    pub grad_checkpointing: bool,
    /// The frozen base's products in bf16 (CPUs with AVX512-BF16).
    #[arg(long)]
    pub bf16_matmul: bool,
    /// The frozen base's products in fp16 (CPUs with AVX512-FP16).
    #[arg(long)]
    pub f16_matmul: bool,
    #[command(flatten)]
    pub load: crate::load_args::LoadArgs,
}

/// Arguments of `tern bench adapters`.
#[derive(Args, Debug)]
pub struct AdapterBenchArgs {
    /// A Hugging Face checkpoint directory, a .gguf file or a Hub id.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter to measure (default: random all-linear adapters of --rank).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Rank of the random adapters.
    #[arg(long, default_value_t = 16, value_parser = at_least(1))]
    pub rank: usize,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 32, value_parser = at_least(1))]
    pub prompt_tokens: usize,
    /// Tokens to decode per run (at least 2: the first comes from the prompt's pass).
    #[arg(long, default_value_t = 64, value_parser = at_least(2))]
    pub gen_tokens: usize,
    /// Timed runs (best kept).
    #[arg(long, default_value_t = 3, value_parser = at_least(1))]
    pub runs: usize,
    /// Rows of the batched comparison.
    #[arg(long, default_value_t = 4, value_parser = at_least(1))]
    pub batch: usize,
    #[command(flatten)]
    pub load: crate::load_args::LoadArgs,
    /// Adapter storage dtype (default: f16 over a quantized base, else the compute dtype).
    #[arg(long)]
    pub adapter_dtype: Option<String>,
}

/// Arguments of `tern bench generate`.
#[derive(Args, Debug)]
pub struct GenerateBenchArgs {
    /// A Hugging Face checkpoint directory, a .gguf file or a Hub id.
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128, value_parser = at_least(1))]
    pub prompt_tokens: usize,
    /// Tokens to decode per run (at least 2: the first comes from the prompt's pass).
    #[arg(long, default_value_t = 64, value_parser = at_least(2))]
    pub gen_tokens: usize,
    /// Timed runs (best kept).
    #[arg(long, default_value_t = 3, value_parser = at_least(1))]
    pub runs: usize,
    #[command(flatten)]
    pub load: crate::load_args::LoadArgs,
}

/// Runs a benchmark.
pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Adapters(a) => adapters(a),
        BenchCommand::Train(a) => train(a),
        BenchCommand::Serve(a) => crate::bench_serve::run(a),
        BenchCommand::Batch(a) => batch(a),
        BenchCommand::Prefix(a) => prefix(a),
        BenchCommand::Quality(a) => quality(a),
        BenchCommand::Generate(a) => {
            let opts = GenerateBenchOptions {
                prompt_tokens: a.prompt_tokens,
                gen_tokens: a.gen_tokens,
                runs: a.runs,
            };
            let r = tern::bench::generate::run(
                &crate::resolve::model(&a.model)?,
                &a.load.options()?,
                &opts,
            )
            .with_context(|| format!("benchmarking {}", a.model.display()))?;
            let rows = [
                ("model", r.model.clone()),
                ("load path", r.load_path.clone()),
                (
                    "load",
                    format!(
                        "{:.3} s ({:.1} MB, {:.2} GB/s)",
                        r.load_s,
                        r.load_bytes as f64 / 1e6,
                        r.load_gb_s
                    ),
                ),
                (
                    "prompt",
                    format!("{:.1} tok/s ({} tokens)", r.prompt_tok_s, r.prompt_tokens),
                ),
                ("first token", format!("{:.1} ms", r.ttft_ms)),
                (
                    "decode",
                    format!("{:.1} tok/s ({} tokens)", r.decode_tok_s, r.gen_tokens),
                ),
                (
                    "decode stream",
                    format!("{:.1} tok/s", r.decode_tok_s_streamed),
                ),
                (
                    "stream cost",
                    format!("{:+.2} % (A/B of whole runs)", r.streaming_overhead_pct),
                ),
                (
                    "stream work",
                    format!(
                        "{:.4} % of decode time (timed directly)",
                        r.stream_callback_pct
                    ),
                ),
                ("peak RSS", format!("{:.0} MB", r.peak_rss_mb)),
            ];
            for (k, v) in rows {
                println!("{k:<14} {v}");
            }
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }
    }
}

fn adapters(a: AdapterBenchArgs) -> Result<()> {
    let adapter_dtype = a
        .adapter_dtype
        .as_deref()
        .map(tern::device::parse_dtype)
        .transpose()?;
    let opts = tern::bench::adapters::AdapterBenchOptions {
        adapter: a
            .adapter
            .as_deref()
            .map(crate::resolve::adapter)
            .transpose()?,
        rank: a.rank,
        prompt_tokens: a.prompt_tokens,
        gen_tokens: a.gen_tokens,
        runs: a.runs,
        batch: a.batch,
    };
    let r = tern::bench::adapters::run(
        &crate::resolve::model(&a.model)?,
        &LoadOptions {
            adapter_dtype,
            ..a.load.options()?
        },
        &opts,
    )
    .with_context(|| format!("benchmarking adapters on {}", a.model.display()))?;
    let rows = [
        ("model", r.model.clone()),
        (
            "adapter",
            format!("{} ({:.1} MB {})", r.adapter, r.adapter_mb, r.adapter_dtype),
        ),
        (
            "load",
            format!("{:.2} ms (median, page cache warm)", r.load_ms),
        ),
        (
            "switch",
            format!("{:.0} ns (resident, name -> ready batch spec)", r.switch_ns),
        ),
        ("decode base", format!("{:.1} tok/s", r.decode_base_tok_s)),
        (
            "decode lora",
            format!(
                "{:.1} tok/s unmerged ({:+.1} % vs base)",
                r.decode_unmerged_tok_s, -r.unmerged_overhead_pct
            ),
        ),
        (
            "decode swap",
            format!(
                "{:.1} tok/s (switching adapter every token)",
                r.decode_alternating_tok_s
            ),
        ),
        (
            "decode merged",
            format!("{:.1} tok/s", r.decode_merged_tok_s),
        ),
        (
            "batch",
            format!(
                "{} rows: {:.1} tok/s one adapter, {:.1} tok/s distinct ({:+.1} %)",
                r.batch,
                r.batch_one_adapter_tok_s,
                r.batch_distinct_tok_s,
                -r.batch_distinct_overhead_pct
            ),
        ),
        ("peak RSS", format!("{:.0} MB", r.peak_rss_mb)),
    ];
    for (k, v) in rows {
        println!("{k:<14} {v}");
    }
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

fn train(a: TrainBenchArgs) -> Result<()> {
    if a.load.int8_prompts || a.load.quantized_head {
        anyhow::bail!(
            "--int8-prompts and --quantized-head change how tern generates, not how it trains; \
             drop them from `tern bench train`"
        );
    }
    let o = tern::bench::train::TrainBenchOptions {
        rank: a.rank,
        batch: a.batch,
        seq_len: a.seq_len,
        steps: a.steps,
        grad_checkpointing: a.grad_checkpointing,
        bf16_matmul: a.bf16_matmul,
        f16_matmul: a.f16_matmul,
    };
    let r = tern::bench::train::run(&crate::resolve::model(&a.model)?, &a.load.options()?, &o)
        .with_context(|| format!("benchmarking training on {}", a.model.display()))?;
    println!("{:<14} {}", "model", r.model);
    println!(
        "{:<14} rank {} all-linear, {} trainable parameters",
        "adapter", r.rank, r.trainable_params
    );
    println!(
        "{:<14} {} x {} tokens{}{}",
        "batch",
        r.batch,
        r.seq_len,
        if r.grad_checkpointing {
            ", gradient checkpointing"
        } else {
            ""
        },
        if r.bf16_matmul {
            ", base products in bf16"
        } else if r.f16_matmul {
            ", base products in fp16"
        } else {
            ""
        }
    );
    println!(
        "{:<14} {:.1} tok/s ({:.2} s per step)",
        "train", r.tokens_per_s, r.step_s
    );
    println!("{:<14} {:.0} MB", "peak RSS", r.peak_rss_mb);
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
