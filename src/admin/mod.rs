//! The admin listener, on its own address (loopback by default), apart from proxied traffic:
//! `/healthz`, `/readyz`, `/metrics`, `GET /admin/config` and `POST /admin/reload`.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use crate::config::reload::{Reloader, Trigger};
use crate::openai::ApiError;
use crate::proxy::Shared;

pub struct Admin {
    pub shared: Arc<Shared>,
    pub reloader: Arc<Reloader>,
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        match (method, path.as_str()) {
            (Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (Method::GET, "/readyz") => {
                // Ready once a config is loaded (always, after start-up).
                let cfg = self.shared.config.load();
                text(
                    StatusCode::OK,
                    &format!(
                        "ready pid={} upstream={} config={}\n",
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
                .body(self.shared.metrics.encode())
                .expect("static response builds"),
            (Method::GET, "/admin/config") => {
                let cfg = self.shared.config.load();
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
