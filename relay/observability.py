"""Observability: one JSON log line per request when it ends, and Prometheus metrics that add up
every worker's counts, however the workers were started.

A stream id is a capability (whoever has it may read the answer), so logs show only its digest.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import re
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import prometheus_client
import prometheus_client.multiprocess
import prometheus_client.values
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from relay.config import Settings

log = logging.getLogger(__name__)
requests_log = logging.getLogger("relay.requests")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


class RequestIds:
    """Ids for requests that bring none: 32 hex digits, a random half of the process's own and a
    count. uuid4() asks the kernel for 16 random bytes each time, a tenth of what a refusal under
    overload costs; an id needs to be unique, not unguessable. A forked child draws its own half."""

    def __init__(self) -> None:
        self.forget()
        os.register_at_fork(after_in_child=self.forget)

    def forget(self) -> None:
        self.prefix = ""  # drawn at the first id
        self.counter = itertools.count()

    def new(self) -> str:
        if not self.prefix:
            self.prefix = secrets.token_hex(8)
        return f"{self.prefix}{next(self.counter) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


request_ids = RequestIds()
OUTCOMES = {
    "upstream_error": "upstream_error",
    "upstream_timeout": "timeout",
    "stream_timeout": "timeout",
    "shutdown": "shutdown",
    "server_error": "error",
    "cancelled": "cancelled",
    "abandoned": "client_disconnected",
    "replay_unavailable": "error",
}


class Metrics:
    """The Prometheus metrics of one app (its own registry, so that importing the module twice,
    as `python service.py` and uvicorn do, registers nothing twice)."""

    def __init__(self) -> None:
        self.shared_directory = shared_metrics_directory()
        if self.shared_directory is not None and not getattr(prometheus_client.values.ValueClass, "_multiprocess", False):
            # prometheus_client chose its value class when it was imported, before the
            # environment said anything: each metric made from now on writes to the shared folder.
            prometheus_client.values.ValueClass = prometheus_client.values.MultiProcessValue()
        registry = self.registry = prometheus_client.CollectorRegistry()
        self.active_streams = prometheus_client.Gauge(
            "relay_active_streams", "Streams being relayed now.", multiprocess_mode="livesum", registry=registry
        )
        self.requests = prometheus_client.Counter(
            "relay_requests", "Requests by route, status and how they ended.", ["route", "status", "outcome"], registry=registry
        )
        self.time_to_first_token = prometheus_client.Histogram(
            "relay_time_to_first_token_seconds", "From the request to the first piece of the answer sent.", ["route"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120), registry=registry,
        )
        self.stream_duration = prometheus_client.Histogram(
            "relay_stream_duration_seconds", "From the request to the stream's end.", ["route"],
            buckets=(0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320, 640), registry=registry,
        )
        self.tokens = prometheus_client.Counter("relay_tokens_streamed", "Pieces of answers sent to clients.", ["route"], registry=registry)
        self.completion_tokens = prometheus_client.Counter(
            "relay_completion_tokens", "Completion tokens of answers: the upstream's usage, or the pieces relayed (estimated).",
            ["route", "estimated"], registry=registry,
        )
        self.upstream_errors = prometheus_client.Counter("relay_upstream_errors", "Upstream failures by kind.", ["kind"], registry=registry)
        self.rejected = prometheus_client.Counter(
            "relay_rejected_for_capacity", "Requests refused because MAX_STREAMS were open.", registry=registry
        )
        self.shed = prometheus_client.Counter(
            "relay_shed", "New streams refused because the service could not have relayed them on time.", registry=registry
        )
        self.queued_streams = prometheus_client.Gauge(
            "relay_queued_streams", "New streams waiting for their turn to start.", multiprocess_mode="livesum", registry=registry
        )
        self.queue_wait = prometheus_client.Histogram(
            "relay_queue_wait_seconds", "How long new streams waited for their turn to start.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1), registry=registry,
        )

    def exposition(self) -> bytes:
        registry = self.registry
        if self.shared_directory is not None:  # several workers: add up what each one wrote
            registry = prometheus_client.CollectorRegistry()
            prometheus_client.multiprocess.MultiProcessCollector(registry, path=self.shared_directory)
        return prometheus_client.generate_latest(registry)

    def close(self) -> None:
        """This process stops serving: its streams no longer count as open anywhere."""
        if self.shared_directory is not None:
            prometheus_client.multiprocess.mark_process_dead(os.getpid(), self.shared_directory)


def shared_metrics_directory() -> str | None:
    """Where this process and the other workers of its server write their metrics for each other,
    if it is one of several: PROMETHEUS_MULTIPROC_DIR when set, else a folder of its own for the
    process that started the workers (uvicorn's supervisor, under `python service.py` with
    WEB_CONCURRENCY and `uvicorn --workers` alike, or gunicorn's arbiter), named by that process's
    id and start time."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        return given
    if multiprocessing.parent_process() is None and "gunicorn.arbiter" not in sys.modules:
        return None  # the only worker: its own counts are all there is
    parent = os.getppid()
    try:
        started = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "0"  # not Linux: the id alone
    directory = Path(tempfile.gettempdir()) / f"relay-metrics-{os.getuid()}-{parent}-{started}"
    directory.mkdir(mode=0o700, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)  # where prometheus_client's values write
    return str(directory)


@dataclass
class Exchange:
    """One request as the log line and the metrics describe it."""

    request_id: str
    method: str
    path: str
    started: float
    status: int = 0
    outcome: str | None = None
    model: str | None = None
    first_token_at: float | None = None
    chunks: int = 0
    usage: dict[str, Any] | None = None
    prompt: Any = None
    completion: str | None = None
    upstreams: list[dict[str, Any]] | None = None  # with fallbacks: every upstream asked (relay.fallback)
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # for the response's head: the key's rate limits

    def pieces_sent(self, count: int) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.chunks += count

    def ended_as(self) -> str:
        """How the request ended, as its log line says (relay.tracing's spans say it too)."""
        return self.outcome or self._outcome_from_status()

    def record(self, settings: Settings, metrics: Metrics) -> None:
        ended = time.monotonic()
        outcome = self.ended_as()
        route = self.path if self.path in ROUTES_MEASURED else "other"
        completion_tokens = (self.usage or {}).get("completion_tokens")
        estimated = bool((self.usage or {}).get("estimated"))
        line: dict[str, Any] = {
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "outcome": outcome,
            "model": self.model,
            "ttft_ms": None if self.first_token_at is None else round((self.first_token_at - self.started) * 1000, 1),
            "chunks": self.chunks,
            "completion_tokens": completion_tokens,
            "estimated": estimated,
            "duration_ms": round((ended - self.started) * 1000, 1),
        }
        if self.upstreams is not None:
            line["upstreams"] = self.upstreams
        if settings.log_content:
            line["prompt"], line["completion"] = self.prompt, self.completion
        write_log_line(line)
        metrics.requests.labels(route, str(self.status), outcome).inc()
        if isinstance(completion_tokens, int) and completion_tokens > 0:
            metrics.completion_tokens.labels(route, str(estimated).lower()).inc(completion_tokens)
        if self.chunks:
            metrics.tokens.labels(route).inc(self.chunks)
            metrics.stream_duration.labels(route).observe(ended - self.started)
        if self.first_token_at is not None:
            metrics.time_to_first_token.labels(route).observe(self.first_token_at - self.started)
        if outcome in ("upstream_error", "timeout"):
            metrics.upstream_errors.labels(outcome).inc()

    def _outcome_from_status(self) -> str:
        if self.status == 499:
            return "client_disconnected"
        if 0 < self.status < 400:
            return "completed"
        return "rejected" if 400 <= self.status < 500 or self.status == 503 else "error"


ROUTES_MEASURED = {"/chat", "/v1/chat/completions", "/v1/responses"}
# Scope key the serving layer sets when it ended an exchange itself (a stalled client, a request
# past its deadline): (status, or None if the response had started, and outcome).
CONNECTION_VERDICT = "relay.connection_verdict"
# Scope key the serving layer sets on every request it parsed: the app then knows that the
# connection's own bounds (head size, idle and half-sent connections, descriptors) are kept.
SERVING_LAYER = "relay.serving_layer"
WITHOUT_SERVING_LAYER = (
    "Served without the serving layer (relay.serving.ServingProtocol): the app enforces its write and "
    "request-body deadlines, limits and shedding, but nothing bounds the size of a request head, a head "
    "that never ends, or the number of connections. Start it with `python service.py`, or with "
    "`uvicorn service:app --http relay.serving:ServingProtocol`."
)


def write_log_line(line: dict[str, Any]) -> None:
    """One request's line, always valid UTF-8 JSON: text the client sent may hold lone surrogates,
    which only \\u escapes can carry."""
    if not requests_log.isEnabledFor(logging.INFO):
        return  # not encoded for nothing, on every refusal too
    text = json.dumps(line, ensure_ascii=False)
    try:
        text.encode()
    except UnicodeEncodeError:
        text = json.dumps(line)
    requests_log.info(text)


def log_connection_answer(status: int, outcome: str) -> None:
    """The line for a response the serving layer wrote before any route saw a whole request."""
    write_log_line({"request_id": request_ids.new(), "method": None, "path": None, "status": status, "outcome": outcome})


def stream_digest(stream_id: str) -> str:
    """What logs and Redis keys show of a stream id: naming the answer, useless for resuming it."""
    return hashlib.sha256(stream_id.encode()).hexdigest()[:32]


STREAM_PATH = re.compile(r"/chat/streams/([^/]*)")


def loggable_path(path: str) -> str:
    """The path as logs show it: a stream id is a capability, so only its digest appears."""
    matched = STREAM_PATH.fullmatch(path)
    return path if matched is None else f"/chat/streams/{stream_digest(matched[1])[:12]}"


def exchange_of(request: Request) -> Exchange:
    exchange: Exchange = request.scope["state"]["exchange"]
    return exchange


class RequestLog:
    """Pure ASGI middleware: gives each request an Exchange and an X-Request-ID, and records it
    when the response is over. It only watches messages go by; it never holds a body back."""

    def __init__(self, app: ASGIApp, settings: Settings, metrics: Metrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self.warned = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if not self.warned and SERVING_LAYER not in scope:
            self.warned = True
            log.warning(WITHOUT_SERVING_LAYER)
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if REQUEST_ID.fullmatch(incoming) else request_ids.new()
        exchange = Exchange(request_id, scope["method"], loggable_path(scope["path"]), time.monotonic())
        scope.setdefault("state", {})["exchange"] = exchange

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode()), *exchange.response_headers]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if exchange.status == 0:  # the error handler outside this middleware answers 500
                exchange.status = 500
            raise
        finally:
            verdict = scope.get(CONNECTION_VERDICT)
            if verdict is not None:
                exchange.status = verdict[0] or exchange.status
                exchange.outcome = verdict[1]
            exchange.record(self.settings, self.metrics)

