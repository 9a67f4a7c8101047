#!/usr/bin/env python3
"""The measuring half of bench/run.sh (the shell script starts and stops the targets).

    measure.py bodies DIR
        The request bodies: DIR/body-{1k,256k}-{n,s}.jsonl, 100 lines each, one JSON body a line,
        users user-000..user-099, each line exactly 1 KiB or 256 KiB.
    measure.py target NAME --pid PID --port PORT --dir DIR --mock-port PORT
        Every measurement of one running target (its process tree is PID and its descendants):
        warm-up and idle RSS, then per workload a saturation run (closed loop) with CPU and peak
        RSS, and runs at fixed rates (open loop); the latency-against-rate series; RSS with many
        open streams. Writes DIR/results/NAME.json.
    measure.py metering NAME --dir DIR --otlp-port P --access-log FILE --config FILE --tokentap BIN
        After tokentap has stopped: the proof that it metered (spans received by the OTLP sink,
        access-log lines, the ledger's spend). Added to DIR/results/NAME.json.
    measure.py finish --dir DIR --targets a,b,c --out FILE [--copy FILE]
        Merges the targets' results with the machine's description into one JSON file.

The load generator (oha) and hold-streams run pinned to CPU 0 (taskset), like the mock.
Knobs from the environment: BENCH_DURATION (8s; 2s with BENCH_QUICK=1), BENCH_REPEAT (saturation
runs per workload, the median reported: 3; 1 quick), BENCH_QUICK=1, THREADS,
BENCH_HOLD_TIMEOUT (180 s; 60 s quick), and BENCH_COMMAND (the command line, for the report).
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
LOAD_CPU = "0"
PROXY_CPU = "1"

QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
DURATION = os.environ.get("BENCH_DURATION") or ("2s" if QUICK else "8s")
# Saturation runs per workload and target; the median one is reported (with the others'
# rates). Repeats on this (virtual) machine differ by up to a third from one another.
REPEAT = int(os.environ.get("BENCH_REPEAT") or ("1" if QUICK else "3"))
FIXED_RATES = [500, 2000]
# One call at a time (one connection, closed loop), per workload: the latency a call pays for
# the proxy when nothing queues.
SERIAL_DURATION = os.environ.get("BENCH_SERIAL_DURATION") or ("1s" if QUICK else "5s")
SERIES_RATES = [250, 500, 2000] if QUICK else [250, 500, 1000, 2000, 4000, 8000]
HOLD_STREAMS = 500 if QUICK else 5000
HOLD_TIMEOUT_S = float(os.environ.get("BENCH_HOLD_TIMEOUT", "60" if QUICK else "180"))
STREAM_DELAY_US = 1000
# Closed-loop connections: a streaming call lasts 20 chunks x 1 ms, so streams need more of them
# to keep a proxy busy. Open-loop runs get enough connections that the rate is reachable.
SATURATION_CONNECTIONS = {False: 64, True: 256}
RATE_CONNECTIONS = 256
# A fixed-rate run whose completed calls fall below this share of the offered rate is marked
# as saturated: the target could not sustain the rate.
REACHED = 0.95
AUTH = "Bearer sk-bench"

WORKLOADS = [
    {"id": "1k-n", "label": "non-streaming, 1 KiB prompt", "stream": False, "size": 1024},
    {"id": "1k-s", "label": "streaming, 1 KiB prompt", "stream": True, "size": 1024},
    {"id": "256k-n", "label": "non-streaming, 256 KiB prompt", "stream": False, "size": 256 * 1024},
    {"id": "256k-s", "label": "streaming, 256 KiB prompt", "stream": True, "size": 256 * 1024},
]
SERIES_WORKLOAD = "1k-n"

TARGETS = {
    "direct": "direct (mock)",
    "nginx": "nginx",
    "bare": "bare-pingora",
    "tokentap": "tokentap",
    "litellm": "LiteLLM",
}

CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"   {msg}", file=sys.stderr, flush=True)


def duration_s(text):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", text.strip())
    if not m:
        sys.exit(f"error: BENCH_DURATION must look like 8s, 1m or 500ms, not {text!r}")
    value, unit = float(m.group(1)), m.group(2) or "s"
    return value * {"ms": 0.001, "s": 1, "m": 60}[unit]


# ---------------------------------------------------------------- bodies


def body_line(user, stream, size):
    head = f'{{"model":"bench/model","user":"{user}","stream":{"true" if stream else "false"},'
    head += '"messages":[{"role":"user","content":"'
    tail = '"}]}'
    pad = size - len(head) - len(tail)
    line = head + "x" * pad + tail
    assert len(line.encode()) == size
    return line


def body_file(dir_, workload):
    return Path(dir_) / f"body-{workload['id']}.jsonl"


def cmd_bodies(args):
    for w in WORKLOADS:
        with open(body_file(args.dir, w), "w") as f:
            for i in range(100):
                f.write(body_line(f"user-{i:03d}", w["stream"], w["size"]) + "\n")


# ---------------------------------------------------------------- process tree: CPU and RSS


def _stat(pid):
    """(ppid, utime + stime in ticks) from /proc/PID/stat, or None when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is the state (field 3); ppid is field 4, utime 14, stime 15.
    return int(fields[1]), int(fields[11]) + int(fields[12])


