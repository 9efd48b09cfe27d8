"""Server-sent events from the upstream: split into events, batched per network read, parsed.

Runs in the worker thread that reads the upstream, so its cost is paid once per read, not per
token: everything that arrived together travels to the event loop in one thread hop.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx2
import orjson

from relay.errors import StreamFailure
from relay.upstream import ClientGone, UpstreamCall

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
            lines = data_lines(event)
            if lines:
                payloads.append(b"\n".join(lines))
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


MAX_REPORTED_CHARS = 4096  # of an upstream's own error message, as the client is told it


class UpstreamReported(StreamFailure):
    """An error the upstream put in its stream itself (`chunk`, the event as it came): the client is
    told its message and code, or gets the event itself where the framing can pass it on."""

    def __init__(self, chunk: dict[str, Any], error: Any) -> None:
        fields = error if isinstance(error, dict) else {}
        message, code = fields.get("message"), fields.get("code")
        text = str(message or error)[:MAX_REPORTED_CHARS] or "The upstream reported an error."
        super().__init__("upstream_error", text, None if code is None else str(code))
        self.chunk = chunk


def carries_usage(payload: bytes) -> bool:
    """Whether a chat completion chunk may carry a usage object (`"usage": null` does not), told
    without parsing it."""
    return b'"usage":{' in payload or b'"usage": {' in payload


def data_lines(event: bytes) -> list[bytes]:
    """The values of one whole event's `data:` lines, as SSE readers take them."""
    return [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]


def event_data(event: bytes) -> bytes:
    """The data of one whole event (its `data:` lines joined), as SSE readers take it."""
    return b"\n".join(data_lines(event))


def parse_chunk(payload: bytes) -> dict[str, Any]:
    try:
        chunk = orjson.loads(payload)  # several times faster than json, on every piece of /chat
    except ValueError:
        raise StreamFailure("upstream_error", "The upstream sent an event that is not JSON.") from None
    if not isinstance(chunk, dict):
        raise StreamFailure("upstream_error", "The upstream sent an event that is not a JSON object.")
    if chunk.get("error") is not None:
        raise UpstreamReported(chunk, chunk["error"])
    return chunk
