"""Admission: who may start a stream now. MAX_STREAMS is the hard cap (a `Slot` each); below it,
load shedding refuses new streams at once when this process could not relay them on time.

Every piece of every answer passes through this process's event loop and its GIL, so when the
process has more to do than its core allows, each stream it relays is late by as much, and
queueing more streams only makes all of them later. So the process measures how late it runs:
a probe that asks the loop to wake every 10 ms, the wait of each arrived piece until it is
written, and a new stream's wait for a worker thread (the probe alone misses a loop that keeps
its timers but has a queue of I/O behind them). While that lateness exceeds SHED_LAG_MS, new
streams get 503 + Retry-After at once (the OpenAI SDKs retry by themselves, a load balancer
sends the retry to another replica); streams already admitted are never cut. A burst of new
streams is admitted at the rate the process sets them up: a few per probe while it runs at all
late, and none during a short spell of lateness, which passes. Lateness that lasts means the
open streams are too many, and teaches a limit on them, as Netflix's AIMD limiter or a TCP
congestion window learns: 90 % of the streams open then, raised a little at a time while the
process keeps time, so that a steady overload meets a steady count, not waves of admissions.
MAX_STREAMS stays the hard cap above it.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import anyio

from relay.errors import ServiceError
from relay.observability import Metrics
from relay.upstream import UpstreamCall

PROBE_SECONDS = 0.01
LIMIT_CUT = 0.9  # of the open streams, when the loop runs late
LIMIT_GROWTH = 0.1  # of the limit per second, plus one stream, while it keeps time and refuses
LIMIT_RETURN = 0.5  # of the limit per second, plus one stream, while it keeps time with room to spare
SUSTAINED_SECONDS = 0.25  # of lateness, before the limit is cut
CUT_INTERVAL_SECONDS = 1.0  # of lasting lateness between two cuts
LIMIT_FLOOR = 10  # fewer open streams do not make the loop late (something else did), and are always admitted


class LoadShedder:
    """Measures how late the event loop runs, and decides on it whether a new stream may start."""

    def __init__(self, bound: float, max_streams: int) -> None:
        self.bound = bound  # seconds; 0 turns shedding off
        self.max_streams = max_streams
        self.limit = float(max_streams)
        self.lag = 0.0  # seconds, smoothed over the last few probes
        self.lagging = False
        self.lagging_for = 0.0  # seconds
        self._next_cut = SUSTAINED_SECONDS  # of lagging_for
        self._due = math.inf  # when the probe asked to wake next
        self._longest_wait = 0.0  # of a piece of an answer since the last probe
        self._setups: deque[UpstreamCall] = deque()  # new streams' first calls, oldest first
        self.probed: Callable[[], None] = lambda: None  # told after each probe: the start queue

    async def run(self, open_streams: Callable[[], int]) -> None:
        """The probe: runs on the event loop for the life of the app."""
        if not self.bound:
            return
        while True:
            # Not loop.time(): uvloop's clock is read before the loop waits for the GIL, which
            # is where a process busy in its worker threads makes the loop late.
            asked = time.monotonic()
            self._due = asked + PROBE_SECONDS
            await asyncio.sleep(PROBE_SECONDS)
            now = time.monotonic()
            late, self._longest_wait = max(now - self._due, self._longest_wait), 0.0
            self.observe(late, now - asked, open_streams())
            self.probed()

    def waited(self, seconds: float) -> None:
        """Work that was ready waited `seconds` for this process: a piece of an answer from its
        arrival to its writing, or a new stream for a worker thread."""
        if seconds > self._longest_wait:
            self._longest_wait = seconds

    def observe(self, late: float, elapsed: float, open_streams: int) -> None:
        """One probe's finding: the loop was `late` seconds late, `elapsed` after the last probe."""
        # Quick to rise, slower to fall: one late wake-up (a descheduled process) does not shed,
        # two do; recovery is believed over about ten probes.
        self.lag += (late - self.lag) * (0.5 if late > self.lag else 0.2)
        if self.lag > self.bound:
            self.lagging = True
            self.lagging_for += elapsed
            # A short spell is a burst being set up, and passes once the refusals stop it; a
            # lasting one means the open streams themselves are more than the process relays.
            # Streams end only at their own pace, so a cut is given a second to show before the
            # next one: cutting at every probe would ratchet the limit down to the floor.
            if self.lagging_for >= self._next_cut and open_streams > LIMIT_FLOOR:
                self.limit = max(float(LIMIT_FLOOR), min(self.limit, open_streams * LIMIT_CUT))
                self._next_cut = self.lagging_for + CUT_INTERVAL_SECONDS
        elif self.lag < self.bound / 2:
            self.lagging, self.lagging_for, self._next_cut = False, 0.0, SUSTAINED_SECONDS
            # A limit in use is probed upwards slowly; one that is not (the overload is over)
            # returns to MAX_STREAMS within seconds, so that the next burst meets the lateness
            # check rather than a limit learnt from other streams long gone.
            growth = LIMIT_GROWTH if open_streams >= self.limit - 1 else LIMIT_RETURN
            self.limit = min(float(self.max_streams), self.limit + (self.limit * growth + 1) * elapsed)

    def admits(self, open_streams: int) -> bool:
        """Whether a new stream may start now without making the admitted ones late. Cheap:
        called on the event loop for each start."""
        if not self.bound or open_streams < LIMIT_FLOOR:
            return True  # so few streams do not make the loop late, and refusing them helps nobody
        return not self._refuses(open_streams)

    def hopeless(self, open_streams: int, within: float) -> bool:
        """Whether a new stream cannot expect to start within `within` seconds: the loop is later
        than that already, or has run late for long (its open streams are more than it relays on
        time), or they fill the limit that lateness taught. A short spell of lateness, such as
        setting up a burst causes, is not: it passes within the wait."""
        if not self.bound or open_streams < LIMIT_FLOOR:
            return False
        late_now = time.monotonic() - self._due
        return late_now > within or self.lagging_for >= SUSTAINED_SECONDS or self._limit_reached(open_streams)

    def _refuses(self, open_streams: int) -> bool:
        now = time.monotonic()
        late_now = max(now - self._due, self._oldest_setup_waiting(now))
        return self.lagging or late_now > self.bound or self._limit_reached(open_streams)

    def _limit_reached(self, open_streams: int) -> bool:
        """The open streams fill the limit lateness taught (at MAX_STREAMS, the hard cap answers)."""
        return self.limit < self.max_streams and open_streams >= self.limit

    def setting_up(self, call: UpstreamCall) -> None:
        """A new stream's first upstream call is about to wait for a worker thread."""
        self._setups.append(call)
        self._forget_started()  # here too: with few streams open, admits() never looks

    def _forget_started(self) -> None:
        setups = self._setups
        while setups and setups[0].thread_wait is not None:
            setups.popleft()

    def _oldest_setup_waiting(self, now: float) -> float:
        """How long the oldest new stream still waiting for its worker thread has waited: seen
        while it waits, not only once it is served, since a burst makes them all wait at once."""
        self._forget_started()
        return now - self._setups[0].created if self._setups else 0.0

    def refuse(self, metrics: Metrics) -> ServiceError:
        metrics.shed.inc()
        return ServiceError(
            503,
            "The service is relaying as many streams as it can keep on time; retry shortly.",
            "server_busy",
            "server_busy",
            headers=retry_hint(),
        )

    def report(self, open_streams: int) -> dict[str, Any]:
        return {
            "shedding": bool(self.bound) and open_streams >= LIMIT_FLOOR and self._refuses(open_streams),
            "event_loop_lag_ms": round(self.lag * 1000, 1),
            "stream_limit": int(self.limit),
        }


