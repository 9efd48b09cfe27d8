"""Settings, from environment variables read once when the service starts (never at import).

A bad value stops the start with a message that names the variable: a service that ran with a
typo in its limits would fail later, under load, where the cause is hard to see.
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class ConfigError(Exception):
    """A setting has a value the service cannot run with; the message names the variable."""


@dataclass(frozen=True)
class KeyOverride:
    """Other limits for one key of API_KEYS, from KEY_LIMITS_FILE; None: the KEY_* value, 0: none."""

    name: str
    sha256: str  # of the key, hex: the file never holds the key itself
    max_streams: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


@dataclass(frozen=True)
class Fallback:
    """One upstream of FALLBACK_BASE_URLS, with its entries of FALLBACK_API_KEYS and FALLBACK_MODELS."""

    base_url: str
    api_key: str | None = field(default=None, repr=False)
    models: tuple[tuple[str, str], ...] = ()  # (requested model or "*", model used), first match wins


KEY_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
KEY_LIMITS = ("max_streams", "requests_per_minute", "tokens_per_minute")


def key_overrides(path: str | None, api_keys: tuple[str, ...]) -> tuple[KeyOverride, ...]:
    """KEY_LIMITS_FILE: a TOML file with a table [keys.<name>] per key that has limits of its own,
    naming the key by its SHA-256 (`printf %s "$KEY" | sha256sum`)."""
    if path is None:
        return ()
    try:
        with open(path, "rb") as file:
            parsed = tomllib.load(file)
    except OSError as error:
        raise ConfigError(f"KEY_LIMITS_FILE cannot be read: {error.strerror} ({path})") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"KEY_LIMITS_FILE is not valid TOML: {error}") from None
    keys = parsed.get("keys", {})
    if set(parsed) - {"keys"} or not isinstance(keys, dict):
        raise ConfigError("KEY_LIMITS_FILE must hold only [keys.<name>] tables")
    known = {hashlib.sha256(key.encode()).hexdigest() for key in api_keys}
    overrides: dict[str, KeyOverride] = {}
    for name, entry in keys.items():
        where = f"KEY_LIMITS_FILE: [keys.{name}]"
        if not KEY_NAME.fullmatch(name) or not isinstance(entry, dict):
            raise ConfigError(f"{where} must be a table named with letters, digits, '.', '_' or '-'")
        unknown = set(entry) - {"sha256", *KEY_LIMITS}
        if unknown:
            raise ConfigError(f"{where} has unknown field(s) {', '.join(sorted(unknown))}; it takes sha256, {', '.join(KEY_LIMITS)}")
        digest = str(entry.get("sha256", "")).lower()
        if digest not in known:
            raise ConfigError(f"{where}: sha256 must be the SHA-256 (64 hex digits) of a key of API_KEYS, and matches none")
        if digest in overrides:
            raise ConfigError(f"{where} names the same key as [keys.{overrides[digest].name}]")
        for field_name in KEY_LIMITS:
            value = entry.get(field_name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"{where}: {field_name} must be a whole number, 0 for no limit")
        overrides[digest] = KeyOverride(name, digest, *(entry.get(field_name) for field_name in KEY_LIMITS))
    return tuple(overrides.values())


@dataclass(frozen=True)
class OtelSettings:
    """OpenTelemetry export (docs/tracing.md), from the standard OTEL_* variables: each signal is
    on only where an OTLP endpoint is set for it. The SDK reads the exporter's own variables
    (headers, timeout, compression, certificates, sampler, resource) itself, when it starts."""

    traces: bool = False
    metrics: bool = False
    service_name: str = "streaming-relay"
    capture_content: bool = False  # OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT: prompts and answers on spans
    max_queue_size: int = 2048  # ended spans waiting for export; more are dropped and counted
    max_export_batch_size: int = 512
    schedule_delay_ms: int = 5000
    metric_export_interval_ms: int = 60000

    @property
    def enabled(self) -> bool:
        return self.traces or self.metrics


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
    key_max_streams: int = 0  # per client key; 0: no limit
    key_requests_per_minute: int = 0
    key_tokens_per_minute: int = 0
    key_reserve_tokens: int = 1000  # output tokens reserved for a request that sets no output limit
    key_lease_seconds: float = 10.0
    key_overrides: tuple[KeyOverride, ...] = ()
    fallbacks: tuple[Fallback, ...] = ()
    fallback_first_output_seconds: float = 0.0
    breaker_failures: int = 5
    breaker_window_seconds: float = 30.0
    breaker_cooldown_seconds: float = 30.0
    otel: OtelSettings = OtelSettings()

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
        key_max_streams=number("KEY_MAX_STREAMS", 0, 0, 1_000_000, int),
        key_requests_per_minute=number("KEY_REQUESTS_PER_MINUTE", 0, 0, 10**9, int),
        key_tokens_per_minute=number("KEY_TOKENS_PER_MINUTE", 0, 0, 10**12, int),
        key_reserve_tokens=number("KEY_RESERVE_TOKENS", 1000, 1, 10_000_000, int),
        key_lease_seconds=number("KEY_LEASE_SECONDS", 10.0, 0.3, 300),
        key_overrides=key_overrides(text("KEY_LIMITS_FILE"), api_keys),
        fallback_first_output_seconds=number("FALLBACK_FIRST_OUTPUT_SECONDS", 0.0, 0, 86400),
        breaker_failures=number("BREAKER_FAILURES", 5, 0, 1000, int),
        breaker_window_seconds=number("BREAKER_WINDOW_SECONDS", 30.0, 0.01, 86400),
        breaker_cooldown_seconds=number("BREAKER_COOLDOWN_SECONDS", 30.0, 0.01, 86400),
        fallbacks=fallbacks(environ, text("OPENAI_API_KEY")),
        otel=otel_settings(environ),
    )
    limited = [name for name in ("KEY_MAX_STREAMS", "KEY_REQUESTS_PER_MINUTE", "KEY_TOKENS_PER_MINUTE", "KEY_LIMITS_FILE") if text(name) not in (None, "0")]
    if limited and not settings.api_keys:
        raise ConfigError(f"{limited[0]} is set, but API_KEYS is empty: the limits are per client key, and there is none.")
    if settings.resume_total_bytes < settings.resume_answer_bytes:
        raise ConfigError("RESUME_MAX_BYTES must be at least RESUME_MAX_ANSWER_BYTES: the store must hold one whole answer.")
    if settings.fallbacks and settings.demo:
        raise ConfigError("FALLBACK_BASE_URLS needs OPENAI_BASE_URL or OPENAI_API_KEY: the built-in demo model has no fallbacks.")
    if not settings.demo and not settings.api_keys and not settings.allow_anonymous:
        raise ConfigError(
            "API_KEYS is empty, so anyone who can reach this service could spend the upstream's budget. "
            "Set API_KEYS to a comma-separated list of keys that clients must send as "
            "'Authorization: Bearer <key>' (for example API_KEYS=$(python -c 'import secrets; print(secrets.token_urlsafe())')), "
            "or set ALLOW_ANONYMOUS=1 to serve without keys."
        )
    return settings


def fallbacks(environ: Mapping[str, str], openai_api_key: str | None) -> tuple[Fallback, ...]:
    """FALLBACK_BASE_URLS, FALLBACK_API_KEYS and FALLBACK_MODELS, one Fallback per URL; see docs/fallbacks.md.

    No message quotes a key: a start-up error is logged, and may be read by more people than the key."""

    def entries(name: str) -> list[str]:
        raw = environ.get(name, "").strip()
        return [entry.strip() for entry in raw.split(",")] if raw else []

    urls = entries("FALLBACK_BASE_URLS")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"FALLBACK_BASE_URLS must list URLs that start with http:// or https://, separated by commas, not {url!r}")
    keys, models = entries("FALLBACK_API_KEYS"), entries("FALLBACK_MODELS")
    if len(keys) > len(urls):
        raise ConfigError(f"FALLBACK_API_KEYS has {len(keys)} entries for {len(urls)} FALLBACK_BASE_URLS; give one per URL, in the same order.")
    if len(models) > len(urls):
        raise ConfigError(f"FALLBACK_MODELS has {len(models)} entries for {len(urls)} FALLBACK_BASE_URLS; give one per URL, in the same order.")
    return tuple(
        Fallback(
            url,
            # An empty or missing entry: the fallback takes OPENAI_API_KEY (the same account, another deployment).
            keys[n] if n < len(keys) and keys[n] else openai_api_key,
            model_rules(models[n] if n < len(models) else ""),
        )
        for n, url in enumerate(urls)
    )


def model_rules(entry: str) -> tuple[tuple[str, str], ...]:
    """One FALLBACK_MODELS entry: empty (the requested model as it is), a model name (for every
    request), or `requested=used` pairs separated by `;`, where `*` stands for any other model."""
    if not entry:
        return ()
    if "=" not in entry and ";" not in entry:
        return (("*", entry),)
    rules = []
    for rule in entry.split(";"):
        requested, sign, used = (part.strip() for part in rule.partition("="))
        if not sign or not requested or not used:
            raise ConfigError(f"FALLBACK_MODELS entries are a model name or requested=used pairs separated by ';', not {entry!r}")
        rules.append((requested, used))
    return tuple(rules)


OTLP_PROTOCOL = "http/protobuf"  # the one OTLP transport the service exports with (opentelemetry-exporter-otlp-proto-http)


def otel_settings(environ: Mapping[str, str]) -> OtelSettings:
    """The OTEL_* variables the service acts on itself; see docs/tracing.md. A signal (traces,
    metrics) is on where an OTLP endpoint is set for it and its exporter is not `none`, unless
    OTEL_SDK_DISABLED=true. No message quotes an endpoint, which may hold credentials."""

    def value(name: str) -> str:
        return environ.get(name, "").strip()

    def whole(name: str, default: int, low: int, high: int) -> int:
        raw = value(name)
        if not raw:
            return default
        if not raw.isdigit() or not low <= int(raw) <= high:
            raise ConfigError(f"{name} must be a whole number from {low} to {high}, not {raw!r}")
        return int(raw)

    disabled = value("OTEL_SDK_DISABLED").lower()
    if disabled not in {"", "true", "false"}:
        raise ConfigError(f"OTEL_SDK_DISABLED must be true or false, not {disabled!r}")
    for form in ("", "TRACES_", "METRICS_"):
        if value(f"OTEL_EXPORTER_OTLP_{form}ENDPOINT") and not value(f"OTEL_EXPORTER_OTLP_{form}ENDPOINT").startswith(("http://", "https://")):
            raise ConfigError(f"OTEL_EXPORTER_OTLP_{form}ENDPOINT must be a URL that starts with http:// or https:// (OTLP over HTTP)")
        protocol = value(f"OTEL_EXPORTER_OTLP_{form}PROTOCOL")
        if protocol and protocol != OTLP_PROTOCOL:
            raise ConfigError(
                f"OTEL_EXPORTER_OTLP_{form}PROTOCOL must be {OTLP_PROTOCOL}, not {protocol!r}: the service exports OTLP over "
                "HTTP, which every collector takes on its port 4318"
            )
    signals = {}
    for signal in ("traces", "metrics"):
        exporter = value(f"OTEL_{signal.upper()}_EXPORTER").lower() or "otlp"
        if exporter not in {"otlp", "none"}:
            where = " (Prometheus metrics are always at /metrics)" if signal == "metrics" else ""
            raise ConfigError(f"OTEL_{signal.upper()}_EXPORTER must be otlp or none, not {exporter!r}{where}")
        endpoint = value(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT") or value("OTEL_EXPORTER_OTLP_ENDPOINT")
        signals[signal] = bool(endpoint) and exporter == "otlp" and disabled != "true"
    capture = value("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT").lower()
    if capture not in {"", "false", "no_content", "true", "span_only", "span_and_event"}:
        raise ConfigError(f"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT must be true or false, not {capture!r}")
    resource = dict(pair.partition("=")[::2] for pair in value("OTEL_RESOURCE_ATTRIBUTES").split(",") if "=" in pair)
    named = value("OTEL_SERVICE_NAME") or urllib.parse.unquote(resource.get("service.name", "").strip())
    queue = whole("OTEL_BSP_MAX_QUEUE_SIZE", 2048, 1, 1_000_000)
    batch = whole("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", min(512, queue), 1, 1_000_000)
    if batch > queue:
        raise ConfigError(f"OTEL_BSP_MAX_EXPORT_BATCH_SIZE ({batch}) must be at most OTEL_BSP_MAX_QUEUE_SIZE ({queue})")
    return OtelSettings(
        traces=signals["traces"],
        metrics=signals["metrics"],
        service_name=named or OtelSettings.service_name,
        capture_content=capture in {"true", "span_only", "span_and_event"},
        max_queue_size=queue,
        max_export_batch_size=batch,
        schedule_delay_ms=whole("OTEL_BSP_SCHEDULE_DELAY", 5000, 1, 3_600_000),
        metric_export_interval_ms=whole("OTEL_METRIC_EXPORT_INTERVAL", 60000, 10, 86_400_000),
    )
