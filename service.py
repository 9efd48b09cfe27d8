"""Stream a language model's answer to the people reading it, one token the moment it exists.

A Starlette app (`service:app`) between clients and any OpenAI-compatible upstream (OpenAI, vLLM,
Ollama, llama.cpp). The blocking `openai.OpenAI` client reads the upstream in anyio worker threads
(`iterate_in_threadpool`), and a `StreamingResponse` writes each piece to the client as it arrives.
Around that shape: a client that leaves closes the upstream (on /chat once a short grace window
passed in which its reader may resume, on any replica, without asking the model again), a full
service says so instead of queueing in silence, SSE heartbeats keep proxies from dropping quiet
streams, and a deploy ends open streams with an explicit signal rather than a cut-off sentence.

The module reads top to bottom: configuration, upstream adapter, framing, observability, load
shedding, relay, replay store, resumable answers, routes, demo model, serving layer, app. Run it
with `python service.py` (settings from the environment; see README.md).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import random
import re
import resource
import secrets
import select
import signal
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import aclosing, asynccontextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.to_thread
import httpcore2
import httpcore2._backends.sync
import httpx2
import openai
import orjson
import prometheus_client
import prometheus_client.multiprocess
import redis
import redis.asyncio
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger("service")
T = TypeVar("T")


# ------------------------------------------------------------------------------------------------
# Configuration: read from the environment once, at start-up. A bad value stops the start.
# ------------------------------------------------------------------------------------------------


class ConfigError(Exception):
    """A setting has a value the service cannot run with; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    openai_api_key: str | None = None
    openai_base_url: str | None = None
    model: str = "gpt-4o-mini"
    api_keys: tuple[str, ...] = ()
    allow_anonymous: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    max_streams: int = 500
    shed_lag_seconds: float = 0.02
    heartbeat_seconds: float = 15.0
    shutdown_grace_seconds: float = 20.0
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    max_stream_seconds: float = 900.0
    max_retries: int = 2
    max_body_bytes: int = 4 * 1024 * 1024
    max_query_chars: int = 4000
    max_continuations: int = 0
    demo_seconds_per_word: float = 0.06
    cors_origins: tuple[str, ...] = ()
    log_level: str = "info"
    log_content: bool = False
    metrics_key: str | None = None
    send_timeout_seconds: float = 30.0
    request_timeout_seconds: float = 15.0
    max_header_bytes: int = 32768
    redis_url: str | None = None
    resume_grace_seconds: float = 10.0
    resume_ttl_seconds: float = 300.0
    resume_lease_seconds: float = 5.0
    resume_answer_bytes: int = 1024 * 1024
    resume_total_bytes: int = 64 * 1024 * 1024
    pin_workers: bool = False

    @property
    def demo(self) -> bool:
        """No upstream configured: answer from the built-in demo model."""
        return self.openai_api_key is None and self.openai_base_url is None


def load_settings(environ: Mapping[str, str]) -> Settings:
    def text(name: str) -> str | None:
        value = environ.get(name, "").strip()
        return value or None

    def number(name: str, default: float, low: float, high: float, kind: type = float) -> Any:
        raw = text(name)
        if raw is None:
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a {kind.__name__} between {low} and {high}, not {raw!r}") from None
        if not (low <= value <= high) or (isinstance(value, float) and not math.isfinite(value)):
            raise ConfigError(f"{name} must be between {low} and {high}, not {raw!r}")
        return value

    def flag(name: str) -> bool:
        raw = (text(name) or "0").lower()
        if raw not in {"0", "1", "true", "false", "yes", "no"}:
            raise ConfigError(f"{name} must be 1 or 0, not {raw!r}")
        return raw in {"1", "true", "yes"}

    base_url = text("OPENAI_BASE_URL")
    if base_url is not None and not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"OPENAI_BASE_URL must start with http:// or https://, not {base_url!r}")
    log_level = (text("LOG_LEVEL") or "info").lower()
    if log_level not in {"critical", "error", "warning", "info", "debug"}:
        raise ConfigError(f"LOG_LEVEL must be one of critical, error, warning, info, debug, not {log_level!r}")
    api_keys = tuple(key.strip() for key in (text("API_KEYS") or "").split(",") if key.strip())
    redis_url = text("REDIS_URL")
    if redis_url is not None and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"REDIS_URL must start with redis://, rediss:// or unix://, not {redis_url!r}")
    cors_origins = tuple(origin.strip().rstrip("/") for origin in (text("CORS_ORIGINS") or "").split(",") if origin.strip())
    for origin in cors_origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ConfigError(f"CORS_ORIGINS must list origins like https://app.example.com, not {origin!r}")
    settings = Settings(
        openai_api_key=text("OPENAI_API_KEY"),
        openai_base_url=base_url,
        model=text("OPENAI_MODEL") or ("demo" if base_url is None and text("OPENAI_API_KEY") is None else "gpt-4o-mini"),
        api_keys=api_keys,
        allow_anonymous=flag("ALLOW_ANONYMOUS"),
        host=text("HOST") or "127.0.0.1",
        port=number("PORT", 8000, 0, 65535, int),
        workers=number("WEB_CONCURRENCY", 1, 1, 64, int),
        max_streams=number("MAX_STREAMS", 500, 1, 100_000, int),
        shed_lag_seconds=number("SHED_LAG_MS", 20.0, 0, 60_000) / 1000,
        heartbeat_seconds=number("HEARTBEAT_SECONDS", 15.0, 0.01, 3600),
        shutdown_grace_seconds=number("SHUTDOWN_GRACE_SECONDS", 20.0, 0, 3600),
        connect_timeout=number("UPSTREAM_CONNECT_TIMEOUT", 10.0, 0.01, 600),
        read_timeout=number("UPSTREAM_READ_TIMEOUT", 300.0, 0.01, 86400),
        max_stream_seconds=number("MAX_STREAM_SECONDS", 900.0, 0.01, 86400),
        max_retries=number("UPSTREAM_MAX_RETRIES", 2, 0, 10, int),
        max_body_bytes=number("MAX_BODY_BYTES", 4 * 1024 * 1024, 1024, 1024**3, int),
        max_query_chars=number("MAX_QUERY_CHARS", 4000, 1, 100_000, int),
        max_continuations=number("MAX_CONTINUATIONS", 0, 0, 8, int),
        demo_seconds_per_word=number("DEMO_SECONDS_PER_WORD", 0.06, 0, 10),
        cors_origins=cors_origins,
        log_level=log_level,
        log_content=flag("LOG_CONTENT"),
        metrics_key=text("METRICS_KEY"),
        send_timeout_seconds=number("SEND_TIMEOUT_SECONDS", 30.0, 0.1, 3600),
        request_timeout_seconds=number("REQUEST_TIMEOUT_SECONDS", 15.0, 0.1, 3600),
        max_header_bytes=number("MAX_HEADER_BYTES", 32768, 1024, 1024 * 1024, int),
        redis_url=redis_url,
        resume_grace_seconds=number("RESUME_GRACE_SECONDS", 10.0, 0, 3600),
        resume_ttl_seconds=number("RESUME_TTL_SECONDS", 300.0, 1, 7 * 86400),
        resume_lease_seconds=number("RESUME_LEASE_SECONDS", 5.0, 0.3, 60),
        resume_answer_bytes=number("RESUME_MAX_ANSWER_BYTES", 1024 * 1024, 1024, 1024**3, int),
        resume_total_bytes=number("RESUME_MAX_BYTES", 64 * 1024 * 1024, 1024, 64 * 1024**3, int),
        pin_workers=flag("PIN_WORKERS"),
    )
    if settings.resume_total_bytes < settings.resume_answer_bytes:
        raise ConfigError("RESUME_MAX_BYTES must be at least RESUME_MAX_ANSWER_BYTES: the store must hold one whole answer.")
    if not settings.demo and not settings.api_keys and not settings.allow_anonymous:
        raise ConfigError(
            "API_KEYS is empty, so anyone who can reach this service could spend the upstream's budget. "
            "Set API_KEYS to a comma-separated list of keys that clients must send as "
            "'Authorization: Bearer <key>' (for example API_KEYS=$(python -c 'import secrets; print(secrets.token_urlsafe())')), "
            "or set ALLOW_ANONYMOUS=1 to serve without keys."
        )
    return settings


# ------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}
# ------------------------------------------------------------------------------------------------


class ServiceError(Exception):
    """An answer that is not the model's: an HTTP status and an OpenAI-shaped error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | int | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def encoded(self) -> bytes:
        """The body as ASCII JSON: a message that quotes the client's input may hold characters
        (a lone surrogate) that UTF-8 cannot encode, and \\u escapes always can."""
        return json.dumps(self.body()).encode()

    def response(self) -> Response:
        return Response(self.encoded(), status_code=self.status, headers=self.headers, media_type="application/json")


class StreamFailure(Exception):
    """The stream cannot go on after the response started; the client gets a terminal error frame."""

    def __init__(self, type: str, message: str) -> None:
        super().__init__(message)
        self.type, self.message = type, message

    def error(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.type, "param": None, "code": None}


# ------------------------------------------------------------------------------------------------
# Upstream adapter: the blocking openai client, read in worker threads, interruptible from the loop.
#
# A worker thread blocked in recv() cannot be cancelled, and Starlette's disconnect handling waits
# for it; meanwhile the upstream keeps generating (and billing). So every socket the openai client
# reads or writes is registered with the UpstreamCall being served (found through a ContextVar,
# which anyio copies into its worker threads), and UpstreamCall.abort() shuts that socket down from
# the event loop: the blocked read returns at once, whether the upstream is mid-answer, silent
# before its first token, or has not even sent its response headers yet.
# ------------------------------------------------------------------------------------------------


class ClientGone(openai.OpenAIError):
    """Raised in a worker thread whose call was aborted. An OpenAIError, so the openai client
    neither retries it nor wraps it."""


_serving: ContextVar[UpstreamCall | None] = ContextVar("serving_upstream_call", default=None)


TIMEOUT_NOT_SET = -1.0  # never a timeout httpcore asks for (a sentinel of False would equal 0.0)
CHUNK_FRAMING_BYTES = 32  # the most an HTTP chunk's size line and CRLFs take, in practice


class UpstreamCall:
    """One request to the upstream (one round of an answer), abortable from any thread."""

    def __init__(self) -> None:
        self.aborted = False
        self._stream: _InterruptibleStream | None = None
        self.unsent_since = 0.0  # when the oldest read not yet written to the client returned
        self.created = time.monotonic()
        self.thread_wait: float | None = None  # seconds its first step waited for a worker thread

    def arrived(self) -> None:
        """Called in the worker thread after each read that returned data."""
        if not self.unsent_since:
            self.unsent_since = time.monotonic()

    def waited(self, now: float) -> float:
        """How long what arrived waited to be written, at `now` when it is; 0 if nothing had."""
        since, self.unsent_since = self.unsent_since, 0.0
        return now - since if since else 0.0

    def attach(self, stream: _InterruptibleStream) -> None:
        """Called in the worker thread before each blocking read or write on `stream`."""
        with stream.lock:
            stream.owner = self
            self._stream = stream
            aborted = self.aborted
        if aborted:
            raise ClientGone("the client went away")

    def abort(self) -> None:
        """Stop the call now: the worker thread's blocking read returns and the upstream sees EOF."""
        self.aborted = True
        stream = self._stream
        if stream is None:
            return
        with stream.lock:
            # A pooled connection may serve another call by now; only shut down our own.
            if stream.owner is self:
                stream.interrupt()

    def finish(self) -> None:
        """The call is over and its connection may go back to the pool: abort() must not touch it."""
        stream = self._stream
        if stream is not None:
            with stream.lock:
                if stream.owner is self:
                    stream.owner = None

    def body_begins(self) -> None:
        """The response's head has been read: what more_arrived() counts starts here."""
        if self._stream is not None:
            self._stream.forget_reads()

    def more_arrived(self, piece: bytes, least: int = CHUNK_FRAMING_BYTES + 1) -> bool:
        """Whether more of the answer than `piece` has arrived (at least `least` bytes of it; by
        default, more than a chunk's framing), so that the next piece is there without waiting on
        the network. Runs in the worker thread reading the call."""
        stream = self._stream
        return stream is not None and stream.more_arrived(piece, least)


class _InterruptibleStream(httpcore2.NetworkStream):
    def __init__(self, inner: httpcore2.NetworkStream) -> None:
        self._inner = inner
        self._socket: socket.socket = inner.get_extra_info("socket")
        self.lock = threading.Lock()
        self.owner: UpstreamCall | None = None
        self._reads = self._reads_seen = self._last_read = 0
        self._unread = 0  # at most what the HTTP parser still holds of the last read
        self._poll: select.poll | None = None
        # httpcore's own stream over a socket of its own (not TLS inside a proxy's TLS): read here.
        self._reads_socket = type(inner) is httpcore2._backends.sync.SyncStream and type(self._socket) in (socket.socket, ssl.SSLSocket)
        self._read_timeout: float | None = TIMEOUT_NOT_SET  # the socket's, as read() last set it

    def _attach(self) -> UpstreamCall | None:
        call = _serving.get()
        if call is not None:
            call.attach(self)
        return call

    def _receive(self, max_bytes: int, timeout: float | None) -> bytes:
        """httpcore's read, with fewer system calls. httpcore sets the socket's timeout before each
        read and reads with a timeout, so each read is three system calls (ioctl, poll, recv),
        each of which lets go of the GIL and may wait to take it back from the event loop; in a
        thread per token, those hand-offs were the largest share of the relay's CPU. Here the
        timeout is set only when it changes, and a plain TCP socket reads in blocking mode with
        the kernel's receive timeout (SO_RCVTIMEO): one recv() per read."""
        if not self._reads_socket:
            return self._inner.read(max_bytes, timeout)
        if timeout != self._read_timeout:
            self._set_read_timeout(timeout)
        try:
            return self._socket.recv(max_bytes)
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO ran out
            raise httpcore2.ReadTimeout("The read timed out.") from None
        except OSError as error:
            raise httpcore2.ReadError(str(error)) from None

    def _set_read_timeout(self, timeout: float | None) -> None:
        if type(self._socket) is ssl.SSLSocket:
            self._socket.settimeout(timeout)  # TLS reads need Python's own timeout handling
        else:
            self._socket.settimeout(None)
            seconds = max(timeout, 0.001) if timeout is not None else 0.0  # 0: no timeout
            value = struct.pack("@ll", int(seconds), int(seconds % 1 * 1_000_000))
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        self._read_timeout = timeout

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        placement.upstream_thread()
        call = self._attach()
        try:
            data = self._receive(max_bytes, timeout)
            self._reads, self._last_read = self._reads + 1, len(data)
            self._unread = len(data)
            if data and call is not None:
                call.arrived()
        except httpcore2.ReadError:
            if call is not None and call.aborted:
                raise ClientGone("the client went away") from None
            raise
        if not data and call is not None and call.aborted:
            raise ClientGone("the client went away")
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._attach()
        self._read_timeout = TIMEOUT_NOT_SET  # httpcore sets the socket's timeout for the write
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> Any:
        return _InterruptibleStream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)

    def forget_reads(self) -> None:
        self._unread = 0  # the head's read may have carried some of the body too: not counted

    def more_arrived(self, piece: bytes, least: int) -> bool:
        # A read takes whatever has arrived, often several HTTP chunks, which the parser then
        # hands out one by one without reading again: count what is left of the read (never
        # more than is left: each piece is taken with the most framing a chunk can have).
        self._unread -= len(piece) + len(b"%x" % len(piece)) + 4
        if self._unread >= least:
            return True  # the parser holds that much already
        fresh, self._reads_seen = self._reads != self._reads_seen, self._reads
        if fresh and self._last_read <= len(piece) + CHUNK_FRAMING_BYTES:
            return False  # the read carried this one HTTP chunk alone, as most reads do
        if self._poll is None:
            self._poll = select.poll()  # not select(), which fails for sockets numbered over 1023
            self._poll.register(self._socket, select.POLLIN)
        return bool(self._poll.poll(0))

    def interrupt(self) -> None:
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already closed by the other side


