"""Fallback upstreams, against two or three fake upstreams on loopback: an upstream that fails before
the answer starts is replaced by the next one, and the client gets one whole, clean, streamed
answer from it (nothing doubled, nothing of the failed one), with exactly one call to each; after
the first output there is no switch; a request's own error is not retried; a breaker skips an
upstream that keeps failing and tries it again later; a client that leaves during a switch leaves
no upstream call running. And with no fallback to take, an upstream's own error reaches the client
as it was sent."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import AUTH, KEY, Service, client_for, launch, upstream_env, wait_until
from sse import sse_events, whole_sse_events
from upstream import CREATED, STREAMS_DIR, FakeUpstream, Recorded, Reply, response_object, responses_event

PIECES = ["Alpha", " beta", " gamma", " delta"]
WHOLE = "".join(PIECES)
PRIMARY_MODEL, SECONDARY_MODEL = "primary-model", "secondary-model"
FALLBACK_KEY = "sk-fallback-secret-4242"
UPSTREAM_KEY = "sk-upstream-secret-0123456789"  # as conftest's upstream_env sets it
DEADLINE = 0.5  # FALLBACK_FIRST_OUTPUT_SECONDS of the services that have fallbacks
QUOTA = {"type": "insufficient_quota", "code": "insufficient_quota", "param": None,
         "message": "You exceeded your current quota, please check your plan and billing details."}


# -- what the fake upstreams send -------------------------------------------------------------------


def json_bytes(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def chat_chunk(delta: dict, model: str = PRIMARY_MODEL, finish_reason: str | None = None) -> bytes:
    chunk = {"id": "chatcmpl-raw", "object": "chat.completion.chunk", "created": CREATED, "model": model,
             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    return b"data: " + json_bytes(chunk) + b"\n\n"


def data_event(payload: bytes) -> bytes:
    """`payload` as one SSE event, a `data:` line for each of its lines."""
    return b"".join(b"data: " + line + b"\n" for line in payload.split(b"\n")) + b"\n"


ROLE = chat_chunk({"role": "assistant", "content": "", "refusal": None})
QUOTA_OBJECT = data_event(json_bytes({"error": QUOTA}))


def responses_opening(model: str = PRIMARY_MODEL, through: int = 2) -> bytes:
    """The first `through` events OpenAI sends: response.created, .in_progress, the item and its part."""
    started = response_object("resp_raw", model, "in_progress", [])
    at = {"item_id": "msg_raw", "output_index": 0, "content_index": 0}
    events = [
        responses_event("response.created", 0, response=started),
        responses_event("response.in_progress", 1, response=started),
        responses_event("response.output_item.added", 2, output_index=0,
                        item={"id": "msg_raw", "type": "message", "status": "in_progress", "role": "assistant", "content": []}),
        responses_event("response.content_part.added", 3, **at, part={"type": "output_text", "annotations": [], "text": ""}),
    ]
    return b"".join(events[:through])


def responses_deltas(first: int, pieces: list[str]) -> bytes:
    at = {"item_id": "msg_raw", "output_index": 0, "content_index": 0}
    return b"".join(responses_event("response.output_text.delta", first + n, **at, delta=piece, logprobs=[]) for n, piece in enumerate(pieces))


def nested_error(sequence_number: int, error: dict[str, Any] = QUOTA) -> bytes:
    """The Responses API's error event in its current shape, the error nested."""
    return b"event: error\ndata: " + json_bytes({"type": "error", "sequence_number": sequence_number, "error": error}) + b"\n\n"


def flat_error(sequence_number: int, error: dict[str, Any]) -> bytes:
    """The Responses API's first error event shape: the error's fields beside the event's own type."""
    fields = {name: value for name, value in error.items() if name != "type"}
    return b"event: error\ndata: " + json_bytes({"type": "error", "sequence_number": sequence_number, **fields}) + b"\n\n"


def failed_event(sequence_number: int, error: dict[str, Any], model: str = PRIMARY_MODEL) -> bytes:
    response = {**response_object("resp_raw", model, "failed", []), "error": error}
    return b"event: response.failed\ndata: " + json_bytes({"type": "response.failed", "sequence_number": sequence_number, "response": response}) + b"\n\n"


