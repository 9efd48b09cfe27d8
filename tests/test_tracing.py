"""OpenTelemetry: one answer followed from the client's trace through the service to the model, in
the GenAI conventions, exported over OTLP/HTTP to a real receiver on loopback (tests/otlp.py),
which decodes what the service sends with OpenTelemetry's own protobuf definitions.

Every span a test looks at is found by the trace id its client sent, so tests sharing a service
and a receiver never see each other's spans."""

from __future__ import annotations

import json
import re
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from conftest import AUTH, KEY, Service, client_for, holding, launch, upstream_env, wait_until
from otlp import OtlpReceiver, Point, Span
from relay.config import ConfigError, load_settings
from upstream import FakeUpstream, Reply

SERVICE_NAME = "relay-under-test"
UPSTREAM_KEY = "sk-upstream-secret-0123456789"  # as upstream_env sets it
MESSAGES = [{"role": "user", "content": "hi"}]


def otel_env(receiver: OtlpReceiver, **env: str) -> dict[str, str]:
    """Tracing on, as an operator turns it on, exporting within milliseconds so that tests are quick."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": SERVICE_NAME,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_METRIC_EXPORT_INTERVAL": "200",
        **env,
    }


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    running = OtlpReceiver().start()
    yield running
    running.stop()


@pytest.fixture
def collectors() -> Iterator[Callable[..., OtlpReceiver]]:
    """Receivers of a test's own, stopped when it ends. Tests ask for this fixture before
    start_service, so that their services stop first, while their collector still answers."""
    started: list[OtlpReceiver] = []

    def start(answer: bool = True, status: int = 200) -> OtlpReceiver:
        started.append(OtlpReceiver(answer, status).start())
        return started[-1]

    yield start
    for running in started:
        running.stop()


@pytest.fixture(scope="module")
def traced(upstream: FakeUpstream, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = upstream_env(
        upstream, **otel_env(receiver), UPSTREAM_MAX_RETRIES="1", UPSTREAM_READ_TIMEOUT="1", RESUME_GRACE_SECONDS="5",
        SEND_TIMEOUT_SECONDS="1", MAX_STREAMS="3",
    )
    running = launch(tmp_path_factory.mktemp("traced"), env)
    yield running
    running.stop()


@pytest.fixture
def http(traced: Service) -> Iterator[httpx.Client]:
    with client_for(traced) as client:
        yield client


class Caller:
    """A client's own trace: the traceparent and tracestate it sends."""

    def __init__(self) -> None:
        self.trace_id, self.span_id = secrets.token_hex(16), secrets.token_hex(8)
        self.headers = {"traceparent": f"00-{self.trace_id}-{self.span_id}-01", "tracestate": "caller=1"}


def one(spans: list[Span], kind: str) -> Span:
    found = [span for span in spans if span.kind == kind]
    assert len(found) == 1, f"{len(found)} spans of kind {kind}: {[span.name for span in spans]}"
    return found[0]


def clients(spans: list[Span]) -> list[Span]:
    return [span for span in spans if span.kind == "SPAN_KIND_CLIENT"]


def point(receiver: OtlpReceiver, metric: str, count: int = 1, **attributes: object) -> Point:
    """The data point of `metric` whose attributes include `attributes`, once it was exported with
    `count` values at least (metrics are cumulative: a later export has all the earlier values)."""

    def matching() -> list[Point]:
        return [p for p in receiver.points(metric) if p.count >= count and all(p.attributes.get(name) == value for name, value in attributes.items())]

    receiver.wait(lambda: bool(matching()), what=f"{metric} with {attributes}")
    return matching()[0]