class _InterruptibleBackend(httpcore2.SyncBackend):
    def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore2.NetworkStream:
        call = _serving.get()
        if call is not None and call.aborted:
            raise ClientGone("the client went away")
        return _InterruptibleStream(super().connect_tcp(*args, **kwargs))


class UpstreamClient(openai.OpenAI):
    """The openai client, retried by this service's policy (`retry_pause`) instead of its own,
    which waits out a 429's Retry-After, however long, in silence."""

    def __init__(self, retries: int, **options: Any) -> None:
        super().__init__(max_retries=0, **options)
        self.retries = retries


def make_openai_client(settings: Settings, base_url: str | None) -> UpstreamClient:
    transport = httpx2.HTTPTransport(
        limits=httpx2.Limits(max_connections=settings.max_streams + 16, max_keepalive_connections=settings.max_streams)
    )
    # httpx has no public setting for the network backend; its pool reads this for each new connection.
    transport._pool._network_backend = _InterruptibleBackend()
    timeout = httpx2.Timeout(settings.read_timeout, connect=settings.connect_timeout)
    return UpstreamClient(
        settings.max_retries,
        api_key=settings.openai_api_key or "no-key",  # local servers (Ollama, vLLM) take any key
        base_url=base_url,
        timeout=timeout,
        http_client=httpx2.Client(transport=transport, timeout=timeout),
    )


async def in_worker_thread(call: UpstreamCall, function: Callable[[], T]) -> T:
    """Run `function` in a worker thread whose socket I/O `call.abort()` can interrupt. The
    wait for the thread to start it is kept in `call.thread_wait`."""
    submitted = time.monotonic()

    def timed() -> T:
        call.thread_wait = time.monotonic() - submitted
        return function()

    token = _serving.set(call)
    try:
        return await anyio.to_thread.run_sync(timed)
    finally:
        _serving.reset(token)


def _upstream_message(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, Mapping) and isinstance(body.get("message"), str):
        return body["message"]
    return f"The upstream answered HTTP {error.status_code}."


def service_error_from(error: openai.OpenAIError) -> ServiceError:
    """What the client sees when the upstream fails before the first byte of the answer."""
    if isinstance(error, openai.APITimeoutError):
        return ServiceError(504, "The upstream did not answer in time.", "upstream_timeout", "upstream_timeout")
    if isinstance(error, openai.APIConnectionError):
        return ServiceError(502, "The upstream could not be reached.", "upstream_error", "upstream_unreachable")
    if not isinstance(error, openai.APIStatusError):
        return ServiceError(502, "The upstream request failed.", "upstream_error", "upstream_error")
    status = error.status_code
    body = dict(error.body) if isinstance(error.body, Mapping) else {}
    for name in ("code", "param"):  # OpenAI's schema has strings; some servers send numbers (429)
        if body.get(name) is not None:
            body[name] = str(body[name])
    if status == 429:
        retry_after = error.response.headers.get("retry-after")
        return ServiceError(
            429,
            _upstream_message(error),
            str(body.get("type") or "rate_limit_error"),
            body.get("code") or "rate_limit_exceeded",
            headers={"Retry-After": retry_after} if retry_after else None,
        )
    if status in (400, 404, 409, 413, 422):
        return ServiceError(
            status, _upstream_message(error), str(body.get("type") or "invalid_request_error"), body.get("code"), body.get("param")
        )
    if status in (401, 402, 403):
        # The operator's credentials or account, not the client's request; the upstream's message
        # may quote part of the key, so it is not passed on.
        return ServiceError(
            502,
            f"The upstream refused this service's credentials (HTTP {status}); the operator must check OPENAI_API_KEY.",
            "upstream_error",
            "upstream_auth_failed",
        )
    if status >= 500:
        # A server's own failure may quote its traceback and file paths: for the operator, not the client.
        log.warning("the upstream answered HTTP %s: %s", status, _upstream_message(error))
        return ServiceError(502, f"The upstream failed (HTTP {status}).", "upstream_error", "upstream_error")
    return ServiceError(502, f"The upstream failed (HTTP {status}): {_upstream_message(error)}", "upstream_error", "upstream_error")


RETRY_BUDGET_SECONDS = 3.0  # all retries of one call together: a client waits on them in silence
LONGEST_HONOURED_PAUSE = 1.0  # an upstream asking for more than this before a retry is not retried


def retry_pause(error: openai.OpenAIError, attempt: int, retries: int, elapsed: float) -> float | None:
    """How long to wait before trying the call again, or None not to. Only an upstream that failed
    on its own (5xx) or could not be reached is retried; a 429 goes back to the client at once,
    with its Retry-After, for the client to decide."""
    if attempt >= retries or isinstance(error, (ClientGone, openai.APITimeoutError)):
        return None
    if isinstance(error, openai.APIStatusError):
        if error.status_code < 500:
            return None
        pause = _asked_pause(error.response.headers)
        if pause is None or pause > LONGEST_HONOURED_PAUSE:
            pause = min(0.25 * 2**attempt, LONGEST_HONOURED_PAUSE)
    elif isinstance(error, openai.APIConnectionError):
        pause = min(0.25 * 2**attempt, LONGEST_HONOURED_PAUSE)
    else:
        return None
    return pause if elapsed + pause <= RETRY_BUDGET_SECONDS else None


def _asked_pause(headers: httpx2.Headers) -> float | None:
    """The upstream's Retry-After-Ms or Retry-After in seconds (not an HTTP date), if any."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        try:
            pause = float(headers.get(name, "")) / scale
        except ValueError:
            continue
        if math.isfinite(pause) and pause >= 0:
            return pause
    return None


async def send_upstream(call: UpstreamCall, request: Callable[[], httpx2.Response], stream: bool, retries: int) -> httpx2.Response:
    """Make one upstream request with the openai client (`request`, which returns its raw HTTP
    response), retried up to `retries` times as `retry_pause` allows; return once the response
    headers arrived (without streaming, once the whole body did)."""

    def send() -> httpx2.Response:
        started = time.monotonic()
        for attempt in itertools.count():
            try:
                response = request()
                break
            except openai.OpenAIError as error:
                call.finish()  # its connection may already serve another call
                pause = retry_pause(error, attempt, retries, time.monotonic() - started)
                if pause is None:
                    raise
                time.sleep(pause)
        if not stream:
            call.finish()  # httpx has read the whole answer already
        else:
            call.body_begins()
        return response

    try:
        return await in_worker_thread(call, send)
    except ClientGone:
        raise
    except openai.OpenAIError as error:
        raise service_error_from(error) from None


Opener = Callable[[UpstreamClient, UpstreamCall, dict[str, Any]], Awaitable[httpx2.Response]]


async def open_upstream(client: UpstreamClient, call: UpstreamCall, body: dict[str, Any]) -> httpx2.Response:
    """Send one chat completion request.

    The request body is the client's, already checked, and goes to the upstream as it is, so fields
    this service does not know still reach it. It is posted through the openai client's own request
    path (retries, errors, headers), but not through `chat.completions.create()`, whose conversion
    of the arguments to their declared types leaves a JSON body as it was and cost a fifth of
    a stream's set-up.
    """
    return await post_upstream(client, call, "/chat/completions", body)


async def post_upstream(client: UpstreamClient, call: UpstreamCall, path: str, body: dict[str, Any]) -> httpx2.Response:
    """POST `body` as it is to `path` (relative to the base URL), streamed if it asks to be."""
    stream = bool(body.get("stream"))
    return await send_upstream(
        call,
        lambda: client.post(path, body=body, cast_to=httpx2.Response, stream=stream, stream_cls=openai.Stream[Any]),
        stream,
        client.retries,
    )


def _no_responses_api(error: ServiceError, request: str) -> ServiceError:
    return ServiceError(
        404,
        f"The upstream has no Responses API: {request} answered 404 ({error.message}). OpenAI and recent vLLM "
        "versions serve it; older Ollama and llama.cpp servers do not. Use /v1/chat/completions with this upstream.",
        code="responses_api_unsupported",
    )


async def open_responses(client: UpstreamClient, call: UpstreamCall, body: dict[str, Any]) -> httpx2.Response:
    """Send one Responses API request (POST /responses), the body as it is, posted as chat
    completions are (see open_upstream)."""
    try:
        return await post_upstream(client, call, "/responses", body)
    except ServiceError as error:
        if error.status == 404 and error.code != "model_not_found":
            raise _no_responses_api(error, "POST /v1/responses") from None
        raise


async def open_resource(client: UpstreamClient, call: UpstreamCall, method: str, path: str, query: Mapping[str, str], stream: bool) -> httpx2.Response:
    """Any other upstream request (`path` relative to the base URL), its body not parsed."""
    options: Any = {"params": dict(query)}
    raw = httpx2.Response
    if method == "GET":
        return await send_upstream(call, lambda: client.get(path, cast_to=raw, options=options, stream=stream, stream_cls=openai.Stream[Any]), stream, client.retries)
    if method == "POST":
        return await send_upstream(call, lambda: client.post(path, cast_to=raw, options=options), stream, client.retries)
    return await send_upstream(call, lambda: client.delete(path, cast_to=raw, options=options), stream, client.retries)


DONE = b"[DONE]"
MAX_BATCH = 256  # events per thread hop at most, so that an upstream faster than us still streams
MAX_EVENT_BYTES = 8 * 1024 * 1024  # one event; a stream that never ends an event must not fill memory


class SSEDecoder:
    """Splits an upstream SSE byte stream into the data payloads of its events.

    Comment lines (": OPENROUTER PROCESSING", keep-alives) and events without data are dropped;
    multi-line data is joined with newlines, as the SSE specification says. With `whole_events`,
    each event comes whole instead (its `event:` and `data:` lines, without comments), for APIs
    whose event names matter.
    """

    def __init__(self, whole_events: bool = False) -> None:
        self._buffer = b""
        self._whole_events = whole_events

    def feed(self, data: bytes) -> list[bytes]:
        if len(self._buffer) > MAX_EVENT_BYTES:
            raise StreamFailure("upstream_error", "The upstream sent an event larger than the service accepts.")
        data = self._buffer + data
        if b"\r" in data:
            held = b"\r" if data.endswith(b"\r") else b""  # may be the first half of \r\n
            data = data[: len(data) - len(held)].replace(b"\r\n", b"\n").replace(b"\r", b"\n") + held
        *events, self._buffer = data.split(b"\n\n")
        payloads = []
        if self._whole_events:
            for event in events:
                lines = [line for line in event.split(b"\n") if line and not line.startswith(b":")]
                if any(line.startswith(b"data:") for line in lines):
                    payloads.append(b"\n".join(lines))
            return payloads
        for event in events:
            if event.startswith(b"data: ") and b"\n" not in event:
                payloads.append(event[6:])  # the common case, without splitting lines
                continue
            lines = [line[5:] for line in event.split(b"\n") if line.startswith(b"data:")]
            if lines:
                payloads.append(b"\n".join(line[1:] if line.startswith(b" ") else line for line in lines))
        return payloads


def upstream_events(call: UpstreamCall, response: httpx2.Response, whole_events: bool = False) -> Iterator[list[bytes]]:
    """The upstream's event payloads (whole events with `whole_events`), one list per network
    read, up to and including [DONE].

    Runs in worker threads, one thread hop per read, however many events the read carried:
    httpx yields one piece per HTTP chunk and upstreams send each event in a chunk of its own, so
    pieces are gathered for as long as more has arrived already. A relay that fell behind then
    catches up in a few hops, instead of one per event.
    """
    decoder = SSEDecoder(whole_events)
    payloads: list[bytes] = []
    failure: StreamFailure | None = None
    try:
        pieces = response.iter_bytes()
        for data in pieces:
            payloads += decoder.feed(data)
            if DONE in payloads:
                del payloads[payloads.index(DONE) + 1 :]
                yield payloads
                payloads = []
                _read_end_if_arrived(call, pieces, data)
                break
            if payloads and (len(payloads) >= MAX_BATCH or not call.more_arrived(data)):
                yield payloads
                payloads = []
    except ClientGone:
        raise
    except StreamFailure as error:
        failure = error
    except httpx2.TimeoutException:
        failure = StreamFailure("upstream_timeout", "The upstream stopped sending in the middle of the answer.")
    except (httpx2.HTTPError, OSError):
        failure = StreamFailure("upstream_error", "The upstream connection broke in the middle of the answer.")
    finally:
        call.finish()
        response.close()
    if payloads:
        yield payloads  # what arrived before the end, or before the failure
    if failure is not None:
        raise failure


BODY_END_BYTES = len(b"0\r\n\r\n")  # the last chunk of a chunked body


def _read_end_if_arrived(call: UpstreamCall, pieces: Iterator[bytes], last: bytes) -> None:
    """After [DONE], read the rest of the HTTP body (its last chunk) if it has arrived already, as
    it usually has, with [DONE] or just after: a response read to its end leaves its connection
    to the pool for the next call, where one closed early costs a new connection. Nothing after
    [DONE] is waited for, and nothing there can fail an answer that is complete."""
    try:
        while call.more_arrived(last, BODY_END_BYTES):
            last = next(pieces)
    except (StopIteration, httpx2.HTTPError, OSError):
        pass


def parse_chunk(payload: bytes) -> dict[str, Any]:
    try:
        chunk = orjson.loads(payload)  # several times faster than json, on every piece of /chat
    except ValueError:
        raise StreamFailure("upstream_error", "The upstream sent an event that is not JSON.") from None
    if not isinstance(chunk, dict):
        raise StreamFailure("upstream_error", "The upstream sent an event that is not a JSON object.")
    if chunk.get("error") is not None:
        error = chunk["error"]
        message = error.get("message") if isinstance(error, dict) else None
        raise StreamFailure("upstream_error", f"The upstream reported an error: {message or error}")
    return chunk


# ------------------------------------------------------------------------------------------------
# Framing: how pieces of the answer are written for each kind of client.
# ------------------------------------------------------------------------------------------------


CONTINUE_INSTRUCTION = (
    "Your previous message was cut off by the output limit. Continue exactly where it stopped, "
    "mid-word or mid-sentence if need be. Do not repeat any of it, and add no preamble."
)
SEAM_CHARS = 48  # how much of a continuation is held back to find text it repeats at the join


def _sum_usage(total: dict[str, Any] | None, usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if usage is None:
        return total
    if total is None:
        return dict(usage)
    summed = dict(total)
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        if isinstance(usage.get(name), int):
            summed[name] = int(summed.get(name) or 0) + usage[name]
    if usage.get("estimated"):
        summed["estimated"] = True
    return summed


def _join(before: str, after: str) -> str:
    """`after` without what it repeats of the end of `before`, and without doubled whitespace.

    Models asked to continue often restate the last words, or start with a space the text already
    ends with; the reader must see one seamless text.
    """
    if before[-1:].isspace():
        after = after.lstrip(" ")
    for size in range(min(len(before), len(after)), 7, -1):  # overlaps under 8 characters are chance
        if before.endswith(after[:size]):
            return after[size:]
    return after


@dataclass
class Transcript:
    """What the upstream said for one /chat answer, over all its rounds: the text of choice 0,
    how the last round ended, and the usage of every round summed.

    A round the upstream sent no usage for (llama.cpp ignores include_usage, and no upstream sends
    it for an answer that ended early: client gone, failure, shutdown) counts the pieces it relayed
    as its completion tokens, marked `"estimated": true`, so an operator can still tell what an
    answer cost. Usage from the upstream always wins."""

    text: str = ""
    finish_reason: str | None = None
    ended: bool = False  # this round's [DONE] was seen
    usage: dict[str, Any] | None = None
    refusal: str = ""
    continuations: int = 0
    failure: StreamFailure | None = None
    _round_usage: dict[str, Any] | None = None
    _round_pieces: int = 0
    _seam: str | None = None  # a continuation's first text, held until the join is clear

    def read(self, payloads: list[bytes]) -> list[str]:
        """The text deltas in `payloads` to send, in order; records finish reason and usage. An
        event that is not a chunk stops the reading and is kept as `failure`, to be raised once
        the text before it was sent."""
        texts = []
        for payload in payloads:
            if payload == DONE:
                self.ended = True
                break
            try:
                chunk = parse_chunk(payload)
            except StreamFailure as failure:
                self.failure = failure
                break
            if isinstance(chunk.get("usage"), dict):
                self._round_usage = chunk["usage"]  # some servers send running totals on every chunk
            for choice in chunk.get("choices") or ():
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta") or {}
                if isinstance(delta.get("content"), str) and delta["content"]:
                    texts.append(delta["content"])
                    self._round_pieces += 1
                if isinstance(delta.get("refusal"), str):
                    self.refusal += delta["refusal"]
                if choice.get("finish_reason"):
                    self.finish_reason = choice["finish_reason"]
        if self._seam is not None:
            self._seam += "".join(texts)
            if len(self._seam) < SEAM_CHARS and self.failure is None:
                return []
            texts, self._seam = [_join(self.text, self._seam)], None
        self.text += "".join(texts)
        return texts

    def end_round(self) -> list[str]:
        """Close the round: count its usage, and release text still held at a seam."""
        relayed = {"completion_tokens": self._round_pieces, "estimated": True}
        self.usage = _sum_usage(self.usage, relayed if self._round_usage is None else self._round_usage)
        self._round_usage, self._round_pieces = None, 0
        if self._seam is None:
            return []
        rest, self._seam = _join(self.text, self._seam), None
        self.text += rest
        return [rest] if rest else []

    def continuation(self, body: dict[str, Any]) -> dict[str, Any]:
        """The next round's request: the conversation, the answer so far, and a request to go on."""
        self.continuations += 1
        self.finish_reason, self.ended, self._seam = None, False, ""
        answer_so_far = {"role": "assistant", "content": self.text}
        return {**body, "messages": [*body["messages"], answer_so_far, {"role": "user", "content": CONTINUE_INSTRUCTION}]}

    def summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = {"finish_reason": self.finish_reason, "usage": self.usage, "continuations": self.continuations}
        if self.refusal:
            summary["refusal"] = self.refusal
        return summary


