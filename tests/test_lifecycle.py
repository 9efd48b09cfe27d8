"""A stream's whole life under real traffic: a client that leaves stops the model, more than 40
streams run at once and a full service says so, SSE heartbeats fill silences, and a deploy
(SIGTERM) ends every stream with an explicit signal. Each test fails on the naive version: a plain
StreamingResponse over the openai iterator with anyio's defaults."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from conftest import AUTH, Service, client_for, launch, upstream_env, wait_until
from upstream import FakeUpstream, Reply

DISCONNECT_BOUND = 0.1  # seconds from the client's close to the upstream's close
CHAT = ("/chat", {"message": "hi"}, {"Accept": "text/event-stream"})
COMPLETIONS = ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True}, {})


def open_raw_stream(service: Service, path: str, body: dict[str, object], headers: dict[str, str]) -> socket.socket:
    """Send a request on a plain socket, so the test controls exactly when the connection closes."""
    host, port = service.base_url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = {"Host": host, "Content-Type": "application/json", "Content-Length": str(len(payload)), **AUTH, **headers}
    connection = socket.create_connection((host, int(port)), timeout=10)
    request = f"POST {path} HTTP/1.1\r\n" + "".join(f"{name}: {value}\r\n" for name, value in head.items()) + "\r\n"
    connection.sendall(request.encode() + payload)
    return connection


def read_until(connection: socket.socket, marker: bytes) -> bytes:
    received = b""
    while marker not in received:
        data = connection.recv(65536)
        if not data:
            raise AssertionError(f"connection closed before {marker!r}; got {received!r}")
        received += data
    return received


def close_and_time(connection: socket.socket) -> float:
    connection.shutdown(socket.SHUT_RDWR)
    closed_at = time.monotonic()
    connection.close()
    return closed_at


# -- disconnects ----------------------------------------------------------------------------------


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS], ids=["chat", "completions"])
@pytest.mark.parametrize("moment", ["mid-answer", "before-first-token", "before-upstream-headers"])
def test_disconnect_closes_the_upstream_at_once(fake: FakeUpstream, service: Service, route: tuple, moment: str) -> None:
    hold = threading.Event()  # never set: the upstream would wait 30 s
    if moment == "mid-answer":
        reply, marker = Reply(pieces=["first", " second"], gates={1: hold}), b"first"
    elif moment == "before-first-token":
        reply, marker = Reply(pieces=["first"], gates={0: hold}), b"\r\n\r\n"
    else:
        reply, marker = Reply(pieces=["first"], gates={0: hold}, hold_headers=True), None
    fake.expect(reply)
    connection = open_raw_stream(service, *route)
    if marker is not None:
        read_until(connection, marker)
    else:
        fake.wait_for_requests(1)
    recorded = fake.requests[-1]
    assert not recorded.closed.is_set()
    closed_at = close_and_time(connection)
    assert recorded.closed.wait(5), "the upstream request was never closed"
    assert recorded.closed_at is not None and recorded.closed_at - closed_at < DISCONNECT_BOUND
    assert not recorded.finished and not hold.is_set()


def process_resources(pid: int) -> tuple[int, int, int]:
    """(threads, open file descriptors, resident kB) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines())
    return int(fields["Threads"]), len(os.listdir(f"/proc/{pid}/fd")), int(fields["VmRSS"].split()[0])


def test_two_hundred_disconnects_leak_nothing(fake: FakeUpstream, start_service: Callable[..., Service]) -> None:
    service = start_service(upstream_env(fake))
    hold = threading.Event()
    fake.default = Reply(pieces=["first", " second"], gates={1: hold})

    def one_disconnect() -> None:
        connection = open_raw_stream(service, *COMPLETIONS)
        read_until(connection, b"first")
        close_and_time(connection)

    for _ in range(20):  # warm up: worker threads, pools and caches reach their working size
        one_disconnect()
    wait_until(lambda: all(r.closed.is_set() for r in fake.requests))
    time.sleep(0.3)
    threads, descriptors, resident = process_resources(service.pid)
    for _ in range(200):
        one_disconnect()
    wait_until(lambda: len(fake.requests) == 220 and all(r.closed.is_set() for r in fake.requests))
    assert not any(r.finished for r in fake.requests)
    wait_until(lambda: httpx.get(f"{service.base_url}/healthz").json()["active_streams"] == 0, timeout=5)
    time.sleep(0.3)
    after_threads, after_descriptors, after_resident = process_resources(service.pid)
    assert after_threads <= threads + 2, (threads, after_threads)
    assert after_descriptors <= descriptors + 2, (descriptors, after_descriptors)
    assert after_resident <= resident + 20_000, (resident, after_resident)


