//! `POST /v1/chat/completions`: the request, its validation, and both response shapes.

use hyper::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

use super::error::ApiError;
use super::openai::{self, ChunkFormat, Prepared, SamplingFields, StopField, StreamOptions};
use super::responses::{
    AssistantMessage, ChatChoice, ChatLogprobs, ChunkChoice, CompletionIds, Delta, Usage,
};
use super::{AppState, Handled, RequestCtx};
use crate::infer::scheduler::{FinishReason, TokenLogprob};
use crate::model::template::ChatMessage;

/// Every field OpenAI's chat API defines is named here so that an unknown one is refused by
/// name, and an unsupported one gets a specific answer instead of being silently ignored.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<Message>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<StopField>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    pub n: Option<u32>,
    pub user: Option<String>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    pub response_format: Option<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub metadata: Option<Value>,
    pub store: Option<bool>,
    /// Refused: templates come only from the model file.
    pub chat_template: Option<Value>,
    pub chat_template_kwargs: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: String,
    pub content: Option<Value>,
    pub name: Option<String>,
    /// Fields of an assistant message as OpenAI returns it: the official clients replay them
    /// (`model_dump()`) in the next turn. Accepted only in their empty forms (null, `[]`);
    /// anything else is a feature this server does not have, refused by name.
    pub refusal: Option<Value>,
    pub annotations: Option<Value>,
    pub audio: Option<Value>,
    pub function_call: Option<Value>,
    pub tool_calls: Option<Value>,
}

impl Message {
    /// The first replayed field that is not empty, by name.
    fn unsupported_field(&self) -> Option<&'static str> {
        let empty = |v: &Option<Value>| match v {
            None | Some(Value::Null) => true,
            Some(Value::Array(a)) => a.is_empty(),
            _ => false,
        };
        [
            ("refusal", &self.refusal),
            ("annotations", &self.annotations),
            ("audio", &self.audio),
            ("function_call", &self.function_call),
            ("tool_calls", &self.tool_calls),
        ]
        .into_iter()
        .find(|(_, v)| !empty(v))
        .map(|(name, _)| name)
    }
}

/// Text of one message: a string, or an array of `{"type": "text", "text": ...}` parts.
fn message_text(content: Option<Value>, i: usize) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s),
        Some(Value::Array(parts)) => {
            let mut out = String::new();
            for p in parts {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        out.push_str(p.get("text").and_then(Value::as_str).ok_or_else(|| {
                            ApiError::invalid(
                                format!("messages[{i}]: a text part needs a string `text`."),
                                "messages",
                            )
                        })?)
                    }
                    Some("image_url") | Some("input_image") | Some("input_audio")
                    | Some("file") => {
                        return Err(ApiError::invalid(
                            format!(
                                "messages[{i}]: only text content is supported; URLs in requests \
                                 are never fetched."
                            ),
                            "messages",
                        ));
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            format!("messages[{i}]: unknown content part type."),
                            "messages",
                        ));
                    }
                }
            }
            Ok(out)
        }
        Some(_) => Err(ApiError::invalid(
            format!("messages[{i}].content must be a string or an array of parts."),
            "messages",
        )),
    }
}

pub fn prepare(state: &AppState, r: ChatRequest) -> Result<(Prepared, bool, bool), ApiError> {
    openai::check_model(state, &r.model)?;
    refuse_unsupported(&r)?;
    let sampling = openai::sampling(&SamplingFields {
        temperature: r.temperature,
        top_p: r.top_p,
        top_k: r.top_k,
        seed: r.seed,
        presence_penalty: r.presence_penalty,
        frequency_penalty: r.frequency_penalty,
        n: r.n,
    })?;
    let stop = openai::stop_sequences(state, r.stop)?;
    let top = openai::check_top_logprobs(r.top_logprobs)?;
    if r.top_logprobs.is_some() && r.logprobs != Some(true) {
        return Err(ApiError::invalid(
            "top_logprobs requires logprobs = true.",
            "top_logprobs",
        ));
    }
    let logprobs = (r.logprobs == Some(true)).then_some(top);
    let messages = chat_messages(state, r.messages)?;
    let prompt = encode_prompt(state, &messages)?;
    let requested = r.max_completion_tokens.or(r.max_tokens);
    let max_tokens = openai::check_lengths(
        state,
        prompt.len(),
        "messages",
        requested,
        state.limits.max_tokens,
    )?;
    let (stream, include_usage) = openai::stream_flags(r.stream, r.stream_options.as_ref())?;
    Ok((
        Prepared {
            prompt,
            max_tokens,
            sampling,
            stop,
            logprobs,
        },
        stream,
        include_usage,
    ))
}

/// Features this server does not have, refused by name rather than ignored.
fn refuse_unsupported(r: &ChatRequest) -> Result<(), ApiError> {
    openai::refuse(
        r.chat_template.is_some() || r.chat_template_kwargs.is_some(),
        "Request-supplied chat templates are refused; the model's own template is used.",
        "chat_template",
    )?;
    openai::refuse(
        r.tools.is_some() || r.tool_choice.is_some(),
        "Tools are not supported.",
        "tools",
    )?;
    openai::refuse_logit_bias(r.logit_bias.as_ref())?;
    if let Some(rf) = &r.response_format
        && rf.get("type").and_then(Value::as_str) != Some("text")
    {
        return Err(ApiError::invalid(
            "Only response_format {\"type\": \"text\"} is supported.",
            "response_format",
        ));
    }
    Ok(())
}

