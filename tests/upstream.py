"""A fake OpenAI-compatible upstream for tests.

It speaks real HTTP/1.1 on 127.0.0.1 from a raw asyncio server running in its own
event loop on a daemon thread. Tests run synchronously in the main thread, pace the
replies with `threading.Event` gates, and can see exactly when the client closed the
TCP connection (`Recorded.closed_at`): that is how relay tests prove a client
disconnect cancelled the upstream request promptly.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import urllib.parse
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.client import responses
from pathlib import Path
from typing import Any

# Real captured upstream streams, carried by the repository (INDEX.md there says where each came from).
STREAMS_DIR = Path(__file__).resolve().parent / "captures" / "openai_streams"
RESPONSES_STREAMS_DIR = Path(__file__).resolve().parent / "captures" / "responses_streams"


def captured(name: str) -> bytes:
    """The exact body of a captured real stream, e.g. `captured("openai_gpt4o_text_usage")`."""
    return (STREAMS_DIR / f"{name}.sse").read_bytes()


def expected_text(name: str) -> str:
    # Decode the bytes ourselves: read_text() would translate newlines and alter the text.
    return (STREAMS_DIR / f"{name}.expected.txt").read_bytes().decode("utf-8")


GATE_TIMEOUT = 30.0  # a test that forgets to set a gate fails instead of hanging
GATE_POLL = 0.005  # threading.Event can't be awaited; 5 ms polling keeps closed_at precise
STALL_TIMEOUT = 60.0
WRITE_TIMEOUT = 30.0  # a client that stops reading must not pin the server forever
IDLE_TIMEOUT = 60.0  # far above httpx's 5 s keep-alive expiry, so pooled clients never race it
MAX_LINE = 64 * 1024  # longest request head or chunk-size line a sane client sends

CREATED = 1700000000
_AUTO_USAGE: Any = object()  # sentinel: derive usage from `pieces` (None means "send no usage")

MID_STREAM_ERROR = (
    b'data: {"error": {"message": "The server had an error while processing your request.", '
    b'"type": "server_error", "param": null, "code": null}}\n\n'
)
GARBAGE_EVENT = b"data: this is not json\n\n"
RESPONSES_ERROR_MESSAGE = "The server had an error while processing your request."

# (type, code, message) as OpenAI sends them for the statuses tests usually simulate.
_DEFAULT_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist or you do not have access to it."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request."),
}


@dataclass
class Reply:
    """What the fake upstream answers to one chat completion request.

    The *_after options cut the reply once N pieces were sent (N == len(pieces) cuts
    after the last piece, before the finish chunk; a larger N has no effect). A JSON
    reply (non-streaming, or status != 200) is a single piece: gate 0, delay,
    hold_headers, drop_after and stall_after apply to it; error_after and
    garbage_after do not. With `raw`, every event (comments and [DONE] included) is
    a piece.
    """

    pieces: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    gates: dict[int, threading.Event] = field(default_factory=dict)
    delay: float = 0.0
    role_chunk: bool = True
    finish_reason: str | None = "stop"
    usage: dict | None = _AUTO_USAGE  # streamed only if the request set stream_options.include_usage
    done: bool = True
    hold_headers: bool = False
    status: int = 200
    error_body: dict | bytes | None = None
    extra_headers: dict[str, str] = field(default_factory=dict)
    drop_after: int | None = None
    stall_after: int | None = None
    error_after: int | None = None
    garbage_after: int | None = None
    raw: bytes | None = None  # replayed verbatim event by event; role/finish/usage/[DONE] come only from it
    raw_chunks: list[bytes] | None = None  # like raw, but each item is one write, even mid-event or mid-character
    raw_status_body: bytes | None = None
    model: str = "fake-model"  # "" echoes the request's model

    def __post_init__(self) -> None:
        if self.usage is _AUTO_USAGE:
            n = len(self.pieces)
            self.usage = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict
    received_at: float
    closed_at: float | None = None
    finished: bool = False
    closed: threading.Event = field(default_factory=threading.Event)
    pieces_sent: int = 0
    method: str = "POST"
    query: dict[str, str] = field(default_factory=dict)
    connection: tuple[str, int] | None = None  # the service's end of the connection it came on


def _json(obj: object) -> bytes:
    # Compact, raw UTF-8 (no \uXXXX escapes), as real servers send it.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {responses.get(status, 'Unknown')}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _json_head(status: int, body: bytes, extra_headers: dict[str, str]) -> bytes:
    return _head(status, {"Content-Type": "application/json", "Content-Length": str(len(body)), **extra_headers})


def _error_json(message: str, type_: str, code: str | None) -> bytes:
    return _json({"error": {"message": message, "type": type_, "param": None, "code": code}})


def _default_error_body(status: int) -> bytes:
    fallback = ("server_error" if status >= 500 else "invalid_request_error", None, f"Fake upstream error {status}.")
    type_, code, message = _DEFAULT_ERRORS.get(status, fallback)
    return _error_json(message, type_, code)


MODELS = ("fake-model", "other-model")
MODEL_NOT_FOUND = {"error": {"message": "The model does not exist or you do not have access to it.",
                             "type": "invalid_request_error", "param": None, "code": "model_not_found"}}


def _model(model: str) -> dict:
    return {"id": model, "object": "model", "created": CREATED, "owned_by": "fake"}


def _after(path: str, prefix: str) -> str | None:
    """What follows `prefix` in `path` (URL-decoded), if `path` continues it."""
    at = path.find(prefix)
    return urllib.parse.unquote(path[at + len(prefix) :]) if at >= 0 and path[at + len(prefix) :] else None


def _invalid_request(status: int, message: str) -> bytes:
    """A complete response for requests the fake itself rejects (bad route, bad JSON)."""
    body = _error_json(message, "invalid_request_error", None)
    return _json_head(status, body, {}) + body


def _frame(data: bytes) -> bytes:
    """One HTTP/1.1 chunk, so every SSE event leaves as its own chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def _split_events(raw: bytes) -> list[bytes]:
    """Split at blank lines, keeping the separators, so the events join back to `raw` exactly."""
    parts = raw.split(b"\n\n")
    events = [part + b"\n\n" for part in parts[:-1]]
    if parts[-1]:
        events.append(parts[-1])
    return events


