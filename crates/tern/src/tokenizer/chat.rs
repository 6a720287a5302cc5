//! Chat templates: the model's Jinja template rendered with minijinja under the same settings
//! `transformers` uses (`trim_blocks`, `lstrip_blocks`, Python string methods, `raise_exception`).

use crate::error::{Result, TernError};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::path::Path;

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// Builds a message.
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    source: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("chars", &self.source.len())
            .finish()
    }
}

impl Clone for ChatTemplate {
    fn clone(&self) -> Self {
        Self::new(&self.source).expect("template compiled once already")
    }
}

impl ChatTemplate {
    /// Compiles a template source.
    pub fn new(source: &str) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| TernError::Template(format!("does not compile: {e}")))?;
        Ok(Self {
            env,
            source: source.to_string(),
        })
    }

    /// The template source text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Finds the template of a checkpoint directory: `chat_template.jinja` first, else the
    /// `chat_template` field of `tokenizer_config.json` (a string, or a list of named
    /// templates of which `default` is used).
    pub fn from_hf_files(
        jinja: Option<&Path>,
        tokenizer_config: Option<&Path>,
    ) -> Result<Option<Self>> {
        if let Some(p) = jinja {
            let s = std::fs::read_to_string(p).map_err(|e| TernError::io(p, e))?;
            return Self::new(&s).map(Some);
        }
        let Some(p) = tokenizer_config else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(p).map_err(|e| TernError::io(p, e))?;
        let v: Json = serde_json::from_str(&text).map_err(|e| TernError::Config {
            file: p.to_path_buf(),
            key: "(file)".into(),
            detail: format!("not valid JSON: {e}"),
        })?;
        match v.get("chat_template") {
            Some(Json::String(s)) => Self::new(s).map(Some),
            Some(Json::Array(list)) => {
                let pick = list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or(list.first())
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str());
                pick.map(Self::new).transpose()
            }
            _ => Ok(None),
        }
    }

    /// Renders the conversation; `add_generation_prompt` opens the assistant's turn.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<String> {
        let tmpl = self.env.get_template("chat").expect("added in new");
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token.unwrap_or(""),
            eos_token => eos_token.unwrap_or(""),
        })
        .map_err(|e| TernError::Template(format!("render failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_chatml_with_python_methods_and_trimming() {
        let t = ChatTemplate::new(
            // trim_blocks drops the newline after block tags (not after `{{ }}`), as in Jinja.
            "{% for m in messages %}\n{{ '<|im_start|>' + m['role'] + '\\n' + m['content'].strip() + '<|im_end|>\\n' }}{% endfor %}\n  {% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        )
        .unwrap();
        let out = t
            .render(&[ChatMessage::new("user", "  hi  ")], true, None, None)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_becomes_an_error() {
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}").unwrap();
        let e = t.render(&[], false, None, None).unwrap_err();
        assert!(e.to_string().contains("no system role"), "{e}");
        assert!(ChatTemplate::new("{% if %}").is_err());
    }
}
