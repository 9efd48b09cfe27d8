"""A real OTLP/HTTP receiver on 127.0.0.1 for tests: what an OpenTelemetry collector is to the service.

It accepts POST /v1/traces and /v1/metrics, decodes the ExportTraceServiceRequest and
ExportMetricsServiceRequest protobufs with OpenTelemetry's own opentelemetry-proto package, and
keeps them (and the raw payloads, for searching every byte exported) for assertions. With
`answer=False` it is a collector that never answers: it reads each request and holds it until the
receiver stops; with `status`, one that answers every export with that HTTP error.
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest, ExportMetricsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanProto
from opentelemetry.proto.trace.v1.trace_pb2 import Status

HOLD_SECONDS = 120.0  # the longest a never-answering receiver holds a request, if nobody stops it


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return {item.key: value_of(item.value) for item in value.kvlist_value.values}
    return None if kind is None else getattr(value, kind)


def attributes_of(pairs: Any) -> dict[str, Any]:
    return {pair.key: value_of(pair.value) for pair in pairs}


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str  # SPAN_KIND_SERVER, SPAN_KIND_CLIENT...
    attributes: dict[str, Any]
    status: str  # STATUS_CODE_OK, STATUS_CODE_ERROR, STATUS_CODE_UNSET
    status_message: str
    links: list[tuple[str, str, dict[str, Any]]]
    resource: dict[str, Any]
    scope: str
    start_ns: int
    end_ns: int


@dataclass
class Point:
    """One data point of a metric, as the latest export had it (metrics are cumulative)."""

    metric: str
    unit: str
    attributes: dict[str, Any]
    count: int
    sum: float
    resource: dict[str, Any] = field(default_factory=dict)


class OtlpReceiver:
    def __init__(self, answer: bool = True, status: int = 200) -> None:
        self.answer, self.status = answer, status
        self.payloads: list[tuple[str, bytes]] = []  # (path, decompressed body) of every export
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        self.held = 0  # requests being held unanswered now
        self.received = 0
        self.lock = threading.Condition()
        self.stopping = threading.Event()
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> OtlpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                receiver.keep(self.path, body)
                if not receiver.answer:
                    with receiver.lock:
                        receiver.held += 1
                        receiver.lock.notify_all()
                    receiver.stopping.wait(HOLD_SECONDS)
                    with receiver.lock:
                        receiver.held -= 1
                    self.close_connection = True
                    return
                if receiver.status != 200:
                    self.send_response(receiver.status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                answer = (ExportTraceServiceResponse() if self.path == "/v1/traces" else ExportMetricsServiceResponse()).SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="otlp-receiver", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        if self.thread is not None:
            self.thread.join(timeout=5)

    def keep(self, path: str, body: bytes) -> None:
        with self.lock:
            self.received += 1
            self.payloads.append((path, body))
            if path == "/v1/traces":
                self.traces.append(ExportTraceServiceRequest.FromString(body))
            elif path == "/v1/metrics":
                self.metrics.append(ExportMetricsServiceRequest.FromString(body))
            self.lock.notify_all()

    def wait(self, condition: Callable[[], bool], timeout: float = 10, what: str = "the spans") -> None:
        deadline = time.monotonic() + timeout
        with self.lock:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"the receiver did not get {what} within {timeout} s")
                self.lock.wait(min(left, 0.05))

    def spans(self, trace_id: str | None = None) -> list[Span]:
        """Every span received (of the trace `trace_id`, if given), in the order they started."""
        found = []
        with self.lock:
            requests = list(self.traces)
        for request in requests:
            for resource_spans in request.resource_spans:
                resource = attributes_of(resource_spans.resource.attributes)
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        if trace_id is not None and span.trace_id.hex() != trace_id:
                            continue
                        found.append(Span(
                            span.name, span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(),
                            SpanProto.SpanKind.Name(span.kind), attributes_of(span.attributes),
                            Status.StatusCode.Name(span.status.code), span.status.message,
                            [(link.trace_id.hex(), link.span_id.hex(), attributes_of(link.attributes)) for link in span.links],
                            resource, scope_spans.scope.name, span.start_time_unix_nano, span.end_time_unix_nano,
                        ))
        return sorted(found, key=lambda span: span.start_ns)

    def wait_for_spans(self, trace_id: str, count: int, timeout: float = 10) -> list[Span]:
        """The trace's spans, once at least `count` of them arrived."""
        self.wait(lambda: self.count_spans(trace_id) >= count, timeout, f"{count} spans of trace {trace_id}")
        return self.spans(trace_id)

    def count_spans(self, trace_id: str) -> int:
        # Called with the lock held, from wait(): no decoding beyond the ids.
        return sum(span.trace_id.hex() == trace_id for request in self.traces for resource_spans in request.resource_spans
                   for scope_spans in resource_spans.scope_spans for span in scope_spans.spans)

    def points(self, metric: str) -> list[Point]:
        """The data points of `metric` in the latest export that had it (histograms and sums)."""
        with self.lock:
            requests = list(self.metrics)
        for request in reversed(requests):
            found = []
            for resource_metrics in request.resource_metrics:
                resource = attributes_of(resource_metrics.resource.attributes)
                for scope_metrics in resource_metrics.scope_metrics:
                    for entry in scope_metrics.metrics:
                        if entry.name != metric:
                            continue
                        kind = entry.WhichOneof("data")
                        for point in getattr(entry, kind).data_points:
                            count = getattr(point, "count", 0)
                            total = point.sum if kind == "histogram" else (point.as_double or point.as_int)
                            found.append(Point(metric, entry.unit, attributes_of(point.attributes), count, total, resource))
            if found:
                return found
        return []

    def everything(self) -> bytes:
        """Every byte exported so far, decompressed: to search for what must never be there."""
        with self.lock:
            return b"".join(body for _, body in self.payloads)
