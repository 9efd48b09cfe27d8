"""Past what one process relays on time, new streams are refused at once and admitted ones go on.

The service is made late on purpose, the way an overloaded process is: it is stopped (SIGSTOP)
for longer than its bound while a new request waits in its socket, then continued. Its event loop
then finds itself late, refuses that request with 503 at once, without calling the upstream, and
keeps relaying the streams it had admitted; once it has kept time again it admits new streams."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import anyio
import httpx
import pytest

from relay.admission import LIMIT_FLOOR, PROBE_SECONDS, ClientLeft, LoadShedder, StartQueue
from relay.observability import Metrics
from relay.upstream import UpstreamCall

from conftest import AUTH, Service, client_for, upstream_env, wait_until
from test_lifecycle import COMPLETIONS, open_raw_stream, read_until
from upstream import FakeUpstream, Reply

BOUND_MS = "200"
STOPPED_SECONDS = 1.0  # five times the bound


@contextmanager
def held_late(service: Service) -> Iterator[None]:
    """Stop the service's process for STOPPED_SECONDS (the body runs meanwhile, to send it
    requests), as a machine with too much to do would hold it back; then let it go on."""
    service.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        yield
        time.sleep(max(0.0, STOPPED_SECONDS - (time.monotonic() - started)))
    finally:
        service.process.send_signal(signal.SIGCONT)


def open_held_streams(service: Service, fake: FakeUpstream, rest: threading.Event) -> list[socket.socket]:
    """As many admitted streams as a worker needs open before lateness is blamed on its streams,
    each with its first piece read and the rest held until `rest` is set."""
    fake.default = Reply(pieces=["first", " second"], gates={1: rest})
    streams = [open_raw_stream(service, *COMPLETIONS) for _ in range(LIMIT_FLOOR)]
    for stream in streams:
        read_until(stream, b"first")
    return streams


def test_a_late_worker_refuses_new_streams_at_once_and_keeps_relaying(fake: FakeUpstream, start_service: Callable[..., Service]) -> None:
    service = start_service(upstream_env(fake, SHED_LAG_MS=BOUND_MS))
    rest = threading.Event()
    admitted = open_held_streams(service, fake, rest)
    with client_for(service) as http:
        assert http.get("/healthz").json()["shedding"] is False

        refused: dict[str, object] = {}

        def ask() -> None:
            response = http.post("/v1/chat/completions", json=COMPLETIONS[1])
            refused.update(status=response.status_code, headers=response.headers, body=response.json(), at=time.monotonic())

        asking = threading.Thread(target=ask)
        with held_late(service):
            asking.start()  # the request waits in the stopped process's socket
        continued = time.monotonic()
        asking.join(timeout=10)
        assert refused["status"] == 503
        assert float(refused["at"]) - continued < 1.0  # answered at once, not after a queue  # type: ignore[arg-type]
        assert refused["headers"]["retry-after"] == "1"  # type: ignore[index]
        assert 500 <= int(refused["headers"]["retry-after-ms"]) <= 1500  # type: ignore[index]
        error = refused["body"]["error"]  # type: ignore[index]
        assert error["code"] == "server_busy" and error["type"] == "server_busy" and error["message"]
        assert len(fake.requests) == len(admitted)  # the refused request never reached the upstream
        assert "relay_shed_total 1.0" in http.get("/metrics").text.splitlines()

        # The admitted streams were not cut: the rest of each answer arrives, and each ends cleanly.
        rest.set()
        for stream in admitted:
            assert b"second" in read_until(stream, b"data: [DONE]")
            stream.close()

        # Once the loop keeps time again, new streams are admitted.
        wait_until(lambda: http.get("/healthz").json()["shedding"] is False, timeout=10)
        fake.expect(Reply(pieces=["again"]))
        again = http.post("/v1/chat/completions", json=COMPLETIONS[1])
        assert again.status_code == 200 and "again" in again.text


def test_healthz_reports_shedding_while_the_worker_is_late(fake: FakeUpstream, start_service: Callable[..., Service]) -> None:
    service = start_service(upstream_env(fake, SHED_LAG_MS=BOUND_MS))
    rest = threading.Event()
    admitted = open_held_streams(service, fake, rest)
    with httpx.Client(base_url=service.base_url, timeout=10) as http:
        calm = http.get("/healthz").json()
        assert calm["shedding"] is False and calm["stream_limit"] == calm["max_streams"]
        reports: list[dict[str, object]] = []
        asking = threading.Thread(target=lambda: reports.append(http.get("/healthz").json()))
        with held_late(service):
            asking.start()
        asking.join(timeout=10)
        assert reports and reports[0]["shedding"] is True
        assert float(reports[0]["event_loop_lag_ms"]) > float(BOUND_MS)  # type: ignore[arg-type]
        wait_until(lambda: http.get("/healthz").json()["shedding"] is False, timeout=10)
    rest.set()
    for stream in admitted:
        stream.close()


@pytest.mark.parametrize("bound", ["0", BOUND_MS], ids=["shedding-off", "too-few-streams-to-blame"])
def test_a_late_worker_still_admits_without_a_bound_or_with_few_streams(fake: FakeUpstream, start_service: Callable[..., Service], bound: str) -> None:
    """With SHED_LAG_MS=0 nothing is refused for lateness; with a bound, a worker with fewer than
    a few streams open is late for another reason (here: stopped), and refusing would help nobody."""
    service = start_service(upstream_env(fake, SHED_LAG_MS=bound))
    fake.expect(Reply(pieces=["admitted"]))
    answers: list[httpx.Response] = []

    def ask() -> None:
        with client_for(service) as http:
            answers.append(http.post("/v1/chat/completions", json=COMPLETIONS[1]))

    asking = threading.Thread(target=ask)
    with held_late(service):
        asking.start()
    asking.join(timeout=10)
    assert answers and answers[0].status_code == 200 and "admitted" in answers[0].text


def test_a_steady_overload_meets_a_steady_count_of_streams() -> None:
    """The controller alone, against a worker that runs later the more streams it holds beyond
    its capacity, offered far more new streams than that for a minute: the count of open streams
    settles near the capacity and stays there, instead of waves of admissions and refusals."""
    capacity, tick = 150, 0.01
    shedder = LoadShedder(0.02, 500)
    chance = random.Random(13)
    ends: list[float] = []  # of the open streams, each 3-7 s long
    counts: list[int] = []
    for step in range(6000):
        now = step * tick
        ends = [end for end in ends if end > now]
        for _ in range(20):  # 2,000 new streams a second, ten times what it can take
            if shedder.admits(len(ends)):
                ends.append(now + chance.uniform(3, 7))
        late = 0.002 * max(0, len(ends) - capacity)  # 2 ms later for each stream too many
        shedder.observe(late, tick, len(ends))
        counts.append(len(ends))
    settled = counts[1500:]  # after 15 s
    assert 0.8 * capacity <= min(settled) and max(settled) <= 1.2 * capacity, (min(settled), max(settled))
    assert max(settled) - min(settled) <= 0.05 * capacity, (min(settled), max(settled))


def test_new_streams_are_forgotten_once_set_up_also_with_few_streams_open() -> None:
    """With fewer streams open than it ever refuses for, the controller never checks its list of
    new streams waiting for a thread; it must forget the served ones anyway, or a small
    deployment would keep every call it ever made."""
    shedder = LoadShedder(0.02, 500)
    for _ in range(1000):
        call = UpstreamCall()
        shedder.setting_up(call)
        call.thread_wait = 0.001  # its worker thread took it
        assert shedder.admits(1)
    assert len(shedder._setups) <= 1


# -- bursts: queued and paced, not refused --------------------------------------------------------


async def burst(base_url: str, route: str, count: int) -> list[tuple[int, str, float]]:
    """`count` streams asked at once: (status, text, seconds to the response head) of each."""
    body = COMPLETIONS[1] if route == "/v1/chat/completions" else {"message": "hi"}
    async with httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=30, limits=httpx.Limits(max_connections=None)) as http:

        async def one() -> tuple[int, str, float]:
            started = time.monotonic()
            async with http.stream("POST", route, json=body) as response:
                head = time.monotonic() - started
                return response.status_code, (await response.aread()).decode(), head

        return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), timeout=60)


def queue_waits(http: httpx.Client) -> tuple[float, float]:
    """(streams started, of which at once: within a millisecond) from the queue's histogram."""
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in http.get("/metrics").text.splitlines() if line.startswith("relay_queue_wait")}
    return samples["relay_queue_wait_seconds_count"], samples['relay_queue_wait_seconds_bucket{le="0.001"}']


