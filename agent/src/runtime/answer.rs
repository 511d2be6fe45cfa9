//! The errors the front port answers clients with itself (no model, refused, over a limit), shaped like
//! OpenAI's (`{"error": {"code", "message", "type"}}`) so client libraries show the message.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::header::{self, HeaderValue};

/// What `Retry-After` says on a 503 (no model served yet, a swap's gap, too many connections).
const RETRY_AFTER_SECS: &str = "5";

pub fn error_response(status: StatusCode, kind: &str, message: &str) -> Response {
    let body = serde_json::json!({"error": {"code": status.as_u16(), "message": message, "type": kind}});
    let mut response = (status, axum::Json(body)).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
    }
    response
}
