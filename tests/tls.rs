//! HTTPS upstreams: rustls with SNI and certificate verification.

mod common;

use common::*;

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// A private CA and a certificate for `localhost` signed by it.
    fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(dir.path().join("cert.pem"), leaf.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        Pki { dir }
    }
    fn path(&self, f: &str) -> std::path::PathBuf {
        self.dir.path().join(f)
    }
}

#[test]
fn https_upstream_gets_sni_and_a_verified_certificate() {
    let pki = Pki::new();
    let mock = Mock::start_tls(&pki.path("cert.pem"), &pki.path("key.pem"));
    let url = format!("https://localhost:{}", mock.addr.port());
    let tap = TapBuilder::new(&url)
        .upstream_extra(&format!(
            "ca_file = \"{}\"\ninject_stream_usage = false",
            pki.path("ca.pem").display()
        ))
        .extra(TEST_PRICING)
        .start();
    let body = chat_body("anthropic/claude-opus-4.6", "tls-user", true, "");
    let resp = post_chat(tap.addr, &[], &body);
    assert_eq!(resp.status, 200);
    assert!(resp.complete);
    let m = &mock.wait_requests(1)[0];
    assert_eq!(m["sni"], "localhost");
    assert_eq!(
        m["headers"]["host"],
        format!("localhost:{}", mock.addr.port())
    );
    assert_eq!(m["body_sha256"], sha256_hex(&body));
    assert_eq!(m["response_sha256"], sha256_hex(&resp.body));
    let r = &tap.wait_records(1)[0];
    assert_eq!(r["usage_source"], "reported");
}

#[test]
fn https_upstream_with_an_untrusted_certificate_is_refused() {
    let pki = Pki::new();
    let mock = Mock::start_tls(&pki.path("cert.pem"), &pki.path("key.pem"));
    // The system roots do not include the test CA.
    let tap = TapBuilder::new(&format!("https://localhost:{}", mock.addr.port())).start();
    let body = chat_body("anthropic/claude-opus-4.6", "tls-user", false, "");
    let resp = post_chat(tap.addr, &[], &body);
    assert_eq!(resp.status, 502);
    assert_eq!(resp.json()["error"]["type"], "upstream_error");
    assert!(
        mock.requests().is_empty(),
        "nothing may reach an unverified upstream"
    );
    let r = &tap.wait_records(1)[0];
    assert_eq!(r["outcome"], "upstream_error");
}