# -- capacity -------------------------------------------------------------------------------------


async def first_pieces(base_url: str, count: int, release: threading.Event) -> list[str]:
    """Open `count` streams at once; return each one's first piece, then release and drain them."""
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=15, limits=httpx.Limits(max_connections=None)) as http:

        async def one(first_seen: asyncio.Event, firsts: list[str]) -> str:
            async with http.stream("POST", "/chat", json={"message": "hi"}) as response:
                assert response.status_code == 200
                chunks = response.aiter_text()
                first = await chunks.__anext__()
                firsts.append(first)
                if len(firsts) == count:
                    first_seen.set()
                return first + "".join([chunk async for chunk in chunks])

        firsts: list[str] = []
        all_first = asyncio.Event()
        tasks = [asyncio.create_task(one(all_first, firsts)) for _ in range(count)]
        await asyncio.wait_for(all_first.wait(), timeout=15)
        started = time.monotonic()
        health = await http.get("/healthz")
        health_seconds = time.monotonic() - started
        assert health.status_code == 200 and health.json()["active_streams"] == count
        assert health_seconds < 1.0, health_seconds
        release.set()
        texts = await asyncio.wait_for(asyncio.gather(*tasks), timeout=15)
        assert all(text == "first second" for text in texts)
        return firsts


def test_more_than_forty_streams_run_at_once(fake: FakeUpstream, service: Service) -> None:
    """anyio's default limiter has 40 threads: the 41st naive stream would wait in silence."""
    release = threading.Event()
    fake.default = Reply(pieces=["first", " second"], gates={1: release})
    firsts = asyncio.run(first_pieces(service.base_url, 60, release))
    assert firsts == ["first"] * 60
    assert len(fake.requests) == 60


def test_a_full_service_answers_503_at_once(fake: FakeUpstream, start_service: Callable[..., Service]) -> None:
    service = start_service(upstream_env(fake, MAX_STREAMS="3"))
    release = threading.Event()
    fake.default = Reply(pieces=["first", " second"], gates={1: release})
    with client_for(service) as http:
        streams = [http.stream("POST", "/chat", json={"message": "hi"}) for _ in range(3)]
        texts = [stream.__enter__().iter_text() for stream in streams]  # kept: dropping one closes it
        assert [next(text) for text in texts] == ["first"] * 3
        started = time.monotonic()
        refused = http.post("/chat", json={"message": "hi"})
        also_refused = http.post("/v1/chat/completions", json=COMPLETIONS[1])
        assert time.monotonic() - started < 2
        more_refused = [http.post("/chat", json={"message": "hi"}) for _ in range(8)]
        hints = set()
        for response in (refused, also_refused, *more_refused):
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert 500 <= int(response.headers["retry-after-ms"]) <= 1500
            hints.add(response.headers["retry-after-ms"])
            assert response.json()["error"]["code"] == "capacity_exceeded"
        # Clients refused together must not all come back in the same instant.
        assert len(hints) > 1, hints
        assert len(fake.requests) == 3  # the refused requests never reached the upstream
        health = http.get("/healthz")
        assert health.status_code == 200 and health.json()["active_streams"] == 3
        release.set()
        for stream in streams:
            stream.__exit__(None, None, None)
        wait_until(lambda: http.get("/healthz").json()["active_streams"] == 0)
        assert http.post("/chat", json={"message": "hi"}).text == "first second"


# -- heartbeats -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def heartbeat_service(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    running = launch(tmp_path_factory.mktemp("heartbeat"), upstream_env(upstream, HEARTBEAT_SECONDS="0.2"))
    yield running
    running.stop()


