"""What the required shape costs by itself: CPU per token of a blocking read through
`iterate_in_threadpool`, with no HTTP, no parsing and no service, at N paced streams.

The service reads each upstream with the blocking openai client in a worker thread, one
`iterate_in_threadpool` hop per read. This measures that hop alone, as the floor under the
service's own CPU per token (bench/run.py), against the same streams read by the event loop
itself (no thread), in one run:

    event loop    a uvloop protocol per socket reads each token and writes it on
    thread hop    one task per stream: `async for piece in iterate_in_threadpool(reader)`, where
                  the reader is a generator blocked in `socket.recv()`, then writes it on
    thread hop, pinned     the same, placed by the service's own `relay.placement` as PIN_WORKERS=1
                  places it: every thread of the process on one CPU, the reading threads SCHED_BATCH

A feeder process writes `data: x\\n\\n` into one end of a socket pair per stream, at RATE tokens
per second per stream, spread evenly; the measured process reads the other end and writes each
token into a second socket pair, whose far end nobody reads (the kernel buffers it). CPU is the
measured process's own (getrusage), over WINDOW seconds after a warm-up.

    python bench/shape.py                 # 100 streams at 20 tokens/s, about 30 s
    python bench/shape.py --streams 10,100,300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio.to_thread
import uvloop
from starlette.concurrency import iterate_in_threadpool

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the service's package, from bench/
from relay.placement import placement  # noqa: E402

RATE = 20  # tokens per second per stream, as bench/run.py's paced levels
WARM_UP = 2.0
WINDOW = 6.0
TOKEN = b"data: x\n\n"
WAYS = ("event loop", "thread hop", "thread hop, pinned")


def feed(sockets: list[socket.socket], rate: float) -> None:
    """The feeder process: one token per stream per 1/rate seconds, spread evenly, until killed."""
    interval = 1 / (len(sockets) * rate)
    due = time.monotonic()
    for turn in range(sys.maxsize):
        due += interval
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        sockets[turn % len(sockets)].send(TOKEN)


def blocking_reads(sock: socket.socket, batch: bool) -> Iterator[bytes]:
    """What a worker thread runs per hop: one blocking read (as the service reads its upstream)."""
    while data := sock.recv(65536):
        if batch:
            placement.upstream_thread()  # as the service's upstream reads call it
        yield data


class LoopReader(asyncio.Protocol):
    def __init__(self, sink: socket.socket, counter: list[int]) -> None:
        self.sink, self.counter = sink, counter

    def data_received(self, data: bytes) -> None:
        self.counter[0] += 1
        self.sink.send(data)


async def measure(way: str, sources: list[socket.socket], sinks: list[socket.socket]) -> dict[str, float]:
    counter = [0]
    loop = asyncio.get_running_loop()
    if way.endswith("pinned"):
        placement.pin()
    anyio.to_thread.current_default_thread_limiter().total_tokens = len(sources) + 40
    tasks = []
    if way == "event loop":
        for source, sink in zip(sources, sinks):
            await loop.connect_accepted_socket(lambda sink=sink: LoopReader(sink, counter), source)
    else:

        async def relay(source: socket.socket, sink: socket.socket) -> None:
            async for piece in iterate_in_threadpool(blocking_reads(source, way.endswith("pinned"))):
                counter[0] += 1
                sink.send(piece)

        tasks = [asyncio.ensure_future(relay(source, sink)) for source, sink in zip(sources, sinks)]
    await asyncio.sleep(WARM_UP)
    before, tokens_before = resource.getrusage(resource.RUSAGE_SELF), counter[0]
    await asyncio.sleep(WINDOW)
    after, tokens = resource.getrusage(resource.RUSAGE_SELF), counter[0] - tokens_before
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    switches = after.ru_nvcsw + after.ru_nivcsw - before.ru_nvcsw - before.ru_nivcsw
    del tasks  # the process exits right after: blocked worker threads need no unwinding
    return {"tokens_per_second": tokens / WINDOW, "cpu_us_per_token": (user + system) / tokens * 1e6,
            "user_us_per_token": user / tokens * 1e6, "system_us_per_token": system / tokens * 1e6,
            "switches_per_token": switches / tokens}


def run_one(way: str, streams: int) -> dict[str, float]:
    """One way at one level, in a fresh process (threads, affinity and caches of its own)."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the measured process; it forks the feeder first
        os.close(read)
        pairs = [socket.socketpair() for _ in range(streams)]
        sinks = [socket.socketpair() for _ in range(streams)]
        feeder = os.fork()
        if feeder == 0:
            feed([pair[1] for pair in pairs], RATE)
            os._exit(0)
        for sink, _ in sinks:
            sink.setblocking(False)
        result = uvloop.run(measure(way, [pair[0] for pair in pairs], [sink for sink, _ in sinks]))
        os.kill(feeder, 9)
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        result: dict[str, float] = json.loads(answer.read() or b"{}")
    os.waitpid(child, 0)
    if not result:
        sys.exit(f"the {way!r} run at {streams} streams failed")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="100", help="comma-separated stream counts (default 100)")
    levels = [int(level) for level in parser.parse_args().streams.split(",")]
    print(f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, {RATE} tokens/s per stream, {WINDOW:g} s windows")
    print(f"{'streams':>8} {'way':<20} {'tokens/s':>9} {'CPU µs/token':>13} {'user':>6} {'system':>7} {'switches':>9} {'ratio':>7}")
    for streams in levels:
        baseline = None
        for way in WAYS:
            figures = run_one(way, streams)
            baseline = baseline or figures["cpu_us_per_token"]
            print(f"{streams:>8} {way:<20} {figures['tokens_per_second']:>9.0f} {figures['cpu_us_per_token']:>13.1f} "
                  f"{figures['user_us_per_token']:>6.1f} {figures['system_us_per_token']:>7.1f} "
                  f"{figures['switches_per_token']:>9.1f} {figures['cpu_us_per_token'] / baseline:>6.1f}x", flush=True)


if __name__ == "__main__":
    main()
