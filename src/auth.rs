//! Who is calling. `passthrough` (default): the client's `Authorization` goes upstream as
//! sent and the caller is the body's `user`. `virtual_keys`: clients present keys tokentap
//! issued (`tokentap keys create`); tokentap keeps only their SHA-256, takes the caller's
//! identity from the key, and sends the real upstream key instead. The keys file is part of
//! the config: editing it (or `tokentap keys revoke`) takes effect on reload.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::Digest;

/// `[auth]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAuth {
    pub mode: Mode,
    /// The issued keys (hashes only), relative to the config file.
    pub keys_file: PathBuf,
    /// The environment variable holding the upstream's real API key (virtual_keys).
    pub upstream_key_env: Option<String>,
    /// The header the real key goes upstream in (virtual_keys).
    pub upstream_key_header: KeyHeader,
    /// A body `user` other than the key's.
    pub user_mismatch: Mismatch,
    /// What a virtual key may call upstream (with the real key): "METHOD /path" entries. Chat
    /// Completions is always allowed; everything else is refused with 403 (an unmetered path
    /// on the operator's key would bypass every cap).
    pub allow: Vec<String>,
}

impl Default for RawAuth {
    fn default() -> Self {
        RawAuth {
            mode: Mode::Passthrough,
            keys_file: PathBuf::from("tokentap-keys.toml"),
            upstream_key_env: None,
            upstream_key_header: KeyHeader::Authorization,
            user_mismatch: Mismatch::Reject,
            allow: vec!["GET /v1/models".into()],
        }
    }
}

/// The header an API key travels in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum KeyHeader {
    /// `Authorization: Bearer <key>` (OpenAI and most compatible APIs).
    #[serde(rename = "authorization")]
    Authorization,
    /// `x-api-key: <key>` (the target API's documented header; Anthropic's).
    #[serde(rename = "x-api-key")]
    XApiKey,
    /// `api-key: <key>` (Azure OpenAI).
    #[serde(rename = "api-key")]
    ApiKey,
}

impl KeyHeader {
    pub fn name(self) -> &'static str {
        match self {
            KeyHeader::Authorization => "authorization",
            KeyHeader::XApiKey => "x-api-key",
            KeyHeader::ApiKey => "api-key",
        }
    }

    /// The header's value for `key`.
    pub fn value(self, key: &str) -> String {
        match self {
            KeyHeader::Authorization => format!("Bearer {key}"),
            _ => key.to_string(),
        }
    }
}

/// Every header a client may put a credential in. In virtual_keys mode none of them goes
/// upstream as the client sent it.
pub const CREDENTIAL_HEADERS: [&str; 4] = [
    "authorization",
    "x-api-key",
    "api-key",
    "proxy-authorization",
];

/// A secret that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `auth.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The client's credentials go upstream as sent; the caller is the body's `user`.
    Passthrough,
    /// Clients present keys tokentap issued; the caller is the key's user.
    VirtualKeys,
}

/// `auth.user_mismatch`: a body naming another user than the key's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mismatch {
    /// Refused with 403.
    Reject,
    /// The body sent upstream names the key's user.
    Overwrite,
}

/// `[auth]`, checked, with its keys loaded.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub mode: Mode,
    pub keys_file: PathBuf,
    pub keys: Arc<KeyStore>,
    /// The header value sent upstream in virtual_keys mode (`Bearer <key>` for
    /// `Authorization`, the bare key otherwise), in `upstream_key_header`.
    pub upstream_auth: Option<Secret>,
    pub upstream_key_header: KeyHeader,
    pub mismatch: Mismatch,
    /// (method, path) pairs a virtual key may call besides Chat Completions.
    pub allow: Vec<(http::Method, String)>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: Mode::Passthrough,
            keys_file: PathBuf::from("tokentap-keys.toml"),
            keys: Arc::default(),
            upstream_auth: None,
            upstream_key_header: KeyHeader::Authorization,
            mismatch: Mismatch::Reject,
            allow: Vec::new(),
        }
    }
}

/// One issued key, as stored (never the key itself).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredKey {
    /// Public name of the key (for listing and revoking).
    pub id: String,
    /// SHA-256 of the key, hex.
    pub sha256: String,
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    pub created: String,
    #[serde(default)]
    pub revoked: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    #[serde(default)]
    pub keys: Vec<StoredKey>,
}

/// Who a key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub key_id: String,
    pub user: String,
    pub team: Option<String>,
}

