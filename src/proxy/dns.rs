//! Asynchronous upstream name resolution with a cache.
//!
//! Pingora's `HttpPeer::new` resolves with a blocking `to_socket_addrs().unwrap()` that stalls a
//! worker and panics on failure. tokentap resolves on Tokio's blocking pool instead (the system
//! resolver, so `/etc/hosts` and nsswitch apply), caches the answer, refreshes it in the
//! background once it is older than `upstream.dns_refresh_ms`, keeps serving the last good answer
//! while a refresh fails, and hands Pingora a ready `SocketAddr`. A cold name is looked up
//! once however many calls wait for it (single flight): a burst of first calls, or a burst
//! after a restart, costs the resolver one query, not one per call.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures::future::{BoxFuture, FutureExt, Shared};

/// The name lookup behind the cache: the system resolver in production, a fake in tests.
pub type LookupFn =
    dyn Fn(String, u16) -> BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> + Send + Sync;

/// A cold lookup every waiting call shares.
type Flight = Shared<BoxFuture<'static, Result<Arc<[SocketAddr]>, String>>>;

pub struct Resolver {
    cache: DashMap<(String, u16), Arc<Entry>>,
    /// Cold lookups in progress, by name.
    flights: DashMap<(String, u16), Flight>,
    next: AtomicUsize,
    lookup: Box<LookupFn>,
}

struct Entry {
    addrs: Arc<[SocketAddr]>,
    fetched: Instant,
    refreshing: AtomicBool,
}

/// The addresses a name resolved to, and where this request starts in them: calls are spread
/// over all addresses, and a request whose connection fails moves on to the next one.
#[derive(Debug, Clone)]
pub struct Resolved {
    addrs: Arc<[SocketAddr]>,
    start: usize,
}

