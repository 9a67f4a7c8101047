//! Turns what a request's context saw into its one [`UsageRecord`]: how the call ended, the
//! usage (reported, or estimated for a cut-off call), and its cost.

use pingora::prelude::Session;
use pingora::{Error, ErrorSource, ErrorType};

use super::Ctx;
use crate::meter::{Outcome, Usage, UsageRecord, UsageSource};
use crate::openai::response::Observed;

pub(super) fn build(session: &Session, e: Option<&Error>, ctx: &mut Ctx) -> UsageRecord {
    let status = session.response_written().map_or(0, |r| r.status.as_u16());
    let outcome = outcome(e, ctx, status);
    let observed = ctx
        .response
        .tap
        .as_mut()
        .map(|t| t.finish())
        .unwrap_or_default();
    let (usage, usage_source) = usage(ctx, &observed, outcome);
    let web_searches_source = observed
        .web_searches()
        .filter(|_| usage_source != UsageSource::None)
        .map(|(_, s)| s);
    let meta = ctx.meta.as_ref();
    let model = meta.and_then(|m| m.model.clone());
    let price = ctx
        .cfg
        .pricing
        .lookup(observed.response_model.as_deref(), model.as_deref());
    // The upstream's error is logged by type and code only: some providers echo request
    // content in their messages.
    let error = ctx
        .rejection
        .as_ref()
        .or(ctx.failure.as_ref())
        .map(|a| a.message.clone())
        .or_else(|| observed.upstream_error.clone())
        .or_else(|| e.map(|e| format!("{:?}: {}", e.esource(), e.etype().as_str())))
        .or_else(|| observed.tap_error.clone())
        .or_else(|| ctx.meta_error.clone());
    // An upstream that refuses `stream_options` (some do) is refusing what tokentap added.
    let error = match error {
        Some(e) if ctx.body.usage_injected && observed.upstream_error_names_stream_options => {
            log::warn!(
                "{}: the upstream refused the call naming stream_options, which tokentap added \
                 to ask for the stream's usage; turn usage injection off for this upstream \
                 (upstream.inject_stream_usage = false) or model \
                 (upstream.inject_stream_usage_except)",
                ctx.request_id
            );
            Some(format!(
                "{e}; it names stream_options, which tokentap added (usage injection: see \
                 upstream.inject_stream_usage)"
            ))
        }
        e => e,
    };
    let req = session.req_header();
    // Only sampled calls are traced.
    let trace = ctx
        .trace
        .take()
        .filter(|t| t.sampled)
        .map(|t| t.into_context());
    let url = ctx.upstream_url();
    let (upstream_host, upstream_port, url_base) =
        (url.host.clone(), url.port, url.url_base.clone());
    let time_to_first_chunk = ctx
        .times
        .first_chunk
        .filter(|_| meta.is_some_and(|m| m.stream))
        .map(|t| t.saturating_duration_since(ctx.times.sent_at.unwrap_or(ctx.times.start)));
    UsageRecord {
        request_id: std::mem::take(&mut ctx.request_id),
        started_at: ctx.times.started_at,
        method: req.method.as_str().to_string(),
        path: req.uri.path().to_string(),
        api: ctx.api,
        path_class: match ctx.api {
            Some(_) => "",
            None => crate::openai::path_class(ctx.dialect_path(req.uri.path())),
        },
        provider: ctx
            .api
            .map(|api| ctx.cfg.traces.providers.of_call(api, model.as_deref())),
        model,
        response_model: observed.response_model,
        response_id: observed.response_id,
        user: meta
            .and_then(|m| m.user.clone())
            .or_else(|| ctx.identity.as_ref().map(|i| i.user.clone())),
        stream: meta.is_some_and(|m| m.stream),
        max_tokens: meta.and_then(|m| m.output_cap()),
        tools: meta.map(|m| m.tools.clone()).unwrap_or_default(),
        web_search_requested: meta.is_some_and(|m| m.web_search_requested()),
        status,
        upstream_status: ctx.upstream.status,
        outcome,
        usage,
        usage_source,
        web_searches_source,
        usage_injected: ctx.body.usage_injected,
        temperature: meta.and_then(|m| m.temperature),
        top_p: meta.and_then(|m| m.top_p),
        budget_decision: ctx.budget_decision,
        upstream_error_type: observed.upstream_error_type,
        time_to_first_chunk,
        upstream_host,
        upstream_port,
        url_base,
        captured_input: ctx.body.captured.take(),
        // Nothing captured (an error answer, say): nothing to show.
        captured_output: observed.captured.filter(|t| !t.is_empty()),
        cost: price.map(|p| p.cost(ctx.api, &usage)),
        upstream_cost_usd: observed.upstream_cost_usd,
        finish_reasons: observed.finish_reasons,
        search_ran: observed.search_ran,
        search_results: observed.search_results,
        warning: observed.warning,
        request_bytes: ctx.body.bytes,
        response_bytes: ctx.response.bytes,
        content_chunks: observed.content_chunks,
        ttfb: ctx.times.ttfb,
        ttft: ctx.times.ttft,
        generation: ctx.times.first_token.map(|t| t.elapsed()),
        duration: ctx.times.start.elapsed(),
        error,
        trace,
    }
}

