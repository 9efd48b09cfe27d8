"""Resuming in a real browser (chromium): the connection between the browser and the service is
cut mid-answer by a loopback proxy they talk through, and the reader still shows the whole answer,
once, from one upstream call. EventSource reconnects by itself (Last-Event-ID); the page at /
asks for the rest itself."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from browsing import browser, expect, page  # noqa: F401  (fixtures)
from conftest import ROOT, Service, holding, launch, upstream_env
from proxy import CuttableProxy
from upstream import FakeUpstream

if TYPE_CHECKING:
    from playwright.sync_api import Page

PIECES = ["Before", " the cut,", " and 👋", " after", " it."]
WHOLE = "".join(PIECES)


@pytest.fixture(scope="module")
def open_service(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Without client keys, as EventSource needs; a grace window longer than its reconnect delay."""
    env = upstream_env(upstream, API_KEYS="", ALLOW_ANONYMOUS="1", RESUME_GRACE_SECONDS="10")
    running = launch(tmp_path_factory.mktemp("resume-browser"), env)
    yield running
    running.stop()


@pytest.fixture
def proxy(open_service: Service) -> Iterator[CuttableProxy]:
    through = CuttableProxy(int(open_service.base_url.rsplit(":", 1)[1]))
    yield through
    through.close()


@pytest.fixture
def held(fake: FakeUpstream) -> Iterator[threading.Event]:
    """The next answer sends two pieces, then waits for this gate before the rest."""
    with holding(fake, PIECES, 2) as gate:
        yield gate


def test_eventsource_reconnects_after_a_cut_and_shows_the_answer_once(
    fake: FakeUpstream, proxy: CuttableProxy, page: Page, held: threading.Event
) -> None:
    # The example page, served as if from the service's origin (the proxy's), so no CORS is involved.
    page.route(f"{proxy.base_url}/eventsource.html", lambda route: route.fulfill(path=ROOT / "examples" / "eventsource.html"))
    page.goto(f"{proxy.base_url}/eventsource.html")
    page.fill("#prompt", "cut me")
    page.click("#send")
    expect(page.locator("#answer")).to_have_text("Before the cut,")
    assert proxy.cut() > 0
    expect(page.locator("#status")).to_have_text("reconnecting")
    expect(page.locator("#status")).to_have_text("streaming", timeout=5_000)  # EventSource's retry is 1 s
    held.set()
    expect(page.locator("#status")).to_have_text("done")
    assert page.text_content("#answer") == WHOLE
    assert len(fake.requests) == 1, "the reconnect asked the model again"
    asked = [head.lower() for head in proxy.requests if head.startswith(b"GET /chat?")]
    assert len(asked) == 2 and b"last-event-id" not in asked[0], asked
    assert b"last-event-id: " in asked[1] and b".2\r\n" in asked[1], asked[1]  # what EventSource saw last
    assert page.evaluate("source.readyState") == 2


def ask_until_held(page: Page, proxy: CuttableProxy) -> None:
    """Ask on the page at / (through the proxy); return once it shows what the upstream sent."""
    page.goto(f"{proxy.base_url}/")
    page.fill("#prompt", "cut me")
    page.click("#send")
    expect(page.locator("#answer")).to_have_text("Before the cut,")


def test_page_resumes_after_a_cut_and_shows_the_answer_once(
    fake: FakeUpstream, proxy: CuttableProxy, page: Page, held: threading.Event
) -> None:
    ask_until_held(page, proxy)
    assert proxy.cut() > 0
    held.set()
    expect(page.locator("#status")).to_have_attribute("data-state", "done")
    assert page.text_content("#answer") == WHOLE
    expect(page.locator("#error")).to_be_empty()
    assert len(fake.requests) == 1, "the resume asked the model again"


def test_stop_cancels_the_answer_on_the_service(
    fake: FakeUpstream, proxy: CuttableProxy, page: Page, held: threading.Event
) -> None:
    """Stop sends DELETE: the model stops at once, although the grace window here is 10 s."""
    ask_until_held(page, proxy)
    page.click("#stop")
    assert fake.requests[-1].closed.wait(3), "the model went on after Stop"
    expect(page.locator("#status")).to_have_attribute("data-state", "stopped")
    assert not held.is_set()
