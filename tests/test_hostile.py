"""Clients that do not behave, against a real service process: they never read, send their request
slowly or never finish it, send huge heads, open more connections than the process has descriptors,
or connect while a multi-worker service shuts down. None of them may take the service away from
everyone else. Deadlines are short here (1 s, set through the environment) to keep the tests fast."""

from __future__ import annotations

import json
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from conftest import AUTH, KEY, LAUNCHERS, UVICORN, Service, client_for, launch, upstream_env, wait_until
from upstream import FakeUpstream, Reply

MAX_STREAMS = 2
MAX_HEADER_BYTES = 4096
NORMAL_TEXT = "Hello, world!"  # the fake upstream's default reply
SERVICE = [sys.executable, "service.py"]  # as conftest.launch starts it, here under prlimit


def guarded_env(upstream: FakeUpstream) -> dict[str, str]:
    return upstream_env(
        upstream,
        MAX_STREAMS=str(MAX_STREAMS),
        SEND_TIMEOUT_SECONDS="1",
        REQUEST_TIMEOUT_SECONDS="1",
        MAX_HEADER_BYTES=str(MAX_HEADER_BYTES),
        UPSTREAM_MAX_RETRIES="2",
    )


@pytest.fixture(scope="module")
def guarded(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`python service.py`: the app and its serving layer."""
    running = launch(tmp_path_factory.mktemp("hostile"), guarded_env(upstream))
    yield running
    running.stop()


@pytest.fixture(scope="module", params=sorted(LAUNCHERS))
def guarded_by(request: pytest.FixtureRequest, upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The service started each way users start it: what the app enforces holds under all."""
    running = launch(tmp_path_factory.mktemp("hostile"), guarded_env(upstream), LAUNCHERS[request.param])
    yield running
    running.stop()


def address(service: Service) -> tuple[str, int]:
    host, port = service.base_url.removeprefix("http://").split(":")
    return host, int(port)


def log_lines(service: Service) -> list[dict]:
    return [json.loads(line) for line in service.log().splitlines() if line.startswith('{"request_id"')]


def read_to_close(connection: socket.socket, timeout: float) -> bytes:
    """Everything the service sends until it closes the connection, within `timeout` seconds."""
    connection.settimeout(timeout)
    received = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = connection.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        received += data
    else:
        raise AssertionError(f"the connection was still open after {timeout} s; got {received[:200]!r}")
    return received


def read_one_response(connection: socket.socket) -> bytes:
    """One whole response with a Content-Length, on a connection that stays open."""
    received = b""
    while b"\r\n\r\n" not in received or len(received.partition(b"\r\n\r\n")[2]) < content_length(received):
        data = connection.recv(65536)
        assert data, f"closed before a whole response: {received!r}"
        received += data
    return received


def content_length(received: bytes) -> int:
    head = received.partition(b"\r\n\r\n")[0].lower()
    return int(head.split(b"content-length:")[1].split(b"\r\n")[0]) if b"content-length:" in head else 0


def json_error(response: bytes, status: int) -> dict:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), response[:300]
    assert b"content-type: application/json" in head.lower(), head
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def chat_head(length: int, path: str = "/chat") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


# -- clients that never read ----------------------------------------------------------------------


def test_a_client_that_never_reads_is_dropped_and_its_slot_released(fake: FakeUpstream, guarded_by: Service) -> None:
    """With MAX_STREAMS=2, two clients that read nothing held both slots forever: the final frame
    (or any piece) waited on their full TCP window."""
    fake.default = Reply(pieces=["x" * 16384] * 300)  # ~5 MB: more than any socket buffers hold
    stalled = []
    for _ in range(MAX_STREAMS):
        connection = socket.socket()
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        connection.connect(address(guarded_by))
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
        connection.sendall(chat_head(len(body), "/v1/chat/completions") + body)
        stalled.append(connection)
    requests = fake.wait_for_requests(MAX_STREAMS)
    started = time.monotonic()
    # SEND_TIMEOUT_SECONDS=1: each is dropped about a second after its window filled.
    assert all(recorded.closed.wait(10) for recorded in requests), "a stalled client still holds its upstream call"
    assert time.monotonic() - started < 10
    with client_for(guarded_by) as http:
        wait_until(lambda: http.get("/healthz").json()["active_streams"] == 0, timeout=5)
        fake.default = Reply()
        response = http.post("/chat", json={"message": "hi"})
        assert (response.status_code, response.text) == (200, NORMAL_TEXT)
    for connection in stalled:
        connection.close()
    wait_until(lambda: sum(line["outcome"] == "client_stalled" for line in log_lines(guarded_by)) >= MAX_STREAMS, timeout=5)
    stalled_lines = [line for line in log_lines(guarded_by) if line["outcome"] == "client_stalled"]
    assert all(line["status"] == 200 and line["path"] == "/v1/chat/completions" for line in stalled_lines)