/// The live keys, by hash.
#[derive(Debug, Default)]
pub struct KeyStore {
    by_hash: HashMap<[u8; 32], Identity>,
    /// Teams keys put their users in (user, team).
    pub teams: Vec<(String, String)>,
}

impl KeyStore {
    /// The identity of a presented key; `None` for unknown and revoked keys alike.
    pub fn lookup(&self, presented: &str) -> Option<&Identity> {
        self.by_hash.get(&digest(presented))
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

fn digest(key: &str) -> [u8; 32] {
    sha2::Sha256::digest(key.as_bytes()).into()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a keys file; a missing file is an empty one.
pub fn read_keys(path: &Path) -> Result<KeysFile, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(KeysFile::default()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Writes a keys file atomically (a reload sees the old or the new one, never half).
pub fn write_keys(path: &Path, file: &KeysFile) -> Result<(), String> {
    let text = format!(
        "# Issued by `tokentap keys`: SHA-256 hashes only, never the keys. Revoke with\n\
         # `tokentap keys revoke ID` (or set revoked = true); a reload applies it.\n\n{}",
        toml::to_string(file).map_err(|e| e.to_string())?
    );
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A new key for `user` (and `team`): the key to hand out, and what is stored of it.
pub fn issue(user: &str, team: Option<&str>) -> Result<(String, StoredKey), String> {
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| format!("no randomness: {e}"))?;
    let key = format!("tt-{}", hex(&raw));
    let sha = digest(&key);
    let stored = StoredKey {
        id: format!("key_{}", &hex(&sha)[..12]),
        sha256: hex(&sha),
        user: user.to_string(),
        team: team.map(str::to_string),
        created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        revoked: false,
    };
    Ok((key, stored))
}

/// Checks `[auth]` and loads its keys (`dir`: the config file's directory).
pub fn compile(raw: &RawAuth, dir: &Path) -> Result<AuthConfig, String> {
    let (mode, mismatch) = (raw.mode, raw.user_mismatch);
    let keys_file = dir.join(&raw.keys_file);
    let mut store = KeyStore::default();
    let mut upstream_auth = None;
    if mode == Mode::VirtualKeys {
        let file = read_keys(&keys_file).map_err(|e| format!("auth.keys_file: {e}"))?;
        for k in file.keys {
            let mut h = [0u8; 32];
            if k.sha256.len() != 64
                || !k.sha256.bytes().all(|b| b.is_ascii_hexdigit())
                || (0..32).any(|i| {
                    u8::from_str_radix(&k.sha256[2 * i..2 * i + 2], 16)
                        .map(|b| h[i] = b)
                        .is_err()
                })
            {
                return Err(format!(
                    "auth.keys_file: key {:?}: sha256 is not 64 hex digits",
                    k.id
                ));
            }
            if k.revoked {
                continue;
            }
            if let Some(t) = &k.team {
                store.teams.push((k.user.clone(), t.clone()));
            }
            store.by_hash.insert(
                h,
                Identity {
                    key_id: k.id,
                    user: k.user,
                    team: k.team,
                },
            );
        }
        if let Some(var) = &raw.upstream_key_env {
            let v = std::env::var(var).map_err(|_| {
                format!("auth.upstream_key_env: the environment variable {var} is not set")
            })?;
            let value = raw.upstream_key_header.value(v.trim());
            if http::HeaderValue::from_str(&value).is_err() {
                return Err(format!(
                    "auth.upstream_key_env: the key in {var} is not a valid header value"
                ));
            }
            upstream_auth = Some(Secret(value));
        }
    }
    let mut allow = Vec::new();
    for a in &raw.allow {
        let (m, p) = a
            .split_once(' ')
            .filter(|(_, p)| p.starts_with('/'))
            .ok_or_else(|| format!("auth.allow: {a:?}: write it as \"GET /v1/models\""))?;
        let m = http::Method::from_bytes(m.as_bytes())
            .map_err(|_| format!("auth.allow: {a:?}: {m:?} is not an HTTP method"))?;
        allow.push((m, p.to_string()));
    }
    Ok(AuthConfig {
        mode,
        keys_file,
        keys: Arc::new(store),
        upstream_auth,
        upstream_key_header: raw.upstream_key_header,
        mismatch,
        allow,
    })
}

/// What a request presents as its key.
#[derive(Debug, PartialEq, Eq)]
pub enum Presented<'a> {
    None,
    Key(&'a str),
    /// Different keys in different headers: which one counts would be a guess.
    Conflicting,
}

/// The token of an `Authorization: Bearer <token>` value (scheme in any case, blanks
/// around the token ignored); `None` for another scheme or an empty token. The one reading of
/// bearer tokens: virtual keys, and the admin API's token.
pub fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The key a request presents: `Authorization: Bearer <key>`, `x-api-key: <key>` or
/// `api-key: <key>` (the same key in several of them is one key).
pub fn presented(headers: &http::HeaderMap) -> Presented<'_> {
    let bearer = headers
        .get_all(http::header::AUTHORIZATION)
        .iter()
        .filter_map(|v| bearer(v.to_str().ok()?));
    let plain = ["x-api-key", "api-key"].into_iter().flat_map(|h| {
        headers
            .get_all(h)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::trim))
    });
    let mut found = Presented::None;
    for k in bearer.chain(plain).filter(|k| !k.is_empty()) {
        found = match found {
            Presented::None => Presented::Key(k),
            Presented::Key(f) if f == k => Presented::Key(f),
            _ => return Presented::Conflicting,
        };
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_keys_are_found_by_hash_and_revoked_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let (a, sa) = issue("alice", Some("lab")).unwrap();
        let (b, mut sb) = issue("bob", None).unwrap();
        sb.revoked = true;
        write_keys(
            &path,
            &KeysFile {
                keys: vec![sa.clone(), sb],
            },
        )
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            !text.contains(&a) && !text.contains(&b),
            "keys are not stored"
        );
        let raw = RawAuth {
            mode: Mode::VirtualKeys,
            keys_file: "keys.toml".into(),
            ..RawAuth::default()
        };
        let c = compile(&raw, dir.path()).unwrap();
        let id = c.keys.lookup(&a).unwrap();
        assert_eq!(
            (id.user.as_str(), id.team.as_deref()),
            ("alice", Some("lab"))
        );
        assert_eq!(id.key_id, sa.id);
        assert!(c.keys.lookup(&b).is_none(), "revoked");
        assert!(c.keys.lookup("tt-guess").is_none());
        assert_eq!(format!("{:?}", Secret("sk-x".into())), "<redacted>");
    }

