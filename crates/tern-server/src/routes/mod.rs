//! Request handlers: generation (chat and completions) and administration (models,
//! adapters, health, metrics).

pub mod admin;
pub mod generation;

use crate::error::ApiError;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;

/// `axum::Json`, with its rejections answered in the OpenAI error shape.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(e) => {
                let status = e.status();
                let code = match status {
                    StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
                    _ => "invalid_json",
                };
                let msg = match status {
                    StatusCode::PAYLOAD_TOO_LARGE => {
                        "the request body is over the server's size limit (--max-body-bytes)"
                            .to_string()
                    }
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                        "send the body as JSON with `Content-Type: application/json`".to_string()
                    }
                    _ => format!("bad request body: {}", e.body_text()),
                };
                let status = if status == StatusCode::UNPROCESSABLE_ENTITY {
                    // A body that is JSON but not the expected shape is still a bad request.
                    StatusCode::BAD_REQUEST
                } else {
                    status
                };
                Err(ApiError::new(status, "invalid_request_error", code, msg))
            }
        }
    }
}
