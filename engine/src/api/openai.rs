//! What chat and text completions share: sampling fields and their validation, submission to
//! the scheduler, collecting a whole answer, and streaming one as server-sent events.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::body::{ApiBody, STREAM_BUFFER_FRAMES};
use super::error::ApiError;
use super::{AppState, Handled, RequestCtx};
use crate::infer::sampler::SamplingParams;
use crate::infer::scheduler::{
    self, Event, FinishReason, GenRequest, MAX_TOP_LOGPROBS, TokenLogprob,
};

/// Longest stop sequence accepted, in bytes.
const MAX_STOP_LEN: usize = 256;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
    pub continuous_usage_stats: Option<bool>,
}

/// Sampling fields common to both endpoints, as sent.
pub struct SamplingFields {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub n: Option<u32>,
}

pub fn sampling(f: &SamplingFields) -> Result<SamplingParams, ApiError> {
    let temperature = f.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature must be between 0 and 2.",
            "temperature",
        ));
    }
    let top_p = f.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p must be greater than 0 and at most 1.",
            "top_p",
        ));
    }
    let top_k = match f.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(_) => {
            return Err(ApiError::invalid(
                "top_k must be -1, 0 or positive.",
                "top_k",
            ));
        }
    };
    for (v, name) in [
        (f.presence_penalty, "presence_penalty"),
        (f.frequency_penalty, "frequency_penalty"),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::invalid(
                format!("{name} is not supported; omit it or send 0."),
                name,
            ));
        }
    }
    if f.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("Only n = 1 is supported.", "n"));
    }
    Ok(SamplingParams {
        temperature,
        top_p,
        top_k,
        seed: f.seed.map(|s| s as u64),
    })
}

pub fn stop_sequences(state: &AppState, stop: Option<StopField>) -> Result<Vec<String>, ApiError> {
    let stops = match stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(v)) => v,
    };
    let max = state.limits.max_stop_sequences;
    if stops.len() > max {
        return Err(ApiError::invalid(
            format!("At most {max} stop sequences are allowed (limits.max_stop_sequences)."),
            "stop",
        ));
    }
    if stops.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_LEN) {
        return Err(ApiError::invalid(
            format!("Stop sequences must be 1 to {MAX_STOP_LEN} bytes."),
            "stop",
        ));
    }
    Ok(stops)
}

/// `(stream, include_usage)` from a request's `stream` and `stream_options`; options without
/// streaming are refused by name (both endpoints behave the same).
pub fn stream_flags(
    stream: Option<bool>,
    options: Option<&StreamOptions>,
) -> Result<(bool, bool), ApiError> {
    let stream = stream.unwrap_or(false);
    if options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options requires stream = true.",
            "stream_options",
        ));
    }
    Ok((
        stream,
        options.and_then(|o| o.include_usage).unwrap_or(false),
    ))
}

/// Refuse a request that asks for a feature this server does not have, naming its parameter.
pub fn refuse(present: bool, message: &str, param: &'static str) -> Result<(), ApiError> {
    if present {
        Err(ApiError::invalid(message, param))
    } else {
        Ok(())
    }
}

