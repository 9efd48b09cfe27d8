"""OpenTelemetry traces and metrics in the GenAI semantic conventions: one answer followed from the
client's trace through the service to the model, off unless the operator turns it on.

Why it exists: operators follow requests in Jaeger, Tempo, Honeycomb, Langfuse or Phoenix, fed by
OTLP, and the service in the middle must not be where the trail goes cold. Each request is a
server span that continues the caller's W3C trace context (`ServerSpans`); each attempt at the
upstream (a retry, a fallback, a continuation round) is a `chat {model}` client span under it in
the GenAI conventions (`CallTrace`), whose own context goes to the upstream in `traceparent`; a
resumed answer's request links to the request that started the answer. Inference duration, time
to first chunk, time per output chunk and token usage go over OTLP as metrics under the
conventions' names. docs/tracing.md lists every attribute.

Off (no OTLP endpoint: `config.OtelSettings`), nothing of OpenTelemetry is even imported:
`Runtime.telemetry` and `UpstreamCall.trace` stay None, and each hook is a None check once per
request or upstream call, never per token. On, spans and metrics leave from the SDK's own
background threads, in batches, from a bounded queue: a collector that is down, slow or failing
never delays a stream nor blocks the event loop, and what cannot be sent is dropped and counted
(`relay_telemetry_dropped_total` on /metrics). Prompts and answers are exported only with
OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true; keys, stream ids, query strings and
upstream URL credentials never are.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import anyio.to_thread
import httpx2
import openai
import orjson
import prometheus_client
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from relay.config import Settings
from relay.events import DONE, carries_usage, event_data
from relay.framing import RESPONSE_ENDINGS, in_chat_names
from relay.observability import Exchange, Metrics, loggable_path, stream_digest
from relay.upstream import ClientGone, UpstreamCall

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.metrics import Histogram
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.trace import Span, SpanContext, Tracer

log = logging.getLogger(__name__)

OPERATION = "chat"  # gen_ai.operation.name: both APIs (chat completions, responses) generate a chat answer
PROVIDER = "openai"  # gen_ai.provider.name: the API every upstream of this service speaks
SCOPE_NAME = "streaming-relay"  # the instrumentation scope of every span and metric
SERVER_SPAN = "relay.server_span"  # ASGI scope key: the request's server span
UNTRACED_PATHS = frozenset({"/healthz", "/metrics"})  # probes and scrapes, every few seconds: noise, not requests
FLUSH_SECONDS = 2.0  # at shutdown, for what is still queued: a dead collector must not hold up a restart
ANSWERS_KEPT = 10_000  # answers whose request a resume can link to, per process
MAX_MODEL_CHARS = 256  # of a model name the client chose, as an attribute
WARN_EVERY_SECONDS = 60.0  # at most one warning about dropped telemetry per minute
# The GenAI conventions' advised histogram buckets.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
CHUNK_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TOKEN_BUCKETS = tuple(float(4**n) for n in range(14))  # 1, 4, 16 ... 67,108,864
# What a Responses API response that ended incomplete says of why, as a finish reason.
INCOMPLETE_REASONS = {"max_output_tokens": "length", "content_filter": "content_filter"}


class ExportLedger:
    """Ended spans handed to the export queue and not yet settled (sent, or failed to send): at
    most `capacity`, so that a collector that takes nothing cannot make the process grow; a span
    ended while the queue is full is dropped. Every drop is counted on /metrics. Used from the
    event loop, worker threads and the exporter's thread alike."""

    def __init__(self, metrics: Metrics, capacity: int) -> None:
        self.capacity = capacity
        self.pending = 0
        self.lock = threading.Lock()
        self.warned_at = -WARN_EVERY_SECONDS
        registry = metrics.registry
        self.dropped = prometheus_client.Counter(
            "relay_telemetry_dropped", "Spans, and metric exports, that never reached the OTLP collector: the export queue was full, or the export failed.",
            ["signal", "reason"], registry=registry,
        )
        self.queued = prometheus_client.Gauge(
            "relay_telemetry_queued_spans", "Ended spans waiting to be exported.", multiprocess_mode="livesum", registry=registry
        )

    def admit(self) -> bool:
        with self.lock:
            if self.pending >= self.capacity:
                admitted = False
            else:
                self.pending += 1
                admitted = True
        if admitted:
            self.queued.inc()
        else:
            self.drop("spans", "queue_full", 1)
        return admitted

    def settled(self, count: int, sent: bool) -> None:
        with self.lock:
            self.pending -= count
        self.queued.dec(count)
        if not sent:
            self.drop("spans", "export_failed", count)

    def drop(self, signal: str, reason: str, count: int) -> None:
        self.dropped.labels(signal, reason).inc(count)
        now = time.monotonic()
        if now - self.warned_at >= WARN_EVERY_SECONDS:
            self.warned_at = now
            log.warning("OpenTelemetry: %s dropped (%s): the collector is down, slow or failing; see relay_telemetry_dropped_total", signal, reason)


