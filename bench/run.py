"""Benchmark the service against talking to the upstream directly, on this machine, in one run.

    python bench/run.py                                  # full run, about 3 minutes
    python bench/run.py --quick                          # smoke run, about 1 minute
    python bench/run.py --levels overload                # only the overload level, about 40 s
    python bench/run.py --service /tmp/copy/service.py   # measure a modified copy
    python bench/run.py --profile /tmp/service.svg       # also py-spy the service in the overload level

Starts the fake upstream (upstream.py) and the service (`python service.py`) as subprocesses,
then for each concurrency level runs the load client (client.py, one process per phase), first
against the upstream directly and then through the service. Prints the tables, checks the
performance targets, and writes everything to bench/results.json. Method: bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import shape  # bench/shape.py: the shape's own cost, the floor under the relay's
from client import rss_kib  # bench/client.py: the load client's own reading of it
from peer import PLAIN_SHAPE  # bench/peer.py: the shape with nothing around it

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
V1 = "/v1/chat/completions"
CHAT = "/chat"
START_SECONDS = 30  # for each server to answer
DRAIN_SECONDS = 30  # for the service to close the streams a phase cut, before the next phase


@dataclass(frozen=True)
class Phase:
    level: str  # the row label; service phases are compared with the direct phase of their level
    target: str  # "direct" or "service"
    path: str
    streams: int  # users streaming at once
    tokens: int  # per stream
    rate: float  # tokens per second per stream; 0 = as fast as they are read
    ramp: float  # seconds over which the users' first streams start (and the warm-up)
    window: float  # seconds measured after the ramp; for a burst, slack after its streams' end
    kind: str = "closed"  # closed loop (users stream one answer after the other) or "burst" (each once)

    @property
    def name(self) -> str:
        return {"direct": "direct to upstream", "peer": "async peer (/v1)", "plain": "plain shape (/v1)"}.get(self.target, self.path)

    def spec(self, port: int, pids: dict[str, int], health_port: int | None) -> dict[str, Any]:
        return {**asdict(self), "port": port, "pids": pids, "health_port": health_port, "grace": min(1.0, self.window / 2)}

    def timeout(self) -> float:
        return self.ramp + self.window + (self.tokens / self.rate if self.rate else 0) + 30


def plan(quick: bool, levels: set[str] | None = None) -> list[Phase]:
    """The phases, level by level: direct first, then through the service.

    Real models stream 20-50 tokens/s: 50 at 1 stream (more samples per second), 20 from 100
    streams on. "saturation": the upstream sends as fast as it is read, to find the most tokens
    per second. "overload": 1,000 streams of 100 tokens at 20 tokens/s offered within one second,
    each tried once: far more than one process relays on time, so the service must refuse the
    excess at once and keep the streams it admitted on time.
    --quick keeps the shape with a few tokens per stream and sub-second windows: a smoke test.
    """
    # level, streams, (tokens per stream, window seconds) for a full and a quick run, tokens/s, paths
    closed: list[tuple[str, int, tuple[int, float], tuple[int, float], float, tuple[str, ...]]] = [
        ("1", 1, (200, 6), (10, 0.6), 50, (V1, CHAT)),
        ("100", 100, (200, 5), (10, 0.6), 20, (V1, CHAT)),
        ("saturation", 100, (500, 3), (50, 0.6), 0, (V1,)),
    ]
    phases = []
    for level, streams, full, short, rate, paths in closed:
        if levels is not None and level not in levels:
            continue
        tokens, window = short if quick else full
        ramp = tokens / rate if rate else window / 3  # one stream's duration: then N stay open
        phases.append(Phase(level, "direct", V1, streams, tokens, rate, ramp, window))
        phases += [Phase(level, "service", path, streams, tokens, rate, ramp, window) for path in paths]
        if level == "100":  # the shape with nothing around it (bench/peer.py), at the level the cost targets name
            phases.append(Phase(level, "plain", PLAIN_SHAPE, streams, tokens, rate, ramp, window))
    if levels is not None and "500" in levels:
        # 500 closed-loop users, far past one worker: the service (shedding, on time) and the plain
        # async pass-through (bench/peer.py: everything admitted, everything late), side by side.
        tokens, window = (20, 1.0) if quick else (100, 6.0)
        for target in ("direct", "service", "peer"):
            phases.append(Phase("500", target, V1, 500, tokens, 20, tokens / 20, window))
    if levels is None or "burst" in levels:
        # A burst on an idle worker: 60 streams asked at the same moment, each tried once (a curl
        # user or a page has no retry), on both paths: all of them must be served.
        for target, path in (("direct", V1), ("service", V1), ("service", CHAT)):
            phases.append(Phase("burst", target, path, 60, 20 if quick else 40, 20, 0.01, 2.0, kind="burst"))
    if levels is None or "overload" in levels:
        offered, tokens = (300, 20) if quick else (1000, 100)
        for target in ("direct", "service"):
            phases.append(Phase("overload", target, V1, offered, tokens, 20, 1.0, 5.0, kind="burst"))
    return phases


# ------------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------------


class Processes:
    """The run's subprocesses, each in its own session (so that a Ctrl-C reaches only this
    process, which then stops them in order); all are stopped when the run ends, however."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log:
            process = subprocess.Popen(argv, start_new_session=True, stderr=log, **kwargs)
        self.started.append(process)
        return process

    def stop_all(self, only: list[subprocess.Popen[bytes]] | None = None) -> None:
        """Stop them all (or `only` these): SIGINT, then SIGKILL for any still running after 10 s."""
        stopping = self.started if only is None else only
        for process in reversed(stopping):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)  # the service shuts down gracefully on it
        deadline = time.monotonic() + 10
        for process in stopping:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


