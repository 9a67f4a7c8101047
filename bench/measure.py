#!/usr/bin/env python3
"""The measuring half of bench/run.sh (the shell script starts and stops the targets).

    measure.py bodies DIR
        The request bodies: DIR/body-{1k,256k}-{n,s}.jsonl, 100 lines each, one JSON body a line,
        users user-000..user-099, each line exactly 1 KiB or 256 KiB.
    measure.py all --target NAME:PID:PORT [--target ...] --dir DIR --mock-port PORT
        Every measurement of the running targets (a target's process tree is PID and its
        descendants), interleaved: warm-up, idle RSS and idle CPU, then per workload saturation
        rounds (closed loop) with CPU and peak RSS, runs at fixed rates (open loop) and one call
        at a time; the latency-against-rate series; RSS with many open streams. Each step runs
        every target in turn, in the given order and in reverse order the next time a step of
        its kind comes, so that a slow minute of the machine falls on neighbours alike. Writes
        DIR/results/NAME.json (after every step; "incomplete" until the end).
    measure.py metering NAME --dir DIR --otlp-port P --access-log FILE --config FILE --tokentap BIN
        After tokentap has stopped: the proof that it metered (spans received by the OTLP sink,
        access-log lines, the ledger's spend). Added to DIR/results/NAME.json.
    measure.py finish --dir DIR --targets a,b,c --out FILE [--copy FILE]
        Merges the targets' results with the machine's description into one JSON file.

The load generator (oha) and hold-streams run pinned to CPU 0 (taskset), like the mock.
Knobs from the environment: BENCH_DURATION (8s; 2s with BENCH_QUICK=1), BENCH_REPEAT (saturation
runs per workload, the median reported, and rounds per fixed rate and of one call at a time: 3;
1 quick), BENCH_QUICK=1, THREADS,
BENCH_HOLD_TIMEOUT (180 s; 60 s quick), and BENCH_COMMAND (the command line, for the report).
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
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
# Saturation runs per workload and target (the median one is reported, with the others'
# rates), and rounds per fixed rate and of one call at a time (each percentile's median
# reported). Repeats on this
# (virtual) machine differ by up to a third from one another.
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
WORKLOADS_BY_ID = {w["id"]: w for w in WORKLOADS}
SERIES_WORKLOAD = "1k-n"
# How long each target is watched, idle, for the CPU it uses while the others are measured.
IDLE_WINDOW_S = 1 if QUICK else 5

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


def cpu_ns_exact(pids):
    """CPU time of the processes' live threads from the scheduler's own clock
    (/proc/PID/task/TID/schedstat, nanoseconds). utime and stime are sampled at the timer tick,
    which charges a whole tick to a thread that wakes briefly just then: a process that wakes
    a few times a second would show ten times the CPU it uses."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
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