# -- slow, idle and unfinished requests -----------------------------------------------------------


def test_a_slow_body_holds_no_slot_and_gets_408(fake: FakeUpstream, guarded_by: Service) -> None:
    """Content-Length: 100 and one byte: such requests took every slot, and kept them."""
    slow = []
    for _ in range(MAX_STREAMS + 1):
        connection = socket.create_connection(address(guarded_by), timeout=5)
        connection.sendall(chat_head(100) + b"{")
        slow.append(connection)
    with httpx.Client(base_url=guarded_by.base_url, headers=AUTH, timeout=5) as http:
        response = http.post("/chat", json={"message": "hi"})
        assert (response.status_code, response.text) == (200, NORMAL_TEXT)
    for connection in slow:
        error = json_error(read_to_close(connection, 5), 408)
        assert error["code"] == "request_timeout" and "REQUEST_TIMEOUT_SECONDS" in error["message"]
        connection.close()
    wait_until(lambda: sum(line["outcome"] == "request_timeout" and line["path"] == "/chat" for line in log_lines(guarded_by)) >= 3)
    assert all(line["status"] == 408 for line in log_lines(guarded_by) if line["outcome"] == "request_timeout")


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /heal", b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"],
    ids=["nothing", "partial_request_line", "partial_headers"],
)
def test_idle_and_half_sent_connections_are_closed(guarded: Service, sent: bytes) -> None:
    with socket.create_connection(address(guarded), timeout=5) as connection:
        connection.sendall(sent)
        started = time.monotonic()
        error = json_error(read_to_close(connection, 5), 408)
        assert error["code"] == "request_timeout"
        assert 0.5 < time.monotonic() - started < 5


def test_a_kept_alive_connection_has_the_same_deadline(guarded: Service) -> None:
    with socket.create_connection(address(guarded), timeout=5) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_one_response(connection).startswith(b"HTTP/1.1 200 ")
        connection.sendall(b"GET /heal")  # the next request, never finished
        json_error(read_to_close(connection, 5), 408)


def test_an_idle_kept_alive_connection_is_closed_without_an_answer(guarded: Service) -> None:
    with socket.create_connection(address(guarded), timeout=5) as connection:
        connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_one_response(connection).startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        assert read_to_close(connection, 5) == b""  # no 408 a client could take for its next request's
        assert time.monotonic() - started < 3  # REQUEST_TIMEOUT_SECONDS=1, not uvicorn's 5 s keep-alive


# -- request heads --------------------------------------------------------------------------------


def head_of_size(size: int) -> bytes:
    start = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: "
    end = b"\r\n\r\n"
    return start + b"a" * (size - len(start) - len(end)) + end


def test_a_head_at_the_limit_is_served(guarded: Service) -> None:
    with socket.create_connection(address(guarded), timeout=5) as connection:
        connection.sendall(head_of_size(MAX_HEADER_BYTES))
        assert connection.recv(65536).startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("size", [MAX_HEADER_BYTES + 1, 16 * 1024 * 1024], ids=["one_byte_over", "16MB"])
def test_a_head_over_the_limit_gets_431_and_is_not_read(guarded: Service, size: int) -> None:
    """httptools took a 64 MB header (200 OK), blocking the event loop while it parsed it."""
    head = head_of_size(size)
    with socket.create_connection(address(guarded), timeout=5) as connection:
        sent, started = 0, time.monotonic()
        while sent < len(head):
            try:
                sent += connection.send(head[sent : sent + 65536])
            except (BrokenPipeError, ConnectionResetError):
                break
            if select.select([connection], [], [], 0)[0]:
                break  # answered already
        with httpx.Client(base_url=guarded.base_url, timeout=5) as http:
            health_started = time.monotonic()
            assert http.get("/healthz").status_code == 200
            assert time.monotonic() - health_started < 1
        error = json_error(read_to_close(connection, 5), 431)
        assert "MAX_HEADER_BYTES" in error["message"] and error["code"] == "headers_too_large"
        if size > 1024 * 1024:
            assert sent < size, "the 431 came only after the whole head was sent"
        assert time.monotonic() - started < 5


