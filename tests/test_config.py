"""Start-up: settings are checked once, a bad value stops the start naming the variable, a real
upstream without client keys is refused, and with no upstream at all the demo model answers."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

import httpx
import pytest

from relay.config import ConfigError, load_settings

from conftest import ROOT, Service, free_port, service_env, upstream_env
from upstream import FakeUpstream


def start_and_fail(env: dict[str, str]) -> str:
    """Run `python service.py` and return its output; it must exit at once with an error."""
    result = subprocess.run(
        [sys.executable, "service.py"], cwd=ROOT, env=service_env(**{"PORT": "1", **env}), capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    return output


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PORT", "eighty"),
        ("PORT", "70000"),
        ("MAX_STREAMS", "0"),
        ("MAX_STREAMS", "many"),
        ("SHED_LAG_MS", "-1"),
        ("SHED_LAG_MS", "soon"),
        ("HEARTBEAT_SECONDS", "-1"),
        ("HEARTBEAT_SECONDS", "nan"),
        ("SHUTDOWN_GRACE_SECONDS", "soon"),
        ("UPSTREAM_CONNECT_TIMEOUT", "0"),
        ("UPSTREAM_READ_TIMEOUT", "inf"),
        ("MAX_STREAM_SECONDS", "x"),
        ("UPSTREAM_MAX_RETRIES", "-1"),
        ("MAX_BODY_BYTES", "1.5"),
        ("MAX_QUERY_CHARS", "0"),
        ("ALLOW_ANONYMOUS", "maybe"),
        ("OPENAI_BASE_URL", "localhost:11434/v1"),
        ("LOG_LEVEL", "loud"),
        ("CORS_ORIGINS", "example.com"),
        ("REDIS_URL", "localhost:6379"),
        ("RESUME_GRACE_SECONDS", "-1"),
        ("RESUME_TTL_SECONDS", "0"),
        ("RESUME_LEASE_SECONDS", "forever"),
        ("RESUME_MAX_ANSWER_BYTES", "1.5"),
        ("RESUME_MAX_BYTES", "100"),
        ("PIN_WORKERS", "yes please"),
        ("START_QUEUE_MS", "-1"),
        ("START_QUEUE_LENGTH", "many"),
        ("FALLBACK_BASE_URLS", "localhost:8001/v1"),
        ("FALLBACK_BASE_URLS", "http://127.0.0.1:8001/v1,,http://127.0.0.1:8002/v1"),
        ("FALLBACK_BASE_URLS", "http://127.0.0.1:8001/v1"),  # without OPENAI_BASE_URL or OPENAI_API_KEY: the demo model
        ("FALLBACK_API_KEYS", "sk-a"),  # more keys than FALLBACK_BASE_URLS
        ("FALLBACK_MODELS", "gpt-4o"),  # more entries than FALLBACK_BASE_URLS
        ("FALLBACK_FIRST_OUTPUT_SECONDS", "-1"),
        ("BREAKER_FAILURES", "some"),
        ("BREAKER_WINDOW_SECONDS", "0"),
        ("BREAKER_COOLDOWN_SECONDS", "soon"),
        ("KEY_MAX_STREAMS", "-1"),
        ("KEY_MAX_STREAMS", "5"),  # without API_KEYS: there is no key to limit
        ("KEY_REQUESTS_PER_MINUTE", "lots"),
        ("KEY_TOKENS_PER_MINUTE", "1.5"),
        ("KEY_RESERVE_TOKENS", "0"),
        ("KEY_LEASE_SECONDS", "0.1"),
        ("KEY_LIMITS_FILE", "/nonexistent/key-limits.toml"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{variable} "):
        load_settings({variable: value})


@pytest.mark.parametrize(("variable", "value"), [("PORT", "eighty"), ("HEARTBEAT_SECONDS", "-1")])
def test_a_bad_value_stops_the_start(variable: str, value: str) -> None:
    output = start_and_fail({variable: value})
    assert f"configuration error: {variable} must be" in output


def test_a_redis_that_cannot_be_reached_stops_the_start() -> None:
    output = start_and_fail({"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert "configuration error: REDIS_URL" in output


def test_a_real_upstream_without_client_keys_is_refused() -> None:
    output = start_and_fail({"OPENAI_API_KEY": "sk-real-secret-value"})
    assert "API_KEYS" in output and "ALLOW_ANONYMOUS=1" in output
    assert "sk-real-secret-value" not in output


def test_allow_anonymous_serves_without_keys(fake: FakeUpstream, start_service: Callable[..., Service]) -> None:
    env = upstream_env(fake, ALLOW_ANONYMOUS="1")
    del env["API_KEYS"]
    service = start_service(env)
    assert httpx.get(f"{service.base_url}/chat", params={"q": "hi"}).text == "Hello, world!"


def test_the_demo_model_streams_end_to_end(start_service: Callable[..., Service]) -> None:
    """No OPENAI_API_KEY and no OPENAI_BASE_URL: `python service.py` answers from the demo model,
    word by word, through the openai client and a worker thread like any upstream."""
    service = start_service({"DEMO_SECONDS_PER_WORD": "0.02"})
    health = httpx.get(f"{service.base_url}/healthz").json()
    assert health["status"] == "ok" and health["demo"] is True
    assert "DEMO model" in service.log()
    with httpx.stream("GET", f"{service.base_url}/chat", params={"q": "why stream?"}, timeout=10) as response:
        assert response.status_code == 200
        pieces = list(response.iter_raw())
    text = b"".join(pieces).decode()
    assert text.startswith('You asked: "why stream?". This is the built-in demo model')
    assert len(pieces) > 20, "the demo answer arrived in a few lumps, not word by word"

    events = httpx.post(
        f"{service.base_url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 3, "stream_options": {"include_usage": True}},
    ).text.split("\n\n")
    chunks = [json.loads(event.removeprefix("data: ")) for event in events if event and event != "data: [DONE]"]
    assert chunks[-1]["usage"]["completion_tokens"] == 3
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert events[-2:] == ["data: [DONE]", ""]


IMPORT_PROBE = """
import os, sys, threading, traceback
root = sys.argv[1]
ours = (os.path.join(root, "service.py"), os.path.join(root, "relay") + os.sep)  # not a virtualenv in the clone
read = []
def note(name):
    # The code that asked: the innermost frame outside os, Mapping's helpers and this probe.
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename not in ("<frozen os>", "<string>") and "_collections_abc" not in frame.filename:
            if frame.filename.startswith(ours):
                read.append(name)
            return
class Watched(os._Environ):
    def __getitem__(self, name):
        note(name)
        return super().__getitem__(name)
    def __contains__(self, name):
        note(name)
        return super().__contains__(name)
environ = os.environ
os.environ = Watched(environ._data, environ.encodekey, environ.decodekey, environ.encodevalue, environ.decodevalue)
import service, relay.serving, relay.runtime, relay.answers, relay.demo, relay.placement
print("read:", sorted(set(read)), "threads:", threading.active_count(), "fds:", len(os.listdir("/proc/self/fd")))
"""


def test_importing_the_service_reads_no_setting_and_starts_nothing() -> None:
    """Importing service.py read its settings, built the app, and exited without the right
    environment: a benchmark could not import a piece of it."""
    baseline = subprocess.run(
        [sys.executable, "-c", 'import os; print("fds:", len(os.listdir("/proc/self/fd")))'], env={"PORT": "eighty"},
        capture_output=True, text=True, timeout=30,
    )
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, str(ROOT)], cwd=ROOT, env={"PORT": "eighty", "MAX_STREAMS": "none"},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"read: [] threads: 1 {baseline.stdout.strip()}" in result.stdout, result.stdout