/// `logit_bias` is accepted only empty, on both endpoints.
pub fn refuse_logit_bias(
    bias: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<(), ApiError> {
    refuse(
        bias.is_some_and(|m| !m.is_empty()),
        "logit_bias is not supported.",
        "logit_bias",
    )
}

pub fn check_model(state: &AppState, model: &str) -> Result<(), ApiError> {
    if model != state.model.name {
        return Err(ApiError::ModelNotFound {
            model: model.chars().take(128).collect(),
        });
    }
    Ok(())
}

pub fn check_top_logprobs(n: Option<u32>) -> Result<usize, ApiError> {
    let n = n.unwrap_or(0) as usize;
    if n > MAX_TOP_LOGPROBS {
        return Err(ApiError::invalid(
            format!("top_logprobs must be at most {MAX_TOP_LOGPROBS}."),
            "top_logprobs",
        ));
    }
    Ok(n)
}

/// A validated generation, ready for the scheduler.
pub struct Prepared {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub logprobs: Option<usize>,
}

/// Refuse a prompt whose text alone proves it too long, before it is tokenized: a text of N
/// bytes has at least N / (longest token in bytes) tokens. Bounds the tokenizer's work per
/// request whatever the body size.
pub fn check_prompt_bytes(
    state: &AppState,
    bytes: usize,
    param: &'static str,
) -> Result<(), ApiError> {
    let l = &state.limits;
    let at_least = bytes / state.model.tokenizer.max_token_bytes;
    if at_least > l.max_prompt_tokens {
        return Err(ApiError::InvalidRequest {
            message: format!(
                "The prompt is at least {at_least} tokens ({bytes} bytes); the limit \
                 (limits.max_prompt_tokens) is {}.",
                l.max_prompt_tokens
            ),
            param: Some(param),
            code: "prompt_too_long",
        });
    }
    Ok(())
}

/// Check prompt length and `max_tokens` against the limits and the context window.
pub fn check_lengths(
    state: &AppState,
    prompt_len: usize,
    prompt_param: &'static str,
    requested: Option<u64>,
    default: usize,
) -> Result<usize, ApiError> {
    let l = &state.limits;
    if prompt_len == 0 {
        return Err(ApiError::invalid("The prompt is empty.", prompt_param));
    }
    if prompt_len > l.max_prompt_tokens {
        return Err(ApiError::InvalidRequest {
            message: format!(
                "The prompt is {prompt_len} tokens; the limit (limits.max_prompt_tokens) is {}.",
                l.max_prompt_tokens
            ),
            param: Some(prompt_param),
            code: "prompt_too_long",
        });
    }
    let ctx = state.model.context_length;
    let room = ctx.saturating_sub(prompt_len);
    let max_tokens = match requested {
        Some(0) => {
            return Err(ApiError::invalid(
                "max_tokens must be at least 1.",
                "max_tokens",
            ));
        }
        Some(n) if n as usize > l.max_tokens => {
            return Err(ApiError::InvalidRequest {
                message: format!(
                    "max_tokens is {n}; the limit (limits.max_tokens) is {}.",
                    l.max_tokens
                ),
                param: Some("max_tokens"),
                code: "max_tokens_too_large",
            });
        }
        Some(n) => n as usize,
        None => default.min(l.max_tokens).min(room),
    };
    if room == 0 || prompt_len + max_tokens > ctx {
        return Err(ApiError::InvalidRequest {
            message: format!(
                "The prompt ({prompt_len} tokens) plus max_tokens ({max_tokens}) exceeds the \
                 context length of {ctx} tokens."
            ),
            param: Some("max_tokens"),
            code: "context_length_exceeded",
        });
    }
    Ok(max_tokens)
}

pub fn submit(
    state: &AppState,
    ctx: &mut RequestCtx,
    p: Prepared,
) -> Result<mpsc::Receiver<Event>, ApiError> {
    ctx.prompt_tokens = p.prompt.len();
    let (tx, rx) = mpsc::channel(scheduler::event_capacity(p.max_tokens));
    state
        .scheduler
        .submit(GenRequest {
            request_id: ctx.request_id.clone(),
            prefix_scope: ctx.key_name.clone(),
            prompt: p.prompt,
            max_tokens: p.max_tokens,
            sampling: p.sampling,
            stop: p.stop,
            logprobs: p.logprobs,
            events: tx,
        })
        .map_err(|e| match e {
            scheduler::SubmitError::QueueFull => ApiError::Overloaded {
                what: "limits.queue_depth",
            },
            scheduler::SubmitError::Unavailable => ApiError::StageUnavailable,
        })?;
    Ok(rx)
}

pub struct Collected {
    pub text: String,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Wait for a whole answer. If the client disconnects, hyper drops this future, the receiver
/// goes with it, and the scheduler frees the slot before its next step.
pub async fn collect(
    mut rx: mpsc::Receiver<Event>,
    ctx: &mut RequestCtx,
) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Delta {
                text: t,
                logprobs: l,
                tokens,
            } => {
                text.push_str(&t);
                logprobs.extend(l);
                ctx.completion_tokens += tokens;
            }
            Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                return Ok(Collected {
                    text,
                    logprobs,
                    finish,
                    prompt_tokens,
                    completion_tokens,
                });
            }
            Event::Failed => return Err(ApiError::Internal),
            Event::Unavailable => return Err(ApiError::StageUnavailable),
        }
    }
    Err(ApiError::Internal)
}

