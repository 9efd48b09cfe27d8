"""The benchmark's load client: one phase, N users streaming at once, one JSON summary on stdout.

Lean on purpose, because it shares the cores with the service and the upstream: raw asyncio
protocols (uvloop when installed), no HTTP library, no JSON decoding of events. Each token's
content is `@<emission time in monotonic ns>;`; `data_received` stamps the arrival of each
network read, so latency = arrival - emission, for every token, on either framing (OpenAI SSE
passes the content through, /chat's SSE puts it in {"text": ...}).

A phase is closed-loop: each of N users starts a stream, and a new one as soon as it ends. The
users' first streams start evenly over `ramp` seconds (one stream's duration), so that streams
then begin and end at the steady rate that keeps N open, like N independent users. Everything
is measured in the `window` after the ramp; at its end the open streams are cut (closed).

While the window runs it also probes GET /healthz every PROBE_SECONDS on its own connection,
samples the service's VmRSS, and reads the CPU time of the service, the upstream, this process
and the whole machine from /proc.

Usage: python client.py '<phase spec as JSON>'  (see run.py)
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

TOKEN = re.compile(rb"@(\d+);")
RETRY_AFTER = re.compile(rb"(?i)\r\nretry-after: *(\d+)")
DONE_MARKERS = (b"data: [DONE]", b"event: done")
TERMINATOR = b"\r\n0\r\n\r\n"  # the last chunk of a chunked body
PROBE_SECONDS = 0.05
PROBE_TIMEOUT = 2.0
CONNECT_SECONDS = 5.0  # a full accept queue would otherwise hold a connect for minutes
RETRY_SECONDS = 0.1  # a user whose stream failed waits this long (or its Retry-After), so failures cannot spin
TICK = os.sysconf("SC_CLK_TCK")
NS = 1_000_000_000


def cpu_seconds(pid: int) -> float:
    """utime + stime of all the process's threads, plus its waited-for children's."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / TICK  # fields 14-17 of proc(5)


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine spent busy (first line of /proc/stat: all but idle, iowait)."""
    with open("/proc/stat", "rb") as stat:
        ticks = [int(value) for value in stat.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / TICK


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1])
    return 0


def percentiles(values: list[int]) -> dict[str, float] | None:
    """Nearest-rank percentiles of nanosecond values, in microseconds."""
    if not values:
        return None
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(len(ordered) * p / 100) - 1)] / 1000

    return {"n": len(ordered), "p50": rank(50), "p90": rank(90), "p99": rank(99), "p999": rank(99.9), "max": ordered[-1] / 1000}


@dataclass(eq=False)  # compared and hashed by identity: kept in a set
class Stream(asyncio.Protocol):
    """One streamed response, read as it arrives."""

    request: bytes
    started: int  # monotonic ns, before connecting
    done: asyncio.Future[None]
    first_byte: int | None = None
    first_token: int | None = None
    status: int = 0
    head: bytes = b""  # the response head, without its final blank line
    saw_done: bool = False
    complete: bool = False
    cut: bool = False  # closed by us at the end of the window
    error: str | None = None
    latencies: list[int] = field(default_factory=list)  # ns, one per token
    arrivals: list[int] = field(default_factory=list)  # ns, one per token
    transport: asyncio.Transport | None = None
    _head: bytes = b""
    _token_tail: bytes = b""  # a token cut in two by a read boundary
    _tail: bytes = b""  # the last bytes, for markers cut in two by a read boundary

    def retry_after(self) -> float | None:
        """The seconds a refusal asked to wait, as the OpenAI SDKs honour them."""
        found = RETRY_AFTER.search(self.head)
        return float(found.group(1)) if found else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert hasattr(transport, "write")  # uvloop's transports are not asyncio.Transport subclasses
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        if self.first_byte is None:
            self.first_byte = now
        if not self.status:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.status = int(self._head[9:12])
            self.head, data, self._head = self._head[:end], self._head[end + 4 :], b""
            if self.status != 200:
                self.finish(f"HTTP {self.status}")
                return
        text = self._token_tail + data
        for match in TOKEN.finditer(text):
            self.latencies.append(now - int(match.group(1)))
            self.arrivals.append(now)
        if self.first_token is None and self.latencies:
            self.first_token = now
        cut = text.rfind(b"@")
        self._token_tail = text[cut:] if cut >= 0 and text.find(b";", cut) < 0 else b""
        seen = self._tail + data
        self.saw_done = self.saw_done or any(marker in seen for marker in DONE_MARKERS)
        if seen.endswith(TERMINATOR):
            self.complete = True
            self.finish(None if self.saw_done else "ended without its done marker")
        self._tail = seen[-16:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish(None if self.complete or self.cut else f"connection closed early ({exc or 'EOF'})")

    def finish(self, error: str | None) -> None:
        if not self.done.done():
            self.error = error
            self.done.set_result(None)
            if self.transport is not None:
                self.transport.close()


def request_bytes(spec: dict[str, Any]) -> bytes:
    path, model = spec["path"], f"bench-{spec['rate']:g}"  # the fake upstream paces by model name
    if path == "/chat":
        body: dict[str, Any] = {"message": "Tell me something.", "model": model, "max_tokens": spec["tokens"]}
        accept = "text/event-stream"
    else:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "Tell me something."}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": spec["tokens"],
        }
        accept = "application/json"  # what the openai SDKs send, also when streaming
    payload = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{spec['port']}\r\nContent-Type: application/json\r\n"
        f"Accept: {accept}\r\nAuthorization: Bearer bench\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode() + payload


class Load:
    """N users, each streaming one answer after the other until the window ends."""

    def __init__(self, spec: dict[str, Any], start: float, stop: float) -> None:
        self.spec, self.start, self.stop = spec, start, stop
        self.request = request_bytes(spec)
        self.streams: list[Stream] = []
        self.open: set[Stream] = set()

    async def run(self) -> None:
        users = self.spec["streams"]
        async with asyncio.TaskGroup() as group:
            for user in range(users):
                group.create_task(self.user(self.start + self.spec["ramp"] * user / users))

    async def user(self, first: float) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(first - loop.time())
        while loop.time() < self.stop:
            stream = Stream(self.request, time.monotonic_ns(), loop.create_future())
            self.streams.append(stream)
            self.open.add(stream)
            try:
                connecting = loop.create_connection(lambda: stream, "127.0.0.1", self.spec["port"])
                transport, _ = await asyncio.wait_for(connecting, CONNECT_SECONDS)
                if stream.cut:
                    transport.abort()  # connected only after the window ended
            except (OSError, asyncio.TimeoutError) as error:
                stream.finish(f"connect failed: {error!r}")
            await stream.done
            self.open.discard(stream)
            if stream.error is not None:
                await asyncio.sleep(stream.retry_after() or RETRY_SECONDS)

    def cut(self) -> None:
        for stream in list(self.open):
            stream.cut = True
            if stream.transport is not None:
                stream.transport.abort()  # as a client that leaves: the service must notice
            stream.finish(None)


class Burst:
    """Open loop: `streams` requests, started evenly over `ramp` seconds, each tried once; the
    service may refuse some (503). Ends when every stream has ended, or at `deadline`."""

    def __init__(self, spec: dict[str, Any], start: float) -> None:
        self.spec, self.start = spec, start
        self.request = request_bytes(spec)
        self.streams: list[Stream] = []

    async def run(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        users = self.spec["streams"]
        tasks = [asyncio.ensure_future(self.one(self.start + self.spec["ramp"] * user / users)) for user in range(users)]
        await asyncio.wait(tasks, timeout=max(0.0, deadline - loop.time()))
        for stream in self.streams:
            if not stream.done.done():
                stream.cut = True
                stream.finish("not finished by the deadline")
        await asyncio.gather(*tasks, return_exceptions=True)

    async def one(self, at: float) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(at - loop.time())
        stream = Stream(self.request, time.monotonic_ns(), loop.create_future())
        self.streams.append(stream)
        try:
            connecting = loop.create_connection(lambda: stream, "127.0.0.1", self.spec["port"])
            await asyncio.wait_for(connecting, CONNECT_SECONDS)
        except (OSError, asyncio.TimeoutError) as error:
            stream.finish(f"connect failed: {error!r}")
        await stream.done


def summarize_burst(streams: list[Stream]) -> dict[str, Any]:
    """Admitted (200) and refused (503) streams, each measured from the start of connecting."""
    admitted = [s for s in streams if s.status == 200]
    refused = [s for s in streams if s.status == 503]
    others: dict[str, int] = {}
    for s in streams:
        if s.status not in (200, 503):
            reason = s.error or f"HTTP {s.status}"
            others[reason] = others.get(reason, 0) + 1
    latencies = [lat for s in admitted for lat in s.latencies]
    return {
        "offered": len(streams),
        "admitted": len(admitted),
        "admitted_completed": sum(1 for s in admitted if s.complete and s.error is None),
        "admitted_failures": sorted({s.error for s in admitted if s.error is not None}),
        "refused": len(refused),
        "refused_with_retry_after": sum(1 for s in refused if s.retry_after() is not None),
        "other_failures": others,
        "tokens": len(latencies),
        "latency_us": percentiles(latencies),
        "ttfb_us": percentiles([s.first_byte - s.started for s in admitted if s.first_byte is not None]),
        "ttft_us": percentiles([s.first_token - s.started for s in admitted if s.first_token is not None]),
        "refusal_us": percentiles([s.first_byte - s.started for s in refused if s.first_byte is not None]),
    }


@dataclass
class Monitor:
    """What the window costs the machine, and /healthz probes and VmRSS samples of the service."""

    pids: dict[str, int]
    health_port: int | None
    health: list[int] = field(default_factory=list)  # ns
    health_failures: int = 0
    rss_peak: int = 0
    cpu: dict[str, float] = field(default_factory=dict)
    stop: float = math.inf  # may be brought forward while it runs

    async def run(self, start: float, stop: float) -> None:
        self.stop = stop
        loop = asyncio.get_running_loop()
        service = self.pids.get("service")
        connection = await asyncio.open_connection("127.0.0.1", self.health_port) if self.health_port else None
        await asyncio.sleep(start - loop.time())
        before = self._cpu()
        tick = start
        try:
            while loop.time() < self.stop:
                if service is not None:
                    self.rss_peak = max(self.rss_peak, rss_kib(service))
                if connection is not None:
                    connection = await self._probe(*connection)
                tick += PROBE_SECONDS
                await asyncio.sleep(min(tick, self.stop) - loop.time())
            after = self._cpu()
            self.cpu = {name: after[name] - before[name] for name in before}
            # Whatever else ran on the machine meanwhile: more than a little makes the figures suspect.
            self.cpu["other_processes"] = max(0.0, self.cpu.pop("machine") - sum(self.cpu.values()))
        finally:
            if connection is not None:
                connection[1].close()

    def _cpu(self) -> dict[str, float]:
        cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        cpu["client"] = time.process_time()
        cpu["machine"] = busy_cpu_seconds()
        return cpu

    async def _probe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        started = time.monotonic_ns()
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), PROBE_TIMEOUT)
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            await asyncio.wait_for(reader.readexactly(int(length.group(1)) if length else 0), PROBE_TIMEOUT)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            self.health_failures += 1
            writer.close()
            return None  # stop probing: a /healthz that fails is the finding already
        self.health.append(time.monotonic_ns() - started)
        return reader, writer


def summarize(streams: list[Stream], start: float, stop: float, grace: float) -> dict[str, Any]:
    """The window's figures. Time to first byte counts every stream that started (in the ramp or
    the window) early enough to have had `grace` seconds for it; one that got nothing in that
    time counts as starved, with its wait until the window's end as its time to first byte."""
    w0, w1 = int(start * NS), int(stop * NS)
    latencies = [lat for s in streams for lat, at in zip(s.latencies, s.arrivals) if w0 <= at <= w1]
    timed = [s for s in streams if s.started <= w1 - grace * NS]
    starved = [s for s in timed if s.first_byte is None and s.error is None]
    failed: dict[str, int] = {}
    for s in streams:
        if s.error is not None:
            failed[s.error] = failed.get(s.error, 0) + 1
    return {
        "streams_started": len(streams),
        "streams_completed": sum(1 for s in streams if s.complete and s.error is None),
        "streams_failed": sum(failed.values()),
        "failures": failed,
        "streams_starved": len(starved),
        "tokens": len(latencies),
        "tokens_per_second": len(latencies) / (stop - start),
        "latency_us": percentiles(latencies),
        "ttfb_us": percentiles([(s.first_byte or w1) - s.started for s in timed if s.error is None]),
        "ttft_us": percentiles([(s.first_token or w1) - s.started for s in timed if s.error is None]),
    }


