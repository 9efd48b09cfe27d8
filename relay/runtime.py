"""The runtime of one app: what its routes share (settings, metrics, the upstream client, the
stream limiter and load shedder, the replay store, the answers being produced), and its life from
start-up to shutdown, however the app is served."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import anyio.abc
import anyio.to_thread

from relay.admission import LoadShedder, StartQueue
from relay.config import Settings
from relay.demo import DemoModel
from relay.errors import StreamFailure
from relay.fallback import Upstreams
from relay.limits import KeyLimits, make_key_limits
from relay.observability import Metrics, requests_log
from relay.placement import placement
from relay.replay import ReplayStore, make_replay_store
from relay.tracing import Telemetry
from relay.upstream import UpstreamClient

log = logging.getLogger(__name__)


class Stoppable(Protocol):
    """An answer being produced, as the runtime stops it at shutdown and the routes on request."""

    def stop(self, reason: StreamFailure) -> None: ...

    def cancel(self) -> None: ...


MODELS_CACHE_SECONDS = 10.0  # a UI that polls the model list must not poll the upstream


MODELS_CACHE_ENTRIES = 256


class ModelsCache:
    """Recent upstream answers to GET /v1/models and /v1/models/{id}, by path, for a few seconds."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, bytes]] = {}

    def get(self, path: str) -> bytes | None:
        expires, body = self._entries.get(path, (0.0, b""))
        return body if expires > time.monotonic() else None

    def put(self, path: str, body: bytes) -> None:
        if len(self._entries) >= MODELS_CACHE_ENTRIES:
            self._entries.clear()  # many ids asked for: start over rather than grow
        self._entries[path] = (time.monotonic() + MODELS_CACHE_SECONDS, body)


@dataclass
class Runtime:
    """What the routes share: built at start-up by `running()`."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    upstreams: Upstreams | None = None  # the primary first, then the fallbacks
    streams: anyio.CapacityLimiter | None = None
    shedder: LoadShedder | None = None
    starts: StartQueue | None = None
    shutting_down: anyio.Event | None = None
    demo: DemoModel | None = None
    model_listings: ModelsCache = field(default_factory=ModelsCache)
    replay: ReplayStore | None = None
    limits: KeyLimits | None = None  # each client key's limits
    telemetry: Telemetry | None = None  # OpenTelemetry, when OTEL_* turn it on (relay.tracing)
    producers: dict[str, Stoppable] = field(default_factory=dict)  # the answers this process reads from the upstream
    producing: anyio.abc.TaskGroup | None = None  # where they run: they outlive the request that started them

    @property
    def client(self) -> UpstreamClient | None:
        """The primary upstream's client, for the routes that do not fall back."""
        return None if self.upstreams is None else self.upstreams.all[0].client

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Start everything the routes use, and at shutdown stop it: the app's lifespan."""
        settings = self.settings
        # Each open stream keeps a worker thread waiting on the upstream; anyio's default 40 would
        # make the 41st stream (and every other thread-using route) wait in silence.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.max_streams + 40
        streams = self.streams = anyio.CapacityLimiter(settings.max_streams)
        self.shedder = LoadShedder(settings.shed_lag_seconds, settings.max_streams)
        self.starts = StartQueue(
            self.shedder, settings.start_queue_seconds, settings.start_queue_length, lambda: int(streams.borrowed_tokens), self.metrics
        )
        self.shutting_down = anyio.Event()
        notice_shutdown_signals(self.shutting_down.set)
        configure_logging(settings)
        if self.telemetry is not None:
            self.telemetry.start(self.metrics)
        if settings.pin_workers:
            cpu = placement.pin()
            if cpu is not None:
                log.info("worker process %d: its threads run on CPU %d (PIN_WORKERS=1)", os.getpid(), cpu)
        if settings.demo:
            self.demo = DemoModel(settings.demo_seconds_per_word).start()
            log.warning("No OPENAI_API_KEY or OPENAI_BASE_URL: answering from the built-in DEMO model (not a real model).")
        self.upstreams = Upstreams(settings, self.demo.base_url if self.demo else settings.openai_base_url, self.metrics)
        self.replay = make_replay_store(settings)
        limits = self.limits = make_key_limits(settings, self.metrics)
        # Everything built so far lives as long as the process: the cyclic collector need not walk
        # it again, and with a higher first threshold it runs less often under per-token garbage.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
        background = [
            asyncio.ensure_future(self.shedder.run(lambda: int(streams.borrowed_tokens))),
            asyncio.ensure_future(keep_worker_threads_ready()),
        ]
        try:
            await self.replay.start()
            await limits.start()
            async with anyio.create_task_group() as self.producing:
                try:
                    yield
                finally:
                    # Answers nobody reads any more (the server waited for the readers) end here.
                    for producer in list(self.producers.values()):
                        producer.stop(cut_short(settings, shutdown=True))
        finally:
            for task in background:
                task.cancel()
            if self.telemetry is not None:
                await self.telemetry.stop()  # every stream has ended: their spans are queued
            await limits.close()  # settles what is still open
            await self.replay.close()
            self.upstreams.close()
            if self.demo is not None:
                self.demo.stop()
            self.metrics.close()


