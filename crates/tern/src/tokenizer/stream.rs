//! Incremental detokenisation: turns a growing list of ids into text pieces whose
//! concatenation equals decoding all ids at once, never emitting half a UTF-8 character.

use super::Tokenizer;
use crate::error::Result;

/// How many prompt tokens seed the decoder, so tokenizers that strip a leading space on the
/// first token (SentencePiece) decode the first generated token with its context.
const CONTEXT_TOKENS: usize = 4;

/// Streaming decoder state (the prefix/read offset scheme used by TGI and vLLM).
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Starts after `context` (typically the prompt's last tokens).
    pub fn new(context: &[u32]) -> Self {
        let ctx = &context[context.len().saturating_sub(CONTEXT_TOKENS)..];
        Self {
            ids: ctx.to_vec(),
            prefix_offset: 0,
            read_offset: ctx.len(),
        }
    }

    /// Adds a token; returns the text it completes (possibly empty while a character is
    /// still split across tokens).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// Text still held back (an incomplete character at the end of the stream).
    pub fn flush(&mut self, tok: &Tokenizer) -> Result<String> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(
            if full.len() > prefix.len() && full.is_char_boundary(prefix.len()) {
                full[prefix.len()..].to_string()
            } else {
                String::new()
            },
        )
    }
}