def tree(root):
    """The process and all its descendants."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(entry)
            if st:
                children.setdefault(st[0], []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        st = _stat(pid)
        if st:
            total += st[1]
    return total / CLK_TCK


def rss_bytes(pids):
    """VmRSS of one process; for a tree of several (nginx, LiteLLM), the sum of their Pss, so
    that pages they share (code, copy-on-write memory) are not counted once per process."""
    pids = list(pids)
    field, path = ("VmRSS:", "status") if len(pids) == 1 else ("Pss:", "smaps_rollup")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/{path}") as f:
                for line in f:
                    if line.startswith(field):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


class RssSampler:
    """Samples the tree's memory (rss_bytes) every 100 ms in a thread; keeps the peak."""

    def __init__(self, root):
        self.root, self.peak, self.samples = root, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(tree(self.root)))
            self.samples += 1
            self._stop.wait(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------- oha


def oha(url, body, duration, connections, rate=None, n=None):
    """One oha run, pinned to the load CPU; returns its JSON output."""
    cmd = ["taskset", "-c", LOAD_CPU, "oha", "--no-tui", "--output-format", "json"]
    # -w: calls still in flight when the duration ends are waited for and counted (their time
    # is part of the run's), so that a slow target's last calls are not lost.
    cmd += ["-n", str(n)] if n else ["-z", duration, "-w"]
    cmd += ["-t", "120s"]
    cmd += ["-c", str(connections)]
    if rate:
        cmd += ["-q", str(rate), "--latency-correction"]
    cmd += ["-m", "POST", "-T", "application/json", "-Z", str(body)]
    cmd += ["-H", f"x-bench-delay-us: {STREAM_DELAY_US}", "-H", f"authorization: {AUTH}", url]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"oha failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout)


def latency_text(run):
    lat = run["latency_ms"]
    return " ".join(f"{p} {'-' if lat[p] is None else f'{lat[p]:.3f}'} ms" for p in ("p50", "p99"))


def summarize(raw, connections, rate=None):
    """The figures the report needs from one oha run."""
    statuses = {str(k): int(v) for k, v in (raw.get("statusCodeDistribution") or {}).items()}
    errors = dict(raw.get("errorDistribution") or {})
    # Calls still in flight when the duration ends: normal for a timed run, not a failure.
    aborted = int(errors.pop("aborted due to deadline", 0))
    completed = sum(statuses.values())
    ok = statuses.get("200", 0)
    elapsed = float(raw["summary"]["total"])
    pct = raw.get("latencyPercentiles") or {}
    lat = {p: (pct[p] * 1000 if pct.get(p) is not None else None) for p in ("p50", "p90", "p99")}
    run = {
        "connections": connections,
        "offered_rate": rate,
        "elapsed_s": elapsed,
        "ok": ok,
        "completed": completed,
        "non_200": completed - ok,
        "statuses": statuses,
        "errors": errors,
        "error_count": sum(errors.values()),
        "aborted_at_deadline": aborted,
        "rps": ok / elapsed if elapsed > 0 else 0.0,
        "oha_requests_per_sec": raw["summary"].get("requestsPerSec"),
        "latency_ms": lat,
    }
    if rate:
        run["saturated"] = run["rps"] < REACHED * rate
    return run


# ---------------------------------------------------------------- one target


def mock_count(mock_port, what):
    """One of the mock's counters: `requests` served so far, or streams `active` right now."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{mock_port}/__bench/{what}", timeout=5) as r:
            return int(r.read())
    except Exception:
        return None


def hold_streams(pid, port, n, mock_port):
    """hold-streams against the target; the tree's RSS right after every stream is open."""
    cmd = ["taskset", "-c", LOAD_CPU, str(RELEASE / "hold-streams"), "--target", f"127.0.0.1:{port}"]
    # 20 s streams: every one is still running when the last has opened (checked below).
    cmd += ["--n", str(n), "--delay-us", "1000000", "--chunks", "20"]
    result = {"streams": n, "delay_us": 1000000, "chunks": 20, "rss_open_bytes": None}
    served = mock_count(mock_port, "requests")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, failures = [], []

    def read_out():
        for line in proc.stdout:
            line = line.strip()
            lines.append(line)
            if line == f"open {n}":
                result["rss_open_bytes"] = rss_bytes(tree(pid))
                result["open_after_s"] = round(time.monotonic() - start, 2)
                # The proof that all n are open at this moment, end to end: the mock is
                # still serving each of them.
                result["mock_active_at_sample"] = mock_count(mock_port, "active")

    def read_err():
        for line in proc.stderr:
            failures.append(line.strip())

    readers = [threading.Thread(target=read_out), threading.Thread(target=read_err)]
    with RssSampler(pid) as sampler:
        for t in readers:
            t.start()
        try:
            proc.wait(timeout=HOLD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # How far it got: the memory then, and the calls that reached the mock.
            result["rss_at_timeout_bytes"] = rss_bytes(tree(pid))
            now = mock_count(mock_port, "requests")
            if served is not None and now is not None:
                result["upstream_requests_at_timeout"] = now - served
            proc.kill()
            proc.wait()
            result["timeout_s"] = HOLD_TIMEOUT_S
        for t in readers:
            t.join()
    result["rss_peak_bytes"] = sampler.peak
    result["exit_code"] = proc.returncode
    result["output"] = lines
    done = [l for l in lines if l.startswith("done ")]
    if done:
        ok, failed = (int(x) for x in done[-1].split()[1:3])
        result["ok"], result["failed"] = ok, failed
    else:
        result["ok"], result["failed"] = None, None
    result["failed_lines"] = len(failures)
    # The distinct reasons, without the numbers that make every line different.
    reasons = {}
    for f in failures:
        key = re.sub(r"\d+", "N", f)[:200]
        reasons[key] = reasons.get(key, 0) + 1
    result["failure_reasons"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:5])
    result["passed"] = (
        result["rss_open_bytes"] is not None
        and result["failed"] == 0
        and "timeout_s" not in result
        and (result.get("mock_active_at_sample") or 0) >= n
    )
    result["elapsed_s"] = round(time.monotonic() - start, 2)
    return result


def cmd_target(args):
    name, pid, port = args.name, args.pid, args.port
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    bodies = {w["id"]: body_file(args.dir, w) for w in WORKLOADS}
    res = {"name": name, "label": TARGETS[name], "port": port, "status": "ok", "workloads": {}}
    served_before = mock_count(args.mock_port, "requests")
    calls = {"ok": 0, "completed": 0, "aborted_at_deadline": 0}

    def count(run):
        for k in calls:
            calls[k] += run[k]

    def settle():
        """Until the target is idle again: a slow one (LiteLLM) still works through the calls
        that a run cut off at its deadline, which would slow down the next run."""
        time.sleep(1)
        for _ in range(120):
            procs = tree(pid)
            before = cpu_seconds(procs)
            time.sleep(0.5)
            if cpu_seconds(procs) - before < 0.05:
                return

    # Warm-up, then the idle memory.
    warm = summarize(oha(url, bodies["1k-n"], None, 1, n=20), 1)
    count(warm)
    res["warmup"] = warm
    settle()
    procs = tree(pid)
    res["processes_idle"] = len(procs)
    res["rss_idle_bytes"] = rss_bytes(procs)
    log(f"{name}: idle RSS {res['rss_idle_bytes'] / 1e6:.1f} MB ({len(procs)} processes)")

    for w in WORKLOADS:
        stream = w["stream"]
        entry = {}
        c = SATURATION_CONNECTIONS[stream]
        runs, cpu, answered, peak, samples = [], 0.0, 0, 0, 0
        for i in range(REPEAT):
            procs = tree(pid)
            cpu0 = cpu_seconds(procs)
            with RssSampler(pid) as sampler:
                raw = oha(url, bodies[w["id"]], DURATION, c)
            # Until idle: work a target defers (tokentap's span export, log and ledger writes
            # at a lower priority) belongs to these calls.
            settle()
            procs = tree(pid)
            cpu += cpu_seconds(procs) - cpu0
            one = summarize(raw, c)
            count(one)
            answered += one["ok"]
            peak = max(peak, sampler.peak)
            samples += sampler.samples
            runs.append(one)
        # The median run by throughput; CPU (per call answered 200), memory and failures over
        # all of them.
        sat = dict(sorted(runs, key=lambda r: r["rps"])[len(runs) // 2])
        sat["rps_runs"] = [r["rps"] for r in runs]
        sat["non_200"] = sum(r["non_200"] for r in runs)
        sat["error_count"] = sum(r["error_count"] for r in runs)
        sat["cpu_s"] = cpu
        sat["cpu_s_per_1k"] = cpu / answered * 1000 if answered else None
        sat["rss_peak_bytes"] = peak
        sat["rss_samples"] = samples
        sat["processes"] = len(procs)
        entry["saturation"] = sat
        log(
            f"{name} {w['id']}: saturation {sat['rps']:.0f}/s, "
            f"{sat['cpu_s_per_1k'] or 0:.3f} CPU s/1k, non-200 {sat['non_200']}, errors {sat['error_count']}"
        )
        settle()
        entry["rates"] = {}
        for rate in FIXED_RATES:
            run = summarize(oha(url, bodies[w["id"]], DURATION, RATE_CONNECTIONS, rate=rate), RATE_CONNECTIONS, rate)
            count(run)
            entry["rates"][str(rate)] = run
            log(
                f"{name} {w['id']} @{rate}/s: reached {run['rps']:.0f}/s"
                f"{' (SATURATED)' if run['saturated'] else ''}, {latency_text(run)}"
            )
            settle()
        run = summarize(oha(url, bodies[w["id"]], SERIAL_DURATION, 1), 1)
        count(run)
        entry["serial"] = run
        log(f"{name} {w['id']} one call at a time: {run['rps']:.0f}/s, {latency_text(run)}")
        settle()
        res["workloads"][w["id"]] = entry

    # Latency against rate, one workload. Rates above the measured saturation are skipped,
    # except the lowest, so that every target has a point.
    series_sat = res["workloads"][SERIES_WORKLOAD]["saturation"]["rps"]
    res["series"] = {}
    for i, rate in enumerate(SERIES_RATES):
        key = str(rate)
        if key in res["workloads"][SERIES_WORKLOAD]["rates"]:
            res["series"][key] = res["workloads"][SERIES_WORKLOAD]["rates"][key]
            continue
        if rate > series_sat and i > 0:
            res["series"][key] = {"offered_rate": rate, "skipped": f"above the saturation ({series_sat:.0f}/s)"}
            continue
        run = summarize(oha(url, bodies[SERIES_WORKLOAD], DURATION, RATE_CONNECTIONS, rate=rate), RATE_CONNECTIONS, rate)
        count(run)
        res["series"][key] = run
        log(f"{name} series @{rate}/s: reached {run['rps']:.0f}/s, {latency_text(run)}")
        settle()

    log(f"{name}: holding {HOLD_STREAMS} streams")
    hs = hold_streams(pid, port, HOLD_STREAMS, args.mock_port)
    res["streams"] = hs
    calls["ok"] += hs["ok"] or 0
    calls["completed"] += hs["ok"] or 0
    if hs["rss_open_bytes"] is not None:
        log(f"{name}: RSS with {HOLD_STREAMS} open streams {hs['rss_open_bytes'] / 1e6:.1f} MB; {hs['output'][-1:]}")
    else:
        log(f"{name}: the {HOLD_STREAMS} streams did not all open: {hs['output']} {hs['failure_reasons']}")
    time.sleep(2)

    served_after = mock_count(args.mock_port, "requests")
    # Every call of the load (not the two sample calls of bench/run.sh's check).
    res["calls"] = calls
    if served_before is not None and served_after is not None:
        res["upstream_requests"] = served_after - served_before
    res["rss_end_bytes"] = rss_bytes(tree(pid))
    out = Path(args.dir) / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1))


def cmd_failed(args):
    """A target that did not start or did not answer: recorded, not hidden."""
    out = Path(args.dir) / "results" / f"{args.name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps({"name": args.name, "label": TARGETS[args.name], "status": "failed", "error": args.error}, indent=1)
    )


