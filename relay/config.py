"""Settings, from environment variables read once when the service starts (never at import).

A bad value stops the start with a message that names the variable: a service that ran with a
typo in its limits would fail later, under load, where the cause is hard to see.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class ConfigError(Exception):
    """A setting has a value the service cannot run with; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    openai_api_key: str | None = None
    openai_base_url: str | None = None
    model: str = "gpt-4o-mini"
    api_keys: tuple[str, ...] = ()
    allow_anonymous: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    max_streams: int = 500
    shed_lag_seconds: float = 0.02
    start_queue_seconds: float = 0.25
    start_queue_length: int = 200
    heartbeat_seconds: float = 15.0
    shutdown_grace_seconds: float = 20.0
    connect_timeout: float = 10.0
    read_timeout: float = 300.0
    max_stream_seconds: float = 900.0
    max_retries: int = 2
    max_body_bytes: int = 4 * 1024 * 1024
    max_query_chars: int = 4000
    max_continuations: int = 0
    demo_seconds_per_word: float = 0.06
    cors_origins: tuple[str, ...] = ()
    log_level: str = "info"
    log_content: bool = False
    metrics_key: str | None = None
    send_timeout_seconds: float = 30.0
    request_timeout_seconds: float = 15.0
    max_header_bytes: int = 32768
    redis_url: str | None = None
    resume_grace_seconds: float = 10.0
    resume_ttl_seconds: float = 300.0
    resume_lease_seconds: float = 5.0
    resume_answer_bytes: int = 1024 * 1024
    resume_total_bytes: int = 64 * 1024 * 1024
    pin_workers: bool = False

    @property
    def demo(self) -> bool:
        """No upstream configured: answer from the built-in demo model."""
        return self.openai_api_key is None and self.openai_base_url is None


def load_settings(environ: Mapping[str, str]) -> Settings:
    def text(name: str) -> str | None:
        value = environ.get(name, "").strip()
        return value or None

    def number(name: str, default: float, low: float, high: float, kind: type = float) -> Any:
        raw = text(name)
        if raw is None:
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a {kind.__name__} between {low} and {high}, not {raw!r}") from None
        if not (low <= value <= high) or (isinstance(value, float) and not math.isfinite(value)):
            raise ConfigError(f"{name} must be between {low} and {high}, not {raw!r}")
        return value

    def flag(name: str) -> bool:
        raw = (text(name) or "0").lower()
        if raw not in {"0", "1", "true", "false", "yes", "no"}:
            raise ConfigError(f"{name} must be 1 or 0, not {raw!r}")
        return raw in {"1", "true", "yes"}

    base_url = text("OPENAI_BASE_URL")
    if base_url is not None and not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"OPENAI_BASE_URL must start with http:// or https://, not {base_url!r}")
    log_level = (text("LOG_LEVEL") or "info").lower()
    if log_level not in {"critical", "error", "warning", "info", "debug"}:
        raise ConfigError(f"LOG_LEVEL must be one of critical, error, warning, info, debug, not {log_level!r}")
    api_keys = tuple(key.strip() for key in (text("API_KEYS") or "").split(",") if key.strip())
    redis_url = text("REDIS_URL")
    if redis_url is not None and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"REDIS_URL must start with redis://, rediss:// or unix://, not {redis_url!r}")
    cors_origins = tuple(origin.strip().rstrip("/") for origin in (text("CORS_ORIGINS") or "").split(",") if origin.strip())
    for origin in cors_origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ConfigError(f"CORS_ORIGINS must list origins like https://app.example.com, not {origin!r}")
    settings = Settings(
        openai_api_key=text("OPENAI_API_KEY"),
        openai_base_url=base_url,
        model=text("OPENAI_MODEL") or ("demo" if base_url is None and text("OPENAI_API_KEY") is None else "gpt-4o-mini"),
        api_keys=api_keys,
        allow_anonymous=flag("ALLOW_ANONYMOUS"),
        host=text("HOST") or "127.0.0.1",
        port=number("PORT", 8000, 0, 65535, int),
        workers=number("WEB_CONCURRENCY", 1, 1, 64, int),
        max_streams=number("MAX_STREAMS", 500, 1, 100_000, int),
        shed_lag_seconds=number("SHED_LAG_MS", 20.0, 0, 60_000) / 1000,
        start_queue_seconds=number("START_QUEUE_MS", 250.0, 0, 60_000) / 1000,
        start_queue_length=number("START_QUEUE_LENGTH", 200, 0, 100_000, int),
        heartbeat_seconds=number("HEARTBEAT_SECONDS", 15.0, 0.01, 3600),
        shutdown_grace_seconds=number("SHUTDOWN_GRACE_SECONDS", 20.0, 0, 3600),
        connect_timeout=number("UPSTREAM_CONNECT_TIMEOUT", 10.0, 0.01, 600),
        read_timeout=number("UPSTREAM_READ_TIMEOUT", 300.0, 0.01, 86400),
        max_stream_seconds=number("MAX_STREAM_SECONDS", 900.0, 0.01, 86400),
        max_retries=number("UPSTREAM_MAX_RETRIES", 2, 0, 10, int),
        max_body_bytes=number("MAX_BODY_BYTES", 4 * 1024 * 1024, 1024, 1024**3, int),
        max_query_chars=number("MAX_QUERY_CHARS", 4000, 1, 100_000, int),
        max_continuations=number("MAX_CONTINUATIONS", 0, 0, 8, int),
        demo_seconds_per_word=number("DEMO_SECONDS_PER_WORD", 0.06, 0, 10),
        cors_origins=cors_origins,
        log_level=log_level,
        log_content=flag("LOG_CONTENT"),
        metrics_key=text("METRICS_KEY"),
        send_timeout_seconds=number("SEND_TIMEOUT_SECONDS", 30.0, 0.1, 3600),
        request_timeout_seconds=number("REQUEST_TIMEOUT_SECONDS", 15.0, 0.1, 3600),
        max_header_bytes=number("MAX_HEADER_BYTES", 32768, 1024, 1024 * 1024, int),
        redis_url=redis_url,
        resume_grace_seconds=number("RESUME_GRACE_SECONDS", 10.0, 0, 3600),
        resume_ttl_seconds=number("RESUME_TTL_SECONDS", 300.0, 1, 7 * 86400),
        resume_lease_seconds=number("RESUME_LEASE_SECONDS", 5.0, 0.3, 60),
        resume_answer_bytes=number("RESUME_MAX_ANSWER_BYTES", 1024 * 1024, 1024, 1024**3, int),
        resume_total_bytes=number("RESUME_MAX_BYTES", 64 * 1024 * 1024, 1024, 64 * 1024**3, int),
        pin_workers=flag("PIN_WORKERS"),
    )
    if settings.resume_total_bytes < settings.resume_answer_bytes:
        raise ConfigError("RESUME_MAX_BYTES must be at least RESUME_MAX_ANSWER_BYTES: the store must hold one whole answer.")
    if not settings.demo and not settings.api_keys and not settings.allow_anonymous:
        raise ConfigError(
            "API_KEYS is empty, so anyone who can reach this service could spend the upstream's budget. "
            "Set API_KEYS to a comma-separated list of keys that clients must send as "
            "'Authorization: Bearer <key>' (for example API_KEYS=$(python -c 'import secrets; print(secrets.token_urlsafe())')), "
            "or set ALLOW_ANONYMOUS=1 to serve without keys."
        )
    return settings
