"""Resumable answers against real processes: a reader whose connection drops picks the answer up
where it left off (Last-Event-ID, /chat/streams/{id}?after=n), on the same process or, through a
real Redis, on another one, and the model is asked once. Nobody coming back stops the model after
the grace window; DELETE stops it at once; a killed producer ends its readers within the lease;
another key's answer does not exist; the memory store stays within its bounds."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conftest import Service, client_for, holding, launch, start_redis, upstream_env, wait_until
from upstream import FakeUpstream, Reply

SSE = {"Accept": "text/event-stream"}
NDJSON = {"Accept": "application/x-ndjson"}
OTHER_KEY = {"Authorization": "Bearer second-key"}  # a valid key, but not the one that asked
PIECES = ["One", " two", " three", " four", " five", " six."]
WHOLE = "".join(PIECES)
GRACE = 1.5


@dataclass
class Event:
    id: str | None
    name: str
    data: dict


def sse(lines: Iterable[str]) -> Iterator[Event]:
    """Events with their ids, as EventSource reads them; comments and the retry field skipped."""
    event_id, name, data = None, "message", []
    for line in lines:
        if line == "":
            if data:
                yield Event(event_id, name, json.loads("\n".join(data)))
            event_id, name, data = None, "message", []
        elif line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])


def text_of(events: list[Event]) -> str:
    return "".join(event.data["text"] for event in events if event.name == "delta")


def start_then_cut(http: httpx.Client, count: int) -> tuple[str, list[Event]]:
    """Ask over SSE, read `count` events, then drop the connection mid-answer."""
    with http.stream("POST", "/chat", json={"message": "hi"}, headers=SSE) as response:
        assert response.status_code == 200
        stream_id = response.headers["x-stream-id"]
        events = sse(response.iter_lines())
        received = [next(events) for _ in range(count)]
    return stream_id, received


@pytest.fixture
def held(fake: FakeUpstream) -> Iterator[threading.Event]:
    """The next answer sends two pieces, then waits for this gate before the rest."""
    with holding(fake, PIECES, 2) as gate:
        yield gate


@pytest.fixture(scope="module")
def memory_service(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    env = upstream_env(upstream, RESUME_GRACE_SECONDS=str(GRACE), RESUME_TTL_SECONDS="2")
    running = launch(tmp_path_factory.mktemp("memory-replay"), env)
    yield running
    running.stop()


def redis_env(upstream: FakeUpstream, redis_url: str, **env: str) -> dict[str, str]:
    short = {"RESUME_GRACE_SECONDS": "2", "RESUME_LEASE_SECONDS": "1", "RESUME_TTL_SECONDS": "5"}
    return upstream_env(upstream, REDIS_URL=redis_url, **{**short, **env})


@pytest.fixture(scope="module")
def replicas(upstream: FakeUpstream, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Service]]:
    """Two service processes sharing one Redis, as two replicas behind a load balancer."""
    directory = tmp_path_factory.mktemp("replicas")
    first = launch(directory, redis_env(upstream, redis_url))
    second = launch(directory, redis_env(upstream, redis_url))
    yield first, second
    first.stop()
    second.stop()


@pytest.fixture(params=["memory", "redis-same-replica", "redis-other-replica"])
def pair(request: pytest.FixtureRequest) -> tuple[Service, Service]:
    """Where the answer starts, and where it is resumed."""
    if request.param == "memory":
        running = request.getfixturevalue("memory_service")
        return running, running
    first, second = request.getfixturevalue("replicas")
    return (first, first) if request.param == "redis-same-replica" else (first, second)


# -- resuming ---------------------------------------------------------------------------------


def test_a_cut_reader_resumes_with_last_event_id_and_gets_every_piece_once(
    fake: FakeUpstream, pair: tuple[Service, Service], held: threading.Event
) -> None:
    starter, resumer = pair
    with client_for(starter) as http:
        stream_id, before = start_then_cut(http, 1)  # the second piece is sent, but not read
    assert [event.id for event in before] == [f"{stream_id}.1"]
    assert len(stream_id) >= 22  # at least 128 random bits, URL-safe
    with client_for(resumer) as http:
        # What EventSource sends when it reconnects: the same request, and the last id it saw.
        with http.stream("GET", "/chat", params={"q": "hi"}, headers={**SSE, "Last-Event-ID": before[-1].id}) as response:
            assert response.status_code == 200 and response.headers["x-stream-id"] == stream_id
            lines = response.iter_lines()
            assert [next(lines), next(lines)] == ["retry: 1000", ""]
            events = sse(lines)
            assert not held.is_set()
            replayed = next(events)
            assert replayed.id == f"{stream_id}.2" and replayed.data == {"text": " two"}  # from the store
            held.set()  # the rest comes live
            after = [replayed, *events]
    assert text_of(before) + text_of(after) == WHOLE
    assert [event.id for event in after] == [f"{stream_id}.{n}" for n in range(2, len(PIECES) + 2)]
    assert after[-1].name == "done" and after[-1].data["finish_reason"] == "stop"
    assert after[-1].data["usage"]["completion_tokens"] == len(PIECES)
    assert len(fake.requests) == 1, "the resume asked the model again"
    for service in (starter, resumer):  # a log reader must not be able to resume
        assert stream_id not in service.log()


def log_line(service: Service, request_id: str) -> dict:
    wait_until(lambda: f'"request_id": "{request_id}"' in service.log())
    return next(json.loads(line) for line in service.log().splitlines() if f'"request_id": "{request_id}"' in line)


def test_an_answer_is_logged_and_counted_once_with_the_request_that_asked(
    fake: FakeUpstream, memory_service: Service, held: threading.Event
) -> None:
    with client_for(memory_service) as http:
        with http.stream("POST", "/chat", json={"message": "hi"}, headers={**SSE, "X-Request-ID": "asked-1"}) as response:
            first = next(sse(response.iter_lines()))
        held.set()
        resumed = http.get("/chat", headers={**SSE, "Last-Event-ID": first.id, "X-Request-ID": "resumed-1"}, params={"q": "hi"})
        assert text_of([first, *sse(resumed.text.split("\n"))]) == WHOLE
    asked = log_line(memory_service, "asked-1")
    assert asked["outcome"] == "client_disconnected" and asked["chunks"] in (1, 2)  # written before the close: both, or one
    assert asked["completion_tokens"] == len(PIECES)  # the whole answer's cost, known once it ended
    again = log_line(memory_service, "resumed-1")
    assert again["completion_tokens"] is None and again["path"] == "/chat"


@pytest.mark.parametrize("accept", ["application/x-ndjson", "text/plain", "text/event-stream"])
def test_streams_route_frames_a_resumed_answer_like_a_fresh_one(fake: FakeUpstream, memory_service: Service, accept: str) -> None:
    fake.expect(Reply(pieces=PIECES), Reply(pieces=PIECES))
    with client_for(memory_service) as http:
        fresh = http.post("/chat", json={"message": "hi"}, headers={"Accept": accept})
        stream_id = fresh.headers["x-stream-id"]
        whole = http.get(f"/chat/streams/{stream_id}", params={"after": 0}, headers={"Accept": accept})
        rest = http.get(f"/chat/streams/{stream_id}", params={"after": 4}, headers={"Accept": accept})
    assert whole.status_code == 200 and whole.headers["content-type"] == fresh.headers["content-type"]
    assert whole.text == fresh.text
    if accept == "application/x-ndjson":
        assert rest.text.splitlines() == fresh.text.splitlines()[4:]
    elif accept == "text/plain":
        assert rest.text == "".join(PIECES[4:])
    else:
        assert [event.id for event in sse(rest.text.split("\n"))] == [f"{stream_id}.{n}" for n in (5, 6, 7)]
    assert len(fake.requests) == 1


def test_an_ended_answer_resumes_from_every_piece_whatever_its_characters(fake: FakeUpstream, memory_service: Service) -> None:
    # An ended answer is kept as one string and where each piece starts in it.
    pieces = ["é", "日本", "😀x", " ", "a\u0301", "\u2028", "ok"]
    fake.expect(Reply(pieces=pieces))
    with client_for(memory_service) as http:
        stream_id = http.post("/chat", json={"message": "hi"}).headers["x-stream-id"]
        for after in range(len(pieces) + 1):
            rest = http.get(f"/chat/streams/{stream_id}", params={"after": after}, headers=NDJSON).text.splitlines()
            deltas = [json.loads(line) for line in rest[:-1]]
            assert [delta["text"] for delta in deltas] == pieces[after:] and json.loads(rest[-1])["type"] == "done"
    assert len(fake.requests) == 1


@pytest.mark.parametrize("where", ["memory", "redis-other-replica"])
def test_a_resume_after_the_last_event_is_told_there_is_nothing_more(fake: FakeUpstream, request: pytest.FixtureRequest, where: str) -> None:
    if where == "memory":
        starter = resumer = request.getfixturevalue("memory_service")
    else:
        starter, resumer = request.getfixturevalue("replicas")
    with client_for(starter) as http:
        done = http.post("/chat", json={"message": "hi"}, headers=SSE)
    last = list(sse(done.text.split("\n")))[-1]
    assert last.name == "done"
    stream_id, seq = last.id.rsplit(".", 1)
    with client_for(resumer) as http:
        started = time.monotonic()
        # EventSource reconnects after every end of a response, `done` included; 204 makes it stop.
        reconnect = http.get("/chat", params={"q": "hi"}, headers={**SSE, "Last-Event-ID": last.id})
        assert (reconnect.status_code, reconnect.content) == (204, b"")
        for accept in (NDJSON, SSE, {"Accept": "text/plain"}):
            again = http.get(f"/chat/streams/{stream_id}", params={"after": seq}, headers=accept)
            assert (again.status_code, again.content) == (204, b"")
    assert time.monotonic() - started < 2  # at once, not after waiting for a producer
    assert len(fake.requests) == 1


def test_a_resume_after_the_end_gets_the_rest_and_after_the_ttl_nothing(fake: FakeUpstream, memory_service: Service) -> None:
    with client_for(memory_service) as http:
        done = http.post("/chat", json={"message": "hi"}, headers=SSE)
        events = list(sse(done.text.split("\n")))
        last_delta = events[-2].id
        resumed = http.get("/chat", params={"q": "hi"}, headers={**SSE, "Last-Event-ID": last_delta})
        assert [event.name for event in sse(resumed.text.split("\n"))] == ["done"]
        time.sleep(2.3)  # RESUME_TTL_SECONDS=2 after the end
        expired = http.get("/chat", params={"q": "hi"}, headers={**SSE, "Last-Event-ID": last_delta})
        assert expired.status_code == 204  # EventSource stops reconnecting
        stream_id = last_delta.rsplit(".", 1)[0]
        gone = http.get(f"/chat/streams/{stream_id}", headers=NDJSON)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "stream_not_found"
    assert len(fake.requests) == 1


# -- who may resume ---------------------------------------------------------------------------


def test_another_key_cannot_resume_or_stop_an_answer(fake: FakeUpstream, memory_service: Service, held: threading.Event) -> None:
    with client_for(memory_service) as http:
        stream_id, before = start_then_cut(http, 1)
    with client_for(memory_service, OTHER_KEY) as other:
        assert other.get("/chat", params={"q": "hi"}, headers={**SSE, "Last-Event-ID": before[-1].id}).status_code == 204
        response = other.post("/chat", json={"message": "hi"}, headers={**NDJSON, "Last-Event-ID": before[-1].id})
        assert response.status_code == 404 and set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert other.get(f"/chat/streams/{stream_id}", params={"after": 0}).status_code == 404
        assert other.delete(f"/chat/streams/{stream_id}").status_code == 404
    with client_for(memory_service) as http:
        held.set()
        resumed = http.get(f"/chat/streams/{stream_id}", params={"after": 1}, headers=NDJSON)
    assert json.loads(resumed.text.splitlines()[-1])["type"] == "done"  # the owner's answer went on
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    "last_event_id", ["AAAAAAAAAAAAAAAAAAAAAAAA.3", "not-an-id", "", "x" * 500, "AAAAAAAAAAAAAAAAAAAAAAAA.-1"]
)
def test_a_request_with_an_unknown_last_event_id_never_starts_an_answer(
    fake: FakeUpstream, memory_service: Service, last_event_id: str
) -> None:
    with client_for(memory_service) as http:
        assert http.get("/chat", params={"q": "hi"}, headers={**SSE, "Last-Event-ID": last_event_id}).status_code == 204
        response = http.post("/chat", json={"message": "hi"}, headers={"Last-Event-ID": last_event_id})
        assert response.status_code == 404 and response.json()["error"]["code"] == "stream_not_found"
    assert fake.requests == []


def test_bad_after_is_a_clear_error(memory_service: Service) -> None:
    with client_for(memory_service) as http:
        response = http.get("/chat/streams/AAAAAAAAAAAAAAAAAAAAAAAA", params={"after": "-1"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "after"
        assert http.get("/chat/streams/AAAAAAAAAAAAAAAAAAAAAAAA", params={"from": "1"}).status_code == 400
    assert httpx.get(f"{memory_service.base_url}/chat/streams/AAAAAAAAAAAAAAAAAAAAAAAA", timeout=5).status_code == 401


# -- the model stops when nobody reads ---------------------------------------------------------


def test_nobody_coming_back_stops_the_model_after_the_grace_window(
    fake: FakeUpstream, memory_service: Service, held: threading.Event
) -> None:
    with client_for(memory_service) as http:
        stream_id, before = start_then_cut(http, 1)
        left_at = time.monotonic()
        recorded = fake.requests[-1]
        assert not recorded.closed.wait(GRACE * 0.6), "the model was stopped before the grace window ended"
        assert recorded.closed.wait(GRACE + 3), "the model went on although nobody came back"
        assert recorded.closed_at is not None and GRACE * 0.9 <= recorded.closed_at - left_at < GRACE + 3
        assert not recorded.finished and not held.is_set()
        late = http.get(f"/chat/streams/{stream_id}", params={"after": 1}, headers=NDJSON)
    lines = [json.loads(line) for line in late.text.splitlines()]
    assert lines[-1]["type"] == "error" and lines[-1]["error"]["type"] == "abandoned"
    assert text_of(before) + "".join(line.get("text", "") for line in lines) == "".join(PIECES[:2])


def test_delete_stops_the_answer_at_once_and_ends_every_reader(
    fake: FakeUpstream, memory_service: Service, held: threading.Event
) -> None:
    with client_for(memory_service) as http:
        with http.stream("POST", "/chat", json={"message": "hi"}, headers=SSE) as response:
            stream_id = response.headers["x-stream-id"]
            events = sse(response.iter_lines())
            assert next(events).data == {"text": "One"}
            with client_for(memory_service) as second:  # another reader of the same answer
                with second.stream("GET", f"/chat/streams/{stream_id}", headers=NDJSON) as other:
                    other_lines = other.iter_lines()
                    assert json.loads(next(other_lines)) == {"type": "delta", "text": "One"}
                    stopped_at = time.monotonic()
                    assert http.delete(f"/chat/streams/{stream_id}").status_code == 204
                    rest = list(events)
                    other_rest = [json.loads(line) for line in other_lines]
    recorded = fake.requests[-1]
    assert recorded.closed.wait(2) and recorded.closed_at is not None and recorded.closed_at - stopped_at < 1
    assert rest[-1].name == "error" and rest[-1].data["error"]["type"] == "cancelled"
    assert other_rest[-1]["type"] == "error" and other_rest[-1]["error"]["type"] == "cancelled"
    assert not held.is_set() and not recorded.finished


# -- Redis: other replicas, a dead producer ------------------------------------------------------


def test_delete_on_another_replica_stops_the_producer(
    fake: FakeUpstream, replicas: tuple[Service, Service], held: threading.Event
) -> None:
    producer, other = replicas
    with client_for(producer) as http, client_for(other) as elsewhere:
        with http.stream("POST", "/chat", json={"message": "hi"}, headers=NDJSON) as response:
            stream_id = response.headers["x-stream-id"]
            lines = response.iter_lines()
            assert json.loads(next(lines))["text"] == "One"
            assert elsewhere.delete(f"/chat/streams/{stream_id}").status_code == 204
            rest = [json.loads(line) for line in lines]  # within the lease renewal (1/3 s here)
    assert rest[-1]["type"] == "error" and rest[-1]["error"]["type"] == "cancelled"
    assert fake.requests[-1].closed.wait(2) and not held.is_set()


def test_a_killed_producer_ends_its_readers_within_the_lease(
    fake: FakeUpstream, redis_url: str, replicas: tuple[Service, Service], start_service: Callable[..., Service], held: threading.Event
) -> None:
    producer = start_service(redis_env(fake, redis_url))
    _, resumer = replicas
    with client_for(producer) as http:
        stream_id, before = start_then_cut(http, 2)
    with client_for(resumer) as http:
        with http.stream("GET", f"/chat/streams/{stream_id}", params={"after": 1}, headers=NDJSON) as response:
            lines = response.iter_lines()
            assert json.loads(next(lines)) == {"type": "delta", "text": " two"}
            os.kill(producer.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            rest = [json.loads(line) for line in lines]
            ended_after = time.monotonic() - killed_at
    assert rest and rest[-1]["type"] == "error" and rest[-1]["error"]["type"] == "replay_unavailable"
    assert ended_after < 10, ended_after  # RESUME_LEASE_SECONDS=1 here; 5 by default
    assert producer.process.wait(timeout=5) == -signal.SIGKILL


def test_redis_failing_mid_answer_ends_the_answer_with_an_error(
    fake: FakeUpstream, start_service: Callable[..., Service], tmp_path: Path, held: threading.Event
) -> None:
    redis, url = start_redis(tmp_path)
    try:
        service = start_service(redis_env(fake, url, RESUME_TTL_SECONDS="1"))
        with client_for(service) as http:
            with http.stream("POST", "/chat", json={"message": "hi"}, headers=NDJSON) as response:
                lines = response.iter_lines()
                assert json.loads(next(lines))["text"] == "One"
                assert http.get("/healthz").json()["replay"]["answers"] == 1
                redis.kill()
                redis.wait(timeout=5)
                held.set()  # the next batch cannot be stored
                rest = [json.loads(line) for line in lines]
            assert rest[-1]["type"] == "error" and rest[-1]["error"]["type"] == "replay_unavailable"
            refused = http.post("/chat", json={"message": "hi"})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "replay_store_unavailable"
            assert len(fake.requests) == 1  # an answer that could not be kept was not asked for
            # Its copy in this process's memory ended too, so it expires as any other.
            wait_until(lambda: http.get("/healthz").json()["replay"]["answers"] == 0, timeout=5)
        assert fake.requests[0].closed.wait(2)
        assert "Traceback" not in service.log()
    finally:
        if redis.poll() is None:
            redis.kill()
            redis.wait(timeout=5)


# -- bounds and settings --------------------------------------------------------------------------


def test_memory_stays_within_its_bounds_under_many_answers(fake: FakeUpstream, start_service: Callable[..., Service]) -> None:
    bound, per_answer = 32 * 1024, 8 * 1024
    service = start_service(
        upstream_env(fake, RESUME_MAX_BYTES=str(bound), RESUME_MAX_ANSWER_BYTES=str(per_answer), RESUME_GRACE_SECONDS="0")
    )
    pieces = [f" {n:02d}" + "x" * 46 for n in range(20)]  # about 5 kB an answer as the store counts it
    fake.default = Reply(pieces=pieces)
    ids = []
    with client_for(service) as http:
        for _ in range(30):
            response = http.post("/chat", json={"message": "hi"})
            assert response.text == "".join(pieces)
            ids.append(response.headers["x-stream-id"])
            replay = http.get("/healthz").json()["replay"]
            assert replay["store"] == "memory" and 0 < replay["bytes"] <= bound
        assert http.get(f"/chat/streams/{ids[0]}", headers=NDJSON).status_code == 404  # the oldest went first
        assert http.get(f"/chat/streams/{ids[-1]}").text == "".join(pieces)  # the newest is whole
        fake.default = Reply(pieces=pieces * 4)  # longer than the per-answer bound
        long_id = http.post("/chat", json={"message": "hi"}).headers["x-stream-id"]
        assert http.get(f"/chat/streams/{long_id}", headers=NDJSON).status_code == 200
        # Its start was dropped: a reader lacking it is told, never given a hole in the text.
        lines = http.get(f"/chat/streams/{long_id}", params={"after": 0}, headers=NDJSON).text.splitlines()
        assert json.loads(lines[-1])["error"]["type"] == "replay_unavailable" and len(lines) == 1
        tail = http.get(f"/chat/streams/{long_id}", params={"after": 79}, headers=NDJSON).text.splitlines()
        assert [json.loads(line)["type"] for line in tail] == ["delta", "done"]
        assert http.get("/healthz").json()["replay"]["bytes"] <= bound
    assert len(fake.requests) == 31


def test_several_workers_without_redis_warn_that_resumes_need_the_same_worker(
    fake: FakeUpstream, start_service: Callable[..., Service]
) -> None:
    service = start_service(upstream_env(fake, WEB_CONCURRENCY="2"))
    wait_until(lambda: "must reach the worker that started the answer" in service.log(), timeout=5)


def test_the_redis_store_is_reported(replicas: tuple[Service, Service]) -> None:
    replay = httpx.get(f"{replicas[0].base_url}/healthz", timeout=5).json()["replay"]
    assert replay["store"] == "redis" and replay["bytes"] <= replay["max_bytes"]  # its own answers, also in memory


def test_sigterm_ends_answers_waiting_for_a_reader_at_once(fake: FakeUpstream, start_service: Callable[..., Service], held: threading.Event) -> None:
    """An answer in its grace window has no response open, so uvicorn does not wait for it: the
    shutdown stops it (the model with it) instead of leaving it to the end of the window."""
    service = start_service(upstream_env(fake, RESUME_GRACE_SECONDS="30", SHUTDOWN_GRACE_SECONDS="1"))
    with client_for(service) as http:
        start_then_cut(http, 1)
    signalled = time.monotonic()
    service.process.send_signal(signal.SIGTERM)
    assert service.process.wait(timeout=10) == 0
    assert time.monotonic() - signalled < 5
    assert fake.requests[-1].closed.wait(2) and not held.is_set()


def test_a_slow_model_is_not_taken_for_a_late_service(fake: FakeUpstream, start_service: Callable[..., Service]) -> None:
    """The producer tells the load shedder how long each upstream read waited for the process. A
    read without text (the role chunk) must count too: otherwise the model's pause before its
    first token looked like the process running that late, and new streams were refused."""
    service = start_service(upstream_env(fake, SHED_LAG_MS="200"))
    seen: list[bool] = []
    done = threading.Event()

    def watch() -> None:  # /healthz every few ms, until the answer is over (at most 10 s)
        with client_for(service) as http:
            for _ in range(2000):
                if done.wait(0.005):
                    return
                seen.append(http.get("/healthz").json()["shedding"])

    watcher = threading.Thread(target=watch)
    with holding(fake, ["after", " a pause"], 0) as first_token:
        watcher.start()
        with client_for(service) as http:
            threading.Timer(2.0, first_token.set).start()  # the role chunk comes at once
            assert http.post("/chat", json={"message": "hi"}).text == "after a pause"
            time.sleep(0.3)  # the shedder would have said so within this
        done.set()
        watcher.join(timeout=5)
    assert len(seen) > 20 and True not in seen