class Framing:
    media_type = "text/plain"
    heartbeat: bytes | None = None  # sent after HEARTBEAT_SECONDS without anything else

    def done(self) -> bytes:
        """The frames that tell the client the answer is complete."""
        return b""

    def error_frame(self, failure: StreamFailure) -> bytes | None:
        """The terminal frame for a failed stream; None ends the response without its terminator."""
        return None


class PassThroughFraming(Framing):
    """The /v1 routes: the upstream's own events, relayed as they come."""

    media_type = "text/event-stream"
    heartbeat = b": ping\n\n"
    whole_events = False  # whether events() takes whole events (with their `event:` lines) or data payloads

    def __init__(self) -> None:
        self.usage: dict[str, Any] | None = None
        self.failure: StreamFailure | None = None
        self.pieces = 0  # pieces of the answer in the frames so far, for the log and metrics

    def events(self, payloads: list[bytes]) -> bytes:
        """The frames for `payloads`; an event that cannot be passed on stops them and is kept as
        `failure`, to be raised once the frames before it were sent."""
        raise NotImplementedError

    def unfinished(self) -> StreamFailure | None:
        """Why a stream the upstream ended cleanly is still not a whole answer, if it is not."""
        return None

    def completion(self) -> str | None:
        """The answer's text, for LOG_CONTENT=1."""
        return None


class OpenAIFraming(PassThroughFraming):
    """/v1/chat/completions: the upstream's events, byte for byte, as OpenAI's SSE."""

    def __init__(self, transcript: Transcript | None) -> None:
        super().__init__()
        self.transcript = transcript  # only to log the text (LOG_CONTENT=1)
        self.events_seen = 0  # [DONE] included

    def events(self, payloads: list[bytes]) -> bytes:
        frames = []
        self.events_seen += len(payloads)
        for payload in payloads:
            if payload == DONE:
                break
            # Pass-through without decoding into objects; only what may be an error, carries
            # usage, or is not a JSON object at all is looked at closely.
            try:
                if b'"error"' in payload or not (payload.startswith(b"{") and payload.rstrip().endswith(b"}")):
                    parse_chunk(payload)
                if b'"usage":{' in payload or b'"usage": {' in payload:
                    self.usage = parse_chunk(payload).get("usage")
            except StreamFailure as failure:
                self.failure = failure
                break
            frames.append(b"data: " + payload + b"\n\n")
        if self.transcript is not None:
            self.transcript.read(payloads)
        self.pieces += len(frames)
        return b"".join(frames)

    def unfinished(self) -> StreamFailure | None:
        if not self.events_seen:
            # Ended cleanly, but with no event at all: not an answer (a server that ignored
            # "stream": true, say); [DONE] alone would tell the client it was one.
            return StreamFailure("upstream_error", "The upstream's response held no events.")
        return None

    def completion(self) -> str | None:
        return self.transcript and self.transcript.text

    def done(self) -> bytes:
        return b"data: [DONE]\n\n"

    def error_frame(self, failure: StreamFailure) -> bytes:
        return b"data: " + json.dumps({"error": failure.error()}).encode() + b"\n\n" + self.done()


RESPONSE_ENDINGS = {b"response.completed", b"response.failed", b"response.incomplete"}


class ResponsesFraming(PassThroughFraming):
    """/v1/responses: the upstream's events, `event:` and `data:` lines and sequence_numbers as
    they came. This API has no [DONE] (one an upstream sends is passed on); a stream ends with
    response.completed, .failed or .incomplete, or with an `error` event (the upstream's own, or
    the service's, which then stops the stream). Pieces are the response.*.delta events."""

    whole_events = True

    def __init__(self, keep_text: bool = False) -> None:
        super().__init__()
        self.ended = False
        self._texts: list[str] | None = [] if keep_text else None  # only to log the text (LOG_CONTENT=1)
        self._last_sequence_number = -1
        self._upstream_error: bytes | None = None  # the upstream's own error event, passed on as it is

    def events(self, events: list[bytes]) -> bytes:
        frames = []
        for event in events:
            data = b"\n".join(line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
            if data != DONE:
                try:
                    parsed = parse_chunk(data)
                except StreamFailure as failure:
                    self.failure = failure
                    break
                kind = str(parsed.get("type", "")).encode()
                if isinstance(parsed.get("sequence_number"), int):
                    self._last_sequence_number = parsed["sequence_number"]
                if kind == b"error":
                    self.failure = StreamFailure("upstream_error", f"The upstream reported an error: {parsed.get('message')}")
                    self._upstream_error = event + b"\n\n"
                    break
                if kind.endswith(b".delta"):
                    self.pieces += 1
                    if self._texts is not None and kind == b"response.output_text.delta":
                        self._texts.append(str(parsed.get("delta", "")))
                if kind in RESPONSE_ENDINGS:
                    self.ended = True
                    usage = (parsed.get("response") or {}).get("usage")
                    if isinstance(usage, dict):
                        self.usage = {"prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens"),
                                      "total_tokens": usage.get("total_tokens")}
            frames.append(event + b"\n\n")
        return b"".join(frames)

    def completion(self) -> str | None:
        return None if self._texts is None else "".join(self._texts)

    def unfinished(self) -> StreamFailure | None:
        if not self.ended:
            return StreamFailure("upstream_error", "The upstream ended the stream before the response was finished.")
        return None

    def error_frame(self, failure: StreamFailure) -> bytes:
        if failure is self.failure and self._upstream_error is not None:
            return self._upstream_error
        self._last_sequence_number += 1
        error = {"type": "error", "code": failure.type, "message": failure.message, "param": None,
                 "sequence_number": self._last_sequence_number}
        return b"event: error\ndata: " + json.dumps(error).encode() + b"\n\n"


@dataclass(frozen=True)
class AnswerEvent:
    """One event of a /chat answer, as the replay store keeps it and before any framing: a piece of
    text ("delta", data {"text"}), the summary that ends the answer ("done"), or the error that
    ends it ("error", data {"error"}). `seq` counts the answer's events from 1."""

    seq: int
    kind: str
    data: dict[str, Any]


class ChatFraming(Framing):
    """/chat as plain text: the raw deltas. A failure leaves the response visibly unfinished.

    Every /chat framing writes the events of one answer (stream `stream_id`), fresh or resumed
    alike; `ending` is the answer's last event once the reader has it."""

    preamble = b""  # written before the first event

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self.ending: AnswerEvent | None = None

    def deltas(self, events: list[AnswerEvent]) -> bytes:
        return "".join(event.data["text"] for event in events).encode()


class ChatSSEFraming(ChatFraming):
    media_type = "text/event-stream"
    heartbeat = b": ping\n\n"
    preamble = b"retry: 1000\n\n"  # EventSource reconnects after 1 s, and resumes from its Last-Event-ID

    def deltas(self, events: list[AnswerEvent]) -> bytes:
        return b"".join(self._event(event) for event in events)

    def done(self) -> bytes:
        assert self.ending is not None
        return self._event(self.ending)

    def error_frame(self, failure: StreamFailure) -> bytes:
        if self.ending is not None and self.ending.kind == "error":
            return self._event(self.ending)
        return self._event(AnswerEvent(0, "error", {"error": failure.error()}))  # the reader's own ending

    def _event(self, event: AnswerEvent) -> bytes:
        data = json.dumps(event.data, ensure_ascii=False)
        if not event.seq:
            return f"event: {event.kind}\ndata: {data}\n\n".encode()
        return f"id: {self.stream_id}.{event.seq}\nevent: {event.kind}\ndata: {data}\n\n".encode()


class ChatNDJSONFraming(ChatFraming):
    media_type = "application/x-ndjson"

    def deltas(self, events: list[AnswerEvent]) -> bytes:
        return b"".join(self._line({"type": "delta", "text": event.data["text"]}) for event in events)

    def done(self) -> bytes:
        assert self.ending is not None
        return self._line({"type": "done", **self.ending.data})

    def error_frame(self, failure: StreamFailure) -> bytes:
        return self._line({"type": "error", "error": failure.error()})

    @staticmethod
    def _line(data: dict[str, Any]) -> bytes:
        return (json.dumps(data, ensure_ascii=False) + "\n").encode()


CHAT_FRAMINGS: dict[str, type[ChatFraming]] = {
    "text/plain": ChatFraming,
    "text/event-stream": ChatSSEFraming,
    "application/x-ndjson": ChatNDJSONFraming,
}


# ------------------------------------------------------------------------------------------------
# Observability: one JSON log line per request when it ends, and Prometheus metrics.
# ------------------------------------------------------------------------------------------------

requests_log = logging.getLogger("service.requests")
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
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

    def exposition(self) -> bytes:
        registry = self.registry
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # several workers: add up what each one wrote
            registry = prometheus_client.CollectorRegistry()
            prometheus_client.multiprocess.MultiProcessCollector(registry)
        return prometheus_client.generate_latest(registry)


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

    def pieces_sent(self, count: int) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.chunks += count

    def record(self, settings: Settings, metrics: Metrics) -> None:
        ended = time.monotonic()
        outcome = self.outcome or self._outcome_from_status()
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
    write_log_line({"request_id": uuid.uuid4().hex, "method": None, "path": None, "status": status, "outcome": outcome})


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

    def __init__(self, app: Any, runtime: Runtime) -> None:
        self.app, self.runtime = app, runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        exchange = Exchange(request_id, scope["method"], loggable_path(scope["path"]), time.monotonic())
        scope.setdefault("state", {})["exchange"] = exchange

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id.encode())]
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
            exchange.record(self.runtime.settings, self.runtime.metrics)


# ------------------------------------------------------------------------------------------------
# Load shedding: past what one process can relay on time, new streams are refused at once.
#
# Every piece of every answer passes through this process's event loop and its GIL, so when the
# process has more to do than its core allows, each stream it relays is late by as much, and
# queueing more streams only makes all of them later. So the process measures how late it runs:
# a probe that asks the loop to wake every 10 ms, the wait of each arrived piece until it is
# written, and a new stream's wait for a worker thread (the probe alone misses a loop that keeps
# its timers but has a queue of I/O behind them). While that lateness exceeds SHED_LAG_MS, new
# streams get 503 + Retry-After at once (the OpenAI SDKs retry by themselves, a load balancer
# sends the retry to another replica); streams already admitted are never cut. A burst of new
# streams is admitted at the rate the process sets them up: a few per probe while it runs at all
# late, and none during a short spell of lateness, which passes. Lateness that lasts means the
# open streams are too many, and teaches a limit on them, as Netflix's AIMD limiter or a TCP
# congestion window learns: 90 % of the streams open then, raised a little at a time while the
# process keeps time, so that a steady overload meets a steady count, not waves of admissions.
# MAX_STREAMS stays the hard cap above it.
# ------------------------------------------------------------------------------------------------

PROBE_SECONDS = 0.01
STARTS_PER_PROBE = 1  # new streams per probe while the loop runs a quarter of the bound late
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
        self._starts_left = math.inf  # new streams that may start until the next probe

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
        # Setting a stream up costs a few milliseconds of the loop and the GIL, a burst of them
        # all at once as many; while the loop is at all late, new streams are started a few per
        # probe, spread out, instead of in waves between spells of lateness.
        self._starts_left = STARTS_PER_PROBE if self.lag > self.bound / 4 else math.inf
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
        """Whether a new stream may start now (and if so, it counts as started). Cheap: called on
        the event loop for each request, before its body is read."""
        if not self.bound or open_streams < LIMIT_FLOOR:
            return True  # so few streams do not make the loop late, and refusing them helps nobody
        if self._refuses(open_streams) or self._starts_left < 1:
            return False
        self._starts_left -= 1
        return True

    def _refuses(self, open_streams: int) -> bool:
        now = time.monotonic()
        late_now = max(now - self._due, self._oldest_setup_waiting(now))
        learnt_limit = self.limit < self.max_streams  # at MAX_STREAMS, the hard cap answers itself
        return self.lagging or late_now > self.bound or (learnt_limit and open_streams >= self.limit)

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


RETRY_AFTER_MS = (500, 1500)  # the spread of the retry hint a refusal under load gives


def retry_hint() -> dict[str, str]:
    """When a client refused under load should retry. The clients of one burst are refused
    together; told the same second, they would all come back in the same instant and be refused
    together again. So Retry-After says one second, and Retry-After-Ms (which the OpenAI SDKs
    read first) spreads them around it."""
    delay = random.randint(*RETRY_AFTER_MS)  # not secrets: nobody gains by guessing it
    return {"Retry-After": "1", "Retry-After-Ms": str(delay)}


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


# ------------------------------------------------------------------------------------------------
# Relay: one streaming response, from the first upstream byte to the last client byte.
# ------------------------------------------------------------------------------------------------


@dataclass
class Runtime:
    """What the routes share: built at start-up by the lifespan."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    client: UpstreamClient | None = None
    streams: anyio.CapacityLimiter | None = None
    shedder: LoadShedder | None = None
    shutting_down: anyio.Event | None = None
    demo: DemoModel | None = None
    model_listings: ModelsCache = field(default_factory=lambda: ModelsCache())
    replay: ReplayStore | None = None
    producers: dict[str, AnswerProducer] = field(default_factory=dict)  # the answers this process reads from the upstream
    producing: anyio.abc.TaskGroup | None = None  # where they run: they outlive the request that started them


class Slot:
    """A place among MAX_STREAMS upstream calls, held from admission to the response's end."""

    def __init__(self, limiter: anyio.CapacityLimiter, metrics: Metrics) -> None:
        self._limiter = limiter
        try:
            limiter.acquire_on_behalf_of_nowait(self)
        except anyio.WouldBlock:
            raise Slot.refusal(limiter, metrics) from None
        self._held = True

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


