"""The upstream adapter: the blocking `openai.OpenAI` client, read in worker threads, interruptible
from the event loop.

A worker thread blocked in recv() cannot be cancelled, and Starlette's disconnect handling waits
for it; meanwhile the upstream keeps generating (and billing). So every socket the openai client
reads or writes is registered with the UpstreamCall being served (found through a ContextVar,
which anyio copies into its worker threads), and UpstreamCall.abort() shuts that socket down from
the event loop: the blocked read returns at once, whether the upstream is mid-answer, silent
before its first token, or has not even sent its response headers yet.

It also decides what the client sees of an upstream that fails before the answer starts
(`service_error_from`), and when a failed call is tried again (`retry_pause`).
"""

from __future__ import annotations

import itertools
import logging
import math
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from typing import Any, Protocol, TypeVar

import anyio.to_thread
import httpcore2
import httpcore2._backends.sync
import httpx2
import openai

from relay.config import Settings
from relay.errors import ServiceError
from relay.placement import placement

log = logging.getLogger(__name__)
T = TypeVar("T")


class ClientGone(openai.OpenAIError):
    """Raised in a worker thread whose call was aborted. An OpenAIError, so the openai client
    neither retries it nor wraps it."""


serving_call: ContextVar[UpstreamCall | None] = ContextVar("serving_upstream_call", default=None)


class CallObserver(Protocol):
    """What tracing (relay.tracing) is told of a traced call, from the worker thread that makes it."""

    def attempt(self, request: httpx2.Request) -> None:
        """A request to the upstream (an attempt: the first, a retry, a fallback) is about to be sent."""

    def failed(self, error: Exception) -> None:
        """The attempt failed before its answer started."""

    def answered(self, response: httpx2.Response) -> None:
        """The attempt's whole answer arrived (a request without streaming)."""


TIMEOUT_NOT_SET = -1.0  # never a timeout httpcore asks for (a sentinel of False would equal 0.0)
CHUNK_FRAMING_BYTES = 32  # the most an HTTP chunk's size line and CRLFs take, in practice


class UpstreamCall:
    """One request to the upstream (one round of an answer), abortable from any thread."""

    def __init__(self) -> None:
        self.aborted = False
        self._stream: InterruptibleStream | None = None
        self.unsent_since = 0.0  # when the oldest read not yet written to the client returned
        self.created = time.monotonic()
        self.thread_wait: float | None = None  # seconds its first step waited for a worker thread
        self.first_output_by: float | None = None  # a deadline for the reads before the answer's first output (relay.fallback)
        self.trace: CallObserver | None = None  # its spans and metrics, when OpenTelemetry is on (relay.tracing)

    def arrived(self) -> None:
        """Called in the worker thread after each read that returned data."""
        if not self.unsent_since:
            self.unsent_since = time.monotonic()

    def waited(self, now: float) -> float:
        """How long what arrived waited to be written, at `now` when it is; 0 if nothing had."""
        since, self.unsent_since = self.unsent_since, 0.0
        return now - since if since else 0.0

    def read_timeout(self, timeout: float | None) -> float | None:
        """The next read's timeout: `timeout`, or what is left before `first_output_by` if less."""
        if self.first_output_by is None:
            return timeout
        left = max(self.first_output_by - time.monotonic(), 0.001)
        return left if timeout is None else min(timeout, left)

    def attach(self, stream: InterruptibleStream) -> None:
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


class InterruptibleStream(httpcore2.NetworkStream):
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
        call = serving_call.get()
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
            data = self._receive(max_bytes, timeout if call is None else call.read_timeout(timeout))
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
        return InterruptibleStream(self._inner.start_tls(ssl_context, server_hostname, timeout))

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


class InterruptibleBackend(httpcore2.SyncBackend):
    def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore2.NetworkStream:
        call = serving_call.get()
        if call is not None and call.aborted:
            raise ClientGone("the client went away")
        return InterruptibleStream(super().connect_tcp(*args, **kwargs))