def incomplete_event(sequence_number: int, model: str = PRIMARY_MODEL) -> bytes:
    response = response_object("resp_raw", model, "incomplete", [], incomplete={"reason": "max_output_tokens"})
    return b"event: response.incomplete\ndata: " + json_bytes({"type": "response.incomplete", "sequence_number": sequence_number, "response": response}) + b"\n\n"


# -- the routes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    id: str
    path: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)

    def is_piece(self, name: str, data: str) -> bool:
        if self.id == "v1_chat":
            return data != "[DONE]" and any(c["delta"].get("content") for c in json.loads(data).get("choices") or [])
        if self.id == "v1_responses":
            return name == "response.output_text.delta"
        return name == "delta"


V1_CHAT = Route("v1_chat", "/v1/chat/completions", {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}],
                                                     "stream": True, "stream_options": {"include_usage": True}})
V1_RESPONSES = Route("v1_responses", "/v1/responses", {"model": "fake-model", "input": "hi", "stream": True})
CHAT_SSE = Route("chat_sse", "/chat", {"message": "hi"}, {"Accept": "text/event-stream"})
ROUTES = [V1_CHAT, V1_RESPONSES, CHAT_SSE]


def preamble_then_error(route: Route) -> Reply:
    """A comment and the preamble, then the upstream's own error, before any output."""
    if route is V1_RESPONSES:
        return Reply(raw=b": OPENROUTER PROCESSING\n\n" + responses_opening(through=2) + nested_error(2))
    return Reply(raw=b": OPENROUTER PROCESSING\n\n" + ROLE + QUOTA_OBJECT)


# -- the services -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fakes() -> Iterator[list[FakeUpstream]]:
    started = [FakeUpstream().start() for _ in range(3)]
    yield started
    for fake in started:
        fake.stop()


def fresh(fake: FakeUpstream, model: str) -> FakeUpstream:
    fake.reset()
    fake.default = Reply(pieces=PIECES, model=model)
    return fake


@pytest.fixture
def primary(fakes: list[FakeUpstream]) -> FakeUpstream:
    return fresh(fakes[0], PRIMARY_MODEL)


@pytest.fixture
def secondary(fakes: list[FakeUpstream]) -> FakeUpstream:
    return fresh(fakes[1], SECONDARY_MODEL)


@pytest.fixture
def tertiary(fakes: list[FakeUpstream]) -> FakeUpstream:
    return fresh(fakes[2], "tertiary-model")


class Services:
    """One service per setting, each started when a test first needs it (they start one after another)."""

    def __init__(self, fakes: list[FakeUpstream], log_dir: Path) -> None:
        self.fakes, self.log_dir = fakes, log_dir
        self.running: dict[str, Service] = {}
        self.closed_port = socket.socket()
        self.closed_port.bind(("127.0.0.1", 0))  # bound, never listening: connecting is refused

    def env(self, name: str) -> dict[str, str]:
        primary, secondary, tertiary = self.fakes
        fallback = {"FALLBACK_BASE_URLS": secondary.base_url, "FALLBACK_API_KEYS": FALLBACK_KEY, "FALLBACK_MODELS": "fake-model=fallback-model",
                    "FALLBACK_FIRST_OUTPUT_SECONDS": str(DEADLINE), "BREAKER_FAILURES": "1000"}
        if name == "two":
            return upstream_env(primary, **fallback, MAX_CONTINUATIONS="0")
        if name == "refused":
            return upstream_env(primary, **fallback, OPENAI_BASE_URL=f"http://127.0.0.1:{self.closed_port.getsockname()[1]}/v1")
        if name == "three":
            return upstream_env(primary, **{**fallback, "FALLBACK_BASE_URLS": f"{secondary.base_url},{tertiary.base_url}", "FALLBACK_MODELS": ""})
        if name == "breaker":
            return upstream_env(primary, **{**fallback, "BREAKER_FAILURES": "2", "BREAKER_WINDOW_SECONDS": "10", "BREAKER_COOLDOWN_SECONDS": "1"})
        if name == "beats":
            return upstream_env(primary, **{**fallback, "FALLBACK_FIRST_OUTPUT_SECONDS": "0"}, HEARTBEAT_SECONDS="0.05", MAX_STREAMS="1")
        raise KeyError(name)

    def __getitem__(self, name: str) -> Service:
        if name not in self.running:
            self.running[name] = launch(self.log_dir, self.env(name))
        return self.running[name]

    def stop(self) -> None:
        for service in self.running.values():
            service.process.send_signal(signal.SIGINT)  # all at once: each takes a moment to wind down
        for service in self.running.values():
            service.stop()
        self.closed_port.close()


