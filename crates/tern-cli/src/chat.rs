//! `tern chat`: an interactive conversation that keeps its KV cache between turns.

use anyhow::{Context, Result};
use clap::Args;
use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tern::generate::chat::ChatSession;
use tern::SamplingParams;

/// Arguments of `tern chat`.
#[derive(Args, Debug)]
pub struct ChatArgs {
    /// Model: a Hugging Face checkpoint directory, a .gguf file, or a Hub id.
    #[arg(long)]
    pub model: PathBuf,
    /// A LoRA adapter to start with (`/adapter PATH` switches, `/adapter none` drops it).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The system message.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub load: crate::load_args::LoadArgs,
}

const HELP: &str =
    "commands: /reset, /system TEXT, /adapter PATH|none, /exit (Ctrl-C stops an answer)";

/// Runs `tern chat` on stdin and stdout; token counts per turn go to stderr.
pub fn run(a: ChatArgs) -> Result<()> {
    let lm = crate::resolve::load(&a.model, &a.load)?;
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    ctrlc::set_handler(move || s.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    let mut chat = ChatSession::new(&lm, a.system.clone());
    chat.max_tokens = a.max_tokens;
    chat.sampling = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        seed: a.seed,
        ..Default::default()
    };
    chat.sampling.validate()?;
    // What would fail every turn fails once, here: no answer to give, or no chat template.
    if a.max_tokens == 0 {
        anyhow::bail!("--max-tokens must be at least 1");
    }
    lm.encode_prompt(&tern::Prompt::Chat(vec![tern::ChatMessage::new(
        "user", "hi",
    )]))
    .context(
        "tern chat needs the model's chat template (use `tern generate --prompt` for plain text)",
    )?;
    let mut adapters: HashMap<PathBuf, Arc<tern::lora::LoraAdapter>> = HashMap::new();
    let mut load = |p: &std::path::Path| -> Result<Arc<tern::lora::LoraAdapter>> {
        let p = crate::resolve::adapter(p)?;
        if let Some(a) = adapters.get(&p) {
            return Ok(a.clone());
        }
        let ad = lm
            .load_adapter(&p, "chat")
            .with_context(|| format!("loading adapter {}", p.display()))?;
        adapters.insert(p, ad.clone());
        Ok(ad)
    };
    let mut current = "none".to_string();
    if let Some(p) = &a.adapter {
        chat.set_adapter(Some(load(p)?));
        current = p.display().to_string();
    }
    eprintln!("{HELP}");
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let mut line = String::new();
    loop {
        eprint!("> ");
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let text = line.trim_end_matches(['\n', '\r']);
        let (cmd, rest) = text.split_once(' ').unwrap_or((text, ""));
        match cmd {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                chat.reset();
                eprintln!("(conversation cleared)");
                continue;
            }
            "/system" => {
                chat.set_system((!rest.is_empty()).then(|| rest.to_string()));
                eprintln!(
                    "(system message {})",
                    if rest.is_empty() { "cleared" } else { "set" }
                );
                continue;
            }
            "/adapter" if rest.is_empty() => {
                // A bare `/adapter` asks; it used to drop the adapter without being told to.
                eprintln!("(adapter: {current}; /adapter PATH switches, /adapter none drops it)");
                continue;
            }
            "/adapter" => {
                match rest {
                    "none" => chat.set_adapter(None),
                    p => match load(std::path::Path::new(p)) {
                        Ok(ad) => chat.set_adapter(Some(ad)),
                        Err(e) => {
                            eprintln!("error: {}", crate::one_line(&e));
                            continue;
                        }
                    },
                }
                current = rest.to_string();
                eprintln!("(adapter: {current})");
                continue;
            }
            c if c.starts_with('/') => {
                eprintln!("unknown command {c}; {HELP}");
                continue;
            }
            _ => {}
        }
        stop.store(false, Ordering::SeqCst);
        let mut io_err = None;
        let turn = chat.send(text, |t| {
            if let Err(e) = write!(out, "{}", t.text).and_then(|_| out.flush()) {
                io_err = Some(e);
                return false;
            }
            !stop.load(Ordering::SeqCst)
        });
        writeln!(out)?;
        if let Some(e) = io_err {
            return Err(e.into());
        }
        match turn {
            Ok(t) => {
                let s = t.completion.stats;
                eprintln!(
                    "[prompt {} tokens: {} from the cache, {} run; generated {}, {:.1} tok/s{}]",
                    t.reused_tokens + t.prefilled_tokens,
                    t.reused_tokens,
                    t.prefilled_tokens,
                    s.completion_tokens,
                    s.completion_tokens.saturating_sub(1) as f64 / s.decode.as_secs_f64().max(1e-9),
                    if stop.load(Ordering::SeqCst) {
                        ", stopped"
                    } else {
                        ""
                    }
                );
            }
            Err(e) => eprintln!("error: {e}"),
        }
    }
    Ok(())
}
