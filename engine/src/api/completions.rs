//! `POST /v1/completions`: raw text (or token ids) in, text out; no chat template.

use hyper::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use std::sync::Arc;

use super::error::ApiError;
use super::openai::{self, ChunkFormat, Prepared, SamplingFields, StopField, StreamOptions};
use super::responses::{CompletionIds, LegacyLogprobs, TextChoice, Usage};
use super::{AppState, Handled, RequestCtx};
use crate::infer::scheduler::{FinishReason, TokenLogprob};

/// OpenAI's default `max_tokens` for text completions.
const DEFAULT_MAX_TOKENS: usize = 16;
/// The legacy completions API allows at most 5 alternatives; we allow what chat allows.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Value,
    pub max_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<StopField>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub logprobs: Option<u32>,
    pub n: Option<u32>,
    pub best_of: Option<u32>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub user: Option<String>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
}

/// The prompt as token ids: a string, a one-element array of strings, or an array of ids.
fn prompt_ids(state: &AppState, prompt: Value) -> Result<Vec<u32>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "prompt must be a string, [string] or an array of token ids.",
            "prompt",
        )
    };
    let text = match prompt {
        Value::String(s) => s,
        Value::Array(items) if items.len() == 1 && items[0].is_string() => {
            items[0].as_str().unwrap_or_default().to_owned()
        }
        Value::Array(items) if !items.is_empty() && items.iter().all(Value::is_u64) => {
            let vocab = state.model.tokenizer.vocab_size as u64;
            return items
                .iter()
                .map(|v| v.as_u64().filter(|&id| id < vocab).map(|id| id as u32))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    ApiError::invalid(
                        format!("Token ids must be below the vocabulary size {vocab}."),
                        "prompt",
                    )
                });
        }
        _ => return Err(bad()),
    };
    if text.len() > state.limits.max_body_bytes {
        return Err(bad());
    }
    openai::check_prompt_bytes(state, text.len(), "prompt")?;
    // A prompt is untrusted text: control-token strings in it stay text (docs/openapi.yaml).
    state.model.tokenizer.encode_plain(&text).map_err(|e| {
        tracing::error!(error = %format!("{e:#}"), "tokenizer failed");
        ApiError::Internal
    })
}

/// Features this server does not have, refused by name rather than ignored.
fn refuse_unsupported(r: &CompletionRequest) -> Result<(), ApiError> {
    openai::refuse(r.echo == Some(true), "echo is not supported.", "echo")?;
    openai::refuse(
        r.suffix.as_ref().is_some_and(|s| !s.is_empty()),
        "suffix is not supported.",
        "suffix",
    )?;
    openai::refuse(
        r.best_of.is_some_and(|b| b != 1),
        "Only best_of = 1 is supported.",
        "best_of",
    )?;
    openai::refuse_logit_bias(r.logit_bias.as_ref())
}

pub async fn handle(
    state: &Arc<AppState>,
    body: Value,
    ctx: &mut RequestCtx,
) -> Result<Handled, ApiError> {
    let r: CompletionRequest =
        serde_json::from_value(body).map_err(|e| ApiError::InvalidRequest {
            message: format!("Invalid completion request: {e}."),
            param: None,
            code: "invalid_request",
        })?;
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
    let logprobs = match r.logprobs {
        Some(n) => Some(openai::check_top_logprobs(Some(n))?),
        None => None,
    };
    // Tokenizing runs off the network threads (see chat.rs).
    let st = Arc::clone(state);
    let prompt = tokio::task::spawn_blocking(move || prompt_ids(&st, r.prompt))
        .await
        .map_err(|_| ApiError::Internal)??;
    let max_tokens = openai::check_lengths(
        state,
        prompt.len(),
        "prompt",
        r.max_tokens,
        DEFAULT_MAX_TOKENS,
    )?;
    let (stream, include_usage) = openai::stream_flags(r.stream, r.stream_options.as_ref())?;

    let rx = openai::submit(
        state,
        ctx,
        Prepared {
            prompt,
            max_tokens,
            sampling,
            stop,
            logprobs,
        },
    )?;
    let ids = CompletionIds::new("cmpl", &ctx.request_id, &state.model.name);
    let want_logprobs = logprobs.is_some();
    if stream {
        let fmt = TextChunks {
            ids,
            want_logprobs,
            offset: 0,
        };
        return Ok(openai::stream(state, ctx, rx, fmt, include_usage));
    }
    let c = openai::collect(rx, ctx).await?;
    let choice = TextChoice {
        text: &c.text,
        index: 0,
        logprobs: want_logprobs.then(|| LegacyLogprobs::of(&c.logprobs, 0)),
        finish_reason: Some(c.finish.as_str()),
    };
    let usage = Usage::new(c.prompt_tokens, c.completion_tokens);
    Ok(Handled::json(
        StatusCode::OK,
        &ids.object("text_completion", vec![choice], Some(usage)),
        (c.prompt_tokens, c.completion_tokens),
    ))
}

struct TextChunks {
    ids: CompletionIds,
    want_logprobs: bool,
    offset: usize,
}

impl TextChunks {
    fn chunk(&self, choices: Vec<TextChoice<'_>>, usage: Option<Usage>) -> Value {
        self.ids.object("text_completion", choices, usage)
    }
}

impl ChunkFormat for TextChunks {
    fn first(&mut self) -> Option<Value> {
        None
    }

    fn delta(&mut self, text: &str, logprobs: &[TokenLogprob]) -> Option<Value> {
        if text.is_empty() && logprobs.is_empty() {
            return None;
        }
        let lp = self
            .want_logprobs
            .then(|| LegacyLogprobs::of(logprobs, self.offset));
        self.offset += logprobs.iter().map(|t| t.token.len()).sum::<usize>();
        let choice = TextChoice {
            text,
            index: 0,
            logprobs: lp,
            finish_reason: None,
        };
        Some(self.chunk(vec![choice], None))
    }

    fn finish(&mut self, finish: FinishReason) -> Value {
        let choice = TextChoice {
            text: "",
            index: 0,
            logprobs: None,
            finish_reason: Some(finish.as_str()),
        };
        self.chunk(vec![choice], None)
    }

    fn usage(&mut self, prompt: usize, completion: usize) -> Value {
        self.chunk(Vec::new(), Some(Usage::new(prompt, completion)))
    }
}
