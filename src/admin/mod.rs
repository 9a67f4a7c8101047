//! The admin listener, on its own address (loopback by default), apart from proxied traffic:
//! `/healthz`, `/readyz`, `/metrics`, `GET /admin/config` and `POST /admin/reload`.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use crate::budget::Ledger;
use crate::config::reload::{Reloader, Trigger};
use crate::config::Live;
use crate::openai::ApiError;
use crate::telemetry::metrics::Metrics;

/// The admin listener's handles: the running config, the ledger, the metrics registry and the
/// reloader (nothing of the proxy).
pub struct Admin {
    pub config: Live,
    pub ledger: Arc<dyn Ledger>,
    pub metrics: Arc<Metrics>,
    pub reloader: Arc<Reloader>,
}

/// Compares without leaking, through timing, how much of the token (or how long it) is:
/// the digests are compared, in full.
fn same(a: &[u8], b: &[u8]) -> bool {
    use sha2::Digest;
    let (a, b) = (sha2::Sha256::digest(a), sha2::Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

impl Admin {
    /// `/admin/*` needs `Authorization: Bearer <token>` when a token is configured.
    fn authorized(&self, session: &ServerSession) -> bool {
        let cfg = self.config.load();
        let Some(token) = &cfg.server.admin_token else {
            return true;
        };
        let given = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::auth::bearer)
            .unwrap_or("");
        same(given.as_bytes(), token.expose().as_bytes())
    }

    /// `/admin/budgets/...`
    async fn budgets(&self, method: &Method, path: &str, query: &str) -> Response<Vec<u8>> {
        use crate::budget::policy::{Subject, Window};
        let cfg = self.config.load();
        let policy = &cfg.budgets;
        let now = crate::budget::now_unix();
        let ledger = &*self.ledger;
        let param = |k: &str| {
            query.split('&').find_map(|kv| {
                let (a, b) = kv.split_once('=')?;
                (a == k).then(|| crate::openai::percent_decode(b).into_owned())
            })
        };
        let rest = path.trim_start_matches("/admin/budgets");
        let segs: Vec<String> = rest
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| crate::openai::percent_decode(s).into_owned())
            .collect();
        let seg: Vec<&str> = segs.iter().map(String::as_str).collect();
        match (method, seg.as_slice()) {
            (&Method::GET, ["users", u]) => json_response(
                StatusCode::OK,
                &crate::budget::view(ledger, policy, &Subject::User(u.to_string()), now).await,
            ),
            (&Method::GET, ["teams", t]) => {
                if !policy.teams.contains_key(*t) {
                    return error(StatusCode::NOT_FOUND, &format!("no team {t:?} in the config"));
                }
                json_response(
                    StatusCode::OK,
                    &crate::budget::view(ledger, policy, &Subject::Team(t.to_string()), now).await,
                )
            }
            (&Method::GET, ["top"]) => {
                let window = match Window::parse(&param("window").unwrap_or_else(|| "daily".into())) {
                    Ok(w) => w,
                    Err(e) => return error(StatusCode::BAD_REQUEST, &e),
                };
                let limit = param("limit").and_then(|l| l.parse().ok()).unwrap_or(10usize).min(1000);
                json_response(StatusCode::OK, &crate::budget::top(ledger, policy, window, limit, now).await)
            }
            (&Method::POST, ["users", u, "reset"]) => {
                let Some(w) = param("window") else {
                    return error(StatusCode::BAD_REQUEST, "say which window: ?window=daily");
                };
                let window = match Window::parse(&w) {
                    Ok(w) => w,
                    Err(e) => return error(StatusCode::BAD_REQUEST, &e),
                };
                let subject = Subject::User(u.to_string());
                ledger.reset(&subject, window, policy, now).await;
                log::info!("admin: reset the {window} spend of user {u:?}");
                json_response(
                    StatusCode::OK,
                    &crate::budget::view(ledger, policy, &subject, now).await,
                )
            }
            _ => error(
                StatusCode::NOT_FOUND,
                "budget routes: GET users/{user}, GET teams/{team}, GET top?window=daily&limit=10, \
                 POST users/{user}/reset?window=daily",
            ),
        }
    }
}

