//! Errors in the OpenAI shape: `{"error": {"message", "type", "code"}}` with the matching
//! HTTP status. Every failure a client can cause ends here, never in a panic.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tern::TernError;

/// An error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// One line naming what is wrong and what to do.
    pub message: String,
    /// OpenAI's error type (`invalid_request_error`, `authentication_error`, ...).
    pub kind: &'static str,
    /// A machine-readable code (`model_not_found`, `rate_limit_exceeded`, ...).
    pub code: &'static str,
}

impl ApiError {
    /// A 400 for a request that cannot be served as given.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            message,
        )
    }

    /// Any status.
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            code,
        }
    }

    /// A 404 for a model or adapter name that is not served.
    pub fn model_not_found(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            message,
        )
    }

    /// The body of the error, also sent as an SSE event when a stream fails midway.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": { "message": self.message, "type": self.kind, "code": self.code }
        })
    }
}

impl From<TernError> for ApiError {
    fn from(e: TernError) -> Self {
        let msg = e.to_string();
        match e {
            TernError::Busy { .. } => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
                msg,
            ),
            TernError::ShuttingDown | TernError::Cancelled(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "shutting_down",
                msg,
            ),
            TernError::UnknownAdapter { .. } => Self::model_not_found(msg),
            TernError::InvalidArgument(_) | TernError::Template(_) | TernError::Tokenizer(_) => {
                Self::bad_request("invalid_request", msg)
            }
            // Every way an adapter's files can be missing, unreadable, corrupt or unfit for
            // the base model: the files are the client's input (a path it named), so a 400,
            // like a missing file; only faults of the server itself are 500s.
            TernError::Adapter { .. }
            | TernError::MissingFile { .. }
            | TernError::Io { .. }
            | TernError::Config { .. }
            | TernError::WrongShape { .. }
            | TernError::MissingTensor { .. }
            | TernError::UnknownDtype { .. }
            | TernError::Truncated { .. }
            | TernError::HeaderPastEnd { .. }
            | TernError::HeaderNotJson { .. }
            | TernError::BadOffsets { .. }
            | TernError::OverlappingTensors { .. }
            | TernError::Pickle { .. }
            | TernError::Gguf { .. }
            | TernError::UnsupportedArchitecture { .. }
            | TernError::Hub { .. } => Self::bad_request("invalid_adapter", msg),
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
                msg,
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS
            || self.status == StatusCode::SERVICE_UNAVAILABLE
        {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}
