//! `tern generate`.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use std::io::Write;
use std::path::PathBuf;
use tern::{ChatMessage, GenerateRequest, LoadedModel, Prompt, SamplingParams};

/// How tokens are printed.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    /// Plain text as it streams.
    Text,
    /// One JSON object per token, then a summary object.
    Jsonl,
}

/// Arguments of `tern generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model: a Hugging Face checkpoint directory, a .gguf file, or a Hub id
    /// ORG/NAME[@revision] (from the Hugging Face cache, downloaded unless HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub model: PathBuf,
    /// LoRA adapter: a PEFT directory (adapter_config.json + adapter_model.safetensors or
    /// .bin) or a Hub id.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Fold the adapter into the weights before generating (no per-token LoRA cost; quantized
    /// layers it touches become float).
    #[arg(long, requires = "adapter")]
    pub merge_adapter: bool,
    /// Raw prompt text.
    #[arg(long, conflicts_with_all = ["chat", "input"], required_unless_present_any = ["chat", "input"])]
    pub prompt: Option<String>,
    /// A user message, sent through the model's chat template.
    #[arg(long, conflicts_with = "input")]
    pub chat: Option<String>,
    /// A jsonl file of inputs, one per line: `{"prompt": TEXT}` or `{"messages": [...]}`,
    /// optionally with `id`, `max_tokens`, `temperature`, `top_k`, `top_p`, `min_p`,
    /// `repetition_penalty`, `seed`, `stop` (the flags are the defaults). Run in batches;
    /// results in input order as jsonl.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// With --input: write the results here (atomically) instead of stdout.
    #[arg(long, requires = "input")]
    pub output_file: Option<PathBuf>,
    /// With --input: what a bad line or a failed row does.
    #[arg(long, value_enum, default_value_t = crate::batch::OnError::Fail)]
    pub on_error: crate::batch::OnError,
    /// Beam search with this many beams (1: sample or greedy as set by --temperature).
    #[arg(long, default_value_t = 1, conflicts_with = "input")]
    pub num_beams: usize,
    /// Beam search: finished scores are sum(log p) / length^P.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub length_penalty: f32,
    /// Beam search: never repeat an n-gram of this size (0 = off).
    #[arg(long, default_value_t = 0)]
    pub no_repeat_ngram_size: usize,
    /// Beam search stopping: `heuristic` (transformers' default), `finished` (as soon as
    /// there are enough finished beams) or `never`.
    #[arg(long, default_value = "heuristic", value_parser = ["heuristic", "finished", "never"])]
    pub early_stopping: String,
    /// Beam search: sequences to print, best first.
    #[arg(long, default_value_t = 1)]
    pub num_return_sequences: usize,
    /// With --input: rows decoded together.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// A system message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Drop tokens below this fraction of the best token's probability (0 = off).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub min_p: f32,
    /// Penalise tokens already seen (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f32,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this text appears (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    #[command(flatten)]
    pub load: crate::load_args::LoadArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// Flags that would otherwise be ignored or misread, refused before the model loads.
fn check(a: &GenerateArgs) -> Result<()> {
    if a.system.is_some() && a.chat.is_none() {
        bail!("--system is the system message of --chat; a raw --prompt has none (put it in the prompt, or use --chat)");
    }
    if a.num_beams == 0 {
        bail!("--num-beams must be at least 1 (1: no beam search)");
    }
    if a.num_return_sequences == 0 || a.num_return_sequences > a.num_beams.max(1) {
        bail!(
            "--num-return-sequences {} needs at least as many beams (--num-beams {}); without beam search there is one sequence",
            a.num_return_sequences,
            a.num_beams
        );
    }
    if !a.length_penalty.is_finite() {
        bail!(
            "--length-penalty must be a finite number, got {}",
            a.length_penalty
        );
    }
    if a.stop.iter().any(|s| s.is_empty()) {
        bail!("--stop must not be empty (it would match before the first token)");
    }
    if a.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    Ok(())
}

