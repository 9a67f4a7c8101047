//! The admin page's sessions and the checks that keep other sites out.
//!
//! - A login (`POST /admin/login`, the admin token) opens a session: a random id in an
//!   `HttpOnly`, `SameSite=Strict` cookie scoped to `/admin` (so that it never goes along
//!   with calls to the proxy on the same host), valid for 12 hours, for as long as the token
//!   stays the same, or until logout. The id is never the token nor made from it.
//! - A state change made with the cookie carries the session's CSRF value (`X-Tokentap-CSRF`),
//!   which only the page can read (`GET /admin/api/session`).
//! - A browser request from another site (its `Origin` or `Sec-Fetch-Site`) cannot change
//!   anything, and without a token the page and `/admin/…` answer only to an IP address or
//!   `localhost` as the host: a DNS name could be an attacker's pointed at this listener (DNS
//!   rebinding), which would make its pages same-origin with the admin's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pingora::protocols::http::ServerSession;
use sha2::Digest;

/// The session cookie.
pub const COOKIE: &str = "tokentap_session";
/// How long a session lasts.
const LIFETIME: i64 = 12 * 3600;
/// Sessions kept at most (expired ones are dropped first; beyond, logins wait).
const MAX_SESSIONS: usize = 10_000;

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// Compares without leaking, through timing, how much of the secret (or how long it) is:
/// the digests are compared, in full.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    let (a, b) = (sha2::Sha256::digest(a), sha2::Sha256::digest(b));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

struct Session {
    expires: i64,
    /// The token it was opened with (a new token ends it).
    token: [u8; 32],
}

#[derive(Default)]
pub struct Sessions {
    open: dashmap::DashMap<String, Session>,
    /// Failed logins (logged now and then), and one failed login at a time, each held a
    /// second: guessing is one try a second, whatever the number of connections.
    failures: AtomicU64,
    failing: tokio::sync::Mutex<()>,
}

impl Sessions {
    /// Opens a session for `token`; its id, for the cookie.
    pub fn open(&self, token: &str, now: i64) -> Option<String> {
        if self.open.len() >= MAX_SESSIONS {
            self.open.retain(|_, s| s.expires > now);
            if self.open.len() >= MAX_SESSIONS {
                return None;
            }
        }
        let mut id = [0u8; 32];
        getrandom::fill(&mut id).ok()?;
        let id = hex(&id);
        self.open.insert(
            id.clone(),
            Session {
                expires: now + LIFETIME,
                token: digest(&[token.as_bytes()]),
            },
        );
        Some(id)
    }

    /// Whether `id` is an open session of `token`.
    pub fn valid(&self, id: &str, token: &str, now: i64) -> bool {
        let Some(s) = self.open.get(id) else {
            return false;
        };
        s.expires > now && s.token == digest(&[token.as_bytes()])
    }

    pub fn close(&self, id: &str) {
        self.open.remove(id);
    }

    /// The CSRF value of session `id`.
    pub fn csrf(id: &str, token: &str) -> String {
        hex(&digest(&[b"csrf", token.as_bytes(), id.as_bytes()]))
    }

    /// A wrong token: counted, logged now and then, and held a second (one at a time).
    pub async fn failed(&self) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(100) {
            log::warn!("admin: a login with a wrong token ({} so far)", n + 1);
        }
        let _one = self.failing.lock().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub fn header<'a>(session: &'a ServerSession, name: &str) -> Option<&'a str> {
    session
        .req_header()
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
}

/// The value of cookie `name` in the request.
pub fn cookie<'a>(session: &'a ServerSession, name: &str) -> Option<&'a str> {
    session
        .req_header()
        .headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

/// The host a request names (the `Host` header, or the URI's authority), without its port.
fn host_name(session: &ServerSession) -> Option<&str> {
    let h = header(session, "host").or_else(|| session.req_header().uri.host())?;
    Some(match h.strip_prefix('[') {
        // [::1]:9464
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => h.rsplit_once(':').map_or(h, |(name, _)| name),
    })
}

/// Whether the request names an IP address or `localhost` as its host (not a DNS name that
/// could be anyone's).
pub fn addressed_by_ip(session: &ServerSession) -> bool {
    host_name(session).is_some_and(|h| {
        h.eq_ignore_ascii_case("localhost") || h.parse::<std::net::IpAddr>().is_ok()
    })
}

/// Whether a browser sent this request from another site: its `Origin` is not the host it
/// was sent to, or `Sec-Fetch-Site` says so. (Tools such as curl send neither.)
pub fn cross_site(session: &ServerSession) -> bool {
    if let Some(site) = header(session, "sec-fetch-site") {
        if site.eq_ignore_ascii_case("cross-site") || site.eq_ignore_ascii_case("same-site") {
            return true;
        }
    }
    match header(session, "origin") {
        None => false,
        Some(origin) => {
            let host = header(session, "host").unwrap_or("");
            let authority = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"));
            authority.is_none_or(|a| !a.eq_ignore_ascii_case(host)) || host.is_empty()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_lasts_its_lifetime_for_its_token_until_closed() {
        let s = Sessions::default();
        let id = s.open("token-one-0123456789", 1000).unwrap();
        assert_eq!(id.len(), 64);
        assert!(!id.contains("token"));
        assert!(s.valid(&id, "token-one-0123456789", 1000 + LIFETIME - 1));
        assert!(!s.valid(&id, "token-one-0123456789", 1000 + LIFETIME));
        assert!(
            !s.valid(&id, "token-two-0123456789", 1001),
            "a new token ends it"
        );
        assert!(!s.valid("other", "token-one-0123456789", 1001));
        let again = s.open("token-one-0123456789", 1000).unwrap();
        assert_ne!(id, again, "every login its own id");
        assert_ne!(
            Sessions::csrf(&id, "token-one-0123456789"),
            Sessions::csrf(&again, "token-one-0123456789")
        );
        s.close(&id);
        assert!(!s.valid(&id, "token-one-0123456789", 1001));
        assert!(s.valid(&again, "token-one-0123456789", 1001));
    }
}