class Instruments:
    """The GenAI client metrics, as the conventions name them."""

    def __init__(self, meter: Any) -> None:
        self.duration: Histogram = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.time_to_first_chunk: Histogram = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk", unit="s",
            description="Time to receive the first chunk, from the request to the first chunk of the response stream.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.time_per_output_chunk: Histogram = meter.create_histogram(
            "gen_ai.client.operation.time_per_output_chunk", unit="s",
            description="Time per output chunk after the first one: one value per streamed response, the mean of its chunks' times.",
            explicit_bucket_boundaries_advisory=CHUNK_BUCKETS,
        )
        self.token_usage: Histogram = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )


class Telemetry:
    """The app's OpenTelemetry. Built by create_app, where nothing starts; `start` (the app's
    start-up) builds the SDK's providers, exporters and their threads; `stop` flushes and ends
    them, within FLUSH_SECONDS."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.otel
        self.answer_seconds = settings.resume_ttl_seconds + settings.max_stream_seconds  # how long an answer may be resumed
        self.tracer: Tracer | None = None  # None until started: the hooks then do nothing
        self.propagator: TextMapPropagator | None = None
        self.instruments: Instruments | None = None
        self.providers: list[Any] = []
        self.answers: OrderedDict[str, tuple[float, SpanContext]] = OrderedDict()
        self.answers_lock = threading.Lock()

    def start(self, metrics: Metrics) -> None:
        # OpenTelemetry is imported here, on start-up, and only when it is on.
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.trace import NoOpTracer
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        otel = self.settings
        resource = Resource.create({"service.name": otel.service_name})  # OTEL_RESOURCE_ATTRIBUTES added by the SDK
        ledger = ExportLedger(metrics, otel.max_queue_size)
        # W3C trace context only: baggage would carry whatever the caller put in it on to the upstream.
        self.propagator = TraceContextTextMapPropagator()
        if otel.traces:
            from opentelemetry.sdk.trace import TracerProvider

            # The SDK's own exit hook would wait for a dead collector; stop() bounds the wait instead.
            tracing = TracerProvider(resource=resource, shutdown_on_exit=False)
            tracing.add_span_processor(bounded_span_batches(ledger, otel.max_export_batch_size, otel.schedule_delay_ms))
            self.providers.append(tracing)
            self.tracer = tracing.get_tracer(SCOPE_NAME)
        else:
            self.tracer = NoOpTracer()  # metrics alone: calls are timed, nothing is traced
        if otel.metrics:
            from opentelemetry.sdk.metrics import MeterProvider

            reader = counted_metric_reader(otel.metric_export_interval_ms, ledger)
            measuring = MeterProvider(resource=resource, metric_readers=[reader], shutdown_on_exit=False)
            self.providers.append(measuring)
            self.instruments = Instruments(measuring.get_meter(SCOPE_NAME))
        log.info("OpenTelemetry: exporting %s over OTLP/HTTP as service %r", " and ".join(
            name for name, on in (("traces", otel.traces), ("metrics", otel.metrics)) if on), otel.service_name)

    async def stop(self) -> None:
        """Flush what is queued and stop the SDK's threads, for FLUSH_SECONDS at most: what a dead
        collector has not taken by then goes with the process (the threads are daemons)."""
        providers, self.providers, self.tracer = self.providers, [], None
        if not providers:
            return
        done = threading.Event()

        def shut_down() -> None:
            try:
                for provider in providers:
                    provider.shutdown()
            except Exception:
                log.exception("OpenTelemetry: shutting down failed")
            finally:
                done.set()

        threading.Thread(target=shut_down, name="otel-shutdown", daemon=True).start()
        await anyio.to_thread.run_sync(done.wait, FLUSH_SECONDS)

    def remember(self, stream_id: str, context: SpanContext) -> None:
        """The request that started answer `stream_id`, for the requests that resume it to link to.
        Kept by the stream id's digest, in this process only, while the answer may be resumed."""
        now = time.monotonic()
        with self.answers_lock:
            while self.answers and (len(self.answers) >= ANSWERS_KEPT or next(iter(self.answers.values()))[0] < now):
                self.answers.popitem(last=False)
            self.answers[stream_digest(stream_id)] = (now + self.answer_seconds, context)

    def recall(self, stream_id: str) -> SpanContext | None:
        with self.answers_lock:
            kept = self.answers.get(stream_digest(stream_id))
        return kept[1] if kept is not None and kept[0] >= time.monotonic() else None


