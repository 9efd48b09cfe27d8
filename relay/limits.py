"""Per-key limits: how many answers one client key may have open at once, and how many requests
and tokens it may spend per minute, the same across every worker and replica.

API_KEYS gives every client its own key, but without limits one key can still take every stream
and the whole upstream budget: a runaway script or a leaked key starves every other client. So a
key has up to three limits (KEY_MAX_STREAMS, KEY_REQUESTS_PER_MINUTE, KEY_TOKENS_PER_MINUTE; other
values for single keys in KEY_LIMITS_FILE), checked once where its stream starts
(`relay.handling.take_slot`) and settled once when it ends (`Slot.release`).

Requests and tokens are budgets that refill continuously over a minute, as OpenAI's own limits
do: a key may spend a whole minute's worth at once, then as fast as its limit refills. What an
answer costs is known only at its end, so a request reserves an estimate when it is admitted (its
prompt's size and its output limit) and settles to the real usage when it ends: a burst of
requests cannot pass the limit on costs nobody checked, and what an answer did not use is given
back.

With REDIS_URL the counters live in Redis and each check-and-take is one Lua script, so that all
workers and replicas admit exactly the limit between them; each admitted request holds a lease
there that its process renews, so that a process that dies gives its streams and reservations
back within KEY_LEASE_SECONDS. Without REDIS_URL the same limits hold in each process. Redis that
does not answer within a short deadline is not waited for: the process admits and counts in its
own memory (where it always keeps its own share too) until Redis answers again, so that for a
while the limits hold per process, rather than the API hanging or failing with its Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import secrets
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import orjson
import prometheus_client
import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from starlette.requests import Request

from relay.admission import retry_hint
from relay.checks import key_digests, presented_key_digest
from relay.config import Settings
from relay.errors import ServiceError
from relay.framing import in_chat_names
from relay.observability import Exchange, Metrics

log = logging.getLogger(__name__)

RATE_LIMIT_HEADERS = (
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
)
REDIS_DEADLINE_SECONDS = 0.25  # for one check; a Redis that takes longer is taken for away
SETTLE_DEADLINE_SECONDS = 1.0  # for one batch of settlements or renewals
REDIS_RETRY_SECONDS = 1.0  # after Redis failed, checks stay in this process this long before trying it again
STREAM_RETRY_SECONDS = 1  # the hint at the stream limit: when one of the key's answers ends is unknown
CHARS_PER_TOKEN = 4  # a prompt's tokens, from its JSON's size: OpenAI's rule of thumb for English
IMAGE_TOKENS = 1000  # an inline image (a data: URL) counts as this, not as its base64 characters
INLINE_DATA = re.compile(rb'"data:[^"]{256,}"')
SETTLE_BATCH = 500
PENDING_SETTLEMENTS = 100_000  # kept while Redis is away; beyond, the oldest are left to their leases
VOID_SECONDS = 60  # how long Redis remembers a lease settled before it knew it, or with a late renewal pending
LAPSED_PER_CHECK = 1000  # leases a check gives back at most (a Lua call's stack is bounded)


@dataclass(frozen=True)
class KeyPolicy:
    """The limits of one client key; 0 is no limit of that kind."""

    label: str  # what /metrics shows: the operator's name for the key, or a short digest
    digest: str  # the key's SHA-256, hex: what its state in Redis is named by
    max_streams: int
    requests_per_minute: int
    tokens_per_minute: int


def key_policies(settings: Settings) -> dict[bytes, KeyPolicy]:
    """The limits of each key of API_KEYS that has any, by the SHA-256 of the key."""
    overrides = {override.sha256: override for override in settings.key_overrides}
    policies = {}
    for digest in key_digests(settings.api_keys):
        override = overrides.get(digest.hex())

        def value(name: str, default: int) -> int:
            given = None if override is None else getattr(override, name)
            return default if given is None else int(given)

        policy = KeyPolicy(
            override.name if override is not None else digest.hex()[:8],
            digest.hex(),
            value("max_streams", settings.key_max_streams),
            value("requests_per_minute", settings.key_requests_per_minute),
            value("tokens_per_minute", settings.key_tokens_per_minute),
        )
        if policy.max_streams or policy.requests_per_minute or policy.tokens_per_minute:
            policies[digest] = policy
    return policies


def token_estimate(body: Mapping[str, Any], output_reserve: int) -> tuple[int, int]:
    """(the prompt's tokens, the whole request's) as estimated before the upstream is asked: the
    request's JSON size for the prompt (everything in it is sent to the model; an inline image
    counts as IMAGE_TOKENS), plus its output limit for each choice, or `output_reserve`."""
    try:
        raw = orjson.dumps(body)
    except TypeError:  # orjson.JSONEncodeError, for an integer beyond 64 bits that json accepted
        raw = json.dumps(body).encode()
    images = INLINE_DATA.findall(raw)
    prompt = math.ceil((len(raw) - sum(map(len, images))) / CHARS_PER_TOKEN) + IMAGE_TOKENS * len(images)
    output = next((body[name] for name in ("max_completion_tokens", "max_tokens", "max_output_tokens") if is_count(body.get(name))), output_reserve)
    choices = body.get("n")
    return prompt, prompt + output * (choices if is_count(choices) and choices <= 128 else 1)


def is_count(value: Any, least: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def tokens_used(usage: Mapping[str, Any] | None, prompt_estimate: int, pieces: int) -> int:
    """What an answer cost: the upstream's usage, or where it gave none (or only an estimate of
    the completion: an answer that ended early), the prompt's estimate and the pieces relayed."""
    usage = usage or {}
    total = usage.get("total_tokens")
    if is_count(total, 0) and not usage.get("estimated"):
        return int(total)
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (prompt if is_count(prompt, 0) else prompt_estimate) + (completion if is_count(completion, 0) else pieces)


