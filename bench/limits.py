"""What per-key limits cost, per request and per token, in Redis and in the process, against the
same service without limits.

    python bench/limits.py              # about 3.5 minutes on 2 cores
    python bench/limits.py --rounds 1   # about 1.5 minutes
    python bench/limits.py --quick      # smoke run, about 40 s: checks that everything works, measures nothing useful

One fake upstream, one redis-server on a loopback port (without persistence), and three services,
each one worker, load shedding off (SHED_LAG_MS=0) and the client's key in API_KEYS: REDIS_URL without limits (the baseline, 1.0x),
REDIS_URL with all three per-key limits set, and the limits in the process (no REDIS_URL). The
limits are set far above the load: what is measured is checking and settling them (one Redis round
trip at admission, one at the end), not refusals. Two loads, each run against the three services
in turn:

  per request: 20 users, each asking for one-token answers one after the other, unpaced, so that
               the service spends its time setting streams up and ending them;
  per token:   100 streams at 20 tokens/s, 200 tokens each, as in run.py.

Each load runs against the three services in turn, three rounds (--rounds), and it prints the
medians: throughput and the service's CPU per request (or per token) as ratios to the baseline,
the time to first byte added (where the check at admission shows), and redis-server's CPU per
request. Uses run.py's processes, client and figures, and resume.py's redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from client import cpu_seconds
from resume import start_redis
from run import HERE, V1, Phase, Processes, drain, fmt, machine, run_client, servers_stopped_at_the_end, start_service, start_upstream, warm_up

sys.path.insert(0, str(HERE.parent))  # the service's own package, for the check alone

from relay.config import load_settings  # noqa: E402
from relay.limits import make_key_limits  # noqa: E402
from relay.observability import Exchange, Metrics  # noqa: E402
from starlette.requests import Request  # noqa: E402

KEY = "bench"  # the key client.py sends
LIMITS = {"KEY_MAX_STREAMS": "100000", "KEY_REQUESTS_PER_MINUTE": "1000000000", "KEY_TOKENS_PER_MINUTE": "1000000000000"}
# Load shedding off in all three: a refusal under a burst of set-ups would make the runs differ in
# what they did, not in what the limits cost.
COMMON = {"API_KEYS": KEY, "SHED_LAG_MS": "0"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each load against each service, alternating (default 3): medians are printed")
    args = parser.parse_args()
    service_path = HERE.parent / "service.py"
    processes = Processes(Path(tempfile.mkdtemp(prefix="bench-limits-logs-")))
    with servers_stopped_at_the_end(processes):
        upstream, upstream_port = start_upstream(processes)
        redis, redis_port = start_redis(processes)
        shared = {"REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
        services = [
            ("no limits, Redis", start_service(processes, service_path, upstream_port, "service-baseline", **COMMON, **shared)),
            ("limits in Redis", start_service(processes, service_path, upstream_port, "service-redis", **COMMON, **shared, **LIMITS)),
            ("limits in process", start_service(processes, service_path, upstream_port, "service-memory", **COMMON, **LIMITS)),
        ]
        info = machine(services[0][1][0].pid)
        print(f"machine: {info['cpu']}, {info['cores']} cores, {info['python']}, Linux {info['kernel']}")
        for _, (process, port) in services:  # imports, pooled connections, Redis scripts loaded
            warm_up(processes, port, {"service": process.pid, "upstream": upstream.pid})
        quick = args.quick
        loads = [
            # (name, unit, streams, tokens, tokens/s, ramp, window)
            ("per request", "request", 20, 1, 0.0, 0.5, 1.0 if quick else 5.0),
            ("per token", "token", 100, 10 if quick else 200, 20.0, 0.5 if quick else 10.0, 0.6 if quick else 5.0),
        ]
        found: dict[tuple[str, str], list[dict[str, float]]] = {}
        busy = 0.0
        for load, unit, streams, tokens, rate, ramp, window in loads:
            for round_number in range(1, args.rounds + 1):  # the three services in turn, round after round
                for label, (process, port) in services:
                    pids = {"service": process.pid, "upstream": upstream.pid, "redis": redis.pid}
                    phase = Phase(load, "service", V1, streams, tokens, rate, ramp, window)
                    print(f"  {load:<11} round {round_number}, {label:<18} ...", end="", flush=True)
                    result = run_client(processes, phase.spec(port, pids, None), phase.timeout())
                    drain(port)
                    found.setdefault((load, label), []).append(figures(result))
                    busy = max(busy, result["cpu_seconds"].get("other_processes", 0.0) / result["seconds"])
                    print(f" {result['tokens']} {unit}s in the window, {result['streams_failed']} failed {result['failures'] or ''}", flush=True)
        print_table(found, [label for label, _ in services], args.rounds)
        checks = 500 if quick else 5000
        print(f"\nThe check alone: {checks:,} requests one after the other in this process, each admitted (reserve) and settled")
        for label, redis_url in (("limits in Redis", shared["REDIS_URL"]), ("limits in process", None)):
            wall, cpu, redis_cpu = asyncio.run(check_alone(redis_url, redis.pid, checks))
            redis_part = f", redis-server {redis_cpu:.1f} µs CPU" if redis_url else ""
            print(f"  {label:<18} {wall:7.1f} µs per request from admission to settled, {cpu:.1f} µs CPU of the process{redis_part}")
        if quick:
            print("\nThis was a --quick smoke run: its figures are not comparable. Run without --quick to measure.")
        if busy > 0.2:
            print(f"WARNING: other processes used up to {busy:.2f} cores during a window: these figures are disturbed.")


async def check_alone(redis_url: str | None, redis_pid: int, count: int) -> tuple[float, float, float]:
    """Per request: wall µs, this process's CPU µs and redis-server's CPU µs of `count` reservations,
    each awaited, then settled (in Redis, by the settling task, which runs as the loop lets it)."""
    settings = load_settings({"API_KEYS": KEY, **LIMITS, **({"REDIS_URL": redis_url} if redis_url else {})})
    limits = make_key_limits(settings, Metrics())
    await limits.start()
    request = Request({"type": "http", "headers": [(b"authorization", f"Bearer {KEY}".encode())]})
    body = {"model": "bench-0", "messages": [{"role": "user", "content": "Tell me something."}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": 1}
    wall, cpu, redis_cpu = time.perf_counter(), time.process_time(), cpu_seconds(redis_pid)
    for _ in range(count):
        exchange = Exchange("bench", "POST", V1, time.monotonic())
        reservation = await limits.reserve(request, body, exchange)
        assert reservation is not None
        exchange.usage = {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13}
        reservation.release()
        await asyncio.sleep(0)
    await limits.close()  # the settlements still queued
    return ((time.perf_counter() - wall) / count * 1e6, (time.process_time() - cpu) / count * 1e6,
            (cpu_seconds(redis_pid) - redis_cpu) / count * 1e6)


def figures(result: dict[str, Any]) -> dict[str, float]:
    """A phase's figures: per second, CPU µs per unit (a one-token request, or a token), time to first byte in ms."""
    units, cpu = result["tokens"], result["cpu_seconds"]
    ttfb = result.get("ttfb_us") or {}
    return {
        "per_s": result["tokens_per_second"],
        "service_us": cpu.get("service", 0.0) / units * 1e6 if units else math.nan,
        "redis_us": cpu.get("redis", 0.0) / units * 1e6 if units else math.nan,
        "ttfb_p50": ttfb.get("p50", math.nan) / 1000,
        "ttfb_p99": ttfb.get("p99", math.nan) / 1000,
        "failed": result["streams_failed"],
    }


