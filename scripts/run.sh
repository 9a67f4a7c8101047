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
need_build_tools
# HTTPS upstreams are verified against the system's roots.
[ -e /etc/ssl/certs/ca-certificates.crt ] || install_deb ca-certificates

cargo build --release --bins
if [ "${1:-}" = "--demo" ]; then
    ./target/release/tokentap-mock --listen 127.0.0.1:8000 &
    mock=$!
    trap 'kill $mock 2>/dev/null || true' EXIT
    for _ in $(seq 50); do
        kill -0 "$mock" 2>/dev/null || { echo "error: the mock upstream did not start (is port 8000 taken?)" >&2; exit 1; }
        (exec 3<>/dev/tcp/127.0.0.1/8000) 2>/dev/null && break
        sleep 0.1
    done
    echo "tokentap: proxy on http://127.0.0.1:8080, admin page on http://127.0.0.1:9464/"
    ./target/release/tokentap serve --config config/demo.toml
else
    exec ./target/release/tokentap serve --config "${TOKENTAP_CONFIG:-config/tokentap.toml}"
fi