def answer_usage(content: bytes) -> dict[str, Any] | None:
    """The usage of a whole (not streamed) answer, chat completions' or the Responses API's, in
    chat completions' names."""
    if b'"usage"' not in content:
        return None
    try:
        usage = orjson.loads(content).get("usage")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not isinstance(usage, dict):
        return None
    return in_chat_names(usage) if "input_tokens" in usage else usage


def duration(seconds: float) -> str:
    """A wait as OpenAI writes it in x-ratelimit-reset-*: 120ms, 1.5s, 6m0s."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes}m{rest}s"


@dataclass
class Standing:
    """Where a key stands after a check: what its headers tell, and which limit refused it, if one did."""

    refused: str | None  # "streams", "requests" or "tokens"
    open_streams: int
    requests_left: float  # in the budget, after this request
    tokens_left: float  # in the budget, less what the key's open answers reserved (this one's too)
    reserved: float
    shared: bool  # counted in Redis, not only in this process


def rate_limit_headers(policy: KeyPolicy, standing: Standing) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers, for the limits the key has; reset is when the budget is full again."""
    headers = {}
    for kind, per_minute, left in (("requests", policy.requests_per_minute, standing.requests_left),
                                   ("tokens", policy.tokens_per_minute, standing.tokens_left)):
        if per_minute:
            headers[f"x-ratelimit-limit-{kind}"] = str(per_minute)
            headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(left)))
            headers[f"x-ratelimit-reset-{kind}"] = duration(max(0.0, per_minute - left) * 60 / per_minute)
    return headers


