//! The one error type of the API: each variant maps to a status and a generic client message
//! in OpenAI's error shape. Causes go to the log only; nothing internal reaches a client.

use hyper::StatusCode;
use serde_json::json;

/// Retry-After of every 503 (a full server, a full queue, a pipeline stage down): long enough
/// for a slot to free or a stage to reconnect (within a second with the link's backoff), short
/// enough that clients do not wait on an idle server.
pub const RETRY_AFTER_SECS: u64 = 1;

#[derive(Debug)]
pub enum ApiError {
    /// No or wrong credentials, whatever the path or method.
    Unauthorized,
    NotFound,
    MethodNotAllowed {
        allow: &'static str,
    },
    /// A request field is invalid; `param` names it.
    InvalidRequest {
        message: String,
        param: Option<&'static str>,
        code: &'static str,
    },
    UnsupportedMediaType,
    /// A configured limit was exceeded; `limit` is its configuration key.
    BodyTooLarge {
        limit: usize,
    },
    HeadersTooLarge {
        message: String,
    },
    /// The body did not arrive within `limits.body_read_timeout_secs`.
    BodyTimeout {
        secs: u64,
    },
    RateLimited {
        retry_after_secs: u64,
    },
    Overloaded {
        what: &'static str,
    },
    ModelNotFound {
        model: String,
    },
    /// A pipeline stage on another node is down; the request may be retried shortly.
    StageUnavailable,
    /// Something failed inside; the details were logged under the request id.
    Internal,
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: &'static str) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: Some(param),
            code: "invalid_value",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NotFound | Self::ModelNotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Overloaded { .. } | Self::StageUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Short label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::InvalidRequest { .. } => "invalid_request",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::BodyTooLarge { .. } => "limits.max_body_bytes",
            Self::HeadersTooLarge { .. } => "limits.headers",
            Self::BodyTimeout { .. } => "limits.body_read_timeout_secs",
            Self::RateLimited { .. } => "limits.rate_limit_per_minute",
            Self::Overloaded { what, .. } => what,
            Self::ModelNotFound { .. } => "model_not_found",
            Self::StageUnavailable => "pipeline_unavailable",
            Self::Internal => "internal",
        }
    }

    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after_secs } => Some(*retry_after_secs),
            Self::Overloaded { .. } | Self::StageUnavailable => Some(RETRY_AFTER_SECS),
            _ => None,
        }
    }

    /// The OpenAI error shape: `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(&self) -> serde_json::Value {
        json!({ "error": {
            "message": self.message(),
            "type": self.kind(),
            "param": self.param(),
            "code": self.code(),
        } })
    }

    /// OpenAI's error `type`.
    fn kind(&self) -> &'static str {
        match self {
            Self::RateLimited { .. } => "rate_limit_error",
            Self::Overloaded { .. } | Self::StageUnavailable | Self::Internal => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The request parameter at fault, named as the endpoint names it.
    fn param(&self) -> Option<&'static str> {
        match self {
            Self::InvalidRequest { param, .. } => *param,
            Self::ModelNotFound { .. } => Some("model"),
            _ => None,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized => "invalid_api_key",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed { .. } => "method_not_allowed",
            Self::InvalidRequest { code, .. } => code,
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::HeadersTooLarge { .. } => "headers_too_large",
            Self::BodyTimeout { .. } => "body_timeout",
            Self::RateLimited { .. } => "rate_limit_exceeded",
            Self::Overloaded { .. } => "overloaded",
            Self::ModelNotFound { .. } => "model_not_found",
            Self::StageUnavailable => "pipeline_unavailable",
            Self::Internal => "internal_error",
        }
    }

    /// What went wrong, naming the configuration key of a limit and when to retry.
    fn message(&self) -> String {
        match self {
            Self::Unauthorized => {
                "A valid API key is required: send `Authorization: Bearer <key>`.".into()
            }
            Self::NotFound => "Not found.".into(),
            Self::MethodNotAllowed { allow } => {
                format!("Method not allowed; this route accepts {allow}.")
            }
            Self::InvalidRequest { message, .. } | Self::HeadersTooLarge { message } => {
                message.clone()
            }
            Self::UnsupportedMediaType => "Content-Type must be application/json.".into(),
            Self::BodyTooLarge { limit } => {
                format!("Request body exceeds limits.max_body_bytes ({limit} bytes).")
            }
            Self::BodyTimeout { secs } => format!(
                "The request body did not arrive within limits.body_read_timeout_secs ({secs} s)."
            ),
            Self::RateLimited { retry_after_secs } => format!(
                "Rate limit for this key (limits.rate_limit_per_minute) reached; retry in \
                 {retry_after_secs} s."
            ),
            Self::Overloaded { what } => {
                format!("Server is at {what}; retry in {RETRY_AFTER_SECS} s.")
            }
            Self::ModelNotFound { model } => format!(
                "The model {model:?} does not exist; GET /v1/models lists the models served."
            ),
            Self::StageUnavailable => format!(
                "The model is temporarily unavailable (a pipeline stage is down); retry in \
                 {RETRY_AFTER_SECS} s."
            ),
            Self::Internal => "The server failed to process the request.".into(),
        }
    }
}
