"""A fake OpenAI-compatible upstream for the benchmark: lean, paced, and time-stamping every token.

A raw asyncio HTTP/1.1 server (uvloop when installed) that answers POST /v1/chat/completions
with the real streaming wire format: chunked `text/event-stream` carrying `data: {chunk}\n\n`
events (a role chunk, one content delta per token, a finish chunk, a usage chunk with empty
choices when `stream_options.include_usage`, then `data: [DONE]`). Keep-alive is supported,
because the service's httpx pool reuses connections.

Each token's content is `@<time.monotonic_ns() at emission>;`. CLOCK_MONOTONIC is shared by all
processes on Linux, so the load client subtracts it from its own arrival time.

Pacing is chosen per request through the model name, because /chat forwards only a few fields:
`bench-<tokens per second>` (0: as fast as the reader takes them), and `max_tokens` is the
number of tokens. The first token leaves one interval after the headers, like a fast prefill.

Usage: python upstream.py  (prints "READY <port>" once listening on 127.0.0.1)
"""

from __future__ import annotations

import asyncio
import heapq
import json
import sys
import time
from dataclasses import dataclass, field

MAX_HEAD = 64 * 1024
MAX_BODY = 4 * 1024 * 1024
MAX_TOKENS = 100_000
IDLE_SECONDS = 120.0  # a connection nobody uses any more is closed
TICK = 0.001  # tokens due within the same millisecond leave together
MAX_BUFFERED = 256 * 1024  # stop writing to a reader this far behind (saturation runs)

HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)
# A real chunk's fields (gpt-4o-mini, 2024), so the service relays realistic sizes. Built once:
# per token only the content changes, so no json.dumps on the hot path.
PREFIX = (
    b'data: {"id":"chatcmpl-bench0000000000000000000000","object":"chat.completion.chunk",'
    b'"created":1700000000,"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_0ba0d124f1","choices":'
)
ROLE = PREFIX + b'[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}]'
TOKEN_OPEN = PREFIX + b'[{"index":0,"delta":{"content":"@'
TOKEN_CLOSE = b';"},"logprobs":null,"finish_reason":null}]'
FINISH = PREFIX + b'[{"index":0,"delta":{},"logprobs":null,"finish_reason":"%s"}]'
USAGE = PREFIX + b'[],"usage":{"prompt_tokens":12,"completion_tokens":%d,"total_tokens":%d}}\n\n'
DONE = b"data: [DONE]\n\n"


def chunk(data: bytes) -> bytes:
    """`data` as one HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def event(body: bytes, usage: bool) -> bytes:
    # With include_usage, OpenAI puts "usage":null on every chunk until the usage chunk.
    return body + (b',"usage":null}\n\n' if usage else b"}\n\n")


def error_reply(status: int, message: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}).encode()
    return b"HTTP/1.1 %d Error\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (status, len(body), body)


@dataclass(order=True)
class Emission:
    """A stream's next token, ordered by when it is due."""

    due: float
    transport: asyncio.WriteTransport = field(compare=False)
    left: int = field(compare=False)
    interval: float = field(compare=False)
    token_close: bytes = field(compare=False)  # the token's event after its content
    ending: bytes = field(compare=False)  # finish, usage, [DONE], last chunk
    finished: asyncio.Future[None] = field(compare=False)


