//! The API router: authentication before routing, then exact-path routes.
//!
//! Order of checks for every request (INVARIANT: authentication precedes any routing decision,
//! so an anonymous client learns nothing about which paths or methods exist):
//! 1. header size and count limits (the same answer whatever the path);
//! 2. `GET /health`, byte-exact, is the only route that can be anonymous, and only when
//!    `server.anonymous_health` is set;
//! 3. a CORS preflight from a configured origin (only when CORS is configured);
//! 4. `Authorization: Bearer <key>`, else 401;
//! 5. per-key rate limit, in-flight limit;
//! 6. exact-path routing: unknown paths 404, known paths with another method 405.

pub mod body;
pub mod chat;
pub mod completions;
pub mod error;
pub mod limits;
pub mod models;
pub mod openai;
pub mod responses;

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Limits;
use crate::infer::scheduler::SchedulerHandle;
use crate::keys::KeyStore;
use crate::metrics::Metrics;
use crate::model::ModelInfo;
use body::ApiBody;
use error::ApiError;
use limits::RateLimiter;

/// Longest `Authorization` value considered; a key is 47 characters.
const MAX_AUTHORIZATION_LEN: usize = 256;

pub struct AppState {
    pub keys: KeyStore,
    pub limits: Limits,
    pub cors_origins: Vec<String>,
    pub anonymous_health: bool,
    pub model: Arc<ModelInfo>,
    pub scheduler: SchedulerHandle,
    pub metrics: Arc<Metrics>,
    pub rate: RateLimiter,
    pub in_flight: Arc<Semaphore>,
}

/// What a handler needs to know about the caller, and what the access log records.
pub struct RequestCtx {
    pub request_id: String,
    pub key_name: String,
    pub route: &'static str,
    pub started: Instant,
    /// Held until the response (or its stream) is complete.
    pub permit: Option<OwnedSemaphorePermit>,
    /// Token counts so far: the log line carries them whatever the ending.
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    logged: bool,
}

impl RequestCtx {
    fn new() -> Self {
        Self {
            request_id: new_request_id(),
            key_name: "-".into(),
            route: "-",
            started: Instant::now(),
            permit: None,
            prompt_tokens: 0,
            completion_tokens: 0,
            logged: false,
        }
    }

    /// Move the log line and the in-flight slot to a task that outlives the handler (a
    /// stream); this context then logs nothing.
    pub fn hand_over(&mut self) -> RequestCtx {
        self.logged = true;
        RequestCtx {
            request_id: self.request_id.clone(),
            key_name: self.key_name.clone(),
            route: self.route,
            started: self.started,
            permit: self.permit.take(),
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            logged: false,
        }
    }

    /// The access log line, once: never prompt or completion text.
    pub fn log(&mut self, status: u16) {
        if std::mem::replace(&mut self.logged, true) {
            return;
        }
        tracing::info!(
            request_id = %self.request_id,
            key = %self.key_name,
            route = self.route,
            status,
            prompt_tokens = self.prompt_tokens,
            completion_tokens = self.completion_tokens,
            latency_ms = self.started.elapsed().as_millis() as u64,
            "request"
        );
    }
}

/// A request whose handler was dropped before it answered (the client went away) is still
/// logged, as 499, with the tokens it had.
impl Drop for RequestCtx {
    fn drop(&mut self) {
        self.log(499);
    }
}

pub type ApiResponse = Response<ApiBody>;

/// A handler's result: the response, and whether the handler already logged (streams log
/// when they end).
pub struct Handled {
    pub response: ApiResponse,
    pub logged: bool,
    pub tokens: (usize, usize),
}

impl Handled {
    pub fn json(status: StatusCode, value: &serde_json::Value, tokens: (usize, usize)) -> Self {
        Self {
            response: json_response(status, value),
            logged: false,
            tokens,
        }
    }
}

