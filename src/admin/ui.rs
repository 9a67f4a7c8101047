//! The admin page's files, inside the binary: the page at `/`, its script, style and the
//! vendored chart library (uPlot 1.6.32, MIT: `ui/vendor/`) under `/ui/`. Nothing is loaded
//! from elsewhere. Every answer carries a strict Content-Security-Policy: scripts, styles and
//! connections only from the admin listener, no inline script, no framing.

use http::{Response, StatusCode};

/// The page's Content-Security-Policy (also sent with every admin answer).
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                       img-src 'self' data:; connect-src 'self'; form-action 'self'; \
                       frame-ancestors 'none'; base-uri 'none'";

/// (path, content type, bytes) of every file the page is made of.
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_bytes!("ui/index.html"),
    ),
    (
        "/ui/app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("ui/app.js"),
    ),
    (
        "/ui/app.css",
        "text/css; charset=utf-8",
        include_bytes!("ui/app.css"),
    ),
    (
        "/ui/uplot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("ui/vendor/uplot.iife.min.js"),
    ),
    (
        "/ui/uplot.min.css",
        "text/css; charset=utf-8",
        include_bytes!("ui/vendor/uplot.min.css"),
    ),
    (
        "/ui/LICENSE.uplot",
        "text/plain; charset=utf-8",
        include_bytes!("ui/vendor/LICENSE.uplot"),
    ),
];

/// The file at `path`, if the page has one there.
pub fn file(path: &str) -> Option<Response<Vec<u8>>> {
    let path = if path == "/index.html" { "/" } else { path };
    let (_, ctype, body) = FILES.iter().find(|(p, _, _)| *p == path)?;
    let mut r = super::bytes_response(StatusCode::OK, ctype, body.to_vec());
    // Asked again on every load (they change with the binary), cheap on loopback.
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    Some(r)
}
