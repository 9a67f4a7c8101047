//! The admin listener: health and readiness now; metrics and the admin API as they arrive.
//! It listens on its own address (loopback by default), apart from proxied traffic.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::proxy::Shared;

pub struct Admin {
    pub shared: Arc<Shared>,
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            "/healthz" => text(StatusCode::OK, "ok\n"),
            "/readyz" => {
                // Ready once a config is loaded (always, after start-up).
                let cfg = self.shared.config.load();
                text(
                    StatusCode::OK,
                    &format!(
                        "ready pid={} upstream={}\n",
                        std::process::id(),
                        cfg.upstream.url.host_header
                    ),
                )
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /healthz or /readyz\n",
            ),
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body.as_bytes().to_vec())
        .expect("static response builds")
}
