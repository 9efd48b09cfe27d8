"""Stream a language model's answer to the people reading it, one token the moment it exists.

A Starlette app (`service:app`) between clients and any OpenAI-compatible upstream (OpenAI, vLLM,
Ollama, llama.cpp). The shape, in this file: a hand-written route calls the blocking
`openai.OpenAI` client, `iterate_in_threadpool` reads its stream in anyio worker threads, and a
`StreamingResponse` (`RelayResponse`) writes each piece to the client as it arrives. See
`relay_pass_through` for /v1 and the `source` of `chat` for /chat.

Everything around that shape is a module of the `relay` package: settings (`relay.config`), the
interruptible upstream client (`relay.upstream`), framing, admission and load shedding, the replay
store and resumable answers, observability, the demo model, the serving layer. Importing this file
reads no setting and starts nothing: `uvicorn service:app` builds the app from the environment
when it starts it, and `python service.py` checks the settings first, then serves it with the
serving layer. See README.md.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import anyio
import httpx2
import prometheus_client
from starlette.applications import Starlette
from starlette.concurrency import iterate_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from relay.admission import Slot
from relay.answers import (
    SEQUENCE,
    STREAM_ID,
    AnswerProducer,
    AnswerReader,
    is_owner,
    parse_last_event_id,
    replay_store_down,
    resume,
)
from relay.checks import (
    authenticate,
    chat_fields,
    chat_request,
    check_messages,
    check_response_request,
    check_sampling,
    negotiate,
    read_json_object,
    require_key,
)
from relay.config import ConfigError, Settings, load_settings
from relay.errors import ServiceError, StreamFailure
from relay.fallback import answer_events
from relay.framing import (
    CHAT_FRAMINGS,
    OpenAIFraming,
    PassThroughFraming,
    ResponsesFraming,
)
from relay.handling import (
    admit,
    call_upstream,
    handle_errors,
    runtime_of,
    take_slot,
    upstream_until_disconnect,
)
from relay.limits import RATE_LIMIT_HEADERS, answer_usage
from relay.observability import RequestLog, exchange_of
from relay.replay import ReplayStoreUnavailable, new_stream_id, owner_digest
from relay.response import RelayResponse
from relay.runtime import Runtime
from relay.serving import AppFromEnvironment, serve
from relay.tracing import follow_round, server_spans, telemetry_for
from relay.transcript import Transcript
from relay.upstream import (
    Opener,
    UpstreamCall,
    no_responses_api,
    open_resource,
    open_responses,
    open_upstream,
    send_upstream,
    serving_call,
)

log = logging.getLogger("relay")


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
    slot = await take_slot(request, body)
    try:
        call, response = await call_upstream(request, body, open)
    except BaseException:
        slot.release()
        raise
    if not body.get("stream"):
        exchange.usage = answer_usage(response.content)  # what the key's tokens settle to
        slot.release()
        if settings.log_content:
            exchange.completion = response.text
        return Response(response.content, media_type="application/json")
    return relay_pass_through(request, call, response, framing(), slot)


def relay_pass_through(request: Request, call: UpstreamCall, response: httpx2.Response, framing: PassThroughFraming, slot: Slot) -> RelayResponse:
    """A /v1 stream: the upstream's events, each network read's worth sent the moment it arrived."""
    runtime, exchange = runtime_of(request), exchange_of(request)

    async def produce(emit: Callable[[bytes], Awaitable[None]]) -> None:
        serving_call.set(call)
        try:
            async for payloads in iterate_in_threadpool(answer_events(call, response, framing.whole_events)):
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
    slot = await take_slot(request, None)  # no body to wait for
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
            raise no_responses_api(error, f"{request.method} /v1{path}") from None
        raise
    except BaseException:
        slot.release()
        raise
    if not stream:
        slot.release()
        return Response(response.content, media_type="application/json")
    return relay_pass_through(request, call, response, ResponsesFraming(keep_text=runtime.settings.log_content), slot)


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
    slot = await take_slot(request, None)
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
    slot = await take_slot(request, upstream_body)
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
            serving_call.set(round_call)
            try:
                async for payloads in iterate_in_threadpool(answer_events(round_call, round_response)):
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
            round_call = round_call.next_round(transcript.continuation(upstream_body))  # its upstream first
            follow_round(calls[-1], round_call, round_call.body)  # a span of its own
            calls.append(round_call)  # before it starts, so that stopping the answer aborts it too
            try:
                round_response = await round_call.open()
            except ServiceError as error:
                raise StreamFailure(error.type, f"Continuing the answer failed: {error.message}") from None

    producer = runtime.producers[stream_id] = AnswerProducer(runtime, stream_id, source, calls, slot)
    reader = AnswerReader(runtime, exchange, CHAT_FRAMINGS[framing_name](stream_id), stream_id, 0, producer)
    runtime.producing.start_soon(producer.run)
    return reader


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
            **runtime.starts.report(),  # type: ignore[union-attr]
            "replay": runtime.replay.usage() if runtime.replay is not None else None,
            "upstreams": runtime.upstreams.report() if runtime.upstreams is not None else None,
            "key_limits": runtime.limits.report() if runtime.limits is not None else None,
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
    if (upstreams := runtime_of(request).upstreams) is not None:
        upstreams.refresh()  # a breaker turns half-open by the clock alone
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


def without_head(route: Route) -> Route:
    """Starlette answers HEAD wherever GET is allowed, by running the GET handler and dropping the
    body. On a route that starts or follows an answer that would pay the upstream for text nobody
    can read, so HEAD gets a 405 there instead."""
    assert route.methods is not None
    route.methods.discard("HEAD")
    return route


def create_app(settings: Settings) -> Starlette:
    runtime = Runtime(settings, telemetry=telemetry_for(settings))
    middleware = [*server_spans(runtime.telemetry), Middleware(RequestLog, settings=settings, metrics=runtime.metrics)]
    if settings.cors_origins:
        # Pure ASGI: it adds headers and answers preflights, and never buffers a streamed body.
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
                expose_headers=["Retry-After", "Retry-After-Ms", "X-Stream-ID", *RATE_LIMIT_HEADERS],
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
        lifespan=lambda app: runtime.running(),
    )
    app.state.runtime = runtime
    return app


# What `uvicorn service:app` and gunicorn's uvicorn workers serve: the app, built from the
# environment when the server starts it, not when this module is imported.
app = AppFromEnvironment(create_app)


def main() -> None:
    try:
        settings = load_settings(os.environ)
    except ConfigError as error:
        sys.exit(f"service: configuration error: {error}")
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s: %(message)s")
    serve(settings, "service:app")


if __name__ == "__main__":
    main()