@pytest.mark.parametrize("route", [CHAT, COMPLETIONS], ids=["chat", "completions"])
def test_sse_heartbeats_fill_every_silence(fake: FakeUpstream, heartbeat_service: Service, route: tuple) -> None:
    before_first, mid_answer = threading.Event(), threading.Event()
    fake.expect(Reply(pieces=["first", " second"], gates={0: before_first, 1: mid_answer}, role_chunk=False))
    path, body, headers = route
    with client_for(heartbeat_service) as http:
        with http.stream("POST", path, json=body, headers=headers) as response:
            lines = response.iter_lines()
            seen: list[str] = []

            def next_content_line() -> str:
                line = next(lines)
                seen.append(line)
                return line

            if path == "/chat":  # a resumable answer first tells EventSource how soon to reconnect
                assert [next_content_line() for _ in range(2)] == ["retry: 1000", ""]
            # Before the first token: nothing but pings until the upstream speaks.
            assert [next_content_line() for _ in range(4)] == [": ping", "", ": ping", ""]
            before_first.set()
            while "first" not in next_content_line():
                pass
            # Mid-answer: pings again while the upstream holds the rest.
            while next_content_line() != ": ping":
                pass
            assert not mid_answer.is_set()
            mid_answer.set()
            rest = list(lines)
    assert "second" in "\n".join(rest)


@pytest.mark.parametrize("accept", ["text/plain", "application/x-ndjson"])
def test_no_heartbeat_is_injected_into_text_or_ndjson(fake: FakeUpstream, heartbeat_service: Service, accept: str) -> None:
    release = threading.Event()
    fake.expect(Reply(pieces=["first", " second"], gates={0: release}))
    threading.Timer(0.7, release.set).start()  # more than three heartbeat intervals of silence
    with client_for(heartbeat_service) as http:
        response = http.post("/chat", json={"message": "hi"}, headers={"Accept": accept})
    if accept == "text/plain":
        assert response.text == "first second"
    else:
        assert [json.loads(line)["type"] for line in response.text.splitlines()] == ["delta", "delta", "done"]


# -- graceful shutdown ----------------------------------------------------------------------------


def test_sigterm_lets_streams_finish_then_ends_the_rest_explicitly(fake: FakeUpstream, start_service: Callable[..., Service]) -> None:
    service = start_service(upstream_env(fake, SHUTDOWN_GRACE_SECONDS="1"))
    finishes, never = threading.Event(), threading.Event()
    fake.expect(
        Reply(pieces=["done", " in time"], gates={1: finishes}),
        Reply(pieces=["cut", " off"], gates={1: never}),
        Reply(pieces=["cut", " off"], gates={1: never}),
        Reply(pieces=["cut", " off"], gates={1: never}),
    )
    results: dict[str, str] = {}

    def read(name: str, path: str, body: dict[str, object], accept: str) -> None:
        with httpx.Client(base_url=service.base_url, headers=AUTH, timeout=15) as http:
            with http.stream("POST", path, json=body, headers={"Accept": accept}) as response:
                results[name] = "".join(response.iter_text())

    readers = [
        threading.Thread(target=read, args=("in_time", "/chat", {"message": "a"}, "text/event-stream")),
        threading.Thread(target=read, args=("sse", "/chat", {"message": "b"}, "text/event-stream")),
        threading.Thread(target=read, args=("ndjson", "/chat", {"message": "c"}, "application/x-ndjson")),
        threading.Thread(target=read, args=("openai", *COMPLETIONS[:2], "text/event-stream")),
    ]
    for reader in readers:
        reader.start()
        fake.wait_for_requests(readers.index(reader) + 1)
    wait_until(lambda: all(r.pieces_sent == 1 for r in fake.requests))

    signalled = time.monotonic()
    service.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.TransportError):  # no longer accepting
        httpx.get(f"{service.base_url}/healthz", timeout=2)
    finishes.set()  # within the grace period: this answer completes normally
    for reader in readers:
        reader.join(timeout=10)
    assert service.process.wait(timeout=10) == 0
    assert time.monotonic() - signalled < 1 + 5

    assert '"finish_reason": "stop"' in results["in_time"] and "in time" in results["in_time"]
    assert "event: error" not in results["in_time"]
    for name in ("sse", "ndjson", "openai"):
        assert "cut" in results[name] and " off" not in results[name]
    assert results["sse"].rstrip().endswith('"type": "shutdown", "param": null, "code": null}}')
    assert "event: error" in results["sse"] and "event: done" not in results["sse"]
    last = json.loads(results["ndjson"].splitlines()[-1])
    assert last["type"] == "error" and last["error"]["type"] == "shutdown"
    events = [block for block in results["openai"].split("\n\n") if block]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["error"]["type"] == "shutdown"
    assert all(r.closed.is_set() for r in fake.requests)
    assert not never.is_set()
