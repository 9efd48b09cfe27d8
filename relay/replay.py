"""The replay store: where the events of /chat answers live, so that a reader whose connection
dropped picks up where it left off, on any worker or replica, without asking the model again.

A /chat answer is read from the upstream by a producer (`relay.answers`) that appends its events
here; every reader, the one that asked included, follows them from here and frames them for its
own Accept. By default the events live in this process's memory, bounded in time and bytes; with
REDIS_URL, in Redis Streams, so that any process can serve a resume, and a lease key that the
producing process keeps fresh tells readers when that process died (the producing process keeps
its own answers in memory too, for its own readers).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from array import array
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any

import anyio
import redis
import redis.asyncio
from starlette.requests import Request

from relay.checks import presented_key_digest
from relay.config import ConfigError, Settings
from relay.errors import StreamFailure
from relay.framing import AnswerEvent
from relay.observability import stream_digest

log = logging.getLogger(__name__)


STREAM_ID_BYTES = 18  # 144 random bits, URL-safe, no "." (which separates the id from the sequence)
FOLLOW_POLL_SECONDS = 1.0  # how long a Redis reader blocks before it looks at the producer's lease


def new_stream_id() -> str:
    return secrets.token_urlsafe(STREAM_ID_BYTES)


def owner_digest(request: Request, settings: Settings) -> bytes:
    """Whose answer this is: the digest of the client's key, or one value for all without keys
    (then the unguessable stream id is the capability)."""
    if not settings.api_keys:
        return b"anyone"
    return presented_key_digest(request)


def event_bytes(event: AnswerEvent) -> int:
    """About what an event costs to keep, at most; text dominates, the rest is bookkeeping."""
    return text_bytes(event.text) if event.kind == "delta" else 512


def text_bytes(text: str) -> int:
    return 64 + len(text) * 4


class ReplayStoreUnavailable(Exception):
    """The replay store (Redis) cannot be reached or failed."""


def replay_lost(message: str) -> StreamFailure:
    return StreamFailure("replay_unavailable", message)


class ReplayStore:
    """The interface of both stores, and who reads which answer in this process.

    Presence is what keeps an answer going: its producer stops RESUME_GRACE_SECONDS after the last
    reader left. Readers in this process count at once (join/leave, and `presence_changed` wakes
    the producer); the Redis store adds the readers of other processes.
    """

    kind = "none"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._readers: dict[str, int] = {}
        self._presence: dict[str, anyio.Event] = {}

    def join(self, stream_id: str) -> None:
        self._readers[stream_id] = self._readers.get(stream_id, 0) + 1
        self._signal_presence(stream_id)

    def leave(self, stream_id: str) -> None:
        left = self._readers.get(stream_id, 1) - 1
        if left:
            self._readers[stream_id] = left
        else:
            self._readers.pop(stream_id, None)
        self._signal_presence(stream_id)

    def local_readers(self, stream_id: str) -> int:
        return self._readers.get(stream_id, 0)

    def presence_changed(self, stream_id: str) -> anyio.Event:
        return self._presence.setdefault(stream_id, anyio.Event())

    def _signal_presence(self, stream_id: str) -> None:
        event = self._presence.pop(stream_id, None)
        if event is not None:
            event.set()

    async def readers(self, stream_id: str) -> int:
        """Readers of the answer anywhere."""
        return self.local_readers(stream_id)

    async def keep_present(self, stream_id: str) -> None:
        """Run by each reader while it reads: tells producers in other processes it is there."""

    async def start(self) -> None:
        """Check the store can be used; raises ConfigError if not."""

    async def close(self) -> None:
        pass

    async def open(self, stream_id: str, owner: bytes) -> None:
        raise NotImplementedError

    async def append(self, stream_id: str, events: list[AnswerEvent]) -> None:
        raise NotImplementedError

    async def end(self, stream_id: str) -> None:
        """The answer's last event is in: keep it RESUME_TTL_SECONDS more, then forget it."""
        raise NotImplementedError

    async def owner(self, stream_id: str) -> bytes | None:
        """Whose answer it is; None if there is no such answer (any more)."""
        raise NotImplementedError

    async def final_seq(self, stream_id: str) -> int | None:
        """The sequence number of the answer's last event, once it ended; None before."""
        raise NotImplementedError

    def follow(self, stream_id: str, after: int) -> AsyncGenerator[list[AnswerEvent], None]:
        """Every event after `after`, in batches, then the live ones until the last; raises
        StreamFailure when events the reader lacks are gone or the producer died."""
        raise NotImplementedError

    async def hold_lease(self, stream_id: str, cancel: Callable[[], None]) -> None:
        """Run by the producer for as long as it produces: calls `cancel` when another process
        asks to stop the answer."""

    async def request_cancel(self, stream_id: str) -> None:
        """Ask the producer in another process to stop the answer."""

    def usage(self) -> dict[str, Any]:
        return {"store": self.kind}