def refusal(policy: KeyPolicy, standing: Standing, cost: int) -> ServiceError:
    """429 in OpenAI's shape, naming the limit, with when to retry (Retry-After-Ms, read first by
    the OpenAI SDKs, and Retry-After)."""
    if standing.refused == "streams":
        wait = float(STREAM_RETRY_SECONDS)
        message = (f"Rate limit reached for this key on answers open at once: limit {policy.max_streams}, "
                   f"open {standing.open_streams}. Retry when one of them has ended.")
    elif standing.refused == "requests":
        per_minute = policy.requests_per_minute
        wait = (1 - standing.requests_left) * 60 / per_minute
        message = f"Rate limit reached for this key on requests per minute: limit {per_minute}, remaining 0. Please try again in {duration(wait)}."
    else:
        per_minute = policy.tokens_per_minute
        wait = (cost - standing.tokens_left) * 60 / per_minute  # if the open answers use all they reserved
        message = (f"Rate limit reached for this key on tokens per minute: limit {per_minute}, available "
                   f"{max(0, math.floor(standing.tokens_left))} ({math.ceil(standing.reserved)} held by its open answers), "
                   f"requested {cost}. Please try again in {duration(wait)}.")
    headers = {**rate_limit_headers(policy, standing), **retry_hint(wait)}
    return ServiceError(429, message, "rate_limit_exceeded", "rate_limit_exceeded", headers=headers, outcome="rate_limited")


class Budget:
    """A per-minute budget that refills continuously: full at first, then `per_minute` a minute."""

    __slots__ = ("per_minute", "level", "stamp")

    def __init__(self, per_minute: int, now: float) -> None:
        self.per_minute, self.level, self.stamp = per_minute, float(per_minute), now

    def refill(self, now: float) -> float:
        if now > self.stamp:
            self.level = min(float(self.per_minute), self.level + (now - self.stamp) * self.per_minute / 60)
            self.stamp = now
        return self.level


class KeyCounts:
    """One key's use in this process: its open answers, what they reserved, its budgets."""

    __slots__ = ("open", "reserved", "requests", "tokens")

    def __init__(self, policy: KeyPolicy, now: float) -> None:
        self.open, self.reserved = 0, 0
        self.requests, self.tokens = Budget(policy.requests_per_minute, now), Budget(policy.tokens_per_minute, now)


class LocalCounts:
    """Every key's use in this process: the limits themselves without Redis; with it, this
    process's own share, which holds the limits per process while Redis is away."""

    def __init__(self) -> None:
        self.keys: dict[str, KeyCounts] = {}

    def take(self, policy: KeyPolicy, cost: int, checked: bool = True) -> Standing:
        """Check the key's limits and take a stream, a request and `cost` tokens if they allow it
        (always, unchecked: what Redis admitted)."""
        now = time.monotonic()
        counts = self.keys.get(policy.digest)
        if counts is None:
            counts = self.keys[policy.digest] = KeyCounts(policy, now)
        requests = counts.requests.refill(now)
        tokens = counts.tokens.refill(now) - counts.reserved
        refused = None
        if checked:
            if policy.max_streams and counts.open >= policy.max_streams:
                refused = "streams"
            elif policy.requests_per_minute and requests < 1:
                refused = "requests"
            elif policy.tokens_per_minute and tokens < cost:
                refused = "tokens"
        if refused is not None:
            return Standing(refused, counts.open, requests, tokens, counts.reserved, False)
        counts.open += 1
        counts.reserved += cost
        counts.requests.level -= 1
        return Standing(None, counts.open, requests - 1, tokens - cost, counts.reserved, False)

    def give_back(self, policy: KeyPolicy, cost: int, used: int) -> None:
        """An answer ended: its stream and reservation back, and what it used spent."""
        counts = self.keys[policy.digest]
        counts.open -= 1
        counts.reserved -= cost
        counts.tokens.refill(time.monotonic())
        counts.tokens.level -= used


class Reservation:
    """One admitted request's hold on its key's limits: a stream, and the tokens reserved for its
    answer until `release` settles them to what the answer used (read from its Exchange)."""

    def __init__(self, limits: KeyLimits, policy: KeyPolicy, lease: str, prompt: int, cost: int, exchange: Exchange, asks: bool, shared: bool) -> None:
        self.limits, self.policy, self.lease = limits, policy, lease
        self.prompt, self.cost, self.exchange = prompt, cost, exchange
        self.asks = asks  # the request asks the model for an answer (it has a body): its tokens count
        self.shared = shared

    def release(self, used: int | None = None) -> None:
        """Give the stream back and settle the tokens: to `used`, else to the answer's usage."""
        if self.limits.outstanding.pop(self.lease, None) is None:
            return  # released already
        if used is None:
            used = tokens_used(self.exchange.usage, self.prompt, self.exchange.chunks) if self.asks else 0
        self.limits.settle(self, used)


