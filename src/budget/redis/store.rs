//! Where the Redis ledger's Redis is, and how to reach it: one server (`standalone`), the
//! master a set of Sentinels names (`sentinel`), or a Cluster (`cluster`); TLS (`rediss://`)
//! against the system's roots or `redis_ca_file`, with client certificates for mutual TLS;
//! the ACL user and password from the URL or from environment variables. Everything here is
//! the `redis` crate's own (its rustls, Sentinel and Cluster support).
//!
//! Secrets never print: a [`Target`]'s `Debug` and [`Target::display`] (what logs, metrics and
//! errors show) leave the password out, and errors from the crate are shown without the URL.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
use redis::{
    ClientTlsConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, TlsCertificates, TlsMode,
};
use serde::Deserialize;

/// `budgets.ledger.redis_mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One server at `redis_url`.
    #[default]
    Standalone,
    /// The master that the Sentinels at `redis_nodes` name `redis_sentinel_master`; followed
    /// when they promote another.
    Sentinel,
    /// A Redis Cluster reached through the seed nodes `redis_nodes`.
    Cluster,
}

/// A password or private key: compared, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Hidden(Vec<u8>);

impl std::fmt::Debug for Hidden {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("(hidden)")
    }
}

impl Hidden {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

/// The Redis the ledger uses, as the config gives it (read when the config is loaded:
/// environment variables and certificate files included, so a missing one is a config error).
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    pub mode: Mode,
    /// Standalone: the server.
    url: Option<String>,
    /// Sentinel: the Sentinels; Cluster: the seed nodes (`host:port` or URLs).
    nodes: Vec<String>,
    master: Option<String>,
    username: Option<String>,
    password: Option<Hidden>,
    sentinel_password: Option<Hidden>,
    ca: Option<Vec<u8>>,
    client_cert: Option<(Vec<u8>, Hidden)>,
    pub timeout: Duration,
    /// What logs and errors call it (no password).
    display: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Target({})", self.display)
    }
}

/// The settings of `[budgets.ledger]` a [`Target`] is made of.
pub struct Settings<'a> {
    pub mode: Mode,
    pub url: Option<&'a str>,
    pub nodes: &'a [String],
    pub sentinel_master: Option<&'a str>,
    pub username_env: Option<&'a str>,
    pub password_env: Option<&'a str>,
    pub sentinel_password_env: Option<&'a str>,
    pub ca_file: Option<&'a std::path::Path>,
    pub client_cert_file: Option<&'a std::path::Path>,
    pub client_key_file: Option<&'a std::path::Path>,
    pub timeout: Duration,
}

/// `url` with its password (and user) replaced, and without a query (where a unix socket's
/// URL can carry `pass=`): what may be shown.
pub fn redact(url: &str) -> String {
    let url = url.split_once('?').map_or(url, |(u, _)| u);
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://***@{host}"),
            None => url.to_string(),
        },
        None => match url.rsplit_once('@') {
            Some((_, host)) => format!("***@{host}"),
            None => url.to_string(),
        },
    }
}

fn env_secret(key: &str, var: Option<&str>) -> Result<Option<Hidden>, String> {
    let Some(var) = var else { return Ok(None) };
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Ok(Some(Hidden(v.into_bytes()))),
        _ => Err(format!(
            "budgets.ledger.{key}: the environment variable {var} is not set (or empty)"
        )),
    }
}

/// A node as `redis://host:port` (a bare `host:port` is plain TCP).
fn node_url(n: &str) -> String {
    if n.contains("://") {
        n.to_string()
    } else {
        format!("redis://{n}")
    }
}

