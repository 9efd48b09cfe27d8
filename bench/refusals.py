"""What one refusal costs: the service's CPU per 503, against uvicorn answering 503 with nothing else.

    python bench/refusals.py                  # 3 rounds of 2,000 refusals each way, about 10 s
    python bench/refusals.py --refusals 5000 --rounds 5

Under overload most of the work a worker does for new streams is refusing them, and every refusal
takes the same GIL and event loop as the streams it protects. The service is kept full
(`MAX_STREAMS=1`, one stream held open), then asked for streams one new connection at a time, each
refused with `503 capacity_exceeded` (accept, parse, route, checks, log line, 503, close). The
same requests then go to the least a server can do: uvicorn with a bare ASGI app (this file's
`bare_app`) answering 503 at once. CPU is the server process's own (`/proc/<pid>/stat`), rounds
alternate between the two, and every round is printed.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

from client import cpu_seconds
from run import HERE, PYTHON, Processes, healthz, free_port, servers_stopped_at_the_end, start_service, start_upstream

BODY = b'{"model":"bench-1","max_tokens":1000,"stream":true,"messages":[{"role":"user","content":"hi"}]}'
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(BODY), BODY)
)
READ_SECONDS = 10.0


async def bare_app(scope: dict, receive: object, send: object) -> None:  # type: ignore[type-arg]
    """503 to every request, /healthz excepted: what uvicorn alone costs per refusal."""
    if scope["type"] != "http":
        return
    status = 200 if scope["path"] == "/healthz" else 503
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b'{"error":{"type":"server_busy"}}'})  # type: ignore[operator]


def ask(port: int) -> bytes:
    """One request on a new connection; the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=READ_SECONDS) as connection:
        connection.sendall(REQUEST)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


def refusal_cost(pid: int, port: int, refusals: int) -> float:
    """Microseconds of the server's CPU per refusal, over `refusals` refused requests."""
    before = cpu_seconds(pid)
    for _ in range(refusals):
        status = ask(port)[9:12]
        if status != b"503":
            sys.exit(f"bench: expected a 503, got {status!r}")
    return (cpu_seconds(pid) - before) / refusals * 1e6


def hold_a_stream(port: int) -> socket.socket:
    """A stream of 1,000 tokens at 1 token/s, so that MAX_STREAMS=1 refuses every other."""
    connection = socket.create_connection(("127.0.0.1", port), timeout=READ_SECONDS)
    connection.sendall(REQUEST)
    if connection.recv(64)[9:12] != b"200":
        sys.exit("bench: the held stream was not admitted")
    return connection


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--refusals", type=int, default=2000, help="refusals per round (default 2,000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds each way, alternating (default 3)")
    args = parser.parse_args()
    processes = Processes(Path(tempfile.mkdtemp(prefix="bench-refusals-logs-")))
    with servers_stopped_at_the_end(processes):
        _, upstream_port = start_upstream(processes)
        service, service_port = start_service(processes, HERE.parent / "service.py", upstream_port, MAX_STREAMS="1")
        held = hold_a_stream(service_port)
        bare_port = free_port()
        bare = processes.start("bare", [PYTHON, "-m", "uvicorn", "refusals:bare_app", "--port", str(bare_port), "--log-level", "warning",
                                        "--no-access-log"], cwd=HERE)
        deadline = time.monotonic() + 30
        while healthz(bare_port) is None:
            if time.monotonic() > deadline or bare.poll() is not None:
                sys.exit("bench: the bare uvicorn app did not start")
            time.sleep(0.1)
        for pid, port in ((service.pid, service_port), (bare.pid, bare_port)):
            refusal_cost(pid, port, 200)  # warm-up
        print(f"{args.refusals} refusals per round, each on a new connection; CPU of the server process per refusal")
        print(f"{'round':>5} {'service µs':>11} {'bare uvicorn µs':>16} {'ratio':>6}")
        for round_number in range(1, args.rounds + 1):
            ours = refusal_cost(service.pid, service_port, args.refusals)
            least = refusal_cost(bare.pid, bare_port, args.refusals)
            print(f"{round_number:>5} {ours:>11.0f} {least:>16.0f} {ours / least:>5.2f}x", flush=True)
        held.close()


if __name__ == "__main__":
    main()