Producer = Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]]


class RelayResponse(StreamingResponse):
    """A StreamingResponse whose body comes from a producer task reading the upstream.

    The producer writes frames as they come; the response adds a heartbeat when nothing was sent
    for HEARTBEAT_SECONDS, and one terminal frame. It ends the stream (and aborts the upstream
    call) when the client leaves, when MAX_STREAM_SECONDS pass, or SHUTDOWN_GRACE_SECONDS after a
    shutdown signal.
    """

    def __init__(
        self,
        runtime: Runtime,
        exchange: Exchange,
        framing: Framing,
        produce: Producer,
        calls: list[UpstreamCall],
        slot: Slot | None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})}
        if framing.media_type == "text/plain":
            headers["X-Content-Type-Options"] = "nosniff"
        super().__init__((), headers=headers, media_type=framing.media_type)
        self.runtime, self.exchange, self.framing, self.produce = runtime, exchange, framing, produce
        self.calls, self.slot = calls, slot
        self.outcome = "client_disconnected"  # unless the stream reaches one of its own ends
        self.shutdown = False
        self.last_sent = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.runtime.metrics.active_streams.inc()
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.abort_upstream()
            if self.slot is not None:
                self.slot.release()
            self.runtime.metrics.active_streams.dec()
            self.exchange.outcome = self.outcome

    def abort_upstream(self) -> None:
        for call in self.calls:
            call.abort()

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        self.last_sent = time.monotonic()

        shedder = self.runtime.shedder
        assert shedder is not None

        async def emit(frame: bytes) -> None:
            self.last_sent = now = time.monotonic()
            if self.calls:  # a /chat reader has none: its producer reports the waits
                shedder.waited(self.calls[-1].waited(now))
            await send({"type": "http.response.body", "body": frame, "more_body": True})

        ending: StreamFailure | None = None
        async with anyio.create_task_group() as tasks:
            with anyio.CancelScope() as writing:
                tasks.start_soon(self._end_when_due, writing)
                if self.framing.heartbeat is not None:
                    tasks.start_soon(self._heartbeats, emit, self.framing.heartbeat)
                # The producer writes each frame itself: a channel to a writer task would cost a
                # task switch per frame.
                try:
                    ending = await self._produce(emit)
                except ClientGone:
                    if not writing.cancel_called:
                        tasks.cancel_scope.cancel()
                        return  # the client left: there is no one to send an ending to
            if writing.cancel_called:
                ending = cut_short(self.runtime.settings, self.shutdown)
            tasks.cancel_scope.cancel()

        if ending is None:
            await send({"type": "http.response.body", "body": self.framing.done(), "more_body": False})
            self.outcome = "completed"
            return
        self.outcome = OUTCOMES.get(ending.type, "error")
        final = self.framing.error_frame(ending)
        if final is not None:
            await send({"type": "http.response.body", "body": final, "more_body": False})
        # else: the response stays unfinished (no chunked terminator), so a plain-text reader sees
        # an incomplete read, never a clean end that looks like a whole answer.

    async def _produce(self, emit: Callable[[bytes], Awaitable[None]]) -> StreamFailure | None:
        """Run the producer; return the failure that ended the stream, if any."""
        try:
            await self.produce(emit)
        except StreamFailure as error:
            return error
        except ClientGone:
            raise  # aborted from outside: the client left, or the stream was cut short
        except Exception:
            log.exception("relaying %s failed", self.exchange.path)
            return StreamFailure("server_error", "The service failed while relaying the answer; the error was logged.")
        return None

    async def _end_when_due(self, writing: anyio.CancelScope) -> None:
        """Cut the stream short at MAX_STREAM_SECONDS, or SHUTDOWN_GRACE_SECONDS after a shutdown
        signal. However this task ends, also when the client left and Starlette cancelled it, it
        aborts the upstream call: the producer may be blocked on it in a worker thread, where no
        cancellation reaches."""
        assert self.runtime.shutting_down is not None
        try:
            with anyio.move_on_after(self.runtime.settings.max_stream_seconds):
                await self.runtime.shutting_down.wait()
                await anyio.sleep(self.runtime.settings.shutdown_grace_seconds)
                self.shutdown = True
            writing.cancel()
        finally:
            self.abort_upstream()

    async def _heartbeats(self, emit: Callable[[bytes], Awaitable[None]], heartbeat: bytes) -> None:
        """A heartbeat whenever HEARTBEAT_SECONDS pass without a frame: one timer per stream,
        not a timeout around the wait for each frame."""
        interval = self.runtime.settings.heartbeat_seconds
        while True:
            quiet = time.monotonic() - self.last_sent
            if quiet < interval:
                await anyio.sleep(interval - quiet)
            else:
                await emit(heartbeat)


def cut_short(settings: Settings, shutdown: bool) -> StreamFailure:
    """Why a stream ends before its answer does: a shutdown, or MAX_STREAM_SECONDS."""
    if shutdown:
        return StreamFailure("shutdown", "The service is restarting; the answer was cut short. Retry the request.")
    return StreamFailure("stream_timeout", f"The answer took longer than MAX_STREAM_SECONDS ({settings.max_stream_seconds:g} s).")


# ------------------------------------------------------------------------------------------------
# Requests: authentication, body and parameter checks.
# ------------------------------------------------------------------------------------------------

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
# Compared without case, "-" and "_": ?API_KEY=, ?apiKey= and ?api-key= are all keys in a URL.
KEY_QUERY_PARAMETERS = {"apikey", "key", "token", "accesstoken", "auth", "authorization", "bearer", "password", "secret"}


def _key_like(name: str) -> bool:
    return name.lower().replace("-", "").replace("_", "") in KEY_QUERY_PARAMETERS


def authenticate(request: Request, settings: Settings) -> None:
    if any(_key_like(name) for name in request.query_params):
        raise ServiceError(
            400,
            "API keys are not accepted in the URL, where logs and browser history keep them; "
            "send 'Authorization: Bearer <key>'.",
            code="key_in_url",
        )
    if settings.api_keys:
        require_key(request, settings.api_keys, "Missing or invalid API key; send 'Authorization: Bearer <key>'.")