impl Target {
    pub fn new(s: &Settings<'_>) -> Result<Target, String> {
        let read = |key: &str, p: Option<&std::path::Path>| -> Result<Option<Vec<u8>>, String> {
            p.map(|p| {
                std::fs::read(p).map_err(|e| format!("budgets.ledger.{key}: {}: {e}", p.display()))
            })
            .transpose()
        };
        let ca = read("redis_ca_file", s.ca_file)?;
        let client_cert = match (
            read("redis_client_cert_file", s.client_cert_file)?,
            read("redis_client_key_file", s.client_key_file)?,
        ) {
            (Some(c), Some(k)) => Some((c, Hidden(k))),
            (None, None) => None,
            _ => {
                return Err("budgets.ledger: give redis_client_cert_file and \
                            redis_client_key_file together (mutual TLS needs both)"
                    .into())
            }
        };
        let username = match s.username_env {
            Some(var) => match std::env::var(var) {
                Ok(v) if !v.is_empty() => Some(v),
                _ => {
                    return Err(format!(
                        "budgets.ledger.redis_username_env: the environment variable {var} is \
                         not set (or empty)"
                    ))
                }
            },
            None => None,
        };
        let password = env_secret("redis_password_env", s.password_env)?;
        let sentinel_password = env_secret("redis_sentinel_password_env", s.sentinel_password_env)?;
        let check = |u: &str, key: &str| -> Result<(), String> {
            // The crate's error could quote the URL: not echoed.
            node_url(u)
                .as_str()
                .into_connection_info()
                .map(|_| ())
                .map_err(|e| {
                    format!(
                        "budgets.ledger.{key}: {} is not a Redis URL: {}",
                        redact(u),
                        shown(&e)
                    )
                })
        };
        let display = match s.mode {
            Mode::Standalone => {
                let url = s.url.ok_or(
                    "budgets.ledger.redis_url: the redis backend needs the server's URL, e.g. \
                     \"redis://127.0.0.1:6379/0\" (or redis_mode = \"sentinel\" or \"cluster\" \
                     with redis_nodes)",
                )?;
                if !url.contains("://") {
                    return Err(format!(
                        "budgets.ledger.redis_url: {} must start with redis:// or rediss://",
                        redact(url)
                    ));
                }
                check(url, "redis_url")?;
                redact(url)
            }
            Mode::Sentinel | Mode::Cluster => {
                if s.nodes.is_empty() {
                    return Err(format!(
                        "budgets.ledger.redis_nodes: redis_mode = \"{}\" needs the {} (\"host:port\" \
                         or \"rediss://host:port\" for TLS)",
                        if s.mode == Mode::Sentinel { "sentinel" } else { "cluster" },
                        if s.mode == Mode::Sentinel { "Sentinels' addresses" } else { "Cluster's seed nodes" }
                    ));
                }
                for n in s.nodes {
                    check(n, "redis_nodes")?;
                }
                let tls = s.nodes.iter().map(|n| n.starts_with("rediss://"));
                if tls.clone().any(|t| t) && !tls.clone().all(|t| t) {
                    return Err(
                        "budgets.ledger.redis_nodes: give every node with rediss:// \
                                (TLS) or none"
                            .into(),
                    );
                }
                let nodes: Vec<String> = s.nodes.iter().map(|n| redact(n)).collect();
                if s.mode == Mode::Sentinel {
                    let master = s.sentinel_master.ok_or(
                        "budgets.ledger.redis_sentinel_master: redis_mode = \"sentinel\" needs \
                         the name the Sentinels monitor the master under",
                    )?;
                    format!("sentinel {} master {master:?}", nodes.join(","))
                } else {
                    format!("cluster {}", nodes.join(","))
                }
            }
        };
        let tls = match s.mode {
            Mode::Standalone => s.url.is_some_and(|u| u.starts_with("rediss://")),
            _ => s.nodes.iter().all(|n| n.starts_with("rediss://")),
        };
        if (ca.is_some() || client_cert.is_some()) && !tls {
            return Err(format!(
                "budgets.ledger: redis_ca_file and redis_client_cert_file are for TLS: write {} \
                 with rediss://",
                if s.mode == Mode::Standalone {
                    "redis_url"
                } else {
                    "redis_nodes"
                }
            ));
        }
        let infos = match s.mode {
            Mode::Standalone => vec![s.url.unwrap_or_default().to_string()],
            _ => s.nodes.iter().map(|n| node_url(n)).collect(),
        };
        for u in &infos {
            let info = u.as_str().into_connection_info().map_err(|e| shown(&e))?;
            if matches!(info.addr(), ConnectionAddr::TcpTls { insecure: true, .. }) {
                return Err(format!(
                    "budgets.ledger: {} asks for TLS without checking the certificate \
                     (#insecure): give redis_ca_file instead",
                    redact(u)
                ));
            }
            let creds = info.redis_settings();
            if s.mode == Mode::Sentinel
                && (creds.password().is_some() || creds.username().is_some())
            {
                return Err(format!(
                    "budgets.ledger.redis_nodes: {} carries credentials: give the Sentinels' \
                     password with redis_sentinel_password_env and the master's with \
                     redis_password_env (and redis_username_env)",
                    redact(u)
                ));
            }
        }
        let target = Target {
            mode: s.mode,
            url: s.url.map(str::to_string),
            nodes: s.nodes.to_vec(),
            master: s.sentinel_master.map(str::to_string),
            username,
            password,
            sentinel_password,
            ca,
            client_cert,
            timeout: s.timeout,
            display,
        };
        // Certificates that do not parse are a config error, not an outage.
        if let Some(certs) = target.certificates() {
            let info = node_url(&infos[0])
                .as_str()
                .into_connection_info()
                .map_err(|e| shown(&e))?;
            redis::Client::build_with_tls(info, certs).map_err(|e| {
                format!(
                    "budgets.ledger: redis_ca_file, redis_client_cert_file or \
                     redis_client_key_file: {}",
                    shown(&e)
                )
            })?;
        }
        Ok(target)
    }