@dataclass
class _Plan:
    """A reply rendered to bytes.

    `head` goes out first (or, with hold_headers, together with event 0); each of
    `events` waits for its gate; `tail` follows only when the reply is not cut short.
    """

    head: bytes
    events: list[bytes]
    tail: list[bytes]
    chunked: bool
    error_event: Callable[[int], bytes] = lambda pieces: _frame(MID_STREAM_ERROR)  # error_after's event


def _error_plan(reply: Reply) -> _Plan:
    if reply.raw_status_body is not None:
        err = reply.raw_status_body
    elif isinstance(reply.error_body, bytes):
        err = reply.error_body
    elif reply.error_body is not None:
        err = _json(reply.error_body)
    else:
        err = _default_error_body(reply.status)
    return _Plan(_json_head(reply.status, err, reply.extra_headers), [err], [], chunked=False)


def _json_plan(reply: Reply, payload: object) -> _Plan:
    data = _json(payload)
    return _Plan(_json_head(200, data, reply.extra_headers), [data], [], chunked=False)


def _sse_head(reply: Reply) -> bytes:
    return _head(
        200,
        {
            "Content-Type": "text/event-stream; charset=utf-8",
            "Transfer-Encoding": "chunked",
            "Cache-Control": "no-cache",
            "Connection": "keep-alive",
            **reply.extra_headers,
        },
    )