@pytest.mark.parametrize("route", ["/chat", "/v1/chat/completions"])
def test_a_burst_on_an_idle_worker_is_queued_and_served(fake: FakeUpstream, start_service: Callable[..., Service], route: str) -> None:
    """60 streams at once on an idle worker: 31 answered and 29 refused with 503, from a worker
    that had room for all of them. Now the ones it cannot set up at once wait their turn."""
    service = start_service(upstream_env(fake, SHED_LAG_MS="20", START_QUEUE_MS="10000"))
    release = threading.Event()
    # The upstream holds every response head until all 60 asked: each set-up stays unfinished as
    # long as the worker counts one, so that only a few start at once and the rest must queue.
    fake.default = Reply(pieces=["whole", " answer"], hold_headers=True, gates={0: release})
    answers: list[tuple[int, str, float]] = []
    asking = threading.Thread(target=lambda: answers.extend(asyncio.run(burst(service.base_url, route, 60))))
    asking.start()
    try:
        fake.wait_for_requests(60, timeout=30)
    finally:
        release.set()
        asking.join(timeout=60)
    assert [status for status, _, _ in answers] == [200] * 60
    assert all("whole" in text and "answer" in text for _, text, _ in answers)
    with client_for(service) as http:
        started, at_once = queue_waits(http)
        assert started == 60 and at_once < 60, (started, at_once)  # some waited their turn
        assert http.get("/healthz").json()["queued"] == 0


