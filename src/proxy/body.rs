//! A chat request's body: read whole (before the upstream is contacted when Pingora can
//! replay it, else held after the head went), inspected, decided on, and made ready with
//! tokentap's splices; how it is framed upstream.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header;
use pingora::http::RequestHeader;
use pingora::prelude::Session;
use pingora::{Error, Result};

use super::*;

impl TokenTap {
    /// A piece of the request body: held (chat) or passed on, and inspected at its end.
    pub(super) fn on_request_body(
        &self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(b) = body.as_ref() {
            ctx.body.bytes += b.len() as u64;
            let limit = ctx.cfg.limits.max_request_body_bytes;
            if ctx.body.bytes > limit as u64 {
                ctx.body.held = Vec::new();
                return Err(self.reject(ctx, too_large(limit)));
            }
        }
        let Some(api) = ctx.api.filter(|_| !ctx.body.released) else {
            return Ok(());
        };
        if let Some(b) = body.take() {
            if !b.is_empty() {
                ctx.body.held.push(b);
            }
            // An empty chunk is not written upstream; the body goes out in one piece below.
            *body = Some(Bytes::new());
        }
        if end_of_stream {
            let whole = match ctx.body.held.len() {
                0 => Bytes::new(),
                1 => ctx.body.held.pop().unwrap_or_default(),
                _ => Bytes::from(std::mem::take(&mut ctx.body.held).concat()),
            };
            let limit = ctx.cfg.limits.max_request_body_bytes;
            match request::inspect_encoded(api, &whole, ctx.body.encoding.as_deref(), limit) {
                Ok(m) => ctx.meta = Some(m),
                Err(e) => ctx.meta_error = Some(e.0),
            }
            // Content goes into the span only when the operator opted in (and is readable
            // as sent: compressed bodies are not captured).
            // (Its `messages` only, where inspection found them: what the span shows.)
            if ctx.capture_content() && ctx.body.plain() {
                let messages = ctx.meta.as_ref().and_then(|m| m.spans.messages.clone());
                ctx.body.captured = Some(match messages {
                    Some(r) => whole.slice(r),
                    None => whole.clone(),
                });
            }
            // The decision point: everything about the call is known, nothing reached the
            // upstream yet. The decision follows (`decide_call`), then the body is made ready
            // (`prepare_forward`) and released.
            ctx.body.decide = true;
            ctx.body.forward = Some(whole);
        }
        Ok(())
    }

    /// The body that goes upstream: the client's bytes, with the splices tokentap makes
    /// (`openai::edit`) where it may: the key's user in place of another (user_mismatch =
    /// "overwrite"), and `stream_options.include_usage` for a stream whose client did not ask
    /// for its usage. Only a body read as sent (not compressed) is edited, and only when the
    /// request head went upstream framed for it (its length known, or chunked).
    pub(super) fn prepare_forward(&self, ctx: &mut Ctx) -> std::result::Result<(), Box<Error>> {
        use crate::openai::edit;
        let (Some(whole), Some(meta)) = (ctx.body.forward.as_ref(), ctx.meta.as_ref()) else {
            return Ok(());
        };
        let plain = ctx.body.plain();
        let editable = plain && (ctx.body.read_ahead || ctx.body.may_edit);
        let mut edits = Vec::new();
        if std::mem::take(&mut ctx.body.rewrite_user) {
            match ctx.identity.as_ref().filter(|_| editable) {
                Some(id) => edits.extend(edit::set_user(meta, &id.user)),
                // Never send the body naming someone else.
                None => return Err(self.reject(ctx, user_mismatch())),
            }
        }
        let cfg = &ctx.cfg;
        if editable
            && injectable(meta.api)
            && meta.stream
            && meta.include_usage != Some(true)
            && cfg.upstream.stream_usage.injects(meta.model.as_deref())
        {
            if let edit::UsageAsk::Edit(e) = edit::ask_for_usage(whole, meta) {
                edits.push(e);
                ctx.body.usage_injected = true;
            }
        }
        if !edits.is_empty() {
            ctx.body.forward = Some(Bytes::from(edit::apply(whole, edits)));
        }
        Ok(())
    }

