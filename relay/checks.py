"""Requests: authentication, and the checks of bodies and parameters that every bad input meets
before anything is asked of the upstream, each answered with a 4xx in OpenAI's shape that names
the field."""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import math
import re
import time
from collections.abc import Mapping
from typing import Any

import anyio
from starlette.requests import Request

from relay.config import Settings
from relay.errors import ServiceError
from relay.framing import CHAT_FRAMINGS
from relay.observability import exchange_of

ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
# Compared without case, "-" and "_": ?API_KEY=, ?apiKey= and ?api-key= are all keys in a URL.
KEY_QUERY_PARAMETERS = {"apikey", "key", "token", "accesstoken", "auth", "authorization", "bearer", "password", "secret"}


def _key_like(name: str) -> bool:
    return name.lower().replace("-", "").replace("_", "") in KEY_QUERY_PARAMETERS


def authenticate(request: Request, settings: Settings) -> None:
    if any(_key_like(name) for name in request.query_params):
        raise ServiceError(
            400,
            "API keys are not accepted in the URL, where logs and browser history keep them; "
            "send 'Authorization: Bearer <key>'.",
            code="key_in_url",
        )
    if settings.api_keys:
        require_key(request, settings.api_keys, "Missing or invalid API key; send 'Authorization: Bearer <key>'.")


KEY_DIGEST = "relay.key_digest"  # scope state: the presented key's digest, worked out once a request


def presented_key_digest(request: Request) -> bytes:
    """The SHA-256 of the key the request presents as a bearer token: how every part of the
    service (the key check, an answer's owner, the key's limits) knows a key without keeping it."""
    state = request.scope.setdefault("state", {})
    digest: bytes | None = state.get(KEY_DIGEST)
    if digest is None:
        presented = request.headers.get("authorization", "").partition(" ")[2].strip()
        digest = state[KEY_DIGEST] = hashlib.sha256(presented.encode()).digest()
    return digest


@functools.lru_cache(maxsize=8)
def key_digests(keys: tuple[str, ...]) -> tuple[bytes, ...]:
    """The SHA-256 of each of `keys` (API_KEYS, METRICS_KEY), worked out once, not per request."""
    return tuple(hashlib.sha256(key.encode()).digest() for key in keys)