@pytest.fixture(scope="module")
def services(fakes: list[FakeUpstream], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    running = Services(fakes, tmp_path_factory.mktemp("fallback-services"))
    yield running
    running.stop()


@pytest.fixture
def gates() -> Iterator[Callable[[], threading.Event]]:
    """Gates for the fakes' replies, all opened when the test ends, so that no reply waits on."""
    made: list[threading.Event] = []

    def gate() -> threading.Event:
        made.append(threading.Event())
        return made[-1]

    yield gate
    for event in made:
        event.set()


# -- reading what the client got --------------------------------------------------------------------


@dataclass
class Received:
    status: int
    text: str
    events: list[tuple[str, str]]


def stream_through(service: Service, route: Route, gate: threading.Event | None = None, after: int = 2, body: dict | None = None) -> Received:
    """Make the request and read the stream as it comes; `gate` (holding the answering upstream
    after `after` pieces) is opened only once those pieces reached the client: proof that the
    answer streamed, rather than arriving whole at the end."""
    lines: list[str] = []

    def recorded(source: Iterator[str]) -> Iterator[str]:
        for line in source:
            lines.append(line)
            yield line

    with client_for(service) as http:
        with http.stream("POST", route.path, json=body or route.body, headers=route.headers) as response:
            if response.status_code != 200:
                return Received(response.status_code, response.read().decode(), [])
            events, pieces = [], 0
            for name, data in sse_events(recorded(response.iter_lines())):
                events.append((name, data))
                pieces += route.is_piece(name, data)
                if gate is not None and pieces == after and not gate.is_set():
                    gate.set()
    return Received(200, "\n".join(lines) + "\n", events)


def assert_whole_answer(route: Route, received: Received, model: str = SECONDARY_MODEL) -> None:
    """One whole, clean answer, from the upstream answering with `model`, and nothing of any other."""
    assert received.status == 200, received.text
    assert PRIMARY_MODEL not in received.text and "insufficient_quota" not in received.text, received.text
    events = received.events
    if route is V1_CHAT:
        assert [data for _, data in events].count("[DONE]") == 1 and events[-1][1] == "[DONE]"
        chunks = [json.loads(data) for _, data in events[:-1]]
        assert {chunk["model"] for chunk in chunks} == {model}
        assert sum(1 for c in chunks for choice in c["choices"] if "role" in choice["delta"]) == 1
        assert "".join(choice["delta"].get("content") or "" for c in chunks for choice in c["choices"]) == WHOLE
        assert chunks[-1]["usage"]["completion_tokens"] == len(PIECES)
    elif route is V1_RESPONSES:
        datas = [json.loads(data) for _, data in events]
        assert [data["sequence_number"] for data in datas] == list(range(len(datas)))  # one stream, from one upstream
        names = [name for name, _ in events]
        assert names.count("response.created") == 1 and names[0] == "response.created" and names[-1] == "response.completed"
        assert datas[-1]["response"]["model"] == model
        assert "".join(data["delta"] for data in datas if data["type"] == "response.output_text.delta") == WHOLE
    else:
        assert [name for name, _ in events] == ["delta"] * len(PIECES) + ["done"], events
        assert "".join(json.loads(data)["text"] for _, data in events[:-1]) == WHOLE


def one_request(fake: FakeUpstream) -> Recorded:
    """The fake's only request, which it must have seen end."""
    assert len(fake.requests) == 1, [r.path for r in fake.requests]
    assert fake.requests[0].closed.wait(5)
    return fake.requests[0]


def log_line(service: Service, request_id: str) -> dict:
    def lines() -> list[dict]:
        return [json.loads(line) for line in service.log().splitlines() if line.startswith("{")]

    wait_until(lambda: any(line.get("request_id") == request_id for line in lines()))
    return next(line for line in lines() if line.get("request_id") == request_id)


# -- switching before the first output ----------------------------------------------------------------


SWITCHES: dict[str, tuple[str, Callable[[Route, Callable[[], threading.Event]], list[Reply]]]] = {
    "connection_refused": ("refused", lambda route, gate: []),
    "http_500": ("two", lambda route, gate: [Reply(status=500)]),
    "http_429": ("two", lambda route, gate: [Reply(status=429, extra_headers={"Retry-After": "7"})]),
    "timeout_before_head": ("two", lambda route, gate: [Reply(hold_headers=True, gates={0: gate()})]),
    "timeout_before_output": ("two", lambda route, gate: [Reply(pieces=PIECES, model=PRIMARY_MODEL, gates={0: gate()})]),
    "preamble_then_error": ("two", lambda route, gate: [preamble_then_error(route)]),
    "dropped_before_output": ("two", lambda route, gate: [Reply(pieces=PIECES, model=PRIMARY_MODEL, drop_after=0)]),
    "ended_without_output": ("two", lambda route, gate: [Reply(raw=responses_opening(through=4) if route is V1_RESPONSES else ROLE)]),
}


@pytest.mark.parametrize("route", ROUTES, ids=[route.id for route in ROUTES])
@pytest.mark.parametrize("fault", list(SWITCHES))
def test_a_failure_before_the_first_output_is_answered_by_the_next_upstream(
    fault: str, route: Route, primary: FakeUpstream, secondary: FakeUpstream, services: Services, gates: Callable[[], threading.Event]
) -> None:
    service_name, replies = SWITCHES[fault]
    primary.expect(*replies(route, gates))
    gate = gates()
    secondary.expect(Reply(pieces=PIECES, model=SECONDARY_MODEL, gates={2: gate}))
    started = time.monotonic()
    received = stream_through(services[service_name], route, gate)
    assert_whole_answer(route, received)
    assert gate.is_set(), "the fallback's first pieces did not reach the client before it sent the rest"
    if fault.startswith("timeout"):
        assert DEADLINE <= time.monotonic() - started < DEADLINE + 3
    asked = one_request(secondary)
    assert asked.headers["authorization"] == f"Bearer {FALLBACK_KEY}"
    assert asked.body["model"] == "fallback-model"  # FALLBACK_MODELS
    if service_name == "refused":
        assert primary.requests == []
    else:
        assert one_request(primary).headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


@pytest.mark.parametrize("shape", ["nested_error", "response_failed"])
def test_a_responses_error_before_the_first_output_is_answered_by_the_next_upstream(
    shape: str, primary: FakeUpstream, secondary: FakeUpstream, services: Services
) -> None:
    opening = responses_opening(through=4)
    primary.expect(Reply(raw=opening + (nested_error(4) if shape == "nested_error" else failed_event(4, QUOTA))))
    assert_whole_answer(V1_RESPONSES, stream_through(services["two"], V1_RESPONSES))
    one_request(primary)
    one_request(secondary)


def test_three_upstreams_each_asked_once_and_every_attempt_logged(
    primary: FakeUpstream, secondary: FakeUpstream, tertiary: FakeUpstream, services: Services
) -> None:
    primary.expect(Reply(status=500))
    secondary.expect(preamble_then_error(V1_RESPONSES))
    service = services["three"]
    with client_for(service, headers={**AUTH, "X-Request-ID": "three-upstreams"}) as http:
        response = http.post("/v1/responses", json=V1_RESPONSES.body)
    assert_whole_answer(V1_RESPONSES, Received(200, response.text, whole_sse_events(response.text)), "tertiary-model")
    for fake in (primary, secondary, tertiary):
        one_request(fake)
    attempts = log_line(service, "three-upstreams")["upstreams"]
    assert [(a["upstream"], a["status"], a.get("error")) for a in attempts] == [
        ("primary", 500, "upstream_error"), ("fallback-1", 200, "error_event"), ("fallback-2", 200, None)]
    assert all(isinstance(a["ms"], float) and a["ms"] >= 0 for a in attempts)
    assert FALLBACK_KEY not in service.log() and UPSTREAM_KEY not in service.log()


def test_the_last_upstreams_own_error_reaches_the_client_as_sent(
    primary: FakeUpstream, secondary: FakeUpstream, tertiary: FakeUpstream, services: Services
) -> None:
    last = responses_opening(model="tertiary-model", through=2) + nested_error(2)
    primary.expect(Reply(status=500))
    secondary.expect(Reply(status=503))
    tertiary.expect(Reply(raw=last))
    with client_for(services["three"]) as http:
        response = http.post("/v1/responses", json=V1_RESPONSES.body)
    assert response.content == last  # the preamble held, then sent with the error: nothing else, nothing changed
    for fake in (primary, secondary, tertiary):
        one_request(fake)


def test_the_last_upstreams_refusal_is_its_own(primary: FakeUpstream, secondary: FakeUpstream, services: Services) -> None:
    primary.expect(Reply(status=500))
    secondary.expect(Reply(status=429, extra_headers={"Retry-After": "7"}))
    with client_for(services["two"]) as http:
        response = http.post("/v1/chat/completions", json=V1_CHAT.body)
    assert response.status_code == 429 and response.headers["retry-after"] == "7"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    one_request(primary)
    one_request(secondary)


def test_an_answer_that_is_not_streamed_falls_back_too(primary: FakeUpstream, secondary: FakeUpstream, services: Services) -> None:
    primary.expect(Reply(status=503))
    with client_for(services["two"]) as http:
        response = http.post("/v1/chat/completions", json={**V1_CHAT.body, "stream": False})
    assert response.status_code == 200 and response.json()["model"] == SECONDARY_MODEL
    assert response.json()["choices"][0]["message"]["content"] == WHOLE
    one_request(primary)
    one_request(secondary)


# -- no switch: after the first output, and for the request's own errors ----------------------------


def test_a_preamble_past_its_bound_is_sent_and_its_upstream_kept(
    primary: FakeUpstream, secondary: FakeUpstream, services: Services, gates: Callable[[], threading.Event]
) -> None:
    """The held preamble has a bound (HELD_EVENTS): past it, it is sent on, and then nothing can switch."""
    error_held = gates()
    primary.expect(Reply(raw_chunks=[ROLE * 300, QUOTA_OBJECT], gates={1: error_held}))
    with client_for(services["two"]) as http:
        with http.stream("POST", "/v1/chat/completions", json=V1_CHAT.body) as response:
            chunks = response.iter_raw()
            received = next(chunks)  # the preamble, sent although nothing but preamble came
            error_held.set()
            received += b"".join(chunks)
    assert received == ROLE * 300 + QUOTA_OBJECT + b"data: [DONE]\n\n"
    one_request(primary)
    assert secondary.requests == []


def test_a_failure_after_the_first_output_does_not_switch(primary: FakeUpstream, secondary: FakeUpstream, services: Services) -> None:
    service = services["two"]
    sent = ROLE + chat_chunk({"content": "Alpha"}) + chat_chunk({"content": " beta"}) + QUOTA_OBJECT
    primary.expect(Reply(raw=sent))
    with client_for(service) as http:
        assert http.post("/v1/chat/completions", json=V1_CHAT.body).content == sent + b"data: [DONE]\n\n"
        responses = responses_opening(through=4) + responses_deltas(4, ["Alpha"]) + nested_error(5)
        primary.expect(Reply(raw=responses))
        assert http.post("/v1/responses", json=V1_RESPONSES.body).content == responses
        primary.expect(Reply(raw=sent))
        events = whole_sse_events(http.post("/chat", json=CHAT_SSE.body, headers=CHAT_SSE.headers).text)
        assert [name for name, _ in events] == ["delta", "delta", "error"]
        assert json.loads(events[-1][1]) == {"error": {"message": QUOTA["message"], "type": "upstream_error", "param": None, "code": "insufficient_quota"}}
        primary.expect(Reply(pieces=PIECES, model=PRIMARY_MODEL, drop_after=2))
        text = http.post("/v1/chat/completions", json=V1_CHAT.body).text
        assert '"type": "upstream_error"' in text and text.endswith("data: [DONE]\n\n")  # the service's own: the connection broke
    assert len(primary.requests) == 4 and secondary.requests == []


@pytest.mark.parametrize(("status", "client_status"), [(400, 400), (401, 502), (404, 404), (413, 413), (422, 422)])
def test_an_error_that_is_the_requests_own_is_not_retried_elsewhere(
    status: int, client_status: int, primary: FakeUpstream, secondary: FakeUpstream, services: Services
) -> None:
    primary.expect(Reply(status=status))
    with client_for(services["two"]) as http:
        response = http.post("/v1/chat/completions", json=V1_CHAT.body)
    assert response.status_code == client_status and set(response.json()["error"]) == {"message", "type", "param", "code"}
    one_request(primary)
    assert secondary.requests == []


# -- the breaker ------------------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float | None:
    """A sample's value in Prometheus text, whatever the order of its labels."""
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.startswith(name + "{") and dict(part.split("=", 1) for part in sample[len(name) + 1 : -1].split(",")) == {
            key: f'"{label}"' for key, label in labels.items()
        }:
            return float(value)
    return None


def upstream_health(http: httpx.Client, name: str) -> dict:
    return next(entry for entry in http.get("/healthz").json()["upstreams"] if entry["name"] == name)


def test_the_breaker_opens_skips_the_upstream_and_closes_again(primary: FakeUpstream, secondary: FakeUpstream, services: Services) -> None:
    service = services["breaker"]
    with client_for(service) as http:
        assert upstream_health(http, "primary")["state"] == "closed"
        primary.expect(Reply(status=500), Reply(status=500))
        for _ in range(2):
            assert http.post("/chat", json={"message": "hi"}).text == WHOLE  # BREAKER_FAILURES=2 failures, both answered
        health = upstream_health(http, "primary")
        assert (health["state"], health["failures"], health["opened"]) == ("open", 2, 1)
        assert http.post("/chat", json={"message": "hi"}).text == WHOLE
        assert len(primary.requests) == 2 and len(secondary.requests) == 3  # skipped: not asked at all
        assert upstream_health(http, "primary")["skipped"] == 1
        metrics = http.get("/metrics").text
        assert metric(metrics, "relay_upstream_state", upstream="primary", state="open") == 1
        assert metric(metrics, "relay_upstream_state", upstream="primary", state="closed") == 0
        assert metric(metrics, "relay_upstream_fallbacks_total", upstream="primary") == 3
        assert metric(metrics, "relay_upstream_failures_total", upstream="primary") == 2
        assert FALLBACK_KEY not in metrics and UPSTREAM_KEY not in metrics and "127.0.0.1" not in http.get("/healthz").text

        wait_until(lambda: upstream_health(http, "primary")["state"] == "half-open", timeout=5)
        assert metric(http.get("/metrics").text, "relay_upstream_state", upstream="primary", state="half-open") == 1
        primary.expect(Reply(status=500))  # the probe fails: open again, and this request falls back
        assert http.post("/chat", json={"message": "hi"}).text == WHOLE
        assert upstream_health(http, "primary")["state"] == "open" and len(primary.requests) == 3

        wait_until(lambda: upstream_health(http, "primary")["state"] == "half-open", timeout=5)
        assert http.post("/chat", json={"message": "hi"}).text == WHOLE  # the probe answers
        assert upstream_health(http, "primary")["state"] == "closed"
        assert len(primary.requests) == 4 and len(secondary.requests) == 4
        assert metric(http.get("/metrics").text, "relay_upstream_state", upstream="primary", state="closed") == 1
    assert FALLBACK_KEY not in service.log()


# -- what holds for one upstream holds for each -------------------------------------------------------


def raw_request(service: Service, route: Route) -> socket.socket:
    """A request on a plain socket, whose response need not have started for the client to leave."""
    body = json.dumps(route.body).encode()
    connection = socket.create_connection(("127.0.0.1", int(service.base_url.rsplit(":", 1)[1])), timeout=10)
    head = f"POST {route.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    connection.sendall(head.encode() + "".join(f"{k}: {v}\r\n" for k, v in route.headers.items()).encode() + b"\r\n" + body)
    return connection


@pytest.mark.parametrize("when", ["before_the_response", "after_the_preamble", "chat_after_the_preamble"])
def test_a_client_that_leaves_during_a_switch_leaves_no_upstream_call_running(
    when: str, primary: FakeUpstream, secondary: FakeUpstream, services: Services, gates: Callable[[], threading.Event]
) -> None:
    route = CHAT_SSE if when.startswith("chat") else V1_CHAT
    primary.expect(Reply(status=500) if when == "before_the_response" else preamble_then_error(route))
    secondary.expect(Reply(hold_headers=True, gates={0: gates()}))
    service = services["two"]
    connection = raw_request(service, route)
    secondary.wait_for_requests(1)  # the switch is under way: the next upstream has been asked
    if when != "before_the_response":
        assert connection.recv(64).startswith(b"HTTP/1.1 200")  # the client had the first upstream's head
    connection.close()
    left = time.monotonic()
    assert secondary.requests[0].closed.wait(5)
    assert secondary.requests[0].closed_at - left < 1.0  # type: ignore[operator]
    one_request(primary)
    with client_for(service) as http:
        wait_until(lambda: http.get("/healthz").json()["active_streams"] == 0, timeout=5)


def test_heartbeats_and_max_streams_while_the_preamble_is_held(
    primary: FakeUpstream, secondary: FakeUpstream, services: Services, gates: Callable[[], threading.Event]
) -> None:
    """The client hears `: ping` while the first upstream says nothing but its preamble; the
    request holds one of MAX_STREAMS=1 through the switch, and gives it back at its end."""
    held = gates()
    primary.expect(Reply(raw_chunks=[ROLE, QUOTA_OBJECT], gates={1: held}))
    service = services["beats"]
    with client_for(service) as http:
        with http.stream("POST", "/v1/chat/completions", json=V1_CHAT.body) as response:
            lines = response.iter_lines()
            pings = 0
            while pings < 2:
                line = next(lines)
                assert line in (": ping", ""), line  # nothing of the held preamble
                pings += line == ": ping"
            refused = http.post("/chat", json={"message": "hi"})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "capacity_exceeded"
            held.set()
            rest = "\n".join(lines) + "\n"
        events = [(name, data) for name, data in whole_sse_events(rest)]
        assert_whole_answer(V1_CHAT, Received(200, rest, events))
        wait_until(lambda: http.get("/healthz").json()["active_streams"] == 0, timeout=5)
        assert http.post("/chat", json={"message": "hi"}).text == WHOLE


def test_a_chat_answer_from_a_fallback_resumes(primary: FakeUpstream, secondary: FakeUpstream, services: Services) -> None:
    primary.expect(preamble_then_error(CHAT_SSE))
    with client_for(services["two"]) as http:
        response = http.post("/chat", json=CHAT_SSE.body, headers=CHAT_SSE.headers)
        assert_whole_answer(CHAT_SSE, Received(200, response.text, whole_sse_events(response.text)))
        again = http.get(f"/chat/streams/{response.headers['x-stream-id']}", params={"after": "0"}, headers=CHAT_SSE.headers)
        assert again.text.removeprefix("retry: 1000\n\n") == response.text.removeprefix("retry: 1000\n\n")
    one_request(primary)
    one_request(secondary)


def test_a_continuation_falls_back_too(primary: FakeUpstream, secondary: FakeUpstream, services: Services) -> None:
    primary.expect(Reply(pieces=["The first round"], finish_reason="length"), Reply(status=500))
    secondary.expect(Reply(pieces=[" goes on"]))
    with client_for(services["two"]) as http:
        lines = http.post("/chat", json={"message": "hi", "max_continuations": 1}, headers={"Accept": "application/x-ndjson"}).text.splitlines()
    events = [json.loads(line) for line in lines]
    assert "".join(event["text"] for event in events[:-1]) == "The first round goes on"
    assert events[-1]["type"] == "done" and events[-1]["continuations"] == 1
    assert len(primary.requests) == 2 and len(secondary.requests) == 1
    assert secondary.requests[0].body["messages"][1] == {"role": "assistant", "content": "The first round"}


def test_a_shutdown_during_a_switch_ends_the_stream_and_the_call(
    primary: FakeUpstream, secondary: FakeUpstream, start_service: Callable[..., Service], gates: Callable[[], threading.Event],
) -> None:
    service = start_service(upstream_env(primary, FALLBACK_BASE_URLS=secondary.base_url, SHUTDOWN_GRACE_SECONDS="0.2"))
    primary.expect(preamble_then_error(V1_CHAT))
    secondary.expect(Reply(hold_headers=True, gates={0: gates()}))
    with client_for(service) as http:
        with http.stream("POST", "/v1/chat/completions", json=V1_CHAT.body) as response:
            secondary.wait_for_requests(1)
            service.process.send_signal(signal.SIGTERM)
            text = response.read().decode()
    payloads = [data for _, data in whole_sse_events(text)]
    assert payloads[-1] == "[DONE]" and json.loads(payloads[-2])["error"]["type"] == "shutdown" and len(payloads) == 2
    assert secondary.requests[0].closed.wait(5)


# -- no fallback: the upstream's own error, as it was sent --------------------------------------------


CAPTURED_ERRORS = ["openai_error_404_model_not_found.json", "openrouter_error_429.json"]


def captured_error(name: str) -> bytes:
    return (STREAMS_DIR / name).read_bytes().rstrip(b"\n")


def error_shapes(body: bytes, after_output: bool) -> dict[str, bytes]:
    """Each way an upstream's stream can carry the captured error `body`, with two pieces of the
    answer first or not; each must reach the client byte for byte."""
    error = json.loads(body)["error"]
    first = chat_chunk({"content": "Alpha"}, "fake-model") + chat_chunk({"content": " beta"}, "fake-model") if after_output else b""
    opening = responses_opening("fake-model", through=4)
    deltas = responses_deltas(4, ["Alpha", " beta"]) if after_output else b""
    n = 6 if after_output else 4
    return {
        "chat_error_object": ROLE + first + data_event(body),
        "responses_error_nested": opening + deltas + nested_error(n, error),
        "responses_error_flat": opening + deltas + flat_error(n, error),
        "response_failed": opening + deltas + failed_event(n, error, "fake-model"),
        "response_incomplete": opening + deltas + incomplete_event(n, "fake-model"),
    }


@pytest.mark.parametrize("after_output", [False, True], ids=["before_output", "after_output"])
@pytest.mark.parametrize("name", CAPTURED_ERRORS)
def test_every_captured_error_shape_passes_through_byte_for_byte(name: str, after_output: bool, fake: FakeUpstream, client: httpx.Client) -> None:
    """With one upstream (conftest's service), whatever the upstream says of its own failure."""
    for shape, sent in error_shapes(captured_error(name), after_output).items():
        fake.expect(Reply(raw=sent))
        if shape == "chat_error_object":
            assert client.post("/v1/chat/completions", json=V1_CHAT.body).content == sent + b"data: [DONE]\n\n", shape
        else:
            assert client.post("/v1/responses", json=V1_RESPONSES.body).content == sent, shape


@pytest.mark.parametrize("name", CAPTURED_ERRORS)
@pytest.mark.parametrize("accept", ["text/event-stream", "application/x-ndjson"])
def test_chat_tells_the_upstreams_code_and_message(name: str, accept: str, fake: FakeUpstream, client: httpx.Client) -> None:
    body = captured_error(name)
    fake.expect(Reply(raw=ROLE + chat_chunk({"content": "Alpha"}, "fake-model") + data_event(body)))
    text = client.post("/chat", json={"message": "hi"}, headers={"Accept": accept}).text
    error = json.loads(body)["error"]
    final = json.loads(text.splitlines()[-1]) if accept.endswith("ndjson") else json.loads(whole_sse_events(text)[-1][1])
    assert final["error"] == {"message": error["message"], "type": "upstream_error", "param": None, "code": str(error["code"])}

