//! Replays the fuzzers' corpora (fuzz/corpus, minimized, and fuzz/regressions, inputs that
//! once failed) through the same checks the fuzz targets run: no panic, and the same result
//! for any split of the input.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries {
            let path = e.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let r = std::panic::catch_unwind(|| check(&data));
            assert!(r.is_ok(), "{} fails the {target} target", path.display());
            n += 1;
        }
    }
    n
}

#[test]
fn sse_corpus_replays_cleanly() {
    assert!(replay("sse", tokentap::fuzzing::sse) > 0, "no corpus");
}

#[test]
fn request_corpus_replays_cleanly() {
    assert!(
        replay("request", tokentap::fuzzing::request) > 0,
        "no corpus"
    );
}

#[test]
fn response_corpus_replays_cleanly() {
    assert!(
        replay("response", tokentap::fuzzing::response) > 0,
        "no corpus"
    );
}

#[test]
fn strip_corpus_replays_cleanly() {
    assert!(replay("strip", tokentap::fuzzing::strip) > 0, "no corpus");
}