pub fn json_response(status: StatusCode, value: &serde_json::Value) -> ApiResponse {
    let mut r = Response::new(ApiBody::full(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

pub fn error_response(e: &ApiError) -> ApiResponse {
    let mut r = json_response(e.status(), &e.body());
    if let Some(s) = e.retry_after() {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    if let ApiError::Unauthorized = e {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if let ApiError::MethodNotAllowed { allow } = e {
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static(allow));
    }
    r
}

fn new_request_id() -> String {
    let mut b = [0u8; 12];
    if getrandom::fill(&mut b).is_err() {
        return "unknown".into();
    }
    hex::encode(b)
}

/// The entry point for every request on the API listener.
pub async fn handle<B>(state: Arc<AppState>, req: Request<B>) -> ApiResponse
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut ctx = RequestCtx::new();
    let origin = allowed_origin(&state.cors_origins, req.headers());
    // A HEAD answer carries the headers of the GET answer and never a body (HTTP/1.1 strips
    // it in hyper; HTTP/2 does not, and curl calls a body there a protocol error).
    let head = req.method() == Method::HEAD;
    let result = dispatch(&state, req, &mut ctx).await;
    let (mut response, logged, tokens) = match result {
        Ok(h) => (h.response, h.logged, h.tokens),
        Err(e) => {
            if matches!(e, ApiError::Internal) {
                tracing::error!(request_id = %ctx.request_id, "internal error (cause logged above)");
            }
            state
                .metrics
                .count_response(e.status().as_u16(), e.reason());
            (error_response(&e), false, (0, 0))
        }
    };
    let status = response.status().as_u16();
    if status < 400 {
        state.metrics.count_response(status, "ok");
    }
    if !logged {
        if tokens != (0, 0) {
            (ctx.prompt_tokens, ctx.completion_tokens) = tokens;
        }
        ctx.log(status);
    }
    let h = response.headers_mut();
    h.insert(
        "x-request-id",
        HeaderValue::from_str(&ctx.request_id).unwrap_or(HeaderValue::from_static("-")),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    if let Some(o) = origin {
        // The configured string is sent, never the request's header: origins are not reflected.
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_str(o).unwrap_or(HeaderValue::from_static("null")),
        );
    }
    if !state.cors_origins.is_empty() {
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    if head {
        *response.body_mut() = ApiBody::full(Bytes::new());
    }
    response
}

/// The configured origin equal to the request's `Origin`, if any.
fn allowed_origin<'a>(allowed: &'a [String], headers: &HeaderMap) -> Option<&'a str> {
    let origin = headers.get(header::ORIGIN)?.to_str().ok()?;
    allowed
        .iter()
        .find(|o| o.as_str() == origin)
        .map(String::as_str)
}

/// What a route serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Health,
    Chat,
    Completions,
    Models,
    Model,
}

impl Endpoint {
    /// Its name in the access log.
    fn name(self) -> &'static str {
        match self {
            Self::Health => "health",
            Self::Chat => "chat",
            Self::Completions => "completions",
            Self::Models => "models",
            Self::Model => "model",
        }
    }

    /// Whether the request carries a JSON body (read, bounded, before an in-flight slot).
    fn reads_body(self) -> bool {
        matches!(self, Self::Chat | Self::Completions)
    }
}

/// Where a route is.
enum RoutePath {
    Exact(&'static str),
    /// `/v1/models/{model}`.
    ModelId,
}

/// One entry of the API surface.
struct Route {
    path: RoutePath,
    method: Method,
    endpoint: Endpoint,
    /// A CORS preflight from a configured origin is answered for it.
    preflight: bool,
}

/// The whole API surface: every other path is 404, and every path, these included, needs a
/// key first (`/health` may be made anonymous).
static ROUTES: [Route; 5] = [
    Route {
        path: RoutePath::Exact("/health"),
        method: Method::GET,
        endpoint: Endpoint::Health,
        preflight: false,
    },
    Route {
        path: RoutePath::Exact("/v1/chat/completions"),
        method: Method::POST,
        endpoint: Endpoint::Chat,
        preflight: true,
    },
    Route {
        path: RoutePath::Exact("/v1/completions"),
        method: Method::POST,
        endpoint: Endpoint::Completions,
        preflight: true,
    },
    Route {
        path: RoutePath::Exact("/v1/models"),
        method: Method::GET,
        endpoint: Endpoint::Models,
        preflight: true,
    },
    Route {
        path: RoutePath::ModelId,
        method: Method::GET,
        endpoint: Endpoint::Model,
        preflight: false,
    },
];

fn find_route(path: &str) -> Option<&'static Route> {
    ROUTES.iter().find(|r| match r.path {
        RoutePath::Exact(p) => p == path,
        RoutePath::ModelId => models::model_path(path).is_some(),
    })
}

fn health() -> Handled {
    Handled::json(StatusCode::OK, &serde_json::json!({"status": "ok"}), (0, 0))
}