def require_key(request: Request, keys: tuple[str, ...], message: str) -> None:
    """Refuse the request unless it sends one of `keys` as a bearer token."""
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    presented = presented.strip()
    # Digests of equal length, every key compared, in constant time: the timing tells nothing
    # about which key, or how much of one, matched.
    digest = presented_key_digest(request)
    matched = False
    for known in key_digests(keys):
        matched |= hmac.compare_digest(digest, known)
    if scheme.lower() != "bearer" or not presented or not matched:
        raise ServiceError(401, message, "invalid_request_error", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json module would accept NaN and Infinity


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large")
    return value


async def read_json_object(request: Request, settings: Settings) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ServiceError(415, "Send the request body as JSON with 'Content-Type: application/json'.", code="unsupported_media_type")
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ServiceError(413, f"The request body is larger than MAX_BODY_BYTES ({limit} bytes).", code="body_too_large")
    chunks, size = [], 0
    # From the request's head to its last byte, however it is served: a body that trickles in
    # must not hold a worker's attention (the serving layer, when present, counts from the
    # connection and answers first).
    remaining = exchange_of(request).started + settings.request_timeout_seconds - time.monotonic()
    with anyio.move_on_after(max(remaining, 0.0)) as waiting:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ServiceError(413, f"The request body is larger than MAX_BODY_BYTES ({limit} bytes).", code="body_too_large")
            chunks.append(chunk)
    if waiting.cancelled_caught:
        raise ServiceError(
            408, f"The request did not arrive within REQUEST_TIMEOUT_SECONDS ({settings.request_timeout_seconds:g} s).",
            code="request_timeout", headers={"Connection": "close"}, outcome="request_timeout",
        )
    raw = b"".join(chunks)
    try:
        body = json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        raise ServiceError(400, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ServiceError(400, "The request body must be a JSON object.", code="invalid_json")
    if ESCAPED_SURROGATE.search(raw):
        where = _unencodable_text(body, "")
        if where is not None:
            raise ServiceError(400, f"'{where or 'body'}' holds a lone surrogate (\\ud800-\\udfff), which is not text.", param=where or None, code="invalid_json")
    return body


# JSON may write a UTF-16 half on its own ("\\ud800"); such a string cannot be encoded again, so
# it is refused here rather than fail on its way to the upstream. Pairs are fine (json joins them).
ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _unencodable_text(value: Any, where: str) -> str | None:
    """Where in `value` a string or key is not valid Unicode, if anywhere."""
    if isinstance(value, str):
        return None if _encodable(value) else where
    if isinstance(value, dict):
        for key, item in value.items():
            if not _encodable(key):
                return where
            found = _unencodable_text(item, f"{where}.{key}" if where else key)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _unencodable_text(item, f"{where}[{index}]")
            if found is not None:
                return found
    return None


def check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ServiceError(400, "'messages' must be a non-empty array of messages.", param="messages")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ServiceError(400, f"'{where}' must be an object with 'role' and 'content'.", param=where)
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ServiceError(400, f"'{where}.role' must be one of {', '.join(sorted(ROLES))}.", param=f"{where}.role")
        content = message.get("content")
        if not (content is None or isinstance(content, (str, list))):
            raise ServiceError(400, f"'{where}.content' must be a string or an array of content parts.", param=f"{where}.content")
    return messages


def check_sampling(body: Mapping[str, Any]) -> None:
    """The parameters both endpoints understand; anything else is the upstream's to judge."""
    if "model" in body and (not isinstance(body["model"], str) or not body["model"].strip()):
        raise ServiceError(400, "'model' must be a non-empty string.", param="model")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise ServiceError(400, "'stream' must be true or false.", param="stream")
    temperature = body.get("temperature")
    if temperature is not None and (
        isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2
    ):
        raise ServiceError(400, "'temperature' must be a number from 0 to 2.", param="temperature")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000_000):
            raise ServiceError(400, f"'{name}' must be a positive whole number.", param=name)
    if "stream_options" in body and not isinstance(body["stream_options"], (dict, type(None))):
        raise ServiceError(400, "'stream_options' must be an object.", param="stream_options")


CHAT_FIELDS = {"message", "messages", "model", "temperature", "max_tokens", "max_continuations"}
CONTINUATIONS_LIMIT = 8


def chat_request(fields: Mapping[str, Any], settings: Settings) -> tuple[dict[str, Any], int]:
    """The upstream request for a /chat call, from its JSON body or query, and how many times an
    answer cut by the output limit may be continued."""
    unknown = set(fields) - CHAT_FIELDS
    if unknown:
        raise ServiceError(400, f"Unknown field(s): {', '.join(sorted(unknown))}. /chat takes {', '.join(sorted(CHAT_FIELDS))}.", param=sorted(unknown)[0])
    if "message" in fields and "messages" in fields:
        raise ServiceError(400, "Send either 'message' or 'messages', not both.", param="message")
    if "messages" in fields:
        messages = check_messages(fields["messages"])
    else:
        message = fields.get("message")
        if not isinstance(message, str) or not message.strip():
            raise ServiceError(400, "'message' must be a non-empty string (or send 'messages').", param="message")
        messages = [{"role": "user", "content": message}]
    check_sampling(fields)
    body: dict[str, Any] = {"model": fields.get("model") or settings.model, "messages": messages, "stream": True}
    body["stream_options"] = {"include_usage": True}
    for name in ("temperature", "max_tokens"):
        if fields.get(name) is not None:
            body[name] = fields[name]
    continuations = fields.get("max_continuations", settings.max_continuations)
    if isinstance(continuations, bool) or not isinstance(continuations, int) or not 0 <= continuations <= CONTINUATIONS_LIMIT:
        raise ServiceError(400, f"'max_continuations' must be a whole number from 0 to {CONTINUATIONS_LIMIT}.", param="max_continuations")
    return body, continuations


def negotiate(accept: str) -> str:
    """The /chat framing the Accept header asks for; plain text unless it prefers SSE or NDJSON."""
    if not accept.strip():
        return "text/plain"
    ranked = []
    for position, part in enumerate(accept.split(",")):
        media, *parameters = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if quality > 0:
            ranked.append((-quality, position, media.lower()))
    for _, _, media in sorted(ranked):
        if media in CHAT_FRAMINGS:
            return media
        if media in {"*/*", "text/*"}:
            return "text/plain"
        if media == "application/*":
            return "application/x-ndjson"
    raise ServiceError(
        406, "Accept one of text/plain, text/event-stream or application/x-ndjson.", code="not_acceptable"
    )


def check_response_request(body: Mapping[str, Any]) -> None:
    """A Responses API request's `input`: text, or an array of input items (the upstream judges
    the items); it may be left out only where the request names its input another way. And its
    output limit, `max_output_tokens`."""
    limit = body.get("max_output_tokens")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10_000_000):
        raise ServiceError(400, "'max_output_tokens' must be a positive whole number.", param="max_output_tokens")
    if "input" not in body and any(name in body for name in ("previous_response_id", "conversation", "prompt")):
        return
    if not isinstance(body.get("input"), (str, list)):
        raise ServiceError(400, "'input' must be a string or an array of input items.", param="input")


GET_CHAT_PARAMETERS = {"q", "model", "max_tokens", "temperature"}


def _query_number(raw: str, name: str, kind: type[int] | type[float]) -> int | float:
    """A number from the URL, to be checked like the same field of a JSON body."""
    try:
        value = kind(raw)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ServiceError(400, f"'{name}' must be {what}, not {raw[:40]!r}.", param=name) from None
    return value


async def chat_fields(request: Request, settings: Settings) -> dict[str, Any]:
    if request.method == "GET":
        query = request.query_params
        unknown = set(query) - GET_CHAT_PARAMETERS
        if unknown:
            raise ServiceError(
                400,
                f"Unknown query parameter(s): {', '.join(sorted(unknown))}. GET /chat takes {', '.join(sorted(GET_CHAT_PARAMETERS))}.",
                param=sorted(unknown)[0],
            )
        text = query.get("q", "")
        if len(text) > settings.max_query_chars:
            raise ServiceError(414, f"'q' is longer than MAX_QUERY_CHARS ({settings.max_query_chars}); POST the message instead.", param="q", code="query_too_long")
        if not text.strip():
            raise ServiceError(400, "GET /chat needs the question in 'q', e.g. /chat?q=Hello.", param="q")
        fields: dict[str, Any] = {"message": text}
        if "model" in query:
            fields["model"] = query["model"]
        for name, kind in (("max_tokens", int), ("temperature", float)):
            if name in query:
                fields[name] = _query_number(query[name], name, kind)
        return fields
    return await read_json_object(request, settings)