/// Turns scheduler events into the JSON chunks of one endpoint's stream.
pub trait ChunkFormat: Send + 'static {
    fn first(&mut self) -> Option<serde_json::Value>;
    fn delta(&mut self, text: &str, logprobs: &[TokenLogprob]) -> Option<serde_json::Value>;
    fn finish(&mut self, finish: FinishReason) -> serde_json::Value;
    fn usage(&mut self, prompt: usize, completion: usize) -> serde_json::Value;
}

fn sse(v: &serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// The JSON chunks one scheduler event becomes; counts tokens into `ctx` and sets the status
/// the request will be logged with.
fn frames_of(
    ev: Event,
    fmt: &mut impl ChunkFormat,
    ctx: &mut RequestCtx,
    include_usage: bool,
    status: &mut u16,
) -> Vec<serde_json::Value> {
    match ev {
        Event::Delta {
            text,
            logprobs,
            tokens,
        } => {
            ctx.completion_tokens += tokens;
            fmt.delta(&text, &logprobs).into_iter().collect()
        }
        Event::Done {
            finish,
            prompt_tokens,
            completion_tokens,
        } => {
            (ctx.prompt_tokens, ctx.completion_tokens) = (prompt_tokens, completion_tokens);
            let mut v = vec![fmt.finish(finish)];
            if include_usage {
                v.push(fmt.usage(prompt_tokens, completion_tokens));
            }
            v
        }
        Event::Failed => {
            *status = 500;
            vec![ApiError::Internal.body()]
        }
        Event::Unavailable => {
            *status = 503;
            vec![ApiError::StageUnavailable.body()]
        }
    }
}

/// A 200 `text/event-stream` response whose body is the frames sent on `body_rx`.
fn event_stream_response(body_rx: mpsc::Receiver<Bytes>) -> Response<ApiBody> {
    let mut r = Response::new(ApiBody::Stream(body_rx));
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// Start streaming: a task forwards events as SSE frames and logs the request when it ends.
/// A client that goes away closes the body channel; the task then drops the event receiver,
/// which tells the scheduler to free the slot.
pub fn stream(
    state: &AppState,
    ctx: &mut RequestCtx,
    mut rx: mpsc::Receiver<Event>,
    mut fmt: impl ChunkFormat,
    include_usage: bool,
) -> Handled {
    let (tx, body_rx) = mpsc::channel::<Bytes>(STREAM_BUFFER_FRAMES);
    let metrics = Arc::clone(&state.metrics);
    let mut ctx = ctx.hand_over();
    let write_timeout = Duration::from_secs(state.limits.write_timeout_secs);
    tokio::spawn(async move {
        // A client that stops reading (its flow-control window stays shut) is given up after
        // `limits.write_timeout_secs`; dropping the receiver frees its slot in the scheduler.
        let send = |frame: Bytes| tokio::time::timeout(write_timeout, tx.send(frame));
        if let Some(first) = fmt.first()
            && !matches!(send(sse(&first)).await, Ok(Ok(())))
        {
            ctx.log(499);
            return;
        }
        let mut status = 200;
        while let Some(ev) = rx.recv().await {
            let frames = frames_of(ev, &mut fmt, &mut ctx, include_usage, &mut status);
            for f in frames {
                match send(sse(&f)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => {
                        metrics.count_response(499, "client_closed");
                        ctx.log(499);
                        return;
                    }
                    Err(_) => {
                        metrics.count_response(408, "limits.write_timeout_secs");
                        tracing::info!(request_id = %ctx.request_id, "client stopped reading; stream abandoned (limits.write_timeout_secs)");
                        ctx.log(408);
                        return;
                    }
                }
            }
        }
        let _ = send(Bytes::from_static(b"data: [DONE]\n\n")).await;
        ctx.log(status);
    });
    let r = event_stream_response(body_rx);
    Handled {
        response: r,
        logged: true,
        tokens: (0, 0),
    }
}