fn error(status: StatusCode, msg: &str) -> Response<Vec<u8>> {
    let kind = if status == StatusCode::UNAUTHORIZED {
        "authentication_error"
    } else {
        "invalid_request_error"
    };
    let body = ApiError::new(status.as_u16(), kind, msg).body();
    bytes_response(status, "application/json", body.to_vec())
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let query = session.req_header().uri.query().unwrap_or("").to_string();
        let protected = {
            let cfg = self.config.load();
            path.starts_with("/admin/")
                || (path == "/metrics" && cfg.server.protect_metrics)
                || (matches!(path.as_str(), "/healthz" | "/readyz") && cfg.server.protect_health)
        };
        if protected && !self.authorized(session) {
            return error(
                StatusCode::UNAUTHORIZED,
                "The admin API needs Authorization: Bearer <token> (server.admin_token_env).",
            );
        }
        if path.starts_with("/admin/budgets") {
            return self.budgets(&method, &path, &query).await;
        }
        match (method, path.as_str()) {
            (Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (Method::GET, "/readyz") => {
                // Ready once a config is loaded (always, after start-up), unless the budget
                // store is unreachable and calls would be refused for it (fail_closed); with
                // fail_open, ready but degraded.
                let cfg = self.config.load();
                let down = self.ledger.store_up() == Some(false);
                let (status, state) = match (down, cfg.budgets.ledger.fail_open) {
                    (false, _) => (StatusCode::OK, "ready"),
                    (true, true) => (
                        StatusCode::OK,
                        "ready, degraded: budget store unreachable, calls go uncapped (fail_open)",
                    ),
                    (true, false) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: budget store unreachable, capped calls are refused (fail_closed)",
                    ),
                };
                // The file failing is degraded, never unready: caps are decided in memory.
                let file = if self.ledger.file_writable() == Some(false) {
                    ", degraded: ledger file not writable, spend waits in memory"
                } else {
                    ""
                };
                text(
                    status,
                    &format!(
                        "{state}{file} pid={} upstream={} config={}\n",
                        std::process::id(),
                        cfg.upstream.url.host_header,
                        cfg.hash
                    ),
                )
            }
            (Method::GET, "/metrics") => Response::builder()
                .status(StatusCode::OK)
                .header(
                    http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )
                .body(self.metrics.encode())
                .expect("static response builds"),
            (Method::GET, "/admin/config") => {
                let cfg = self.config.load();
                json_response(
                    StatusCode::OK,
                    &json!({
                        "hash": cfg.hash,
                        "files": cfg.files,
                        "restart_required": self.reloader.restart_required(),
                    }),
                )
            }
            (Method::POST, "/admin/reload") => {
                let r = Arc::clone(&self.reloader);
                match tokio::task::spawn_blocking(move || r.reload(Trigger::Admin)).await {
                    Ok(Ok(a)) => json_response(
                        StatusCode::OK,
                        &json!({
                            "status": "reloaded",
                            "previous": a.previous,
                            "hash": a.hash,
                            "changed": a.changed,
                            "restart_required": a.restart_required,
                        }),
                    ),
                    Ok(Err(e)) => {
                        let body = ApiError::new(
                            400,
                            "invalid_config",
                            format!("{e}\nThe previous config is still running."),
                        )
                        .code("config_rejected")
                        .body();
                        bytes_response(StatusCode::BAD_REQUEST, "application/json", body.to_vec())
                    }
                    Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "reload failed\n"),
                }
            }
            (_, "/healthz" | "/readyz" | "/metrics" | "/admin/config") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n")
            }
            (_, "/admin/reload") => text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"),
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: /healthz, /readyz, /metrics, /admin/config, POST /admin/reload\n",
            ),
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Vec<u8>> {
    bytes_response(
        status,
        "text/plain; charset=utf-8",
        body.as_bytes().to_vec(),
    )
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<Vec<u8>> {
    let mut body = serde_json::to_vec(v).expect("JSON serializes");
    body.push(b'\n');
    bytes_response(status, "application/json", body)
}

fn bytes_response(status: StatusCode, ctype: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, ctype)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .expect("static response builds")
}