/// The conversation, checked message by message: roles, replayed fields, text content.
fn chat_messages(state: &AppState, input: Vec<Message>) -> Result<Vec<ChatMessage>, ApiError> {
    if input.is_empty() {
        return Err(ApiError::invalid("messages must not be empty.", "messages"));
    }
    if input.len() > state.limits.max_messages {
        return Err(ApiError::invalid(
            format!(
                "At most {} messages are allowed (limits.max_messages).",
                state.limits.max_messages
            ),
            "messages",
        ));
    }
    let mut messages = Vec::with_capacity(input.len());
    for (i, m) in input.into_iter().enumerate() {
        if let Some(field) = m.unsupported_field() {
            return Err(ApiError::invalid(
                format!("messages[{i}].{field} is not supported (only its null or empty form)."),
                "messages",
            ));
        }
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            _ => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role must be system, developer, user or assistant."),
                    "messages",
                ));
            }
        };
        messages.push(ChatMessage {
            role: role.into(),
            content: message_text(m.content, i)?,
        });
    }
    Ok(messages)
}

/// Render the conversation with the model's template and encode it, message contents as plain
/// text (their control-token strings stay text), bounded in bytes before tokenizing.
fn encode_prompt(state: &AppState, messages: &[ChatMessage]) -> Result<Vec<u32>, ApiError> {
    let template = state.model.template.as_ref().ok_or_else(|| {
        ApiError::invalid(
            "This model has no chat template; use /v1/completions.",
            "messages",
        )
    })?;
    let text_bytes: usize = messages.iter().map(|m| m.content.len()).sum();
    openai::check_prompt_bytes(state, text_bytes, "messages")?;
    let rendered = template.render(messages, true).map_err(|e| {
        tracing::warn!(error = %format!("{e:#}"), "chat template rejected the conversation");
        ApiError::invalid(
            "The model's chat template rejected these messages.",
            "messages",
        )
    })?;
    let contents: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
    let prompt = state
        .model
        .tokenizer
        .encode_chat(&rendered, &contents)
        .map_err(|e| {
            tracing::warn!(error = %format!("{e:#}"), "chat prompt refused");
            ApiError::invalid(
                "A message holds control-token text that the chat template transforms; it cannot \
                 be encoded safely.",
                "messages",
            )
        })?;
    Ok(prompt)
}

pub async fn handle(
    state: &Arc<AppState>,
    body: Value,
    ctx: &mut RequestCtx,
) -> Result<Handled, ApiError> {
    let req: ChatRequest = serde_json::from_value(body).map_err(|e| ApiError::InvalidRequest {
        message: format!("Invalid chat completion request: {e}."),
        param: None,
        code: "invalid_request",
    })?;
    // Rendering and tokenizing run off the network threads: a large prompt must not stall
    // other connections' handshakes and requests.
    let st = Arc::clone(state);
    let (prepared, stream, include_usage) = tokio::task::spawn_blocking(move || prepare(&st, req))
        .await
        .map_err(|_| ApiError::Internal)??;
    let want_logprobs = prepared.logprobs.is_some();
    let rx = openai::submit(state, ctx, prepared)?;
    let ids = CompletionIds::new("chatcmpl", &ctx.request_id, &state.model.name);
    if stream {
        let fmt = ChatChunks { ids, want_logprobs };
        return Ok(openai::stream(state, ctx, rx, fmt, include_usage));
    }
    let c = openai::collect(rx, ctx).await?;
    let choice = ChatChoice {
        index: 0,
        message: AssistantMessage {
            role: "assistant",
            content: &c.text,
        },
        logprobs: want_logprobs.then(|| ChatLogprobs::of(&c.logprobs)),
        finish_reason: c.finish.as_str(),
    };
    let usage = Usage::new(c.prompt_tokens, c.completion_tokens);
    Ok(Handled::json(
        StatusCode::OK,
        &ids.object("chat.completion", vec![choice], Some(usage)),
        (c.prompt_tokens, c.completion_tokens),
    ))
}

struct ChatChunks {
    ids: CompletionIds,
    want_logprobs: bool,
}

impl ChatChunks {
    fn chunk(&self, choices: Vec<ChunkChoice<'_>>, usage: Option<Usage>) -> Value {
        self.ids.object("chat.completion.chunk", choices, usage)
    }

    fn choice<'a>(
        delta: Delta<'a>,
        logprobs: Option<ChatLogprobs<'a>>,
        finish_reason: Option<&'static str>,
    ) -> Vec<ChunkChoice<'a>> {
        vec![ChunkChoice {
            index: 0,
            delta,
            logprobs,
            finish_reason,
        }]
    }
}

impl ChunkFormat for ChatChunks {
    fn first(&mut self) -> Option<Value> {
        let delta = Delta {
            role: Some("assistant"),
            content: Some(""),
        };
        Some(self.chunk(Self::choice(delta, None, None), None))
    }

    fn delta(&mut self, text: &str, logprobs: &[TokenLogprob]) -> Option<Value> {
        if text.is_empty() && logprobs.is_empty() {
            return None;
        }
        let lp = self.want_logprobs.then(|| ChatLogprobs::of(logprobs));
        let delta = Delta {
            role: None,
            content: Some(text),
        };
        Some(self.chunk(Self::choice(delta, lp, None), None))
    }

    fn finish(&mut self, finish: FinishReason) -> Value {
        self.chunk(
            Self::choice(Delta::default(), None, Some(finish.as_str())),
            None,
        )
    }

    fn usage(&mut self, prompt: usize, completion: usize) -> Value {
        self.chunk(Vec::new(), Some(Usage::new(prompt, completion)))
    }
}