def stream_body(model: str, **fields: object) -> dict[str, object]:
    return {"model": model, "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}, **fields}


def metric_value(http: httpx.Client, name: str, **labels: str) -> float:
    """The value of the Prometheus sample `name` with (at least) `labels`; 0 if there is none yet."""
    for line in http.get("/metrics").text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.partition("{")[0] == name and all(f'{label}="{wanted}"' in sample for label, wanted in labels.items()):
            return float(value)
    return 0.0


def mapped(service: Service) -> str:
    return Path(f"/proc/{service.pid}/maps").read_text()


# -- one trace, from the caller to the model -------------------------------------------------------------


def test_a_streamed_chat_completion_is_one_trace_from_the_caller_to_the_model(
    fake: FakeUpstream, receiver: OtlpReceiver, http: httpx.Client
) -> None:
    caller = Caller()
    fake.expect(Reply(pieces=["Hello", ",", " world"]))
    response = http.post("/v1/chat/completions", json=stream_body("m-stream"), headers=caller.headers)
    assert response.status_code == 200 and "data: [DONE]" in response.text

    spans = receiver.wait_for_spans(caller.trace_id, 2)
    server, inference = one(spans, "SPAN_KIND_SERVER"), one(spans, "SPAN_KIND_CLIENT")
    assert server.parent_span_id == caller.span_id  # the caller's trace, continued
    assert server.name == "POST /v1/chat/completions" and server.status == "STATUS_CODE_OK"
    assert server.attributes["http.route"] == "/v1/chat/completions" and server.attributes["http.response.status_code"] == 200
    assert server.attributes["relay.outcome"] == "completed" and "error.type" not in server.attributes
    assert server.resource["service.name"] == SERVICE_NAME

    assert inference.parent_span_id == server.span_id and inference.name == "chat m-stream"
    assert inference.scope == "streaming-relay" and inference.status == "STATUS_CODE_OK"
    attributes = inference.attributes
    assert {name: attributes[name] for name in ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model", "gen_ai.request.stream")} == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai", "gen_ai.request.model": "m-stream", "gen_ai.request.stream": True,
    }
    assert re.fullmatch(r"chatcmpl-fake\d+", attributes["gen_ai.response.id"])
    assert attributes["gen_ai.response.model"] == "fake-model" and attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]) == (5, 3)
    assert attributes["openai.api.type"] == "chat_completions" and attributes["server.address"] == "127.0.0.1"
    assert 0 < attributes["gen_ai.response.time_to_first_chunk"] <= (inference.end_ns - inference.start_ns) / 1e9
    assert "error.type" not in attributes
    assert server.start_ns <= inference.start_ns and inference.end_ns <= server.end_ns

    # The upstream was asked in the same trace, by the inference span, with the caller's tracestate.
    sent = fake.requests[-1].headers
    assert sent["traceparent"] == f"00-{caller.trace_id}-{inference.span_id}-01"
    assert sent["tracestate"] == "caller=1"

    labels = {"gen_ai.operation.name": "chat", "gen_ai.request.model": "m-stream", "gen_ai.provider.name": "openai"}
    duration = point(receiver, "gen_ai.client.operation.duration", **labels)
    assert duration.unit == "s" and duration.count == 1 and "error.type" not in duration.attributes
    assert point(receiver, "gen_ai.client.operation.time_to_first_chunk", **labels).count == 1
    assert point(receiver, "gen_ai.client.operation.time_per_output_chunk", **labels).count == 1
    assert point(receiver, "gen_ai.client.token.usage", **labels, **{"gen_ai.token.type": "input"}).sum == 5
    assert point(receiver, "gen_ai.client.token.usage", **labels, **{"gen_ai.token.type": "output"}).sum == 3


def test_a_streamed_response_is_traced_the_same_way(fake: FakeUpstream, receiver: OtlpReceiver, http: httpx.Client) -> None:
    caller = Caller()
    fake.expect(Reply(pieces=["One", " two"]))
    response = http.post("/v1/responses", json={"model": "m-responses", "input": "hi", "stream": True}, headers=caller.headers)
    assert response.status_code == 200 and "response.completed" in response.text

    spans = receiver.wait_for_spans(caller.trace_id, 2)
    server, inference = one(spans, "SPAN_KIND_SERVER"), one(spans, "SPAN_KIND_CLIENT")
    assert server.parent_span_id == caller.span_id and server.name == "POST /v1/responses"
    assert inference.parent_span_id == server.span_id and inference.name == "chat m-responses"
    attributes = inference.attributes
    assert attributes["openai.api.type"] == "responses" and attributes["gen_ai.request.stream"] is True
    assert re.fullmatch(r"resp_fake\d+", attributes["gen_ai.response.id"]) and attributes["gen_ai.response.model"] == "fake-model"
    assert attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]) == (5, 2)
    assert attributes["gen_ai.response.time_to_first_chunk"] > 0
    assert fake.requests[-1].headers["traceparent"] == f"00-{caller.trace_id}-{inference.span_id}-01"
    output = point(receiver, "gen_ai.client.token.usage", **{"gen_ai.request.model": "m-responses", "gen_ai.token.type": "output"})
    assert output.sum == 2


