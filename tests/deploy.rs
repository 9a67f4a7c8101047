//! The shipped deployment files, checked with the tools that consume them: the alerting rules
//! with promtool (checked and unit-tested), the compose stack's Prometheus config, the compose
//! file with docker-compose, the Kubernetes manifests against the Kubernetes schemas
//! (kubernetes-validate), and every shipped tokentap config with `tokentap check-config`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run ({e}); scripts/test.sh installs it"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

#[test]
fn alerting_rules_check_and_pass_their_unit_tests() {
    let dir = root().join("deploy/prometheus");
    let said = run(
        Command::new("promtool")
            .args(["check", "rules", "alerts.yml"])
            .current_dir(&dir),
        "promtool check rules",
    );
    assert!(said.contains("SUCCESS: 8 rules found"), "{said}");
    run(
        Command::new("promtool")
            .args(["test", "rules", "alerts.test.yml"])
            .current_dir(&dir),
        "promtool test rules",
    );
}

#[test]
fn the_compose_stacks_prometheus_config_checks_with_its_rules() {
    // The compose file mounts alerts.yml at /etc/prometheus; check the same pair here.
    let tmp = tempfile::tempdir().unwrap();
    let cfg = std::fs::read_to_string(root().join("deploy/compose/prometheus.yml"))
        .unwrap()
        .replace(
            "/etc/prometheus/alerts.yml",
            root()
                .join("deploy/prometheus/alerts.yml")
                .to_str()
                .unwrap(),
        );
    let path = tmp.path().join("prometheus.yml");
    std::fs::write(&path, cfg).unwrap();
    let said = run(
        Command::new("promtool")
            .arg("check")
            .arg("config")
            .arg(&path),
        "promtool check config",
    );
    assert!(said.contains("SUCCESS: 8 rules found"), "{said}");
}

#[test]
fn the_compose_file_parses() {
    let said = run(
        Command::new("docker-compose")
            .args([
                "-f",
                "deploy/compose/docker-compose.yml",
                "--profile",
                "demo",
                "config",
            ])
            .current_dir(root()),
        "docker-compose config",
    );
    for service in [
        "tokentap:",
        "redis:",
        "prometheus:",
        "grafana:",
        "otel-collector:",
        "jaeger:",
        "mock:",
    ] {
        assert!(said.contains(service), "{service} missing:\n{said}");
    }
}

#[test]
fn the_kubernetes_manifests_validate_against_the_schemas() {
    // kubernetes-validate lives in the test virtualenv scripts/test.sh makes (TOKENTAP_PYTHON).
    let python = std::env::var("TOKENTAP_PYTHON").unwrap_or_else(|_| "python3".into());
    let bin = Path::new(&python)
        .parent()
        .map(|d| d.join("kubernetes-validate"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("kubernetes-validate"));
    let dir = root().join("deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "yaml")
                && !p.ends_with("kustomization.yaml")
                // A CRD of the Prometheus Operator: not in the Kubernetes schemas.
                && !p.ends_with("servicemonitor.optional.yaml")
        })
        .collect();
    files.sort();
    assert!(files.len() >= 6);
    let said = run(
        Command::new(&bin).arg("--strict").args(&files),
        "kubernetes-validate",
    );
    assert!(!said.contains("ERROR"), "{said}");
    // The Deployment runs at least two replicas on the Redis ledger, probed, scraped.
    let dep = std::fs::read_to_string(dir.join("deployment.yaml")).unwrap();
    for needle in [
        "replicas: 2",
        "livenessProbe",
        "readinessProbe",
        "prometheus.io/scrape",
    ] {
        assert!(dep.contains(needle), "{needle}");
    }
}

/// The `tokentap.toml` inside the Kubernetes ConfigMap.
fn configmap_toml() -> String {
    let text = std::fs::read_to_string(root().join("deploy/kubernetes/configmap.yaml")).unwrap();
    let body = text.split("tokentap.toml: |\n").nth(1).unwrap();
    body.lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l.trim()))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_shipped_config_passes_check_config() {
    let tmp = tempfile::tempdir().unwrap();
    let pricing = root().join("config/pricing.toml");
    let configs: Vec<(&str, String)> = vec![
        (
            "container",
            std::fs::read_to_string(root().join("deploy/container/tokentap.toml")).unwrap(),
        ),
        (
            "compose",
            std::fs::read_to_string(root().join("deploy/compose/config/tokentap.toml")).unwrap(),
        ),
        (
            "compose demo",
            std::fs::read_to_string(root().join("deploy/compose/config/demo.toml")).unwrap(),
        ),
        (
            "compose tls",
            std::fs::read_to_string(root().join("deploy/compose/config/tokentap-tls.toml"))
                .unwrap(),
        ),
        ("kubernetes", configmap_toml()),
    ];
    for (name, text) in configs {
        let dir = tmp.path().join(name.replace(' ', "-"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(&pricing, dir.join("pricing.toml")).unwrap();
        // The Redis CA the Kubernetes pods mount next to the config (redis-ca.crt) and the
        // compose TLS overlay at /etc/tokentap-redis-ca: read when the config loads (its
        // content only when connecting).
        let ca = dir.join("redis-ca.crt");
        std::fs::write(&ca, "a CA certificate").unwrap();
        // The compose stack mounts the repository's config/ at /etc/tokentap-prices.
        let text = text
            .replace(
                "/etc/tokentap-prices/pricing.toml",
                pricing.to_str().unwrap(),
            )
            .replace("/etc/tokentap-redis-ca/ca.crt", ca.to_str().unwrap());
        std::fs::write(dir.join("tokentap.toml"), text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_tokentap"))
            .arg("check-config")
            .arg(dir.join("tokentap.toml"))
            .env("UPSTREAM_API_KEY", "sk-test")
            .env("TOKENTAP_ADMIN_TOKEN", "a-token-of-sixteen-chars")
            .env("REDIS_PASSWORD", "a-redis-password")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_container_health_check_command_follows_healthz() {
    // What the Dockerfile's HEALTHCHECK runs: 0 against a live admin listener, 1 without one.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let st = Command::new(env!("CARGO_BIN_EXE_tokentap"))
        .args(["health", "--admin", &addr.to_string()])
        .status()
        .unwrap();
    assert!(!st.success());
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains(r#"CMD ["tokentap", "health", "--admin", "127.0.0.1:9464"]"#));
    assert!(dockerfile.contains("USER 10001"));
}
