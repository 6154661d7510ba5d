//! The demo model's chat template (SmolLM2's, from the tiny GGUF) rendered with hostile
//! messages: any role, any content (control-token text, template syntax, huge repeats), then
//! the rendered prompt split and encoded by `ModelTokenizer::encode_chat`.
//!
//! Invariant (issue 12, item 4): message contents never add or remove control tokens. With
//! the roles the API accepts, the control tokens of the encoded prompt must be exactly those
//! of the same conversation with every content replaced by harmless text, unless the engine
//! refuses the conversation.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use bulwark::model::template::{ChatMessage, ChatTemplate};
use libfuzzer_sys::fuzz_target;

/// The roles `/v1/chat/completions` passes to the template (after mapping `developer`).
const API_ROLES: [&str; 3] = ["system", "user", "assistant"];
/// Messages in one input: enough for turn structure, bounded for speed.
const MAX_MESSAGES: usize = 8;

#[derive(Arbitrary, Debug)]
enum Role<'a> {
    Api(u8),
    Any(&'a str),
}

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    messages: Vec<(Role<'a>, &'a str)>,
    add_generation_prompt: bool,
}

fn template() -> &'static ChatTemplate {
    static T: OnceLock<ChatTemplate> = OnceLock::new();
    T.get_or_init(|| bulwark_fuzz::tiny().template())
}

fn control_ids(ids: &[u32]) -> Vec<u32> {
    let t = &bulwark_fuzz::tiny().tokenizer;
    ids.iter().copied().filter(|&id| t.is_special(id)).collect()
}

fuzz_target!(|input: Input<'_>| {
    let mut api_only = true;
    let messages: Vec<ChatMessage> = input
        .messages
        .iter()
        .take(MAX_MESSAGES)
        .map(|(role, content)| ChatMessage {
            role: match role {
                Role::Api(i) => API_ROLES[*i as usize % API_ROLES.len()].to_owned(),
                Role::Any(s) => {
                    api_only = false;
                    (*s).to_owned()
                }
            },
            content: (*content).to_owned(),
        })
        .collect();
    let Ok(rendered) = template().render(&messages, input.add_generation_prompt) else {
        return;
    };
    let tok = &bulwark_fuzz::tiny().tokenizer;
    let contents: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
    let Ok(ids) = tok.encode_chat(&rendered, &contents) else {
        return; // refused: the safe answer to a content it cannot place
    };
    if !api_only {
        return;
    }
    let harmless: Vec<ChatMessage> = messages
        .iter()
        .map(|m| ChatMessage {
            role: m.role.clone(),
            content: "x".into(),
        })
        .collect();
    let reference = template()
        .render(&harmless, input.add_generation_prompt)
        .expect("the template renders harmless messages");
    let expected = control_ids(&tok.encode(&reference).expect("encoding the reference"));
    assert_eq!(
        control_ids(&ids),
        expected,
        "message contents changed the prompt's control tokens\nrendered: {rendered:?}"
    );
});