class UpstreamClient(openai.OpenAI):
    """The openai client, retried by this service's policy (`retry_pause`) instead of its own,
    which waits out a 429's Retry-After, however long, in silence."""

    def __init__(self, retries: int, **options: Any) -> None:
        super().__init__(max_retries=0, **options)
        self.retries = retries


def make_openai_client(settings: Settings, base_url: str | None, api_key: str | None = None) -> UpstreamClient:
    transport = httpx2.HTTPTransport(
        limits=httpx2.Limits(max_connections=settings.max_streams + 16, max_keepalive_connections=settings.max_streams)
    )
    # httpx has no public setting for the network backend; its pool reads this for each new connection.
    transport._pool._network_backend = InterruptibleBackend()
    timeout = httpx2.Timeout(settings.read_timeout, connect=settings.connect_timeout)
    return UpstreamClient(
        settings.max_retries,
        api_key=api_key or settings.openai_api_key or "no-key",  # local servers (Ollama, vLLM) take any key
        base_url=base_url,
        timeout=timeout,
        http_client=httpx2.Client(transport=transport, timeout=timeout, event_hooks={"request": [attempt_begins]}),
    )


def attempt_begins(request: httpx2.Request) -> None:
    """httpx's hook before each request it sends: a traced call's attempt begins (retries and
    fallbacks included), and the request carries its trace context."""
    call = serving_call.get()
    if call is not None and call.trace is not None:
        call.trace.attempt(request)


async def in_worker_thread(call: UpstreamCall, function: Callable[[], T]) -> T:
    """Run `function` in a worker thread whose socket I/O `call.abort()` can interrupt. The
    wait for the thread to start it is kept in `call.thread_wait`."""
    submitted = time.monotonic()

    def timed() -> T:
        call.thread_wait = time.monotonic() - submitted
        return function()

    token = serving_call.set(call)
    try:
        return await anyio.to_thread.run_sync(timed)
    finally:
        serving_call.reset(token)


def _upstream_message(error: openai.APIStatusError) -> str:
    body = error.body
    if isinstance(body, Mapping) and isinstance(body.get("message"), str):
        return body["message"]
    return f"The upstream answered HTTP {error.status_code}."


def service_error_from(error: openai.OpenAIError) -> ServiceError:
    """What the client sees when the upstream fails before the first byte of the answer, with the
    upstream's own status kept (`upstream_status`) for whoever decides what to do next."""
    mapped = client_error_from(error)
    if isinstance(error, openai.APIStatusError):
        mapped.upstream_status = error.status_code
    return mapped


def client_error_from(error: openai.OpenAIError) -> ServiceError:
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
                if call.trace is not None:
                    call.trace.failed(error)
                pause = retry_pause(error, attempt, retries, time.monotonic() - started)
                if pause is None:
                    raise
                time.sleep(pause)
        if not stream:
            call.finish()  # httpx has read the whole answer already
            if call.trace is not None:
                call.trace.answered(response)
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


def no_responses_api(error: ServiceError, request: str) -> ServiceError:
    unsupported = ServiceError(
        404,
        f"The upstream has no Responses API: {request} answered 404 ({error.message}). OpenAI and recent vLLM "
        "versions serve it; older Ollama and llama.cpp servers do not. Use /v1/chat/completions with this upstream.",
        code="responses_api_unsupported",
    )
    unsupported.upstream_status = error.upstream_status
    return unsupported


async def open_responses(client: UpstreamClient, call: UpstreamCall, body: dict[str, Any]) -> httpx2.Response:
    """Send one Responses API request (POST /responses), the body as it is, posted as chat
    completions are (see open_upstream)."""
    try:
        return await post_upstream(client, call, "/responses", body)
    except ServiceError as error:
        if error.status == 404 and error.code != "model_not_found":
            raise no_responses_api(error, "POST /v1/responses") from None
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

