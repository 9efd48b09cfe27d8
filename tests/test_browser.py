"""The page at GET / in a real browser (chromium), and CORS for pages served from elsewhere.

Against a gated fake upstream, the page must show the first piece while the upstream still holds
back the rest: a page that buffered the response, or a service that did, fails here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import httpx
import pytest

from browsing import browser, expect, page  # noqa: F401  (fixtures)
from conftest import AUTH, KEY, Service, free_port, launch, upstream_env
from upstream import FakeUpstream, Reply

if TYPE_CHECKING:
    from playwright.sync_api import Page, Request

# Spaces, a newline, non-ASCII and markup: the page must show exactly this text, and as text.
PIECES = ["The first", " piece", "  keeps  its spaces\n", "and 👋 世界", " <b>not bold</b>", "."]
WHOLE = "".join(PIECES)


@pytest.fixture
def release(fake: FakeUpstream) -> Iterator[threading.Event]:
    """The upstream's next reply sends its first piece, then waits for this gate before the rest.
    The gate opens when the test ends too, so a failed test never leaves the upstream waiting."""
    gate = threading.Event()
    fake.expect(Reply(pieces=PIECES, gates={1: gate}))
    yield gate
    gate.set()


def ask(page: Page, service: Service, message: str = "hi", key: str | None = KEY) -> None:
    page.goto(service.base_url + "/")
    page.fill("#prompt", message)
    if key is not None:
        page.fill("#key", key)
    page.click("#send")


def expect_state(page: Page, state: str) -> None:
    """The page's state: idle, waiting, streaming, done, stopped or error."""
    expect(page.locator("#status")).to_have_attribute("data-state", state)


# -- the page against the service and a gated upstream ----------------------------------------


def test_page_shows_each_piece_while_the_upstream_holds_the_rest(
    fake: FakeUpstream, service: Service, page: Page, release: threading.Event
) -> None:
    sent: list[Request] = []
    page.on("request", lambda request: sent.append(request) if request.url.endswith("/chat") else None)
    ask(page, service, "What streams?")

    expect(page.locator("#answer")).to_have_text("The first")
    assert not release.is_set() and fake.requests[-1].pieces_sent == 1, "the upstream sent more than the first piece"
    expect_state(page, "streaming")
    expect(page.locator("#ttft")).to_contain_text("ms")

    release.set()
    expect_state(page, "done")
    assert page.text_content("#answer") == WHOLE  # exactly, spaces and newline included
    assert page.locator("#answer *").count() == 0, "model text became HTML"
    expect(page.locator("#finish")).to_contain_text("stop")
    expect(page.locator("#rate")).to_contain_text("tokens/s")  # from usage.completion_tokens
    expect(page.locator("#error")).to_be_empty()

    request = sent[-1]
    assert request.method == "POST" and request.url == service.base_url + "/chat"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["accept"] == "application/x-ndjson"
    assert fake.requests[-1].body["messages"] == [{"role": "user", "content": "What streams?"}]
    # The key is kept in this tab only, and never in a URL.
    assert KEY not in page.url and page.evaluate("localStorage.length") == 0
    assert page.evaluate("sessionStorage.getItem('chat-key')") == KEY


def test_stop_closes_the_upstream_connection(
    fake: FakeUpstream, service: Service, page: Page, release: threading.Event
) -> None:
    ask(page, service)
    expect(page.locator("#answer")).to_have_text("The first")

    page.click("#stop")
    assert fake.requests[-1].closed.wait(2), "the upstream request stayed open after Stop"
    assert not release.is_set() and fake.requests[-1].pieces_sent == 1
    expect_state(page, "stopped")
    expect(page.locator("#error")).to_be_empty()
    expect(page.locator("#send")).to_be_enabled()


@pytest.mark.parametrize("key", ["wrong-key", ""])
def test_wrong_or_missing_key_is_explained(fake: FakeUpstream, service: Service, page: Page, key: str) -> None:
    ask(page, service, key=key)
    expect(page.locator("#error")).to_contain_text("Wrong or missing API key")
    expect_state(page, "error")
    assert fake.requests == []


def test_upstream_rate_limit_shows_when_to_retry(fake: FakeUpstream, service: Service, page: Page) -> None:
    """The upstream's 429 and its Retry-After reach the page through the service."""
    fake.expect(Reply(status=429, extra_headers={"Retry-After": "7"}))
    ask(page, service)
    expect(page.locator("#error")).to_contain_text("Rate limited: too many requests. Retry in 7 s.")


