#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit and property tests, and integration tests that
# start the real tokentap binary against the mock upstream (and the official openai Python SDK).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_rust fmt clippy
need_build_tools
need_deb python3 python3
# A real Prometheus scrapes tokentap in tests/dashboards.rs; promtool checks the exposition.
need_deb prometheus prometheus
need_deb promtool prometheus
# A real Redis backs the shared-budget tests (tests/redis.rs), and redis-cli builds the
# Cluster and asks the Sentinel in tests/redis_production.rs.
need_deb redis-server redis-server
need_deb redis-cli redis-tools
# unshare, nsenter and mount give tokentap a disk of its own to fill (tests/faults.rs).
need_deb unshare util-linux
need_deb nsenter util-linux

# A real headless browser drives the admin page (tests/admin_browser.rs): Debian's Chromium,
# through ChromeDriver.
need_deb chromium chromium
need_deb chromedriver chromium-driver

# docker-compose parses the compose stack (tests/deploy.rs); it need not run containers.
need_deb docker-compose docker-compose

# A private virtualenv (Debian's own Python refuses system-wide pip installs) with the openai
# SDK, for the "same objects through tokentap" test, and kubernetes-validate, which checks the
# Kubernetes manifests against the Kubernetes schemas.
venv=target/sdk-venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" 2>/dev/null || {
        rm -rf "$venv"
        install_deb python3-venv
        python3 -m venv "$venv"
    }
fi
# The versions are pinned in tests/sdk/requirements.txt; installed only when one differs.
reqs=tests/sdk/requirements.txt
"$venv/bin/python" - "$reqs" 2>/dev/null <<'PY' ||
import sys, importlib.metadata as m
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if line:
        name, version = line.split("==")
        assert m.version(name) == version, name
PY
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$reqs"
TOKENTAP_PYTHON="$PWD/$venv/bin/python"
export TOKENTAP_PYTHON

# Integration tests open many sockets.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
# The build without the default allocator (mimalloc) must stay sound too.
cargo clippy --no-default-features -- -D warnings
# The benchmark's own programs (bench/) are held to the same lints.
cargo clippy -p tokentap-bench --all-targets -- -D warnings

log=$(mktemp)
trap 'rm -f "$log"' EXIT
# A test that hangs fails the suite with a message instead of holding CI to its limit.
SUITE_TIMEOUT=${SUITE_TIMEOUT:-40m}
set +e
timeout -k 30s "$SUITE_TIMEOUT" cargo test --all-targets 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
if [ "$status" = 124 ] || [ "$status" = 137 ]; then
    echo "error: the test suite did not finish within $SUITE_TIMEOUT (SUITE_TIMEOUT): a test hangs; the last 'test ...' lines above name the ones still running" >&2
fi
# One closing line for the whole suite (cargo ends with per-binary lines, some of them empty).
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
