#!/usr/bin/env bash
# Runs tokentap (release build) on config/tokentap.toml, or on $TOKENTAP_CONFIG.
#   scripts/run.sh          the proxy, in front of the upstream named in the config
#   scripts/run.sh --demo   the README tour: also starts the mock upstream on 127.0.0.1:8000
#                           and uses config/demo.toml, so no API key is needed
# No database or other service is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_rust
need_deb cmake cmake   # Pingora's zlib-ng (flate2) builds with cmake
need_deb cc gcc

cargo build --release --bins
if [ "${1:-}" = "--demo" ]; then
    ./target/release/tokentap-mock --listen 127.0.0.1:8000 &
    mock=$!
    trap 'kill $mock 2>/dev/null || true' EXIT
    ./target/release/tokentap serve --config config/demo.toml
else
    exec ./target/release/tokentap serve --config "${TOKENTAP_CONFIG:-config/tokentap.toml}"
fi