def test_a_request_without_streaming_is_one_span_too(fake: FakeUpstream, receiver: OtlpReceiver, http: httpx.Client) -> None:
    caller = Caller()
    fake.expect(Reply(pieces=["Whole", " answer"]))
    response = http.post("/v1/chat/completions", json={"model": "m-whole", "messages": MESSAGES}, headers=caller.headers)
    assert response.status_code == 200
    inference = one(receiver.wait_for_spans(caller.trace_id, 2), "SPAN_KIND_CLIENT")
    assert inference.attributes["gen_ai.request.stream"] is False and inference.status == "STATUS_CODE_OK"
    assert inference.attributes["gen_ai.response.finish_reasons"] == ["stop"] and inference.attributes["gen_ai.usage.output_tokens"] == 2
    assert "gen_ai.response.time_to_first_chunk" not in inference.attributes


def test_a_resumed_answer_links_to_the_request_that_started_it(fake: FakeUpstream, receiver: OtlpReceiver, traced: Service) -> None:
    asking, resuming = Caller(), Caller()
    pieces = ["one", " two", " three", " four"]
    with holding(fake, pieces, 2) as gate, client_for(traced) as client:
        with client.stream("POST", "/chat", json={"message": "count"}, headers={"Accept": "text/event-stream", **asking.headers}) as first:
            stream_id = first.headers["x-stream-id"]
            seen = 0
            for line in first.iter_lines():
                seen += line == "event: delta"
                if seen == 2:
                    break
        # The reader left; the answer goes on (RESUME_GRACE_SECONDS), and is read again from event 2.
        with client.stream("GET", f"/chat/streams/{stream_id}", params={"after": "2"}, headers={"Accept": "text/event-stream", **resuming.headers}) as rest:
            assert rest.status_code == 200
            gate.set()
            text = "".join(rest.iter_text())
    assert "event: done" in text and " four" in text

    resumed = one(receiver.wait_for_spans(resuming.trace_id, 1), "SPAN_KIND_SERVER")
    started = receiver.wait_for_spans(asking.trace_id, 2)
    asked, inference = one(started, "SPAN_KIND_SERVER"), one(started, "SPAN_KIND_CLIENT")
    assert resumed.name == "GET /chat/streams/{stream_id}" and resumed.parent_span_id == resuming.span_id
    assert resumed.links == [(asking.trace_id, asked.span_id, {"relay.link": "resumes"})]
    assert stream_id not in resumed.attributes["url.path"]
    assert asked.attributes["relay.outcome"] == "client_disconnected"  # its reader left...
    assert inference.status == "STATUS_CODE_OK" and inference.attributes["gen_ai.response.finish_reasons"] == ["stop"]  # ...the answer did not
    assert stream_id.encode() not in receiver.everything()


# -- however a stream ends, its spans end and say how ----------------------------------------------------


def test_a_client_that_leaves_ends_its_spans(fake: FakeUpstream, receiver: OtlpReceiver, http: httpx.Client) -> None:
    caller = Caller()
    with holding(fake, ["one", " two"], 1):
        with http.stream("POST", "/v1/chat/completions", json=stream_body("m-left"), headers=caller.headers) as response:
            next(response.iter_lines())
        assert fake.wait_for_requests(1)[-1].closed.wait(5)
    spans = receiver.wait_for_spans(caller.trace_id, 2)
    server, inference = one(spans, "SPAN_KIND_SERVER"), one(spans, "SPAN_KIND_CLIENT")
    assert inference.attributes["error.type"] == "client_disconnected" and inference.status == "STATUS_CODE_ERROR"
    assert server.attributes["error.type"] == "client_disconnected" and server.status == "STATUS_CODE_ERROR"
    assert point(receiver, "gen_ai.client.operation.duration", **{"gen_ai.request.model": "m-left"}).attributes["error.type"] == "client_disconnected"


