#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers (libFuzzer through cargo-fuzz; needs the nightly
# toolchain): the SSE decoder, request inspection (and the usage splice), usage extraction
# and the stream filter that takes asked-for usage out. Each target runs
# RUNS inputs (default 10 million) from its corpus, then what added coverage is merged into
# fuzz/corpus/<target>, which the normal test suite replays (tests/fuzz_corpus.rs).
#
#   scripts/fuzz.sh                 # all three targets
#   RUNS=1000000 scripts/fuzz.sh sse
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
if ! rustup toolchain list 2>/dev/null | grep -q nightly; then
    echo "fuzz.sh: needs the nightly toolchain (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo +nightly install cargo-fuzz --locked
fi
RUNS=${RUNS:-10000000}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(sse request response strip)
for t in "${targets[@]}"; do
    mkdir -p "work/$t" "corpus/$t"
    echo "== $t: $RUNS runs"
    # -s none: Rust is memory-safe; the targets check their own invariants (panics).
    cargo +nightly fuzz run -s none "$t" "work/$t" "corpus/$t" -- \
        -runs="$RUNS" -max_len=4096 -print_final_stats=1 2>&1 | tee "work/$t.log" | \
        grep -E "^#[0-9]+ +DONE|stat::|Done|ERROR|panicked" || true
    # Keep what adds coverage as the regression corpus.
    cargo +nightly fuzz run -s none "$t" "corpus/$t" "work/$t" -- -merge=1 2>&1 | tail -1
done