def bounded_span_batches(ledger: ExportLedger, batch: int, delay_ms: int) -> SpanProcessor:
    """The SDK's batch span processor and OTLP/HTTP exporter (its background thread sends), with
    the ledger's bound in front of its queue and every failed export counted."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult

    class CountedSpanExporter(OTLPSpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            result = SpanExportResult.FAILURE
            try:
                result = super().export(spans)
            finally:
                ledger.settled(len(spans), result is SpanExportResult.SUCCESS)
            return result

    class BoundedBatchSpanProcessor(BatchSpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            # Admitted here, so the SDK's own queue (as large) never overflows uncounted.
            if span.context is not None and span.context.trace_flags.sampled and ledger.admit():
                super().on_end(span)

    return BoundedBatchSpanProcessor(CountedSpanExporter(), max_queue_size=ledger.capacity, schedule_delay_millis=delay_ms, max_export_batch_size=batch)


def counted_metric_reader(interval_ms: int, ledger: ExportLedger) -> Any:
    """The SDK's periodic metric reader (its own thread) and OTLP/HTTP exporter, failures counted.
    Metrics are cumulative: an export that failed loses nothing the next one does not carry."""
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics.export import MetricExportResult, PeriodicExportingMetricReader

    class CountedMetricExporter(OTLPMetricExporter):
        def export(self, metrics_data: Any, timeout_millis: float | None = 10_000, **kwargs: Any) -> MetricExportResult:
            result = MetricExportResult.FAILURE
            try:
                result = super().export(metrics_data, timeout_millis=timeout_millis, **kwargs)
            finally:
                if result is not MetricExportResult.SUCCESS:
                    ledger.drop("metrics", "export_failed", 1)
            return result

    return PeriodicExportingMetricReader(CountedMetricExporter(), export_interval_millis=interval_ms)


# -- the request: a server span ----------------------------------------------------------------------


class ServerSpans:
    """Pure ASGI middleware, outside RequestLog: a server span for each request, continuing the
    caller's traceparent and tracestate, ended when the response is over with how the request
    ended (its log line's outcome). It only watches; it never holds a message back."""

    def __init__(self, app: ASGIApp, telemetry: Telemetry) -> None:
        self.app, self.telemetry = app, telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        tracer, propagator = self.telemetry.tracer, self.telemetry.propagator
        if scope["type"] != "http" or tracer is None or propagator is None or scope["path"] in UNTRACED_PATHS:
            await self.app(scope, receive, send)
            return
        from opentelemetry.trace import SpanKind

        carrier: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name in (b"traceparent", b"tracestate"):
                key = name.decode()
                carrier[key] = f"{carrier[key]},{value.decode('latin-1')}" if key in carrier else value.decode("latin-1")
        attributes = {
            "http.request.method": scope["method"],
            "url.scheme": scope.get("scheme", "http"),
            "url.path": loggable_path(scope["path"]),  # a stream id in the path appears as its digest; never the query
            "network.protocol.version": scope.get("http_version", "1.1"),
        }
        span = tracer.start_span(scope["method"], context=propagator.extract(carrier), kind=SpanKind.SERVER, attributes=attributes)
        scope[SERVER_SPAN] = span
        try:
            await self.app(scope, receive, send)
        finally:
            end_server_span(span, scope)


def end_server_span(span: Span, scope: Scope) -> None:
    from opentelemetry.trace import Status, StatusCode

    route = scope.get("route")
    template = getattr(route, "path", None)
    if isinstance(template, str):
        span.update_name(f"{scope['method']} {template}")
        span.set_attribute("http.route", template)
    exchange: Exchange | None = scope.get("state", {}).get("exchange")
    outcome, status = (exchange.ended_as(), exchange.status) if exchange is not None else ("error", 500)
    span.set_attribute("http.response.status_code", status)
    span.set_attribute("relay.outcome", outcome)
    if exchange is not None:
        span.set_attribute("relay.request_id", exchange.request_id)
    if outcome == "completed":
        span.set_status(Status(StatusCode.OK))
    else:
        span.set_attribute("error.type", outcome)
        if not (400 <= status < 500 and status != 429):  # a request of the client's own fault is not the service's error
            span.set_status(Status(StatusCode.ERROR, outcome))
    span.end()


def server_spans(telemetry: Telemetry | None) -> list[Middleware]:
    """The middleware for create_app: a server span per request when traces are on, else none."""
    return [Middleware(ServerSpans, telemetry=telemetry)] if telemetry is not None and telemetry.settings.traces else []


def telemetry_for(settings: Settings) -> Telemetry | None:
    """The app's telemetry, or None (and nothing of it anywhere) when OTEL_* leave it off."""
    return Telemetry(settings) if settings.otel.enabled else None


# -- the upstream calls: a client inference span per attempt -------------------------------------------


class CallTrace:
    """One UpstreamCall as telemetry follows it: an inference span per attempt (each retry, each
    fallback), under the request's server span, and the GenAI metrics of each attempt.

    Attempts start and fail in the worker thread that makes them (`attempt`, `failed`,
    `answered`: upstream.CallObserver, told by upstream.py), the stream's chunks are seen in the
    worker threads that read them (`chunks`, through `observed`), and the call ends on the event
    loop when its stream does (`end`): the lock keeps them apart."""

    def __init__(self, telemetry: Telemetry, parent: Context | None, body: Mapping[str, Any], round_number: int = 0) -> None:
        self.telemetry, self.parent, self.round = telemetry, parent, round_number
        model = body.get("model")
        self.model = str(model)[:MAX_MODEL_CHARS] if model is not None else ""
        self.request: dict[str, Any] = {
            "gen_ai.operation.name": OPERATION,
            "gen_ai.provider.name": PROVIDER,
            "gen_ai.request.model": self.model,
            "gen_ai.request.stream": bool(body.get("stream")),
            **request_parameters(body),
        }
        self.inputs = input_messages(body) if telemetry.settings.capture_content else None
        self.lock = threading.Lock()
        self.ended = False
        self.attempts = 0
        self.span: Span | None = None
        self.reset(time.monotonic(), {}, False)

    def reset(self, now: float, metric_attributes: dict[str, Any], responses: bool) -> None:
        """What one attempt gathers, from its start at `now`."""
        self.started, self.metric_attributes, self.responses = now, metric_attributes, responses
        self.first_chunk_at: float | None = None
        self.last_chunk_at = 0.0
        self.chunk_count = 0
        self.response_id: str | None = None
        self.response_model: str | None = None
        self.finish_reasons: list[str] = []
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.texts: list[str] | None = [] if self.inputs is not None else None

    # upstream.CallObserver: told from the worker thread that makes the call

    def attempt(self, request: httpx2.Request) -> None:
        """An attempt begins (the first, a retry, or a fallback): its own span, whose context the
        request carries to the upstream."""
        from opentelemetry.trace import SpanKind, set_span_in_context

        with self.lock:
            tracer, propagator = self.telemetry.tracer, self.telemetry.propagator
            if self.ended or tracer is None or propagator is None:
                return
            if self.span is not None:
                self.close("upstream_error")  # a fallback replaces an attempt whose stream failed before its output
            responses = request.url.path.endswith("/responses")
            url = request.url
            address = {"server.address": url.host, "server.port": url.port or (443 if url.scheme == "https" else 80)}
            attributes = {**self.request, **address, "openai.api.type": "responses" if responses else "chat_completions",
                          "relay.attempt": self.attempts, "relay.round": self.round}
            if self.inputs is not None:
                attributes["gen_ai.input.messages"] = self.inputs
            self.attempts += 1
            self.span = tracer.start_span(f"{OPERATION} {self.model}", context=self.parent, kind=SpanKind.CLIENT, attributes=attributes)
            metric_attributes = {name: self.request[name] for name in ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model")}
            self.reset(time.monotonic(), {**metric_attributes, "server.address": url.host}, responses)
            propagator.inject(request.headers, context=set_span_in_context(self.span))

    def failed(self, error: Exception) -> None:
        """The attempt failed before its answer started (it may be tried again)."""
        with self.lock:
            if self.span is not None:
                self.close(error_type(error))

    def answered(self, response: httpx2.Response) -> None:
        """The attempt's whole answer arrived (a request without streaming)."""
        with self.lock:
            if self.span is None:
                return
            try:
                answer = orjson.loads(response.content)
            except ValueError:
                answer = None
            if isinstance(answer, dict):
                self.note_response(answer, self.responses)
            self.close(None)

    # the stream

    def chunks(self, payloads: list[bytes]) -> None:
        """One read's worth of the attempt's stream (in the worker thread that read it): the time to
        its first chunk, and what its chunks say of the response. Parses only what needs it: the
        first chunk, usage, a finish reason, and a Responses API ending."""
        now = time.monotonic()
        with self.lock:
            if self.span is None:
                return
            count = 0
            for payload in payloads:
                if payload == DONE:
                    continue
                first = not self.chunk_count and not count
                if self.responses:
                    head = payload[:64]
                    count += b".delta\n" in head
                    if b"response.created" in head or any(ending in head for ending in RESPONSE_ENDINGS) or (self.texts is not None and b"output_text.delta" in head):
                        self.read_event(payload)
                    continue
                count += 1
                if (first or self.texts is not None or carries_usage(payload)
                        or b'"finish_reason":"' in payload or b'"finish_reason": "' in payload):
                    self.read_chunk(payload)
            if count:
                if self.first_chunk_at is None:
                    self.first_chunk_at = now
                    self.span.set_attribute("gen_ai.response.time_to_first_chunk", now - self.started)
                self.last_chunk_at = now
                self.chunk_count += count

    def read_chunk(self, payload: bytes) -> None:
        try:
            chunk = orjson.loads(payload)
        except ValueError:
            return
        if not isinstance(chunk, dict):
            return
        self.note_response(chunk, False)
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict) and self.texts is not None and choice.get("index", 0) == 0:
                content = (choice.get("delta") or {}).get("content")
                if isinstance(content, str):
                    self.texts.append(content)

    def read_event(self, event: bytes) -> None:
        try:
            parsed = orjson.loads(event_data(event) if not event.startswith(b"{") else event)
        except ValueError:
            return
        if not isinstance(parsed, dict):
            return
        if parsed.get("type") == "response.output_text.delta" and self.texts is not None and isinstance(parsed.get("delta"), str):
            self.texts.append(parsed["delta"])
        elif isinstance(parsed.get("response"), dict):
            self.note_response(parsed["response"], True)

    def note_response(self, answer: dict[str, Any], responses: bool) -> None:
        """What a chat completion (chunk) or a Responses API response object says of itself."""
        if isinstance(answer.get("id"), str):
            self.response_id = answer["id"]
        if isinstance(answer.get("model"), str):
            self.response_model = answer["model"][:MAX_MODEL_CHARS]
        usage = answer.get("usage")
        if isinstance(usage, dict):
            if responses:
                usage = in_chat_names(usage)
            self.input_tokens = usage["prompt_tokens"] if isinstance(usage.get("prompt_tokens"), int) else self.input_tokens
            self.output_tokens = usage["completion_tokens"] if isinstance(usage.get("completion_tokens"), int) else self.output_tokens
        if responses:
            status = answer.get("status")
            if status in ("completed", "incomplete", "failed"):
                reason = (answer.get("incomplete_details") or {}).get("reason")
                self.finish_reasons = ["stop" if status == "completed" else "error" if status == "failed" else INCOMPLETE_REASONS.get(reason, str(reason))]
            if self.texts is not None and not self.texts:  # a whole response: its output's text
                self.texts.extend(part.get("text", "") for item in answer.get("output") or () if isinstance(item, dict)
                                  for part in item.get("content") or () if isinstance(part, dict) and part.get("type") == "output_text")
            return
        for choice in answer.get("choices") or ():
            if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str):
                self.finish_reasons.append(choice["finish_reason"])
            message = choice.get("message") if isinstance(choice, dict) else None
            if isinstance(message, dict) and isinstance(message.get("content"), str) and self.texts is not None and choice.get("index", 0) == 0:
                self.texts.append(message["content"])

    # the end

    def end(self, outcome: str) -> None:
        """The call's stream ended as `outcome` (the log line's word: completed, client_disconnected...)."""
        with self.lock:
            self.ended = True
            if self.span is not None:
                self.close(None if outcome == "completed" else outcome)

    def close(self, failure: str | None) -> None:
        """End the current attempt's span, `failure` its error.type (None: it succeeded), and record
        its metrics. Called with the lock held."""
        from opentelemetry.trace import Status, StatusCode

        span, self.span = self.span, None
        assert span is not None
        now = time.monotonic()
        if self.response_id is not None:
            span.set_attribute("gen_ai.response.id", self.response_id)
        if self.response_model is not None:
            span.set_attribute("gen_ai.response.model", self.response_model)
            self.metric_attributes["gen_ai.response.model"] = self.response_model
        if self.finish_reasons:
            span.set_attribute("gen_ai.response.finish_reasons", self.finish_reasons)
        if self.input_tokens is not None:
            span.set_attribute("gen_ai.usage.input_tokens", self.input_tokens)
        if self.output_tokens is not None:
            span.set_attribute("gen_ai.usage.output_tokens", self.output_tokens)
        if self.texts is not None and (self.texts or self.finish_reasons):
            output = {"role": "assistant", "parts": [{"type": "text", "content": "".join(self.texts)}], "finish_reason": (self.finish_reasons or [""])[0]}
            span.set_attribute("gen_ai.output.messages", json.dumps([output], ensure_ascii=False))
        if failure is None:
            span.set_status(Status(StatusCode.OK))
        else:
            span.set_attribute("error.type", failure)
            span.set_status(Status(StatusCode.ERROR, failure))
        span.end()
        instruments = self.telemetry.instruments
        if instruments is None:
            return
        attributes = self.metric_attributes
        instruments.duration.record(now - self.started, {**attributes, "error.type": failure} if failure else attributes)
        if self.first_chunk_at is not None:
            instruments.time_to_first_chunk.record(self.first_chunk_at - self.started, attributes)
            if self.chunk_count > 1:
                # One value per stream, the mean of its chunks' times: the SDK's histogram costs
                # about 10 µs a value, which per chunk would be a tenth of the relay's whole cost.
                instruments.time_per_output_chunk.record((self.last_chunk_at - self.first_chunk_at) / (self.chunk_count - 1), attributes)
        for kind, tokens in (("input", self.input_tokens), ("output", self.output_tokens)):
            if tokens is not None:
                instruments.token_usage.record(tokens, {**attributes, "gen_ai.token.type": kind})

    def next_round(self, body: Mapping[str, Any]) -> CallTrace:
        return CallTrace(self.telemetry, self.parent, body, self.round + 1)

    def server_span_context(self) -> SpanContext | None:
        from opentelemetry.trace import get_current_span

        context = get_current_span(self.parent).get_span_context() if self.parent is not None else None
        return context if context is not None and context.is_valid else None