def test_error_in_the_middle_of_the_answer_is_shown(fake: FakeUpstream, service: Service, page: Page) -> None:
    fake.expect(Reply(pieces=PIECES, error_after=2))
    ask(page, service)
    expect(page.locator("#error")).to_contain_text("The answer stopped with an error")
    expect(page.locator("#error")).to_contain_text("The server had an error")
    assert page.text_content("#answer") == "The first piece"  # what came before the error stays


@pytest.mark.parametrize(
    ("status", "body", "shown"),
    [
        (200, '{"type": "delta", "text": "half an"}\n', "The answer was cut off"),  # no done line
        (429, '{"error": {"message": "slow down", "type": "rate_limit_error"}}', "Rate limited: too many requests. Retry in 3 s."),
        (503, '{"error": {"message": "full", "type": "server_busy"}}', "The service is busy. Retry in 3 s."),
    ],
)
def test_page_explains_endings_simulated_in_the_browser(
    service: Service, page: Page, status: int, body: str, shown: str
) -> None:
    """A proxy that cuts the stream, a rate limit, a full service: answered by the browser's network
    layer, so the page's handling is tested whatever the service can be made to send."""
    page.route(
        "**/chat",
        lambda route: route.fulfill(
            status=status, body=body, headers={"Content-Type": "application/x-ndjson", "Retry-After": "3"}
        ),
    )
    ask(page, service)
    expect(page.locator("#error")).to_contain_text(shown)
    expect_state(page, "error")


def test_page_on_the_demo_model(start_service: Callable[..., Service], page: Page) -> None:
    demo = start_service({"DEMO_SECONDS_PER_WORD": "0.005"})  # no upstream and no API_KEYS: no key needed
    page.goto(demo.base_url + "/")
    expect(page.locator("#status")).to_contain_text("Demo model")
    page.fill("#prompt", "Hello, demo")
    page.press("#prompt", "Control+Enter")  # the keyboard way to send
    expect_state(page, "done")
    answer = page.text_content("#answer") or ""
    assert answer.startswith('You asked: "Hello, demo".') and "built-in demo model" in answer
    expect(page.locator("#rate")).to_contain_text("tokens/s")
    expect(page.locator("#finish")).to_contain_text("stop")


# -- CORS: a page on another origin calls the service -----------------------------------------

ORIGIN = f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def cors_service(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    running = launch(tmp_path_factory.mktemp("cors"), upstream_env(upstream, CORS_ORIGINS=ORIGIN))
    yield running
    running.stop()


def header_set(value: str) -> set[str]:
    return {item.strip().lower() for item in value.split(",")}


def test_cors_preflight_allows_the_listed_origin(cors_service: Service) -> None:
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    response = httpx.options(cors_service.base_url + "/chat", headers=preflight, timeout=5)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert {"get", "post"} <= header_set(response.headers["access-control-allow-methods"])
    assert {"authorization", "content-type"} <= header_set(response.headers["access-control-allow-headers"])
    assert "origin" in header_set(response.headers["vary"])  # caches must not serve it to other origins


def test_cors_request_still_streams(fake: FakeUpstream, cors_service: Service, release: threading.Event) -> None:
    headers = {**AUTH, "Origin": ORIGIN}
    with httpx.stream("POST", cors_service.base_url + "/chat", json={"message": "hi"}, headers=headers, timeout=5) as response:
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert "retry-after" in header_set(response.headers["access-control-expose-headers"])
        chunks = response.iter_raw()
        assert next(chunks) == b"The first"
        assert not release.is_set() and fake.requests[-1].pieces_sent == 1
        release.set()
        assert (b"The first" + b"".join(chunks)).decode() == WHOLE


def test_cors_refuses_an_origin_not_listed(fake: FakeUpstream, cors_service: Service) -> None:
    other = f"http://127.0.0.1:{int(ORIGIN.rsplit(':', 1)[1]) + 1}"  # same host, another port: another origin
    preflight = {"Origin": other, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    response = httpx.options(cors_service.base_url + "/chat", headers=preflight, timeout=5)
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers
    # The request itself is answered (a browser would hide it from the page), without the header.
    response = httpx.post(cors_service.base_url + "/chat", json={"message": "hi"}, headers={**AUTH, "Origin": other}, timeout=5)
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
