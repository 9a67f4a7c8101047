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
    /// "passthrough" or "virtual_keys".
    pub mode: String,
    /// The issued keys (hashes only), relative to the config file.
    pub keys_file: PathBuf,
    /// The environment variable holding the upstream's real API key (virtual_keys).
    pub upstream_key_env: Option<String>,
    /// A body `user` other than the key's: "reject" (403) or "overwrite" (the body sent
    /// upstream names the key's user).
    pub user_mismatch: String,
    /// What a virtual key may call upstream (with the real key): "METHOD /path" entries. Chat
    /// Completions is always allowed; everything else is refused with 403 (an unmetered path
    /// on the operator's key would bypass every cap).
    pub allow: Vec<String>,
}

impl Default for RawAuth {
    fn default() -> Self {
        RawAuth {
            mode: "passthrough".into(),
            keys_file: PathBuf::from("tokentap-keys.toml"),
            upstream_key_env: None,
            user_mismatch: "reject".into(),
            allow: vec!["GET /v1/models".into()],
        }
    }
}

/// A secret that never prints.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Passthrough,
    VirtualKeys,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mismatch {
    Reject,
    Overwrite,
}

/// `[auth]`, checked, with its keys loaded.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub mode: Mode,
    pub keys_file: PathBuf,
    pub keys: Arc<KeyStore>,
    /// `Authorization` value sent upstream in virtual_keys mode (`Bearer <key>`).
    pub upstream_auth: Option<Secret>,
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
    let mode = match raw.mode.as_str() {
        "passthrough" => Mode::Passthrough,
        "virtual_keys" => Mode::VirtualKeys,
        o => {
            return Err(format!(
                "auth.mode: {o:?}: use \"passthrough\" or \"virtual_keys\""
            ))
        }
    };
    let mismatch = match raw.user_mismatch.as_str() {
        "reject" => Mismatch::Reject,
        "overwrite" => Mismatch::Overwrite,
        o => {
            return Err(format!(
                "auth.user_mismatch: {o:?}: use \"reject\" or \"overwrite\""
            ))
        }
    };
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
            let value = format!("Bearer {}", v.trim());
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
        mismatch,
        allow,
    })
}

/// The key a request presents: `Authorization: Bearer <key>` or `api-key: <key>`.
pub fn presented(headers: &http::HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            return Some(v[7..].trim());
        }
    }
    headers
        .get("api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// The body with every top-level `user` set to `user`, members otherwise as sent (order,
/// values); `None` if it is not a JSON object.
pub fn rewrite_user(body: &[u8], user: &str) -> Option<Vec<u8>> {
    use serde::de::{MapAccess, Visitor};
    use serde_json::value::RawValue;
    struct Members(Vec<(String, Box<RawValue>)>);
    impl<'de> Deserialize<'de> for Members {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Members;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a JSON object")
                }
                fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Members, A::Error> {
                    let mut v = Vec::new();
                    while let Some(k) = m.next_key::<String>()? {
                        v.push((k, m.next_value::<Box<RawValue>>()?));
                    }
                    Ok(Members(v))
                }
            }
            d.deserialize_map(V)
        }
    }
    let members: Members = serde_json::from_slice(body).ok()?;
    let user = serde_json::to_string(user).ok()?;
    let mut out = Vec::with_capacity(body.len() + user.len());
    out.push(b'{');
    for (i, (k, v)) in members.0.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(serde_json::to_string(k).ok()?.as_bytes());
        out.push(b':');
        if k == "user" {
            out.extend_from_slice(user.as_bytes());
        } else {
            out.extend_from_slice(v.get().as_bytes());
        }
    }
    out.push(b'}');
    Some(out)
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
            mode: "virtual_keys".into(),
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
    fn the_user_is_rewritten_and_nothing_else() {
        let body = br#"{"model":"m","user":"bob","messages":[{"role":"user","content":"hi \"x\""}],"user":"eve"}"#;
        let out = rewrite_user(body, "al\"ice").unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"model":"m","user":"al\"ice","messages":[{"role":"user","content":"hi \"x\""}],"user":"al\"ice"}"#
        );
        assert!(rewrite_user(b"[1]", "a").is_none());
    }

    #[test]
    fn keys_are_read_from_bearer_or_api_key_headers() {
        let mut h = http::HeaderMap::new();
        h.insert("authorization", "Bearer  tt-abc ".parse().unwrap());
        assert_eq!(presented(&h), Some("tt-abc"));
        let mut h = http::HeaderMap::new();
        h.insert("api-key", "tt-def".parse().unwrap());
        assert_eq!(presented(&h), Some("tt-def"));
        assert_eq!(presented(&http::HeaderMap::new()), None);
    }
}