class Pacer:
    """Writes every stream's tokens on time, from one task.

    One timer for all streams instead of a sleeping task per stream: this process's CPU (its
    share of the two cores) stays small. Tokens of different streams due within the same TICK
    leave in one loop iteration, as from a batching inference server whose decode step yields a
    token for many sequences at once.
    """

    def __init__(self) -> None:
        self.queue: list[Emission] = []
        self.wake = asyncio.Event()

    def add(self, emission: Emission) -> None:
        heapq.heappush(self.queue, emission)
        self.wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.queue:
                self.wake.clear()
                await self.wake.wait()
            now = loop.time()
            ready = []
            while self.queue and self.queue[0].due <= now + TICK / 2:
                ready.append(heapq.heappop(self.queue))
            for emission in ready:  # popped first, so a stream due again at once waits a turn
                self.emit(emission, now)
            delay = self.queue[0].due - loop.time() if self.queue else 0.0
            await asyncio.sleep(max(0.0, delay))  # sleep(0) when behind: reads and accepts go on

    def emit(self, emission: Emission, now: float) -> None:
        transport = emission.transport
        if transport.is_closing():
            emission.finished.set_result(None)
            return
        if transport.get_write_buffer_size() > MAX_BUFFERED:
            emission.due = now + TICK  # the reader is behind (saturation run): wait for it
            heapq.heappush(self.queue, emission)
            return
        # Stamped immediately before the write, which sends at once unless the socket is full.
        data = chunk(b"%s%d%s" % (TOKEN_OPEN, time.monotonic_ns(), emission.token_close))
        emission.left -= 1
        if emission.left:
            transport.write(data)
            emission.due = max(emission.due + emission.interval, now) if emission.interval else now
            heapq.heappush(self.queue, emission)
        else:
            transport.write(data + emission.ending)
            emission.finished.set_result(None)


def start_stream(pacer: Pacer, transport: asyncio.WriteTransport, request: dict[str, object]) -> asyncio.Future[None]:
    """Send the head and role chunk now; the pacer sends the tokens and the end."""
    model = str(request.get("model") or "")
    rate = float(model.removeprefix("bench-")) if model.startswith("bench-") else 50.0
    tokens = max(1, min(int(request.get("max_tokens") or 200), MAX_TOKENS))  # type: ignore[call-overload]
    options = request.get("stream_options")
    usage = isinstance(options, dict) and bool(options.get("include_usage"))
    ending = chunk(event(FINISH % (b"length" if request.get("max_tokens") else b"stop"), usage))
    if usage:
        ending += chunk(USAGE % (tokens, tokens + 12))
    ending += chunk(DONE) + b"0\r\n\r\n"
    transport.write(HEAD + chunk(event(ROLE, usage)))
    loop = asyncio.get_running_loop()
    interval = 1 / rate if rate > 0 else 0.0
    finished = loop.create_future()
    pacer.add(Emission(loop.time() + interval, transport, tokens, interval, event(TOKEN_CLOSE, usage), ending, finished))
    return finished


async def serve_connection(pacer: Pacer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:  # one request after the other on a kept-alive connection
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_SECONDS)
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, path, _ = request_line.split(" ", 2)
            headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines if line)}
            length = int(headers.get("content-length") or 0)
            if length > MAX_BODY or "chunked" in headers.get("transfer-encoding", ""):
                writer.write(error_reply(400, "send a body with content-length"))
                return
            body = await reader.readexactly(length) if length else b""
            if method != "POST" or path.split("?")[0] != "/v1/chat/completions":
                writer.write(error_reply(404, f"no route {method} {path}"))
                continue
            request = json.loads(body or b"{}")
            if not isinstance(request, dict) or not request.get("stream"):
                writer.write(error_reply(400, "this upstream only streams"))
                continue
            await start_stream(pacer, writer.transport, request)
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass  # the peer left, or sent nonsense: drop the connection
    finally:
        writer.close()


async def main() -> None:
    pacer = Pacer()
    pacing = asyncio.ensure_future(pacer.run())
    server = await asyncio.start_server(
        lambda reader, writer: serve_connection(pacer, reader, writer), "127.0.0.1", 0, backlog=4096, limit=MAX_HEAD
    )
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await asyncio.gather(server.serve_forever(), pacing)


if __name__ == "__main__":
    try:
        from uvloop import run
    except ImportError:
        run = asyncio.run  # type: ignore[assignment]
    try:
        run(main())
    except KeyboardInterrupt:
        sys.exit(0)
