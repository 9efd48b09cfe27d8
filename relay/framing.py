"""Framing: how pieces of the answer are written for each kind of client.

The /v1 routes pass the upstream's own events on byte for byte (`OpenAIFraming`,
`ResponsesFraming`); /chat writes the text of an answer as plain text, SSE or NDJSON, as the
client's Accept asks (`ChatFraming` and its kinds). Each framing also knows how its stream ends:
the frames that say the answer is complete, and the terminal frame of a failure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from relay.errors import StreamFailure
from relay.events import DONE, UpstreamReported, carries_usage, event_data, parse_chunk
from relay.transcript import Transcript


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
        self._upstream_error: bytes | None = None  # the upstream's own error object, passed on as it came

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
                if carries_usage(payload):
                    self.usage = parse_chunk(payload).get("usage")
            except StreamFailure as failure:
                self.failure = failure
                if isinstance(failure, UpstreamReported):
                    self._upstream_error = b"".join(b"data: " + line + b"\n" for line in payload.split(b"\n")) + b"\n"
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
        if failure is self.failure and self._upstream_error is not None:
            return self._upstream_error + self.done()
        return b"data: " + json.dumps({"error": failure.error()}).encode() + b"\n\n" + self.done()


def in_chat_names(usage: dict[str, Any]) -> dict[str, Any]:
    """The Responses API's usage in chat completions' names, as the log and the limits count it."""
    return {"prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens"), "total_tokens": usage.get("total_tokens")}


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
            data = event_data(event)
            if data != DONE:
                try:
                    parsed = parse_chunk(data)  # raises for the nested shape, {"type": "error", "error": {...}}
                    if parsed.get("type") == "error":  # the flat shape: the event is the error
                        raise UpstreamReported(parsed, parsed)
                except UpstreamReported as failure:
                    self.failure = failure
                    if failure.chunk.get("type") == "error":  # either shape: the upstream's own event, passed on as it is
                        self._upstream_error = event + b"\n\n"
                    break
                except StreamFailure as failure:
                    self.failure = failure
                    break
                kind = str(parsed.get("type", "")).encode()
                if isinstance(parsed.get("sequence_number"), int):
                    self._last_sequence_number = parsed["sequence_number"]
                if kind.endswith(b".delta"):
                    self.pieces += 1
                    if self._texts is not None and kind == b"response.output_text.delta":
                        self._texts.append(str(parsed.get("delta", "")))
                if kind in RESPONSE_ENDINGS:
                    self.ended = True
                    usage = (parsed.get("response") or {}).get("usage")
                    if isinstance(usage, dict):
                        self.usage = in_chat_names(usage)
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


@dataclass(frozen=True, slots=True)
class AnswerEvent:
    """One event of a /chat answer, as the replay store keeps it and before any framing: a piece of
    text ("delta", its `text`), the summary that ends the answer ("done", `data`), or the error that
    ends it ("error", data {"error"}). `seq` counts the answer's events from 1.

    Every reader of an answer gets one per piece of text, so a delta carries its text, not a dict
    around it, and the class has slots."""

    seq: int
    kind: str
    data: dict[str, Any] | None = None
    text: str = ""

    @classmethod
    def of(cls, seq: int, kind: str, payload: dict[str, Any]) -> AnswerEvent:
        """The event whose `payload()` this is."""
        return cls(seq, kind, text=payload["text"]) if kind == "delta" else cls(seq, kind, payload)

    def payload(self) -> dict[str, Any]:
        """Its fields as an SSE event's data and the Redis store carry them."""
        if self.kind == "delta":
            return {"text": self.text}
        assert self.data is not None
        return self.data


class ChatFraming(Framing):
    """/chat as plain text: the raw deltas. A failure leaves the response visibly unfinished.

    Every /chat framing writes the events of one answer (stream `stream_id`), fresh or resumed
    alike; `ending` is the answer's last event once the reader has it."""

    preamble = b""  # written before the first event

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self.ending: AnswerEvent | None = None

    def deltas(self, events: list[AnswerEvent]) -> bytes:
        return "".join(event.text for event in events).encode()


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
        data = line_safe_json(event.payload())
        if not event.seq:
            return f"event: {event.kind}\ndata: {data}\n\n".encode()
        return f"id: {self.stream_id}.{event.seq}\nevent: {event.kind}\ndata: {data}\n\n".encode()


class ChatNDJSONFraming(ChatFraming):
    media_type = "application/x-ndjson"

    def deltas(self, events: list[AnswerEvent]) -> bytes:
        return b"".join(self._line({"type": "delta", "text": event.text}) for event in events)

    def done(self) -> bytes:
        assert self.ending is not None
        return self._line({"type": "done", **self.ending.payload()})

    def error_frame(self, failure: StreamFailure) -> bytes:
        return self._line({"type": "error", "error": failure.error()})

    @staticmethod
    def _line(data: dict[str, Any]) -> bytes:
        return (line_safe_json(data) + "\n").encode()


# What str.splitlines() takes for a line break that JSON leaves unescaped. httpx's and requests'
# iter_lines() split with it, so a model's U+2028 would cut a JSON line in two for their users.
LINE_BREAKS_IN_JSON = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def line_safe_json(data: dict[str, Any]) -> str:
    """`data` as JSON, text kept as it is except the line breaks that JSON need not escape."""
    text = json.dumps(data, ensure_ascii=False)
    return text.translate(LINE_BREAKS_IN_JSON) if not text.isascii() else text


CHAT_FRAMINGS: dict[str, type[ChatFraming]] = {
    "text/plain": ChatFraming,
    "text/event-stream": ChatSSEFraming,
    "application/x-ndjson": ChatNDJSONFraming,
}