def require_key(request: Request, keys: tuple[str, ...], message: str) -> None:
    """Refuse the request unless it sends one of `keys` as a bearer token."""
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    presented = presented.strip()
    # Digests of equal length, every key compared, in constant time: the timing tells nothing
    # about which key, or how much of one, matched.
    digest = hashlib.sha256(presented.encode()).digest()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(digest, hashlib.sha256(key.encode()).digest())
    if scheme.lower() != "bearer" or not presented or not matched:
        raise ServiceError(401, message, "invalid_request_error", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json module would accept NaN and Infinity


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large")
    return value


async def read_json_object(request: Request, settings: Settings) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ServiceError(415, "Send the request body as JSON with 'Content-Type: application/json'.", code="unsupported_media_type")
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ServiceError(413, f"The request body is larger than MAX_BODY_BYTES ({limit} bytes).", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServiceError(413, f"The request body is larger than MAX_BODY_BYTES ({limit} bytes).", code="body_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        raise ServiceError(400, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ServiceError(400, "The request body must be a JSON object.", code="invalid_json")
    if ESCAPED_SURROGATE.search(raw):
        where = _unencodable_text(body, "")
        if where is not None:
            raise ServiceError(400, f"'{where or 'body'}' holds a lone surrogate (\\ud800-\\udfff), which is not text.", param=where or None, code="invalid_json")
    return body


# JSON may write a UTF-16 half on its own ("\\ud800"); such a string cannot be encoded again, so
# it is refused here rather than fail on its way to the upstream. Pairs are fine (json joins them).
ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _unencodable_text(value: Any, where: str) -> str | None:
    """Where in `value` a string or key is not valid Unicode, if anywhere."""
    if isinstance(value, str):
        return None if _encodable(value) else where
    if isinstance(value, dict):
        for key, item in value.items():
            if not _encodable(key):
                return where
            found = _unencodable_text(item, f"{where}.{key}" if where else key)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _unencodable_text(item, f"{where}[{index}]")
            if found is not None:
                return found
    return None


def check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ServiceError(400, "'messages' must be a non-empty array of messages.", param="messages")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ServiceError(400, f"'{where}' must be an object with 'role' and 'content'.", param=where)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ServiceError(400, f"'{where}.role' must be one of {', '.join(sorted(ROLES))}.", param=f"{where}.role")
        content = message.get("content")
        if not (content is None or isinstance(content, (str, list))):
            raise ServiceError(400, f"'{where}.content' must be a string or an array of content parts.", param=f"{where}.content")
    return messages


def check_sampling(body: Mapping[str, Any]) -> None:
    """The parameters both endpoints understand; anything else is the upstream's to judge."""
    if "model" in body and (not isinstance(body["model"], str) or not body["model"].strip()):
        raise ServiceError(400, "'model' must be a non-empty string.", param="model")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise ServiceError(400, "'stream' must be true or false.", param="stream")
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2
    ):
        raise ServiceError(400, "'temperature' must be a number from 0 to 2.", param="temperature")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000_000):
            raise ServiceError(400, f"'{name}' must be a positive whole number.", param=name)
    if "stream_options" in body and not isinstance(body["stream_options"], (dict, type(None))):
        raise ServiceError(400, "'stream_options' must be an object.", param="stream_options")


CHAT_FIELDS = {"message", "messages", "model", "temperature", "max_tokens", "max_continuations"}
CONTINUATIONS_LIMIT = 8


def chat_request(fields: Mapping[str, Any], settings: Settings) -> tuple[dict[str, Any], int]:
    """The upstream request for a /chat call, from its JSON body or query, and how many times an
    answer cut by the output limit may be continued."""
    unknown = set(fields) - CHAT_FIELDS
    if unknown:
        raise ServiceError(400, f"Unknown field(s): {', '.join(sorted(unknown))}. /chat takes {', '.join(sorted(CHAT_FIELDS))}.", param=sorted(unknown)[0])
    if "message" in fields and "messages" in fields:
        raise ServiceError(400, "Send either 'message' or 'messages', not both.", param="message")
    if "messages" in fields:
        messages = check_messages(fields["messages"])
    else:
        message = fields.get("message")
        if not isinstance(message, str) or not message.strip():
            raise ServiceError(400, "'message' must be a non-empty string (or send 'messages').", param="message")
        messages = [{"role": "user", "content": message}]
    check_sampling(fields)
    body: dict[str, Any] = {"model": fields.get("model") or settings.model, "messages": messages, "stream": True}
    body["stream_options"] = {"include_usage": True}
    for name in ("temperature", "max_tokens"):
        if fields.get(name) is not None:
            body[name] = fields[name]
    continuations = fields.get("max_continuations", settings.max_continuations)
    if isinstance(continuations, bool) or not isinstance(continuations, int) or not 0 <= continuations <= CONTINUATIONS_LIMIT:
        raise ServiceError(400, f"'max_continuations' must be a whole number from 0 to {CONTINUATIONS_LIMIT}.", param="max_continuations")
    return body, continuations


def negotiate(accept: str) -> str:
    """The /chat framing the Accept header asks for; plain text unless it prefers SSE or NDJSON."""
    if not accept.strip():
        return "text/plain"
    ranked = []
    for position, part in enumerate(accept.split(",")):
        media, *parameters = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality > 0:
            ranked.append((-quality, position, media.lower()))
    for _, _, media in sorted(ranked):
        if media in CHAT_FRAMINGS:
            return media
        if media in {"*/*", "text/*"}:
            return "text/plain"
        if media == "application/*":
            return "application/x-ndjson"
    raise ServiceError(
        406, "Accept one of text/plain, text/event-stream or application/x-ndjson.", code="not_acceptable"
    )


# ------------------------------------------------------------------------------------------------
# Replay store: where the events of /chat answers live, so that a reader whose connection dropped
# picks up where it left off, on any worker or replica, without asking the model again.
#
# A /chat answer is read from the upstream by a producer (next section) that appends its events
# here; every reader, the one that asked included, follows them from here and frames them for its
# own Accept. By default the events live in this process's memory, bounded in time and bytes; with
# REDIS_URL, in Redis Streams, so that any process can serve a resume, and a lease key that the
# producing process keeps fresh tells readers when that process died (the producing process keeps
# its own answers in memory too, for its own readers).
# ------------------------------------------------------------------------------------------------

STREAM_ID_BYTES = 18  # 144 random bits, URL-safe, no "." (which separates the id from the sequence)
FOLLOW_POLL_SECONDS = 1.0  # how long a Redis reader blocks before it looks at the producer's lease


def new_stream_id() -> str:
    return secrets.token_urlsafe(STREAM_ID_BYTES)


def stream_digest(stream_id: str) -> str:
    """What logs and Redis keys show of a stream id: naming the answer, useless for resuming it."""
    return hashlib.sha256(stream_id.encode()).hexdigest()[:32]


def owner_digest(request: Request, settings: Settings) -> bytes:
    """Whose answer this is: the digest of the client's key, or one value for all without keys
    (then the unguessable stream id is the capability)."""
    if not settings.api_keys:
        return b"anyone"
    presented = request.headers.get("authorization", "").partition(" ")[2].strip()
    return hashlib.sha256(presented.encode()).digest()


def event_bytes(event: AnswerEvent) -> int:
    """About what an event costs to keep; text dominates, the rest is bookkeeping."""
    return 64 + len(event.data.get("text", "")) * 4 if event.kind == "delta" else 512


class ReplayStoreUnavailable(Exception):
    """The replay store (Redis) cannot be reached or failed."""


def replay_lost(message: str) -> StreamFailure:
    return StreamFailure("replay_unavailable", message)


class ReplayStore:
    """The interface of both stores, and who reads which answer in this process.

    Presence is what keeps an answer going: its producer stops RESUME_GRACE_SECONDS after the last
    reader left. Readers in this process count at once (join/leave, and `presence_changed` wakes
    the producer); the Redis store adds the readers of other processes.
    """

    kind = "none"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._readers: dict[str, int] = {}
        self._presence: dict[str, anyio.Event] = {}

    def join(self, stream_id: str) -> None:
        self._readers[stream_id] = self._readers.get(stream_id, 0) + 1
        self._signal_presence(stream_id)

    def leave(self, stream_id: str) -> None:
        left = self._readers.get(stream_id, 1) - 1
        if left:
            self._readers[stream_id] = left
        else:
            self._readers.pop(stream_id, None)
        self._signal_presence(stream_id)

    def local_readers(self, stream_id: str) -> int:
        return self._readers.get(stream_id, 0)

    def presence_changed(self, stream_id: str) -> anyio.Event:
        return self._presence.setdefault(stream_id, anyio.Event())

    def _signal_presence(self, stream_id: str) -> None:
        event = self._presence.pop(stream_id, None)
        if event is not None:
            event.set()

    async def readers(self, stream_id: str) -> int:
        """Readers of the answer anywhere."""
        return self.local_readers(stream_id)

    async def keep_present(self, stream_id: str) -> None:
        """Run by each reader while it reads: tells producers in other processes it is there."""

    async def start(self) -> None:
        """Check the store can be used; raises ConfigError if not."""

    async def close(self) -> None:
        pass

    async def open(self, stream_id: str, owner: bytes) -> None:
        raise NotImplementedError

    async def append(self, stream_id: str, events: list[AnswerEvent]) -> None:
        raise NotImplementedError

    async def end(self, stream_id: str) -> None:
        """The answer's last event is in: keep it RESUME_TTL_SECONDS more, then forget it."""
        raise NotImplementedError

    async def owner(self, stream_id: str) -> bytes | None:
        """Whose answer it is; None if there is no such answer (any more)."""
        raise NotImplementedError

    async def final_seq(self, stream_id: str) -> int | None:
        """The sequence number of the answer's last event, once it ended; None before."""
        raise NotImplementedError

    def follow(self, stream_id: str, after: int) -> AsyncGenerator[list[AnswerEvent], None]:
        """Every event after `after`, in batches, then the live ones until the last; raises
        StreamFailure when events the reader lacks are gone or the producer died."""
        raise NotImplementedError

    async def hold_lease(self, stream_id: str, cancel: Callable[[], None]) -> None:
        """Run by the producer for as long as it produces: calls `cancel` when another process
        asks to stop the answer."""

    async def request_cancel(self, stream_id: str) -> None:
        """Ask the producer in another process to stop the answer."""

    def usage(self) -> dict[str, Any]:
        return {"store": self.kind}


@dataclass
class _MemoryAnswer:
    owner: bytes
    events: list[AnswerEvent] = field(default_factory=list)
    size: int = 0
    ended: bool = False
    dropped: bool = False  # evicted to keep the store within RESUME_MAX_BYTES
    changed: anyio.Event = field(default_factory=anyio.Event)
    positions: dict[object, int] = field(default_factory=dict)  # of the readers following it: the last seq each has

    def first_seq(self) -> int:
        return self.events[0].seq if self.events else 0

    def drop_oldest(self, target: int) -> int:
        """Forget the oldest events (keeping the last, and what a reader following the answer has
        yet to read) until at most `target` bytes are kept."""
        read_by_all = min(self.positions.values(), default=math.inf)
        count = freed = 0
        while count < len(self.events) - 1 and self.size - freed > target and self.events[count].seq <= read_by_all:
            freed += event_bytes(self.events[count])
            count += 1
        del self.events[:count]
        self.size -= freed
        return freed


class MemoryReplayStore(ReplayStore):
    """Events in this process's memory: RESUME_MAX_ANSWER_BYTES per answer and RESUME_MAX_BYTES in
    all, oldest dropped first, except what a connected reader has yet to read; an ended answer is
    forgotten RESUME_TTL_SECONDS after its end."""

    kind = "memory"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._answers: dict[str, _MemoryAnswer] = {}  # oldest first
        self._expiries: deque[tuple[float, str]] = deque()  # ended answers, in the order they end
        self._bytes = 0

    def _forget_expired(self) -> None:
        now = time.monotonic()
        while self._expiries and self._expiries[0][0] <= now:
            self._drop(self._expiries.popleft()[1])

    def _drop(self, stream_id: str) -> None:
        answer = self._answers.pop(stream_id, None)
        if answer is not None:
            self._bytes -= answer.size
            answer.dropped = True
            answer.changed.set()

    async def open(self, stream_id: str, owner: bytes) -> None:
        self._forget_expired()
        self._answers[stream_id] = _MemoryAnswer(owner)

    async def append(self, stream_id: str, events: list[AnswerEvent]) -> None:
        answer = self._answers.get(stream_id)
        if answer is None:
            return  # evicted whole: its readers were told
        added = sum(event_bytes(event) for event in events)
        answer.events += events
        answer.size += added
        self._bytes += added
        if answer.size > self.settings.resume_answer_bytes:
            # Down to three quarters, so that a long answer trims now and then, not on every event.
            self._bytes -= answer.drop_oldest(self.settings.resume_answer_bytes * 3 // 4)
        if self._bytes > self.settings.resume_total_bytes:
            self._evict(self.settings.resume_total_bytes * 3 // 4)
        answer.changed.set()
        answer.changed = anyio.Event()

    def _evict(self, target: int) -> None:
        """Oldest answers first: an ended one goes whole, a running one keeps only its newest."""
        for stream_id, answer in list(self._answers.items()):
            if self._bytes <= target:
                return
            if answer.ended and not answer.positions:
                self._drop(stream_id)
            else:
                self._bytes -= answer.drop_oldest(max(0, answer.size - (self._bytes - target)))

    async def end(self, stream_id: str) -> None:
        answer = self._answers.get(stream_id)
        if answer is not None:
            answer.ended = True
            self._expiries.append((time.monotonic() + self.settings.resume_ttl_seconds, stream_id))

    async def owner(self, stream_id: str) -> bytes | None:
        self._forget_expired()
        answer = self._answers.get(stream_id)
        return None if answer is None else answer.owner

    async def final_seq(self, stream_id: str) -> int | None:
        answer = self._answers.get(stream_id)
        return answer.events[-1].seq if answer is not None and answer.ended and answer.events else None

    def holds(self, stream_id: str, after: int) -> bool:
        """Whether every event of the answer after `after` is still here."""
        answer = self._answers.get(stream_id)
        return answer is not None and not answer.dropped and (not answer.events or answer.first_seq() <= after + 1)

    async def follow(self, stream_id: str, after: int) -> AsyncGenerator[list[AnswerEvent], None]:
        answer = self._answers.get(stream_id)
        if answer is None:
            raise replay_lost("The answer is no longer kept.")
        reader = object()
        try:
            while True:
                if answer.dropped or (answer.events and answer.first_seq() > after + 1):
                    raise replay_lost("The service no longer keeps the part of the answer this reader lacks.")
                answer.positions[reader] = after
                start = after + 1 - answer.first_seq() if answer.events else 0
                if answer.ended and start >= len(answer.events):
                    raise replay_lost("The answer has no events after that one.")
                if start < len(answer.events):
                    batch = answer.events[start:]
                    yield batch
                    if batch[-1].kind != "delta":
                        return
                    after = batch[-1].seq
                    continue
                await answer.changed.wait()
        finally:
            answer.positions.pop(reader, None)

    def usage(self) -> dict[str, Any]:
        self._forget_expired()
        return {"store": self.kind, "answers": len(self._answers), "bytes": self._bytes, "max_bytes": self.settings.resume_total_bytes}


class RedisReplayStore(ReplayStore):
    """Events in Redis Streams, shared by every worker and replica that uses the same Redis.

    Per answer (keys named by the id's digest): a stream of batches, each entry's id is the last
    sequence number it holds, so that XREAD after "<n>-0" returns exactly the batches with events
    after n; a hash with the owner's digest, the first sequence kept and a cancel request; a lease
    key that only the producing process renews; a sorted set of readers, scored by when their
    presence lapses. Everything expires: RESUME_TTL_SECONDS after the end, or MAX_STREAM_SECONDS
    later if the producer vanished without ending.
    """

    kind = "redis"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        assert settings.redis_url is not None
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=2 * settings.max_streams + 32,  # a blocked XREAD per reader, and the producers'
            timeout=10,  # the longest wait for a free connection
            socket_timeout=FOLLOW_POLL_SECONDS + 4,
            socket_connect_timeout=5,
        )
        self.redis = redis.asyncio.Redis(connection_pool=pool)
        # The answers this process produces, also in its memory: their readers here (as a rule, the
        # one that asked) follow them without a round trip to Redis for each batch.
        self.produced_here = MemoryReplayStore(settings)
        self._sizes: dict[str, deque[tuple[int, int]]] = {}  # per answer produced here: (last seq, bytes) per entry
        self._kept: dict[str, int] = {}

    @staticmethod
    def _keys(stream_id: str) -> tuple[str, str, str, str]:
        base = f"relay:answer:{{{stream_digest(stream_id)}}}"  # one hash slot for all four, as Redis Cluster wants
        return f"{base}:events", f"{base}:meta", f"{base}:lease", f"{base}:readers"

    @asynccontextmanager
    async def _reaching(self) -> AsyncIterator[None]:
        try:
            yield
        except redis.RedisError as error:
            raise ReplayStoreUnavailable(f"the replay store failed: {error.__class__.__name__}") from None

    async def start(self) -> None:
        try:
            await self.redis.ping()
        except redis.RedisError as error:
            raise ConfigError(f"REDIS_URL: cannot use Redis there ({error}).") from None

    async def close(self) -> None:
        await self.redis.aclose()

    def _lease_ms(self) -> int:
        return int(self.settings.resume_lease_seconds * 1000)

    def _running_ms(self) -> int:
        return int((self.settings.resume_ttl_seconds + self.settings.max_stream_seconds) * 1000)

    async def open(self, stream_id: str, owner: bytes) -> None:
        events, meta, lease, _ = self._keys(stream_id)
        async with self._reaching(), self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(meta, mapping={"owner": owner.hex(), "first": 1})
            pipe.pexpire(meta, self._running_ms())
            pipe.set(lease, 1, px=self._lease_ms())
            await pipe.execute()
        self._sizes[stream_id], self._kept[stream_id] = deque(), 0
        await self.produced_here.open(stream_id, owner)

    async def append(self, stream_id: str, events: list[AnswerEvent]) -> None:
        await self.produced_here.append(stream_id, events)
        key, meta, _, _ = self._keys(stream_id)
        last = events[-1].seq
        size = sum(event_bytes(event) for event in events)
        sizes = self._sizes[stream_id]
        sizes.append((last, size))
        self._kept[stream_id] += size
        async with self._reaching(), self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"e": json.dumps([[e.seq, e.kind, e.data] for e in events], ensure_ascii=False)}, id=f"{last}-0")
            if len(sizes) == 1:
                pipe.pexpire(key, self._running_ms())
            if events[-1].kind != "delta":
                pipe.hset(meta, "last", last)  # the answer's end: nothing follows it
            if self._kept[stream_id] > self.settings.resume_answer_bytes and len(sizes) > 1:
                while len(sizes) > 1 and self._kept[stream_id] > self.settings.resume_answer_bytes * 3 // 4:
                    self._kept[stream_id] -= sizes.popleft()[1]
                first_kept = sizes[0][0]
                pipe.xtrim(key, minid=f"{first_kept}-0")
                pipe.hset(meta, "first", first_kept)  # an upper bound of the first sequence kept
            await pipe.execute()

    async def end(self, stream_id: str) -> None:
        await self.produced_here.end(stream_id)
        events, meta, lease, readers = self._keys(stream_id)
        self._sizes.pop(stream_id, None)
        self._kept.pop(stream_id, None)
        ttl = int(self.settings.resume_ttl_seconds * 1000)
        async with self._reaching(), self.redis.pipeline(transaction=True) as pipe:
            pipe.pexpire(events, ttl)
            pipe.pexpire(meta, ttl)
            pipe.delete(lease, readers)
            await pipe.execute()

    async def owner(self, stream_id: str) -> bytes | None:
        here = await self.produced_here.owner(stream_id)
        if here is not None:
            return here
        _, meta, _, _ = self._keys(stream_id)
        async with self._reaching():
            owner = await self.redis.hget(meta, "owner")
        return None if owner is None else bytes.fromhex(owner.decode())

    async def final_seq(self, stream_id: str) -> int | None:
        if await self.produced_here.owner(stream_id) is not None:
            return await self.produced_here.final_seq(stream_id)
        _, meta, _, _ = self._keys(stream_id)
        async with self._reaching():
            last = await self.redis.hget(meta, "last")
        return None if last is None else int(last)

    async def follow(self, stream_id: str, after: int) -> AsyncGenerator[list[AnswerEvent], None]:
        if self.produced_here.holds(stream_id, after):
            async with aclosing(self.produced_here.follow(stream_id, after)) as here:
                async for batch in here:
                    yield batch
            return
        key, meta, lease, _ = self._keys(stream_id)
        async with self._reaching():
            first, last = await self.redis.hmget(meta, ["first", "last"])
        if first is None or int(first) > after + 1:
            raise replay_lost("The service no longer keeps the part of the answer this reader lacks.")
        if last is not None and after >= int(last):
            raise replay_lost("The answer has no events after that one.")
        cursor, waited_on_lease = f"{after}-0", False
        while True:
            async with self._reaching():
                reply = await self.redis.xread({key: cursor}, count=256, block=int(FOLLOW_POLL_SECONDS * 1000))
                if reply:
                    waited_on_lease = False
                else:
                    if waited_on_lease:
                        raise replay_lost("The process producing this answer stopped; ask again.")
                    # Silence: fine while the producer lives; once its lease lapsed, one more look
                    # for what it may have written just before.
                    waited_on_lease = not await self.redis.exists(lease)
                    continue
            for entry_id, fields in reply[0][1]:
                cursor = entry_id
                batch = [AnswerEvent(seq, kind, data) for seq, kind, data in json.loads(fields[b"e"]) if seq > after]
                if not batch:
                    continue
                if batch[0].seq != after + 1:
                    raise replay_lost("The service no longer keeps the part of the answer this reader lacks.")
                yield batch
                if batch[-1].kind != "delta":
                    return
                after = batch[-1].seq

    async def hold_lease(self, stream_id: str, cancel: Callable[[], None]) -> None:
        _, meta, lease, _ = self._keys(stream_id)
        while True:
            await anyio.sleep(self.settings.resume_lease_seconds / 3)
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.set(lease, 1, px=self._lease_ms())
                    pipe.hget(meta, "cancel")
                    _, cancelled = await pipe.execute()
            except redis.RedisError:
                log.warning("renewing the lease of answer %s failed", stream_digest(stream_id))
                continue
            if cancelled is not None:
                cancel()

    async def request_cancel(self, stream_id: str) -> None:
        _, meta, _, _ = self._keys(stream_id)
        async with self._reaching():
            await self.redis.hset(meta, "cancel", 1)

    async def readers(self, stream_id: str) -> int:
        local = self.local_readers(stream_id)
        if local:
            return local
        async with self._reaching():
            return int(await self.redis.zcount(self._keys(stream_id)[3], time.time(), "+inf"))

    async def keep_present(self, stream_id: str) -> None:
        readers = self._keys(stream_id)[3]
        token = secrets.token_hex(8)
        lease = self.settings.resume_lease_seconds
        try:
            while True:
                try:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        pipe.zadd(readers, {token: time.time() + lease})
                        pipe.pexpire(readers, self._lease_ms())
                        await pipe.execute()
                except redis.RedisError:
                    pass  # then this reader's own reads fail too, and it ends
                await anyio.sleep(lease / 3)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                try:
                    await self.redis.zrem(readers, token)
                except redis.RedisError:
                    pass  # it lapses by itself within RESUME_LEASE_SECONDS

    def usage(self) -> dict[str, Any]:
        return {**self.produced_here.usage(), "store": self.kind}


def make_replay_store(settings: Settings) -> ReplayStore:
    return RedisReplayStore(settings) if settings.redis_url else MemoryReplayStore(settings)


# ------------------------------------------------------------------------------------------------
# Resumable answers: a /chat answer is read from the upstream by a producer that outlives the
# request that started it, into the replay store, and every reader follows it from there.
#
# The producer stops when the answer ends, when it is cancelled (DELETE), at MAX_STREAM_SECONDS or
# shutdown, and RESUME_GRACE_SECONDS after its last reader left: long enough for a dropped
# connection to come back, short enough that nobody pays long for an answer nobody reads.
# ------------------------------------------------------------------------------------------------

PRESENCE_POLL_SECONDS = 0.25  # how often a producer without local readers asks after remote ones
AnswerSource = Callable[[Callable[[list[str]], Awaitable[None]]], Awaitable[dict[str, Any]]]


