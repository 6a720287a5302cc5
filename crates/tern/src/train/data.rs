//! Training data: jsonl lines in the four shapes people have (`text`, `prompt`/`completion`,
//! chat `messages`, alpaca `instruction`/`input`/`output`) turned into token ids with a mask
//! of the tokens the loss is taken on (completions and assistant turns, unless told
//! otherwise), then shuffled, length-grouped and padded into batches.

use crate::error::{Result, TernError};
use crate::model::LoadedModel;
use crate::tokenizer::ChatMessage;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Deserialize;
use std::path::Path;

/// One tokenised example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Whether token `i` is a target (its prediction from `ids[..i]` counts in the loss).
    pub target: Vec<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Line {
    Chat {
        messages: Vec<ChatMessage>,
    },
    PromptCompletion {
        prompt: String,
        completion: String,
    },
    Alpaca {
        instruction: String,
        #[serde(default)]
        input: String,
        output: String,
    },
    Text {
        text: String,
    },
}

/// The prompt alpaca datasets were trained with.
fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.trim().is_empty() {
        format!("Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
    } else {
        format!("Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
    }
}

/// Roles a chat line may use: what chat templates render (`tool` for a tool's output);
/// the loss is on `assistant` turns.
const CHAT_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Tokenises one line.
fn example(lm: &LoadedModel, line: Line, train_on_prompt: bool) -> Result<Example> {
    let tok = &lm.tokenizer;
    let eos = lm.eos_ids.first().copied();
    let mut ids = Vec::new();
    let mut target = Vec::new();
    let mut push = |new: Vec<u32>, t: bool| {
        target.extend(std::iter::repeat_n(t || train_on_prompt, new.len()));
        ids.extend(new);
    };
    match line {
        Line::Text { text } => push(tok.encode(&text, true)?, true),
        Line::PromptCompletion { prompt, completion } => {
            push(tok.encode(&prompt, true)?, false);
            let mut c = tok.encode(&completion, false)?;
            // The model must learn to stop, as TRL teaches it.
            c.extend(eos);
            push(c, true);
        }
        Line::Alpaca {
            instruction,
            input,
            output,
        } => {
            push(
                tok.encode(&alpaca_prompt(&instruction, &input), true)?,
                false,
            );
            let mut c = tok.encode(&output, false)?;
            c.extend(eos);
            push(c, true);
        }
        Line::Chat { messages } => {
            // An unknown role would render as the template pleases (or not at all) and its
            // turn would silently not be learned; `User` for `user` is the usual slip.
            if let Some(m) = messages
                .iter()
                .find(|m| !CHAT_ROLES.contains(&m.role.as_str()))
            {
                return Err(TernError::InvalidArgument(format!(
                    "unknown chat role `{}` (roles are {}, lowercase)",
                    m.role,
                    CHAT_ROLES.join(", ")
                )));
            }
            let tmpl = lm.chat_template.as_ref().ok_or_else(|| {
                TernError::InvalidArgument(
                    "chat `messages` need a model with a chat template".into(),
                )
            })?;
            let (bos, eos_s) = (tok.bos_token.as_deref(), tok.eos_token.as_deref());
            // Render growing prefixes: the text each assistant turn adds (content and its
            // end-of-turn tokens) is a target, the rest (system, user, role headers) is not.
            let mut done = 0usize;
            let full = tmpl.render(&messages, false, bos, eos_s)?;
            for i in 0..messages.len() {
                if messages[i].role != "assistant" {
                    continue;
                }
                let head = tmpl.render(&messages[..i], true, bos, eos_s)?;
                let through = tmpl.render(&messages[..=i], false, bos, eos_s)?;
                if !full.starts_with(&head) || !full.starts_with(&through) || head.len() < done {
                    return Err(TernError::InvalidArgument("the chat template does not render conversations prefix by prefix; cannot tell assistant tokens apart (use train_on_prompt)".into()));
                }
                push(tok.encode(&full[done..head.len()], false)?, false);
                push(tok.encode(&full[head.len()..through.len()], false)?, true);
                done = through.len();
            }
            push(tok.encode(&full[done..], false)?, false);
        }
    }
    Ok(Example { ids, target })
}

/// Reads a jsonl file into examples truncated to `max_len` tokens; a bad line is an error
/// naming its number. Examples with no target tokens are dropped (and counted in the log).
pub fn load_jsonl(
    path: &Path,
    lm: &LoadedModel,
    max_len: usize,
    train_on_prompt: bool,
) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|e| TernError::io(path, e))?;
    // Editors on Windows start UTF-8 files with a byte-order mark; JSON does not allow one.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut out = Vec::new();
    let (mut nothing_to_learn, mut truncated_away) = (0, 0);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |detail: String| TernError::Config {
            file: path.to_path_buf(),
            key: format!("line {}", i + 1),
            detail,
        };
        let parsed: Line = serde_json::from_str(line).map_err(|e| {
            bad(match serde_json::from_str::<serde_json::Value>(line) {
                Err(_) => format!("not valid JSON: {e}"),
                Ok(_) => "expected {\"text\"}, {\"prompt\",\"completion\"}, {\"messages\":[{\"role\",\"content\"}]} or {\"instruction\",\"input\",\"output\"}".into(),
            })
        })?;
        let mut ex = example(lm, parsed, train_on_prompt).map_err(|e| bad(e.to_string()))?;
        // The first token has no prediction; a target there would never be scored.
        if let Some(t) = ex.target.first_mut() {
            *t = false;
        }
        if !ex.target.iter().any(|&t| t) {
            nothing_to_learn += 1;
            continue;
        }
        ex.ids.truncate(max_len);
        ex.target.truncate(max_len);
        if ex.target.iter().any(|&t| t) {
            out.push(ex);
        } else {
            truncated_away += 1;
        }
    }
    if nothing_to_learn > 0 {
        tracing::warn!(
            "{}: {} no assistant turn or completion to learn; skipped",
            path.display(),
            examples_have(nothing_to_learn)
        );
    }
    if truncated_away > 0 {
        tracing::warn!(
            "{}: {} no target tokens left after truncation to {max_len}; skipped (raise max_seq_len)",
            path.display(),
            examples_have(truncated_away)
        );
    }
    if out.is_empty() {
        return Err(TernError::Config {
            file: path.to_path_buf(),
            key: "(file)".into(),
            detail: "no usable examples".into(),
        });
    }
    Ok(out)
}