class MemoryAnswer:
    """One answer's events in this process's memory.

    An answer's events are its pieces of text ("delta", numbered one after the other) and then one
    ending, so it keeps texts, not events: a list of them while the answer runs, and once it has
    ended (to wait RESUME_TTL_SECONDS for a reader), one string and where each piece starts in it,
    a few bytes per piece instead of an object, a dict and a string each."""

    def __init__(self, owner: bytes) -> None:
        self.owner = owner
        self.first = 1  # the seq of the first event kept
        self.texts: list[str] = []  # the pieces kept, while the answer runs
        self.joined = ""  # and once it ended: all of them,
        self.starts: array[int] | None = None  # and where each one starts in `joined`
        self.ending: AnswerEvent | None = None
        self.latest: list[AnswerEvent] = []  # the last append's events, as they came: what a live reader takes next
        self.size = 0
        self.ended = False
        self.dropped = False  # evicted to keep the store within RESUME_MAX_BYTES
        self.changed = anyio.Event()
        self.positions: dict[object, int] = {}  # of the readers following it: the last seq each has

    def pieces(self) -> int:
        return len(self.texts) if self.starts is None else len(self.starts)

    def count(self) -> int:
        """How many events are kept."""
        return self.pieces() + (self.ending is not None)

    def first_seq(self) -> int:
        return self.first if self.count() else 0

    def last_seq(self) -> int:
        return self.first + self.count() - 1

    def add(self, events: list[AnswerEvent]) -> None:
        if not self.count():
            self.first = events[0].seq
        for event in events:
            if event.kind == "delta":
                self.texts.append(event.text)
            else:
                self.ending = event
        self.latest = events

    def compact(self) -> None:
        """The answer has ended: its pieces become one string."""
        starts, offset = array("I"), 0
        for text in self.texts:
            starts.append(offset)
            offset += len(text)
        self.joined, self.starts, self.texts = "".join(self.texts), starts, []

    def text(self, index: int) -> str:
        if self.starts is None:
            return self.texts[index]
        end = self.starts[index + 1] if index + 1 < len(self.starts) else len(self.joined)
        return self.joined[self.starts[index] : end]

    def events_after(self, after: int) -> list[AnswerEvent]:
        """The kept events numbered after `after`."""
        latest = self.latest
        if latest and latest[0].seq == after + 1 >= self.first:
            return latest  # a reader that keeps up: the events as they were appended
        pieces = self.pieces()
        events = [AnswerEvent(self.first + index, "delta", text=self.text(index)) for index in range(max(after + 1 - self.first, 0), pieces)]
        if self.ending is not None and self.ending.seq > after:
            events.append(self.ending)
        return events

    def drop_oldest(self, target: int) -> int:
        """Forget the oldest events (keeping the last, and what a reader following the answer has
        yet to read) until at most `target` bytes are kept."""
        read_by_all = min(self.positions.values(), default=math.inf)
        pieces = min(self.pieces(), self.count() - 1)
        count = freed = 0
        while count < pieces and self.size - freed > target and self.first + count <= read_by_all:
            freed += text_bytes(self.text(count))
            count += 1
        if self.starts is not None and count:
            cut = self.starts[count] if count < len(self.starts) else len(self.joined)
            self.joined = self.joined[cut:]
            self.starts = array("I", (start - cut for start in self.starts[count:]))
        else:
            del self.texts[:count]
        self.first += count
        self.size -= freed
        return freed