class AnswerProducer:
    """Runs `source` (which reads the upstream and hands each batch of text to `emit`, and returns
    the summary for the done event) into the replay store, and always ends the answer there with
    a done or error event."""

    def __init__(self, runtime: Runtime, stream_id: str, source: AnswerSource, calls: list[UpstreamCall], slot: Slot) -> None:
        assert runtime.replay is not None
        self.runtime, self.store, self.stream_id = runtime, runtime.replay, stream_id
        self.source, self.calls, self.slot = source, calls, slot
        self.seq = 0
        self.stopped: StreamFailure | None = None
        self.finished = anyio.Event()

    def stop(self, reason: StreamFailure) -> None:
        if self.stopped is None:
            self.stopped = reason
        for call in self.calls:
            call.abort()

    def cancel(self) -> None:
        self.stop(StreamFailure("cancelled", "The answer was stopped on request."))

    async def emit(self, texts: list[str]) -> None:
        """Store the pieces of one read of the upstream: called for every read, also one without
        text (the role chunk, usage), so that the load shedder measures how long the read waited
        for this process, not how long the model took between a read without text and the next."""
        assert self.runtime.shedder is not None
        self.runtime.shedder.waited(self.calls[-1].waited(time.monotonic()))
        if not texts:
            return
        events = [AnswerEvent(self.seq + number, "delta", {"text": text}) for number, text in enumerate(texts, 1)]
        self.seq += len(events)
        await self.store.append(self.stream_id, events)

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._stop_when_due)
                tasks.start_soon(self._stop_when_abandoned)
                tasks.start_soon(self.store.hold_lease, self.stream_id, self.cancel)
                kind, data = await self._produce()
                tasks.cancel_scope.cancel()
            self.seq += 1
            try:
                await self.store.append(self.stream_id, [AnswerEvent(self.seq, kind, data)])
            finally:
                await self.store.end(self.stream_id)  # also after a failed append: the answer must expire
        except ReplayStoreUnavailable as error:
            log.warning("answer %s ended without its last event: %s", stream_digest(self.stream_id), error)
        except Exception:
            log.exception("producing answer %s failed", stream_digest(self.stream_id))
        finally:
            for call in self.calls:
                call.abort()
            self.slot.release()
            self.runtime.producers.pop(self.stream_id, None)
            self.finished.set()

    async def _produce(self) -> tuple[str, dict[str, Any]]:
        try:
            return "done", await self.source(self.emit)
        except StreamFailure as error:
            failure = error
        except ClientGone:
            failure = self.stopped or StreamFailure("abandoned", "The answer was stopped.")
        except ReplayStoreUnavailable as error:
            log.warning("answer %s stopped: %s", stream_digest(self.stream_id), error)
            failure = replay_lost("The service could not keep the answer (its replay store failed); ask again.")
        except Exception:
            log.exception("relaying answer %s failed", stream_digest(self.stream_id))
            failure = StreamFailure("server_error", "The service failed while relaying the answer; the error was logged.")
        return "error", {"error": failure.error()}

    async def _stop_when_due(self) -> None:
        settings, shutting_down = self.runtime.settings, self.runtime.shutting_down
        assert shutting_down is not None
        with anyio.move_on_after(settings.max_stream_seconds):
            await shutting_down.wait()
            await anyio.sleep(settings.shutdown_grace_seconds)
            self.stop(cut_short(settings, shutdown=True))
            return
        self.stop(cut_short(settings, shutdown=False))

    async def _stop_when_abandoned(self) -> None:
        grace = self.runtime.settings.resume_grace_seconds
        absent_since: float | None = None
        while True:
            changed = self.store.presence_changed(self.stream_id)
            wait = math.inf
            if not self.store.local_readers(self.stream_id):
                try:
                    present = grace > 0 and await self.store.readers(self.stream_id) > 0
                except ReplayStoreUnavailable:
                    present = False
                now = time.monotonic()
                absent_since = None if present else (absent_since or now)
                if absent_since is not None and now - absent_since >= grace:
                    self.stop(StreamFailure("abandoned", f"Nobody read the answer for RESUME_GRACE_SECONDS ({grace:g} s), so it was stopped."))
                    return
                wait = PRESENCE_POLL_SECONDS if absent_since is None else min(PRESENCE_POLL_SECONDS, absent_since + grace - now)
            else:
                absent_since = None
            with anyio.move_on_after(wait):
                await changed.wait()


class AnswerReader(RelayResponse):
    """One reader of an answer: its events after `after` from the replay store, framed for the
    reader's Accept, then the live ones to the end. The fresh answer's own reader is one too, so a
    resumed answer looks exactly like the rest of a fresh one."""

    def __init__(
        self, runtime: Runtime, exchange: Exchange, framing: ChatFraming, stream_id: str, after: int, asked: AnswerProducer | None = None
    ) -> None:
        assert runtime.replay is not None
        self.store, self.stream_id, self.after, self.chat_framing = runtime.replay, stream_id, after, framing
        self.asked = asked  # the producer this request started, if it did
        self.store.join(stream_id)  # from now on: the producer may start before this response does
        super().__init__(runtime, exchange, framing, self._follow, [], None, {"X-Stream-ID": stream_id})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.store.leave(self.stream_id)
            if self.asked is not None:
                # The request that asked is logged with what the answer cost, known once it ended
                # (within the grace window, if its reader left and nobody came back).
                settings = self.runtime.settings
                with anyio.CancelScope(shield=True), anyio.move_on_after(settings.resume_grace_seconds + settings.shutdown_grace_seconds + 5):
                    await self.asked.finished.wait()

    async def _follow(self, emit: Callable[[bytes], Awaitable[None]]) -> None:
        if self.chat_framing.preamble:
            await emit(self.chat_framing.preamble)
        failure: Exception | None = None
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self.store.keep_present, self.stream_id)
            try:
                await self._relay(emit)
            except Exception as error:  # raised below, outside the task group, so not as a group
                failure = error
            finally:
                tasks.cancel_scope.cancel()
        if failure is not None:
            raise failure

    async def _relay(self, emit: Callable[[bytes], Awaitable[None]]) -> None:
        framing, exchange = self.chat_framing, self.exchange
        try:
            async with aclosing(self.store.follow(self.stream_id, self.after)) as following:
                async for events in following:
                    ending = events[-1] if events[-1].kind != "delta" else None
                    deltas = events[:-1] if ending is not None else events
                    if deltas:
                        await emit(framing.deltas(deltas))
                        exchange.pieces_sent(len(deltas))
                    if ending is not None:
                        framing.ending = ending
                        if ending.kind == "error":
                            raise StreamFailure(ending.data["error"]["type"], ending.data["error"]["message"])
                        return
        except ReplayStoreUnavailable as error:
            raise replay_lost(f"The answer cannot be read: {error}.") from None


# ------------------------------------------------------------------------------------------------
# Routes
# ------------------------------------------------------------------------------------------------


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def upstream_until_disconnect(request: Request, call: UpstreamCall, work: Awaitable[T]) -> T:
    """Await `work` (an upstream call that has not started the response yet), aborting the call if
    the client disconnects first."""

    async def abort_on_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        call.abort()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(abort_on_disconnect)
        try:
            return await work
        except Exception as error:  # raised below, outside the task group, so not as a group
            failure = error
        finally:
            tasks.cancel_scope.cancel()
    raise failure


async def call_upstream(request: Request, body: dict[str, Any], open: Opener = open_upstream) -> tuple[UpstreamCall, httpx2.Response]:
    """Note what the request asks of the upstream, and send it there (aborted if the client
    leaves before the answer starts)."""
    runtime, exchange = runtime_of(request), exchange_of(request)
    exchange.model = body["model"]
    exchange.prompt = body.get("messages", body.get("input")) if runtime.settings.log_content else None
    call = UpstreamCall()
    assert runtime.client is not None and runtime.shedder is not None
    runtime.shedder.setting_up(call)
    try:
        return call, await upstream_until_disconnect(request, call, open(runtime.client, call, body))
    finally:
        if call.thread_wait is None:
            call.thread_wait = 0.0  # it never reached a thread (refused, or its client left)
        runtime.shedder.waited(call.thread_wait)


def admit(request: Request) -> None:
    """The refusals that cost nothing, before the body is read: the key, a shutdown, a full service."""
    runtime = runtime_of(request)
    authenticate(request, runtime.settings)
    assert runtime.streams is not None and runtime.shutting_down is not None
    if runtime.shutting_down.is_set():
        raise ServiceError(503, "The service is shutting down; retry shortly.", "server_busy", "shutting_down", headers={"Retry-After": "1"})
    assert runtime.shedder is not None
    if not runtime.shedder.admits(int(runtime.streams.borrowed_tokens)):
        raise runtime.shedder.refuse(runtime.metrics)
    if runtime.streams.available_tokens < 1:
        raise Slot.refusal(runtime.streams, runtime.metrics)


def take_slot(request: Request) -> Slot:
    """A stream's place, taken only once the whole request was read: a client that sends its body
    slowly must not hold one."""
    runtime = runtime_of(request)
    assert runtime.streams is not None
    return Slot(runtime.streams, runtime.metrics)