class KeyLimits:
    """Both stores' interface and what they share: whose key a request sends, the estimate, the
    headers, the refusals, the metrics, and this process's own counts. `take` (and, in Redis,
    `queue_settlement`) are each store's own."""

    kind = "none"

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.policies = key_policies(settings)
        self.here = LocalCounts()
        self.outstanding: dict[str, Reservation] = {}  # by lease: settled at shutdown if still open; the shared ones renewed in Redis
        registry = metrics.registry
        self.admitted = prometheus_client.Counter("relay_key_admitted", "Requests admitted under their key's limits, by key.", ["key"], registry=registry)
        self.refused = prometheus_client.Counter(
            "relay_key_refused", "Requests refused with 429 by their key's limits, by key and limit.", ["key", "limit"], registry=registry
        )
        self.tokens = prometheus_client.Counter(
            "relay_key_tokens", "Tokens settled against their key's limits (usage, or the service's estimate), by key.", ["key"], registry=registry
        )
        self.counted_here = prometheus_client.Counter(
            "relay_key_limits_counted_here", "Checks of per-key limits made in this process alone because Redis did not answer.", registry=registry
        )

    async def reserve(self, request: Request, body: Mapping[str, Any] | None, exchange: Exchange) -> Reservation | None:
        """Admit the request under its key's limits, or raise the 429. None: its key has none."""
        if not self.policies:
            return None
        policy = self.policies.get(presented_key_digest(request))
        if policy is None:
            return None
        prompt, cost = (0, 0) if body is None else token_estimate(body, self.settings.key_reserve_tokens)
        # A request larger than a whole minute's tokens waits for a full budget, and then goes alone.
        cost = min(cost, policy.tokens_per_minute)
        lease = secrets.token_hex(8)
        standing = await self.take(policy, lease, cost)
        if standing.refused is not None:
            self.refused.labels(policy.label, standing.refused).inc()
            raise refusal(policy, standing, cost)
        self.admitted.labels(policy.label).inc()
        exchange.response_headers += [(name.encode(), value.encode()) for name, value in rate_limit_headers(policy, standing).items()]
        reservation = self.outstanding[lease] = Reservation(self, policy, lease, prompt, cost, exchange, body is not None, standing.shared)
        return reservation

    def settle(self, reservation: Reservation, used: int) -> None:
        self.here.give_back(reservation.policy, reservation.cost, used)
        if used:
            self.tokens.labels(reservation.policy.label).inc(used)
        if reservation.shared:
            self.queue_settlement(reservation.policy, reservation.lease, used)

    async def take(self, policy: KeyPolicy, lease: str, cost: int) -> Standing:
        """Check the key's limits, and take a stream, a request and `cost` tokens if they allow it."""
        raise NotImplementedError

    def queue_settlement(self, policy: KeyPolicy, lease: str, used: int) -> None:
        """Settle in Redis, soon: `release` cannot wait for it."""

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        """Settle what is still open (an answer the shutdown did not wait for) with what it used so far."""
        for reservation in list(self.outstanding.values()):
            reservation.release()

    def report(self) -> dict[str, Any]:
        return {"store": self.kind, "limited_keys": len(self.policies)}


class MemoryKeyLimits(KeyLimits):
    """The counters in this process's memory: without REDIS_URL, each worker process holds the
    limits by itself."""

    kind = "memory"

    async def take(self, policy: KeyPolicy, lease: str, cost: int) -> Standing:
        return self.here.take(policy, cost)

    async def start(self) -> None:
        if self.policies and self.settings.workers > 1:
            log.warning(
                "Per-key limits hold in each worker process without REDIS_URL: with WEB_CONCURRENCY=%d, a key gets up to "
                "%d times its limits. Set REDIS_URL to share them.", self.settings.workers, self.settings.workers,
            )