# ---------------------------------------------------------------- tokentap's metering evidence


def cmd_metering(args):
    path = Path(args.dir) / "results" / f"{args.name}.json"
    res = json.loads(path.read_text())
    m = {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{args.otlp_port}/spans", timeout=5) as r:
            m["spans_received"] = int(r.read())
    except Exception as e:
        m["spans_received"] = None
        m["spans_error"] = str(e)
    try:
        with open(args.access_log, "rb") as f:
            m["access_log_lines"] = sum(1 for _ in f)
    except OSError as e:
        m["access_log_lines"] = None
        m["access_log_error"] = str(e)
    spend = subprocess.run(
        [args.tokentap, "spend", "--config", args.config, "--by", "user", "--format", "json"],
        capture_output=True,
        text=True,
    )
    if spend.returncode == 0:
        m["spend"] = ledger_summary(spend.stdout)
    else:
        m["spend"] = {"error": spend.stderr.strip()[-500:]}
    m["calls"] = res.get("calls")
    m["upstream_requests"] = res.get("upstream_requests")
    res["metering"] = m
    path.write_text(json.dumps(res, indent=1))
    log(f"{args.name} metering: {json.dumps(m)}")


def ledger_summary(text):
    """Totals over `tokentap spend --format json` (one row per user: calls, tokens, cost_usd)."""
    try:
        data = json.loads(text)
    except ValueError:
        return {"raw": text[-1000:]}
    rows = data if isinstance(data, list) else data.get("rows") or data.get("spend") or []
    totals, users = {}, set()
    for row in rows if isinstance(rows, list) else []:
        if not isinstance(row, dict):
            continue
        for k, v in row.items():
            if isinstance(v, str) and k.endswith("_usd"):
                try:
                    v = float(v)
                except ValueError:
                    pass
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                totals[k] = totals.get(k, 0) + v
            elif k in ("user", "key", "name", "group"):
                users.add(v)
    return {"rows": len(rows) if isinstance(rows, list) else None, "groups": len(users), "totals": totals}


# ---------------------------------------------------------------- the machine and the merge


def run_text(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr).strip() else None
    except Exception:
        return None


def machine():
    info = {}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        models = re.findall(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
        info["cpu_model"] = models[0] if models else platform.processor()
    except OSError:
        info["cpu_model"] = None
    info["cores"] = os.cpu_count()
    try:
        mem = re.search(r"^MemTotal:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        info["ram_bytes"] = int(mem.group(1)) * 1024
    except (OSError, AttributeError):
        info["ram_bytes"] = None
    info["kernel"] = platform.release()
    try:
        info["debian"] = Path("/etc/debian_version").read_text().strip()
    except OSError:
        info["debian"] = None
    try:
        pretty = re.search(r'^PRETTY_NAME="(.*)"', Path("/etc/os-release").read_text(), re.M)
        info["os"] = pretty.group(1) if pretty else None
    except OSError:
        info["os"] = None
    return info


def versions():
    v = {
        "rustc": run_text(["rustc", "--version"]),
        "nginx": run_text(["/usr/sbin/nginx", "-v"]),
        "oha": run_text(["oha", "--version"]),
        "python": platform.python_version(),
    }
    try:
        from importlib.metadata import version

        v["litellm"] = version("litellm")
    except Exception:
        v["litellm"] = None
    return v


def git_state():
    commit = run_text(["git", "-C", str(ROOT), "rev-parse", "HEAD"])
    status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
    return {"commit": commit, "dirty": bool(status.stdout.strip())}


def cmd_finish(args):
    results = {}
    for name in args.targets.split(","):
        path = Path(args.dir) / "results" / f"{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
        else:
            results[name] = {"name": name, "label": TARGETS.get(name, name), "status": "failed", "error": "no result"}
    threads = int(os.environ.get("THREADS", "1"))
    command = os.environ.get("BENCH_COMMAND", "bench/run.sh")
    data = {
        "schema": 1,
        "started": args.started,
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(time.time() - float(args.started_epoch)),
        "command": command,
        "quick": QUICK,
        "duration_s": duration_s(DURATION),
        "saturation_repeats": REPEAT,
        "machine": machine(),
        "versions": versions(),
        "git": git_state(),
        "placement": {
            "proxy_cpus": PROXY_CPU,
            "load_cpus": LOAD_CPU,
            "threads": threads,
            "pinned_to_proxy_cpu": ["nginx", "bare-pingora", "tokentap", "LiteLLM"],
            "pinned_to_load_cpu": ["bench-mock", "otlp-sink", "oha", "hold-streams"],
            "thread_settings": {
                "bench-mock": "--threads 1",
                "nginx": f"worker_processes {threads}",
                "bare-pingora": f"--threads {threads} --l4-read-buffer 0",
                "tokentap": f"server.threads = {threads}",
                "LiteLLM": "--num_workers 1",
            },
        },
        "settings": {
            "saturation_connections": {"non-streaming": SATURATION_CONNECTIONS[False], "streaming": SATURATION_CONNECTIONS[True]},
            "rate_connections": RATE_CONNECTIONS,
            "fixed_rates": FIXED_RATES,
            "serial_duration": SERIAL_DURATION,
            "series_rates": SERIES_RATES,
            "series_workload": SERIES_WORKLOAD,
            "reached_share": REACHED,
            "stream_chunks": 20,
            "stream_delay_us": STREAM_DELAY_US,
            "hold_streams": HOLD_STREAMS,
            "hold_timeout_s": HOLD_TIMEOUT_S,
        },
        "workloads": WORKLOADS,
        "targets": results,
    }
    text = json.dumps(data, indent=1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    if args.copy:
        shutil.copyfile(args.out, args.copy)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bodies")
    b.add_argument("dir")
    t = sub.add_parser("target")
    t.add_argument("name", choices=TARGETS)
    t.add_argument("--pid", type=int, required=True)
    t.add_argument("--port", type=int, required=True)
    t.add_argument("--dir", required=True)
    t.add_argument("--mock-port", type=int, required=True)
    f = sub.add_parser("failed")
    f.add_argument("name", choices=TARGETS)
    f.add_argument("--dir", required=True)
    f.add_argument("--error", required=True)
    m = sub.add_parser("metering")
    m.add_argument("name", choices=TARGETS)
    m.add_argument("--dir", required=True)
    m.add_argument("--otlp-port", type=int, required=True)
    m.add_argument("--access-log", required=True)
    m.add_argument("--config", required=True)
    m.add_argument("--tokentap", required=True)
    z = sub.add_parser("finish")
    z.add_argument("--dir", required=True)
    z.add_argument("--targets", required=True)
    z.add_argument("--out", required=True)
    z.add_argument("--copy")
    z.add_argument("--started", required=True)
    z.add_argument("--started-epoch", required=True)
    args = p.parse_args()
    {"bodies": cmd_bodies, "target": cmd_target, "failed": cmd_failed, "metering": cmd_metering, "finish": cmd_finish}[
        args.cmd
    ](args)


if __name__ == "__main__":
    main()
