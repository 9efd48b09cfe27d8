"""The response that relays one stream, from the first upstream byte to the last client byte.

Its body comes from a producer (the relay loop in `service.py`, or a reader of a stored answer)
that writes frames as they come. Around it, the guarantees every stream has, however the app is
served: heartbeats while the model is silent, an end at MAX_STREAM_SECONDS or a shutdown with an
explicit terminal frame, a client that takes nothing for SEND_TIMEOUT_SECONDS dropped, and the
upstream call aborted and the stream's slot released however the stream ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from relay.admission import Slot
from relay.errors import StreamFailure
from relay.framing import Framing
from relay.observability import CONNECTION_VERDICT, OUTCOMES, SERVING_LAYER, Exchange
from relay.runtime import Runtime, cut_short
from relay.tracing import end_traces
from relay.upstream import ClientGone, UpstreamCall

log = logging.getLogger(__name__)
Producer = Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]]


class ClientStalled(ClientGone):
    """The client took nothing of the response for SEND_TIMEOUT_SECONDS: it is dropped."""


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
        if SERVING_LAYER not in scope:
            # The serving layer drops a stalled client itself, watching its buffer drain; without
            # it, each write gets the deadline.
            send = self.within_deadline(send, self.runtime.settings.send_timeout_seconds)
        self.runtime.metrics.active_streams.inc()
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.abort_upstream()
            if self.slot is not None:
                self.slot.release()
            self.runtime.metrics.active_streams.dec()
            verdict = scope.get(CONNECTION_VERDICT)
            if verdict is not None:  # the serving layer ended the connection itself (a stalled client)
                self.outcome = verdict[1]
            self.exchange.outcome = self.outcome
            end_traces(self.calls, self.outcome)

    def abort_upstream(self) -> None:
        for call in self.calls:
            call.abort()

    def within_deadline(self, send: Send, seconds: float) -> Send:
        """`send`, which raises ClientStalled (and aborts the upstream call, which the producer may
        be blocked on) when the client takes too long to accept a message."""

        async def send_within_deadline(message: Message) -> None:
            with anyio.move_on_after(seconds) as waiting:
                await send(message)
            if waiting.cancelled_caught:
                self.outcome = "client_stalled"
                self.abort_upstream()
                raise ClientStalled(f"the client took nothing for SEND_TIMEOUT_SECONDS ({seconds:g} s)")

        return send_within_deadline

    async def stream_response(self, send: Send) -> None:
        try:
            await self.relay(send)
        except ClientStalled:
            pass  # dropped: there is no one to send an ending to

    async def relay(self, send: Send) -> None:
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
                    tasks.start_soon(self._heartbeats, emit, self.framing.heartbeat, writing)
                # The producer writes each frame itself: a channel to a writer task would cost a
                # task switch per frame.
                try:
                    ending = await self._produce(emit)
                except ClientGone:
                    if not writing.cancel_called:
                        tasks.cancel_scope.cancel()
                        return  # the client left: there is no one to send an ending to
            if self.outcome == "client_stalled":  # the heartbeat found the client stalled
                tasks.cancel_scope.cancel()
                return
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

    async def _heartbeats(self, emit: Callable[[bytes], Awaitable[None]], heartbeat: bytes, writing: anyio.CancelScope) -> None:
        """A heartbeat whenever HEARTBEAT_SECONDS pass without a frame: one timer per stream,
        not a timeout around the wait for each frame."""
        interval = self.runtime.settings.heartbeat_seconds
        while True:
            quiet = time.monotonic() - self.last_sent
            if quiet < interval:
                await anyio.sleep(interval - quiet)
                continue
            try:
                await emit(heartbeat)
            except ClientStalled:
                writing.cancel()  # the producer may be waiting for its next piece, not writing
                return