/// `1 example has` / `N examples have`.
fn examples_have(n: usize) -> String {
    if n == 1 {
        "1 example has".into()
    } else {
        format!("{n} examples have")
    }
}

/// A padded batch: `ids` and `target` are `rows x len`, row-major.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Rows.
    pub rows: usize,
    /// Length of every row (the longest example).
    pub len: usize,
    /// Token ids, padded on the right.
    pub ids: Vec<u32>,
    /// Target flags (false on padding).
    pub target: Vec<bool>,
    /// Real (non-pad) tokens.
    pub tokens: usize,
}

/// Pads examples on the right to the longest: with a causal mask, padding after a row's
/// tokens cannot change them, and it is never a target.
pub fn pad(examples: &[&Example], pad_id: u32) -> Batch {
    let len = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(len * examples.len());
    let mut target = Vec::with_capacity(len * examples.len());
    for e in examples {
        ids.extend(&e.ids);
        ids.extend(std::iter::repeat_n(pad_id, len - e.ids.len()));
        target.extend(&e.target);
        target.extend(std::iter::repeat_n(false, len - e.ids.len()));
    }
    Batch {
        rows: examples.len(),
        len,
        tokens: examples.iter().map(|e| e.ids.len()).sum(),
        ids,
        target,
    }
}

/// The order of one epoch: shuffled by `seed`, then grouped by length in windows of 50
/// batches (less padding), the batches themselves shuffled again.
pub fn epoch_batches(examples: &[Example], batch: usize, seed: u64) -> Vec<Vec<usize>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut idx: Vec<usize> = (0..examples.len()).collect();
    idx.shuffle(&mut rng);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for window in idx.chunks(batch * 50) {
        let mut w = window.to_vec();
        w.sort_by_key(|&i| std::cmp::Reverse(examples[i].ids.len()));
        batches.extend(w.chunks(batch).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

/// Packs examples greedily into sequences of at most `max_len` tokens (targets kept; the
/// joins are not masked, as in TRL's packing).
pub fn pack(examples: &[Example], max_len: usize) -> Vec<Example> {
    let mut out: Vec<Example> = Vec::new();
    let mut cur = Example {
        ids: vec![],
        target: vec![],
    };
    for e in examples {
        if !cur.ids.is_empty() && cur.ids.len() + e.ids.len() > max_len {
            out.push(std::mem::replace(
                &mut cur,
                Example {
                    ids: vec![],
                    target: vec![],
                },
            ));
        }
        cur.ids.extend(&e.ids);
        cur.target.extend(&e.target);
    }
    if !cur.ids.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_and_epoch_order() {
        let ex = |n: usize| Example {
            ids: vec![7; n],
            target: vec![true; n],
        };
        let b = pad(&[&ex(3), &ex(1)], 0);
        assert_eq!((b.rows, b.len, b.tokens), (2, 3, 4));
        assert_eq!(b.ids, [7, 7, 7, 7, 0, 0]);
        assert_eq!(b.target, [true, true, true, true, false, false]);
        let data: Vec<Example> = (1..=10).map(ex).collect();
        let a = epoch_batches(&data, 3, 1);
        assert_eq!(a, epoch_batches(&data, 3, 1), "same seed, same order");
        assert_ne!(a, epoch_batches(&data, 3, 2));
        let mut all: Vec<usize> = a.concat();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        let packed = pack(&data[..4], 6);
        assert_eq!(
            packed.iter().map(|e| e.ids.len()).collect::<Vec<_>>(),
            [6, 4]
        );
    }
}
