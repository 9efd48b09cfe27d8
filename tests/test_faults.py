"""Every upstream failure has one defined outcome, per response format.

FAULTS below is THE fault table: each row says how the upstream misbehaves, with which service
settings, and what the client must see. One parametrized test runs every row against every
format, and `python tests/test_faults.py` prints the same table as markdown for
docs/limits-and-failures.md, so the documentation and the tests agree row for row
(test_readme_fault_table_is_current checks the table between its markers there).
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ROOT, Service, client_for, launch, upstream_env
from sse import whole_sse_events
from upstream import CREATED, GARBAGE_EVENT, MID_STREAM_ERROR, STREAMS_DIR, FakeUpstream, Reply

UPSTREAM_KEY = "sk-upstream-secret-0123456789"
SECRETS = (UPSTREAM_KEY, "test-key-1", "second-key")
PIECES = ["Alpha", " beta", " gamma", " delta", " epsilon", " zeta"]
NORMAL_TEXT = "Hello, world!"  # the fake upstream's default reply

BEFORE = "before the first byte"
DURING = "after streaming started"
RETRY = "retries (UPSTREAM_MAX_RETRIES=1)"

# Service settings, by name; "default" is conftest's session service (UPSTREAM_MAX_RETRIES=0).
# One service for both timeouts: a stall trips the read timeout long before MAX_STREAM_SECONDS.
TIMEOUTS = {"UPSTREAM_READ_TIMEOUT": "0.3", "MAX_STREAM_SECONDS": "0.8"}
RETRIES = {"UPSTREAM_MAX_RETRIES": "1"}
CONNECT_TIMEOUT = {"UPSTREAM_CONNECT_TIMEOUT": "0.3"}


# -- what the fake upstream sends --------------------------------------------------------------------


def captured_json(name: str) -> bytes:
    return (STREAMS_DIR / name).read_bytes()


def upstream_error(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


BAD_PARAMETER = upstream_error(
    "max_tokens is too large: 5000000. This model supports at most 16384 completion tokens, whereas you provided 5000000.",
    param="max_tokens",
    code="invalid_value",
)
# Real upstreams quote (part of) the key they refused; this one quotes all of it.
BAD_KEY = upstream_error(
    f"Incorrect API key provided: {UPSTREAM_KEY}. You can find your API key at https://platform.openai.com/account/api-keys.",
    code="invalid_api_key",
)
FORBIDDEN = upstream_error(f"The API key {UPSTREAM_KEY} is not allowed to use this project.", code="forbidden")
MODEL_NOT_FOUND = captured_json("openai_error_404_model_not_found.json")
OPENROUTER_429 = captured_json("openrouter_error_429.json")
FAST_RETRY = {"retry-after-ms": "10"}  # the openai client's own hint; keeps retry rows quick


def chunk(delta: dict) -> bytes:
    body = {"id": "chatcmpl-slow", "object": "chat.completion.chunk", "created": CREATED, "model": "fake-model",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def same_read(bad_event: bytes, pieces: int) -> Reply:
    """`pieces` pieces and then `bad_event`, written at once: the service reads them together."""
    events = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": p}) for p in PIECES[:pieces]]
    return Reply(raw_chunks=[b"".join(events) + bad_event])


def slow_reply(pieces: int) -> Reply:
    """Alive but never finishing: `pieces` pieces, then only SSE keep-alive comments, every 0.05 s
    (for 10 s, far past MAX_STREAM_SECONDS).

    No read ever waits as long as UPSTREAM_READ_TIMEOUT, so only MAX_STREAM_SECONDS can end it."""
    events = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": p}) for p in PIECES[:pieces]]
    return Reply(raw_chunks=events + [b": keep-alive\n\n"] * 200, delay=0.05)


# -- the table -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    id: str
    when: str
    fault: str  # how the upstream misbehaves (README text)
    replies: Callable[[], list[Reply]]  # what the fake upstream answers, in order (built fresh per test)
    status: int  # the client's HTTP status
    error_type: str | None = None  # error.type the client gets; None: a normal answer
    code: str | None = None  # error.code, when pinned
    message: str | None = None  # the upstream's own message, passed on verbatim
    retry_after: str | None = None  # Retry-After passed on
    pieces: int | None = None  # DURING: the client gets exactly PIECES[:pieces] first
    upstream_requests: int = 1
    service: str = "default"  # which settings (see Services)
    request: dict[str, Any] = field(default_factory=dict)  # extra request fields
    note: str = ""  # README: what else the client sees
    role_chunk: bool = True  # DURING: /v1 relays the upstream's role chunk before the pieces
    passed_on: bool = False  # DURING: /v1 gets the upstream's own error object as it came; /chat its message and code


def error_message(body: bytes) -> str:
    return json.loads(body)["error"]["message"]


FAULTS: list[Fault] = [
    # before the first byte: a JSON error instead of a stream, whatever the format
    Fault("http_400", BEFORE, "HTTP 400 (a bad parameter)", lambda: [Reply(status=400, error_body=BAD_PARAMETER)],
          400, "invalid_request_error", "invalid_value", message=BAD_PARAMETER["error"]["message"], request={"max_tokens": 5000000},
          note="the upstream's message, param and code"),
    Fault("http_401", BEFORE, "HTTP 401 (the upstream key is refused)", lambda: [Reply(status=401, error_body=BAD_KEY)],
          502, "upstream_error", "upstream_auth_failed", note="the upstream key is never shown"),
    Fault("http_403", BEFORE, "HTTP 403", lambda: [Reply(status=403, error_body=FORBIDDEN)],
          502, "upstream_error", "upstream_auth_failed", note="the upstream key is never shown"),
    Fault("http_404_model", BEFORE, "HTTP 404 model not found (captured OpenAI body)",
          lambda: [Reply(status=404, raw_status_body=MODEL_NOT_FOUND)],
          404, "invalid_request_error", "model_not_found", message=error_message(MODEL_NOT_FOUND), note="the upstream's message"),
    Fault("http_429", BEFORE, "HTTP 429 with Retry-After", lambda: [Reply(status=429, extra_headers={"Retry-After": "7"})],
          429, "requests", "rate_limit_exceeded", message="Rate limit reached for requests.", retry_after="7",
          note="the upstream's message and Retry-After"),
    Fault("http_429_openrouter", BEFORE, "HTTP 429, captured OpenRouter body (integer code)",
          lambda: [Reply(status=429, raw_status_body=OPENROUTER_429, extra_headers={"Retry-After": "30"})],
          429, "rate_limit_error", message=error_message(OPENROUTER_429), retry_after="30",
          note="the upstream's message and Retry-After; `code` a string or null, as in OpenAI's errors"),
    Fault("http_500", BEFORE, "HTTP 500", lambda: [Reply(status=500)], 502, "upstream_error", "upstream_error"),
    Fault("http_503", BEFORE, "HTTP 503", lambda: [Reply(status=503)], 502, "upstream_error", "upstream_error"),
    Fault("connection_refused", BEFORE, "connection refused", lambda: [], 502, "upstream_error", "upstream_unreachable",
          upstream_requests=0, service="refused"),
    Fault("connect_timeout", BEFORE, "connect() hangs past UPSTREAM_CONNECT_TIMEOUT", lambda: [], 504, "upstream_timeout",
          "upstream_timeout", upstream_requests=0, service="connect_timeout"),
    Fault("headers_timeout", BEFORE, "no response headers within UPSTREAM_READ_TIMEOUT",
          lambda: [Reply(hold_headers=True, gates={0: threading.Event()})],
          504, "upstream_timeout", "upstream_timeout", service="timeouts"),
    # after streaming started: what was sent stays sent; then a terminal error, per format
    Fault("dropped_at_start", DURING, "connection dropped after the headers, before any piece",
          lambda: [Reply(pieces=PIECES, drop_after=0)], 200, "upstream_error", pieces=0),
    Fault("dropped", DURING, "connection dropped after 2 pieces", lambda: [Reply(pieces=PIECES, drop_after=2)],
          200, "upstream_error", pieces=2),
    Fault("stalled", DURING, "silent past UPSTREAM_READ_TIMEOUT after 2 pieces", lambda: [Reply(pieces=PIECES, stall_after=2)],
          200, "upstream_timeout", pieces=2, service="timeouts"),
    Fault("error_event", DURING, "an `error` object in the stream after 3 pieces", lambda: [Reply(pieces=PIECES, error_after=3)],
          200, "upstream_error", pieces=3, note="the upstream's message and code", passed_on=True),
    Fault("not_json", DURING, "a data line that is not JSON after 2 pieces", lambda: [Reply(pieces=PIECES, garbage_after=2)],
          200, "upstream_error", pieces=2),
    Fault("error_event_same_read", DURING, "2 pieces and an `error` object arriving in one network read",
          lambda: [same_read(MID_STREAM_ERROR, 2)], 200, "upstream_error", pieces=2, note="the upstream's message and code", passed_on=True),
    Fault("not_json_same_read", DURING, "2 pieces and a line that is not JSON arriving in one network read",
          lambda: [same_read(GARBAGE_EVENT, 2)], 200, "upstream_error", pieces=2),
    Fault("no_events", DURING, "a 200 answer with no events at all (a server that ignored `stream: true`)",
          lambda: [Reply(raw_chunks=[b'{"object": "chat.completion", "choices": []}'])], 200, "upstream_error", pieces=0,
          role_chunk=False),
    Fault("endless_event", DURING, "an event that never ends (9 MiB without a blank line)",
          lambda: [Reply(raw_chunks=[b"data: " + b"x" * (9 * 1024 * 1024)])], 200, "upstream_error", pieces=0,
          role_chunk=False),
    Fault("too_long", DURING, "slow: 3 pieces, then only keep-alives past MAX_STREAM_SECONDS", lambda: [slow_reply(3)],
          200, "stream_timeout", pieces=3, service="timeouts"),
    # retries: only before the first byte, never mid-stream
    Fault("retry_503_then_ok", RETRY, "HTTP 503, then a normal reply",
          lambda: [Reply(status=503, extra_headers=FAST_RETRY), Reply()], 200, upstream_requests=2, service="retry",
          note="a normal answer"),
    Fault("retry_503_twice", RETRY, "HTTP 503 twice", lambda: [Reply(status=503, extra_headers=FAST_RETRY)] * 2,
          502, "upstream_error", "upstream_error", upstream_requests=2, service="retry"),
    Fault("retry_closed_then_ok", RETRY, "connection closed before the response headers, then a normal reply",
          lambda: [Reply(hold_headers=True, drop_after=0), Reply()], 200, upstream_requests=2, service="retry"),
    Fault("retry_not_mid_stream", RETRY, "connection dropped after 2 pieces (never retried)",
          lambda: [Reply(pieces=PIECES, drop_after=2), Reply()], 200, "upstream_error", pieces=2, service="retry"),
]


@dataclass(frozen=True)
class Format:
    id: str
    title: str
    path: str
    accept: str | None
    body: dict[str, Any]


FORMATS = [
    Format("chat_sse", "/chat SSE", "/chat", "text/event-stream", {"message": "hi"}),
    Format("chat_ndjson", "/chat NDJSON", "/chat", "application/x-ndjson", {"message": "hi"}),
    Format("chat_text", "/chat text/plain", "/chat", "text/plain", {"message": "hi"}),
    Format("v1_sse", "/v1/chat/completions SSE", "/v1/chat/completions", None,
           {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}),
]


# -- the README table, generated from FAULTS ---------------------------------------------------------------

TABLE_START, TABLE_END = "<!-- fault-table:start -->", "<!-- fault-table:end -->"


def sees(fault: Fault, fmt: Format) -> str:
    """What the client sees, in README words, derived from the row's expectations."""
    if fault.pieces is None:
        if fault.status == 200:
            return f"a normal answer ({fault.upstream_requests} upstream requests)"
        code = f", code `{fault.code}`" if fault.code else ""
        note = f"; {fault.note}" if fault.note else ""
        return f"HTTP {fault.status} JSON error, type `{fault.error_type}`{code}{note}"
    got = {0: "no piece", 1: "1 piece"}.get(fault.pieces, f"{fault.pieces} pieces")
    note = f"; {fault.note}" if fault.note and fmt.id != "chat_text" else ""  # plain text has no error frame
    retried = "; not retried" if fault.when == RETRY else ""
    if fmt.id == "v1_sse" and fault.passed_on:
        return f"{got}, then the upstream's own `data: {{\"error\": ...}}` as it came, then `data: [DONE]`"
    return {
        "chat_sse": f"{got}, then `event: error` (`{fault.error_type}`{note}), nothing after",
        "chat_ndjson": f"{got}, then a `{{\"type\": \"error\"}}` line (`{fault.error_type}`{note}), no `done`",
        "chat_text": f"{got}, then the response stops without its chunked terminator (an incomplete read)",
        "v1_sse": f"{got}, then `data: {{\"error\": ...}}` (`{fault.error_type}`{note}), then `data: [DONE]`",
    }[fmt.id] + retried