def test_a_head_over_the_limit_is_not_read_past_it(guarded: Service) -> None:
    """The 431 went out at the limit, but the service then read and dropped the rest of the head,
    all 64 MB of it, before the connection closed. A client that sends without looking for the
    answer is now held by TCP (nothing more is read) and cut off."""
    head = head_of_size(64 * 1024 * 1024)
    sent = 0
    with socket.create_connection(address(guarded), timeout=5) as connection:
        connection.settimeout(1)
        deadline = time.monotonic() + 20
        while sent < len(head) and time.monotonic() < deadline:
            try:
                sent += connection.send(head[sent : sent + (1 << 20)])
            except (TimeoutError, BrokenPipeError, ConnectionResetError):
                break  # nothing is read any more, or the connection is gone
    # What the kernels buffer on the way (a few MB each side on loopback), never the whole head.
    assert sent < 32 * 1024 * 1024, f"{sent} bytes of a 64 MB head were taken"
    with httpx.Client(base_url=guarded.base_url, timeout=5) as http:
        assert http.get("/healthz").status_code == 200


def test_only_a_server_without_the_serving_layer_is_warned_of_once(guarded_by: Service) -> None:
    with httpx.Client(base_url=guarded_by.base_url, timeout=5) as http:
        for _ in range(3):
            assert http.get("/healthz").status_code == 200
    by_hand = guarded_by.process.args[: len(UVICORN) - 1] == UVICORN[:-1]
    warnings = guarded_by.log().count("Served without the serving layer")
    assert warnings == (1 if by_hand else 0)
    if by_hand:
        assert "uvicorn service:app --http relay.serving:ServingProtocol" in guarded_by.log()


# -- descriptors ----------------------------------------------------------------------------------


def test_more_connections_than_descriptors_get_503_not_resets(fake: FakeUpstream, start_service: Callable[..., Service]) -> None:
    """Under a 256-descriptor limit, 600 idle connections: the next client still gets an answer,
    a fast 503, instead of a reset; and once they leave, the service serves again."""
    service = start_service(
        upstream_env(fake, MAX_STREAMS="4", REQUEST_TIMEOUT_SECONDS="30"),
        ["prlimit", "--nofile=256:256", *SERVICE],
    )
    idle = [socket.create_connection(address(service), timeout=5) for _ in range(600)]
    try:
        time.sleep(0.3)
        started = time.monotonic()
        response = httpx.get(f"{service.base_url}/healthz", timeout=5)
        assert time.monotonic() - started < 2
        assert response.status_code == 503 and response.json()["error"]["code"] == "too_many_connections"
        assert response.headers["retry-after"] == "1"
    finally:
        for connection in idle:
            connection.close()
    wait_until(lambda: httpx.get(f"{service.base_url}/healthz", timeout=5).status_code == 200, timeout=5)
    with httpx.Client(base_url=service.base_url, headers=AUTH, timeout=5) as http:
        assert http.post("/chat", json={"message": "hi"}).text == NORMAL_TEXT


def test_the_serving_layer_under_uvicorn_raises_the_limit_or_says_it_is_too_low(fake: FakeUpstream, start_service: Callable[..., Service]) -> None:
    """`uvicorn service:app --http relay.serving:ServingProtocol` never goes through serve(): with
    MAX_STREAMS above what the soft limit leaves, it answered every connection with 503."""
    with_layer = [*UVICORN, "--http", "relay.serving:ServingProtocol"]
    service = start_service(upstream_env(fake, MAX_STREAMS="400"), ["prlimit", "--nofile=256:256", *with_layer])
    with httpx.Client(base_url=service.base_url, headers=AUTH, timeout=5) as http:
        assert http.get("/healthz").status_code == 200
        assert http.post("/chat", json={"message": "hi"}).text == NORMAL_TEXT
    assert "MAX_STREAMS=400 needs more open files than this process may have" in service.log()
    raised = start_service(upstream_env(fake), ["prlimit", "--nofile=256:4096", *with_layer])
    assert httpx.get(f"{raised.base_url}/healthz", timeout=5).status_code == 200
    assert "Max open files            4096                 4096" in Path(f"/proc/{raised.pid}/limits").read_text()


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(fake: FakeUpstream, start_service: Callable[..., Service]) -> None:
    service = start_service(upstream_env(fake), ["prlimit", "--nofile=256:4096", *SERVICE])
    limits = Path(f"/proc/{service.pid}/limits").read_text()
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    assert line.split()[3:5] == ["4096", "4096"], line


# -- shutdown with several workers ----------------------------------------------------------------