    /// What logs and errors call this Redis (no secret in it).
    pub fn display(&self) -> &str {
        &self.display
    }

    fn certificates(&self) -> Option<TlsCertificates> {
        if self.ca.is_none() && self.client_cert.is_none() {
            return None;
        }
        Some(TlsCertificates {
            client_tls: self.client_cert.as_ref().map(|(c, k)| ClientTlsConfig {
                client_cert: c.clone(),
                client_key: k.0.clone(),
            }),
            root_cert: self.ca.clone(),
        })
    }

    /// Keepalive probes and a user timeout: a server gone without a word (a powered-off VM,
    /// a dropped route) is given up on in seconds, not after the kernel's ~15 minutes.
    fn tcp(&self) -> redis::io::tcp::TcpSettings {
        use redis::io::tcp::{socket2::TcpKeepalive, TcpSettings};
        let keepalive = TcpKeepalive::new()
            .with_time(Duration::from_secs(5))
            .with_interval(Duration::from_secs(1));
        let s = TcpSettings::default()
            .set_nodelay(true)
            .set_keepalive(keepalive);
        #[cfg(target_os = "linux")]
        let s = s.set_user_timeout((self.timeout * 4).max(Duration::from_secs(5)));
        s
    }

    /// A node's connection info with the credentials from the environment laid over the
    /// URL's.
    fn info(&self, url: &str) -> redis::RedisResult<ConnectionInfo> {
        let info = node_url(url)
            .as_str()
            .into_connection_info()?
            .set_tcp_settings(self.tcp());
        let mut redis = info.redis_settings().clone();
        if let Some(u) = &self.username {
            redis = redis.set_username(u);
        }
        if let Some(p) = &self.password {
            redis = redis.set_password(p.text());
        }
        Ok(info.set_redis_settings(redis))
    }

    fn client(&self, info: ConnectionInfo) -> redis::RedisResult<redis::Client> {
        match self.certificates() {
            Some(c) => redis::Client::build_with_tls(info, c),
            None => redis::Client::open(info),
        }
    }

    fn manager_config(&self) -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
    }

    /// A client of the Sentinels, for the master they name.
    fn sentinel(&self) -> redis::RedisResult<redis::sentinel::SentinelClient> {
        let infos = self
            .nodes
            .iter()
            .map(|n| node_url(n).as_str().into_connection_info())
            .collect::<redis::RedisResult<Vec<_>>>()?;
        let tls = matches!(infos[0].addr(), ConnectionAddr::TcpTls { .. });
        let master = self.master.as_deref().unwrap_or_default();
        let mut b = SentinelClientBuilder::new(
            infos.iter().map(|i| i.addr().clone()),
            master,
            SentinelServerType::Master,
        )?;
        if let Some(u) = &self.username {
            b = b.set_client_to_redis_username(u);
        }
        if let Some(p) = &self.password {
            b = b.set_client_to_redis_password(p.text());
        }
        if let Some(p) = &self.sentinel_password {
            b = b.set_client_to_sentinel_password(p.text());
        }
        b = b
            .set_client_to_redis_tcp_settings(self.tcp())
            .set_client_to_sentinel_tcp_settings(self.tcp());
        if tls {
            b = b
                .set_client_to_redis_tls_mode(TlsMode::Secure)
                .set_client_to_sentinel_tls_mode(TlsMode::Secure);
        }
        if let Some(c) = self.certificates() {
            b = b
                .set_client_to_redis_certificates(c.clone())
                .set_client_to_sentinel_certificates(c);
        }
        b.build()
    }

    /// The address of the master the Sentinels name now (Sentinel mode).
    pub async fn sentinel_master(&self) -> Result<String, String> {
        let at = &self.display;
        let failed = |e: redis::RedisError| format!("Sentinels at {at}: {}", shown(&e));
        let mut s = self.sentinel().map_err(failed)?;
        let ask = s.async_get_client();
        let client = tokio::time::timeout(self.timeout.max(Duration::from_secs(2)), ask)
            .await
            .map_err(|_| format!("Sentinels at {at}: timed out"))?
            .map_err(failed)?;
        Ok(client.get_connection_info().addr().to_string())
    }

    /// Connects (in Sentinel mode: to the master the Sentinels name now, whose address comes
    /// with the connection).
    pub async fn connect(&self) -> Result<(Con, Option<String>), String> {
        let at = &self.display;
        let failed = |e: redis::RedisError| format!("cannot reach Redis at {at}: {}", shown(&e));
        let con = async {
            match self.mode {
                Mode::Standalone => {
                    let url = self.url.as_deref().unwrap_or_default();
                    let client = self
                        .client(self.info(url).map_err(failed)?)
                        .map_err(failed)?;
                    ConnectionManager::new_with_config(client, self.manager_config())
                        .await
                        .map(|c| (Con::One(c), None))
                        .map_err(failed)
                }
                Mode::Cluster => {
                    let infos = self
                        .nodes
                        .iter()
                        .map(|n| self.info(n))
                        .collect::<redis::RedisResult<Vec<_>>>()
                        .map_err(failed)?;
                    let tls = matches!(infos[0].addr(), ConnectionAddr::TcpTls { .. });
                    let mut b = ClusterClientBuilder::new(infos)
                        .connection_timeout(self.timeout)
                        .response_timeout(self.timeout)
                        .retries(2);
                    if let Some(u) = &self.username {
                        b = b.username(u);
                    }
                    if let Some(p) = &self.password {
                        b = b.password(p.text());
                    }
                    if tls {
                        b = b.tls(TlsMode::Secure);
                    }
                    if let Some(c) = self.certificates() {
                        b = b.certs(c);
                    }
                    let client = b.build().map_err(failed)?;
                    client
                        .get_async_connection()
                        .await
                        .map(|c| (Con::Cluster(c), None))
                        .map_err(failed)
                }
                Mode::Sentinel => {
                    let mut sentinel = self.sentinel().map_err(failed)?;
                    let client = sentinel.async_get_client().await.map_err(failed)?;
                    let master = client.get_connection_info().addr().to_string();
                    ConnectionManager::new_with_config(client, self.manager_config())
                        .await
                        .map(|c| (Con::One(c), Some(master)))
                        .map_err(failed)
                }
            }
        };
        tokio::time::timeout(self.timeout.max(Duration::from_secs(5)), con)
            .await
            .map_err(|_| format!("cannot reach Redis at {at}: timed out"))?
    }
}