@pytest.mark.parametrize(
    ("replies", "attempts", "outcome", "status"),
    [
        ([Reply(pieces=["one", " two"], drop_after=1)], ["upstream_error"], "upstream_error", 200),
        ([Reply(pieces=["one", " two"], stall_after=1)], ["timeout"], "timeout", 200),
        ([Reply(status=429)], ["429"], "rejected", 429),
        ([Reply(status=503), Reply(status=503)], ["503", "503"], "upstream_error", 502),
    ],
    ids=["stream-broke", "upstream-silent", "upstream-refused-429", "upstream-failed-twice"],
)
def test_an_upstream_failure_ends_its_spans_with_its_error_type(
    fake: FakeUpstream, receiver: OtlpReceiver, http: httpx.Client, replies: list[Reply], attempts: list[str], outcome: str, status: int
) -> None:
    caller = Caller()
    fake.expect(*replies)
    assert http.post("/v1/chat/completions", json=stream_body(f"m-{outcome}-{status}"), headers=caller.headers).status_code == status
    spans = receiver.wait_for_spans(caller.trace_id, 1 + len(attempts))
    server = one(spans, "SPAN_KIND_SERVER")
    assert [span.attributes["error.type"] for span in clients(spans)] == attempts  # each attempt (a retry too) a span
    assert all(span.status == "STATUS_CODE_ERROR" and span.parent_span_id == server.span_id for span in clients(spans))
    assert (server.attributes["error.type"], server.attributes["http.response.status_code"], server.status) == (outcome, status, "STATUS_CODE_ERROR")
    model = f"m-{outcome}-{status}"
    assert point(receiver, "gen_ai.client.operation.duration", len(attempts), **{"gen_ai.request.model": model, "error.type": attempts[-1]}).count == len(attempts)


def test_each_retry_is_its_own_span_with_its_own_traceparent(fake: FakeUpstream, receiver: OtlpReceiver, http: httpx.Client) -> None:
    caller = Caller()
    fake.expect(Reply(status=500), Reply(pieces=["fine"]))
    assert http.post("/v1/chat/completions", json=stream_body("m-retried"), headers=caller.headers).status_code == 200
    spans = receiver.wait_for_spans(caller.trace_id, 3)
    failed, answered = clients(spans)
    assert (failed.attributes["error.type"], failed.attributes["relay.attempt"]) == ("500", 0)
    assert "error.type" not in answered.attributes and answered.attributes["relay.attempt"] == 1 and answered.status == "STATUS_CODE_OK"
    sent = [recorded.headers["traceparent"] for recorded in fake.requests[-2:]]
    assert sent == [f"00-{caller.trace_id}-{failed.span_id}-01", f"00-{caller.trace_id}-{answered.span_id}-01"]


def test_each_fallback_upstream_is_its_own_span(
    fake: FakeUpstream, collectors: Callable[..., OtlpReceiver], start_service: Callable[..., Service]
) -> None:
    receiver = collectors()
    fallback = FakeUpstream().start()
    try:
        service = start_service(upstream_env(fake, **otel_env(receiver), FALLBACK_BASE_URLS=fallback.base_url))
        with client_for(service) as client:
            # The primary refuses; then it starts a stream and fails before any output.
            for primary_reply, failure in ((Reply(status=500), "500"), (Reply(pieces=["never"], error_after=0), "upstream_error")):
                caller = Caller()
                fake.expect(primary_reply)
                fallback.expect(Reply(pieces=["from the fallback"]))
                response = client.post("/v1/chat/completions", json=stream_body("m-fallback"), headers=caller.headers)
                assert response.status_code == 200 and "from the fallback" in response.text and "never" not in response.text
                spans = receiver.wait_for_spans(caller.trace_id, 3)
                server, (failed, answered) = one(spans, "SPAN_KIND_SERVER"), clients(spans)
                assert (failed.attributes["error.type"], failed.attributes["server.port"]) == (failure, fake.port)
                assert "error.type" not in answered.attributes and answered.attributes["server.port"] == fallback.port
                assert failed.parent_span_id == answered.parent_span_id == server.span_id
                assert fake.requests[-1].headers["traceparent"] == f"00-{caller.trace_id}-{failed.span_id}-01"
                assert fallback.requests[-1].headers["traceparent"] == f"00-{caller.trace_id}-{answered.span_id}-01"
    finally:
        fallback.stop()