def test_a_connection_during_a_multi_worker_shutdown_is_refused_at_once(fake: FakeUpstream, start_service: Callable[..., Service]) -> None:
    """With WEB_CONCURRENCY=2 such a connection was accepted by the kernel and never answered."""
    service = start_service(upstream_env(fake, WEB_CONCURRENCY="2", SHUTDOWN_GRACE_SECONDS="3"))
    hold = threading.Event()
    fake.default = Reply(pieces=["first", " second"], gates={1: hold})
    with client_for(service) as http:
        with http.stream("POST", "/chat", json={"message": "hi"}) as stream:
            text = stream.iter_text()  # kept: dropping it would close the stream
            assert next(text) == "first"  # an open stream keeps the workers shutting down
            service.process.send_signal(signal.SIGTERM)
            time.sleep(1.0)  # the supervisor notices signals twice a second
            started = time.monotonic()
            try:
                with socket.create_connection(address(service), timeout=2) as late:
                    late.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                    answer = read_to_close(late, 2)
                    # Refused, closed, or (a worker still at work) answered: never left waiting.
                    assert answer == b"" or answer.startswith(b"HTTP/1.1 "), answer[:200]
            except (ConnectionRefusedError, ConnectionResetError):
                pass
            assert time.monotonic() - started < 2
            hold.set()
    assert service.process.wait(timeout=15) == 0


# -- upstream errors ------------------------------------------------------------------------------


def test_an_upstream_429_is_passed_on_at_once_and_not_retried(fake: FakeUpstream, guarded: Service) -> None:
    """The openai client waited out Retry-After: 7 twice: the client heard nothing for 14 s."""
    fake.default = Reply(status=429, extra_headers={"Retry-After": "7"})
    started = time.monotonic()
    with httpx.Client(base_url=guarded.base_url, headers=AUTH, timeout=5) as http:
        response = http.post("/chat", json={"message": "hi"})
    assert time.monotonic() - started < 1
    assert response.status_code == 429 and response.headers["retry-after"] == "7"
    assert len(fake.requests) == 1


def test_an_upstream_5xx_is_retried_briefly_and_its_message_kept_from_the_client(fake: FakeUpstream, guarded: Service) -> None:
    secret = "Traceback (most recent call last): File /srv/llama/server.py"
    fake.default = Reply(
        status=500,
        error_body={"error": {"message": secret, "type": "server_error", "param": None, "code": None}},
        extra_headers={"Retry-After": "30"},  # far more than the retry budget: not waited for
    )
    started = time.monotonic()
    with client_for(guarded) as http:
        response = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert time.monotonic() - started < 4
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_error"
    assert "Traceback" not in response.text and "/srv/llama" not in response.text
    assert len(fake.requests) == 3  # UPSTREAM_MAX_RETRIES=2
    wait_until(lambda: secret in guarded.log(), timeout=5)


@pytest.mark.parametrize("accept", ["application/x-ndjson", "text/event-stream"])
def test_a_line_separator_in_the_answer_does_not_cut_a_line_for_iter_lines(fake: FakeUpstream, service: Service, accept: str) -> None:
    """httpx's and requests' iter_lines() split on what str.splitlines() does: U+2028, U+2029, U+0085."""
    pieces = ["one\u2028", "two\u2029", "three\x85", "four"]
    fake.expect(Reply(pieces=pieces))
    with client_for(service, headers={**AUTH, "Accept": accept}) as http:
        with http.stream("POST", "/chat", json={"message": "hi"}) as response:
            lines = [line for line in response.iter_lines() if line.startswith(("{", "data:"))]
    payloads = [json.loads(line.removeprefix("data:")) for line in lines]
    assert [payload["text"] for payload in payloads if "text" in payload] == pieces


# -- malformed HTTP -------------------------------------------------------------------------------


def test_garbage_after_a_request_is_answered_without_an_error(fake: FakeUpstream, guarded: Service) -> None:
    """A route answering the first request must not write after the 400 for what followed it."""
    hold = threading.Event()
    fake.default = Reply(gates={0: hold}, hold_headers=True)  # the route is still at work when the garbage comes
    body = b'{"message": "hi"}'
    with socket.create_connection(address(guarded), timeout=5) as connection:
        connection.sendall(chat_head(len(body)) + body)
        fake.wait_for_requests(1)
        connection.sendall(b"GARBAGE\r\n\r\n")
        time.sleep(0.2)  # the 400 is written
        hold.set()  # and now the route has its answer to write
        time.sleep(0.3)
        answer = read_to_close(connection, 5)
    error = json_error(answer, 400)
    assert error["code"] == "invalid_http"
    assert "Exception in ASGI application" not in guarded.log() and "RuntimeError" not in guarded.log()
