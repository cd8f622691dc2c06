"""Browser fixtures for the studio: Debian's chromium driven by Playwright (never a downloaded browser), and
`StudioPage`, which does what a designer does on the page (type, click, drop) and reads what the page shows."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
DESKTOP = {"width": 1280, "height": 900}
MOBILE = {"width": 390, "height": 844}
FINISHED = ("done", "failed", "canceled")

# Records every state the status line goes through, so that a test can tell that progress was shown even when it
# went by between two of its own looks.
RECORD_STATUS = """
() => {
  window.igStatus = [];
  const target = document.querySelector("#status");
  const record = () => {
    const line = target.querySelector(".ig-status");
    if (!line) return;
    window.igStatus.push({state: line.dataset.state, text: line.innerText.trim(),
                          bar: !!line.querySelector(".ig-bar"), preview: !!line.querySelector("img.ig-step-preview")});
  };
  new MutationObserver(record).observe(target, {subtree: true, childList: true, characterData: true, attributes: true});
}
"""

# A real drag and drop: dragenter, dragover and drop events carrying the file, on the upload area.
DROP_FILE = """
([selector, data, name]) => {
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  const transfer = new DataTransfer();
  transfer.items.add(new File([bytes], name, {type: "image/png"}));
  const target = document.querySelector(selector);
  for (const type of ["dragenter", "dragover", "drop"]) {
    target.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: transfer}));
  }
}
"""


@pytest.fixture(scope="session")
def browser() -> Iterator:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed: run `make setup-test`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class StudioPage:
    """One designer's tab on the studio."""

    def __init__(self, page, base_url: str) -> None:
        self.page = page
        self.base_url = base_url

    # --- getting there ---

    def open(self) -> StudioPage:
        self.page.goto(self.base_url + "/")
        return self.ready()

    def ready(self) -> StudioPage:
        self.page.wait_for_selector("#prompt textarea", timeout=60_000)
        self.page.wait_for_selector("#ig-header[data-loaded=true]")
        self.page.evaluate(RECORD_STATUS)
        return self

    def sign_in(self, name: str, secret: str) -> StudioPage:
        self.page.goto(self.base_url + "/")
        self.page.get_by_label("username").fill(name)
        self.page.get_by_label("password").fill(secret)
        self.page.get_by_role("button", name="Login").click()
        return self.ready()

    def tab(self, tab_id: str) -> None:
        self.page.click(f"#tab-{tab_id}-button")
        self.page.wait_for_selector(f"#tab-{tab_id}-button[aria-selected=true]")

    # --- controls ---

    def prompt(self, text: str) -> None:
        self.page.fill("#prompt textarea", text)

    def number(self, elem_id: str, value: float) -> None:
        box = self.page.locator(f"#{elem_id} input[type=number]")
        box.fill(str(value))
        box.press("Enter")

    def size(self, size: str) -> None:
        box = self.page.locator("#size input")
        box.fill(size)
        box.press("Enter")

    # --- generating ---

    def generate(self, *, shortcut: bool = True, timeout_s: float = 60) -> str:
        """Start (Ctrl+Enter, as designers do, or the button) and wait for the end; returns the final state."""
        self.page.wait_for_function("!document.querySelector('#generate').disabled")
        before = self.page.evaluate("window.igStatus.length")
        if shortcut:
            self.page.locator("#prompt textarea").press("Control+Enter")
        else:
            self.page.click("#generate")
        self.page.wait_for_function("(n) => window.igStatus.length > n", arg=before)
        return self.wait_finished(timeout_s)

    def wait_finished(self, timeout_s: float = 60) -> str:
        self.page.wait_for_function(
            "(states) => states.includes(document.querySelector('#status .ig-status').dataset.state)"
            " && !document.querySelector('#generate').disabled",
            arg=list(FINISHED),
            timeout=timeout_s * 1000,
        )
        return self.status()[0]

    def status(self) -> tuple[str, str]:
        line = self.page.locator("#status .ig-status")
        return line.get_attribute("data-state") or "", line.inner_text().strip()

    def status_log(self) -> list[dict]:
        return self.page.evaluate("window.igStatus")

    def wait_state(self, state: str, timeout_s: float = 30) -> None:
        self.page.wait_for_selector(f"#status .ig-status[data-state={state}]", timeout=timeout_s * 1000)

    # --- what the page shows ---

    def parameters(self, prefix: str = "results") -> dict[str, str]:
        """The selected image's parameters table."""
        self.page.wait_for_selector(f"#{prefix}-parameters table")
        rows = self.page.locator(f"#{prefix}-parameters tr")
        return {
            rows.nth(i).locator("th").inner_text(): rows.nth(i).locator("td").inner_text()
            for i in range(rows.count())
        }

    def image_id(self, prefix: str = "results") -> str:
        return self.page.locator(f"#{prefix}-parameters table").get_attribute("data-image-id") or ""

    def captions(self, gallery: str) -> list[str]:
        return [
            text.strip()
            for text in self.page.locator(f"#{gallery} .grid-container .caption-label").all_inner_texts()
        ]

    def download(self, prefix: str = "results") -> bytes:
        """Click the inspector's Download button and return the file the browser saved."""
        with self.page.expect_download() as download:
            self.page.click(f"#{prefix}-download")
        return Path(download.value.path()).read_bytes()

    def wait_toast(self, text: str, timeout_s: float = 30) -> str:
        toast = self.page.locator(".toast-body", has_text=text).first
        toast.wait_for(timeout=timeout_s * 1000)
        return toast.inner_text()

    def drop_png(self, data: bytes, name: str = "image.png") -> None:
        self.page.evaluate(
            DROP_FILE, ["#png-drop button.upload-container", base64.b64encode(data).decode(), name]
        )

    def wait_until(
        self, condition: Callable[[], bool], timeout_s: float = 30, what: str = "condition"
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            self.page.wait_for_timeout(100)


@pytest.fixture
def studio_page(browser) -> Iterator[Callable[..., StudioPage]]:
    """`studio_page(base_url, viewport=DESKTOP)`: a fresh browser context (its own cookies) and page."""
    contexts = []

    def make(base_url: str, viewport: dict[str, int] = DESKTOP) -> StudioPage:
        context = browser.new_context(viewport=viewport, accept_downloads=True)
        contexts.append(context)
        return StudioPage(context.new_page(), base_url)

    yield make
    for context in contexts:
        context.close()