async fn dispatch<B>(
    state: &Arc<AppState>,
    req: Request<B>,
    ctx: &mut RequestCtx,
) -> Result<Handled, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    check_request_shape(state, &req)?;
    let path = req.uri().path();
    if let Some(anonymous) = anonymous_answer(state, &req, ctx) {
        return Ok(anonymous);
    }

    // INVARIANT: authentication before routing.
    let key_name = authenticate(&state.keys, req.headers()).ok_or(ApiError::Unauthorized)?;
    ctx.key_name = key_name.to_owned();
    state.rate.check(key_name)?;

    let route = find_route(path).ok_or(ApiError::NotFound)?;
    ctx.route = route.endpoint.name();
    if req.method() != route.method {
        return Err(ApiError::MethodNotAllowed {
            allow: route.method.as_str(),
        });
    }
    if route.endpoint == Endpoint::Health {
        return Ok(health());
    }
    let path = path.to_owned();
    // The body is read (bounded in size and time) before an in-flight slot is taken, so a
    // client that stalls its upload holds no slot.
    let body = match route.endpoint.reads_body() {
        true => Some(read_json_body(state, req).await?),
        false => None,
    };
    ctx.permit =
        Some(
            state
                .in_flight
                .clone()
                .try_acquire_owned()
                .map_err(|_| ApiError::Overloaded {
                    what: "limits.max_in_flight",
                })?,
        );
    match (route.endpoint, body) {
        (Endpoint::Models, _) => Ok(models::list(state)),
        (Endpoint::Model, _) => models::get(state, &path),
        (Endpoint::Chat, Some(body)) => chat::handle(state, body, ctx).await,
        (Endpoint::Completions, Some(body)) => completions::handle(state, body, ctx).await,
        _ => Err(ApiError::NotFound),
    }
}

/// What is refused whatever the path, before anything else: header size and count, and a
/// request naming two hosts (HTTP/2's :authority and a Host header must agree, RFC 9113
/// §8.3.1).
fn check_request_shape<B>(state: &AppState, req: &Request<B>) -> Result<(), ApiError> {
    limits::check_headers(req.headers(), &state.limits)?;
    if let (Some(a), Some(h)) = (req.uri().authority(), req.headers().get(header::HOST))
        && h.as_bytes() != a.as_str().as_bytes()
    {
        return Err(ApiError::InvalidRequest {
            message: "The Host header and the request's authority differ.".into(),
            param: None,
            code: "invalid_request",
        });
    }
    Ok(())
}

/// The only answers given without a key: `GET /health` when `server.anonymous_health` is set
/// (byte-exact path, GET only), and a CORS preflight from a configured origin.
fn anonymous_answer<B>(
    state: &AppState,
    req: &Request<B>,
    ctx: &mut RequestCtx,
) -> Option<Handled> {
    if state.anonymous_health
        && req.method() == Method::GET
        && find_route(req.uri().path()).is_some_and(|r| r.endpoint == Endpoint::Health)
    {
        ctx.route = Endpoint::Health.name();
        return Some(health());
    }
    if req.method() == Method::OPTIONS
        && let Some(resp) = cors_preflight(state, req)
    {
        ctx.route = "cors_preflight";
        return Some(Handled {
            response: resp,
            logged: false,
            tokens: (0, 0),
        });
    }
    None
}

/// A preflight is answered anonymously only for a configured origin asking about a known route;
/// everything else falls through to authentication (and so gets 401).
fn cors_preflight<B>(state: &AppState, req: &Request<B>) -> Option<ApiResponse> {
    let origin = allowed_origin(&state.cors_origins, req.headers())?;
    req.headers().get(header::ACCESS_CONTROL_REQUEST_METHOD)?;
    let path = req.uri().path();
    let route = find_route(path).filter(|r| r.preflight)?;
    let mut r = Response::new(ApiBody::full(Bytes::new()));
    *r.status_mut() = StatusCode::NO_CONTENT;
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_str(origin).ok()?,
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(route.method.as_str()),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    Some(r)
}

/// `Authorization: Bearer <key>` (exactly one such header) checked against the key store.
fn authenticate<'a>(keys: &'a KeyStore, headers: &HeaderMap) -> Option<&'a str> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() || value.len() > MAX_AUTHORIZATION_LEN {
        return None;
    }
    let value = value.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.contains(' ') {
        return None;
    }
    keys.authenticate(token)
}

async fn read_json_body<B>(state: &AppState, req: Request<B>) -> Result<serde_json::Value, ApiError>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::UnsupportedMediaType);
    }
    let limit = state.limits.max_body_bytes;
    if let Some(len) = req.headers().get(header::CONTENT_LENGTH)
        && len
            .to_str()
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .is_some_and(|n| n > limit)
    {
        return Err(ApiError::BodyTooLarge { limit });
    }
    let limited = http_body_util::Limited::new(req.into_body(), limit);
    let secs = state.limits.body_read_timeout_secs;
    let collected = tokio::time::timeout(std::time::Duration::from_secs(secs), limited.collect())
        .await
        .map_err(|_| ApiError::BodyTimeout { secs })?;
    let bytes = match collected {
        Ok(c) => c.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return Err(ApiError::BodyTooLarge { limit });
        }
        Err(_) => {
            return Err(ApiError::InvalidRequest {
                message: "The request body could not be read.".into(),
                param: None,
                code: "invalid_body",
            });
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| ApiError::InvalidRequest {
        message: format!("The request body is not valid JSON: {e}."),
        param: None,
        code: "invalid_json",
    })
}