async def burst(spec: dict[str, Any]) -> dict[str, Any]:
    """The overload level: everything from the first request to the last stream's end counts."""
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.2
    stream_seconds = spec["tokens"] / spec["rate"] if spec["rate"] else 5.0
    deadline = start + spec["ramp"] + stream_seconds + spec["window"]
    load = Burst(spec, start)
    monitor = Monitor(spec["pids"], spec["health_port"])
    running = asyncio.ensure_future(load.run(deadline))
    watching = asyncio.ensure_future(monitor.run(start, deadline))
    await running
    monitor.stop = min(monitor.stop, loop.time())
    await watching
    result = summarize_burst(load.streams)
    result.update(
        cpu_seconds=monitor.cpu,
        seconds=monitor.stop - start,
        rss_peak_kib=monitor.rss_peak or None,
        healthz_us=percentiles(monitor.health),
        healthz_failures=monitor.health_failures,
    )
    return result


async def main(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("kind") == "burst":
        return await burst(spec)
    loop = asyncio.get_running_loop()
    service = spec["pids"].get("service")
    start = loop.time() + 0.2 + spec["ramp"]  # the window; loop.time() is CLOCK_MONOTONIC too
    stop = start + spec["window"]
    load = Load(spec, start - spec["ramp"], stop)
    monitor = Monitor(spec["pids"], spec["health_port"])
    rss_before = rss_kib(service) if service else None
    running = asyncio.ensure_future(load.run())
    await monitor.run(start, stop)
    load.cut()
    await asyncio.wait_for(running, 10)
    result = summarize(load.streams, start, stop, spec["grace"])
    result.update(
        cpu_seconds=monitor.cpu,
        seconds=stop - start,
        rss_before_kib=rss_before,
        rss_peak_kib=monitor.rss_peak or None,
        healthz_us=percentiles(monitor.health),
        healthz_failures=monitor.health_failures,
    )
    return result


if __name__ == "__main__":
    try:
        from uvloop import run
    except ImportError:
        run = asyncio.run  # type: ignore[assignment]
    print(json.dumps(run(main(json.loads(sys.argv[1])))))