class MemoryReplayStore(ReplayStore):
    """Events in this process's memory: RESUME_MAX_ANSWER_BYTES per answer and RESUME_MAX_BYTES in
    all, oldest dropped first, except what a connected reader has yet to read; an ended answer is
    forgotten RESUME_TTL_SECONDS after its end."""

    kind = "memory"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._answers: dict[str, MemoryAnswer] = {}  # oldest first
        self._expiries: deque[tuple[float, str]] = deque()  # ended answers, in the order they end
        self._bytes = 0

    def _forget_expired(self) -> None:
        now = time.monotonic()
        while self._expiries and self._expiries[0][0] <= now:
            self._drop(self._expiries.popleft()[1])

    def _drop(self, stream_id: str) -> None:
        answer = self._answers.pop(stream_id, None)
        if answer is not None:
            self._bytes -= answer.size
            answer.dropped = True
            answer.changed.set()

    async def open(self, stream_id: str, owner: bytes) -> None:
        self._forget_expired()
        self._answers[stream_id] = MemoryAnswer(owner)

    async def append(self, stream_id: str, events: list[AnswerEvent]) -> None:
        answer = self._answers.get(stream_id)
        if answer is None:
            return  # evicted whole: its readers were told
        added = sum(event_bytes(event) for event in events)
        answer.add(events)
        answer.size += added
        self._bytes += added
        if answer.size > self.settings.resume_answer_bytes:
            # Down to three quarters, so that a long answer trims now and then, not on every event.
            self._bytes -= answer.drop_oldest(self.settings.resume_answer_bytes * 3 // 4)
        if self._bytes > self.settings.resume_total_bytes:
            self._evict(self.settings.resume_total_bytes * 3 // 4)
        answer.changed.set()
        answer.changed = anyio.Event()

    def _evict(self, target: int) -> None:
        """Oldest answers first: an ended one goes whole, a running one keeps only its newest."""
        for stream_id, answer in list(self._answers.items()):
            if self._bytes <= target:
                return
            if answer.ended and not answer.positions:
                self._drop(stream_id)
            else:
                self._bytes -= answer.drop_oldest(max(0, answer.size - (self._bytes - target)))

    async def end(self, stream_id: str) -> None:
        answer = self._answers.get(stream_id)
        if answer is not None:
            answer.ended = True
            answer.compact()
            self._expiries.append((time.monotonic() + self.settings.resume_ttl_seconds, stream_id))

    async def owner(self, stream_id: str) -> bytes | None:
        self._forget_expired()
        answer = self._answers.get(stream_id)
        return None if answer is None else answer.owner

    async def final_seq(self, stream_id: str) -> int | None:
        answer = self._answers.get(stream_id)
        return answer.last_seq() if answer is not None and answer.ended and answer.count() else None

    def holds(self, stream_id: str, after: int) -> bool:
        """Whether every event of the answer after `after` is still here."""
        answer = self._answers.get(stream_id)
        return answer is not None and not answer.dropped and (not answer.count() or answer.first_seq() <= after + 1)

    async def follow(self, stream_id: str, after: int) -> AsyncGenerator[list[AnswerEvent], None]:
        answer = self._answers.get(stream_id)
        if answer is None:
            raise replay_lost("The answer is no longer kept.")
        reader = object()
        try:
            while True:
                if answer.dropped or (answer.count() and answer.first_seq() > after + 1):
                    raise replay_lost("The service no longer keeps the part of the answer this reader lacks.")
                answer.positions[reader] = after
                if answer.ended and answer.last_seq() <= after:
                    raise replay_lost("The answer has no events after that one.")
                if answer.count() and answer.last_seq() > after:
                    batch = answer.events_after(after)
                    yield batch
                    if batch[-1].kind != "delta":
                        return
                    after = batch[-1].seq
                    continue
                await answer.changed.wait()
        finally:
            answer.positions.pop(reader, None)

    def usage(self) -> dict[str, Any]:
        self._forget_expired()
        return {"store": self.kind, "answers": len(self._answers), "bytes": self._bytes, "max_bytes": self.settings.resume_total_bytes}


class RedisReplayStore(ReplayStore):
    """Events in Redis Streams, shared by every worker and replica that uses the same Redis.

    Per answer (keys named by the id's digest): a stream of batches, each entry's id is the last
    sequence number it holds, so that XREAD after "<n>-0" returns exactly the batches with events
    after n; a hash with the owner's digest, the first sequence kept and a cancel request; a lease
    key that only the producing process renews; a sorted set of readers, scored by when their
    presence lapses. Everything expires: RESUME_TTL_SECONDS after the end, or MAX_STREAM_SECONDS
    later if the producer vanished without ending.
    """

    kind = "redis"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        assert settings.redis_url is not None
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=2 * settings.max_streams + 32,  # a blocked XREAD per reader, and the producers'
            timeout=10,  # the longest wait for a free connection
            socket_timeout=FOLLOW_POLL_SECONDS + 4,
            socket_connect_timeout=5,
        )
        self.redis = redis.asyncio.Redis(connection_pool=pool)
        # The answers this process produces, also in its memory: their readers here (as a rule, the
        # one that asked) follow them without a round trip to Redis for each batch.
        self.produced_here = MemoryReplayStore(settings)
        self._sizes: dict[str, deque[tuple[int, int]]] = {}  # per answer produced here: (last seq, bytes) per entry
        self._kept: dict[str, int] = {}

    @staticmethod
    def _keys(stream_id: str) -> tuple[str, str, str, str]:
        base = f"relay:answer:{{{stream_digest(stream_id)}}}"  # one hash slot for all four, as Redis Cluster wants
        return f"{base}:events", f"{base}:meta", f"{base}:lease", f"{base}:readers"

    @asynccontextmanager
    async def _reaching(self) -> AsyncIterator[None]:
        try:
            yield
        except redis.RedisError as error:
            raise ReplayStoreUnavailable(f"the replay store failed: {error.__class__.__name__}") from None

    async def start(self) -> None:
        try:
            await self.redis.ping()
        except redis.RedisError as error:
            raise ConfigError(f"REDIS_URL: cannot use Redis there ({error}).") from None

    async def close(self) -> None:
        await self.redis.aclose()

    def _lease_ms(self) -> int:
        return int(self.settings.resume_lease_seconds * 1000)

    def _running_ms(self) -> int:
        return int((self.settings.resume_ttl_seconds + self.settings.max_stream_seconds) * 1000)

    async def open(self, stream_id: str, owner: bytes) -> None:
        events, meta, lease, _ = self._keys(stream_id)
        async with self._reaching(), self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(meta, mapping={"owner": owner.hex(), "first": 1})
            pipe.pexpire(meta, self._running_ms())
            pipe.set(lease, 1, px=self._lease_ms())
            await pipe.execute()
        self._sizes[stream_id], self._kept[stream_id] = deque(), 0
        await self.produced_here.open(stream_id, owner)

    async def append(self, stream_id: str, events: list[AnswerEvent]) -> None:
        await self.produced_here.append(stream_id, events)
        key, meta, _, _ = self._keys(stream_id)
        last = events[-1].seq
        size = sum(event_bytes(event) for event in events)
        sizes = self._sizes[stream_id]
        sizes.append((last, size))
        self._kept[stream_id] += size
        async with self._reaching(), self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(key, {"e": json.dumps([[e.seq, e.kind, e.payload()] for e in events], ensure_ascii=False)}, id=f"{last}-0")
            if len(sizes) == 1:
                pipe.pexpire(key, self._running_ms())
            if events[-1].kind != "delta":
                pipe.hset(meta, "last", last)  # the answer's end: nothing follows it
            if self._kept[stream_id] > self.settings.resume_answer_bytes and len(sizes) > 1:
                while len(sizes) > 1 and self._kept[stream_id] > self.settings.resume_answer_bytes * 3 // 4:
                    self._kept[stream_id] -= sizes.popleft()[1]
                first_kept = sizes[0][0]
                pipe.xtrim(key, minid=f"{first_kept}-0")
                pipe.hset(meta, "first", first_kept)  # an upper bound of the first sequence kept
            await pipe.execute()

    async def end(self, stream_id: str) -> None:
        await self.produced_here.end(stream_id)
        events, meta, lease, readers = self._keys(stream_id)
        self._sizes.pop(stream_id, None)
        self._kept.pop(stream_id, None)
        ttl = int(self.settings.resume_ttl_seconds * 1000)
        async with self._reaching(), self.redis.pipeline(transaction=True) as pipe:
            pipe.pexpire(events, ttl)
            pipe.pexpire(meta, ttl)
            pipe.delete(lease, readers)
            await pipe.execute()

    async def owner(self, stream_id: str) -> bytes | None:
        here = await self.produced_here.owner(stream_id)
        if here is not None:
            return here
        _, meta, _, _ = self._keys(stream_id)
        async with self._reaching():
            owner = await self.redis.hget(meta, "owner")
        return None if owner is None else bytes.fromhex(owner.decode())

    async def final_seq(self, stream_id: str) -> int | None:
        if await self.produced_here.owner(stream_id) is not None:
            return await self.produced_here.final_seq(stream_id)
        _, meta, _, _ = self._keys(stream_id)
        async with self._reaching():
            last = await self.redis.hget(meta, "last")
        return None if last is None else int(last)

    async def follow(self, stream_id: str, after: int) -> AsyncGenerator[list[AnswerEvent], None]:
        if self.produced_here.holds(stream_id, after):
            async with aclosing(self.produced_here.follow(stream_id, after)) as here:
                async for batch in here:
                    yield batch
            return
        key, meta, lease, _ = self._keys(stream_id)
        async with self._reaching():
            first, last = await self.redis.hmget(meta, ["first", "last"])
        if first is None or int(first) > after + 1:
            raise replay_lost("The service no longer keeps the part of the answer this reader lacks.")
        if last is not None and after >= int(last):
            raise replay_lost("The answer has no events after that one.")
        cursor, waited_on_lease = f"{after}-0", False
        while True:
            async with self._reaching():
                reply = await self.redis.xread({key: cursor}, count=256, block=int(FOLLOW_POLL_SECONDS * 1000))
                if reply:
                    waited_on_lease = False
                else:
                    if waited_on_lease:
                        raise replay_lost("The process producing this answer stopped; ask again.")
                    # Silence: fine while the producer lives; once its lease lapsed, one more look
                    # for what it may have written just before.
                    waited_on_lease = not await self.redis.exists(lease)
                    continue
            for entry_id, fields in reply[0][1]:
                cursor = entry_id
                batch = [AnswerEvent.of(seq, kind, payload) for seq, kind, payload in json.loads(fields[b"e"]) if seq > after]
                if not batch:
                    continue
                if batch[0].seq != after + 1:
                    raise replay_lost("The service no longer keeps the part of the answer this reader lacks.")
                yield batch
                if batch[-1].kind != "delta":
                    return
                after = batch[-1].seq

    async def hold_lease(self, stream_id: str, cancel: Callable[[], None]) -> None:
        _, meta, lease, _ = self._keys(stream_id)
        while True:
            await anyio.sleep(self.settings.resume_lease_seconds / 3)
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.set(lease, 1, px=self._lease_ms())
                    pipe.hget(meta, "cancel")
                    _, cancelled = await pipe.execute()
            except redis.RedisError:
                log.warning("renewing the lease of answer %s failed", stream_digest(stream_id))
                continue
            if cancelled is not None:
                cancel()

    async def request_cancel(self, stream_id: str) -> None:
        _, meta, _, _ = self._keys(stream_id)
        async with self._reaching():
            await self.redis.hset(meta, "cancel", 1)

    async def readers(self, stream_id: str) -> int:
        local = self.local_readers(stream_id)
        if local:
            return local
        async with self._reaching():
            return int(await self.redis.zcount(self._keys(stream_id)[3], time.time(), "+inf"))

    async def keep_present(self, stream_id: str) -> None:
        readers = self._keys(stream_id)[3]
        token = secrets.token_hex(8)
        lease = self.settings.resume_lease_seconds
        try:
            while True:
                try:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        pipe.zadd(readers, {token: time.time() + lease})
                        pipe.pexpire(readers, self._lease_ms())
                        await pipe.execute()
                except redis.RedisError:
                    pass  # then this reader's own reads fail too, and it ends
                await anyio.sleep(lease / 3)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                try:
                    await self.redis.zrem(readers, token)
                except redis.RedisError:
                    pass  # it lapses by itself within RESUME_LEASE_SECONDS

    def usage(self) -> dict[str, Any]:
        return {**self.produced_here.usage(), "store": self.kind}


def make_replay_store(settings: Settings) -> ReplayStore:
    return RedisReplayStore(settings) if settings.redis_url else MemoryReplayStore(settings)