@contextmanager
def servers_stopped_at_the_end(processes: Processes) -> Iterator[None]:
    """A bench's run: however it ends (done, failed, Ctrl-C or SIGTERM), its servers are stopped."""

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # a SIGTERM ends the run as Ctrl-C does, through `finally`

    signal.signal(signal.SIGTERM, interrupted)
    try:
        yield
    except KeyboardInterrupt:
        print("\nbench: interrupted; stopping the servers", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as error:
        sys.exit(f"\nbench: {error}")
    finally:
        processes.stop_all()


def fail(message: str) -> NoReturn:
    raise RuntimeError(message)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_upstream(processes: Processes) -> tuple[subprocess.Popen[bytes], int]:
    upstream = processes.start("upstream", [PYTHON, str(HERE / "upstream.py")], stdout=subprocess.PIPE)
    assert upstream.stdout is not None
    os.set_blocking(upstream.stdout.fileno(), False)
    line = b""
    deadline = time.monotonic() + START_SECONDS
    while not line.endswith(b"\n"):
        if time.monotonic() > deadline or upstream.poll() is not None:
            fail(f"the fake upstream did not start; see {processes.logs / 'upstream.log'}")
        line += upstream.stdout.read() or b""
        time.sleep(0.02)
    return upstream, int(line.split()[1])


def healthz(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            answer: dict[str, Any] = json.load(response)
            return answer
    except (OSError, ValueError):
        return None


def start_service(
    processes: Processes, service: Path, upstream_port: int, name: str = "service", **settings: str
) -> tuple[subprocess.Popen[bytes], int]:
    """`python service.py` against the fake upstream, with the defaults the targets name, and `settings`."""
    port = free_port()
    env = dict(
        os.environ,
        OPENAI_BASE_URL=f"http://127.0.0.1:{upstream_port}/v1",
        OPENAI_API_KEY="bench",
        ALLOW_ANONYMOUS="1",
        PORT=str(port),
        HOST="127.0.0.1",
        LOG_LEVEL="warning",
        WEB_CONCURRENCY="1",  # one worker process, as the targets say
        SHUTDOWN_GRACE_SECONDS="1",  # so that stopping it at the end is quick
        # The streams a phase cuts at its end stop at once, not after the grace window (which
        # would only make each phase wait longer for the next).
        RESUME_GRACE_SECONDS="0",
    )
    for variable in ("API_KEYS", "MAX_STREAMS", "SHED_LAG_MS", "REDIS_URL"):
        env.pop(variable, None)  # the defaults, as the targets say
    env.update(settings)
    log = processes.logs / f"{name}.log"
    with open(log, "ab") as out:
        process = processes.start(name, [PYTHON, str(service)], cwd=service.parent, env=env, stdout=out)
    deadline = time.monotonic() + START_SECONDS
    while healthz(port) is None:
        if time.monotonic() > deadline or process.poll() is not None:
            fail(f"the service did not start:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)
    return process, port


def fresh_service(
    processes: Processes, service_path: Path, upstream_port: int, upstream_pid: int, previous: subprocess.Popen[bytes] | None,
    settings: dict[str, str], path: str,
) -> tuple[subprocess.Popen[bytes], int, int]:
    """A service process of its own for the next phase, warmed up on the phase's path, and its idle
    RSS. A phase measured in a process that an earlier phase grew would be charged for that growth
    (RSS does not shrink) and would start with that phase's threads and pooled connections; one
    warmed up on another path would be charged for its own path's first use."""
    if previous is not None:
        processes.stop_all(only=[previous])
    service, port = start_service(processes, service_path, upstream_port, **settings)
    warm_up(processes, port, {"service": service.pid, "upstream": upstream_pid}, path, streams=50)
    time.sleep(0.5)
    return service, port, rss_kib(service.pid)


def drain(port: int) -> None:
    """Wait until the service has closed the streams of the last phase (cut by the client)."""
    deadline = time.monotonic() + DRAIN_SECONDS
    while time.monotonic() < deadline:
        health = healthz(port)
        if health is not None and not health.get("active_streams"):
            return
        time.sleep(0.1)
    print(f"  (the service still had open streams {DRAIN_SECONDS} s after the phase)", flush=True)


def warm_up(processes: Processes, port: int, pids: dict[str, int], path: str = V1, streams: int = 20) -> None:
    """A short load first (imports, threads, pooled connections), then the service drained."""
    phase = Phase("warm-up", "service", path, streams, 20, 100, 0.2, 0.5)
    run_client(processes, phase.spec(port, pids, None), phase.timeout())
    drain(port)


def run_client(processes: Processes, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    client = processes.start("client", [PYTHON, str(HERE / "client.py"), json.dumps(spec)], stdout=subprocess.PIPE)
    try:
        out, _ = client.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        client.kill()
        client.wait(5)
        fail(f"the load client did not finish within {timeout:.0f} s")
    if client.returncode != 0:
        fail(f"the load client failed (exit {client.returncode}):\n{(processes.logs / 'client.log').read_text(errors='replace')[-3000:]}")
    result: dict[str, Any] = json.loads(out)
    return result


def machine(service_pid: int) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), "?")
    versions: dict[str, str | None] = {}
    for package in ("starlette", "uvicorn", "uvloop", "httptools", "anyio", "openai", "httpx2"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    maps = Path(f"/proc/{service_pid}/maps").read_text()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        # A build without PGO (--enable-optimizations) runs Python code markedly slower.
        "python_pgo": "--enable-optimizations" in (sysconfig.get_config_var("CONFIG_ARGS") or ""),
        "kernel": platform.release(),
        "packages": versions,
        # uvicorn's "auto" picks each when importable; mapped into the process means picked.
        "service_uses_uvloop": "uvloop/loop" in maps,
        "service_uses_httptools": "httptools/parser" in maps,
    }


# ------------------------------------------------------------------------------------------------
# Figures and report
# ------------------------------------------------------------------------------------------------


def ms(result: dict[str, Any], metric: str, key: str) -> float | None:
    values = result.get(metric)
    return None if values is None else float(values[key]) / 1000


def minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def over(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def figures(phase: Phase, result: dict[str, Any], direct: dict[str, Any] | None, idle_rss_kib: int) -> dict[str, Any]:
    """A phase's figures in ms, MB, µs; 'added_*' subtract the same figure of the direct run."""
    row: dict[str, Any] = {}
    for metric, name in (("latency_us", "latency"), ("ttfb_us", "ttfb"), ("ttft_us", "ttft"), ("healthz_us", "healthz")):
        for key in ("p50", "p99", "max"):
            row[f"{name}_{key}_ms"] = ms(result, metric, key)
            if direct is not None and name != "healthz":
                row[f"added_{name}_{key}_ms"] = minus(row[f"{name}_{key}_ms"], ms(direct, metric, key))
    cpu, seconds, tokens = result["cpu_seconds"], result["seconds"], result["tokens"]
    row["tokens_per_second"] = result["tokens_per_second"]
    if direct is not None:
        row["latency_p50_ratio"] = over(row["latency_p50_ms"], ms(direct, "latency_us", "p50"))
        row["ttfb_p50_ratio"] = over(row["ttfb_p50_ms"], ms(direct, "ttfb_us", "p50"))
        row["tokens_per_second_ratio"] = over(result["tokens_per_second"], direct["tokens_per_second"])
    row["service_cpu_us_per_token"] = cpu["service"] / tokens * 1e6 if tokens and phase.target != "direct" else None
    for name in ("service", "upstream", "client", "other_processes"):
        row[f"cores_{name}"] = cpu[name] / seconds
    peak = result["rss_peak_kib"]
    row["rss_peak_mb"] = peak / 1024 if peak else None
    # Per stream only from 100 streams on: below, the RSS's own wobble (~1 MB) is all one would see.
    row["rss_kb_per_stream"] = (peak - idle_rss_kib) / phase.streams if peak and phase.target == "service" and phase.streams >= 100 else None
    return row


def burst_figures(result: dict[str, Any], direct: dict[str, Any] | None) -> dict[str, Any]:
    """The overload level's figures: counts, and the admitted streams' percentiles in ms, 'added'
    ones minus the direct run's (where the upstream streams every one of the offered streams)."""
    row: dict[str, Any] = {name: result[name] for name in ("offered", "admitted", "admitted_completed", "refused", "refused_with_retry_after")}
    row["other_failures"] = sum(result["other_failures"].values())
    row["admitted_completed_share"] = result["admitted_completed"] / result["admitted"] if result["admitted"] else None
    for metric, name in (("latency_us", "latency"), ("ttft_us", "ttft"), ("refusal_us", "refusal"), ("healthz_us", "healthz")):
        for key in ("p50", "p99", "max"):
            row[f"{name}_{key}_ms"] = ms(result, metric, key)
            if direct is not None and name in ("latency", "ttft"):
                row[f"added_{name}_{key}_ms"] = minus(row[f"{name}_{key}_ms"], ms(direct, metric, key))
    cpu, seconds = result["cpu_seconds"], result["seconds"]
    row["service_cpu_us_per_token"] = cpu.get("service", 0) / result["tokens"] * 1e6 if result["tokens"] and direct is not None else None
    for name in ("service", "upstream", "client", "other_processes"):
        row[f"cores_{name}"] = cpu.get(name, 0.0) / seconds if seconds else None
    peak = result["rss_peak_kib"]
    row["rss_peak_mb"] = peak / 1024 if peak else None
    return row


def print_overload(rows: list[tuple[Phase, dict[str, Any], dict[str, Any]]]) -> None:
    bursts = [(p, r, f) for p, r, f in rows if p.kind == "burst"]
    if not bursts:
        return
    print("\nOverload: streams offered within one second, each tried once; latencies of the admitted streams, ms")
    columns = [("path", 20), ("offered", 7), ("admitted", 8), ("complete", 8), ("refused", 7), ("R-After", 7), ("other", 5),
               ("lat p50", 7), ("p99", 7), ("added p99", 9), ("TTFT p50", 8), ("p99", 7), ("added p99", 9),
               ("503 p50", 7), ("p99", 7), ("max", 7), ("healthz p50", 11), ("p99", 7), ("svc cores", 9), ("other", 5)]
    line = " ".join(f"{name:>{width}}" if i else f"{name:<{width}}" for i, (name, width) in enumerate(columns))
    print(line + "\n" + "-" * len(line))
    for p, r, f in bursts:
        cells = [p.name, str(f["offered"]), str(f["admitted"]), str(f["admitted_completed"]), str(f["refused"]),
                 str(f["refused_with_retry_after"]), str(f["other_failures"]), fmt(f["latency_p50_ms"]), fmt(f["latency_p99_ms"]),
                 fmt(f.get("added_latency_p99_ms")), fmt(f["ttft_p50_ms"]), fmt(f["ttft_p99_ms"]), fmt(f.get("added_ttft_p99_ms")),
                 fmt(f["refusal_p50_ms"]), fmt(f["refusal_p99_ms"]), fmt(f["refusal_max_ms"]), fmt(f["healthz_p50_ms"]),
                 fmt(f["healthz_p99_ms"]), fmt(f["cores_service"]), fmt(f["cores_other_processes"])]
        print(" ".join(f"{c:>{w}}" if i else f"{c:<{w}}" for i, (c, (_, w)) in enumerate(zip(cells, columns))))


def fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}{suffix}" if abs(value) < 10_000 else f"{value:.0f}{suffix}"


def print_tables(rows: list[tuple[Phase, dict[str, Any], dict[str, Any]]]) -> None:
    rows = [row for row in rows if row[0].kind == "closed"]

    def table(title: str, columns: list[tuple[str, int]], cells: list[list[str]]) -> None:
        print(f"\n{title}")
        line = " ".join(f"{name:>{width}}" if i > 1 else f"{name:<{width}}" for i, (name, width) in enumerate(columns))
        print(line + "\n" + "-" * len(line))
        for cell in cells:
            print(" ".join(f"{c:>{w}}" if i > 1 else f"{c:<{w}}" for i, (c, (_, w)) in enumerate(zip(cell, columns))))

    label = [("streams", 10), ("path", 20)]
    table(
        "Per-token latency: emission by the upstream to arrival at the client, ms ('added' = minus the direct run's)",
        label + [("tokens", 7), ("p50", 7), ("p99", 7), ("max", 7), ("added p50", 9), ("p99", 7), ("max", 7), ("p50 ratio", 9)],
        [
            [p.level, p.name, str(r["tokens"]), fmt(f["latency_p50_ms"]), fmt(f["latency_p99_ms"]), fmt(f["latency_max_ms"]),
             fmt(f.get("added_latency_p50_ms")), fmt(f.get("added_latency_p99_ms")), fmt(f.get("added_latency_max_ms")),
             fmt(f.get("latency_p50_ratio"), 1, "x")]
            for p, r, f in rows
        ],
    )
    table(
        "Time to first byte (response head) and first token, from connecting, ms; all streams of the phase",
        label + [("TTFB p50", 8), ("p99", 7), ("added p50", 9), ("p99", 7), ("p50 ratio", 9), ("TTFT p99", 8), ("added", 7),
                 ("started", 7), ("failed", 6), ("starved", 7)],
        [
            [p.level, p.name, fmt(f["ttfb_p50_ms"]), fmt(f["ttfb_p99_ms"]), fmt(f.get("added_ttfb_p50_ms")), fmt(f.get("added_ttfb_p99_ms")),
             fmt(f.get("ttfb_p50_ratio"), 1, "x"), fmt(f["ttft_p99_ms"]), fmt(f.get("added_ttft_p99_ms")),
             str(r["streams_started"]), str(r["streams_failed"]), str(r["streams_starved"])]
            for p, r, f in rows
        ],
    )
    table(
        "Throughput and cost: cores = CPU seconds per second of the window (all on the same 2 cores)",
        label + [("tokens/s", 8), ("ratio", 6), ("svc µs/token", 12), ("service", 7), ("upstrm", 6), ("client", 6), ("other", 6),
                 ("peak RSS MB", 11), ("KB/stream", 9), ("healthz p50", 11), ("p99", 6)],
        [
            [p.level, p.name, f"{f['tokens_per_second']:.0f}", fmt(f.get("tokens_per_second_ratio"), 2, "x"), fmt(f["service_cpu_us_per_token"], 1),
             fmt(f["cores_service"]), fmt(f["cores_upstream"]), fmt(f["cores_client"]), fmt(f["cores_other_processes"]),
             fmt(f["rss_peak_mb"], 1), fmt(f["rss_kb_per_stream"], 0), fmt(f["healthz_p50_ms"]), fmt(f["healthz_p99_ms"])]
            for p, r, f in rows
        ],
    )


def check_targets(rows: list[tuple[Phase, dict[str, Any], dict[str, Any]]], floor: float | None) -> list[dict[str, Any]]:
    """The performance targets for 2 cores, one worker, default settings, on /v1/chat/completions
    (and /chat where named); relay costs as ratios to the shape's floor, measured in the same run."""
    found = {p.level: f for p, r, f in rows if p.target == "service" and p.path == V1}
    chat = {p.level: f for p, r, f in rows if p.target == "service" and p.path == CHAT}
    bursts = {p.path: f for p, r, f in rows if p.target == "service" and p.level == "burst"}
    memory = {name: level.get("100", {}).get("rss_kb_per_stream") for name, level in (("v1", found), ("chat", chat))}

    def figure(level: str, key: str) -> float | None:
        value = found.get(level, {}).get(key)
        return None if value is None else float(value)

    overload = found.get("overload")
    refused_wrongly = None if overload is None else overload["refused"] - overload["refused_with_retry_after"] + overload["other_failures"]
    # (name, value, limit, unit, higher is better)
    targets = [
        ("added latency per token, p50, 1 stream", figure("1", "added_latency_p50_ms"), 0.5, "ms", False),
        ("relay cost, 100 streams, /v1 / the shape's floor", over(figure("100", "service_cpu_us_per_token"), floor), 1.5, "x", False),
        ("relay cost, 100 streams, /chat / the shape's floor", over(chat.get("100", {}).get("service_cpu_us_per_token"), floor), 1.8, "x", False),
        ("memory per stream, 100 streams, /chat / /v1", over(memory["chat"], memory["v1"]), 1.5, "x", False),
        ("burst of 60 at once: served on /v1", bursts.get(V1, {}).get("admitted"), 60, "streams", True),
        ("burst of 60 at once: served on /chat", bursts.get(CHAT, {}).get("admitted"), 60, "streams", True),
        (f"overload: streams admitted of {figure('overload', 'offered') or 1000:,.0f} offered", figure("overload", "admitted"), 150, "streams", True),
        ("overload: admitted streams' added latency per token, p99", figure("overload", "added_latency_p99_ms"), 50.0, "ms", False),
        ("overload: admitted streams' added time to first token, p99", figure("overload", "added_ttft_p99_ms"), 300.0, "ms", False),
        ("overload: admitted streams complete", figure("overload", "admitted_completed_share"), 0.99, "(share)", True),
        ("overload: requests neither admitted nor refused with 503 + Retry-After", refused_wrongly, 0, "requests", False),
        ("overload: time to each 503, p99", figure("overload", "refusal_p99_ms"), 100.0, "ms", False),
        ("overload: /healthz p99", figure("overload", "healthz_p99_ms"), 50.0, "ms", False),
    ]
    print("\nTargets (2 cores, one worker, default settings)")
    checked = []
    for name, value, limit, unit, higher in targets:
        verdict = "n/a" if value is None else "PASS" if (value >= limit if higher else value <= limit) else "MISS"
        times = f"  ({value / limit:.1f}x the target)" if value is not None and limit and not higher else ""
        bound = ">=" if higher else "<="
        print(f"  {verdict:<4}  {name}: {fmt(value)} {unit}, target {bound} {limit:g}{times}")
        checked.append({"target": name, "value": value, "limit": limit, "unit": unit, "verdict": verdict})
    return checked


def describe(phase: Phase) -> str:
    pace = f"{phase.rate:g} tokens/s" if phase.rate else "unpaced"
    if phase.kind == "burst":
        return f"{phase.level:>10}: {phase.streams} streams offered in {phase.ramp:g} s, {phase.name:<20} {phase.tokens} tokens at {pace}"
    return f"{phase.level:>10} streams, {phase.name:<20} {phase.tokens} tokens at {pace}, {phase.window:g} s window"


# ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--service", type=Path, default=HERE.parent / "service.py", help="the service.py to run (default: this repository's)")
    parser.add_argument("--output", type=Path, default=HERE / "results.json", help="where to write the results as JSON")
    parser.add_argument("--profile", type=Path, help="py-spy record the service during the overload phase into this file (.txt: collapsed stacks, else SVG)")
    parser.add_argument("--profile-level", default="overload", help="the level --profile records (default: overload)")
    parser.add_argument("--levels", help="run only these levels, comma-separated (1, 100, saturation, burst, 500, overload)")
    parser.add_argument("--service-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for the service, repeatable (PIN_WORKERS=1, LOG_LEVEL=info to keep its request log); the targets are for the defaults")
    args = parser.parse_args()
    settings = dict(setting.split("=", 1) for setting in args.service_env if "=" in setting)
    if len(settings) != len(args.service_env):
        sys.exit("bench: --service-env takes NAME=VALUE")
    service_path = args.service.resolve()
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(PYTHON).parent))
    if args.profile and py_spy is None:
        sys.exit("bench: --profile needs py-spy (pip install py-spy)")

    # 1,000 streams take ~3,000 sockets in the service; the subprocesses inherit this limit.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))

    logs = Path(tempfile.mkdtemp(prefix="bench-logs-"))
    processes = Processes(logs)
    began = time.monotonic()
    with servers_stopped_at_the_end(processes):
        upstream, upstream_port = start_upstream(processes)
        service, service_port = start_service(processes, service_path, upstream_port, **settings)
        info = machine(service.pid)
        print(f"machine: {info['cpu']}, {info['cores']} cores, {info['python']} ({'' if info['python_pgo'] else 'no '}PGO build), Linux {info['kernel']}")
        print("packages: " + ", ".join(f"{name} {version}" for name, version in info["packages"].items()))
        print(f"service: {service_path} (pid {service.pid}); uvloop {'yes' if info['service_uses_uvloop'] else 'NO'}, "
              f"httptools {'yes' if info['service_uses_httptools'] else 'NO'}")
        if settings:
            print(f"service settings: {' '.join(f'{name}={value}' for name, value in settings.items())} (the targets are for the defaults)")
        print("the load client and the fake upstream share the cores with the service: see their columns below\n")
        idle_rss = 0

        rows: list[tuple[Phase, dict[str, Any], dict[str, Any]]] = []
        directs: dict[str, dict[str, Any]] = {}
        phases = plan(args.quick, set(args.levels.split(",")) if args.levels else None)
        peer_port = None
        if any(phase.target in ("peer", "plain") for phase in phases):
            peer_port = free_port()
            peer_env = dict(os.environ, OPENAI_BASE_URL=f"http://127.0.0.1:{upstream_port}/v1", PORT=str(peer_port))
            with open(logs / "peer.log", "ab") as out:
                peer = processes.start("peer", [PYTHON, str(HERE / "peer.py")], env=peer_env, stdout=out)
            deadline = time.monotonic() + START_SECONDS
            while healthz(peer_port) is None:
                if time.monotonic() > deadline or peer.poll() is not None:
                    fail(f"the peer did not start; see {logs / 'peer.log'}")
                time.sleep(0.1)
        for phase in phases:
            print(f"  {describe(phase)} ...", end="", flush=True)
            to_service = phase.target == "service"
            if to_service:
                service, service_port, idle_rss = fresh_service(processes, service_path, upstream_port, upstream.pid, service, settings, phase.path)
            pids = {"service": service.pid, "upstream": upstream.pid}
            if phase.target in ("peer", "plain"):
                spec = phase.spec(peer_port, {**pids, "service": peer.pid}, peer_port)
            else:
                spec = phase.spec(service_port if to_service else upstream_port, pids, service_port if to_service else None)
            spec["kind"] = phase.kind
            profiler = None
            if args.profile and py_spy and phase.level == args.profile_level and to_service:
                form = "raw" if args.profile.suffix == ".txt" else "flamegraph"
                # --gil: only the thread running Python, i.e. where the CPU goes; --nonblocking: don't pause it.
                profiler = processes.start("py-spy", [py_spy, "record", "--nonblocking", "--gil", "--rate", "100", "--pid", str(service.pid),
                                                      "--output", str(args.profile), "--format", form])
            result = run_client(processes, spec, phase.timeout())
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)  # py-spy writes its file when interrupted
                profiler.wait(timeout=60)
            if service.poll() is not None:
                fail(f"the service exited (code {service.returncode}); see {logs / 'service.log'}")
            if to_service:
                drain(service_port)
            else:
                directs[phase.level] = result
            direct = directs.get(phase.level) if phase.target != "direct" else None
            if phase.kind == "burst":
                row = burst_figures(result, direct)
                print(f" {result['admitted']} admitted, {result['refused']} refused, {result['admitted_completed']} completed", flush=True)
            else:
                row = figures(phase, result, direct, idle_rss)
                print(f" {result['tokens']} tokens, {result['streams_failed']} failed, {result['streams_starved']} starved", flush=True)
            rows.append((phase, result, row))

        print(f"\nmachine: {info['cpu']}, {info['cores']} cores, {info['python']}; service idle RSS {idle_rss / 1024:.1f} MB")
        floor = None
        if any(phase.level == "100" for phase, _, _ in rows):
            # The shape's own cost (bench/shape.py: iterate_in_threadpool over a blocking read, no
            # HTTP), at the same level, in this run: the figure the relay's cost is a multiple of.
            print("  the shape's floor: 100 streams through iterate_in_threadpool, no HTTP ...", end="", flush=True)
            floor = shape.run_one("thread hop", 100)["cpu_us_per_token"]
            print(f" {floor:.1f} µs CPU per token", flush=True)
        print_tables(rows)
        print_overload(rows)
        plain = next((row["service_cpu_us_per_token"] for phase, _, row in rows if phase.level == "100" and phase.target == "plain"), None)
        if floor is not None:
            for phase, _, row in rows:
                if phase.level == "100" and phase.target in ("service", "plain"):
                    row["cpu_per_token_over_floor"] = over(row["service_cpu_us_per_token"], floor)
                    versus_plain = f", {over(row['service_cpu_us_per_token'], plain):.2f}x the plain shape's" if plain and phase.target == "service" else ""
                    print(f"{phase.name}: {row['service_cpu_us_per_token']:.1f} µs CPU per token at 100 streams = "
                          f"{row['cpu_per_token_over_floor']:.2f}x the shape's floor ({floor:.1f} µs, same run){versus_plain}")
        targets = check_targets(rows, floor)
        busy = max(f["cores_other_processes"] or 0.0 for _, _, f in rows)
        print(
            "\nNotes: each phase measures a window after one stream's duration of ramp-up, every user starting a new stream"
            "\nwhen its last one ends; TTFB/TTFT count all the phase's streams (ramp included). 'saturation': the upstream"
            "\nsends as fast as it is read, so throughput only. svc µs/token (= CPU ms per 1,000 tokens) is all the service's"
            "\nCPU in the window (stream set-up, /healthz probes included) per token relayed; KB/stream = (peak - idle RSS) / streams."
        )
        print("Overload: streams offered within one second, each tried once; latencies and time to first token over"
              "\nall the admitted streams' tokens, 'added' minus the direct run's (where all of them are streamed).")
        if args.quick:
            print("This was a --quick smoke run: streams of 10 tokens and sub-second windows, so stream set-up dominates;"
                  "\nits figures are not comparable with the targets. Run without --quick to measure.")
        if busy > 0.2:
            print(f"WARNING: other processes used up to {busy:.2f} cores during a window: these figures are disturbed; run again on a quiet machine.")
        args.output.write_text(json.dumps(
            {"machine": info, "service": str(service_path), "service_settings": settings, "quick": args.quick, "idle_rss_kib": idle_rss,
             "seconds": time.monotonic() - began, "targets": targets, "shape_floor_cpu_us_per_token": floor,
             "phases": [{"phase": asdict(p), "figures": f, "raw": r} for p, r, f in rows]},
            indent=2))
        print(f"\nresults: {args.output}   logs: {logs}   ({time.monotonic() - began:.0f} s)")


if __name__ == "__main__":
    main()