def error_type(error: Exception) -> str:
    """error.type of an attempt that failed before its answer: the upstream's HTTP status, or why it had none."""
    if isinstance(error, ClientGone):
        return "client_disconnected"
    if isinstance(error, openai.APIStatusError):
        return str(error.status_code)
    if isinstance(error, openai.APITimeoutError):
        return "timeout"
    if isinstance(error, openai.APIConnectionError):
        return "upstream_unreachable"
    return type(error).__name__


def request_parameters(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request's sampling settings the conventions name, where the body sets them as numbers."""
    found = {}
    for attribute, names in (("gen_ai.request.max_tokens", ("max_completion_tokens", "max_tokens", "max_output_tokens")),
                             ("gen_ai.request.temperature", ("temperature",)), ("gen_ai.request.top_p", ("top_p",))):
        for name in names:
            value = body.get(name)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                found[attribute] = value
                break
    return found


def input_messages(body: Mapping[str, Any]) -> str:
    """gen_ai.input.messages (only with content capture on): the conversation in the conventions'
    shape, its text parts with their content."""

    def message(role: Any, content: Any) -> dict[str, Any]:
        if isinstance(content, str):
            parts = [{"type": "text", "content": content}]
        else:
            parts = [{"type": "text", "content": part["text"]} if isinstance(part.get("text"), str) else {"type": str(part.get("type", "unknown"))}
                     for part in content or () if isinstance(part, dict)]
        return {"role": str(role or "user"), "parts": parts}

    given = body.get("messages", body.get("input"))
    if isinstance(given, str):
        given = [{"role": "user", "content": given}]
    messages = [message(item.get("role"), item.get("content")) for item in given or () if isinstance(item, dict)]
    if isinstance(body.get("instructions"), str):
        messages.insert(0, message("system", body["instructions"]))
    return json.dumps(messages, ensure_ascii=False)


# -- the hooks the rest of the service calls ---------------------------------------------------------------


def trace_call(telemetry: Telemetry | None, scope: Scope, body: Mapping[str, Any]) -> CallTrace | None:
    """What an upstream call asking `body` for the request of `scope` is traced by; None when off."""
    if telemetry is None or telemetry.tracer is None:
        return None
    from opentelemetry.trace import set_span_in_context

    server = scope.get(SERVER_SPAN)
    return CallTrace(telemetry, set_span_in_context(server) if server is not None else None, body)


def observed(call: UpstreamCall, events: Iterator[list[bytes]]) -> Iterator[list[bytes]]:
    """`events`, the batches of a call's stream, each shown to the call's trace first; untraced,
    `events` itself, so that nothing is added per token."""
    trace = call.trace
    if not isinstance(trace, CallTrace):
        return events
    return watched(trace, events)


def watched(trace: CallTrace, events: Iterator[list[bytes]]) -> Iterator[list[bytes]]:
    try:
        for payloads in events:
            trace.chunks(payloads)
            yield payloads
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()  # now, not when collected: the call's connection goes back at once


def end_traces(calls: Iterable[UpstreamCall], outcome: str) -> None:
    """The stream of `calls` ended as `outcome`: their open spans end so."""
    for call in calls:
        if isinstance(call.trace, CallTrace):
            call.trace.end(outcome)


def follow_round(previous: UpstreamCall, call: UpstreamCall, body: Mapping[str, Any]) -> None:
    """A continuation round (`call`, asking `body`) follows `previous`, whose round is over: its own
    span, under the same request."""
    if isinstance(previous.trace, CallTrace):
        previous.trace.end("completed")
        call.trace = previous.trace.next_round(body)


def remember_answer(stream_id: str, calls: list[UpstreamCall]) -> None:
    """The /chat answer `stream_id` is produced by `calls`: a resume of it will link to their request."""
    trace = calls[0].trace if calls else None
    if isinstance(trace, CallTrace):
        context = trace.server_span_context()
        if context is not None:
            trace.telemetry.remember(stream_id, context)


def link_answer(telemetry: Telemetry | None, scope: Scope, stream_id: str) -> None:
    """This request resumes answer `stream_id`: its span links to the request that started it (when
    that request was served by this process)."""
    span = scope.get(SERVER_SPAN)
    if telemetry is None or span is None:
        return
    context = telemetry.recall(stream_id)
    if context is not None:
        span.add_link(context, {"relay.link": "resumes"})
