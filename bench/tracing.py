"""What OpenTelemetry costs per token: tracing off, on with a live collector, on with a dead one.

    python bench/tracing.py            # 100 paced streams, two rounds, about 2 minutes on 2 cores
    python bench/tracing.py --quick    # smoke run, about 40 s: checks that everything works, measures nothing useful
    python bench/tracing.py --streams 1 --rounds 3

Starts the fake upstream (upstream.py), two OTLP/HTTP sinks on loopback (a live one that answers
every export at once, and a dead one that reads each export and never answers, as a collector that
hangs does), and three services (`python service.py`): tracing off, tracing and metrics on and
exported to the live sink, and the same exported to the dead sink. Then, round after round, the
same paced load (run.py's client: N streams of 200 tokens at 20 tokens/s, /v1/chat/completions)
goes through each service in turn, and it prints each one's CPU per token and per-token latency,
with the ratio of its CPU per token to the tracing-off service's in the same round. The traced
services keep the SDK's defaults (a 5 s batch delay, a queue of 2,048 spans), except that metrics
are exported every 5 s instead of every 60, so that each window holds an export. Every process
is stopped however the run ends. Method and caveats: bench/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from run import HERE, V1, Phase, Processes, drain, figures, fmt, machine, run_client, servers_stopped_at_the_end, start_service, start_upstream, warm_up

HOLD_SECONDS = 600.0  # the longest the dead sink holds an export; the run ends first


class Sink:
    """An OTLP/HTTP endpoint in this process: it takes any export and answers 200 at once, or,
    dead, reads it and never answers until the run stops it."""

    def __init__(self, answer: bool) -> None:
        stopping = self.stopping = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if not answer:
                    stopping.wait(HOLD_SECONDS)
                    self.close_connection = True
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--streams", type=int, default=100, help="streams at once (default 100)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the three services (default 2; 1 with --quick)")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 2)
    tokens, window, rate = (10, 0.6, 20.0) if args.quick else (200, 5.0, 20.0)
    service_path = HERE.parent / "service.py"
    processes = Processes(Path(tempfile.mkdtemp(prefix="bench-tracing-logs-")))
    live, dead = Sink(answer=True), Sink(answer=False)
    try:
        with servers_stopped_at_the_end(processes):
            upstream, upstream_port = start_upstream(processes)
            traced = {"OTEL_SERVICE_NAME": "bench", "OTEL_METRIC_EXPORT_INTERVAL": "5000"}
            services = []
            for label, name, settings in (
                ("off", "service-off", {}),
                ("on, live collector", "service-live", {**traced, "OTEL_EXPORTER_OTLP_ENDPOINT": live.endpoint}),
                ("on, dead collector", "service-dead", {**traced, "OTEL_EXPORTER_OTLP_ENDPOINT": dead.endpoint}),
            ):
                process, port = start_service(processes, service_path, upstream_port, name, **settings)
                services.append((label, process, port))
            info = machine(services[0][1].pid)
            print(f"machine: {info['cpu']}, {info['cores']} cores, {info['python']}, Linux {info['kernel']}")
            print(f"load: {args.streams} streams of {tokens} tokens at {rate:g} tokens/s, {V1}, {window:g} s window, {rounds} round(s)\n")
            for label, process, port in services:  # warm each up: imports, threads, pooled connections
                warm_up(processes, port, {"service": process.pid, "upstream": upstream.pid})
            rows: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in services}
            for number in range(1, rounds + 1):
                for label, process, port in services:
                    phase = Phase(str(args.streams), "service", V1, args.streams, tokens, rate, tokens / rate, window)
                    print(f"  round {number}, tracing {label:<20} ...", end="", flush=True)
                    result = run_client(processes, phase.spec(port, {"service": process.pid, "upstream": upstream.pid}, port), phase.timeout())
                    drain(port)
                    if process.poll() is not None:
                        raise RuntimeError(f"the service ({label}) exited; see {processes.logs}")
                    row = figures(phase, result, None, 0)
                    row["failed"] = result["streams_failed"]
                    rows[label].append(row)
                    print(f" {result['tokens']} tokens, {result['streams_failed']} failed, {fmt(row['service_cpu_us_per_token'], 1)} µs/token", flush=True)
            report(rows, rounds)
            if args.quick:
                print("\nThis was a --quick smoke run: streams of 10 tokens and sub-second windows; its figures are not comparable.")
            print(f"\nlogs: {processes.logs}")
    finally:
        live.stop()
        dead.stop()


def report(rows: dict[str, list[dict[str, Any]]], rounds: int) -> None:
    """Each service's CPU per token (median over the rounds) and the median of its per-round ratio
    to the tracing-off service of the same round; latency percentiles are the rounds' medians."""
    off = rows["off"]
    columns = [("tracing", 20), ("svc µs/token", 12), ("vs off", 7), ("per round", 22), ("lat p50 ms", 10), ("p99 ms", 7),
               ("tokens/s", 8), ("failed", 6), ("other cores", 11)]
    print("\nService CPU per token relayed (all of the service's CPU in the window), per-token latency (emission to arrival)")
    line = " ".join(f"{name:<{width}}" if not i else f"{name:>{width}}" for i, (name, width) in enumerate(columns))
    print(line + "\n" + "-" * len(line))
    for label, measured in rows.items():
        cpu = [row["service_cpu_us_per_token"] for row in measured]
        ratios = [row["service_cpu_us_per_token"] / base["service_cpu_us_per_token"] for row, base in zip(measured, off)
                  if row["service_cpu_us_per_token"] and base["service_cpu_us_per_token"]]
        cells = [label, fmt(statistics.median(cpu), 1) if all(cpu) else "-", fmt(statistics.median(ratios), 2, "x") if ratios else "-",
                 " ".join(fmt(ratio, 2, "x") for ratio in ratios), fmt(statistics.median(row["latency_p50_ms"] or 0 for row in measured)),
                 fmt(statistics.median(row["latency_p99_ms"] or 0 for row in measured)), f"{statistics.median(row['tokens_per_second'] for row in measured):.0f}",
                 str(sum(row["failed"] for row in measured)), fmt(max(row["cores_other_processes"] or 0 for row in measured))]
        print(" ".join(f"{cell:<{width}}" if not i else f"{cell:>{width}}" for i, (cell, (_, width)) in enumerate(zip(cells, columns))))
    if max(row["cores_other_processes"] or 0 for measured in rows.values() for row in measured) > 0.2:
        print("WARNING: other processes used the machine during a window: these figures are disturbed; run again on a quiet machine.")


if __name__ == "__main__":
    main()
