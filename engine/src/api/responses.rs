//! The OpenAI response shapes the API writes, as types: one place says what each object
//! holds, and serde writes it. (`docs/openapi.yaml` describes the same shapes for clients.)

use std::collections::BTreeMap;

use serde::Serialize;

use crate::infer::scheduler::TokenLogprob;

#[derive(Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// What every completion object holds around its choices: chat or text, whole or one
/// streamed chunk (the last chunk, with `stream_options.include_usage`, has no choices and
/// the usage).
#[derive(Serialize)]
pub struct Completion<'a, C> {
    pub id: &'a str,
    /// `chat.completion`, `chat.completion.chunk` or `text_completion`.
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// What every object of one completion repeats: its id, creation time and model.
pub struct CompletionIds {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl CompletionIds {
    /// `prefix-<request id>`, created now, for the served model.
    pub fn new(prefix: &str, request_id: &str, model: &str) -> Self {
        Self {
            id: format!("{prefix}-{request_id}"),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: model.to_owned(),
        }
    }

    /// One object of this completion, as JSON.
    pub fn object<C: Serialize>(
        &self,
        object: &'static str,
        choices: Vec<C>,
        usage: Option<Usage>,
    ) -> serde_json::Value {
        to_value(&Completion {
            id: &self.id,
            object,
            created: self.created,
            model: &self.model,
            choices,
            usage,
        })
    }
}

#[derive(Serialize)]
pub struct ChatChoice<'a> {
    pub index: u32,
    pub message: AssistantMessage<'a>,
    pub logprobs: Option<ChatLogprobs<'a>>,
    pub finish_reason: &'static str,
}

#[derive(Serialize)]
pub struct AssistantMessage<'a> {
    pub role: &'static str,
    pub content: &'a str,
}

#[derive(Serialize)]
pub struct ChunkChoice<'a> {
    pub index: u32,
    pub delta: Delta<'a>,
    pub logprobs: Option<ChatLogprobs<'a>>,
    pub finish_reason: Option<&'static str>,
}

/// What a chunk adds to the message: the role (first chunk), text, or nothing (last).
#[derive(Serialize, Default)]
pub struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
}

/// Chat log-probabilities: per token its bytes and the most likely alternatives.
#[derive(Serialize)]
pub struct ChatLogprobs<'a> {
    pub content: Vec<ChatTokenLogprob<'a>>,
}

/// The chosen token, as each alternative is written, plus the alternatives.
#[derive(Serialize)]
pub struct ChatTokenLogprob<'a> {
    #[serde(flatten)]
    pub chosen: TopLogprob<'a>,
    pub top_logprobs: Vec<TopLogprob<'a>>,
}

#[derive(Serialize)]
pub struct TopLogprob<'a> {
    pub token: &'a str,
    pub logprob: f32,
    pub bytes: &'a [u8],
}

impl<'a> TopLogprob<'a> {
    fn new(token: &'a str, logprob: f32, bytes: &'a [u8]) -> Self {
        Self {
            token,
            logprob,
            bytes,
        }
    }
}

impl<'a> ChatLogprobs<'a> {
    pub fn of(tokens: &'a [TokenLogprob]) -> Self {
        let content = tokens
            .iter()
            .map(|t| ChatTokenLogprob {
                chosen: TopLogprob::new(&t.token, t.logprob, &t.bytes),
                top_logprobs: t
                    .top
                    .iter()
                    .map(|a| TopLogprob::new(&a.token, a.logprob, &a.bytes))
                    .collect(),
            })
            .collect();
        Self { content }
    }
}

#[derive(Serialize)]
pub struct TextChoice<'a> {
    pub text: &'a str,
    pub index: u32,
    pub logprobs: Option<LegacyLogprobs<'a>>,
    pub finish_reason: Option<&'static str>,
}

/// The completions API's column-wise log-probabilities.
#[derive(Serialize)]
pub struct LegacyLogprobs<'a> {
    pub tokens: Vec<&'a str>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<BTreeMap<&'a str, f32>>,
    pub text_offset: Vec<usize>,
}

impl<'a> LegacyLogprobs<'a> {
    /// For `tokens`, whose text starts at byte `offset` of the completion.
    pub fn of(tokens: &'a [TokenLogprob], mut offset: usize) -> Self {
        let mut text_offset = Vec::with_capacity(tokens.len());
        for t in tokens {
            text_offset.push(offset);
            offset += t.token.len();
        }
        Self {
            tokens: tokens.iter().map(|t| t.token.as_str()).collect(),
            token_logprobs: tokens.iter().map(|t| t.logprob).collect(),
            top_logprobs: tokens
                .iter()
                .map(|t| {
                    t.top
                        .iter()
                        .map(|a| (a.token.as_str(), a.logprob))
                        .collect()
                })
                .collect(),
            text_offset,
        }
    }
}

/// `GET /v1/models/{model}`, and each entry of `GET /v1/models`.
#[derive(Serialize)]
pub struct ModelObject<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub max_model_len: usize,
}

#[derive(Serialize)]
pub struct ModelList<'a> {
    pub object: &'static str,
    pub data: [ModelObject<'a>; 1],
}

/// A value as JSON. The types here serialize infallibly (no map has a non-string key); the
/// fallback is only for the type system.
pub fn to_value(v: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or(serde_json::Value::Null)
}