def fault_table() -> str:
    """FAULTS as a markdown table; a cell equal to the one on its left reads "same"."""
    lines = [
        TABLE_START,
        "| fault | when | " + " | ".join(f"client sees: {fmt.title}" for fmt in FORMATS) + " |",
        "|---|---|" + "---|" * len(FORMATS),
    ]
    for fault in FAULTS:
        cells = [sees(fault, fmt) for fmt in FORMATS]
        cells = [cells[0]] + ["same" if cell == left else cell for left, cell in zip(cells, cells[1:])]
        lines.append(f"| {fault.fault} (`{fault.id}`) | {fault.when} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Every error body is `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}`; the only 5xx statuses are "
        "502, 503 and 504; no body carries a stack trace or a key; after any of these faults the service goes on "
        "serving. A piece sent before a fault is delivered exactly once.",
        TABLE_END,
    ]
    return "\n".join(lines) + "\n"


def test_readme_fault_table_is_current() -> None:
    """docs/limits-and-failures.md carries FAULTS as `fault_table()` prints it, between its markers."""
    page = ROOT / "docs" / "limits-and-failures.md"
    text = page.read_text(encoding="utf-8")
    assert TABLE_START in text, "docs/limits-and-failures.md must carry the fault table (python tests/test_faults.py prints it)"
    start = text.index(TABLE_START)
    assert text[start : text.index(TABLE_END) + len(TABLE_END)] + "\n" == fault_table()


