"""Resumable answers: a /chat answer is read from the upstream by a producer that outlives the
request that started it, into the replay store, and every reader follows it from there.

The producer stops when the answer ends, when it is cancelled (DELETE), at MAX_STREAM_SECONDS or
shutdown, and RESUME_GRACE_SECONDS after its last reader left: long enough for a dropped
connection to come back, short enough that nobody pays long for an answer nobody reads. A reader
that comes back (Last-Event-ID, /chat/streams/{id}) gets the events it lacks, then the live ones.
"""

from __future__ import annotations

import hmac
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from relay.admission import Slot
from relay.errors import ServiceError, StreamFailure
from relay.framing import CHAT_FRAMINGS, AnswerEvent, ChatFraming
from relay.handling import runtime_of
from relay.observability import OUTCOMES, Exchange, exchange_of, stream_digest
from relay.replay import ReplayStoreUnavailable, owner_digest, replay_lost
from relay.response import RelayResponse
from relay.runtime import Runtime, cut_short
from relay.tracing import end_traces, link_answer, remember_answer
from relay.upstream import ClientGone, UpstreamCall

log = logging.getLogger(__name__)


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
        self.outcome = "error"  # how the answer ended, as its upstream spans say (relay.tracing)
        remember_answer(stream_id, calls)  # for the requests that will resume it

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
        events = [AnswerEvent(self.seq + number, "delta", text=text) for number, text in enumerate(texts, 1)]
        self.seq += len(events)
        await self.store.append(self.stream_id, events)

    async def run(self) -> None:
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._stop_when_due)
                tasks.start_soon(self._stop_when_abandoned)
                tasks.start_soon(self.store.hold_lease, self.stream_id, self.cancel)
                kind, data = await self._produce()
                self.outcome = "completed" if kind == "done" else OUTCOMES.get(data["error"]["type"], "error")
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
            end_traces(self.calls, self.outcome)
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
                            error = ending.payload()["error"]
                            raise StreamFailure(error["type"], error["message"], error.get("code"))
                        return
        except ReplayStoreUnavailable as error:
            raise replay_lost(f"The answer cannot be read: {error}.") from None


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
    link_answer(runtime.telemetry, request.scope, stream_id)
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