def test_a_continued_answer_has_one_upstream_span_per_round(fake: FakeUpstream, receiver: OtlpReceiver, http: httpx.Client) -> None:
    caller = Caller()
    fake.expect(
        Reply(pieces=["The first part of the answer, "], finish_reason="length"),
        Reply(pieces=["then the second part, "], finish_reason="length"),
        Reply(pieces=["and its end."], finish_reason="stop"),
    )
    response = http.post("/chat", json={"message": "go on", "max_continuations": 3, "model": "m-rounds"}, headers=caller.headers)
    assert response.text == "The first part of the answer, then the second part, and its end."
    spans = receiver.wait_for_spans(caller.trace_id, 4)
    server, rounds = one(spans, "SPAN_KIND_SERVER"), clients(spans)
    assert [span.attributes["relay.round"] for span in rounds] == [0, 1, 2]
    assert [span.attributes["gen_ai.response.finish_reasons"] for span in rounds] == [["length"], ["length"], ["stop"]]
    assert all(span.parent_span_id == server.span_id and span.status == "STATUS_CODE_OK" for span in rounds)
    assert all(earlier.end_ns <= later.start_ns for earlier, later in zip(rounds, rounds[1:]))  # one round after the other
    assert [recorded.headers["traceparent"] for recorded in fake.requests[-3:]] == [f"00-{caller.trace_id}-{span.span_id}-01" for span in rounds]


