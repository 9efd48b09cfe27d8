"""Every client in examples/ runs, as a person would run it, against a real service.

Command-line clients run as subprocesses; the two HTML pages are served from their own loopback
origin and opened in chromium, so the service answers them across origins (CORS) for real.
"""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING

import pytest

from browsing import browser, expect, page  # noqa: F401  (fixtures)
from conftest import KEY, ROOT, Service, launch, wait_until
from upstream import FakeUpstream, Reply

if TYPE_CHECKING:
    from playwright.sync_api import Page

EXAMPLES = ROOT / "examples"
DEMO_TEXT = "built-in demo model"
CLIENTS = {
    "curl": ["bash", str(EXAMPLES / "curl.sh")],
    "requests": [sys.executable, str(EXAMPLES / "requests_stream.py")],
    "httpx": [sys.executable, str(EXAMPLES / "httpx_stream.py")],
    "openai": [sys.executable, str(EXAMPLES / "openai_sdk.py")],
    "openai_responses": [sys.executable, str(EXAMPLES / "openai_responses.py")],
}
REQUESTS_PER_RUN = {"curl": 3}  # curl.sh shows three endpoints; the others ask once


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def examples_origin() -> Iterator[str]:
    """examples/ served from its own origin (another port, so another origin than the service)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(EXAMPLES)))
    thread = threading.Thread(target=server.serve_forever, name="examples-server", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def demo_env(origin: str, **env: str) -> dict[str, str]:
    return {"DEMO_SECONDS_PER_WORD": "0.002", "CORS_ORIGINS": origin, **env}


@pytest.fixture(scope="module")
def keyed_demo(examples_origin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The demo model behind API keys: the clients must send theirs."""
    running = launch(tmp_path_factory.mktemp("keyed-demo"), demo_env(examples_origin, API_KEYS=KEY))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def open_demo(examples_origin: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The demo model without keys, as EventSource needs (it cannot send an Authorization header)."""
    running = launch(tmp_path_factory.mktemp("open-demo"), demo_env(examples_origin))
    yield running
    running.stop()


def client_env(service: Service, key: str | None = KEY) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith(("SERVICE_", "OPENAI_"))}
    return {**env, "SERVICE_URL": service.base_url, **({"SERVICE_KEY": key} if key else {})}


# -- command-line clients -----------------------------------------------------------------------


@pytest.mark.parametrize("name", CLIENTS)
def test_client_prints_the_demo_answer(keyed_demo: Service, name: str) -> None:
    done = subprocess.run(CLIENTS[name], env=client_env(keyed_demo), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert DEMO_TEXT in done.stdout
    if name == "curl":  # the SSE framings, each with its terminator
        assert "event: done" in done.stdout and done.stdout.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("name", ["requests", "httpx", "openai", "openai_responses"])
def test_client_reports_a_wrong_key(keyed_demo: Service, name: str) -> None:
    done = subprocess.run(CLIENTS[name], env=client_env(keyed_demo, "wrong"), capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "Missing or invalid API key" in done.stderr


class Output:
    """A subprocess's stdout, collected by a thread as it is written, for tests to wait on."""

    def __init__(self, stdout: IO[bytes]) -> None:
        self.data = b""
        threading.Thread(target=self._collect, args=(stdout.fileno(),), daemon=True).start()

    def _collect(self, fd: int) -> None:
        while chunk := os.read(fd, 65536):  # whatever the client has written so far
            self.data += chunk

    def count(self, text: str) -> int:
        return self.data.decode(errors="replace").count(text)


@pytest.mark.parametrize("name", CLIENTS)
def test_client_prints_each_piece_as_it_arrives(fake: FakeUpstream, service: Service, name: str) -> None:
    """The first piece is on the terminal while the upstream still holds back the rest."""
    gates = [threading.Event() for _ in range(REQUESTS_PER_RUN.get(name, 1))]
    fake.expect(*(Reply(pieces=["The first", " piece", " and the rest."], gates={1: gate}) for gate in gates))
    env = client_env(service)
    if name == "openai_responses":
        env["SERVICE_MODEL"] = "fake-model"  # else its /v1/models call would take the held reply
    process = subprocess.Popen(CLIENTS[name], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None
        output = Output(process.stdout)
        for number, gate in enumerate(gates, 1):
            wait_until(lambda number=number: output.count("The first") == number, timeout=10)  # type: ignore[misc]
            assert fake.requests[-1].pieces_sent == 1 and not gate.is_set(), "printed only after the upstream sent more"
            gate.set()
        assert process.wait(timeout=10) == 0
        wait_until(lambda: output.count("the rest.") == len(gates), timeout=5)
    finally:
        for gate in gates:
            gate.set()
        if process.poll() is None:
            process.kill()
        process.wait(timeout=5)


# -- browser clients, served from another origin -------------------------------------------------


def test_fetch_page_streams_across_origins(examples_origin: str, keyed_demo: Service, page: Page) -> None:
    page.goto(f"{examples_origin}/fetch.html?service={keyed_demo.base_url}")
    page.fill("#key", KEY)  # Authorization and a JSON body: the browser sends a CORS preflight first
    page.click("#send")
    expect(page.locator("#status")).to_have_text("done")
    expect(page.locator("#answer")).to_contain_text(DEMO_TEXT)
    expect(page.locator("#error")).to_be_empty()

    page.fill("#key", "wrong")
    page.click("#send")
    expect(page.locator("#error")).to_contain_text("HTTP 401")  # CORS headers on errors too, so it is readable


def test_eventsource_page_streams_across_origins(examples_origin: str, open_demo: Service, page: Page) -> None:
    page.goto(f"{examples_origin}/eventsource.html?service={open_demo.base_url}")
    page.fill("#prompt", "Hello from EventSource")
    page.click("#send")
    expect(page.locator("#status")).to_have_text("done")
    expect(page.locator("#answer")).to_contain_text('You asked: "Hello from EventSource".')
    expect(page.locator("#answer")).to_contain_text(DEMO_TEXT)
    # Closed on "done": left open, EventSource would reconnect and ask (and pay) again.
    assert page.evaluate("source.readyState") == 2  # EventSource.CLOSED


def test_eventsource_page_shows_a_refused_connection(examples_origin: str, keyed_demo: Service, page: Page) -> None:
    """With API_KEYS set EventSource gets 401 (it cannot send the key): the page says it failed."""
    page.goto(f"{examples_origin}/eventsource.html?service={keyed_demo.base_url}")
    page.click("#send")
    expect(page.locator("#status")).to_have_text("failed")
    assert page.evaluate("source.readyState") == 2