def print_table(found: dict[tuple[str, str], list[dict[str, float]]], labels: list[str], rounds: int) -> None:
    columns = [("load", 11), ("service", 18), ("per s", 7), ("ratio", 6), ("svc µs/unit", 11), ("ratio", 6),
               ("redis µs/unit", 13), ("TTFB p50 ms", 11), ("added", 6), ("TTFB p99 ms", 11), ("added", 6), ("failed", 6)]
    print(f"\nThroughput and the service's CPU per request (one-token answers) or per token relayed, against the same service"
          f"\nwithout limits; time to first byte from connecting, and what the limits add to it. Medians of {rounds} round(s).")
    line = " ".join(f"{name:>{width}}" if i > 1 else f"{name:<{width}}" for i, (name, width) in enumerate(columns))
    print(line + "\n" + "-" * len(line))
    for load in dict.fromkeys(load for load, _ in found):
        median = {label: {name: statistics.median(f[name] for f in found[load, label]) for name in found[load, label][0]} for label in labels}
        base = median[labels[0]]
        for label in labels:
            f = median[label]
            cells = [load, label, f"{f['per_s']:.0f}", fmt(f["per_s"] / base["per_s"], 2, "x"), fmt(f["service_us"], 1),
                     fmt(f["service_us"] / base["service_us"], 2, "x"), fmt(f["redis_us"], 1), fmt(f["ttfb_p50"]),
                     fmt(f["ttfb_p50"] - base["ttfb_p50"]), fmt(f["ttfb_p99"]), fmt(f["ttfb_p99"] - base["ttfb_p99"]), f"{f['failed']:g}"]
            print(" ".join(f"{c:>{w}}" if i > 1 else f"{c:<{w}}" for i, (c, (_, w)) in enumerate(zip(cells, columns))))
    print("\nper request: 20 users asking for one-token answers one after the other, unpaced; per token: 100 streams at 20 tokens/s."
          "\nunit = a request (one-token answer) or a token; redis µs/unit is all of redis-server's CPU in the window per unit.")


if __name__ == "__main__":
    main()