# Redis's clock for every process, so that replicas whose clocks differ agree on the budgets.
# KEYS, for every script: state, leases, held, void (see RedisKeyLimits).
PRELUDE = """
local clock = redis.call('TIME')
local now = clock[1] * 1000 + clock[2] / 1000
local function level(value, stamp, per_minute)
  if not value then return per_minute end
  return math.min(per_minute, tonumber(value) + (now - tonumber(stamp)) * per_minute / 60000)
end
-- Forgotten once every lease lapsed and both budgets are full again: a debt is not forgotten before.
local function keep(lease_ms, tpm)
  local wait = 60000
  if tpm > 0 then
    local state = redis.call('HMGET', KEYS[1], 'tl', 'tt')
    wait = math.max(wait, (tpm - level(state[1], state[2], tpm)) * 60000 / tpm)
  end
  for _, key in ipairs(KEYS) do redis.call('PEXPIRE', key, math.ceil(lease_ms + wait)) end
end
-- A request ended: its stream and reservation back, what it used spent. Without an amount held
-- for the lease, it was settled already (this is a retry of one whose answer was lost), lapsed
-- while Redis was away (its process counted it by itself), or not taken yet (a check that timed
-- out, which Redis may still run late); with `void`, a renewal that timed out may still run and
-- bring it back. Either way it must not count twice, nor come back: it is remembered a while.
local function settle(lease, used, tpm, void)
  redis.call('ZREM', KEYS[2], lease)
  local amount = tonumber(redis.call('HGET', KEYS[3], lease))
  if not amount or void == '1' then
    redis.call('ZADD', KEYS[4], now, lease)
    redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - """ + str(VOID_SECONDS * 1000) + """)
  end
  if not amount then return end
  redis.call('HDEL', KEYS[3], lease)
  local state = redis.call('HMGET', KEYS[1], 'tl', 'tt', 'res')
  redis.call('HSET', KEYS[1], 'res', math.max((tonumber(state[3]) or 0) - amount, 0))
  if tpm > 0 then redis.call('HSET', KEYS[1], 'tl', level(state[1], state[2], tpm) - used, 'tt', now) end
end
"""

# ARGV: lease, max streams, requests/min, tokens/min, tokens to reserve, lease ms, void, then the
# settlements of this key still on their way from this process (lease, tokens used): they ride
# with the check, so that an answer that ended before this request came is never counted open.
TAKE = PRELUDE + """
local lease, max_streams, rpm, tpm = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local cost, lease_ms = tonumber(ARGV[5]), tonumber(ARGV[6])
local changed = #ARGV > 7
for i = 8, #ARGV, 2 do settle(ARGV[i], tonumber(ARGV[i + 1]), tpm, ARGV[7]) end
-- A check that timed out, run late: its process admitted the request by itself, and voided it here.
if redis.call('ZSCORE', KEYS[4], lease) then return {'void', '0', '0', '0', 0} end
local state = redis.call('HMGET', KEYS[1], 'rl', 'rt', 'tl', 'tt', 'res')
local reserved = tonumber(state[5]) or 0
-- Leases their process stopped renewing (it died): its answers' streams and reservations come back.
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, """ + str(LAPSED_PER_CHECK) + """)
if #lapsed > 0 then
  for _, amount in ipairs(redis.call('HMGET', KEYS[3], unpack(lapsed))) do
    reserved = reserved - (tonumber(amount) or 0)
  end
  redis.call('ZREM', KEYS[2], unpack(lapsed))
  redis.call('HDEL', KEYS[3], unpack(lapsed))
  reserved = math.max(reserved, 0)
  changed = true
end
local requests = level(state[1], state[2], rpm)
local tokens = level(state[3], state[4], tpm)
local open = redis.call('ZCARD', KEYS[2])
local refused = ''
if max_streams > 0 and open >= max_streams then refused = 'streams'
elseif rpm > 0 and requests < 1 then refused = 'requests'
elseif tpm > 0 and tokens - reserved < cost then refused = 'tokens' end
if refused == '' then
  requests = requests - 1
  reserved = reserved + cost
  open = open + 1
  redis.call('ZADD', KEYS[2], now + lease_ms, lease)
  redis.call('HSET', KEYS[3], lease, cost)
  if rpm > 0 then redis.call('HSET', KEYS[1], 'rl', requests, 'rt', now) end
  if tpm > 0 then redis.call('HSET', KEYS[1], 'tl', tokens, 'tt', now) end
  changed = true
end
if changed then
  redis.call('HSET', KEYS[1], 'res', reserved)
  keep(lease_ms, tpm)
end
return {refused, tostring(requests), tostring(tokens - reserved), tostring(reserved), open}
"""