def test_a_burst_on_a_late_worker_is_refused_at_once_while_the_admitted_streams_go_on(fake: FakeUpstream, start_service: Callable[..., Service]) -> None:
    """A burst that arrives while the worker runs later than START_QUEUE_MS cannot start within
    it: each stream gets its 503 at once instead of waiting its turn, none reaches the upstream,
    and the admitted streams go on to the end."""
    service = start_service(upstream_env(fake, SHED_LAG_MS=BOUND_MS, START_QUEUE_MS="100"))
    rest = threading.Event()
    admitted = open_held_streams(service, fake, rest)
    answers: list[tuple[int, str, float]] = []
    asking = threading.Thread(target=lambda: answers.extend(asyncio.run(burst(service.base_url, "/v1/chat/completions", 20))))
    with held_late(service):
        asking.start()  # the burst waits in the stopped process's socket
    continued = time.monotonic()
    asking.join(timeout=30)
    try:
        assert [status for status, _, _ in answers] == [503] * 20
        assert all(json.loads(text)["error"]["code"] == "server_busy" for _, text, _ in answers)
        assert time.monotonic() - continued < 5  # at once, not after the admitted answers
        assert len(fake.requests) == len(admitted)  # no refused stream reached the upstream
    finally:
        rest.set()
    for stream in admitted:
        assert b"second" in read_until(stream, b"data: [DONE]")
        stream.close()


def test_a_client_that_leaves_while_it_waits_its_turn_costs_nothing() -> None:
    """The start queue alone, held by a worker that runs late: a waiting client that leaves is
    taken out of the queue at once, and never gets a turn (nor a slot, nor an upstream call)."""
    shedder = LoadShedder(0.02, 500)
    shedder.observe(1.0, PROBE_SECONDS, LIMIT_FLOOR)  # a second late: nothing starts now
    metrics = Metrics()
    starts = StartQueue(shedder, 10.0, 10, lambda: LIMIT_FLOOR, metrics)
    left_at: list[float] = []

    async def leaves_after_a_moment() -> None:
        await anyio.sleep(0.05)
        left_at.append(time.monotonic())

    async def waits() -> None:
        with pytest.raises(ClientLeft):
            await starts.wait_turn(leaves_after_a_moment)

    started = time.monotonic()
    anyio.run(waits)
    assert left_at and time.monotonic() - left_at[0] < 1.0 and time.monotonic() - started < 2.0
    assert not starts.waiting and not starts.setting_up
    assert metrics.registry.get_sample_value("relay_queued_streams") == 0
