"""Fallback upstreams and circuit breaking: when an upstream fails before the answer starts, the
next one answers, and the client sees one clean stream from one upstream.

One upstream is one point of failure: a 500, a 429 or a refused connection before the first token
gave the reader an error although another deployment could have answered. So the upstreams are
asked in order (OPENAI_BASE_URL, then FALLBACK_BASE_URLS), and a request moves on only while
nothing of its answer has been sent:

- before the response starts (`FallbackCall.open`): a connection error, a timeout, a 5xx or a 429
  moves it to the next upstream; an error that is the request's own (400, 401, 404, 413, 422...)
  does not, since every upstream would refuse it too;
- after the response started, before the first output (`FallbackCall.events`): the preamble
  (response.created, response.in_progress, the output items and parts announced, a role-only
  chat chunk; comments are never relayed) is held back, and an error event, response.failed, a
  chat error object, a broken connection, a silence past the deadline, or an end without any
  output moves the request on, the held preamble dropped. The first real output leaves with what
  was held, in the same thread hop: a healthy upstream's first token waits for nothing;
- after the first output there is no switch: the stream ends as it does with one upstream.

All the attempts of a request are one UpstreamCall, so aborting it (the client left, a shutdown,
MAX_STREAM_SECONDS) stops whichever upstream is being asked, also in the middle of a switch.

Each upstream has a breaker: BREAKER_FAILURES failures within BREAKER_WINDOW_SECONDS open it, and
it is skipped for BREAKER_COOLDOWN_SECONDS; then one request probes it, and its outcome closes the
breaker or opens it again. A breaker never refuses a request by itself: when every upstream's is
open, they are all asked in order anyway. With one upstream nothing here changes what it does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import anyio.from_thread
import httpx2
import orjson
import prometheus_client

from relay.config import Settings
from relay.errors import ServiceError, StreamFailure
from relay.events import DONE, event_data, upstream_events
from relay.observability import Metrics
from relay.tracing import observed
from relay.upstream import Opener, UpstreamCall, UpstreamClient, make_openai_client

log = logging.getLogger(__name__)

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"
OUTPUT, FAILED = "output", "failed"  # what decided an attempt: its first output, or a failure before it
HELD_EVENTS = 256  # a preamble longer than this, or larger than HELD_BYTES, is sent on, and its upstream kept
HELD_BYTES = 4 * 1024 * 1024  # response.created repeats the request's instructions and tools
# Responses events that announce an answer without saying any of it.
PREAMBLE_TYPES = frozenset(
    {"response.created", "response.in_progress", "response.queued", "response.output_item.added", "response.content_part.added"}
)
EMPTY_VALUES = (None, "", [], {})


class Breaker:
    """Whether an upstream is asked: closed, yes; open, not before the cool-down is over; half-open,
    by one request (the probe), whose outcome closes the breaker or opens it again. Used from the
    event loop and from worker threads alike."""

    def __init__(self, failures: int, window: float, cooldown: float) -> None:
        self.threshold, self.window, self.cooldown = failures, window, cooldown  # threshold 0: never opens
        self._lock = threading.Lock()
        self._state = CLOSED
        self._recent: deque[float] = deque()  # times of the failures within the window
        self._since = 0.0  # when it opened, or when its probe went out
        self._probing = False
        self.failures = self.opened = self.skipped = self.passed_on = 0

    def _current(self, now: float) -> str:
        if self._state == OPEN and now - self._since >= self.cooldown:
            self._state, self._probing = HALF_OPEN, False
        elif self._state == HALF_OPEN and self._probing and now - self._since >= self.cooldown:
            self._probing = False  # its probe never said how it went (its stream was dropped): another may try
        return self._state

    def state(self, now: float) -> str:
        with self._lock:
            return self._current(now)

    def would_ask(self, now: float) -> bool:
        """Whether `ask` would let a request through now, without taking the probe."""
        with self._lock:
            state = self._current(now)
            return state == CLOSED or (state == HALF_OPEN and not self._probing)

    def ask(self, now: float) -> bool | None:
        """None: skip the upstream now; True: ask it, as the probe of a half-open breaker; False: ask it."""
        with self._lock:
            state = self._current(now)
            if state == CLOSED:
                return False
            if state == HALF_OPEN and not self._probing:
                self._probing, self._since = True, now
                return True
            self.skipped += 1
            return None

    def record(self, probe: bool, failed: bool | None, now: float) -> None:
        """An attempt's outcome: failed before its first output (True), answered (False), or
        neither (None: the client left, or the request was refused for its own fault)."""
        with self._lock:
            if probe:
                self._probing = False
            if failed is None:
                return
            if not failed:
                self._state = CLOSED
                self._recent.clear()
                return
            self.failures += 1
            if self.threshold == 0:
                return
            if self._state != CLOSED:  # the probe failed (or a request asked it with every breaker open)
                self._state, self._since = OPEN, now
                return
            self._recent.append(now)
            while now - self._recent[0] > self.window:
                self._recent.popleft()
            if len(self._recent) >= self.threshold:
                log.warning("an upstream failed %d times within %g s: it is skipped for %g s", len(self._recent), self.window, self.cooldown)
                self._state, self._since = OPEN, now
                self.opened += 1
                self._recent.clear()

    def passed(self) -> None:
        with self._lock:
            self.passed_on += 1


@dataclass
class Upstream:
    """One upstream as requests see it: its name in logs and metrics (never its URL or key), its
    client, how the requested model is named there, and its breaker."""

    name: str
    client: UpstreamClient
    models: tuple[tuple[str, str], ...]
    breaker: Breaker

    def body(self, body: dict[str, Any]) -> dict[str, Any]:
        """The request as this upstream is asked it: the model renamed as FALLBACK_MODELS says."""
        requested = body.get("model")
        for pattern, used in self.models:
            if pattern in ("*", requested):
                return body if used == requested else {**body, "model": used}
        return body


class Upstreams:
    """Every upstream of the app, in the order they are asked, with their breakers and metrics."""

    def __init__(self, settings: Settings, primary_base_url: str | None, metrics: Metrics) -> None:
        self.settings = settings
        several = bool(settings.fallbacks)
        # With one upstream there is nothing to skip to: its breaker never opens.
        failures = settings.breaker_failures if several else 0
        breakers = [Breaker(failures, settings.breaker_window_seconds, settings.breaker_cooldown_seconds) for _ in range(1 + len(settings.fallbacks))]
        self.all = [Upstream("primary", make_openai_client(settings, primary_base_url), (), breakers[0])]
        for number, fallback in enumerate(settings.fallbacks, 1):
            client = make_openai_client(settings, fallback.base_url, fallback.api_key)
            self.all.append(Upstream(f"fallback-{number}", client, fallback.models, breakers[number]))
        self.several = several
        registry = metrics.registry
        self.failures = prometheus_client.Counter(
            "relay_upstream_failures", "Upstream attempts that failed before the answer started.", ["upstream"], registry=registry
        )
        self.fallbacks = prometheus_client.Counter(
            "relay_upstream_fallbacks", "Requests an upstream passed on to the next one: it failed before the answer started, or its breaker was open.",
            ["upstream"], registry=registry,
        )
        self.states = prometheus_client.Gauge(
            "relay_upstream_state", "Worker processes whose breaker for the upstream is in this state.", ["upstream", "state"],
            multiprocess_mode="livesum", registry=registry,
        )
        self._shown: dict[str, str] = {}  # the state each gauge shows
        self._showing = threading.Lock()  # worker threads refresh too
        self.refresh()

    def call(self, opener: Opener, body: dict[str, Any]) -> FallbackCall:
        """The upstream calls of one request, not started yet."""
        return FallbackCall(self, opener, body)

    def refresh(self) -> None:
        """Bring the state gauges up to date (an open breaker turns half-open by the clock alone)."""
        now = time.monotonic()
        with self._showing:
            for upstream in self.all:
                state = upstream.breaker.state(now)
                shown = self._shown.get(upstream.name)
                if state != shown:
                    if shown is not None:
                        self.states.labels(upstream.name, shown).set(0)
                    self.states.labels(upstream.name, state).set(1)
                    self._shown[upstream.name] = state

    def report(self) -> list[dict[str, Any]]:
        """For /healthz: each upstream's breaker and what it cost, by name."""
        self.refresh()
        now = time.monotonic()
        return [
            {"name": upstream.name, "state": upstream.breaker.state(now), "failures": upstream.breaker.failures,
             "opened": upstream.breaker.opened, "skipped": upstream.breaker.skipped, "fallbacks": upstream.breaker.passed_on}
            for upstream in self.all
        ]

    def passed_on(self, upstream: Upstream) -> None:
        upstream.breaker.passed()
        self.fallbacks.labels(upstream.name).inc()

    def close(self) -> None:
        for upstream in self.all:
            upstream.client.close()


