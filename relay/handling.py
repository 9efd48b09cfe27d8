"""What every route that asks the upstream does the same way: admit the request (or refuse it
cheaply, before its body is read), take a stream's slot once the body is in, call the upstream
while watching for the client to leave, and turn errors into OpenAI-shaped answers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import anyio
import httpx2
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from relay.admission import ClientLeft, Slot, StartRefused
from relay.checks import authenticate
from relay.errors import ServiceError
from relay.fallback import FallbackCall
from relay.observability import OUTCOMES, exchange_of
from relay.runtime import Runtime
from relay.tracing import trace_call
from relay.upstream import ClientGone, Opener, UpstreamCall, open_upstream

T = TypeVar("T")
TURN = "relay.turn"  # scope state: the start-queue turn of a stream being set up


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def client_left(request: Request) -> None:
    """Return once the client has disconnected; for a request whose body was read already."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def upstream_until_disconnect(request: Request, call: UpstreamCall, work: Awaitable[T]) -> T:
    """Await `work` (an upstream call that has not started the response yet), aborting the call if
    the client disconnects first."""

    async def abort_on_disconnect() -> None:
        await client_left(request)
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


async def call_upstream(request: Request, body: dict[str, Any], open: Opener = open_upstream) -> tuple[FallbackCall, httpx2.Response]:
    """Note what the request asks of the upstream, and send it there, or to a fallback if it fails
    (relay.fallback); aborted if the client leaves before the answer starts."""
    runtime, exchange = runtime_of(request), exchange_of(request)
    exchange.model = body["model"]
    exchange.prompt = body.get("messages", body.get("input")) if runtime.settings.log_content else None
    assert runtime.upstreams is not None and runtime.shedder is not None
    call = runtime.upstreams.call(open, body)
    call.trace = trace_call(runtime.telemetry, request.scope, body)  # None unless OpenTelemetry is on
    exchange.upstreams = call.log
    runtime.shedder.setting_up(call)
    try:
        return call, await upstream_until_disconnect(request, call, call.open())
    finally:
        if call.thread_wait is None:
            call.thread_wait = 0.0  # it never reached a thread (refused, or its client left)
        runtime.shedder.waited(call.thread_wait)
        set_up(request)


def admit(request: Request) -> None:
    """The refusals that cost nothing, before the body is read: the key, a shutdown, a full service."""
    runtime = runtime_of(request)
    authenticate(request, runtime.settings)
    assert runtime.streams is not None and runtime.shutting_down is not None
    if runtime.shutting_down.is_set():
        raise ServiceError(503, "The service is shutting down; retry shortly.", "server_busy", "shutting_down", headers={"Retry-After": "1"})
    assert runtime.shedder is not None and runtime.starts is not None
    if runtime.starts.refuses():
        raise runtime.shedder.refuse(runtime.metrics)
    if runtime.streams.available_tokens < 1:
        raise Slot.refusal(runtime.streams, runtime.metrics)


async def take_slot(request: Request, body: Mapping[str, Any] | None) -> Slot:
    """Where every stream starts, once the whole request was read (`body`, what will be asked of
    the upstream, or None for a request without one): its key's limits checked (a reservation for
    what it will cost, settled when the slot is released), then its place among the service's
    streams."""
    runtime = runtime_of(request)
    assert runtime.limits is not None
    # The key's own limits first: a key over them neither waits for a turn nor holds a place.
    reservation = await runtime.limits.reserve(request, body, exchange_of(request))
    try:
        slot = await take_place(request)
    except BaseException:
        if reservation is not None:
            reservation.release(0)  # nothing was asked of the upstream
        raise
    if reservation is not None:
        slot.on_release = reservation.release
    return slot


async def take_place(request: Request) -> Slot:
    """A stream's place, taken only once the whole request was read: a client that sends its body
    slowly must not hold one. Released however the request ends."""
    runtime = runtime_of(request)
    assert runtime.streams is not None and runtime.starts is not None and runtime.shedder is not None
    try:
        turn = await runtime.starts.wait_turn(lambda: client_left(request))
    except StartRefused:
        raise runtime.shedder.refuse(runtime.metrics) from None
    except ClientLeft:
        raise ClientDisconnect() from None
    request.scope["state"][TURN] = turn  # over once the first upstream call answered (call_upstream)
    try:
        return Slot(runtime.streams, runtime.metrics)
    except ServiceError:
        set_up(request)
        raise


def set_up(request: Request) -> None:
    """The request's stream is set up (its first upstream call answered or failed, or it never
    made one): the next new stream may take its turn."""
    turn = request.scope["state"].pop(TURN, None)
    if turn is not None:
        runtime_of(request).starts.set_up(turn)  # type: ignore[union-attr]


def handle_errors(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """Turn ServiceError into its JSON response; a client gone before the answer gets nothing."""

    async def wrapped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ServiceError as error:
            exchange_of(request).outcome = error.outcome or OUTCOMES.get(error.type, "rejected")
            return error.response()
        except (ClientGone, ClientDisconnect):
            return Response(status_code=499)  # nobody reads it; the log line says who left

    wrapped.__name__ = endpoint.__name__
    return wrapped
