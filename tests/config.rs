//! `tokentap check-config` against the shipped files and against broken ones.

use std::path::Path;
use std::process::Command;

fn check(path: &Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tokentap"))
        .arg("check-config")
        .arg(path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn repo(p: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

#[test]
fn shipped_configs_are_valid() {
    for f in ["config/tokentap.toml", "config/demo.toml"] {
        let (ok, text) = check(&repo(f));
        assert!(ok, "{f}: {text}");
        assert!(text.contains("34 priced models"), "{text}");
    }
}

#[test]
fn shipped_price_table_covers_every_model_the_target_lists() {
    let text = std::fs::read_to_string(repo("config/pricing.toml")).unwrap();
    let v: toml::Table = toml::from_str(&text).unwrap();
    let models = v["models"].as_table().unwrap();
    for m in [
        "anthropic/claude-opus-4.8",
        "anthropic/claude-opus-4.6",
        "anthropic/claude-sonnet-4.6",
        "anthropic/claude-haiku-4.5",
        "google/gemini-3.5-flash",
        "google/gemini-3.1-pro-preview",
        "google/gemini-3.1-flash-lite",
        "google/gemini-3-flash-preview",
        "openai/gpt-5.5-pro",
        "openai/gpt-5.5",
        "openai/gpt-5.4",
        "moonshotai/kimi-k2.6",
        "moonshotai/kimi-k2.5",
        "minimax/minimax-m2.5",
        "qwen/qwen3.6-plus",
    ] {
        let p = models.get(m).unwrap_or_else(|| panic!("{m} has no price"));
        assert!(p.get("input_per_mtok").is_some() && p.get("output_per_mtok").is_some());
        // Each entry says where its figure came from.
        let at = text.find(&format!("[models.\"{m}\"]")).unwrap();
        let comment = text[at..].lines().nth(1).unwrap();
        assert!(
            comment.starts_with("# ") && comment.contains("price"),
            "{m}: {comment}"
        );
    }
    assert!(text.contains("MUST CHECK EVERY FIGURE AGAINST THEIR OWN CONTRACT"));
}

#[test]
fn errors_name_the_file_the_line_and_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[upstream]\nurl = \"http://127.0.0.1:1\"\nread_timeout = 5\n",
            vec!["line 3", "read_timeout"],
        ),
        ("[upstream]\nurl = \"ftp://x\"\n", vec!["upstream.url", "https://"]),
        (
            "[server]\nthreads = 0\n[upstream]\nurl = \"http://a\"\n",
            vec!["server.threads"],
        ),
        (
            "[upstream]\nurl = \"http://a\"\n[pricing]\nfile = \"missing.toml\"\n",
            vec!["pricing.file", "missing.toml"],
        ),
        (
            "[upstream]\nurl = \"http://a\"\n[pricing.models.\"m\"]\ninput_per_mtok = \"1.2.3\"\noutput_per_mtok = 1\n",
            vec!["pricing.models.\"m\".input_per_mtok"],
        ),
        ("[upstream\nurl = 1\n", vec!["line 1"]),
    ];
    for (i, (text, needles)) in cases.iter().enumerate() {
        let p = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&p, text).unwrap();
        let (ok, out) = check(&p);
        assert!(!ok, "case {i} passed: {out}");
        assert!(out.contains(&p.display().to_string()), "case {i}: {out}");
        for n in needles {
            assert!(out.contains(n), "case {i}: {out:?} lacks {n:?}");
        }
    }
    // An error inside the included pricing file names that file.
    std::fs::write(
        dir.path().join("p.toml"),
        "[models.\"m\"]\ninput_per_mtok = 1\n",
    )
    .unwrap();
    let main = dir.path().join("main.toml");
    std::fs::write(
        &main,
        "[upstream]\nurl = \"http://a\"\n[pricing]\nfile = \"p.toml\"\n",
    )
    .unwrap();
    let (ok, out) = check(&main);
    assert!(!ok);
    assert!(
        out.contains("p.toml") && out.contains("output_per_mtok"),
        "{out}"
    );
}