def _plan(reply: Reply, body: dict, completion_id: str) -> _Plan:
    if reply.status != 200:
        return _error_plan(reply)
    model = reply.model or body.get("model", "")
    if not body.get("stream"):
        completion = _json(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": CREATED,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(reply.pieces), "refusal": None},
                        "logprobs": None,
                        "finish_reason": reply.finish_reason,
                    }
                ],
                "usage": reply.usage,
            }
        )
        return _Plan(_json_head(200, completion, reply.extra_headers), [completion], [], chunked=False)

    head = _sse_head(reply)
    if reply.raw is not None:
        return _Plan(head, [_frame(event) for event in _split_events(reply.raw)], [], chunked=True)
    if reply.raw_chunks is not None:
        return _Plan(head, [_frame(chunk) for chunk in reply.raw_chunks], [], chunked=True)

    def event(**fields: object) -> bytes:
        chunk = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "system_fingerprint": "fp_fake",
            **fields,
        }
        return _frame(b"data: " + _json(chunk) + b"\n\n")

    def choice(delta: dict, finish_reason: str | None = None) -> list[dict]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]

    if reply.role_chunk:
        head += event(choices=choice({"role": "assistant", "content": ""}))
    tail = []
    if reply.finish_reason is not None:
        tail.append(event(choices=choice({}, reply.finish_reason)))
    options = body.get("stream_options")
    if reply.usage is not None and isinstance(options, dict) and options.get("include_usage") is True:
        tail.append(event(choices=[], usage=reply.usage))
    if reply.done:
        tail.append(_frame(b"data: [DONE]\n\n"))
    return _Plan(head, [event(choices=choice({"content": piece})) for piece in reply.pieces], tail, chunked=True)


# -- the Responses API -------------------------------------------------------------------------------
#
# A streamed reply is OpenAI's real event sequence: response.created, response.in_progress,
# response.output_item.added, response.content_part.added, one response.output_text.delta per
# piece (the gated events), then the .done events and response.completed (response.incomplete for
# finish_reason "length"; no terminal event for finish_reason None). Every event carries
# `event: <type>` and a sequence_number counted from 0, and there is no [DONE].


def _responses_usage(usage: dict | None) -> dict | None:
    if usage is None:
        return None
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage["total_tokens"],
    }


def response_object(response_id: str, model: str, status: str, output: list, usage: dict | None = None, incomplete: dict | None = None) -> dict:
    return {
        "id": response_id, "object": "response", "created_at": CREATED, "status": status, "background": False,
        "error": None, "incomplete_details": incomplete, "instructions": None, "max_output_tokens": None,
        "model": model, "output": output, "parallel_tool_calls": True, "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None}, "store": True, "temperature": 1.0,
        "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": 1.0,
        "truncation": "disabled", "usage": usage, "user": None, "metadata": {},
    }


def responses_event(kind: str, sequence_number: int, **fields: object) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), _json({"type": kind, "sequence_number": sequence_number, **fields}))


def responses_error_event(sequence_number: int) -> bytes:
    """OpenAI's mid-stream error event."""
    return responses_event("error", sequence_number, code="server_error", message=RESPONSES_ERROR_MESSAGE, param=None)


def _responses_plan(reply: Reply, body: dict, response_id: str, starting_after: int = -1) -> _Plan:
    if reply.status != 200:
        return _error_plan(reply)
    model = reply.model or body.get("model", "")
    item_id = f"msg_{response_id.removeprefix('resp_')}"
    text = "".join(reply.pieces)
    part = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
    item_status = "incomplete" if reply.finish_reason == "length" else "completed"
    item = {"id": item_id, "type": "message", "status": item_status, "role": "assistant", "content": [part]}
    usage = _responses_usage(reply.usage)
    incomplete = {"reason": "max_output_tokens"} if reply.finish_reason == "length" else None
    status = "incomplete" if reply.finish_reason == "length" else "completed"
    finished = response_object(response_id, model, status, [item], usage, incomplete)
    if not body.get("stream"):
        return _json_plan(reply, finished)
    if reply.raw is not None:
        return _Plan(_sse_head(reply), [_frame(event) for event in _split_events(reply.raw)], [], chunked=True)
    if reply.raw_chunks is not None:
        return _Plan(_sse_head(reply), [_frame(chunk) for chunk in reply.raw_chunks], [], chunked=True)

    started = response_object(response_id, model, "in_progress", [])
    at = {"item_id": item_id, "output_index": 0, "content_index": 0}
    opening = [
        ("response.created", {"response": started}),
        ("response.in_progress", {"response": started}),
        ("response.output_item.added", {"output_index": 0, "item": {**item, "status": "in_progress", "content": []}}),
        ("response.content_part.added", {**at, "part": {**part, "text": ""}}),
    ]
    deltas = [("response.output_text.delta", {**at, "delta": piece, "logprobs": []}) for piece in reply.pieces]
    closing = [] if reply.finish_reason is None else [
        ("response.output_text.done", {**at, "text": text, "logprobs": []}),
        ("response.content_part.done", {**at, "part": part}),
        ("response.output_item.done", {"output_index": 0, "item": item}),
        (f"response.{status}", {"response": finished}),
    ]
    numbered = list(enumerate(opening + deltas + closing))
    opening_n, deltas_n = numbered[: len(opening)], numbered[len(opening) : len(opening) + len(deltas)]
    closing_n = numbered[len(opening) + len(deltas) :]

    def frames(events: list) -> list[bytes]:
        return [_frame(responses_event(kind, n, **fields)) for n, (kind, fields) in events if n > starting_after]

    head = _sse_head(reply) + b"".join(frames(opening_n) if reply.role_chunk else [])
    return _Plan(head, frames(deltas_n), frames(closing_n), chunked=True,
                 error_event=lambda pieces: _frame(responses_error_event(len(opening) + pieces)))