def test_a_stalled_client_that_is_dropped_ends_its_spans(fake: FakeUpstream, receiver: OtlpReceiver, traced: Service) -> None:
    caller = Caller()
    fake.expect(Reply(pieces=["x" * 16384] * 300))  # ~5 MB: more than any socket buffers hold
    body = json.dumps(stream_body("m-stalled")).encode()
    host, port = traced.base_url.removeprefix("http://").split(":")
    with socket.socket() as connection:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        connection.connect((host, int(port)))
        connection.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\ntraceparent: {caller.headers['traceparent']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        spans = receiver.wait_for_spans(caller.trace_id, 2, timeout=15)  # SEND_TIMEOUT_SECONDS=1 after its window filled
    assert one(spans, "SPAN_KIND_CLIENT").attributes["error.type"] == "client_stalled"
    assert one(spans, "SPAN_KIND_SERVER").attributes["error.type"] == "client_stalled"


def test_a_request_the_service_refuses_is_a_server_span_that_says_so(fake: FakeUpstream, receiver: OtlpReceiver, http: httpx.Client) -> None:
    wait_until(lambda: http.get("/healthz").json()["active_streams"] == 0)
    caller = Caller()
    gate = threading.Event()
    fake.default = Reply(pieces=["one", " two"], gates={1: gate})
    held = [http.stream("POST", "/v1/chat/completions", json=stream_body("m-held")) for _ in range(3)]  # MAX_STREAMS=3
    try:
        lines = [stream.__enter__().iter_lines() for stream in held]  # kept: a dropped iterator closes its response
        assert all(next(line).startswith("data: ") for line in lines)
        response = http.post("/v1/chat/completions", json=stream_body("m-refused"), headers=caller.headers)
        assert response.status_code == 503
    finally:
        gate.set()
        for stream in held:
            stream.__exit__(None, None, None)
    spans = receiver.wait_for_spans(caller.trace_id, 1)
    assert clients(spans) == []  # the upstream was never asked
    server = one(spans, "SPAN_KIND_SERVER")
    assert (server.attributes["error.type"], server.attributes["http.response.status_code"], server.status) == ("rejected", 503, "STATUS_CODE_ERROR")


def test_a_stream_cut_by_a_shutdown_ends_its_spans_and_they_are_flushed(
    fake: FakeUpstream, receiver: OtlpReceiver, start_service: Callable[..., Service]
) -> None:
    service = start_service(upstream_env(fake, **otel_env(receiver, OTEL_BSP_SCHEDULE_DELAY="60000"), SHUTDOWN_GRACE_SECONDS="0.5"))
    caller = Caller()
    with holding(fake, ["one", " two"], 1), client_for(service) as client:
        with client.stream("POST", "/v1/chat/completions", json=stream_body("m-shutdown"), headers=caller.headers) as response:
            lines = response.iter_lines()
            next(lines)
            service.process.send_signal(signal.SIGINT)
            rest = "\n".join(lines)
    assert '"type": "shutdown"' in rest
    service.process.wait(timeout=10)
    # A minute's schedule delay: only the flush at shutdown can have sent them.
    spans = receiver.wait_for_spans(caller.trace_id, 2, timeout=5)
    assert one(spans, "SPAN_KIND_CLIENT").attributes["error.type"] == "shutdown"
    assert one(spans, "SPAN_KIND_SERVER").attributes["error.type"] == "shutdown"


# -- no content, no secrets ------------------------------------------------------------------------------


def run_the_routes(service: Service, prompt: str, caller: Caller) -> str:
    """A /chat answer (SSE, read to its end, then resumed from its start), a GET /chat?q=, a /v1
    stream and a /v1/responses stream, every one in `caller`'s trace; returns the /chat stream id."""
    with httpx.Client(base_url=service.base_url, headers={**AUTH, **caller.headers}, timeout=10) as client:
        answer = client.post("/chat", json={"message": prompt}, headers={"Accept": "text/event-stream"})
        assert answer.status_code == 200 and "event: done" in answer.text
        stream_id = answer.headers["x-stream-id"]
        assert client.get(f"/chat/streams/{stream_id}", headers={"Accept": "text/event-stream"}).status_code == 200
        assert client.get("/chat", params={"q": prompt}).status_code == 200
        assert client.post("/v1/chat/completions", json=stream_body("m-secret", messages=[{"role": "user", "content": prompt}])).status_code == 200
        assert client.post("/v1/responses", json={"model": "m-secret", "input": prompt, "stream": True}).status_code == 200
    return stream_id


SECRET_ANSWER = ["Penguins ", "keep ", "their ", "eggs ", "warm."]


def test_no_prompt_answer_key_stream_id_or_upstream_credentials_are_exported(
    fake: FakeUpstream, collectors: Callable[..., OtlpReceiver], start_service: Callable[..., Service]
) -> None:
    fake.default = Reply(pieces=SECRET_ANSWER)
    receiver = collectors()
    credentials = fake.base_url.replace("http://", "http://relay-user:url-secret-pw@")
    service = start_service(upstream_env(fake, **otel_env(receiver), OPENAI_BASE_URL=credentials))
    caller, prompt = Caller(), "my secret prompt about penguins"
    stream_id = run_the_routes(service, prompt, caller)
    spans = receiver.wait_for_spans(caller.trace_id, 9)  # 5 requests, 4 upstream calls
    assert {span.attributes.get("server.address") for span in clients(spans)} == {"127.0.0.1"}
    exported = receiver.everything()
    for secret in (prompt, "Penguins keep", "warm.", KEY, UPSTREAM_KEY, stream_id, "url-secret-pw", "relay-user"):
        assert secret.encode() not in exported, f"{secret!r} was exported"
    assert all("gen_ai.input.messages" not in span.attributes and "gen_ai.output.messages" not in span.attributes for span in spans)


def test_prompts_and_answers_are_exported_only_when_the_operator_opts_in(
    fake: FakeUpstream, collectors: Callable[..., OtlpReceiver], start_service: Callable[..., Service]
) -> None:
    fake.default = Reply(pieces=SECRET_ANSWER)
    receiver = collectors()
    env = upstream_env(fake, **otel_env(receiver, OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT="true"))
    service = start_service(env)
    caller, prompt = Caller(), "my opted-in prompt"
    stream_id = run_the_routes(service, prompt, caller)
    spans = receiver.wait_for_spans(caller.trace_id, 9)
    for span in clients(spans):
        inputs = json.loads(span.attributes["gen_ai.input.messages"])
        outputs = json.loads(span.attributes["gen_ai.output.messages"])
        assert {"type": "text", "content": prompt} in inputs[-1]["parts"]
        assert outputs == [{"role": "assistant", "parts": [{"type": "text", "content": "".join(SECRET_ANSWER)}], "finish_reason": "stop"}]
    exported = receiver.everything()
    for secret in (KEY, UPSTREAM_KEY, stream_id):
        assert secret.encode() not in exported, f"{secret!r} was exported"


# -- never in the way --------------------------------------------------------------------------------------


def test_a_collector_that_never_answers_delays_no_stream_and_bounds_memory(
    fake: FakeUpstream, collectors: Callable[..., OtlpReceiver], start_service: Callable[..., Service]
) -> None:
    dead = collectors(answer=False)
    queue = 16
    env = otel_env(dead, OTEL_BSP_SCHEDULE_DELAY="20", OTEL_BSP_MAX_QUEUE_SIZE=str(queue), OTEL_BSP_MAX_EXPORT_BATCH_SIZE="4",
                   OTEL_METRIC_EXPORT_INTERVAL="100", OTEL_EXPORTER_OTLP_TIMEOUT="60")
    service = start_service(upstream_env(fake, **env, SHUTDOWN_GRACE_SECONDS="1"))
    with client_for(service) as client:
        assert client.post("/v1/chat/completions", json=stream_body("m-dead")).status_code == 200
        dead.wait(lambda: dead.held >= 1, what="an export to hold")  # the exporter is stuck in it from now on

        # A paced stream (a piece every 50 ms) arrives paced, the exporter stuck all along.
        fake.expect(Reply(pieces=[f"piece {n} " for n in range(20)], delay=0.05))
        started, arrivals = time.monotonic(), []
        with client.stream("POST", "/v1/chat/completions", json=stream_body("m-dead"), headers=Caller().headers) as response:
            for line in response.iter_lines():
                if "piece " in line:
                    arrivals.append(time.monotonic())
                    assert client.get("/healthz", timeout=1).status_code == 200  # and the event loop is free
        assert len(arrivals) == 20
        gaps = [later - earlier for earlier, later in zip([started, *arrivals], arrivals)]
        assert max(gaps) < 0.05 + 0.5 and arrivals[-1] - started < 20 * 0.05 + 2, gaps

        # Far more spans than the queue holds: the rest are dropped and counted, never kept.
        for _ in range(40):
            assert client.post("/v1/chat/completions", json=stream_body("m-dead")).status_code == 200
        assert metric_value(client, "relay_telemetry_dropped_total", signal="spans", reason="queue_full") >= 2 * 40 - queue - 4
        assert 0 < metric_value(client, "relay_telemetry_queued_spans") <= queue
        assert dead.held >= 1  # still stuck: nothing above depended on it
    stopping = time.monotonic()
    service.stop()
    assert service.process.returncode == 0 and time.monotonic() - stopping < 8  # the flush at shutdown gives up in time


def test_a_collector_that_answers_errors_costs_the_streams_nothing(
    fake: FakeUpstream, collectors: Callable[..., OtlpReceiver], start_service: Callable[..., Service]
) -> None:
    failing = collectors(status=500)
    service = start_service(upstream_env(fake, **otel_env(failing)))
    with client_for(service) as client:
        for _ in range(3):
            response = client.post("/v1/chat/completions", json=stream_body("m-failing"))
            assert response.status_code == 200 and "data: [DONE]" in response.text
        failing.wait(lambda: failing.received >= 2, what="exports")
        wait_until(lambda: metric_value(client, "relay_telemetry_dropped_total", signal="spans", reason="export_failed") >= 6)
        wait_until(lambda: metric_value(client, "relay_telemetry_dropped_total", signal="metrics", reason="export_failed") >= 1)


# -- off by default ---------------------------------------------------------------------------------------


def test_off_by_default_nothing_of_it_is_loaded_or_sent(fake: FakeUpstream, service: Service, traced: Service) -> None:
    caller = Caller()
    with client_for(service) as client:
        assert client.post("/v1/chat/completions", json=stream_body("m-off"), headers=caller.headers).status_code == 200
        assert "relay_telemetry" not in client.get("/metrics").text
    assert "traceparent" not in fake.requests[-1].headers  # nothing continued the caller's trace
    # OpenTelemetry's exporter brings protobuf's C extension with it: mapped only where it is on.
    assert "_upb" not in mapped(service) and "_upb" in mapped(traced)


def test_otel_sdk_disabled_turns_it_off(fake: FakeUpstream, collectors: Callable[..., OtlpReceiver], start_service: Callable[..., Service]) -> None:
    receiver = collectors()
    service = start_service(upstream_env(fake, **otel_env(receiver, OTEL_SDK_DISABLED="true")))
    with client_for(service) as client:
        assert client.post("/v1/chat/completions", json=stream_body("m-disabled"), headers=Caller().headers).status_code == 200
    assert "traceparent" not in fake.requests[-1].headers
    time.sleep(0.5)  # ten schedule delays and two metric intervals: nothing was sent in them
    assert receiver.received == 0 and "_upb" not in mapped(service)


def test_metrics_alone_time_the_calls_and_trace_nothing(
    fake: FakeUpstream, collectors: Callable[..., OtlpReceiver], start_service: Callable[..., Service]
) -> None:
    receiver = collectors()
    service = start_service(upstream_env(fake, **otel_env(receiver, OTEL_TRACES_EXPORTER="none")))
    with client_for(service) as client:
        assert client.post("/v1/chat/completions", json=stream_body("m-metrics-only"), headers=Caller().headers).status_code == 200
    assert point(receiver, "gen_ai.client.token.usage", **{"gen_ai.request.model": "m-metrics-only", "gen_ai.token.type": "output"}).sum == 4
    assert point(receiver, "gen_ai.client.operation.time_to_first_chunk", **{"gen_ai.request.model": "m-metrics-only"}).count == 1
    assert receiver.spans() == [] and "traceparent" not in fake.requests[-1].headers


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL must be http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL must be http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT must be a URL"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER must be otlp or none"),
        ({"OTEL_SDK_DISABLED": "maybe"}, "OTEL_SDK_DISABLED must be true or false"),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "0"}, "OTEL_BSP_MAX_QUEUE_SIZE must be a whole number"),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "8", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "9"}, "must be at most OTEL_BSP_MAX_QUEUE_SIZE"),
        ({"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "everything"}, "must be true or false"),
    ],
)
def test_otel_settings_that_cannot_work_stop_the_start(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_settings(env)


def test_which_otel_settings_turn_which_signal_on() -> None:
    def otel(**env: str) -> tuple[bool, bool]:
        settings = load_settings(env).otel
        return settings.traces, settings.metrics

    assert otel() == (False, False)
    assert otel(OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318") == (True, True)
    assert otel(OTEL_EXPORTER_OTLP_TRACES_ENDPOINT="http://collector:4318/v1/traces") == (True, False)
    assert otel(OTEL_EXPORTER_OTLP_METRICS_ENDPOINT="https://collector/v1/metrics") == (False, True)
    assert otel(OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318", OTEL_METRICS_EXPORTER="none") == (True, False)
    assert otel(OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4318", OTEL_SDK_DISABLED="TRUE") == (False, False)
    assert load_settings({"OTEL_RESOURCE_ATTRIBUTES": "team=x,service.name=my%20relay"}).otel.service_name == "my relay"
    assert load_settings({"OTEL_SERVICE_NAME": "named", "OTEL_RESOURCE_ATTRIBUTES": "service.name=other"}).otel.service_name == "named"