impl Resolved {
    pub fn len(&self) -> usize {
        self.addrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    /// The address for the request's `attempt`-th connection (0-based).
    pub fn pick(&self, attempt: usize) -> SocketAddr {
        self.addrs[(self.start + attempt) % self.addrs.len()]
    }
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
            flights: DashMap::new(),
            next: AtomicUsize::new(0),
            lookup,
        })
    }

    /// The addresses of `host:port`, each call starting at the next one.
    pub async fn resolve(
        self: &Arc<Self>,
        host: &str,
        port: u16,
        refresh: Duration,
        timeout: Duration,
    ) -> Result<Resolved, String> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(Resolved {
                addrs: Arc::new([SocketAddr::new(ip, port)]),
                start: 0,
            });
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
                                this.store(key, addrs.into());
                            }
                            Err(err) => {
                                log::warn!(
                                    "refreshing DNS for {}: {err}; keeping the last answer",
                                    key.0
                                );
                                // Keep the last answer for another refresh interval, so an
                                // outage does not start a lookup on every request.
                                let last = this.cache.get(&key).map(|e| Arc::clone(&e.addrs));
                                if let Some(addrs) = last {
                                    this.store(key, addrs);
                                }
                            }
                        }
                    });
                }
                e
            }
            None => {
                let flight = self
                    .flights
                    .entry(key.clone())
                    .or_insert_with(|| {
                        let (this, key) = (Arc::clone(self), key.clone());
                        async move {
                            let r = this.lookup_once(&key.0, key.1, timeout).await;
                            let r = r.map(|addrs| {
                                Arc::clone(&this.store(key.clone(), addrs.into()).addrs)
                            });
                            this.flights.remove(&key);
                            r
                        }
                        .boxed()
                        .shared()
                    })
                    .clone();
                let addrs = flight.await?;
                return Ok(Resolved {
                    addrs,
                    start: self.next.fetch_add(1, Ordering::Relaxed),
                });
            }
        };
        Ok(Resolved {
            addrs: Arc::clone(&entry.addrs),
            start: self.next.fetch_add(1, Ordering::Relaxed),
        })
    }

    fn store(&self, key: (String, u16), addrs: Arc<[SocketAddr]>) -> Arc<Entry> {
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
        assert_eq!(a.pick(0), "[::1]:8080".parse().unwrap());
    }

    #[tokio::test]
    async fn localhost_resolves_from_the_hosts_file() {
        let a = Resolver::new()
            .resolve("localhost", 1, LONG, LONG)
            .await
            .unwrap();
        assert!(a.pick(0).ip().is_loopback());
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
    async fn answers_are_cached_refreshed_and_kept_through_a_failed_refresh() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = Arc::clone(&calls);
        let r = Resolver::with_lookup(Box::new(move |_, port| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                match n {
                    0 => Ok(vec![SocketAddr::from(([127, 0, 0, 7], port))]),
                    1 => Err(std::io::Error::other("down")),
                    _ => Ok(vec![SocketAddr::from(([127, 0, 0, 8], port))]),
                }
            })
        }));
        let first: SocketAddr = "127.0.0.7:1".parse().unwrap();
        assert_eq!(r.resolve("h", 1, LONG, LONG).await.unwrap().pick(0), first);
        assert_eq!(r.resolve("h", 1, LONG, LONG).await.unwrap().pick(0), first);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "a fresh answer is served from cache"
        );
        // Stale: the old answer is served while a background refresh runs (and fails).
        assert_eq!(
            r.resolve("h", 1, Duration::ZERO, LONG)
                .await
                .unwrap()
                .pick(0),
            first
        );
        while calls.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        tokio::task::yield_now().await;
        assert_eq!(r.resolve("h", 1, LONG, LONG).await.unwrap().pick(0), first);
        // The failed refresh counts as a refresh: no new lookup until the interval passes.
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // The next refresh succeeds and its answer replaces the old one.
        r.resolve("h", 1, Duration::ZERO, LONG).await.unwrap();
        while calls.load(Ordering::SeqCst) < 3 {
            tokio::task::yield_now().await;
        }
        let mut fresh = r.resolve("h", 1, LONG, LONG).await.unwrap().pick(0);
        for _ in 0..100 {
            if fresh != first {
                break;
            }
            tokio::task::yield_now().await;
            fresh = r.resolve("h", 1, LONG, LONG).await.unwrap().pick(0);
        }
        assert_eq!(fresh, "127.0.0.8:1".parse().unwrap());
    }

    #[tokio::test]
    async fn a_cold_name_is_looked_up_once_for_a_burst_of_calls() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = Arc::clone(&calls);
        let r = Resolver::with_lookup(Box::new(move |_, port| {
            c.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                // Slower than the burst: every call arrives while it runs.
                tokio::task::yield_now().await;
                tokio::task::yield_now().await;
                Ok(vec![SocketAddr::from(([127, 0, 0, 9], port))])
            })
        }));
        let burst: Vec<_> = (0..50)
            .map(|_| {
                let r = Arc::clone(&r);
                tokio::spawn(async move { r.resolve("cold", 1, LONG, LONG).await })
            })
            .collect();
        for b in burst {
            assert_eq!(
                b.await.unwrap().unwrap().pick(0),
                "127.0.0.9:1".parse().unwrap()
            );
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one lookup for the burst");
        // A failed cold lookup is not kept: the next call tries again.
        let fails = Arc::new(AtomicU32::new(0));
        let f = Arc::clone(&fails);
        let r = Resolver::with_lookup(Box::new(move |_, _| {
            f.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Err(std::io::Error::other("NXDOMAIN")) })
        }));
        assert!(r.resolve("gone", 1, LONG, LONG).await.is_err());
        assert!(r.resolve("gone", 1, LONG, LONG).await.is_err());
        assert_eq!(fails.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn each_request_starts_at_the_next_address_and_can_fail_over() {
        let r = Resolver::with_lookup(Box::new(|_, port| {
            Box::pin(async move {
                Ok(vec![
                    SocketAddr::from(([127, 0, 0, 1], port)),
                    SocketAddr::from(([127, 0, 0, 2], port)),
                ])
            })
        }));
        let a = r.resolve("h", 1, LONG, LONG).await.unwrap();
        let b = r.resolve("h", 1, LONG, LONG).await.unwrap();
        assert_ne!(a.pick(0), b.pick(0));
        assert_eq!(a.pick(1), b.pick(0));
        assert_eq!(a.pick(2), a.pick(0));
    }
}
