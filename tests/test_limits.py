"""Per-key limits against real processes: two service processes of two workers each sharing one
real Redis admit exactly a key's limits between them (streams open at once, requests and tokens
per minute), another key is unaffected; tokens are reserved then settled to the real usage (also
after a disconnect, a failure, a continuation, a shutdown); a killed worker's streams come back
within the lease; Redis stopped and restarted under load hangs no request; without Redis the
limits hold in the process; every answer carries OpenAI's x-ratelimit-* headers."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path

import httpx
import pytest
import redis

from relay.config import ConfigError, load_settings
from relay.limits import RATE_LIMIT_HEADERS, token_estimate

from conftest import Service, free_port, launch, start_redis, upstream_env, wait_until, workers_of
from upstream import FakeUpstream, Reply

STREAMS_KEY, OTHER_KEY, REQUESTS_KEY = "sk-limits-streams-Q7wz", "sk-limits-other-V2kd", "sk-limits-requests-P9xc"
TOKENS_KEY, HEADERS_KEY, KILL_KEY = "sk-limits-tokens-L4mn", "sk-limits-headers-R8tb", "sk-limits-kill-Z3hq"
TWO_KEY = "sk-limits-two-M5pe"
KEYS = (STREAMS_KEY, OTHER_KEY, REQUESTS_KEY, TOKENS_KEY, HEADERS_KEY, KILL_KEY, TWO_KEY)
PER_KEY = {  # KEY_LIMITS_FILE's tables: every other key gets KEY_MAX_STREAMS=5
    "requests": (REQUESTS_KEY, {"max_streams": 0, "requests_per_minute": 6}),
    "tokens": (TOKENS_KEY, {"max_streams": 0, "tokens_per_minute": 1000}),
    "headers": (HEADERS_KEY, {"max_streams": 0, "requests_per_minute": 1000, "tokens_per_minute": 100000}),
    "kill": (KILL_KEY, {"max_streams": 2}),
    "two": (TWO_KEY, {"max_streams": 2}),
}
LEASE = 1.0
ORIGIN = "https://app.example"
HELD = ["one", " two"]  # a held reply sends "one", then waits for its gate
STREAM = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
WHOLE = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
RESET = re.compile(r"\d+ms|\d+(\.\d+)?s|\d+m\d+s")


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def label(key: str) -> str:
    """What /metrics calls a key that KEY_LIMITS_FILE gives no name."""
    return sha256(key)[:8]


def state_keys(key: str) -> tuple[str, str, str]:
    base = f"relay:limits:{{{sha256(key)[:32]}}}"
    return base, f"{base}:leases", f"{base}:held"


def write_limits_file(path: Path, tables: dict[str, tuple[str, dict[str, int]]]) -> Path:
    lines = []
    for name, (key, limits) in tables.items():
        lines += [f"[keys.{name}]", f'sha256 = "{sha256(key)}"', *(f"{field} = {value}" for field, value in limits.items()), ""]
    path.write_text("\n".join(lines))
    return path


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Opened:
    client: httpx.Client
    response: httpx.Response

    def close(self) -> None:
        self.response.close()
        self.client.close()


def at_once(targets: list[tuple[str, str]], body: dict, path: str = "/v1/chat/completions") -> list[Opened]:
    """Each (base URL, key) sends `body` at the same moment (a barrier), each on its own
    connection; the responses come back with their heads read and their bodies open."""
    barrier = threading.Barrier(len(targets))

    def send(target: tuple[str, str]) -> Opened:
        base_url, key = target
        client = httpx.Client(base_url=base_url, headers=auth(key), timeout=15)
        request = client.build_request("POST", path, json=body)
        barrier.wait(timeout=15)
        return Opened(client, client.send(request, stream=True))

    with ThreadPoolExecutor(len(targets)) as pool:
        return list(pool.map(send, targets))


@pytest.fixture
def held(fake: FakeUpstream) -> Iterator[threading.Event]:
    """Every streamed answer sends "one", then waits for this gate; whole answers come at once."""
    gate = threading.Event()
    reply = Reply(pieces=HELD, gates={1: gate})
    fake.default = lambda body: reply if body.get("stream") else Reply()
    try:
        yield gate
    finally:
        gate.set()


def metric(services: list[Service], name: str, key: str = OTHER_KEY) -> float:
    """A sample of /metrics (name and labels, as written), added up over `services` (each adds up its own workers)."""
    total = 0.0
    for service in services:
        for line in httpx.get(f"{service.base_url}/metrics", headers=auth(key), timeout=10).text.splitlines():
            sample, _, value = line.rpartition(" ")
            if sample == name:
                total += float(value)
    return total


def pair_env(upstream: FakeUpstream, redis_url: str, directory: Path) -> dict[str, str]:
    return upstream_env(
        upstream,
        API_KEYS=",".join(KEYS),
        KEY_MAX_STREAMS="5",
        KEY_LIMITS_FILE=str(write_limits_file(directory / "key-limits.toml", PER_KEY)),
        KEY_LEASE_SECONDS=str(LEASE),
        REDIS_URL=redis_url,
        WEB_CONCURRENCY="2",
        CORS_ORIGINS=ORIGIN,
    )


@pytest.fixture(scope="module")
def pair(upstream: FakeUpstream, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Service]]:
    """Two service processes of two workers each, sharing one Redis: two replicas."""
    directory = tmp_path_factory.mktemp("limits-pair")
    env = pair_env(upstream, redis_url, directory)
    services = [launch(directory, env), launch(directory, env)]
    yield services
    for service in services:
        service.stop()


@pytest.fixture(scope="module")
def store(redis_url: str) -> Iterator[redis.Redis]:
    """The shared Redis, to look at what the services keep there."""
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    yield client
    client.close()


# -- across replicas and workers -------------------------------------------------------------------


def test_a_key_gets_exactly_its_streams_across_two_replicas_of_two_workers(
    fake: FakeUpstream, pair: list[Service], held: threading.Event, store: redis.Redis
) -> None:
    replicas = cycle(service.base_url for service in pair)
    opened = at_once([(next(replicas), STREAMS_KEY) for _ in range(12)], STREAM)
    try:
        statuses = sorted(item.response.status_code for item in opened)
        assert statuses == [200] * 5 + [429] * 7
        for item in opened:
            if item.response.status_code == 429:
                error = item.response.read() and item.response.json()["error"]
                assert (error["type"], error["code"]) == ("rate_limit_exceeded", "rate_limit_exceeded")
                assert "answers open at once: limit 5" in error["message"]
                assert item.response.headers["retry-after"] == "1" and int(item.response.headers["retry-after-ms"]) >= 1
        # Another key has its own five.
        others = at_once([(next(replicas), OTHER_KEY) for _ in range(5)], STREAM)
        try:
            assert [item.response.status_code for item in others] == [200] * 5
        finally:
            for item in others:
                item.close()
        assert metric(pair, f'relay_key_refused_total{{key="{label(STREAMS_KEY)}",limit="streams"}}') == 7
        assert metric(pair, f'relay_key_admitted_total{{key="{label(STREAMS_KEY)}"}}') == 5
        assert store.zcard(state_keys(STREAMS_KEY)[1]) == 5
    finally:
        held.set()
        for item in opened:
            item.close()
    # The answers ended: their streams are back.
    wait_until(lambda: store.zcard(state_keys(STREAMS_KEY)[1]) == 0, timeout=5)
    assert httpx.post(f"{pair[0].base_url}/v1/chat/completions", json=WHOLE, headers=auth(STREAMS_KEY), timeout=10).status_code == 200


def test_clients_at_their_stream_limit_are_never_refused_for_answers_that_ended(fake: FakeUpstream, pair: list[Service]) -> None:
    """Two clients, each asking one question after the other, of a key that may have two answers
    open: an answer's end is settled in Redis after its response, but it rides with the next
    check of the same key, so that the next question never finds it still open."""
    refused: list[int] = []

    def ask() -> None:
        with httpx.Client(base_url=pair[0].base_url, headers=auth(TWO_KEY), timeout=10) as http:
            refused.extend(response.status_code for _ in range(25) if (response := http.post("/v1/chat/completions", json=WHOLE)).status_code != 200)

    clients = [threading.Thread(target=ask) for _ in range(2)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(timeout=60)
    assert refused == []
    assert metric(pair, 'relay_key_admitted_total{key="two"}') == 50


def test_requests_per_minute_are_exact_across_both_replicas(fake: FakeUpstream, pair: list[Service]) -> None:
    replicas = cycle(service.base_url for service in pair)
    started = time.monotonic()
    opened = at_once([(next(replicas), REQUESTS_KEY) for _ in range(10)], WHOLE)
    try:
        assert time.monotonic() - started < 8  # the budget refills one request every 10 s
        admitted = [item.response for item in opened if item.response.status_code == 200]
        refused = [item.response for item in opened if item.response.status_code == 429]
        assert (len(admitted), len(refused)) == (6, 4)
        assert sorted(int(response.headers["x-ratelimit-remaining-requests"]) for response in admitted) == [0, 1, 2, 3, 4, 5]
        for response in refused:
            response.read()
            assert "requests per minute: limit 6" in response.json()["error"]["message"]
            assert 1 <= int(response.headers["retry-after"]) <= 10 and int(response.headers["retry-after-ms"]) <= 10_000
            assert response.headers["x-ratelimit-remaining-requests"] == "0"
    finally:
        for item in opened:
            item.close()
    assert metric(pair, 'relay_key_refused_total{key="requests",limit="requests"}') == 4  # the name KEY_LIMITS_FILE gives it


def test_a_burst_of_large_requests_cannot_pass_the_token_limit_and_what_they_did_not_use_comes_back(
    fake: FakeUpstream, pair: list[Service], held: threading.Event, store: redis.Redis
) -> None:
    """1,000 tokens a minute; each request reserves its prompt and max_tokens=400 (about 430): two
    fit, a third does not. They use 7 each, and settle to it: two more fit again at once."""
    large = {**STREAM, "max_tokens": 400, "stream_options": {"include_usage": True}}
    replicas = cycle(service.base_url for service in pair)
    started = time.monotonic()
    first = at_once([(next(replicas), TOKENS_KEY) for _ in range(5)], large)
    try:
        assert sorted(item.response.status_code for item in first) == [200, 200, 429, 429, 429]
        refused = next(item.response for item in first if item.response.status_code == 429)
        refused.read()
        message = refused.json()["error"]["message"]
        assert "tokens per minute: limit 1000" in message and "held by its open answers" in message
        assert int(refused.headers["x-ratelimit-remaining-tokens"]) < 200
        assert int(refused.headers["retry-after"]) >= 10  # until ~430 tokens refill at 1,000 a minute
        held.set()
        for item in first:
            if item.response.status_code == 200:
                assert '"total_tokens":7' in item.response.read().decode()
    finally:
        held.set()
        for item in first:
            item.close()
    state, leases, _ = state_keys(TOKENS_KEY)
    wait_until(lambda: store.zcard(leases) == 0 and float(store.hget(state, "res") or 0) == 0, timeout=5)
    second = at_once([(next(replicas), TOKENS_KEY) for _ in range(3)], large)
    try:
        # Had the reservations been spent instead of settled, ~140 tokens would be left: none would fit.
        assert time.monotonic() - started < 15  # less than 290 tokens refilled meanwhile
        assert sorted(item.response.status_code for item in second) == [200, 200, 429]
        remaining = max(int(item.response.headers["x-ratelimit-remaining-tokens"]) for item in second if item.response.status_code == 200)
        cost = token_estimate(large, 1000)[1]
        assert 1000 - 14 - cost <= remaining <= 1000 - 14 - cost + (time.monotonic() - started) * 1000 / 60 + 1
    finally:
        for item in second:
            item.close()


def test_every_answer_carries_the_rate_limit_headers_streamed_or_whole(fake: FakeUpstream, pair: list[Service]) -> None:
    with httpx.Client(base_url=pair[0].base_url, headers={**auth(HEADERS_KEY), "Origin": ORIGIN}, timeout=10) as http:
        answers = []
        with http.stream("POST", "/v1/chat/completions", json=STREAM) as streamed:
            answers.append(streamed.headers)  # in the response head, before the answer's body
        answers.append(http.post("/v1/chat/completions", json=WHOLE).headers)
        with http.stream("POST", "/v1/responses", json={"model": "fake-model", "input": "hi", "stream": True}) as streamed:
            answers.append(streamed.headers)
        answers.append(http.post("/v1/responses", json={"model": "fake-model", "input": "hi"}).headers)
        with http.stream("POST", "/chat", json={"message": "hi"}, headers={"Accept": "text/event-stream"}) as streamed:
            answers.append(streamed.headers)
    for headers in answers:
        assert headers["x-ratelimit-limit-requests"] == "1000" and headers["x-ratelimit-limit-tokens"] == "100000"
        assert RESET.fullmatch(headers["x-ratelimit-reset-requests"]) and RESET.fullmatch(headers["x-ratelimit-reset-tokens"])
        assert 0 <= int(headers["x-ratelimit-remaining-requests"]) <= 999
        assert 0 < int(headers["x-ratelimit-remaining-tokens"]) < 100000
        exposed = {name.strip().lower() for name in headers["access-control-expose-headers"].split(",")}
        assert set(RATE_LIMIT_HEADERS) <= exposed  # a browser's script may read them


def test_a_killed_worker_gives_its_streams_back_within_the_lease(
    fake: FakeUpstream, pair: list[Service], redis_url: str, held: threading.Event, start_service: Callable[..., Service], tmp_path: Path
) -> None:
    """KILL_KEY may have 2 answers open; a third replica's workers hold both and are killed -9:
    the other replicas refuse the key until the lease (1 s here) lapses, then admit it again."""
    doomed = start_service(pair_env(fake, redis_url, tmp_path))
    opened = at_once([(doomed.base_url, KILL_KEY)] * 2, STREAM)
    fake.default = Reply()  # from here on, whole answers only
    try:
        assert [item.response.status_code for item in opened] == [200, 200]
        workers = workers_of(doomed.pid)
        assert len(workers) == 2
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        probe = httpx.Client(base_url=pair[0].base_url, headers=auth(KILL_KEY), timeout=10)
        assert probe.post("/v1/chat/completions", json=WHOLE).status_code == 429  # held by the dead workers' leases
        wait_until(lambda: probe.post("/v1/chat/completions", json=WHOLE).status_code == 200, timeout=10, interval=0.05)
        freed_after = time.monotonic() - killed_at
        probe.close()
    finally:
        held.set()
        for item in opened:
            item.close()
    assert 0.3 < freed_after < LEASE + 1.5, freed_after


# -- Redis going away --------------------------------------------------------------------------------


class Load:
    """Clients sending whole requests one after the other until stopped, each noting how long it took."""

    def __init__(self, base_url: str, key: str, clients: int = 2) -> None:
        self.base_url, self.key = base_url, key
        self.results: list[tuple[float, float, int]] = []  # (when, seconds, status)
        self.refusals: list[str] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.run) for _ in range(clients)]

    def __enter__(self) -> Load:
        self.began = time.monotonic()
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=20)

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, headers=auth(self.key), timeout=10) as http:
            while not self.stopping.is_set():
                started = time.monotonic()
                response = http.post("/v1/chat/completions", json=WHOLE)
                self.results.append((started, time.monotonic() - started, response.status_code))
                if response.status_code != 200:
                    self.refusals.append(f"{started - self.began:.2f} s: {response.text}")


def test_redis_stopped_and_restarted_under_load_hangs_nothing_and_is_used_again(
    fake: FakeUpstream, start_service: Callable[..., Service], tmp_path: Path, held: threading.Event
) -> None:
    port = free_port()
    server, _ = start_redis(tmp_path, port)
    try:
        load_key, streams_key = "sk-limits-load-A1", "sk-limits-held-B2"
        service = start_service(upstream_env(
            fake, API_KEYS=f"{load_key},{streams_key}", REDIS_URL=f"redis://127.0.0.1:{port}/0",
            KEY_MAX_STREAMS="3", KEY_REQUESTS_PER_MINUTE="100000", KEY_LEASE_SECONDS=str(LEASE),
        ))
        state = state_keys(load_key)[0]

        def shared() -> bool:
            return not httpx.get(f"{service.base_url}/healthz", timeout=5).json()["key_limits"]["counting_here"]

        with Load(service.base_url, load_key) as load, redis.Redis(port=port, socket_timeout=5) as look:
            wait_until(lambda: look.exists(state) == 1, timeout=5)
            server.send_signal(signal.SIGSTOP)  # Redis stops answering; its port still takes connections
            stopped_at = time.monotonic()
            wait_until(lambda: not shared(), timeout=5)
            # Counted in the process meanwhile: KEY_MAX_STREAMS still holds there.
            opened = at_once([(service.base_url, streams_key)] * 4, STREAM)
            try:
                assert sorted(item.response.status_code for item in opened) == [200, 200, 200, 429]
            finally:
                held.set()
                for item in opened:
                    item.close()
            time.sleep(max(0.0, stopped_at + 2 - time.monotonic()))
            server.send_signal(signal.SIGCONT)
            wait_until(shared, timeout=5)
            server.terminate()  # gone: its port refuses connections, and what it held is lost
            server.wait(timeout=10)
            time.sleep(1.5)
            assert not shared()
            server, _ = start_redis(tmp_path, port)  # back on the same port, empty
            wait_until(shared, timeout=5)
            wait_until(lambda: look.exists(state) == 1, timeout=5)  # the counters live there again
        statuses = {status for _, _, status in load.results}
        slowest = max(seconds for _, seconds, _ in load.results)
        assert statuses == {200} and slowest < 1.5, (statuses, slowest, load.refusals[:3])
        assert len(load.results) > 20
        log = service.log()
        assert log.count("Redis did not answer a check of per-key limits") == 2  # once for each time it went away
        assert log.count("per-key limits are shared again") == 2
        assert metric([service], "relay_key_limits_counted_here_total", load_key) > 0
        assert "Traceback" not in log
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGCONT)
            server.kill()
            server.wait(timeout=5)


# -- settling however the answer ends -----------------------------------------------------------------


def test_a_shutdown_settles_open_answers_in_redis_at_once(
    fake: FakeUpstream, redis_url: str, start_service: Callable[..., Service], held: threading.Event, store: redis.Redis
) -> None:
    key = "sk-limits-shutdown-C3"
    service = start_service(upstream_env(
        fake, API_KEYS=key, REDIS_URL=redis_url, KEY_MAX_STREAMS="1", KEY_TOKENS_PER_MINUTE="100000",
        KEY_LEASE_SECONDS="60", SHUTDOWN_GRACE_SECONDS="0.5",
    ))
    state, leases, _ = state_keys(key)
    opened = at_once([(service.base_url, key)], STREAM)
    try:
        assert opened[0].response.status_code == 200
        assert store.zcard(leases) == 1 and float(store.hget(state, "res")) > 0
        service.process.send_signal(signal.SIGTERM)
        assert service.process.wait(timeout=15) == 0
    finally:
        held.set()
        opened[0].close()
    # At once, not when the 60 s lease lapses: the stream is back, and what it used is spent.
    assert store.zcard(leases) == 0 and float(store.hget(state, "res")) == 0
    assert 0 < 100000 - float(store.hget(state, "tl")) < 100


def test_without_redis_the_limits_hold_in_the_process_and_settle_however_the_answer_ends(
    fake: FakeUpstream, start_service: Callable[..., Service]
) -> None:
    key = "sk-limits-memory-D4"
    service = start_service(upstream_env(fake, API_KEYS=key, KEY_MAX_STREAMS="2", KEY_TOKENS_PER_MINUTE="100000"))
    name = f'relay_key_tokens_total{{key="{label(key)}"}}'

    def settles(action: Callable[[], object], low: float, high: float) -> None:
        """What `action` did settles to between `low` and `high` tokens (once its response ended)."""
        before = metric([service], name, key)
        action()
        wait_until(lambda: metric([service], name, key) - before >= low, timeout=5, interval=0.05)
        assert low <= metric([service], name, key) - before <= high

    with httpx.Client(base_url=service.base_url, headers=auth(key), timeout=10) as http:
        # Two answers open at once; a third is refused; one that leaves gives its place back.
        gate = threading.Event()
        fake.default = Reply(pieces=HELD, gates={1: gate})  # a whole answer is one piece: never held
        try:
            with ExitStack() as streams:
                first = streams.enter_context(http.stream("POST", "/v1/chat/completions", json=STREAM))
                streams.enter_context(http.stream("POST", "/v1/chat/completions", json=STREAM))
                refused = http.post("/v1/chat/completions", json=WHOLE)
                assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
                first.close()
                wait_until(lambda: http.post("/v1/chat/completions", json=WHOLE).status_code == 200, timeout=5)
        finally:
            gate.set()
        fake.reset()
        prompt = token_estimate(STREAM, 1000)[0]

        # A continued /chat answer settles to the usage of both rounds: (5 + 2) + (5 + 1).
        fake.expect(Reply(pieces=["a", "b"], finish_reason="length"), Reply(pieces=["c"]))
        settles(lambda: http.post("/chat", json={"message": "hi", "max_continuations": 1}), 13, 13)

        # A stream that failed midway, without usage: its prompt's estimate and the pieces relayed
        # (the role chunk is one too).
        fake.expect(Reply(pieces=["a", "b", "c"], error_after=2))
        settles(lambda: http.post("/v1/chat/completions", json=STREAM), prompt + 2, prompt + 4)

        def leave() -> None:
            """A client that leaves after the first piece."""
            gate = threading.Event()
            fake.expect(Reply(pieces=HELD, gates={1: gate}))
            with http.stream("POST", "/v1/chat/completions", json=STREAM) as response:
                next(response.iter_lines())
            assert fake.wait_for_requests(1)[-1].closed.wait(5)
            gate.set()

        settles(leave, prompt + 1, prompt + 3)

        # A whole answer settles to the usage in its body.
        settles(lambda: http.post("/v1/chat/completions", json=WHOLE), 5 + 4, 5 + 4)


# -- settings, and what must never show ------------------------------------------------------------------


def test_the_per_key_file_is_checked_when_the_service_starts(tmp_path: Path) -> None:
    keys = {"API_KEYS": f"{OTHER_KEY},{TOKENS_KEY}"}
    path = tmp_path / "limits.toml"
    settings = load_settings({**keys, "KEY_MAX_STREAMS": "5", "KEY_LIMITS_FILE": str(write_limits_file(path, {"tokens": PER_KEY["tokens"]}))})
    (override,) = settings.key_overrides
    assert (override.name, override.sha256, override.max_streams, override.tokens_per_minute) == ("tokens", sha256(TOKENS_KEY), 0, 1000)
    bad = {
        "not TOML": "[keys.x\n",
        "matches none": f'[keys.x]\nsha256 = "{sha256("not-a-key")}"\n',
        "unknown field": f'[keys.x]\nsha256 = "{sha256(OTHER_KEY)}"\nstreams = 3\n',
        "negative": f'[keys.x]\nsha256 = "{sha256(OTHER_KEY)}"\nmax_streams = -1\n',
        "twice": f'[keys.x]\nsha256 = "{sha256(OTHER_KEY)}"\n[keys.y]\nsha256 = "{sha256(OTHER_KEY)}"\n',
        "bad name": f'[keys."a b"]\nsha256 = "{sha256(OTHER_KEY)}"\n',
    }
    for text in bad.values():
        path.write_text(text)
        with pytest.raises(ConfigError, match="^KEY_LIMITS_FILE") as refused:
            load_settings({**keys, "KEY_LIMITS_FILE": str(path)})
        assert OTHER_KEY not in str(refused.value) and TOKENS_KEY not in str(refused.value)


def test_no_key_shows_in_logs_metrics_or_healthz(fake: FakeUpstream, pair: list[Service]) -> None:
    for service in pair:
        for key in (STREAMS_KEY, REQUESTS_KEY):  # admitted or refused, each is counted under its label
            httpx.post(f"{service.base_url}/v1/chat/completions", json=WHOLE, headers=auth(key), timeout=10)
        seen = service.log() + httpx.get(f"{service.base_url}/metrics", headers=auth(OTHER_KEY), timeout=10).text
        seen += httpx.get(f"{service.base_url}/healthz", timeout=10).text
        assert f'key="{label(STREAMS_KEY)}"' in seen and 'key="requests"' in seen  # a short digest, or the file's name
        for key in KEYS:
            assert key not in seen and sha256(key) not in seen