def handle_errors(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Turn ServiceError into its JSON response; a client gone before the answer gets nothing."""

    async def wrapped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ServiceError as error:
            exchange_of(request).outcome = OUTCOMES.get(error.type, "rejected")
            return error.response()
        except (ClientGone, ClientDisconnect):
            return Response(status_code=499)  # nobody reads it; the log line says who left

    wrapped.__name__ = endpoint.__name__
    return wrapped


@handle_errors
async def chat_completions(request: Request) -> Response:
    """POST /v1/chat/completions: OpenAI's API, passed through."""
    keep_text = runtime_of(request).settings.log_content
    return await pass_through(
        request, lambda body: check_messages(body.get("messages")), open_upstream, lambda: OpenAIFraming(Transcript() if keep_text else None)
    )


async def pass_through(
    request: Request, check: Callable[[dict[str, Any]], Any], open: Opener, framing: Callable[[], PassThroughFraming]
) -> Response:
    """A /v1 request that makes an answer: checked (`check`, then the sampling fields), sent to the
    upstream (`open`), and the upstream's answer passed back as it comes, streamed (framed by
    `framing`) or whole."""
    runtime, exchange = runtime_of(request), exchange_of(request)
    settings = runtime.settings
    admit(request)
    body = await read_json_object(request, settings)
    check(body)
    check_sampling(body)
    body.setdefault("model", settings.model)
    slot = take_slot(request)
    try:
        call, response = await call_upstream(request, body, open)
    except BaseException:
        slot.release()
        raise
    if not body.get("stream"):
        slot.release()
        if settings.log_content:
            exchange.completion = response.text
        return Response(response.content, media_type="application/json")
    return relay_pass_through(request, call, response, framing(), slot)


def relay_pass_through(request: Request, call: UpstreamCall, response: httpx2.Response, framing: PassThroughFraming, slot: Slot) -> RelayResponse:
    """A /v1 stream: the upstream's events, each network read's worth sent the moment it arrived."""
    runtime, exchange = runtime_of(request), exchange_of(request)

    async def produce(emit: Callable[[bytes], Awaitable[None]]) -> None:
        _serving.set(call)
        try:
            async for payloads in iterate_in_threadpool(upstream_events(call, response, framing.whole_events)):
                pieces = framing.pieces
                frames = framing.events(payloads)
                if frames:
                    await emit(frames)
                    if framing.pieces > pieces:
                        exchange.pieces_sent(framing.pieces - pieces)
                if framing.failure is not None:
                    raise framing.failure
            unfinished = framing.unfinished()
            if unfinished is not None:
                raise unfinished
        finally:
            exchange.usage = framing.usage
            exchange.completion = framing.completion()

    return RelayResponse(runtime, exchange, framing, produce, [call], slot)


def check_response_request(body: Mapping[str, Any]) -> None:
    """A Responses API request's `input`: text, or an array of input items (the upstream judges
    the items); it may be left out only where the request names its input another way. And its
    output limit, `max_output_tokens`."""
    limit = body.get("max_output_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000_000):
        raise ServiceError(400, "'max_output_tokens' must be a positive whole number.", param="max_output_tokens")
    if "input" not in body and any(name in body for name in ("previous_response_id", "conversation", "prompt")):
        return
    if not isinstance(body.get("input"), (str, list)):
        raise ServiceError(400, "'input' must be a string or an array of input items.", param="input")


@handle_errors
async def responses(request: Request) -> Response:
    """POST /v1/responses: OpenAI's Responses API, passed through."""
    keep_text = runtime_of(request).settings.log_content
    return await pass_through(request, check_response_request, open_responses, lambda: ResponsesFraming(keep_text=keep_text))


@handle_errors
async def response_resource(request: Request) -> Response:
    """GET or DELETE /v1/responses/{id}, POST /v1/responses/{id}/cancel, GET
    /v1/responses/{id}/input_items: passed through; GET with ?stream=true streams the response's
    events again (from ?starting_after=N), as POST /v1/responses does."""
    runtime = runtime_of(request)
    admit(request)
    slot = take_slot(request)  # no body to wait for
    response_id = request.path_params["response_id"]
    path = request.url.path.removeprefix("/v1")
    stream = request.method == "GET" and not path.endswith("/input_items") and request.query_params.get("stream") == "true"
    try:
        call = UpstreamCall()
        assert runtime.client is not None
        opened = open_resource(runtime.client, call, request.method, path, request.query_params, stream)
        response = await upstream_until_disconnect(request, call, opened)
    except ServiceError as error:
        slot.release()
        if error.status == 404 and response_id not in error.message:  # not the upstream's "no such response"
            raise _no_responses_api(error, f"{request.method} /v1{path}") from None
        raise
    except BaseException:
        slot.release()
        raise
    if not stream:
        slot.release()
        return Response(response.content, media_type="application/json")
    return relay_pass_through(request, call, response, ResponsesFraming(keep_text=runtime.settings.log_content), slot)


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


@handle_errors
async def models(request: Request) -> Response:
    """GET /v1/models and /v1/models/{id}: the upstream's, cached briefly."""
    runtime = runtime_of(request)
    authenticate(request, runtime.settings)
    path = request.url.path
    cached = runtime.model_listings.get(path)
    if cached is not None:
        return Response(cached, media_type="application/json")
    admit(request)
    slot = take_slot(request)
    try:
        call = UpstreamCall()
        client = runtime.client
        assert client is not None
        model = request.path_params.get("model")

        def send() -> httpx2.Response:
            if model is None:
                return client.models.with_raw_response.list().http_response
            return client.models.with_raw_response.retrieve(model).http_response

        response = await upstream_until_disconnect(request, call, send_upstream(call, send, False, client.retries))
    finally:
        slot.release()
    runtime.model_listings.put(path, response.content)
    return Response(response.content, media_type="application/json")


GET_CHAT_PARAMETERS = {"q", "model", "max_tokens", "temperature"}


def _query_number(raw: str, name: str, kind: type[int] | type[float]) -> int | float:
    """A number from the URL, to be checked like the same field of a JSON body."""
    try:
        value = kind(raw)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ServiceError(400, f"'{name}' must be {what}, not {raw[:40]!r}.", param=name) from None
    return value


async def chat_fields(request: Request, settings: Settings) -> dict[str, Any]:
    if request.method == "GET":
        query = request.query_params
        unknown = set(query) - GET_CHAT_PARAMETERS
        if unknown:
            raise ServiceError(
                400,
                f"Unknown query parameter(s): {', '.join(sorted(unknown))}. GET /chat takes {', '.join(sorted(GET_CHAT_PARAMETERS))}.",
                param=sorted(unknown)[0],
            )
        text = query.get("q", "")
        if len(text) > settings.max_query_chars:
            raise ServiceError(414, f"'q' is longer than MAX_QUERY_CHARS ({settings.max_query_chars}); POST the message instead.", param="q", code="query_too_long")
        if not text.strip():
            raise ServiceError(400, "GET /chat needs the question in 'q', e.g. /chat?q=Hello.", param="q")
        fields: dict[str, Any] = {"message": text}
        if "model" in query:
            fields["model"] = query["model"]
        for name, kind in (("max_tokens", int), ("temperature", float)):
            if name in query:
                fields[name] = _query_number(query[name], name, kind)
        return fields
    return await read_json_object(request, settings)


@handle_errors
async def chat(request: Request) -> Response:
    """POST /chat {"message": ...} and GET /chat?q=...: the answer's text, framed as Accept asks.
    With Last-Event-ID (EventSource reconnecting), the rest of that answer, never a new one."""
    runtime, exchange = runtime_of(request), exchange_of(request)
    settings, store = runtime.settings, runtime.replay
    assert store is not None and runtime.producing is not None
    last_event_id = request.headers.get("last-event-id")
    if last_event_id is not None:
        authenticate(request, settings)
        stream_id, after = parse_last_event_id(last_event_id)
        return await resume(request, negotiate(request.headers.get("accept", "")), stream_id, after)
    admit(request)
    framing_name = negotiate(request.headers.get("accept", ""))
    upstream_body, continuations = chat_request(await chat_fields(request, settings), settings)
    slot = take_slot(request)
    stream_id = new_stream_id()
    try:
        # Before the upstream is asked: an answer that cannot be kept is not paid for.
        await store.open(stream_id, owner_digest(request, settings))
    except ReplayStoreUnavailable:
        slot.release()
        raise replay_store_down() from None
    try:
        call, response = await call_upstream(request, upstream_body)
    except BaseException:
        slot.release()
        with anyio.CancelScope(shield=True), suppress(ReplayStoreUnavailable):
            await store.end(stream_id)  # nothing to resume: let it expire
        raise
    transcript = Transcript()
    calls = [call]

    async def source(emit: Callable[[list[str]], Awaitable[None]]) -> dict[str, Any]:
        round_call, round_response = call, response
        while True:
            _serving.set(round_call)
            try:
                async for payloads in iterate_in_threadpool(upstream_events(round_call, round_response)):
                    await emit(transcript.read(payloads))  # also when empty: see AnswerProducer.emit
                    if transcript.failure is not None:
                        raise transcript.failure
                if not transcript.ended and transcript.finish_reason is None:
                    raise StreamFailure("upstream_error", "The upstream ended the stream before the answer was finished.")
            finally:
                # Whatever the model said reaches the reader, also ahead of an error.
                held = transcript.end_round()
                exchange.usage = transcript.usage  # the answer's cost is logged once, with the request that asked
                exchange.completion = transcript.text if settings.log_content else None
                if held:
                    await emit(held)
            if transcript.finish_reason != "length" or transcript.continuations >= continuations:
                return transcript.summary()
            # The output limit cut the answer: ask for the rest and stream it into the same answer.
            round_call = UpstreamCall()
            calls.append(round_call)  # before it starts, so that stopping the answer aborts it too
            assert runtime.client is not None
            try:
                round_response = await open_upstream(runtime.client, round_call, transcript.continuation(upstream_body))
            except ServiceError as error:
                raise StreamFailure(error.type, f"Continuing the answer failed: {error.message}") from None

    producer = runtime.producers[stream_id] = AnswerProducer(runtime, stream_id, source, calls, slot)
    reader = AnswerReader(runtime, exchange, CHAT_FRAMINGS[framing_name](stream_id), stream_id, 0, producer)
    runtime.producing.start_soon(producer.run)
    return reader


def replay_store_down() -> ServiceError:
    return ServiceError(503, "The service cannot reach its replay store (Redis); retry shortly.", "server_busy", "replay_store_unavailable", headers={"Retry-After": "1"})


def parse_last_event_id(value: str) -> tuple[str | None, int]:
    """`<stream id>.<sequence>` as the SSE events carry it; (None, 0) if it is not one."""
    stream_id, _, seq = value.strip().rpartition(".")
    if not STREAM_ID.fullmatch(stream_id) or not SEQUENCE.fullmatch(seq):
        return None, 0
    return stream_id, int(seq)


STREAM_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")
SEQUENCE = re.compile(r"[0-9]{1,9}")


async def resume(request: Request, framing_name: str, stream_id: str | None, after: int) -> Response:
    """Follow an answer from event `after` on. One that does not exist (any more), or is another
    key's, gets 204 on SSE, which tells EventSource to stop reconnecting, and 404 otherwise; one
    whose last event the reader already has gets 204 in every framing: nothing follows."""
    runtime = runtime_of(request)
    if stream_id is None or not await is_owner(request, stream_id):
        if framing_name == "text/event-stream":
            return Response(status_code=204)
        raise ServiceError(404, f"No such answer: it never existed, or ended more than RESUME_TTL_SECONDS ({runtime.settings.resume_ttl_seconds:g} s) ago.", code="stream_not_found")
    assert runtime.replay is not None
    try:
        final = await runtime.replay.final_seq(stream_id)
    except ReplayStoreUnavailable:
        raise replay_store_down() from None
    if final is not None and after >= final:
        # The reader has the whole answer. EventSource reconnects after every end of a response,
        # also after `done`; 204 is what makes it stop, instead of asking again every second.
        return Response(status_code=204)
    return AnswerReader(runtime, exchange_of(request), CHAT_FRAMINGS[framing_name](stream_id), stream_id, after)


async def is_owner(request: Request, stream_id: str) -> bool:
    """Whether the answer exists and the request's key started it (to any other key it does not exist)."""
    runtime = runtime_of(request)
    assert runtime.replay is not None
    try:
        owner = await runtime.replay.owner(stream_id)
    except ReplayStoreUnavailable:
        raise replay_store_down() from None
    return owner is not None and hmac.compare_digest(owner, owner_digest(request, runtime.settings))


@handle_errors
async def answer_stream(request: Request) -> Response:
    """GET /chat/streams/{id}?after=n: the answer's events after n (default: after Last-Event-ID's,
    else all), framed as Accept asks. DELETE /chat/streams/{id}: stop the answer now."""
    runtime = runtime_of(request)
    authenticate(request, runtime.settings)
    stream_id = request.path_params["stream_id"]
    if request.method == "DELETE":
        if not STREAM_ID.fullmatch(stream_id) or not await is_owner(request, stream_id):
            raise ServiceError(404, "No such answer to stop.", code="stream_not_found")
        producer = runtime.producers.get(stream_id)
        if producer is not None:
            producer.cancel()
        else:  # produced by another process, or over
            assert runtime.replay is not None
            try:
                await runtime.replay.request_cancel(stream_id)
            except ReplayStoreUnavailable:
                raise replay_store_down() from None
        return Response(status_code=204)
    framing_name = negotiate(request.headers.get("accept", ""))
    unknown = set(request.query_params) - {"after"}
    if unknown:
        raise ServiceError(400, f"Unknown query parameter(s): {', '.join(sorted(unknown))}. This route takes after.", param=sorted(unknown)[0])
    after_text = request.query_params.get("after")
    if after_text is not None:
        if not SEQUENCE.fullmatch(after_text):
            raise ServiceError(400, "'after' must be the sequence number of the last event received (0 for all).", param="after")
        after = int(after_text)
    else:
        resumed_id, after = parse_last_event_id(request.headers.get("last-event-id", ""))
        after = after if resumed_id == stream_id else 0
    return await resume(request, framing_name, stream_id if STREAM_ID.fullmatch(stream_id) else None, after)


async def healthz(request: Request) -> Response:
    runtime = runtime_of(request)
    settings = runtime.settings
    assert runtime.streams is not None and runtime.shedder is not None
    return JSONResponse(
        {
            "status": "ok",
            "demo": settings.demo,
            "model": settings.model,
            "active_streams": int(runtime.streams.borrowed_tokens),
            "max_streams": settings.max_streams,
            **runtime.shedder.report(int(runtime.streams.borrowed_tokens)),
            "replay": runtime.replay.usage() if runtime.replay is not None else None,
        }
    )


async def metrics(request: Request) -> Response:
    """GET /metrics: Prometheus text format; all workers' figures when there are several.

    It tells how busy the service is and what its clients do, so it is never more open than the
    API: METRICS_KEY, when set, is the only key it takes; otherwise the client keys, if any."""
    settings = runtime_of(request).settings
    if settings.metrics_key is not None:
        require_key(request, (settings.metrics_key,), "Send 'Authorization: Bearer <METRICS_KEY>'.")
    else:
        authenticate(request, settings)
    return Response(runtime_of(request).metrics.exposition(), media_type=prometheus_client.CONTENT_TYPE_LATEST)


PAGE = Path(__file__).resolve().parent / "static" / "index.html"


async def index(request: Request) -> Response:
    """GET /: a page that streams answers from /chat in the browser."""
    return FileResponse(PAGE, media_type="text/html")


async def not_found(request: Request, exc: Exception) -> Response:
    return ServiceError(404, f"No route {request.method} {request.url.path}.", code="not_found").response()


async def method_not_allowed(request: Request, exc: Exception) -> Response:
    allowed = getattr(exc, "headers", None) or {}
    return ServiceError(405, f"{request.method} is not allowed on {request.url.path}.", code="method_not_allowed", headers=allowed).response()


async def server_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return ServiceError(500, "The service failed unexpectedly; the error was logged.", "server_error", "internal_error").response()


# ------------------------------------------------------------------------------------------------
# Demo model: a simulated OpenAI-compatible upstream, served over loopback HTTP so that the demo
# goes through exactly the production path (openai client, worker thread, StreamingResponse).
# ------------------------------------------------------------------------------------------------

DEMO_ANSWER = (
    "This is the built-in demo model, not a real one. Each word you see left the model a moment "
    "ago and reached you at once: the service reads the model's stream in a worker thread and "
    "writes every piece to you as it arrives, instead of collecting the whole answer first. "
    "Set OPENAI_API_KEY to talk to OpenAI, or OPENAI_BASE_URL to use vLLM, Ollama or llama.cpp."
)


def demo_words(messages: list[dict[str, Any]]) -> list[str]:
    """The demo's answer, word by word; asked to continue a cut answer, the words it lacks."""
    questions = [m.get("content") for m in messages if m.get("role") == "user" and m.get("content") != CONTINUE_INSTRUCTION]
    asked = questions[-1] if questions else ""
    if not isinstance(asked, str):
        asked = "(a message with several parts)"
    asked = " ".join(asked.split())
    echo = f'You asked: "{asked[:120]}{"…" if len(asked) > 120 else ""}". ' if asked else ""
    text = echo + DEMO_ANSWER
    if messages and messages[-1].get("content") == CONTINUE_INSTRUCTION and len(messages) >= 2:
        answered = messages[-2].get("content")
        if isinstance(answered, str) and text.startswith(answered):
            text = text[len(answered) :]
    words = text.split(" ")
    return [word if index == 0 else " " + word for index, word in enumerate(words) if word or index > 0]


DEMO_MAX_CHOICES = 8


def demo_choices(body: Mapping[str, Any]) -> int:
    """How many choices a demo completion has: OpenAI's `n`, checked as OpenAI checks it."""
    n = body.get("n", 1)
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= DEMO_MAX_CHOICES:
        raise ServiceError(400, f"'n' must be a whole number from 1 to {DEMO_MAX_CHOICES} for the demo model.", param="n")
    return n


class DemoModel:
    """The demo upstream: its own uvicorn server on a loopback port, in a background thread."""

    def __init__(self, seconds_per_word: float) -> None:
        self.seconds_per_word = seconds_per_word
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self._socket.getsockname()[1]}/v1"
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.complete, methods=["POST"]),
                Route("/v1/responses", self.respond, methods=["POST"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.retrieve_model, methods=["GET"]),
                Route("/v1/responses/{response_id}{action:path}", self.stored_response, methods=["GET", "POST", "DELETE"]),
            ]
        )
        self._server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
        self._thread = threading.Thread(target=lambda: asyncio.run(self._server.serve([self._socket])), name="demo-model", daemon=True)

    def start(self) -> DemoModel:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)

    async def complete(self, request: Request) -> Response:
        body = await request.json()
        try:
            choices = demo_choices(body)
        except ServiceError as error:
            return error.response()
        model = body.get("model") or "demo"
        # Like a real server: one id and one creation time for every chunk of a completion.
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model}
        words = demo_words(body.get("messages") or [])
        limit = body.get("max_tokens") or body.get("max_completion_tokens") or len(words)
        finish_reason = "length" if limit < len(words) else "stop"
        words = words[:limit]
        usage = {"prompt_tokens": 12, "completion_tokens": choices * len(words), "total_tokens": 12 + choices * len(words)}
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(words)}
            return JSONResponse(
                {**head, "object": "chat.completion", "usage": usage,
                 "choices": [{"index": index, "message": message, "finish_reason": finish_reason} for index in range(choices)]}
            )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, usage: dict[str, int] | None = None) -> bytes:
            event: dict[str, Any] = {**head, "object": "chat.completion.chunk", "choices": []}
            if delta is not None:
                event["choices"] = [{"index": index, "delta": delta, "finish_reason": finish} for index in range(choices)]
            if usage is not None:
                event["usage"] = usage
            return b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n"

        async def events() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": ""})
            for word in words:
                await anyio.sleep(self.seconds_per_word)
                yield chunk({"content": word})
            yield chunk({}, finish_reason)
            if include_usage:
                yield chunk(usage=usage)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def list_models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [DEMO_MODEL]})

    async def retrieve_model(self, request: Request) -> Response:
        if request.path_params["model"] != DEMO_MODEL["id"]:
            error = ServiceError(404, f"The demo serves only the model 'demo', not {request.path_params['model']!r}.", code="model_not_found")
            return error.response()
        return JSONResponse(DEMO_MODEL)

    async def stored_response(self, request: Request) -> Response:
        response_id = request.path_params["response_id"]
        message = f"Response with id '{response_id}' not found: the demo model stores no responses."
        return ServiceError(404, message, code="not_found").response()

    async def respond(self, request: Request) -> Response:
        """The Responses API, with OpenAI's event sequence."""
        body = await request.json()
        model = body.get("model") or "demo"
        given = body.get("input")
        items = [{"role": "user", "content": given}] if isinstance(given, str) else [i for i in given or () if isinstance(i, dict)]
        words = demo_words(items)
        limit = body.get("max_output_tokens") or len(words)
        status = "incomplete" if limit < len(words) else "completed"
        words = words[:limit]
        text = "".join(words)
        response_id, item_id = f"resp_demo{uuid.uuid4().hex}", f"msg_demo{uuid.uuid4().hex}"
        part = {"type": "output_text", "text": text, "annotations": []}
        item = {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": [part]}
        usage = {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": len(words),
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 12 + len(words)}

        def response(status: str, output: list[Any], usage: dict[str, Any] | None) -> dict[str, Any]:
            incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
            return {"id": response_id, "object": "response", "created_at": int(time.time()), "status": status, "model": model,
                    "output": output, "usage": usage, "incomplete_details": incomplete, "error": None,
                    "parallel_tool_calls": True, "tool_choice": "auto", "tools": []}

        if not body.get("stream"):
            return JSONResponse(response(status, [item], usage))
        at = {"item_id": item_id, "output_index": 0, "content_index": 0}

        async def events() -> AsyncIterator[bytes]:
            sequence = iter(range(1_000_000))

            def event(kind: str, **fields: Any) -> bytes:
                data = json.dumps({"type": kind, "sequence_number": next(sequence), **fields}, ensure_ascii=False)
                return f"event: {kind}\ndata: {data}\n\n".encode()

            yield event("response.created", response=response("in_progress", [], None))
            yield event("response.in_progress", response=response("in_progress", [], None))
            yield event("response.output_item.added", output_index=0, item={**item, "status": "in_progress", "content": []})
            yield event("response.content_part.added", **at, part={**part, "text": ""})
            for word in words:
                await anyio.sleep(self.seconds_per_word)
                yield event("response.output_text.delta", **at, delta=word)
            yield event("response.output_text.done", **at, text=text)
            yield event("response.content_part.done", **at, part=part)
            yield event("response.output_item.done", output_index=0, item=item)
            yield event(f"response.{status}", response=response(status, [item], usage))

        return StreamingResponse(events(), media_type="text/event-stream")


DEMO_MODEL = {"id": "demo", "object": "model", "created": 1764547200, "owned_by": "streaming-relay (built-in demo, not a real model)"}


# ------------------------------------------------------------------------------------------------
# Serving layer: each client connection bounded in time, size and number.
#
# uvicorn, like most servers, trusts the client at the HTTP level: a request head may grow without
# limit (httptools buffers it all, on the event loop), the head and body may trickle in forever, a
# client that stops reading keeps the response's final write (and so its stream slot) waiting on its
# TCP window, and once descriptors run out every new client gets a reset. gunicorn bounds the head
# (limit_request_line, limit_request_field_size) and the time (timeout), h11 bounds what it buffers
# (max_incomplete_event_size), sse-starlette puts a deadline on each send; this is the same for
# uvicorn's httptools protocol, as a small subclass of it (`http=` setting): switching to uvicorn's
# h11 protocol would bound the head too, but answers 400 instead of 431, has no deadline on the
# request or on writes, and parses and frames every byte in Python. Answers from here are JSON like
# every other error, and close the connection.
# ------------------------------------------------------------------------------------------------

LINGER_SECONDS = 2.0  # for a client to read an answer of this layer before its connection is cut
DESCRIPTOR_RESERVE = 100  # log files, the event loop, the demo model, metrics files: not connections


def raise_descriptor_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit; return the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # some platforms cap it lower; the limit we have is used
    return soft


def connection_capacity(settings: Settings) -> int:
    """Client connections one process holds at once: its descriptors, less one upstream
    connection per stream and the reserve. A connection beyond it gets a 503, never a reset."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft - settings.max_streams - 16 - DESCRIPTOR_RESERVE


def connection_answer(error: ServiceError) -> bytes:
    """A whole HTTP response for `error`, that closes the connection."""
    body = error.encoded()
    head = [f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close"]
    head += [f"{name}: {value}" for name, value in error.headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class ServingProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with MAX_HEADER_BYTES, REQUEST_TIMEOUT_SECONDS,
    SEND_TIMEOUT_SECONDS and a bound on connections."""

    capacity: int | None = None  # per process, from the descriptor limit, on the first connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if ServingProtocol.capacity is None:
            ServingProtocol.capacity = connection_capacity(settings)
        self.expect_head()
        self.answered = False
        self.request_deadline: asyncio.TimerHandle | None = None
        self.stall_check: asyncio.TimerHandle | None = None
        self.unsent_at_check = 0
        self.arm_request_deadline()
        if len(self.connections) > ServingProtocol.capacity:
            # At once, before any request, and without lingering: a flood of connections must not
            # keep descriptors.
            error = ServiceError(503, "The service holds as many connections as it can; retry shortly.",
                                 "server_busy", "too_many_connections", headers={"Retry-After": "1"})
            log_connection_answer(503, "rejected")
            self.answered = True
            transport.write(connection_answer(error))
            transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.request_deadline, self.stall_check):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    # -- MAX_HEADER_BYTES: counted as the bytes arrive, before httptools buffers them

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return  # whatever follows an answer of this layer is read only to be dropped
        if self.in_head:
            self.head_bytes += len(data)
            if self.head_bytes > settings.max_header_bytes and not self.head_ends_in_time(data):
                self.answer_and_close(
                    ServiceError(431, f"The request line and headers are larger than MAX_HEADER_BYTES ({settings.max_header_bytes} bytes).",
                                 code="headers_too_large"),
                    "rejected",
                )
                return
            self.head_tail = (self.head_tail + data[-3:])[-3:]
        super().data_received(data)

    def expect_head(self) -> None:
        """What arrives next is the head of a new request."""
        self.head_bytes, self.head_tail, self.in_head = 0, b"", True

    def head_ends_in_time(self, data: bytes) -> bool:
        """Whether the head ends within `data` (what follows is body) and within the limit."""
        end = (self.head_tail + data).find(b"\r\n\r\n")
        return end >= 0 and self.head_bytes - len(data) - len(self.head_tail) + end + 4 <= settings.max_header_bytes

    def on_headers_complete(self) -> None:
        self.in_head = False
        super().on_headers_complete()

    # -- REQUEST_TIMEOUT_SECONDS: from the connection, or the end of the previous response, to the
    #    request's last byte

    def arm_request_deadline(self) -> None:
        self.request_deadline = self.loop.call_later(settings.request_timeout_seconds, self.request_too_slow)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self.request_deadline is not None:
            self.request_deadline.cancel()
            self.request_deadline = None
        self.expect_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.request_deadline is None and not self.transport.is_closing():
            self.arm_request_deadline()

    def request_too_slow(self) -> None:
        self.request_deadline = None
        if self.answered:
            return
        cycle = self.cycle
        if not self.in_head and cycle is not None and cycle.response_started:
            self.transport.abort()  # answered already (the body is no longer wanted): just close
            return
        if self.in_head and not self.head_bytes and cycle is not None:
            # Idle after a response: closed as uvicorn's keep-alive timeout closes it, without an
            # answer a client could take for that of the request it is sending at this moment.
            self.transport.close()
            return
        error = ServiceError(408, f"The request did not arrive within REQUEST_TIMEOUT_SECONDS ({settings.request_timeout_seconds:g} s).",
                             code="request_timeout")
        if not self.in_head and cycle is not None:
            # A route is waiting for the body: it learns that the client is gone, and its log
            # line says what happened.
            cycle.scope[CONNECTION_VERDICT] = (408, "request_timeout")  # type: ignore[literal-required]
            self.answer_and_close(error, None)
            return
        self.answer_and_close(error, "request_timeout" if self.head_bytes else None)

    # -- SEND_TIMEOUT_SECONDS: uvicorn stops a response's writes while the client's buffer is full;
    #    a client that takes no byte of it for that long is dropped

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.stall_check is None:
            self.unsent_at_check = self.transport.get_write_buffer_size()
            self.stall_check = self.loop.call_later(settings.send_timeout_seconds, self.check_stall)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.stall_check is not None:
            self.stall_check.cancel()
            self.stall_check = None

    def check_stall(self) -> None:
        unsent = self.transport.get_write_buffer_size()
        if unsent < self.unsent_at_check:  # slow, but reading
            self.unsent_at_check = unsent
            self.stall_check = self.loop.call_later(settings.send_timeout_seconds, self.check_stall)
            return
        self.stall_check = None
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.scope[CONNECTION_VERDICT] = (None, "client_stalled")  # type: ignore[literal-required]
        self.transport.abort()  # connection_lost then ends the response, and the route its stream

    # -- answers of the serving layer itself

    def send_400_response(self, msg: str) -> None:
        self.answer_and_close(ServiceError(400, "The request is not valid HTTP/1.1.", code="invalid_http"), "rejected")

    def answer_and_close(self, error: ServiceError, outcome: str | None) -> None:
        """Answer, then close as a lingering close does: the client may still be sending, and a
        close with its bytes unread would reset the connection before it read the answer."""
        if outcome is not None:  # None: a route logs it, or no request began (a silent connection)
            log_connection_answer(error.status, outcome)
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # A route still at work on this connection (waiting for a body, or answering a request
            # that garbage followed) learns that the client is gone: nothing more can be sent.
            cycle.disconnected = True
            cycle.message_event.set()
        self.answered, self.in_head = True, False
        self.transport.write(connection_answer(error))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.abort)


