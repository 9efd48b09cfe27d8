"""A real browser for tests: Debian's chromium, driven by Playwright's sync API.

Import the fixtures into a test module (`from browsing import browser, page`). Nothing is
downloaded: Playwright only drives the chromium that apt installed. When either is missing the
tests FAIL with the install commands; a skip would let CI pass without ever opening a browser.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",  # CI runs as root in a container, where chromium's sandbox cannot start
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    # Nothing but the pages under test may use the network (and CI may have none).
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 5_000  # every Playwright wait is bounded; an answer that does not come fails the test
INSTALL = "apt-get install -y chromium && pip install -r requirements-test.txt (never `playwright install`)"


# Module scope: Playwright's sync API allows one running instance at a time, and a module-scoped
# fixture is torn down before the next module's starts.
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(f"the browser tests need Playwright's Python package: {INSTALL}")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"the browser tests need chromium at {CHROMIUM}: {INSTALL}")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=20_000)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Page]:
    """A fresh page (own cookies and storage); on failure its screenshot, HTML and console log
    are saved in the test's tmp_path, next to the service logs."""
    context = browser.new_context(viewport={"width": 390, "height": 844})  # a phone-sized screen
    context.set_default_timeout(TIMEOUT_MS)
    opened = context.new_page()
    console: list[str] = []
    opened.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    opened.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
    failed_before = request.session.testsfailed
    yield opened
    # The call phase's report is counted before teardown runs: a higher count means this test failed.
    if request.session.testsfailed > failed_before:
        try:
            opened.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            (tmp_path / "failure.html").write_text(opened.content())
        finally:
            (tmp_path / "console.txt").write_text("\n".join(console))
            warnings.warn(f"{request.node.name}: the page's screenshot, HTML and console are in {tmp_path}", stacklevel=1)
    context.close()


def expect(target: Any) -> Any:
    """Playwright's `expect`, imported when first used so that a missing package fails the tests
    that need it (through the `browser` fixture) instead of the whole collection."""
    from playwright.sync_api import expect as playwright_expect

    playwright_expect.set_options(timeout=TIMEOUT_MS)
    return playwright_expect(target)