fn outcome(e: Option<&Error>, ctx: &Ctx, status: u16) -> Outcome {
    use ErrorType::*;
    if ctx.rejection.is_some() {
        return Outcome::Rejected;
    }
    let Some(e) = e else {
        // Pingora reports an error for every response it could not finish (bodiless ones,
        // HEAD, 204 and 304, end with their head and never reach the body filter).
        return match ctx.upstream.status.unwrap_or(status) {
            s if s >= 400 => Outcome::UpstreamError,
            _ => Outcome::Complete,
        };
    };
    match (e.esource(), e.etype()) {
        (ErrorSource::Downstream, WriteError | ReadError | ConnectionClosed)
        | (ErrorSource::Downstream, ReadTimedout | WriteTimedout) => Outcome::ClientDisconnected,
        (ErrorSource::Downstream, _) => Outcome::Rejected,
        (ErrorSource::Upstream, ConnectTimedout | ReadTimedout | WriteTimedout) => Outcome::Timeout,
        // Something that is not an HTTP answer: no API answered, nothing was generated.
        (ErrorSource::Upstream, InvalidHTTPHeader | H1Error | InvalidH2 | H2Error)
            if ctx.upstream.status.is_none() =>
        {
            Outcome::UpstreamError
        }
        (ErrorSource::Upstream, _) => {
            if ctx.upstream.status.is_some() || ctx.body.released {
                // The upstream had the request; the connection broke before the answer ended.
                Outcome::UpstreamReset
            } else {
                Outcome::UpstreamError
            }
        }
        _ => Outcome::UpstreamError,
    }
}

/// The usage of the call. What the upstream reported always wins (an explicit zero is a real
/// zero). Without it, a chat call the upstream processed is estimated: the prompt from the
/// request, the completion from the content delivered; never zero when content was delivered.
fn usage(ctx: &Ctx, obs: &Observed, outcome: Outcome) -> (Usage, UsageSource) {
    if let Some(u) = obs.reported_usage() {
        return (u, UsageSource::Reported);
    }
    let Some(meta) = ctx.meta.as_ref() else {
        return (Usage::default(), UsageSource::None);
    };
    let processed = match outcome {
        Outcome::Complete => ctx.upstream.status.is_some_and(|s| s < 400),
        Outcome::UpstreamReset | Outcome::ClientDisconnected | Outcome::Timeout => {
            ctx.body.released && ctx.upstream.status.is_none_or(|s| s < 400)
        }
        Outcome::UpstreamError | Outcome::Rejected => false,
    };
    if !processed {
        return (Usage::default(), UsageSource::None);
    }
    let usage = obs.estimate(meta.prompt_text_bytes);
    (usage, UsageSource::Estimated)
}