def cut_short(settings: Settings, shutdown: bool) -> StreamFailure:
    """Why a stream ends before its answer does: a shutdown, or MAX_STREAM_SECONDS."""
    if shutdown:
        return StreamFailure("shutdown", "The service is restarting; the answer was cut short. Retry the request.")
    return StreamFailure("stream_timeout", f"The answer took longer than MAX_STREAM_SECONDS ({settings.max_stream_seconds:g} s).")


THREADS_READY = 64  # idle worker threads kept ready for new streams
THREADS_REFRESH_SECONDS = 5  # anyio retires a thread idle for 10 s
GC_THRESHOLD = 20_000  # allocations between young-generation collections (Python's default: 700)


async def keep_worker_threads_ready() -> None:
    """Keep THREADS_READY worker threads started and idle, so that a burst of new streams does not
    also pay for starting threads (anyio starts one whenever none is idle, and retires idle ones)."""

    async def nothing() -> None:
        await anyio.to_thread.run_sync(lambda: None)

    while True:
        async with anyio.create_task_group() as tasks:
            for _ in range(THREADS_READY):
                tasks.start_soon(nothing)
        await anyio.sleep(THREADS_REFRESH_SECONDS)


def notice_shutdown_signals(on_signal: Callable[[], None]) -> None:
    """Learn of SIGTERM/SIGINT while the server handles them: it stops accepting and waits for
    open responses; this tells those responses to finish within SHUTDOWN_GRACE_SECONDS."""
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread receives signals (an embedded server in tests)
    loop = asyncio.get_running_loop()
    for number in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(number)

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            loop.call_soon_threadsafe(on_signal)
            if callable(previous):
                previous(signum, frame)

        signal.signal(number, handler)


class UvicornNoise(logging.Filter):
    """Drops two uvicorn messages that would mislead an operator: the demo model's own server
    start-up ("Uvicorn running on <another port>"), and the report of a plain-text response left
    unfinished, which this service does on purpose when an answer fails."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.threadName == "demo-model":
            return False
        return record.getMessage() != "ASGI callable returned without completing response."


def configure_logging(settings: Settings) -> None:
    """Request lines go to stdout as bare JSON, one per line, whatever else is configured."""
    if not requests_log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        requests_log.addHandler(handler)
        requests_log.propagate = False
    relay_log = logging.getLogger("relay")
    relay_log.setLevel(settings.log_level.upper())
    if not logging.getLogger().handlers and not relay_log.handlers:
        # Served by a launcher that configures only its own loggers (uvicorn, gunicorn): the
        # service's warnings and start-up lines still reach stderr.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        relay_log.addHandler(handler)
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per upstream call doubles ours
    logging.getLogger("uvicorn.error").addFilter(UvicornNoise())