/// Runs `tern generate`.
pub fn run(a: GenerateArgs) -> Result<()> {
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repetition_penalty: a.repetition_penalty,
        seed: a.seed,
    };
    sampling.validate()?;
    check(&a)?;
    let mut lm = crate::resolve::load(&a.model, &a.load)?;
    let adapter = match &a.adapter {
        Some(p) => {
            let p = crate::resolve::adapter(p)?;
            let ad = lm
                .load_adapter(&p, "adapter")
                .with_context(|| format!("loading adapter {}", p.display()))?;
            if a.merge_adapter {
                lm.model.merge_adapter(&ad)?;
                None
            } else {
                Some(ad)
            }
        }
        None => None,
    };
    if let Some(input) = &a.input {
        return crate::batch::run(&a, input, lm, adapter, sampling);
    }
    let prompt = match (&a.prompt, &a.chat) {
        (Some(p), _) => Prompt::Text(p.clone()),
        (None, Some(c)) => {
            let mut m = Vec::new();
            if let Some(s) = &a.system {
                m.push(ChatMessage::new("system", s));
            }
            m.push(ChatMessage::new("user", c));
            Prompt::Chat(m)
        }
        (None, None) => bail!("give --prompt TEXT or --chat TEXT"),
    };
    let ids = lm.encode_prompt(&prompt)?;
    if a.num_beams > 1 {
        return beams(&a, &lm, &ids, adapter);
    }
    let mut req = GenerateRequest::new(ids, a.max_tokens).with_adapter(adapter);
    req.sampling = sampling;
    req.stop = a.stop.clone();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut io_err = None;
    let done = lm.generate_with(req, |t| {
        let r = match a.output {
            Output::Text => write!(out, "{}", t.text).and_then(|_| out.flush()),
            Output::Jsonl => writeln!(
                out,
                "{}",
                serde_json::json!({"id": t.id, "text": t.text, "logprob": t.logprob})
            ),
        };
        // A closed pipe (e.g. `| head`) ends generation quietly.
        match r {
            Ok(()) => true,
            Err(e) => {
                io_err = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = io_err {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            return Ok(());
        }
        return Err(e.into());
    }
    let s = done.stats;
    match a.output {
        Output::Text => writeln!(out)?,
        Output::Jsonl => writeln!(
            out,
            "{}",
            serde_json::json!({
                "finish_reason": done.finish_reason.map(|f| f.as_str()).unwrap_or("stop"),
                "prompt_tokens": s.prompt_tokens,
                "completion_tokens": s.completion_tokens,
            })
        )?,
    }
    tracing::debug!(
        "prompt {} tok in {:.1} ms, ttft {:.1} ms, {} tok decoded at {:.1} tok/s",
        s.prompt_tokens,
        s.prefill.as_secs_f64() * 1e3,
        s.time_to_first_token.as_secs_f64() * 1e3,
        s.completion_tokens,
        (s.completion_tokens.saturating_sub(1)) as f64 / s.decode.as_secs_f64().max(1e-9)
    );
    Ok(())
}

/// `--num-beams N`: beam search, printed whole (best first).
fn beams(
    a: &GenerateArgs,
    lm: &LoadedModel,
    ids: &[u32],
    adapter: Option<std::sync::Arc<tern::lora::LoraAdapter>>,
) -> Result<()> {
    use tern::generate::beam::{beam_search, BeamParams, EarlyStopping};
    let mut p = BeamParams::new(a.num_beams, a.max_tokens);
    p.num_return = a.num_return_sequences;
    p.length_penalty = a.length_penalty;
    p.no_repeat_ngram_size = a.no_repeat_ngram_size;
    p.early_stopping = match a.early_stopping.as_str() {
        "finished" => EarlyStopping::Finished,
        "never" => EarlyStopping::Never,
        _ => EarlyStopping::Heuristic,
    };
    p.adapter = adapter;
    let hyps = beam_search(lm, ids, &p)?;
    let mut out = std::io::stdout().lock();
    for (rank, h) in hyps.iter().enumerate() {
        let ids: Vec<u32> = h
            .ids
            .iter()
            .copied()
            .filter(|t| !lm.eos_ids.contains(t))
            .collect();
        let text = lm.tokenizer.decode(&ids)?;
        match a.output {
            Output::Text if hyps.len() == 1 => writeln!(out, "{text}")?,
            Output::Text => writeln!(out, "[{rank}] ({:.4}) {text}", h.score)?,
            Output::Jsonl => writeln!(
                out,
                "{}",
                serde_json::json!({"rank": rank, "text": text, "ids": h.ids, "score": h.score})
            )?,
        }
    }
    Ok(())
}