class FallbackCall(UpstreamCall):
    """The upstream calls of one request (or one round of a /chat answer), one upstream after the
    other until one answers. One UpstreamCall, so that aborting it stops whichever is being asked.

    `attempts` is what the log line shows of them: upstream, status, ms to its verdict, and error."""

    def __init__(self, upstreams: Upstreams, opener: Opener, body: dict[str, Any], first: Upstream | None = None,
                 attempts: list[dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.upstreams, self.opener, self.body = upstreams, opener, body
        self.attempts = [] if attempts is None else attempts
        self.log = self.attempts if upstreams.several else None
        self._queue = [upstream for upstream in upstreams.all if upstream is not first]  # not asked yet, in order
        self._forced = False
        self._probe = False
        self._attempt: dict[str, Any] = {}
        self._started = 0.0
        self._settled = True  # whether the breaker was told how the current attempt went
        self.committed = False  # whether any of the current upstream's answer was sent: then no switch
        self.upstream = first or upstreams.all[0]  # the one being asked; first: a continuation's, the one that answered before
        if first is None:
            now = time.monotonic()
            self._forced = not any(upstream.breaker.would_ask(now) for upstream in self._queue)
            self._take_next(None)

    def _take_next(self, leaving: Upstream | None) -> bool:
        """Make the next upstream whose breaker lets it be asked the current one; False if none is left."""
        now = time.monotonic()
        while self._queue:
            upstream = self._queue.pop(0)
            probe = False if self._forced else upstream.breaker.ask(now)
            if probe is None:
                self.upstreams.passed_on(upstream)
                continue
            if leaving is not None:
                self.upstreams.passed_on(leaving)
            self.upstream, self._probe = upstream, probe
            return True
        return False

    def _can_switch(self) -> bool:
        now = time.monotonic()
        return not self.committed and any(self._forced or upstream.breaker.would_ask(now) for upstream in self._queue)

    def _begin(self) -> None:
        self._started = time.monotonic()
        self._settled, self.committed = False, False
        self._attempt = {"upstream": self.upstream.name, "status": None, "ms": None}
        self.attempts.append(self._attempt)
        seconds = self.upstreams.settings.fallback_first_output_seconds
        # Only while another upstream could answer instead: the last one may take the time it needs.
        streamed = bool(self.body.get("stream"))
        self.first_output_by = self._started + seconds if seconds and streamed and self._can_switch() else None

    def _settle(self, failed: bool | None, error: str | None = None) -> None:
        """Tell the breaker how the current attempt went, once, and note it for the log line."""
        if self._settled:
            return
        self._settled = True
        self.first_output_by = None
        now = time.monotonic()
        self._attempt["ms"] = round((now - self._started) * 1000, 1)
        if error is not None:
            self._attempt["error"] = error
        if failed:
            self.upstreams.failures.labels(self.upstream.name).inc()
        self.upstream.breaker.record(self._probe, failed, now)
        self.upstreams.refresh()

    async def open(self) -> httpx2.Response:
        """Ask the upstreams in turn until one answers with its head (without streaming, with its
        whole answer). An error that is the request's own, or the last upstream's, is raised."""
        while True:
            upstream = self.upstream
            self._begin()
            try:
                response = await self.opener(upstream.client, self, upstream.body(self.body))
            except ServiceError as error:
                status, switches = judge_refusal(error)
                self._attempt["status"] = status
                self._settle(switches if switches else None, str(error.code or error.type))
                if switches and self._take_next(upstream):
                    continue
                raise
            except BaseException:
                self._settle(None)  # the client left, or the request was cancelled: no verdict
                raise
            self._attempt["status"] = response.status_code
            if not self.body.get("stream"):
                self._settle(False)
            return response

    def events(self, response: httpx2.Response, whole_events: bool = False) -> Iterator[list[bytes]]:
        """The upstream's events as the client gets them, one list per network read (see
        upstream_events): the current upstream's, its preamble held back while another could
        still answer instead, and the next upstream's if it fails before its first output. Runs
        in worker threads."""
        try:
            answering: httpx2.Response | None = response
            while answering is not None:
                answering = yield from self._relay(answering, whole_events)
        finally:
            self._settle(None)  # the stream was dropped before any verdict (the client left, a shutdown)

    def _relay(self, response: httpx2.Response, whole_events: bool) -> Generator[list[bytes], None, httpx2.Response | None]:
        """One upstream's events; the next upstream's response if this one failed and another may answer."""
        held: list[bytes] = []
        held_bytes = 0
        switching = False
        batches = upstream_events(self, response, whole_events)
        try:
            for payloads in batches:
                if self._settled:
                    yield payloads  # the verdict is in: nothing more is looked at
                    continue
                verdict, why = judge(payloads, whole_events)
                if verdict == FAILED:
                    if self._failed(why):
                        switching = True
                        break
                elif verdict == OUTPUT:
                    self._settle(False)
                elif self._can_switch() and len(held) + len(payloads) <= HELD_EVENTS and held_bytes + sum(map(len, payloads)) <= HELD_BYTES:
                    held += payloads
                    held_bytes += sum(map(len, payloads))
                    self.waited(time.monotonic())  # held on purpose, not late: the load shedder must not count it
                    continue
                self.committed, self.first_output_by = True, None  # the client has it: no switch, so no deadline either
                yield held + payloads if held else payloads
                held = []
            else:
                if not self._settled:  # the upstream ended its stream without any output
                    switching = self._failed("no_output")
        except StreamFailure as failure:  # the connection broke, a timeout, an event too large
            if not self._failed(failure.type):
                if held:
                    yield held
                raise
            switching = True
        finally:
            batches.close()  # before the next upstream is asked: the failed call ends here, its connection closed
        if switching:
            return self._switch()
        if held:
            yield held  # for the framing to tell the client what was wrong with it
        return None

    def _failed(self, why: str) -> bool:
        """The upstream failed before its first output (`why`): whether the next one is asked."""
        self._settle(True, why)
        return not self.committed and self._take_next(self.upstream)

    def _switch(self) -> httpx2.Response:
        """Ask the next upstreams, as before the response started (in the event loop, with this
        worker thread waiting); the client's response has started, so their failure ends it."""
        try:
            return anyio.from_thread.run(self.open)
        except ServiceError as error:
            kind = error.type if error.type in ("upstream_error", "upstream_timeout") else "upstream_error"
            raise StreamFailure(kind, error.message, None if error.code is None else str(error.code)) from None

    def next_round(self, body: dict[str, Any]) -> FallbackCall:
        """The calls for the next round of the same answer (a /chat continuation): the upstream that
        answered this round is asked first."""
        return FallbackCall(self.upstreams, self.opener, body, first=self.upstream, attempts=self.attempts)


def answer_events(call: UpstreamCall, response: httpx2.Response, whole_events: bool = False) -> Iterator[list[bytes]]:
    """The upstream's events as the client gets them: `upstream_events`, from whichever upstream
    answers when `call` may fall back to another, each batch shown to the call's trace first."""
    if isinstance(call, FallbackCall) and call.upstreams.several:
        return observed(call, call.events(response, whole_events))
    return observed(call, upstream_events(call, response, whole_events))


def judge_refusal(error: ServiceError) -> tuple[int | None, bool]:
    """The upstream's HTTP status, if it answered one, and whether the next upstream is asked:
    after a connection error, a timeout, a 5xx, a 408 or a 429, not after an error that is the
    request's own (or the operator's: credentials), which every upstream would answer alike."""
    status = error.upstream_status
    if status is not None:
        return status, status >= 500 or status in (408, 429)
    return None, error.code in ("upstream_timeout", "upstream_unreachable")  # no answer at all


def judge(payloads: list[bytes], whole_events: bool) -> tuple[str | None, str | None]:
    """Whether `payloads` (data payloads, or whole events with `whole_events`) hold an answer's first
    output (OUTPUT) or a failure before it (FAILED), whichever comes first, and which failure;
    (None, None) for a preamble. `[DONE]` is output: the answer is whole, if empty."""
    for payload in payloads:
        data = event_data(payload) if whole_events else payload
        if data == DONE:
            return OUTPUT, None
        try:
            parsed = orjson.loads(data)
        except ValueError:
            return FAILED, "not_json"
        if not isinstance(parsed, dict):
            return FAILED, "not_json"
        verdict = judge_event(parsed) if whole_events else judge_chunk(parsed)
        if verdict[0] is not None:
            return verdict
    return None, None


def judge_chunk(chunk: dict[str, Any]) -> tuple[str | None, str | None]:
    """One chat completion chunk: an error object fails; a delta with anything but its role, or a
    finish reason, is output; a role-only chunk, or one without choices, is preamble."""
    if chunk.get("error") is not None:
        return FAILED, "error_object"
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict) or choice.get("finish_reason") is not None:
            return OUTPUT, None
        delta = choice.get("delta")
        if not isinstance(delta, dict) or any(value not in EMPTY_VALUES for name, value in delta.items() if name != "role"):
            return OUTPUT, None
    return None, None


def judge_event(event: dict[str, Any]) -> tuple[str | None, str | None]:
    """One Responses API event: an error event (flat or nested) or response.failed fails; the
    announcements of PREAMBLE_TYPES are preamble; anything else is output."""
    kind = event.get("type")
    if kind == "error" or (kind is None and event.get("error") is not None):
        return FAILED, "error_event"
    if kind == "response.failed":
        return FAILED, "response.failed"
    return (None, None) if kind in PREAMBLE_TYPES else (OUTPUT, None)
