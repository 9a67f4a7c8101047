//! The admin listener, on its own address (loopback by default), apart from proxied traffic:
//! `/healthz`, `/readyz`, `/metrics`, `GET /admin/config`, `POST /admin/reload`, the budget
//! routes, and the admin page (`/`, its files under `/ui/`, its JSON under `/admin/api/`).
//!
//! With an admin token, `/admin/…` needs it: `Authorization: Bearer <token>`, or the page's
//! session cookie (made from the token at `POST /admin/login`; `HttpOnly`, `SameSite=Strict`).
//! A state-changing request from a browser must come from the admin listener's own origin,
//! and, when the cookie authenticates it, carry the session's CSRF value.

mod api;
mod session;
mod ui;

use session::{cookie, header, same, Sessions, COOKIE};

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
    /// The metered calls in flight (the live view).
    pub live: Arc<crate::telemetry::live::LiveCalls>,
    /// The span exporter's counters (the status view).
    pub traces: crate::telemetry::traces::TraceCounters,
    pub started: std::time::Instant,
    /// The page's logins.
    pub sessions: Sessions,
}

/// The header a cookie-authenticated state change carries.
const CSRF_HEADER: &str = "x-tokentap-csrf";

/// How a request to `/admin/…` is authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// No admin token is configured.
    Open,
    Bearer,
    Cookie,
    Denied,
}

impl Admin {
    /// `/admin/*` needs `Authorization: Bearer <token>`, or the page's session cookie, when a
    /// token is configured.
    fn access(&self, session: &ServerSession) -> Access {
        let cfg = self.config.load();
        let Some(token) = &cfg.server.admin_token else {
            return Access::Open;
        };
        let token = token.expose();
        if let Some(given) = header(session, "authorization").and_then(crate::auth::bearer) {
            return if same(given.as_bytes(), token.as_bytes()) {
                Access::Bearer
            } else {
                Access::Denied
            };
        }
        match cookie(session, COOKIE) {
            Some(id) if self.sessions.valid(id, token, crate::budget::now_unix()) => Access::Cookie,
            _ => Access::Denied,
        }
    }

    /// The CSRF value of the request's session (`None` without one).
    fn csrf(&self, session: &ServerSession) -> Option<String> {
        let cfg = self.config.load();
        let token = cfg.server.admin_token.as_ref()?;
        let id = cookie(session, COOKIE)?;
        Some(Sessions::csrf(id, token.expose()))
    }

    /// `GET /admin/api/session`: what the page needs to know before it asks for data.
    fn session_info(&self, session: &ServerSession, access: Access) -> Response<Vec<u8>> {
        let auth = if access == Access::Open {
            "none"
        } else {
            "token"
        };
        let logged_in = matches!(access, Access::Open | Access::Bearer | Access::Cookie);
        json_response(
            StatusCode::OK,
            &json!({
                "auth": auth,
                "logged_in": logged_in,
                "csrf": if access == Access::Cookie { self.csrf(session) } else { None },
                "version": env!("CARGO_PKG_VERSION"),
            }),
        )
    }

    /// `POST /admin/login` with `token=<token>`: the session cookie, or 401.
    async fn login(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(b)) if body.len() + b.len() <= 16 * 1024 => body.extend_from_slice(&b),
                Ok(Some(_)) => {
                    return error(StatusCode::PAYLOAD_TOO_LARGE, "the form is too large")
                }
                Ok(None) => break,
                Err(_) => return error(StatusCode::BAD_REQUEST, "the form could not be read"),
            }
        }
        let form = String::from_utf8_lossy(&body);
        let given = api::param(&form, "token").unwrap_or_default();
        let cfg = self.config.load();
        let Some(token) = &cfg.server.admin_token else {
            return bytes_response(StatusCode::NO_CONTENT, "text/plain", Vec::new());
        };
        if !same(given.as_bytes(), token.expose().as_bytes()) {
            self.sessions.failed().await;
            return error(StatusCode::UNAUTHORIZED, "That is not the admin token.");
        }
        let Some(id) = self
            .sessions
            .open(token.expose(), crate::budget::now_unix())
        else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "Too many open sessions: try again later.",
            );
        };
        let mut r = bytes_response(StatusCode::NO_CONTENT, "text/plain", Vec::new());
        // Scoped to /admin: it never goes along with calls to the proxy on the same host.
        let c = format!("{COOKIE}={id}; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=43200");
        if let Ok(v) = http::HeaderValue::from_str(&c) {
            r.headers_mut().insert(http::header::SET_COOKIE, v);
        }
        r
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
        let segs = segments(path.trim_start_matches("/admin/budgets"));
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
                crate::budget::forget_refusal(&subject, window);
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

