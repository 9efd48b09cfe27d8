"""What operators see: one JSON line per request with how it ended, Prometheus metrics that move
as streams run, request ids, and never a prompt, a completion or a key unless LOG_CONTENT=1."""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Iterator

import httpx
import pytest

from conftest import AUTH, KEY, Service, client_for, launch, upstream_env, wait_until
from upstream import FakeUpstream, Reply

UPSTREAM_KEY = "sk-upstream-secret-0123456789"  # as upstream_env sets it
METRICS_KEY = "metrics-secret-42"
PROMPT = "my secret prompt about penguins"


def log_lines(service: Service) -> list[dict]:
    return [json.loads(line) for line in service.log().splitlines() if line.startswith("{")]


def line_for(service: Service, request_id: str) -> dict:
    wait_until(lambda: any(line["request_id"] == request_id for line in log_lines(service)))
    return next(line for line in log_lines(service) if line["request_id"] == request_id)


@pytest.fixture(scope="module")
def observed(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = upstream_env(upstream, MAX_STREAMS="2", METRICS_KEY=METRICS_KEY, UPSTREAM_READ_TIMEOUT="0.5")
    running = launch(tmp_path_factory.mktemp("observed"), env)
    yield running
    running.stop()


@pytest.fixture
def http(observed: Service) -> Iterator[httpx.Client]:
    with client_for(observed) as client:
        yield client


def test_a_completed_stream(fake: FakeUpstream, observed: Service, http: httpx.Client) -> None:
    fake.expect(Reply(pieces=["one", " two", " three"]))
    response = http.post("/chat", json={"message": PROMPT, "model": "m-1"}, headers={"X-Request-ID": "req-completed-1"})
    assert response.headers["x-request-id"] == "req-completed-1"
    line = line_for(observed, "req-completed-1")
    assert line["method"] == "POST" and line["path"] == "/chat" and line["status"] == 200
    assert line["outcome"] == "completed" and line["model"] == "m-1"
    assert line["chunks"] == 3 and line["completion_tokens"] == 3
    assert 0 <= line["ttft_ms"] <= line["duration_ms"]


def test_a_request_id_is_generated_when_missing_or_unsafe(fake: FakeUpstream, observed: Service, http: httpx.Client) -> None:
    generated = http.get("/chat", params={"q": "hi"}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert line_for(observed, generated)["outcome"] == "completed"
    replaced = http.get("/chat", params={"q": "hi"}, headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", replaced)


def test_request_ids_stay_unique_in_a_forked_worker() -> None:
    """gunicorn --preload forks workers from a process that may have made ids already."""
    from relay.observability import request_ids

    before = [request_ids.new() for _ in range(3)]
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(write, " ".join(request_ids.new() for _ in range(3)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        in_child = pipe.read().split()
    os.waitpid(child, 0)
    after = [request_ids.new() for _ in range(3)]
    ids = before + in_child + after
    assert len(in_child) == 3 and len(set(ids)) == 9 and all(re.fullmatch(r"[0-9a-f]{32}", id_) for id_ in ids)
    assert {id_[:16] for id_ in in_child}.isdisjoint({id_[:16] for id_ in before + after})


def test_a_disconnected_stream(fake: FakeUpstream, observed: Service, http: httpx.Client) -> None:
    hold = threading.Event()
    fake.expect(Reply(pieces=["one", " two"], gates={1: hold}))
    with http.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "stream": True},
                     headers={"X-Request-ID": "req-left-1"}) as response:
        next(response.iter_lines())
    line = line_for(observed, "req-left-1")
    assert line["outcome"] == "client_disconnected" and line["path"] == "/v1/chat/completions"
    assert fake.requests[-1].closed.wait(5)


@pytest.mark.parametrize(
    ("reply", "outcome", "status"),
    [
        (Reply(pieces=["one", " two"], drop_after=1), "upstream_error", 200),
        (Reply(pieces=["one", " two"], stall_after=1), "timeout", 200),
        (Reply(status=503), "upstream_error", 502),
        (Reply(status=400), "rejected", 400),
    ],
    ids=["dropped", "stalled", "upstream-503", "upstream-400"],
)
def test_a_failed_stream(fake: FakeUpstream, observed: Service, http: httpx.Client, reply: Reply, outcome: str, status: int) -> None:
    fake.expect(reply)
    request_id = f"req-failed-{outcome}-{status}"
    response = http.post("/chat", json={"message": "x"}, headers={"Accept": "text/event-stream", "X-Request-ID": request_id})
    assert response.status_code == status
    line = line_for(observed, request_id)
    assert (line["outcome"], line["status"]) == (outcome, status)


def test_rejected_requests(fake: FakeUpstream, observed: Service, http: httpx.Client) -> None:
    assert http.post("/chat", json={}, headers={"X-Request-ID": "req-invalid"}).status_code == 400
    assert line_for(observed, "req-invalid")["outcome"] == "rejected"
    assert httpx.post(f"{observed.base_url}/chat", json={"message": "x"}, headers={"X-Request-ID": "req-nokey"}).status_code == 401
    assert line_for(observed, "req-nokey")["outcome"] == "rejected"

    hold = threading.Event()
    fake.default = Reply(pieces=["one", " two"], gates={1: hold})
    streams = [http.stream("POST", "/chat", json={"message": "x"}) for _ in range(2)]
    texts = [stream.__enter__().iter_text() for stream in streams]
    assert [next(text) for text in texts] == ["one", "one"]
    assert http.post("/chat", json={"message": "x"}, headers={"X-Request-ID": "req-full"}).status_code == 503
    assert line_for(observed, "req-full")["outcome"] == "rejected"
    hold.set()
    for stream in streams:
        stream.__exit__(None, None, None)


def scrape(http: httpx.Client) -> dict[str, float]:
    text = http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_move_as_streams_run(fake: FakeUpstream, observed: Service, http: httpx.Client) -> None:
    before = scrape(http)
    completed = 'relay_requests_total{outcome="completed",route="/chat",status="200"}'
    tokens = 'relay_tokens_streamed_total{route="/chat"}'
    hold = threading.Event()
    fake.expect(Reply(pieces=["a", "b", "c", "d"], gates={1: hold}))
    with http.stream("POST", "/chat", json={"message": "x"}) as response:
        text = response.iter_text()
        assert next(text) == "a"
        during = scrape(http)
        assert during["relay_active_streams"] == 1
        hold.set()
        assert "".join(text) == "bcd"
    wait_until(lambda: scrape(http).get(completed, 0) == before.get(completed, 0) + 1)
    after = scrape(http)
    assert after["relay_active_streams"] == 0
    assert after[tokens] - before.get(tokens, 0) == 4
    ttft_count = 'relay_time_to_first_token_seconds_count{route="/chat"}'
    assert after[ttft_count] == before.get(ttft_count, 0) + 1
    assert "relay_rejected_for_capacity_total" in after and "relay_stream_duration_seconds_count{route=\"/chat\"}" in after


def test_metrics_take_the_client_keys_when_no_metrics_key_is_set(upstream: FakeUpstream, service: Service) -> None:
    """With API_KEYS and no METRICS_KEY, /metrics is exactly as closed as the API."""
    assert "METRICS_KEY" not in upstream_env(upstream)
    url = f"{service.base_url}/metrics"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong-key"}).status_code == 401
    response = httpx.get(url, headers=AUTH)
    assert response.status_code == 200 and "relay_requests_total" in response.text
    assert httpx.get(url, headers={"Authorization": "Bearer second-key"}).status_code == 200


def test_metrics_need_their_key(observed: Service) -> None:
    assert httpx.get(f"{observed.base_url}/metrics").status_code == 401
    assert httpx.get(f"{observed.base_url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 401
    assert httpx.get(f"{observed.base_url}/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}).status_code == 200


def test_no_secret_or_content_in_logs_or_metrics(fake: FakeUpstream, observed: Service, http: httpx.Client) -> None:
    fake.expect(Reply(pieces=["penguin", " facts"]), Reply(status=401))
    http.post("/chat", json={"message": PROMPT})
    http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": PROMPT}]})
    http.get("/chat", params={"q": PROMPT, "api_key": KEY})
    exposed = observed.log() + http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}).text
    for secret in (UPSTREAM_KEY, KEY, "second-key", METRICS_KEY, PROMPT, "penguin facts"):
        assert secret not in exposed
    assert '"POST /chat HTTP/1.1"' not in observed.log(), "uvicorn's access log doubles the request lines"


def test_log_content_writes_prompt_and_completion(fake: FakeUpstream, start_service: Callable[..., Service]) -> None:
    service = start_service(upstream_env(fake, LOG_CONTENT="1"))
    fake.expect(Reply(pieces=["penguin", " facts"]), Reply(pieces=["more", " facts"]))
    with client_for(service) as http:
        http.post("/chat", json={"message": PROMPT}, headers={"X-Request-ID": "req-content-chat"})
        body = {"messages": [{"role": "user", "content": PROMPT}], "stream": True}
        http.post("/v1/chat/completions", json=body, headers={"X-Request-ID": "req-content-v1"})
    chat = line_for(service, "req-content-chat")
    assert chat["prompt"] == [{"role": "user", "content": PROMPT}] and chat["completion"] == "penguin facts"
    v1 = line_for(service, "req-content-v1")
    assert v1["prompt"] == [{"role": "user", "content": PROMPT}] and v1["completion"] == "more facts"
    assert KEY not in service.log()
