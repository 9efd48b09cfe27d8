"""The serving layer: each client connection bounded in time, size and number, which only the HTTP
server can do. `python service.py` serves the app with it; `uvicorn service:app --http
relay.serving:ServingProtocol` gets it under plain uvicorn. Without it the app still enforces what
an app can (the write and request-body deadlines, limits, shedding) and warns once, at its first
request, of what is missing.

uvicorn, like most servers, trusts the client at the HTTP level: a request head may grow without
limit (httptools buffers it all, on the event loop), the head may trickle in forever, a client
that stops reading keeps its connection (and descriptor) until TCP gives up, and once descriptors
run out every new client gets a reset. gunicorn bounds the head (limit_request_line,
limit_request_field_size) and the time (timeout), h11 bounds what it buffers
(max_incomplete_event_size); this is the same for uvicorn's httptools protocol, as a small
subclass of it (`http=` setting): switching to uvicorn's h11 protocol would bound the head too,
but answers 400 instead of 431, has no deadline on the request or on writes, and parses and frames
every byte in Python. Answers from here are JSON like every other error, and close the connection.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable
from http import HTTPStatus

import redis
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from relay.config import ConfigError, Settings, load_settings
from relay.errors import ServiceError
from relay.observability import CONNECTION_VERDICT, SERVING_LAYER, log_connection_answer

log = logging.getLogger(__name__)


LINGER_SECONDS = 2.0  # for a client to read an answer of this layer before its connection is cut
MIN_CONNECTIONS = 16  # fewer than this, and the process could not serve its own health checks
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

    settings: Settings | None = None  # this process's, read from the environment on its first connection
    capacity: int | None = None  # per process, from the descriptor limit, on the first connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if ServingProtocol.settings is None:
            ServingProtocol.settings = load_settings(os.environ)  # as the app reads them; checked before serving
            ServingProtocol.capacity = self.first_capacity(ServingProtocol.settings)
        self.limits: Settings = ServingProtocol.settings
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

    @staticmethod
    def first_capacity(settings: Settings) -> int:
        """The connection bound, for a process that `serve()` may not have started (uvicorn
        --http relay.serving:ServingProtocol): its descriptor limit is raised here, and a limit
        too low for MAX_STREAMS is said once instead of refusing every connection."""
        raise_descriptor_limit()
        capacity = connection_capacity(settings)
        if capacity < MIN_CONNECTIONS:
            log.warning(
                "MAX_STREAMS=%d needs more open files than this process may have; it holds %d client connections "
                "at most. Raise the limit (ulimit -n) or lower MAX_STREAMS.", settings.max_streams, MIN_CONNECTIONS,
            )
        return max(capacity, MIN_CONNECTIONS)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self.request_deadline, self.stall_check):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[SERVING_LAYER] = True  # type: ignore[literal-required]

    # -- MAX_HEADER_BYTES: counted as the bytes arrive, before httptools buffers them; past it,
    #    nothing more is read

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return  # whatever follows an answer of this layer is read only to be dropped
        if self.in_head:
            self.head_bytes += len(data)
            limit = self.limits.max_header_bytes
            if self.head_bytes > limit and not self.head_ends_in_time(data):
                self.transport.pause_reading()  # the rest of the head stays in the kernel, unread
                self.answer_and_close(
                    ServiceError(431, f"The request line and headers are larger than MAX_HEADER_BYTES ({limit} bytes).",
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
        return end >= 0 and self.head_bytes - len(data) - len(self.head_tail) + end + 4 <= self.limits.max_header_bytes

    def on_headers_complete(self) -> None:
        self.in_head = False
        super().on_headers_complete()

    # -- REQUEST_TIMEOUT_SECONDS: from the connection, or the end of the previous response, to the
    #    request's last byte

    def arm_request_deadline(self) -> None:
        self.request_deadline = self.loop.call_later(self.limits.request_timeout_seconds, self.request_too_slow)

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
        error = ServiceError(408, f"The request did not arrive within REQUEST_TIMEOUT_SECONDS ({self.limits.request_timeout_seconds:g} s).",
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
            self.stall_check = self.loop.call_later(self.limits.send_timeout_seconds, self.check_stall)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.stall_check is not None:
            self.stall_check.cancel()
            self.stall_check = None

    def check_stall(self) -> None:
        unsent = self.transport.get_write_buffer_size()
        if unsent < self.unsent_at_check:  # slow, but reading
            self.unsent_at_check = unsent
            self.stall_check = self.loop.call_later(self.limits.send_timeout_seconds, self.check_stall)
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


def serve(settings: Settings, app: str) -> None:
    """Serve `app` (an import string) as `python service.py` does: with this serving layer,
    SETTINGS' workers, and an exit code a process runner understands."""
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
    descriptors = raise_descriptor_limit()  # the workers inherit it
    if connection_capacity(settings) < MIN_CONNECTIONS:
        sys.exit(
            f"service: configuration error: MAX_STREAMS={settings.max_streams} needs more open files than the limit of "
            f"{descriptors} allows; raise it (ulimit -n) or lower MAX_STREAMS."
        )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        http="relay.serving:ServingProtocol",
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


class AppFromEnvironment:
    """An app built from the environment's settings when the server first calls it (its
    lifespan's start-up, or the first request where the server runs no lifespan), not when it is
    imported. A bad setting fails the start-up with the message that names the variable, and the
    server exits."""

    def __init__(self, create_app: Callable[[Settings], ASGIApp]) -> None:
        self.create_app = create_app
        self.app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.app is None:
            try:
                settings = load_settings(os.environ)
            except ConfigError as error:
                if scope["type"] != "lifespan":
                    raise
                await receive()  # lifespan.startup
                await send({"type": "lifespan.startup.failed", "message": f"service: configuration error: {error}"})
                return
            self.app = self.create_app(settings)
        await self.app(scope, receive, send)