    /// How a chat body is framed upstream. Read ahead: its final length is known (and set,
    /// when an edit changed it). Held: the head goes before the body is read, so while
    /// tokentap may still edit the body (usage injection, user overwrite) it goes chunked.
    /// A stream whose usage tokentap asks for must come back in a coding tokentap can read.
    pub(super) fn frame_body(&self, req: &mut RequestHeader, ctx: &mut Ctx) -> Result<()> {
        let readable = |req: &mut RequestHeader| -> Result<()> {
            let accepted = req
                .headers
                .get(header::ACCEPT_ENCODING)
                .and_then(|v| v.to_str().ok())
                .and_then(crate::openai::readable_accept_encoding);
            if let Some(v) = accepted {
                req.insert_header(header::ACCEPT_ENCODING, v)?;
            }
            Ok(())
        };
        if ctx.body.read_ahead {
            if let Some(b) = ctx
                .body
                .forward
                .as_ref()
                .filter(|b| b.len() as u64 != ctx.body.bytes)
            {
                req.insert_header(header::CONTENT_LENGTH, b.len().to_string())?;
            }
            if ctx.body.usage_injected {
                readable(req)?;
            }
            return Ok(());
        }
        let cfg = &ctx.cfg;
        let plain = ctx.body.plain();
        let api = ctx.api.unwrap_or_default();
        let may_inject = cfg.upstream.stream_usage.inject && injectable(api);
        // (Messages bodies are never rewritten: their user is no claim.)
        let may_rewrite = cfg.auth.mode == crate::auth::Mode::VirtualKeys
            && cfg.auth.mismatch == crate::auth::Mismatch::Overwrite
            && api != Api::Messages;
        if plain && (may_inject || may_rewrite) {
            ctx.body.may_edit = true;
            req.remove_header(&header::CONTENT_LENGTH);
            req.insert_header(header::TRANSFER_ENCODING, "chunked")?;
            if may_inject {
                readable(req)?;
            }
        }
        Ok(())
    }

    /// Reads the whole (small) body before the upstream is contacted: it is inspected and
    /// decided on first, and Pingora's replay buffer, which holds it, makes sure it is sent.
    /// Also returns how long it waited for the client.
    pub(super) async fn read_body(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> (Result<bool>, Duration) {
        session.as_mut().enable_retry_buffering();
        let mut waited = Duration::ZERO;
        loop {
            let t = Instant::now();
            let read = session.read_request_body().await;
            waited += t.elapsed();
            let mut piece = match read {
                Ok(p) => p,
                Err(e) => return (Err(e.into_down()), waited),
            };
            let end = piece.is_none();
            if let Err(e) = self.on_request_body(&mut piece, end, ctx) {
                return (Err(e), waited);
            }
            if end {
                return (Ok(false), waited);
            }
        }
    }
}

/// The dialects whose streams send usage only when asked (`stream_options.include_usage`),
/// and take the asking.
fn injectable(api: Api) -> bool {
    matches!(api, Api::ChatCompletions | Api::Completions)
}

/// The most of a request body Pingora replays to the upstream (its retry buffer,
/// `BODY_BUF_LIMIT` in pingora-core 0.9): the most tokentap reads before contacting it.
const REPLAY_LIMIT: u64 = 64 * 1024;

/// Whether a chat body is read whole before the upstream is contacted: one of a declared
/// length Pingora can replay, from a client that does not wait for `100 Continue`. (Others
/// are held in the body filter, after the head went upstream.)
pub(super) fn read_ahead(session: &Session) -> bool {
    let h = &session.req_header().headers;
    let declared = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    declared.is_some_and(|n| n > 0 && n <= REPLAY_LIMIT)
        && !h.contains_key(header::TRANSFER_ENCODING)
        && !h.contains_key(header::EXPECT)
}

pub(super) fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        413,
        "invalid_request_error",
        format!(
            "Request body is larger than this proxy accepts ({limit} bytes). Send a smaller \
             request, or ask the operator to raise limits.max_request_body_bytes."
        ),
    )
    .code("request_too_large")
}