# -- services ------------------------------------------------------------------------------------------


def full_backlog_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A loopback listener whose accept queue is full, so that a new connect() hangs (SYN dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(16):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(listener.getsockname())
        fillers.append(filler)
        try:
            probe = socket.create_connection(listener.getsockname(), timeout=0.2)
        except TimeoutError:
            return listener, fillers
        fillers.append(probe)
    raise RuntimeError("could not fill the listen backlog")


class Services:
    """The session service, and one service per special setting, each started when first needed.

    (One after another: conftest's launch() polls /healthz hard enough that parallel starts are slower.)"""

    def __init__(self, default: Service, upstream: FakeUpstream, log_dir: Path) -> None:
        self.running = {"default": default}
        self.upstream, self.log_dir = upstream, log_dir
        self.sockets: list[socket.socket] = []
        self.started: list[Service] = []
        self.clients: dict[str, httpx.Client] = {}  # one each: a new httpx.Client costs ~0.1 s of CPU

    def client(self, name: str) -> httpx.Client:
        if name not in self.clients:
            self.clients[name] = client_for(self[name])
        return self.clients[name]

    def __getitem__(self, name: str) -> Service:
        if name not in self.running:
            service = launch(self.log_dir, self.env(name))
            self.started.append(service)
            self.running[name] = service
        return self.running[name]

    def env(self, name: str) -> dict[str, str]:
        if name == "timeouts":
            return upstream_env(self.upstream, **TIMEOUTS)
        if name == "retry":
            return upstream_env(self.upstream, **RETRIES)
        if name == "refused":
            # Bound but never listening: connecting is refused, and no one else can take the port.
            closed = socket.socket()
            closed.bind(("127.0.0.1", 0))
            self.sockets.append(closed)
            return upstream_env(self.upstream, OPENAI_BASE_URL=f"http://127.0.0.1:{closed.getsockname()[1]}/v1")
        if name == "connect_timeout":
            listener, fillers = full_backlog_listener()
            self.sockets += [listener, *fillers]
            url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
            return upstream_env(self.upstream, OPENAI_BASE_URL=url, **CONNECT_TIMEOUT)
        raise KeyError(name)

    def stop(self) -> None:
        for client in self.clients.values():
            client.close()
        for service in self.started:
            service.process.send_signal(signal.SIGINT)  # all at once: each takes a moment to wind down
        for service in self.started:
            service.stop()
        for sock in self.sockets:
            sock.close()


@pytest.fixture(scope="module")
def services(service: Service, upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    running = Services(service, upstream, tmp_path_factory.mktemp("fault-services"))
    yield running
    running.stop()


# -- reading what the client got ------------------------------------------------------------------------


def assert_openai_error(error: Any) -> None:
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), f"error.code must be a string or null: {error}"


def assert_nothing_leaked(response: httpx.Response, body: bytes) -> None:
    assert b"Traceback" not in body
    exposed = body.decode("utf-8", "replace") + "\n" + "\n".join(f"{k}: {v}" for k, v in response.headers.items())
    for secret in SECRETS:
        assert secret not in exposed


def stream_error(error: Any, fault: Fault) -> None:
    assert_openai_error(error)
    assert error["type"] == fault.error_type, error
    if fault.id.startswith("error_event"):
        assert "The server had an error while processing your request." in error["message"]


def check_stream(fmt: Format, response: httpx.Response, fault: Fault) -> None:
    """The client got exactly the pieces sent before the fault, then the format's terminal error."""
    expected = PIECES[: fault.pieces]
    if fmt.id == "chat_text":
        received = b""
        with pytest.raises(httpx.RemoteProtocolError):
            for data in response.iter_raw():
                received += data
        assert received.decode() == "".join(expected)
        return
    body = response.read()  # these formats always end cleanly
    assert_nothing_leaked(response, body)
    text = body.decode()
    if fmt.id == "chat_sse":
        events = whole_sse_events(text)
        assert [name for name, _ in events] == ["delta"] * len(expected) + ["error"], events
        assert [json.loads(data)["text"] for _, data in events[:-1]] == expected
        final = json.loads(events[-1][1])
        assert set(final) == {"error"}
        stream_error(final["error"], fault)
    elif fmt.id == "chat_ndjson":
        assert text.endswith("\n")
        lines = [json.loads(line) for line in text.splitlines()]
        assert [line["type"] for line in lines] == ["delta"] * len(expected) + ["error"], lines
        assert [line["text"] for line in lines[:-1]] == expected
        assert set(lines[-1]) == {"type", "error"}
        stream_error(lines[-1]["error"], fault)
    else:
        events = whole_sse_events(text)
        assert {name for name, _ in events} == {"message"}
        payloads = [data for _, data in events]
        assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1, payloads
        chunks = [json.loads(data) for data in payloads[:-1]]
        assert set(chunks[-1]) == {"error"}, chunks[-1]
        if fault.passed_on:
            assert b"data: " + payloads[-2].encode() + b"\n\n" == MID_STREAM_ERROR  # byte for byte
        else:
            stream_error(chunks[-1]["error"], fault)
        deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
        role = [{"role": "assistant", "content": ""}] if fault.role_chunk else []
        assert deltas == role + [{"content": piece} for piece in expected]


def check_answer(fmt: Format, response: httpx.Response) -> None:
    """A normal, complete answer: NORMAL_TEXT, and the format's clean end."""
    body = response.read()
    assert_nothing_leaked(response, body)
    text = body.decode()
    if fmt.id == "chat_text":
        assert text == NORMAL_TEXT
    elif fmt.id == "chat_sse":
        events = whole_sse_events(text)
        assert "".join(json.loads(d)["text"] for n, d in events if n == "delta") == NORMAL_TEXT
        assert events[-1][0] == "done" and [n for n, _ in events].count("done") == 1
    elif fmt.id == "chat_ndjson":
        lines = [json.loads(line) for line in text.splitlines()]
        assert "".join(line["text"] for line in lines if line["type"] == "delta") == NORMAL_TEXT
        assert lines[-1]["type"] == "done" and lines[-1]["finish_reason"] == "stop"
    else:
        payloads = [data for _, data in whole_sse_events(text)]
        assert payloads[-1] == "[DONE]"
        chunks = [json.loads(data) for data in payloads[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == NORMAL_TEXT


def check_error_response(response: httpx.Response, fault: Fault) -> None:
    body = response.read()
    assert_nothing_leaked(response, body)
    assert response.status_code == fault.status, body
    assert response.headers["content-type"] == "application/json"
    payload = json.loads(body)
    assert set(payload) == {"error"}, payload
    error = payload["error"]
    assert_openai_error(error)
    assert error["type"] == fault.error_type, error
    if fault.code is not None:
        assert error["code"] == fault.code, error
    if fault.message is not None:
        assert error["message"] == fault.message
    if fault.id == "http_400":
        assert error["param"] == "max_tokens"
    assert response.headers.get("retry-after") == fault.retry_after


def still_serving(http: httpx.Client, fault: Fault) -> None:
    assert http.get("/healthz").status_code == 200
    if fault.service in ("refused", "connect_timeout"):
        return  # no upstream to answer; the service itself still does
    response = http.get("/chat", params={"q": "hi"})
    assert (response.status_code, response.text) == (200, NORMAL_TEXT)


# -- the test: every row, every format -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS, ids=[fmt.id for fmt in FORMATS])
@pytest.mark.parametrize("fault", FAULTS, ids=[fault.id for fault in FAULTS])
def test_fault(fault: Fault, fmt: Format, fake: FakeUpstream, services: Services) -> None:
    http = services.client(fault.service)
    replies = fault.replies()
    fake.expect(*replies)
    headers = {"Accept": fmt.accept} if fmt.accept else {}
    started = time.monotonic()
    with http.stream("POST", fmt.path, json={**fmt.body, **fault.request}, headers=headers) as response:
        assert response.status_code < 500 or response.status_code in (502, 503, 504)
        if fault.pieces is not None:
            assert response.status_code == 200
            check_stream(fmt, response, fault)
        elif fault.status == 200:
            assert response.status_code == 200
            check_answer(fmt, response)
        else:
            check_error_response(response, fault)
    elapsed = time.monotonic() - started
    assert elapsed < 5
    if fault.id == "too_long":
        assert elapsed >= float(TIMEOUTS["MAX_STREAM_SECONDS"])
    # Exactly this many upstream requests: the follow-up request proves no retry is still on its way.
    still_serving(http, fault)
    recorded = fake.requests
    follow_up = 0 if fault.service in ("refused", "connect_timeout") else 1
    assert len(recorded) == fault.upstream_requests + follow_up, [r.body for r in recorded]
    if fault.pieces is not None and replies[0].raw_chunks is None:  # raw replies count writes, not pieces
        assert recorded[0].pieces_sent == fault.pieces
    for rec in recorded[: fault.upstream_requests]:
        assert rec.closed.wait(5), "the upstream connection was left open"


if __name__ == "__main__":
    sys.stdout.write(fault_table())