/// An error from the `redis` crate as it may be shown: its kind and detail, never a URL or
/// password (the crate's messages do not carry them; this keeps it so if that changes).
pub fn shown(e: &redis::RedisError) -> String {
    redact_words(&e.to_string())
}

/// Any `scheme://user:pass@` in `s`, redacted.
fn redact_words(s: &str) -> String {
    s.split(' ')
        .map(|w| {
            if w.contains("://") && w.contains('@') {
                redact(w)
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A connection in any mode: one server (standalone, or the Sentinels' master), or a Cluster
/// (which follows MOVED and ASK redirects and failovers by itself).
#[derive(Clone)]
pub enum Con {
    One(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Con {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Con::One(c) => c.req_packed_command(cmd),
            Con::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Con::One(c) => c.req_packed_commands(cmd, offset, count),
            Con::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Con::One(c) => c.get_db(),
            Con::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_their_credentials() {
        assert_eq!(
            redact("rediss://app:s3cret@cache.example:6380/0"),
            "rediss://***@cache.example:6380/0"
        );
        assert_eq!(redact("redis://:pw@h:1"), "redis://***@h:1");
        assert_eq!(redact("redis://h:1/2"), "redis://h:1/2");
        assert_eq!(redact("u:p@h:1"), "***@h:1");
        assert_eq!(
            redact("redis+unix:///run/r.sock?db=1&pass=pw"),
            "redis+unix:///run/r.sock"
        );
        assert_eq!(
            redact_words("cannot reach redis://u:pw@h:1 now"),
            "cannot reach redis://***@h:1 now"
        );
    }

    #[test]
    fn a_target_prints_no_secret() {
        std::env::set_var("TOKENTAP_TEST_REDIS_PW", "hunter2-secret");
        let t = Target::new(&Settings {
            mode: Mode::Standalone,
            url: Some("rediss://app:urlpass@h:6380/0"),
            nodes: &[],
            sentinel_master: None,
            username_env: None,
            password_env: Some("TOKENTAP_TEST_REDIS_PW"),
            sentinel_password_env: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            timeout: Duration::from_millis(500),
        })
        .unwrap();
        let shown = format!("{t:?} {}", t.display());
        assert!(
            !shown.contains("hunter2") && !shown.contains("urlpass"),
            "{shown}"
        );
        let e = Target::new(&Settings {
            mode: Mode::Sentinel,
            url: None,
            nodes: &["h:26379".to_string()],
            sentinel_master: None,
            username_env: None,
            password_env: None,
            sentinel_password_env: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            timeout: Duration::from_millis(500),
        })
        .unwrap_err();
        assert!(e.contains("redis_sentinel_master"), "{e}");
    }
}
