"""What resumable /chat answers cost per token, in memory and in Redis, against the upstream directly.

    python bench/resume.py           # about 2 minutes on 2 cores
    python bench/resume.py --quick   # smoke run, about 40 s: checks that everything works, measures nothing useful

Every /chat answer goes through the replay store: its producer appends each batch of events, and
its reader follows them from there. This runs, at 1 stream (50 tokens/s) and 100 streams (20
tokens/s), the same load four ways in one run: straight to the fake upstream, through the service's
/v1/chat/completions (a pure pass-through, nothing stored: the relay's own cost), and /chat with
the memory store and with the Redis store (a redis-server started here on a loopback port, without
persistence). It prints added latency and throughput as ratios to the direct run, and CPU per token
of the service and, for Redis, of redis-server too. Uses run.py's processes, client and figures.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from run import CHAT, HERE, START_SECONDS, V1, Phase, Processes, drain, figures, fmt, free_port, machine, run_client, servers_stopped_at_the_end, start_service, start_upstream, warm_up

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def start_redis(processes: Processes) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    directory = tempfile.mkdtemp(prefix="bench-redis-")
    argv = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", directory]
    redis = processes.start("redis", argv, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + START_SECONDS
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                probe.sendall(b"PING\r\n")
                if probe.recv(16).startswith(b"+PONG"):
                    return redis, port
        except OSError:
            pass
        if time.monotonic() > deadline or redis.poll() is not None:
            raise RuntimeError(f"redis-server did not start; see {processes.logs / 'redis.log'}")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args()
    service_path = HERE.parent / "service.py"
    processes = Processes(Path(tempfile.mkdtemp(prefix="bench-resume-logs-")))
    with servers_stopped_at_the_end(processes):
        upstream, upstream_port = start_upstream(processes)
        redis, redis_port = start_redis(processes)
        memory, memory_port = start_service(processes, service_path, upstream_port, "service-memory")
        shared, shared_port = start_service(processes, service_path, upstream_port, "service-redis", REDIS_URL=f"redis://127.0.0.1:{redis_port}/0")
        info = machine(memory.pid)
        print(f"machine: {info['cpu']}, {info['cores']} cores, {info['python']}, Linux {info['kernel']}; redis-server {REDIS_SERVER}")
        # (label, port, pids measured, path)
        targets = [
            ("direct to upstream", upstream_port, {"service": memory.pid, "upstream": upstream.pid}, V1, False),
            ("/v1 (nothing stored)", memory_port, {"service": memory.pid, "upstream": upstream.pid}, V1, True),
            ("/chat, memory store", memory_port, {"service": memory.pid, "upstream": upstream.pid}, CHAT, True),
            ("/chat, Redis store", shared_port, {"service": shared.pid, "upstream": upstream.pid, "redis": redis.pid}, CHAT, True),
        ]
        for port, pids in ((memory_port, targets[0][2]), (shared_port, targets[3][2])):  # warm up both services
            warm_up(processes, port, pids, CHAT)
        levels = [("1", 1, 50.0), ("100", 100, 20.0)]
        rows: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []
        for level, streams, rate in levels:
            tokens, window = (10, 0.6) if args.quick else (200, 5.0)
            direct: dict[str, Any] | None = None
            for label, port, pids, path, to_service in targets:
                phase = Phase(level, "service" if to_service else "direct", path, streams, tokens, rate, tokens / rate, window)
                print(f"  {level:>3} streams, {label:<22} ...", end="", flush=True)
                result = run_client(processes, phase.spec(port, pids, port if to_service else None), phase.timeout())
                if to_service:
                    drain(port)
                else:
                    direct = result
                row = figures(phase, result, direct if to_service else None, 0)
                redis_us = result["cpu_seconds"].get("redis", 0.0) / result["tokens"] * 1e6 if result["tokens"] and "redis" in pids else None
                row["redis_cpu_us_per_token"] = redis_us
                rows.append((level, label, result, row))
                print(f" {result['tokens']} tokens, {result['streams_failed']} failed {result['failures'] or ''}", flush=True)
        columns = [("streams", 7), ("path", 22), ("added p50 ms", 12), ("added p99 ms", 12), ("p50 ratio", 9), ("tokens/s", 8), ("ratio", 6),
                   ("svc µs/token", 12), ("redis µs/token", 14), ("failed", 6), ("other cores", 11)]
        print("\nAdded latency per token (minus the direct run's), throughput against the direct run, CPU per token relayed")
        line = " ".join(f"{name:>{width}}" if i > 1 else f"{name:<{width}}" for i, (name, width) in enumerate(columns))
        print(line + "\n" + "-" * len(line))
        for level, label, result, f in rows:
            cells = [level, label, fmt(f.get("added_latency_p50_ms")), fmt(f.get("added_latency_p99_ms")), fmt(f.get("latency_p50_ratio"), 1, "x"),
                     f"{f['tokens_per_second']:.0f}", fmt(f.get("tokens_per_second_ratio"), 2, "x"), fmt(f["service_cpu_us_per_token"], 1),
                     fmt(f["redis_cpu_us_per_token"], 1), str(result["streams_failed"]), fmt(f["cores_other_processes"])]
            print(" ".join(f"{c:>{w}}" if i > 1 else f"{c:<{w}}" for i, (c, (_, w)) in enumerate(zip(cells, columns))))
        if args.quick:
            print("\nThis was a --quick smoke run: its figures are not comparable. Run without --quick to measure.")
        if max(f["cores_other_processes"] or 0.0 for *_, f in rows) > 0.2:
            print("WARNING: other processes used the machine during a window: these figures are disturbed.")


if __name__ == "__main__":
    main()