START_SETUPS = 4  # new streams set up at once: more only wait for the GIL, and make the loop late
SETUP_SECONDS = 0.05  # a set-up that takes longer waits on the network, not on this process
SETUP_GUESS = 0.008  # seconds one set-up takes, expected until some were measured


@dataclass(eq=False)
class Turn:
    """One new stream's place in the start queue, and then its set-up."""

    queued: float = field(default_factory=time.monotonic)
    ready: anyio.Event = field(default_factory=anyio.Event)
    granted: float | None = None
    set_up_at: float | None = None  # when its first upstream call answered or failed


class StartQueue:
    """New streams waiting for their turn to start, oldest first, bounded in number and in wait.

    Setting a stream up costs a few milliseconds of the event loop and the GIL; a burst of them
    all at once makes every admitted stream late for as long. So a new stream starts at once while
    few are being set up and the worker keeps time, and otherwise waits here for its turn: a burst
    is served at the rate the worker sets streams up, not refused. Only a worker that runs late
    refuses: a new stream that cannot expect to start within START_QUEUE_MS (the worker is late by
    more than that, has been late for long, or its lateness has held the queue that long) is
    refused at once, and one still waiting when the bound runs out starts then if the worker keeps
    time, or is refused. Waiting holds no slot and no upstream call: a client that leaves while it
    waits costs nothing."""

    def __init__(self, shedder: LoadShedder, bound: float, length: int, open_streams: Callable[[], int], metrics: Metrics) -> None:
        self.shedder, self.bound, self.length, self.open_streams, self.metrics = shedder, bound, length, open_streams, metrics
        self.waiting: deque[Turn] = deque()
        self.setting_up: deque[Turn] = deque()
        self.setup_seconds = SETUP_GUESS  # how long one set-up takes, smoothed
        self.held_since: float | None = None  # since when the worker's lateness holds the queue
        self.longest_wait = 0.0  # of the streams started since the last report
        shedder.probed = self.dispatch

    def expected_wait(self) -> float:
        """How long a stream queued now would wait: its place in the queue at the measured rate of
        set-ups, and, while the worker's lateness holds the queue, that much longer again."""
        wait = (len(self.waiting) + 1) * self.setup_seconds / START_SETUPS
        if self.held_since is not None:
            wait += time.monotonic() - self.held_since
        return wait

    def refuses(self) -> bool:
        """Whether a new stream is refused at once: cheap, before its body is read. Only a worker
        that runs late refuses; one that keeps time lets a stream wait its turn, however long
        the queue (up to START_QUEUE_LENGTH)."""
        if not self.shedder.bound or (not self.waiting and self.can_start()):
            return False  # it starts at once
        if len(self.waiting) >= self.length:
            return True
        expected = self.expected_wait() if self.held_since is not None else 0.0
        return expected > self.bound or self.shedder.hopeless(self.open_streams(), self.bound - expected)

    async def wait_turn(self, client_left: Callable[[], Awaitable[None]]) -> Turn:
        """Wait for this stream's turn to start, START_QUEUE_MS at most: then it starts if the worker
        keeps time, and StartRefused is raised if it does not. ClientLeft is raised when
        `client_left` (which returns once the client is gone) returns first."""
        turn = Turn()
        if not self.shedder.bound or (not self.waiting and self.can_start()):
            self.grant(turn)
            return turn
        self.waiting.append(turn)
        self.metrics.queued_streams.inc()
        left = False

        async def watch() -> None:
            nonlocal left
            await client_left()
            left = True
            tasks.cancel_scope.cancel()

        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(watch)
                with anyio.move_on_after(max(self.bound - (time.monotonic() - turn.queued), 0.0)):
                    await turn.ready.wait()
                tasks.cancel_scope.cancel()
        finally:
            if turn.granted is None:
                with suppress(ValueError):
                    self.waiting.remove(turn)
                    self.metrics.queued_streams.dec()
            elif left:
                self.set_up(turn)  # granted as its client left: the next one may start
        if left:
            raise ClientLeft()
        if turn.granted is None:
            if not self.shedder.admits(self.open_streams()):
                raise StartRefused()
            # The bound passed, but the worker keeps time: the set-ups ahead of it were slow (a
            # busy machine, a slow upstream head), not the worker late. It starts now.
            self.grant(turn)
        return turn

    def can_start(self) -> bool:
        now = time.monotonic()
        while self.setting_up and (self.setting_up[0].set_up_at is not None or now - (self.setting_up[0].granted or now) > SETUP_SECONDS):
            self.measure(self.setting_up.popleft(), now)
        if len(self.setting_up) >= START_SETUPS:
            return False
        if not self.shedder.admits(self.open_streams()):
            if self.held_since is None:
                self.held_since = now
            return False
        self.held_since = None
        return True

    def measure(self, turn: Turn, now: float) -> None:
        """Learn from a finished set-up how long one takes (one still going past SETUP_SECONDS
        counts as that long)."""
        if turn.granted is not None:
            took = min((turn.set_up_at or now) - turn.granted, SETUP_SECONDS)
            self.setup_seconds += (took - self.setup_seconds) * 0.2

    def grant(self, turn: Turn) -> None:
        now = turn.granted = time.monotonic()
        self.setting_up.append(turn)
        self.longest_wait = max(self.longest_wait, now - turn.queued)
        self.metrics.queue_wait.observe(now - turn.queued)
        turn.ready.set()

    def set_up(self, turn: Turn) -> None:
        """The stream's first upstream call answered, or failed: the next one may start."""
        if turn.set_up_at is None:
            turn.set_up_at = time.monotonic()
        self.dispatch()

    def dispatch(self) -> None:
        """Start waiting streams while the worker can: after each set-up and each probe."""
        while self.waiting and self.can_start():
            self.grant(self.waiting.popleft())
            self.metrics.queued_streams.dec()

    def report(self) -> dict[str, Any]:
        longest, self.longest_wait = self.longest_wait, 0.0
        return {"queued": len(self.waiting), "queue_wait_ms": round(longest * 1000, 1)}