    #[test]
    fn keys_are_read_from_bearer_x_api_key_or_api_key_headers() {
        let h = |pairs: &[(&'static str, &str)]| {
            let mut h = http::HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, v.parse().unwrap());
            }
            h
        };
        let k = h(&[("authorization", "Bearer  tt-abc ")]);
        assert_eq!(presented(&k), Presented::Key("tt-abc"));
        let k = h(&[("x-api-key", "tt-x")]);
        assert_eq!(presented(&k), Presented::Key("tt-x"));
        let k = h(&[("api-key", "tt-def")]);
        assert_eq!(presented(&k), Presented::Key("tt-def"));
        let k = h(&[("authorization", "Bearer tt-a"), ("x-api-key", "tt-a")]);
        assert_eq!(presented(&k), Presented::Key("tt-a"), "one key, twice");
        let k = h(&[("authorization", "Bearer tt-a"), ("x-api-key", "tt-b")]);
        assert_eq!(presented(&k), Presented::Conflicting);
        let k = h(&[("x-api-key", "tt-a"), ("x-api-key", "tt-b")]);
        assert_eq!(presented(&k), Presented::Conflicting);
        let k = h(&[("authorization", "Basic dXNlcjpwdw==")]);
        assert_eq!(presented(&k), Presented::None);
        let k = h(&[("authorization", "Bearer   ")]);
        assert_eq!(presented(&k), Presented::None);
        assert_eq!(bearer("bEaReR t1"), Some("t1"));
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(presented(&http::HeaderMap::new()), Presented::None);
    }

    #[test]
    fn the_real_key_is_written_for_the_header_it_goes_in() {
        assert_eq!(KeyHeader::Authorization.value("sk-1"), "Bearer sk-1");
        assert_eq!(KeyHeader::XApiKey.value("sk-1"), "sk-1");
        assert_eq!(KeyHeader::ApiKey.value("sk-1"), "sk-1");
        let raw: RawAuth = toml::from_str("upstream_key_header = \"x-api-key\"").unwrap();
        assert_eq!(raw.upstream_key_header, KeyHeader::XApiKey);
        assert!(toml::from_str::<RawAuth>("upstream_key_header = \"bearer\"").is_err());
    }
}