def rounds_summary(runs, rate=None):
    """One step's rounds (a fixed rate's, or one call at a time's) as one figure: each
    percentile's median over the rounds (None unless most rounds have it), the median
    throughput (a fixed rate is reached when the median round reached it), calls, failures
    and time summed, and every round kept (`rounds`, in round order) so that the report can
    pair round i of two targets, which ran side by side."""
    if len(runs) == 1:
        return runs[0]
    by_rps = sorted(runs, key=lambda r: r["rps"])
    out = dict(by_rps[len(runs) // 2])
    # The median round's own figures that would not add up with the sums below.
    for k in ("round", "oha_requests_per_sec"):
        out.pop(k, None)
    out["rps"] = statistics.median(r["rps"] for r in runs)
    if rate:
        out["saturated"] = out["rps"] < REACHED * rate
    for k in ("ok", "completed", "non_200", "error_count", "aborted_at_deadline", "elapsed_s"):
        out[k] = sum(r[k] for r in runs)
    for k in ("statuses", "errors"):
        out[k] = {}
        for r in runs:
            for code, n in r[k].items():
                out[k][code] = out[k].get(code, 0) + n
    lat = {}
    for p in runs[0]["latency_ms"]:
        xs = [r["latency_ms"][p] for r in runs if r["latency_ms"].get(p) is not None]
        lat[p] = statistics.median(xs) if 2 * len(xs) > len(runs) else None
    out["latency_ms"] = lat
    out["rounds"] = [
        {k: r.get(k) for k in ("round", "rps", "saturated", "ok", "non_200", "error_count", "latency_ms")}
        for r in runs
    ]
    return out


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


class Target:
    """One running target and what has been measured of it so far."""

    def __init__(self, name, pid, port, dir_, mock_port, peers):
        self.name, self.pid, self.port, self.dir, self.mock_port = name, pid, port, dir_, mock_port
        # Every target still measured (this one included): they share the proxies' core.
        self.peers = peers
        self.url = f"http://127.0.0.1:{port}/v1/chat/completions"
        self.res = {"name": name, "label": TARGETS[name], "port": port, "status": "ok", "workloads": {}}
        self.calls = {"ok": 0, "completed": 0, "aborted_at_deadline": 0}
        # Requests the mock served during this target's runs (None once a count was missed).
        self.upstream = 0

    def count(self, run):
        for k in self.calls:
            self.calls[k] += run[k]

    def settle(self):
        """Until every target is idle again and the mock has no call open: a slow target
        (LiteLLM) still works through the calls that a run cut off at its deadline (and
        retries some), which would slow down and be counted in the next run, of whichever
        target; tokentap's deferred work (span export, log and ledger writes at a lower
        priority) belongs to the calls just made."""
        time.sleep(1)
        for _ in range(360):
            trees = [tree(t.pid) for t in self.peers]
            before = [cpu_seconds(p) for p in trees]
            time.sleep(0.5)
            busy = any(cpu_seconds(p) - b >= 0.05 for p, b in zip(trees, before))
            if not busy and (mock_count(self.mock_port, "active") or 0) == 0:
                return

    def load(self, workload, duration, connections, rate=None, n=None, sampler=False):
        """One oha run against this target, then settle. Returns (summary, CPU seconds of the
        target's tree over the run and its settling, the peak RSS and sample count if sampled)."""
        body = body_file(self.dir, workload)
        before = mock_count(self.mock_port, "requests")
        cpu0 = cpu_seconds(tree(self.pid))
        if sampler:
            with RssSampler(self.pid) as s:
                raw = oha(self.url, body, duration, connections, rate=rate, n=n)
            peak = (s.peak, s.samples)
        else:
            raw = oha(self.url, body, duration, connections, rate=rate, n=n)
            peak = None
        self.settle()
        cpu = cpu_seconds(tree(self.pid)) - cpu0
        self.add_upstream(before)
        run = summarize(raw, connections, rate)
        self.count(run)
        return run, cpu, peak

    def add_upstream(self, before):
        """Adds the requests the mock served since its count was `before` (taken when this
        target's run began; the run has settled) to the target's; unknown once a count is."""
        after = mock_count(self.mock_port, "requests")
        if self.upstream is not None and before is not None and after is not None:
            self.upstream += after - before
        else:
            self.upstream = None

    def write(self, final=False):
        """The figures so far; `incomplete` (which the report does not judge) until the last
        step is done."""
        self.res["status"] = "ok" if final else "incomplete"
        if final:
            self.res.pop("error", None)
        else:
            self.res["error"] = "the measurement stopped before its end (the figures so far are in the raw results)"
        self.res["calls"] = self.calls
        if self.upstream is not None:
            self.res["upstream_requests"] = self.upstream
        self.res["rss_end_bytes"] = rss_bytes(tree(self.pid))
        result_path(self.dir, self.name, create=True).write_text(json.dumps(self.res, indent=1))


def result_path(dir_, name, create=False):
    """DIR/results/NAME.json, where a target's figures are kept (the folder made if asked)."""
    path = Path(dir_) / "results" / f"{name}.json"
    if create:
        path.parent.mkdir(exist_ok=True)
    return path


def write_failed(dir_, name, error):
    result_path(dir_, name, create=True).write_text(json.dumps({"name": name, "label": TARGETS[name], "status": "failed", "error": error}, indent=1))


def cmd_all(args):
    """Every measurement of every target, interleaved: each step (a saturation round, a fixed
    rate, ...) runs the targets one after another, in the given order and in reverse order the
    next time a step of that kind comes (A B C, C B A, ...). A slow minute of the machine then
    lands on targets measured side by side rather than on one target's whole series, and
    neighbours in the order (bare-pingora and tokentap) are always measured next to each
    other. Every run starts when all targets are idle and the mock has no call open."""
    targets = []
    active = []
    for spec in args.target:
        name, pid, port = spec.split(":")
        if name not in TARGETS:
            sys.exit(f"error: unknown target {name!r}")
        targets.append(Target(name, int(pid), int(port), args.dir, args.mock_port, active))
    active.extend(targets)
    # Forward or reverse, per kind of step: each kind alternates on its own (so the rate of
    # 2,000/s, say, does not always run in the same order).
    turns = {}

    def each(kind, what, fn, reverse_allowed=True):
        """fn(target) for every active target, in this kind's turn of order. A target whose
        measurement fails is recorded as failed, stopped (it would go on loading the shared
        core) and left out of the rest; the others go on. Every target's figures so far are
        written after each step, so a crash later loses nothing measured."""
        turn = turns.get(kind, 0)
        turns[kind] = turn + 1
        order = active[::-1] if reverse_allowed and turn % 2 else list(active)
        for t in order:
            try:
                fn(t)
            except Exception as e:
                log(f"{t.name}: {what} failed: {e}")
                active.remove(t)
                write_failed(args.dir, t.name, f"{what}: {e}")
                if t.name != "direct":  # the mock serves every other target
                    try:
                        os.killpg(t.pid, signal.SIGTERM)
                    except OSError:
                        pass
        for t in active:
            t.write()

    def in_rounds(kind, what, run_one, slot, key, rate=None):
        """A latency step (a fixed rate, one call at a time) in REPEAT rounds, every target in
        each: run_one(t) gives one run; slot(t)[key] holds the rounds' summary, rewritten after
        every round so that what was measured is written."""
        runs = {t.name: [] for t in active}
        for i in range(REPEAT):
            def one(t, i=i):
                run = run_one(t)
                run["round"] = i
                runs[t.name].append(run)
                slot(t)[key] = rounds_summary(runs[t.name], rate)
                log(f"{t.name} {what}, round {i + 1}: {run['rps']:.0f}/s"
                    f"{' (SATURATED)' if run.get('saturated') else ''}, {latency_text(run)}")

            each(kind, what, one)

    # Warm-up, then the idle memory and the CPU an idle target uses (it runs while the others
    # are measured, on the same core).
    def warm(t):
        run, _, _ = t.load(WORKLOADS_BY_ID["1k-n"], None, 1, n=20)
        t.res["warmup"] = run

    each("warm-up", "warm-up", warm)
    for t in active:
        procs = tree(t.pid)
        t.res["processes_idle"] = len(procs)
        t.res["rss_idle_bytes"] = rss_bytes(procs)
        ns0 = cpu_ns_exact(procs)
        time.sleep(IDLE_WINDOW_S)
        t.res["idle_cpu_share"] = (cpu_ns_exact(procs) - ns0) / 1e9 / IDLE_WINDOW_S
        log(f"{t.name}: idle RSS {t.res['rss_idle_bytes'] / 1e6:.1f} MB ({len(procs)} processes), "
            f"idle CPU {t.res['idle_cpu_share']:.1%}")

    for w in WORKLOADS:
        c = SATURATION_CONNECTIONS[w["stream"]]
        runs = {t.name: [] for t in active}
        acc = {t.name: {"cpu": 0.0, "peak": 0, "samples": 0} for t in active}

        for i in range(REPEAT):
            def saturate(t, i=i):
                run, cpu, (peak, samples) = t.load(w, DURATION, c, sampler=True)
                run["round"] = i
                runs[t.name].append(run)
                a = acc[t.name]
                a["cpu"] += cpu
                a["peak"] = max(a["peak"], peak)
                a["samples"] += samples
                log(f"{t.name} {w['id']} saturation round {i + 1}: {run['rps']:.0f}/s")

            each("saturation", f"{w['id']} saturation", saturate)

        for t in active:
            rs, a = runs[t.name], acc[t.name]
            answered = sum(r["ok"] for r in rs)
            # The median run by throughput; CPU (per call answered 200), memory and failures
            # over all of them. rps_runs is in round order, so that round i of two targets
            # can be compared as a pair.
            sat = dict(sorted(rs, key=lambda r: r["rps"])[len(rs) // 2])
            sat["rps_runs"] = [r["rps"] for r in rs]
            sat["non_200"] = sum(r["non_200"] for r in rs)
            sat["error_count"] = sum(r["error_count"] for r in rs)
            sat["cpu_s"] = a["cpu"]
            sat["cpu_s_per_1k"] = a["cpu"] / answered * 1000 if answered else None
            sat["rss_peak_bytes"] = a["peak"]
            sat["rss_samples"] = a["samples"]
            sat["processes"] = len(tree(t.pid))
            t.res["workloads"][w["id"]] = {"saturation": sat, "rates": {}}
            log(
                f"{t.name} {w['id']}: saturation {sat['rps']:.0f}/s, "
                f"{sat['cpu_s_per_1k'] or 0:.3f} CPU s/1k, non-200 {sat['non_200']}, errors {sat['error_count']}"
            )

        for rate in FIXED_RATES:
            in_rounds(f"rate {rate}", f"{w['id']} at {rate}/s",
                      lambda t, rate=rate: t.load(w, DURATION, RATE_CONNECTIONS, rate=rate)[0],
                      lambda t: t.res["workloads"][w["id"]]["rates"], str(rate), rate)
        in_rounds("serial", f"{w['id']} one call at a time", lambda t: t.load(w, SERIAL_DURATION, 1)[0],
                  lambda t: t.res["workloads"][w["id"]], "serial")

    # Latency against rate, one workload. Rates above a target's measured saturation are
    # skipped, except the lowest, so that every target has a point.
    for t in active:
        t.res["series"] = {}
    for i, rate in enumerate(SERIES_RATES):
        def point(t, i=i, rate=rate):
            key = str(rate)
            wl = t.res["workloads"][SERIES_WORKLOAD]
            if key in wl["rates"]:
                t.res["series"][key] = wl["rates"][key]
                return
            sat = wl["saturation"]["rps"]
            if rate > sat and i > 0:
                t.res["series"][key] = {"offered_rate": rate, "skipped": f"above the saturation ({sat:.0f}/s)"}
                return
            run, _, _ = t.load(WORKLOADS_BY_ID[SERIES_WORKLOAD], DURATION, RATE_CONNECTIONS, rate=rate)
            t.res["series"][key] = run
            log(f"{t.name} series @{rate}/s: reached {run['rps']:.0f}/s, {latency_text(run)}")

        each("series", f"series at {rate}/s", point)

    # Held streams last, one target at a time (each needs the load core to itself), in the
    # given order (LiteLLM, which may not open them all, last), each after all are quiet.
    def hold(t):
        t.settle()
        log(f"{t.name}: holding {HOLD_STREAMS} streams")
        before = mock_count(t.mock_port, "requests")
        hs = hold_streams(t.pid, t.port, HOLD_STREAMS, t.mock_port)
        t.res["streams"] = hs
        t.calls["ok"] += hs["ok"] or 0
        t.calls["completed"] += hs["ok"] or 0
        if hs["rss_open_bytes"] is not None:
            log(f"{t.name}: RSS with {HOLD_STREAMS} open streams {hs['rss_open_bytes'] / 1e6:.1f} MB; {hs['output'][-1:]}")
        else:
            log(f"{t.name}: the {HOLD_STREAMS} streams did not all open: {hs['output']} {hs['failure_reasons']}")
        t.settle()
        t.add_upstream(before)

    each("held streams", "held streams", hold, reverse_allowed=False)
    for t in active:
        t.write(final=True)
    if len(active) < len(targets):
        sys.exit(1)


def cmd_failed(args):
    """A target that did not start or did not answer: recorded, not hidden."""
    write_failed(args.dir, args.name, args.error)


# ---------------------------------------------------------------- tokentap's metering evidence


def cmd_metering(args):
    path = result_path(args.dir, args.name)
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
        path = result_path(args.dir, name)
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
        # Each fixed rate, and one call at a time, run in as many rounds as saturation (since
        # the rounds were added).
        "fixed_rate_repeats": REPEAT,
        "serial_repeats": REPEAT,
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
            # Every step runs the targets in turn, forward then reverse (cmd_all): round i of
            # one target's saturation runs is next to round i of its neighbours'.
            "interleaved": True,
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
    t = sub.add_parser("all")
    t.add_argument("--target", action="append", required=True, metavar="NAME:PID:PORT")
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
    {"bodies": cmd_bodies, "all": cmd_all, "failed": cmd_failed, "metering": cmd_metering, "finish": cmd_finish}[
        args.cmd
    ](args)


if __name__ == "__main__":
    main()
