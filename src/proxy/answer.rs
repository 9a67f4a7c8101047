//! The answers tokentap gives itself, in the error shape of the call's dialect (OpenAI's, or
//! Anthropic's for Messages): refusals, and the errors it maps Pingora's to.

use std::time::Duration;

use http::header;
use pingora::http::ResponseHeader;
use pingora::prelude::Session;
use pingora::{Error, ErrorSource, ErrorType, Result};

use super::*;

/// 403 for a body whose `user` names someone other than the virtual key's user.
pub(super) fn user_mismatch() -> ApiError {
    ApiError::new(
        403,
        "invalid_request_error",
        "The request's `user` is not the user of this API key.",
    )
    .param("user")
    .code("user_mismatch")
}

/// The answer for a Pingora error tokentap did not raise itself.
pub(super) fn deadline_passed(d: Duration) -> ApiError {
    ApiError::new(
        504,
        "upstream_error",
        format!(
            "The call did not complete within tokentap's deadline ({} ms).",
            d.as_millis()
        ),
    )
    .code("deadline_exceeded")
}

pub(super) fn failure_for(e: &Error) -> Option<ApiError> {
    use ErrorType::*;
    let timeout = |what: &str| {
        ApiError::new(
            504,
            "upstream_error",
            format!("The upstream did not {what} in time. Retry later."),
        )
        .code("upstream_timeout")
    };
    match (e.esource(), e.etype()) {
        (_, HTTPStatus(code)) => Some(ApiError::new(*code, "api_error", e.to_string())),
        (ErrorSource::Downstream, WriteError | ReadError | ConnectionClosed) => None,
        // The client stopped sending its request (limits.client_idle_timeout_ms).
        (ErrorSource::Downstream, ReadTimedout) => Some(
            ApiError::new(
                408,
                "invalid_request_error",
                "The request did not arrive in time (the client went quiet).",
            )
            .code("client_timeout"),
        ),
        (ErrorSource::Downstream, WriteTimedout) => None,
        (ErrorSource::Downstream, _) => Some(ApiError::new(
            400,
            "invalid_request_error",
            format!(
                "tokentap could not read the request: {}",
                e.etype().as_str()
            ),
        )),
        (ErrorSource::Upstream, ConnectTimedout) => Some(timeout("accept the connection")),
        (ErrorSource::Upstream, ReadTimedout) => Some(timeout("answer")),
        (ErrorSource::Upstream, WriteTimedout) => Some(timeout("read the request")),
        (ErrorSource::Upstream, _) => Some(
            ApiError::new(
                502,
                "upstream_error",
                format!(
                    "tokentap could not get a complete answer from the upstream ({}). Retry later.",
                    e.etype().as_str()
                ),
            )
            .code("upstream_unavailable"),
        ),
        _ => Some(ApiError::new(
            500,
            "api_error",
            "tokentap failed internally while proxying this request.",
        )),
    }
}

/// Writes tokentap's own answer, in the error shape of the call's dialect.
pub(super) async fn write_error(
    session: &mut Session,
    e: &ApiError,
    api: Option<Api>,
) -> Result<()> {
    let body = e.body_for(api);
    let mut resp = ResponseHeader::build(e.status, Some(4))?;
    resp.insert_header(header::CONTENT_TYPE, "application/json")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(header::CONNECTION, "close")?;
    if let Some(s) = e.retry_after {
        resp.insert_header(header::RETRY_AFTER, s.to_string())?;
    }
    for (k, v) in &e.headers {
        resp.insert_header(*k, v)?;
    }
    session.set_keepalive(None);
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}
