//! Asynchronous upstream name resolution with a cache.
//!
//! Pingora's `HttpPeer::new` resolves with a blocking `to_socket_addrs().unwrap()` that stalls a
//! worker and panics on failure. tokentap resolves on Tokio's blocking pool instead (the system
//! resolver, so `/etc/hosts` and nsswitch apply), caches the answer, refreshes it in the
//! background once it is older than `upstream.dns_refresh_ms`, keeps serving the last good answer
//! while a refresh fails, and hands Pingora a ready `SocketAddr`.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures::future::BoxFuture;

/// The name lookup behind the cache: the system resolver in production, a fake in tests.
pub type LookupFn =
    dyn Fn(String, u16) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> + Send + Sync;

pub struct Resolver {
    cache: DashMap<(String, u16), Arc<Entry>>,
    next: AtomicUsize,
    lookup: Box<LookupFn>,
}

struct Entry {
    addrs: Vec<SocketAddr>,
    fetched: Instant,
    refreshing: AtomicBool,
}

impl Resolver {
    /// A resolver over the system's (getaddrinfo on Tokio's blocking pool).
    pub fn new() -> Arc<Self> {
        Self::with_lookup(Box::new(|host, port| {
            Box::pin(async move {
                tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .map(|it| it.collect())
            })
        }))
    }

    pub fn with_lookup(lookup: Box<LookupFn>) -> Arc<Self> {
        Arc::new(Resolver {
            cache: DashMap::new(),
            next: AtomicUsize::new(0),
            lookup,
        })
    }

    /// One address for `host:port`, rotating over all the name resolves to.
    pub async fn resolve(
        self: &Arc<Self>,
        host: &str,
        port: u16,
        refresh: Duration,
        timeout: Duration,
    ) -> Result<SocketAddr, String> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(SocketAddr::new(ip, port));
        }
        let key = (host.to_string(), port);
        let cached = self.cache.get(&key).map(|e| Arc::clone(e.value()));
        let entry = match cached {
            Some(e) => {
                if e.fetched.elapsed() >= refresh && !e.refreshing.swap(true, Ordering::AcqRel) {
                    let this = Arc::clone(self);
                    let key = key.clone();
                    tokio::spawn(async move {
                        match this.lookup_once(&key.0, key.1, timeout).await {
                            Ok(addrs) => {
                                this.store(key, addrs);
                            }
                            Err(err) => {
                                log::warn!(
                                    "refreshing DNS for {}: {err}; keeping the last answer",
                                    key.0
                                );
                                if let Some(e) = this.cache.get(&key) {
                                    e.refreshing.store(false, Ordering::Release);
                                }
                            }
                        }
                    });
                }
                e
            }
            None => {
                let addrs = self.lookup_once(host, port, timeout).await?;
                self.store(key, addrs)
            }
        };
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        Ok(entry.addrs[i % entry.addrs.len()])
    }

    fn store(&self, key: (String, u16), addrs: Vec<SocketAddr>) -> Arc<Entry> {
        let e = Arc::new(Entry {
            addrs,
            fetched: Instant::now(),
            refreshing: AtomicBool::new(false),
        });
        self.cache.insert(key, Arc::clone(&e));
        e
    }

    async fn lookup_once(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<Vec<SocketAddr>, String> {
        let fut = (self.lookup)(host.to_string(), port);
        let addrs = match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(addrs)) => addrs,
            Ok(Err(e)) => return Err(format!("cannot resolve {host}: {e}")),
            Err(_) => return Err(format!("resolving {host} timed out after {timeout:?}")),
        };
        if addrs.is_empty() {
            return Err(format!("{host} resolves to no address"));
        }
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    const LONG: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn ip_literals_need_no_lookup() {
        let r = Resolver::with_lookup(Box::new(|_, _| panic!("no lookup expected")));
        let a = r.resolve("::1", 8080, LONG, LONG).await.unwrap();
        assert_eq!(a, "[::1]:8080".parse().unwrap());
    }

    #[tokio::test]
    async fn localhost_resolves_from_the_hosts_file() {
        let a = Resolver::new()
            .resolve("localhost", 1, LONG, LONG)
            .await
            .unwrap();
        assert!(a.ip().is_loopback());
    }

    #[tokio::test]
    async fn failed_lookup_is_an_error_not_a_panic() {
        let r = Resolver::with_lookup(Box::new(|_, _| {
            Box::pin(async { Err(std::io::Error::other("NXDOMAIN")) })
        }));
        let e = r.resolve("api.example", 443, LONG, LONG).await.unwrap_err();
        assert_eq!(e, "cannot resolve api.example: NXDOMAIN");
    }

    #[tokio::test]
    async fn answers_are_cached_and_a_failed_refresh_keeps_the_last_one() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = Arc::clone(&calls);
        let r = Resolver::with_lookup(Box::new(move |_, port| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                if n == 0 {
                    Ok(vec![SocketAddr::from(([127, 0, 0, 7], port))])
                } else {
                    Err(std::io::Error::other("down"))
                }
            })
        }));
        let a = r.resolve("h", 1, LONG, LONG).await.unwrap();
        let b = r.resolve("h", 1, LONG, LONG).await.unwrap();
        assert_eq!(a, b);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Stale: a background refresh is started, fails, and the old answer is still served.
        let c = r.resolve("h", 1, Duration::ZERO, LONG).await.unwrap();
        assert_eq!(c, a);
        tokio::task::yield_now().await;
        let d = r.resolve("h", 1, LONG, LONG).await.unwrap();
        assert_eq!(d, a);
    }
}
