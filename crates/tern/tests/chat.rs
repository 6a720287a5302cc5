//! A chat session keeps its KV cache between turns: turns 2 and 3 run only the tokens the
//! cache does not already hold, and every answer equals a fresh run on the whole
//! conversation.

mod common;

use common::*;
use tern::generate::chat::ChatSession;
use tern::{ChatMessage, GenerateRequest, LoadOptions, LoadedModel, Prompt};

#[test]
fn turns_reuse_the_cache_and_answer_like_a_fresh_run() {
    for arch in ["smollm", "qwen2"] {
        let lm = LoadedModel::load(&fixture(arch), &LoadOptions::default()).unwrap();
        let system = "You are terse.".to_string();
        let mut chat = ChatSession::new(&lm, Some(system.clone()));
        chat.max_tokens = 6;
        let mut last_prompt_len = 0;
        for (k, user) in ["hello", "what is two plus two", "thanks"]
            .iter()
            .enumerate()
        {
            let mut streamed = String::new();
            let turn = chat
                .send(user, |t| {
                    streamed.push_str(&t.text);
                    true
                })
                .unwrap();
            // The same conversation from scratch.
            let mut all = vec![ChatMessage::new("system", &system)];
            all.extend(chat.messages()[..chat.messages().len() - 1].iter().cloned());
            let ids = lm.encode_prompt(&Prompt::Chat(all)).unwrap();
            let fresh = lm
                .generate_collect(GenerateRequest::new(ids.clone(), 6))
                .unwrap();
            assert_eq!(turn.completion.ids(), fresh.ids(), "{arch} turn {k}");
            assert_eq!(turn.completion.text, streamed);
            assert_eq!(turn.reused_tokens + turn.prefilled_tokens, ids.len());
            if k == 0 {
                assert_eq!(turn.reused_tokens, 0);
            } else {
                // At least the whole previous prompt came from the cache; only what follows
                // it (the answer as re-tokenised, and the new user turn) ran.
                assert!(
                    turn.reused_tokens >= last_prompt_len,
                    "{arch} turn {k}: reused {} of a previous prompt of {last_prompt_len}",
                    turn.reused_tokens
                );
                assert!(turn.prefilled_tokens < ids.len() - last_prompt_len + 1);
            }
            last_prompt_len = ids.len();
        }
        // After a reset nothing is reused.
        chat.reset();
        let t = chat.send("hello", |_| true).unwrap();
        assert_eq!(t.reused_tokens, 0);
    }
}

/// A conversation that outgrows the context is refused with the way out (reset), not as if
/// the last message were too long; after a reset the session answers again.
#[test]
fn a_conversation_past_the_context_says_to_reset() {
    let lm = LoadedModel::load(&fixture("smollm"), &LoadOptions::default()).unwrap();
    let ctx = lm.model.config().max_position_embeddings;
    let mut chat = ChatSession::new(&lm, None);
    chat.max_tokens = 2;
    let message = "tell me more about the river and the sea ".repeat(4);
    let mut refused = None;
    for _ in 0..ctx {
        match chat.send(&message, |_| true) {
            Ok(_) => continue,
            Err(e) => {
                refused = Some(e.to_string());
                break;
            }
        }
    }
    let e = refused.expect("the conversation never reached the context");
    assert!(
        e.contains(&format!("the model's context is {ctx}"))
            && e.contains("reset the conversation"),
        "{e}"
    );
    chat.reset();
    assert!(chat.send(&message, |_| true).is_ok());
}
