"""What a fallback upstream adds to time to first token, on this machine.

    python bench/fallback.py           # about 40 s on 2 cores
    python bench/fallback.py --quick   # smoke run, about 20 s: checks that everything works, measures nothing useful

Starts the fake upstream (upstream.py, the healthy one), a failing upstream in this process (one
loopback server whose path says how it fails), and `python service.py` once per setting. Then, in
rounds, each setting streams one short answer from /v1/chat/completions in turn (one at a time),
and the client stamps the arrival of the first token (time to first token, from the start of
connecting). Every setting but the first names the healthy upstream as its FALLBACK_BASE_URLS;
the primary is the healthy upstream itself (what a configured fallback costs when nothing fails),
a closed port, or the failing server. UPSTREAM_MAX_RETRIES=0 and BREAKER_FAILURES=0 (the primary
is asked every time) unless the row says otherwise, so that each row measures one switch.
Everything runs on 127.0.0.1, and every server is stopped however the run ends.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from client import percentiles
from run import HERE, Processes, machine, servers_stopped_at_the_end, start_service, start_upstream

REQUEST = {"model": "bench-0", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 5}
TOKEN = b'"content":"@'  # the fake upstream's tokens: the first one is the first output
ROLE = (b'data: {"id":"chatcmpl-failing","object":"chat.completion.chunk","created":1700000000,"model":"failing",'
        b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n')
ERROR = b'data: {"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}\n\n'
STALL_SECONDS = 30.0  # a silent upstream, until the service gives up on it and closes the connection
READ_TIMEOUT = 10.0


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def failing_reply(path: bytes) -> tuple[bytes, bool]:
    """What the failing server answers to a request for `path` (its first segment says how it
    fails), and whether it then stays silent."""
    kind = path.split(b"/")[1]
    if kind in (b"500", b"429"):
        body = b'{"error":{"message":"Failing on purpose.","type":"server_error","param":null,"code":null}}'
        status = b"500 Internal Server Error" if kind == b"500" else b"429 Too Many Requests"
        return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body), False
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    if kind == b"preamble-error":
        return head + chunked(ROLE) + chunked(ERROR) + b"0\r\n\r\n", False
    return head + chunked(ROLE), True  # "stall": the preamble, then nothing


async def serve_failing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STALL_SECONDS)
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            reply, stall = failing_reply(head.split(b" ")[1])
            writer.write(reply)
            await writer.drain()
            if stall:
                await asyncio.wait_for(reader.read(1), STALL_SECONDS)  # returns when the service closes the connection
                return
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
        return
    finally:
        writer.close()


def start_failing_server() -> int:
    """The failing upstream, on a loopback port, in a daemon thread of this process (it ends with it)."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="failing-upstream", daemon=True).start()
    server = asyncio.run_coroutine_threadsafe(asyncio.start_server(serve_failing, "127.0.0.1", 0), loop).result(timeout=10)
    return int(server.sockets[0].getsockname()[1])