async def _wait_gate(gate: threading.Event | None) -> bool:
    """Poll rather than block, so the loop keeps watching the peer while a test holds the gate."""
    if gate is None:
        return True
    deadline = time.monotonic() + GATE_TIMEOUT
    while not gate.is_set():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(GATE_POLL)
    return True


def _mark_closed(rec: Recorded) -> None:
    """Record the end of the request once; later calls keep the first timestamp."""
    if rec.closed_at is None:
        rec.closed_at = time.monotonic()
        rec.closed.set()


class _BadRequest(Exception):
    pass


@dataclass
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float
    query: dict[str, str] = field(default_factory=dict)


class _Conn:
    """One client connection with its own read buffer.

    The buffer lets `watch_peer` keep reading while a reply is in progress (to notice
    EOF/reset at once) without losing bytes of a request the client sends next.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buf = bytearray()

    @property
    def closing(self) -> bool:
        return self.writer.transport.is_closing()

    def abort(self) -> None:
        """RST instead of FIN: the abrupt failure a crashed upstream produces."""
        self.writer.transport.abort()

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        try:
            await asyncio.wait_for(self.writer.drain(), WRITE_TIMEOUT)
        except TimeoutError:
            self.abort()
            raise ConnectionAbortedError("client stopped reading") from None

    async def _fill(self) -> None:
        data = await self.reader.read(65536)
        if not data:
            raise EOFError
        self.buf += data

    async def watch_peer(self) -> None:
        """Return as soon as the client closes or resets the connection."""
        try:
            while True:
                await self._fill()
        except (EOFError, ConnectionError):
            return

    async def _read_until(self, sep: bytes) -> bytes:
        while (end := self.buf.find(sep)) < 0:
            if len(self.buf) > MAX_LINE:
                raise _BadRequest("line too long")
            await self._fill()
        line = bytes(self.buf[:end])
        del self.buf[: end + len(sep)]
        return line

    async def _read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._fill()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def _read_chunked(self) -> bytes:
        body = bytearray()
        while size := int((await self._read_until(b"\r\n")).split(b";")[0], 16):
            body += await self._read_exactly(size)
            if await self._read_exactly(2) != b"\r\n":
                raise _BadRequest("bad chunk")
        while await self._read_until(b"\r\n"):  # trailers, up to the blank line
            pass
        return bytes(body)

    async def read_request(self) -> _Request:
        """Raises EOFError/ConnectionError when the client goes away, _BadRequest on nonsense."""
        lines = (await self._read_until(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        try:
            method, target, _version = lines[0].split(" ", 2)
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                key = name.strip().lower()
                headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
            if "chunked" in headers.get("transfer-encoding", "").lower():
                body = await self._read_chunked()
            elif (length := int(headers.get("content-length", "0"))) >= 0:
                body = await self._read_exactly(length)
            else:
                raise ValueError("negative Content-Length")
        except ValueError as exc:
            raise _BadRequest(str(exc)) from exc
        path, _, query = target.partition("?")
        return _Request(method, path, headers, body, time.monotonic(), dict(urllib.parse.parse_qsl(query)))


class FakeUpstream:
    def __init__(self) -> None:
        self.port = 0
        self.base_url = ""
        self.default: Callable[[dict], Reply] | Reply = Reply()
        self.models = list(MODELS)
        self.requests: list[Recorded] = []
        self._queue: deque[Reply] = deque()
        self._cond = threading.Condition()  # guards _queue and requests
        self._ids = itertools.count(1)
        self._conns: dict[_Conn, asyncio.Task] = {}  # touched only on the loop thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None

    def start(self) -> FakeUpstream:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-upstream", daemon=True)
        self._thread.start()
        start = asyncio.start_server(self._handle, "127.0.0.1", 0)
        self._server = asyncio.run_coroutine_threadsafe(start, self._loop).result(timeout=5)
        self.port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()
        self._loop = self._thread = self._server = None

    def expect(self, *replies: Reply) -> None:
        with self._cond:
            self._queue.extend(replies)

    def wait_for_requests(self, n: int, timeout: float = 10) -> list[Recorded]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.requests) >= n, timeout):
                raise AssertionError(f"expected {n} upstream requests within {timeout}s, got {len(self.requests)}")
            return list(self.requests)

    def reset(self) -> None:
        with self._cond:
            self._queue.clear()
            self.requests.clear()
            self.default = Reply()
            self.models = list(MODELS)

    def open_connections(self) -> int:
        return len(self._conns)

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        # Aborting is enough: every handler then sees EOF and returns. Cancelling them
        # instead makes Python 3.11's asyncio.streams log a spurious CancelledError.
        tasks = list(self._conns.values())
        for conn in self._conns:
            conn.abort()
        if tasks:
            await asyncio.wait(tasks, timeout=3)
        await self._server.wait_closed()

    def _next_reply(self, body: dict) -> Reply:
        with self._cond:
            if self._queue:
                return self._queue.popleft()
            default = self.default
        return default if isinstance(default, Reply) else default(body)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(reader, writer)
        task = asyncio.current_task()
        assert task is not None
        self._conns[conn] = task  # so stop() can wait for handlers to wind down
        try:
            while not conn.closing:
                try:
                    request = await asyncio.wait_for(conn.read_request(), IDLE_TIMEOUT)
                except (EOFError, ConnectionError, TimeoutError):
                    return
                except _BadRequest as exc:
                    await conn.write(_invalid_request(400, f"Malformed HTTP request: {exc}"))
                    return
                await self._dispatch(conn, request)
                if request.headers.get("connection", "").lower() == "close":
                    return
        except ConnectionError:
            return  # the client vanished while we were answering a routing/parse error
        finally:
            del self._conns[conn]
            writer.close()

    def _planner(self, request: _Request) -> Callable[[Reply, dict, int], _Plan] | None:
        """How the reply to `request` is rendered; None for a route OpenAI does not have."""
        method, path, query = request.method, request.path, request.query
        if method == "POST" and path.endswith("/chat/completions"):
            return lambda reply, body, n: _plan(reply, body, f"chatcmpl-fake{n}")
        if method == "POST" and path.endswith("/v1/responses"):
            return lambda reply, body, n: _responses_plan(reply, body, f"resp_fake{n}")
        if method == "GET" and path.endswith("/v1/models"):
            return lambda reply, body, n: self._json_reply(reply, {"object": "list", "data": [_model(m) for m in self.models]})
        if method == "GET" and (model := _after(path, "/v1/models/")) is not None:
            if model not in self.models:
                return lambda reply, body, n: _error_plan(reply if reply.status != 200 else Reply(status=404, error_body=MODEL_NOT_FOUND))
            return lambda reply, body, n: self._json_reply(reply, _model(model))
        response_id, _, action = (_after(path, "/v1/responses/") or "").partition("/")
        if not response_id:
            return None
        if method == "GET" and not action and query.get("stream") == "true":
            after = int(query.get("starting_after", "-1"))
            return lambda reply, body, n: _responses_plan(reply, {"stream": True}, response_id, after)
        if method == "GET" and not action:
            return lambda reply, body, n: _responses_plan(reply, {}, response_id)
        if method == "POST" and action == "cancel":
            return lambda reply, body, n: self._json_reply(reply, response_object(response_id, reply.model, "cancelled", []))
        if method == "DELETE" and not action:
            return lambda reply, body, n: self._json_reply(reply, {"id": response_id, "object": "response.deleted", "deleted": True})
        if method == "GET" and action == "input_items":
            item = {"id": "msg_input", "type": "message", "role": "user", "status": "completed",
                    "content": [{"type": "input_text", "text": "hi"}]}
            listing = {"object": "list", "data": [item], "first_id": "msg_input", "last_id": "msg_input", "has_more": False}
            return lambda reply, body, n: self._json_reply(reply, listing)
        return None

    @staticmethod
    def _json_reply(reply: Reply, payload: object) -> _Plan:
        return _error_plan(reply) if reply.status != 200 else _json_plan(reply, payload)

    async def _dispatch(self, conn: _Conn, request: _Request) -> None:
        planner = self._planner(request)
        if planner is None:
            await conn.write(_invalid_request(404, f"Invalid URL ({request.method} {request.path})"))
            return
        try:
            body = json.loads(request.body) if request.body else {}
        except ValueError as exc:
            await conn.write(_invalid_request(400, f"We could not parse the JSON body of your request: {exc}"))
            return
        if not isinstance(body, dict):
            await conn.write(_invalid_request(400, "The request body must be a JSON object."))
            return

        reply = self._next_reply(body)
        rec = Recorded(path=request.path, headers=request.headers, body=body, received_at=request.received_at,
                       method=request.method, query=request.query, connection=conn.writer.get_extra_info("peername"))
        with self._cond:
            self.requests.append(rec)
            self._cond.notify_all()

        async def watch() -> None:
            await conn.watch_peer()
            _mark_closed(rec)

        # Play the reply while watching the peer; whichever ends first ends the request.
        play = asyncio.create_task(self._play(conn, rec, planner(reply, body, next(self._ids)), reply))
        watcher = asyncio.create_task(watch())
        try:
            await asyncio.wait({play, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            _mark_closed(rec)  # no-op unless play() failed unexpectedly
            play.cancel()
            watcher.cancel()
            await asyncio.gather(play, watcher, return_exceptions=True)
        if not play.cancelled() and (exc := play.exception()) is not None and not isinstance(exc, ConnectionError):
            raise exc
        if not rec.finished:
            conn.writer.close()  # a half-sent reply leaves the connection unusable

    async def _play(self, conn: _Conn, rec: Recorded, plan: _Plan, reply: Reply) -> None:
        # The record is always updated BEFORE bytes (or the RST) leave, so whatever the
        # client has observed is already visible to the test thread: no sleeps needed.
        pending_head = plan.head

        async def send(data: bytes, *, piece: bool = False, final: bool = False) -> None:
            nonlocal pending_head
            rec.pieces_sent += piece
            if final:
                rec.finished = True
                _mark_closed(rec)
            await conn.write(pending_head + data)
            pending_head = b""

        def abort() -> None:
            _mark_closed(rec)
            conn.abort()

        if not reply.hold_headers:
            await send(b"")
        cuts = {reply.drop_after, reply.stall_after}
        if plan.chunked:
            cuts |= {reply.error_after, reply.garbage_after}
        # The last write of a reply carries the end of the body (the zero-length chunk), so
        # a client that stops reading at [DONE] or at an error event (the SDK does both)
        # still gets a complete body and the connection stays reusable.
        terminator = b"0\r\n\r\n" if plan.chunked else b""
        last = len(plan.events) - 1
        for i, event in enumerate(plan.events):
            if i in cuts:
                break
            if not await _wait_gate(reply.gates.get(i)):
                abort()
                return
            if reply.delay:
                await asyncio.sleep(reply.delay)
            ends_here = i == last and not plan.tail and len(plan.events) not in cuts
            await send(event + terminator if ends_here else event, piece=True, final=ends_here)
        if rec.finished:
            return

        n = rec.pieces_sent
        if reply.drop_after == n:
            abort()
            return
        if reply.stall_after == n:
            await asyncio.sleep(STALL_TIMEOUT)  # normally cancelled when the peer closes
            abort()
            return
        if reply.error_after == n:
            ending = [plan.error_event(n)]
        elif reply.garbage_after == n:
            ending = [_frame(GARBAGE_EVENT)]
        else:
            ending = plan.tail
        for event in ending[:-1]:
            await send(event)
        await send(b"".join(ending[-1:]) + terminator, final=True)