class StartRefused(Exception):
    """A new stream did not get its turn to start within START_QUEUE_MS."""


class ClientLeft(Exception):
    """The client of a new stream left while it waited for its turn."""


RETRY_AFTER_MS = (500, 1500)  # the spread of the retry hint a refusal under load gives


def retry_hint(seconds: float | None = None) -> dict[str, str]:
    """When a refused client should retry: Retry-After and Retry-After-Ms (which the OpenAI SDKs
    read first). After `seconds`, when the refusal knows that (a rate limit refills); else under
    load, where the clients of one burst are refused together and, told the same second, would
    all come back in the same instant and be refused together again: Retry-After says one second,
    and Retry-After-Ms spreads them around it."""
    if seconds is not None:
        return {"Retry-After": str(max(1, math.ceil(seconds))), "Retry-After-Ms": str(max(1, math.ceil(seconds * 1000)))}
    delay = random.randint(*RETRY_AFTER_MS)  # not secrets: nobody gains by guessing it
    return {"Retry-After": "1", "Retry-After-Ms": str(delay)}


class Slot:
    """A place among MAX_STREAMS upstream calls, held from admission to the response's end."""

    def __init__(self, limiter: anyio.CapacityLimiter, metrics: Metrics) -> None:
        self._limiter = limiter
        try:
            limiter.acquire_on_behalf_of_nowait(self)
        except anyio.WouldBlock:
            raise Slot.refusal(limiter, metrics) from None
        self._held = True
        self.on_release: Callable[[], None] | None = None  # what else the request holds: its key's reservation

    @staticmethod
    def refusal(limiter: anyio.CapacityLimiter, metrics: Metrics) -> ServiceError:
        metrics.rejected.inc()
        return ServiceError(
            503,
            f"The service is serving its maximum of {int(limiter.total_tokens)} streams; retry shortly.",
            "server_busy",
            "capacity_exceeded",
            headers=retry_hint(),
        )

    def release(self) -> None:
        if self._held:
            self._held = False
            self._limiter.release_on_behalf_of(self)
            if self.on_release is not None:
                self.on_release()