/// A path's segments, each percent-decoded (a user id may hold a `/`, sent as `%2F`).
fn segments(rest: &str) -> Vec<String> {
    rest.split('/')
        .filter(|s| !s.is_empty())
        .map(|s| crate::openai::percent_decode(s).into_owned())
        .collect()
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
        let access = self.access(session);
        let page = path == "/" || path.starts_with("/ui/") || path.starts_with("/admin/");
        if page && access == Access::Open && !session::addressed_by_ip(session) {
            return error(
                StatusCode::FORBIDDEN,
                "Without an admin token (server.admin_token_env), the admin page and API answer \
                 only to an IP address or localhost as the host.",
            );
        }
        if method == Method::GET {
            if let Some(r) = ui::file(&path) {
                return r;
            }
        }
        if path == "/admin/api/session" {
            return self.session_info(session, access);
        }
        let changes = !matches!(method, Method::GET | Method::HEAD);
        if changes && path.starts_with("/admin/") && session::cross_site(session) {
            return error(
                StatusCode::FORBIDDEN,
                "A state-changing admin request from another site is refused.",
            );
        }
        if path == "/admin/login" {
            if method != Method::POST {
                return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
            }
            return self.login(session).await;
        }
        let protected = {
            let cfg = self.config.load();
            path.starts_with("/admin/")
                || (path == "/metrics" && cfg.server.protect_metrics)
                || (matches!(path.as_str(), "/healthz" | "/readyz") && cfg.server.protect_health)
        };
        if protected && access == Access::Denied {
            return error(
                StatusCode::UNAUTHORIZED,
                "The admin API needs Authorization: Bearer <token> (server.admin_token_env), \
                 or the page's login.",
            );
        }
        if changes && access == Access::Cookie {
            let given = header(session, CSRF_HEADER).unwrap_or("");
            let want = self.csrf(session).unwrap_or_default();
            if want.is_empty() || !same(given.as_bytes(), want.as_bytes()) {
                return error(
                    StatusCode::FORBIDDEN,
                    "A state-changing request with the page's session needs its X-Tokentap-CSRF \
                     header.",
                );
            }
        }
        if path == "/admin/logout" {
            if method != Method::POST {
                return text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
            }
            if let Some(id) = cookie(session, COOKIE) {
                self.sessions.close(id);
            }
            let mut r = bytes_response(StatusCode::NO_CONTENT, "text/plain", Vec::new());
            r.headers_mut().insert(
                http::header::SET_COOKIE,
                http::HeaderValue::from_static(
                    "tokentap_session=; Path=/admin; HttpOnly; SameSite=Strict; Max-Age=0",
                ),
            );
            return r;
        }
        if path.starts_with("/admin/budgets") {
            return self.budgets(&method, &path, &query).await;
        }
        if let Some(rest) = path.strip_prefix("/admin/api/") {
            if method != Method::GET {
                return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
            }
            return self.api(rest, &query).await;
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
                "not found: / (the admin page), /healthz, /readyz, /metrics, /admin/config, \
                 POST /admin/reload, /admin/api/...\n",
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
        .header(http::header::CONTENT_SECURITY_POLICY, ui::CSP)
        .header(http::header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(http::header::X_FRAME_OPTIONS, "DENY")
        .header(http::header::REFERRER_POLICY, "no-referrer")
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .expect("static response builds")
}

impl Admin {
    /// `/admin/api/<rest>`.
    async fn api(&self, rest: &str, query: &str) -> Response<Vec<u8>> {
        use crate::budget::history::Dim;
        let segs = segments(rest);
        let seg: Vec<&str> = segs.iter().map(String::as_str).collect();
        match seg.as_slice() {
            ["overview"] => self.overview(query).await,
            ["budgets"] => self.budgets_view(query).await,
            ["users", u] => self.subject(Dim::User, u).await,
            ["teams", t] => self.subject(Dim::Team, t).await,
            ["users", u, "calls"] => self.calls(Dim::User, u, query).await,
            ["teams", t, "calls"] => self.calls(Dim::Team, t, query).await,
            ["live"] => self.live(),
            ["alerts"] => self.alerts(query).await,
            ["status"] => self.status().await,
            ["spend"] => self.spend(query).await,
            _ => error(
                StatusCode::NOT_FOUND,
                "admin API: overview, budgets, users/{user}[/calls], teams/{team}[/calls], live, \
                 alerts, status, spend (docs/admin-page.md)",
            ),
        }
    }
}