# ARGV: lease, tokens used, tokens/min, lease ms, void.
SETTLE = PRELUDE + """
settle(ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[5])
keep(tonumber(ARGV[4]), tonumber(ARGV[3]))
return 1
"""

# ARGV: lease ms, tokens/min, then each lease this process holds and its reservation.
RENEW = PRELUDE + """
local lease_ms, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local reserved = tonumber(redis.call('HGET', KEYS[1], 'res')) or 0
local restored = false
for i = 3, #ARGV, 2 do
  if not redis.call('ZSCORE', KEYS[4], ARGV[i]) and redis.call('ZADD', KEYS[2], now + lease_ms, ARGV[i]) == 1 then
    -- It lapsed (Redis was away for longer, or restarted), but its answer still runs: it counts again.
    redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
    reserved = reserved + tonumber(ARGV[i + 1])
    restored = true
  end
end
if restored then redis.call('HSET', KEYS[1], 'res', reserved) end
keep(lease_ms, tpm)
return 1
"""

REDIS_FAILURES = (redis.RedisError, OSError, TimeoutError)


class RedisKeyLimits(KeyLimits):
    """The counters in Redis, shared by every worker and replica that uses the same Redis.

    Per key (named by its digest, one hash slot for all four): a hash with both budgets' levels
    and when they were last taken from, and the tokens reserved; a sorted set of the leases of its
    open requests, scored by when each lapses; a hash of what each lease reserved; a sorted set of
    leases settled before Redis knew them (a check that timed out here, which Redis may still run
    late), kept a minute. A check is one script (one round trip), a settlement one more, sent in
    batches by one task that also renews the leases of this process's open requests every third
    of KEY_LEASE_SECONDS.
    """

    kind = "redis"

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        super().__init__(settings, metrics)
        assert settings.redis_url is not None
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            settings.redis_url,
            max_connections=64,
            timeout=REDIS_DEADLINE_SECONDS,  # for a free connection: beyond, Redis is as good as away
            socket_timeout=SETTLE_DEADLINE_SECONDS * 2,
            socket_connect_timeout=SETTLE_DEADLINE_SECONDS,
            retry=Retry(NoBackoff(), 0),  # a script whose answer was lost may have run: never run it twice
        )
        self.redis = redis.asyncio.Redis(connection_pool=pool)
        self.take_script = self.redis.register_script(TAKE)
        self.settle_script = self.redis.register_script(SETTLE)
        self.renew_script = self.redis.register_script(RENEW)
        self.lease_ms = int(settings.key_lease_seconds * 1000)
        self.settling: deque[tuple[KeyPolicy, str, int]] = deque()  # (key, lease, tokens used), oldest first
        self.unsettled: dict[str, dict[str, int]] = {}  # by key: lease -> tokens used, until Redis confirmed it
        self.wake = asyncio.Event()
        self.away_until = 0.0  # monotonic: until then, checks stay in this process
        self.away = False  # Redis failed and has not answered since: said once
        self.keeper: asyncio.Task[None] | None = None
        self.closing = False
        self.unsure_until = 0.0  # monotonic: until then, a renewal that failed may still run in Redis

    @staticmethod
    def keys(policy: KeyPolicy) -> list[str]:
        base = f"relay:limits:{{{policy.digest[:32]}}}"
        return [base, f"{base}:leases", f"{base}:held", f"{base}:void"]

    def args(self, policy: KeyPolicy) -> list[int]:
        return [policy.max_streams, policy.requests_per_minute, policy.tokens_per_minute]

    async def take(self, policy: KeyPolicy, lease: str, cost: int) -> Standing:
        if not self.away:
            # This key's settlements still on their way ride with the check (settling twice counts once).
            riding = list(self.unsettled.get(policy.digest, {}).items())[:SETTLE_BATCH]
            args = [lease, *self.args(policy), cost, self.lease_ms, self.void(), *(value for pair in riding for value in pair)]
            try:
                async with asyncio.timeout(REDIS_DEADLINE_SECONDS):  # a third of anyio.fail_after's cost
                    reply = await self.take_script(self.keys(policy), args)
            except REDIS_FAILURES as error:
                self.lost(error)
                self.queue_settlement(policy, lease, 0)  # the request timed out, not the script: Redis may run it yet
            else:
                self.confirmed(policy, (settled for settled, _ in riding))
                refused, requests, tokens, reserved, open_streams = reply
                standing = Standing(refused.decode() or None, int(open_streams), float(requests), float(tokens), float(reserved), True)
                if standing.refused is None:
                    self.here.take(policy, cost, checked=False)
                return standing
        self.counted_here.inc()
        return self.here.take(policy, cost)

    def lost(self, error: BaseException) -> None:
        """Redis failed: checks stay in this process until the settling task has given Redis what
        waited for it (what it may have run late included), so that it is back as it should be."""
        self.away_until = time.monotonic() + REDIS_RETRY_SECONDS
        if not self.away:
            self.away = True
            log.warning(
                "Redis did not answer a check of per-key limits (%s): each process admits and counts by itself, its own "
                "share, until Redis answers again.", error.__class__.__name__,
            )
        self.wake.set()  # the settling task tries again when it is due

    def answered(self) -> None:
        if self.away:
            self.away = False
            log.warning("Redis answers again: per-key limits are shared again.")

    def queue_settlement(self, policy: KeyPolicy, lease: str, used: int) -> None:
        if len(self.settling) >= PENDING_SETTLEMENTS:
            dropped, old, _ = self.settling.popleft()  # its lease lapses in Redis, which gives its reservation back
            self.confirmed(dropped, (old,))
        self.settling.append((policy, lease, used))
        self.unsettled.setdefault(policy.digest, {})[lease] = used
        self.wake.set()

    def confirmed(self, policy: KeyPolicy, leases: Iterable[str]) -> None:
        unsettled = self.unsettled.get(policy.digest)
        if unsettled is not None:
            for lease in leases:
                unsettled.pop(lease, None)
            if not unsettled:
                del self.unsettled[policy.digest]

    def void(self) -> int:
        """1 while a renewal that failed may still run in Redis: what is settled meanwhile must not come back."""
        return int(time.monotonic() < self.unsure_until)

    async def start(self) -> None:
        await super().start()
        if self.policies:
            self.keeper = asyncio.ensure_future(self.keep())

    async def keep(self) -> None:
        """Settle released reservations in batches, renew the leases of the open ones and, after
        Redis failed, find out when it is back, all on this one task: a renewal then never brings
        back a lease that its settlement removed, and Redis is used again only once it has what
        waited for it."""
        every = self.settings.key_lease_seconds / 3
        next_renewal = time.monotonic() + every
        while not self.closing:
            due = min(next_renewal, self.away_until) if self.away else next_renewal
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), max(0.0, due - time.monotonic()))
            self.wake.clear()
            try:
                if self.away:
                    if time.monotonic() >= self.away_until and await self.flush(probe=True):
                        # Idle connections may be to the Redis that went away (it restarted): each
                        # would fail its first check, and send every process counting by itself again.
                        await self.redis.connection_pool.disconnect(inuse_connections=False)
                        self.answered()
                        next_renewal = time.monotonic()  # leases that lapsed meanwhile count again at once
                    continue
                await self.flush()
                if time.monotonic() >= next_renewal:
                    next_renewal = time.monotonic() + every
                    await self.renew()
            except Exception:  # a bug here must not stop every later settlement
                log.exception("settling per-key limits in Redis failed")
                await asyncio.sleep(REDIS_RETRY_SECONDS)

    async def flush(self, probe: bool = False) -> bool:
        """Settle what is queued, in batches; whether Redis took it all (with `probe`, a ping if nothing was queued)."""
        if not self.settling and probe:
            try:
                async with asyncio.timeout(SETTLE_DEADLINE_SECONDS):
                    await self.redis.ping()
            except REDIS_FAILURES as error:
                self.lost(error)
                return False
            return True
        while self.settling:
            popped = [self.settling.popleft() for _ in range(min(SETTLE_BATCH, len(self.settling)))]
            batch = [item for item in popped if item[1] in self.unsettled.get(item[0].digest, ())]  # else a check took it
            void = self.void()
            calls = [(self.keys(policy), [lease, used, policy.tokens_per_minute, self.lease_ms, void]) for policy, lease, used in batch]
            try:
                await self.run(self.settle_script, calls)
            except REDIS_FAILURES as error:
                self.settling.extendleft(reversed(batch))  # tried again when Redis answers
                self.lost(error)
                return False
            for policy, lease, _ in batch:
                self.confirmed(policy, (lease,))
        return True

    async def renew(self) -> None:
        by_key: dict[str, tuple[KeyPolicy, list[Any]]] = {}
        for lease, reservation in self.outstanding.items():
            if not reservation.shared:
                continue  # counted in this process alone while Redis was away: nothing there to renew
            policy = reservation.policy
            by_key.setdefault(policy.digest, (policy, [self.lease_ms, policy.tokens_per_minute]))[1].extend((lease, reservation.cost))
        if not by_key:
            return
        try:
            await self.run(self.renew_script, [(self.keys(policy), args) for policy, args in by_key.values()])
        except REDIS_FAILURES as error:
            self.unsure_until = time.monotonic() + VOID_SECONDS  # Redis may run it yet
            self.lost(error)

    async def run(self, script: AsyncScript, calls: list[tuple[list[str], list[Any]]]) -> None:
        """`script` once per call, in one round trip (one more when Redis lacks the script: it
        restarted); the calls it lacked it for are run again, never one that ran."""
        async with asyncio.timeout(SETTLE_DEADLINE_SECONDS):
            while calls:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for keys, args in calls:
                        pipe.evalsha(script.sha, len(keys), *keys, *args)
                    results = await pipe.execute(raise_on_error=False)
                missing = [call for call, result in zip(calls, results) if isinstance(result, redis.exceptions.NoScriptError)]
                failed = next((result for result in results if isinstance(result, Exception) and not isinstance(result, redis.exceptions.NoScriptError)), None)
                if failed is not None:
                    raise failed
                if missing:
                    await self.redis.script_load(script.script)
                calls = missing

    async def close(self) -> None:
        await super().close()
        # Not cancelled: redis-py may take a cancellation for a failed connection, and go on.
        self.closing = True
        self.wake.set()
        with anyio.CancelScope(shield=True):
            if self.keeper is not None:
                await asyncio.wait([self.keeper], timeout=SETTLE_DEADLINE_SECONDS * 2)
                self.keeper.cancel()  # only if a batch hangs past its own deadline
            if self.settling:
                await self.flush()  # what was released meanwhile; one try, within its deadline
            await self.redis.aclose()

    def report(self) -> dict[str, Any]:
        return {**super().report(), "counting_here": self.away}


def make_key_limits(settings: Settings, metrics: Metrics) -> KeyLimits:
    return RedisKeyLimits(settings, metrics) if settings.redis_url else MemoryKeyLimits(settings, metrics)