def time_to_first_token(port: int) -> float:
    """Seconds from connecting to the first token's arrival, for one streamed answer read to its end."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=READ_TIMEOUT)
    try:
        connection.request("POST", "/v1/chat/completions", body=json.dumps(REQUEST), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"the service answered {response.status}: {response.read()[:300]!r}")
        seen, first = b"", None
        while data := response.read1(65536):
            seen = seen[-64:] + data
            if first is None and TOKEN in seen:
                first = time.perf_counter() - started
        if first is None or b"[DONE]" not in seen:
            raise RuntimeError(f"an answer without tokens or without its end: {seen[-300:]!r}")
        return first
    finally:
        connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args()
    answers, warm_up = (20, 5) if args.quick else (200, 20)
    service_path = HERE.parent / "service.py"
    processes = Processes(Path(tempfile.mkdtemp(prefix="bench-fallback-logs-")))
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: a connection to it is refused at once
    with servers_stopped_at_the_end(processes):
        upstream, upstream_port = start_upstream(processes)
        failing = f"http://127.0.0.1:{start_failing_server()}"
        healthy = f"http://127.0.0.1:{upstream_port}/v1"
        fallback = {"FALLBACK_BASE_URLS": healthy, "UPSTREAM_MAX_RETRIES": "0", "BREAKER_FAILURES": "0"}
        settings = [  # (row, how many answers, service settings)
            ("one upstream, no fallback (baseline)", answers, {"UPSTREAM_MAX_RETRIES": "0"}),
            ("fallback configured, primary healthy", answers, {**fallback, "OPENAI_BASE_URL": healthy}),
            ("primary refuses the connection", answers, {**fallback, "OPENAI_BASE_URL": f"http://127.0.0.1:{closed.getsockname()[1]}/v1"}),
            ("primary answers HTTP 500", answers, {**fallback, "OPENAI_BASE_URL": f"{failing}/500/v1"}),
            ("primary answers HTTP 429", answers, {**fallback, "OPENAI_BASE_URL": f"{failing}/429/v1"}),
            ("primary: role chunk, then an error object", answers, {**fallback, "OPENAI_BASE_URL": f"{failing}/preamble-error/v1"}),
            ("primary: role chunk, then silence (FALLBACK_FIRST_OUTPUT_SECONDS=0.2)", max(5, answers // 20),
             {**fallback, "OPENAI_BASE_URL": f"{failing}/stall/v1", "FALLBACK_FIRST_OUTPUT_SECONDS": "0.2"}),
            ("primary answers HTTP 500, UPSTREAM_MAX_RETRIES=2 (the default)", max(5, answers // 20),
             {**fallback, "OPENAI_BASE_URL": f"{failing}/500/v1", "UPSTREAM_MAX_RETRIES": "2"}),
            ("primary answers HTTP 500, its breaker open (BREAKER_FAILURES=5)", answers,
             {**fallback, "OPENAI_BASE_URL": f"{failing}/500/v1", "BREAKER_FAILURES": "5", "BREAKER_COOLDOWN_SECONDS": "3600"}),
        ]
        ports = []
        for number, (row, count, env) in enumerate(settings):
            service, port = start_service(processes, service_path, upstream_port, f"service-{number}", **env)
            ports.append(port)
            if number == 0:
                info = machine(service.pid)
                print(f"machine: {info['cpu']}, {info['cores']} cores, {info['python']}, Linux {info['kernel']}")
            for _ in range(min(warm_up, count)):  # threads, pooled connections, and (last row) the breaker opened
                time_to_first_token(port)
        # Round after round, one answer of each setting in turn: whatever else the machine does
        # meanwhile disturbs every setting alike.
        samples: list[list[float]] = [[] for _ in settings]
        print(f"  {answers} rounds ...", end="", flush=True)
        for round_number in range(answers):
            for number, (_, count, _) in enumerate(settings):
                if round_number < count:
                    samples[number].append(time_to_first_token(ports[number]))
        print(" done", flush=True)
        rows = [(row, count, values) for (row, count, _), values in zip(settings, samples)]
        base = statistics.median(rows[0][2])
        print("\nTime to first token through the service, one stream at a time (ms); added = p50 minus the baseline's p50")
        header = f"{'setting':<68} {'answers':>7} {'p50':>7} {'p90':>7} {'p99':>7} {'added p50':>9}"
        print(header + "\n" + "-" * len(header))
        for row, count, values in rows:
            p50 = statistics.median(values)
            ranked = percentiles([round(value * 1e9) for value in values])  # nearest rank, as every bench figure
            assert ranked is not None
            cells = [f"{p50 * 1000:.2f}", f"{ranked['p90'] / 1000:.2f}", f"{ranked['p99'] / 1000:.2f}", f"{(p50 - base) * 1000:+.2f}"]
            print(f"{row:<68} {count:>7} {cells[0]:>7} {cells[1]:>7} {cells[2]:>7} {cells[3]:>9}")
        if args.quick:
            print("\nThis was a --quick smoke run: its figures are not comparable. Run without --quick to measure.")
    closed.close()


if __name__ == "__main__":
    main()