class ServingSupervisor(Multiprocess):
    """uvicorn's supervisor of several workers, which also stops listening the moment it is told
    to stop: the workers close their copies of the listening socket, but the supervisor's copy
    stays open, and the kernel would go on accepting connections that nobody answers."""

    def terminate_all(self) -> None:
        for listener in self.sockets:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # in every process that holds it: refused from now on
            except OSError:
                pass
        super().terminate_all()


# ------------------------------------------------------------------------------------------------
# CPU placement (PIN_WORKERS=1): each worker process keeps its threads on one CPU of its own.
#
# Each relayed token passes the GIL between two threads: a worker thread reads it from the
# upstream, the event loop writes it to the client. Left to the kernel, those threads run on
# any core, so each hand-off wakes a thread on another core (often moving it), and a worker
# thread woken by its upstream preempts the event loop only to find the GIL taken: at 100
# streams, about 12 context switches and 20 futex calls per token, most of the relay's CPU.
# Pinned, a worker process claims a CPU that no other worker process on the machine has claimed
# while there are enough, and keeps all its threads there, where a hand-off is a switch on one
# core; and its upstream threads are batch work (SCHED_BATCH), which does not preempt the event
# loop on waking. One process gains little from a second core, since its Python runs one thread
# at a time. But a pinned process cannot move away from a core that other programs keep busy,
# so this is for machines (or containers with CPUs of their own) that the service does not share.
# ------------------------------------------------------------------------------------------------


class CpuPlacement:
    """Where this process's threads run: anywhere (the default), or on one CPU."""

    def __init__(self) -> None:
        self.cpu: int | None = None
        self._claim: socket.socket | None = None  # held for the process's life; the claim ends with it
        self._batch_threads = threading.local()

    def pin(self) -> int | None:
        """Claim a CPU and move every thread of this process to it (threads started later inherit
        it); return the CPU, or None where there is no choice to make."""
        if not hasattr(os, "sched_setaffinity") or not Path("/proc/self/task").is_dir():
            return None  # Linux only
        allowed = sorted(os.sched_getaffinity(0))
        if len(allowed) < 2:
            return None
        cpu = self._claim_one(allowed)
        for thread in os.listdir("/proc/self/task"):
            with suppress(OSError):  # a thread that has just ended
                os.sched_setaffinity(int(thread), {cpu})
        self.cpu = cpu
        return cpu

    def _claim_one(self, allowed: list[int]) -> int:
        # An abstract Unix socket name is bound by one process at a time, and freed when it exits:
        # worker processes started by any launcher, and their replacements, spread over the CPUs.
        for cpu in allowed:
            claim = socket.socket(socket.AF_UNIX)
            try:
                claim.bind(f"\0streaming-relay-cpu-{cpu}")
            except OSError:
                claim.close()
                continue
            self._claim = claim
            return cpu
        return allowed[os.getpid() % len(allowed)]  # more worker processes than CPUs: they share

    def upstream_thread(self) -> None:
        """Called in a worker thread before each upstream read: the first time, a pinned process
        makes the thread batch work."""
        if self.cpu is not None and not getattr(self._batch_threads, "set", False):
            self._batch_threads.set = True
            with suppress(OSError):
                os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))


placement = CpuPlacement()


# ------------------------------------------------------------------------------------------------
# App
# ------------------------------------------------------------------------------------------------


def notice_shutdown_signals(on_signal: Callable[[], None]) -> None:
    """Learn of SIGTERM/SIGINT while uvicorn handles them: uvicorn stops accepting and waits for
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


class _UvicornNoise(logging.Filter):
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
    logging.getLogger("service").setLevel(settings.log_level.upper())
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per upstream call doubles ours
    logging.getLogger("uvicorn.error").addFilter(_UvicornNoise())


def without_head(route: Route) -> Route:
    """Starlette answers HEAD wherever GET is allowed, by running the GET handler and dropping the
    body. On a route that starts or follows an answer that would pay the upstream for text nobody
    can read, so HEAD gets a 405 there instead."""
    assert route.methods is not None
    route.methods.discard("HEAD")
    return route


def create_app(settings: Settings) -> Starlette:
    runtime = Runtime(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Each open stream keeps a worker thread waiting on the upstream; anyio's default 40 would
        # make the 41st stream (and every other thread-using route) wait in silence.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.max_streams + 40
        streams = runtime.streams = anyio.CapacityLimiter(settings.max_streams)
        runtime.shedder = LoadShedder(settings.shed_lag_seconds, settings.max_streams)
        runtime.shutting_down = anyio.Event()
        notice_shutdown_signals(runtime.shutting_down.set)
        configure_logging(settings)
        if settings.pin_workers:
            cpu = placement.pin()
            if cpu is not None:
                log.info("worker process %d: its threads run on CPU %d (PIN_WORKERS=1)", os.getpid(), cpu)
        if settings.demo:
            runtime.demo = DemoModel(settings.demo_seconds_per_word).start()
            log.warning("No OPENAI_API_KEY or OPENAI_BASE_URL: answering from the built-in DEMO model (not a real model).")
        runtime.client = make_openai_client(settings, runtime.demo.base_url if runtime.demo else settings.openai_base_url)
        runtime.replay = make_replay_store(settings)
        # Everything built so far lives as long as the process: the cyclic collector need not walk
        # it again, and with a higher first threshold it runs less often under per-token garbage.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
        background = [
            asyncio.ensure_future(runtime.shedder.run(lambda: int(streams.borrowed_tokens))),
            asyncio.ensure_future(keep_worker_threads_ready()),
        ]
        try:
            await runtime.replay.start()
            async with anyio.create_task_group() as runtime.producing:
                try:
                    yield
                finally:
                    # Answers nobody reads any more (uvicorn waited for the readers) end here.
                    for producer in list(runtime.producers.values()):
                        producer.stop(cut_short(settings, shutdown=True))
        finally:
            for task in background:
                task.cancel()
            await runtime.replay.close()
            runtime.client.close()
            if runtime.demo is not None:
                runtime.demo.stop()

    middleware = [Middleware(RequestLog, runtime=runtime)]
    if settings.cors_origins:
        # Pure ASGI: it adds headers and answers preflights, and never buffers a streamed body.
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
                expose_headers=["Retry-After", "Retry-After-Ms", "X-Stream-ID"],
                max_age=600,
            )
        )
    app = Starlette(
        middleware=middleware,
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/responses", responses, methods=["POST"]),
            without_head(Route("/v1/responses/{response_id}", response_resource, methods=["GET", "DELETE"])),
            Route("/v1/responses/{response_id}/cancel", response_resource, methods=["POST"]),
            Route("/v1/responses/{response_id}/input_items", response_resource, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model:path}", models, methods=["GET"]),
            without_head(Route("/chat", chat, methods=["GET", "POST"])),
            without_head(Route("/chat/streams/{stream_id}", answer_stream, methods=["GET", "DELETE"])),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", handle_errors(metrics), methods=["GET"]),
        ],
        exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error},
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    return app


def settings_or_exit() -> Settings:
    try:
        return load_settings(os.environ)
    except ConfigError as error:
        sys.exit(f"service: configuration error: {error}")


settings = settings_or_exit()
app = create_app(settings)


def main() -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s: %(message)s")
    if settings.redis_url is not None:
        try:
            redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5, socket_timeout=5).ping()
        except redis.RedisError as error:
            sys.exit(f"service: configuration error: REDIS_URL: cannot use Redis there ({error}).")
    # uvicorn re-raises SIGTERM after its graceful shutdown; exit 0 then, as process runners expect.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    if settings.workers > 1 and settings.redis_url is None:
        log.warning(
            "WEB_CONCURRENCY=%d without REDIS_URL: each worker keeps its own answers, so a resume "
            "(Last-Event-ID, /chat/streams/…) must reach the worker that started the answer. Set REDIS_URL "
            "to share them.", settings.workers,
        )
    if settings.workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Each worker writes its metrics here, and /metrics in any worker adds them all up.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="relay-metrics-")
    descriptors = raise_descriptor_limit()  # the workers inherit it
    if connection_capacity(settings) < 16:
        sys.exit(
            f"service: configuration error: MAX_STREAMS={settings.max_streams} needs more open files than the limit of "
            f"{descriptors} allows; raise it (ulimit -n) or lower MAX_STREAMS."
        )
    config = uvicorn.Config(
        "service:app",
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        http="service:ServingProtocol",
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 5,
        log_level=settings.log_level,
        access_log=False,  # the service writes its own line per request
    )
    server = uvicorn.Server(config)
    try:
        if settings.workers > 1:
            listener = config.bind_socket()
            try:
                ServingSupervisor(config, sockets=[listener]).run()
            finally:
                listener.close()
        else:
            server.run()
    except KeyboardInterrupt:
        pass  # Ctrl-C: uvicorn has shut down already
    if settings.workers == 1 and not server.started:
        sys.exit(3)  # uvicorn has logged why (the port is taken, say)


if __name__ == "__main__":
    main()
