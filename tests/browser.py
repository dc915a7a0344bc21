"""Headless Chromium for the dashboard's tests: Debian's ``chromium`` driven through its
``chromedriver`` with Selenium (no browser downloads: they cannot reach their host here).

``browser()`` starts one headless Chromium with a temp profile and bounded timeouts and
yields a :class:`Browser`; ``Browser.shot(name)`` saves a screenshot into
``screenshots/`` at the repository's root (ignored by git). ``wait_for`` waits (bounded)
for something to show on the page, reloading it between looks until the pages update
themselves. Tests skip only when chromium or chromedriver is not installed (``.ci/run``
installs both).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SCREENSHOTS = Path(__file__).resolve().parent.parent / "screenshots"
PAGE_LOAD_S = 15.0
WAIT_S = 10.0


def chromium_paths() -> tuple[str, str] | None:
    """(chromium, chromedriver) when both are installed."""
    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


@dataclass
class Browser:
    web: Any  # selenium.webdriver.Chrome; imported lazily (it is a test extra)
    base: str = ""  # the server under test: http://127.0.0.1:PORT

    def open(self, path: str) -> None:
        self.web.get(self.base + path)

    def wait_path(self, path: str) -> None:
        """Wait (bounded) until the page shown is ``path`` and has loaded: a click on a
        submit button returns before the browser has followed the answer."""
        from selenium.webdriver.support.ui import WebDriverWait

        url = self.base + path
        WebDriverWait(self.web, WAIT_S).until(
            lambda web: (
                web.current_url == url
                and web.execute_script("return document.readyState") == "complete"
            ),
            f"the browser did not reach {url} in {WAIT_S:g} s (at {self.web.current_url})",
        )

    def wait_id(self, element_id: str) -> Any:
        """The element with ``element_id`` once it is on the page (bounded wait)."""
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.ui import WebDriverWait

        return WebDriverWait(self.web, WAIT_S).until(
            expected_conditions.presence_of_element_located(("id", element_id)),
            f"no element #{element_id} at {self.web.current_url} after {WAIT_S:g} s",
        )

    def viewport(self, width: int, height: int) -> None:
        """Resize the window so that the page itself (and so a screenshot) is ``width`` ×
        ``height`` CSS pixels: the window's frame comes on top, headless too."""
        inner = self.web.execute_script("return [window.innerWidth, window.innerHeight]")
        outer = self.web.get_window_size()
        self.web.set_window_size(
            width + outer["width"] - inner[0], height + outer["height"] - inner[1]
        )

    def shot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.web.save_screenshot(str(path))
        return path


def text_of(web: Any, by: str, value: str, default: str | None = None) -> str:
    """The text of the element found by ``(by, value)`` in the WebDriver ``web``, read
    again when a live page swapped it between the find and the read (a stale element);
    ``default`` when there is none (else Selenium's NoSuchElementException)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    for attempt in range(5):
        try:
            return str(web.find_element(by, value).text)
        except NoSuchElementException:
            if default is not None:
                return default
            raise
        except StaleElementReferenceException:
            if attempt == 4:
                raise
            time.sleep(0.05)
    raise AssertionError("unreachable")


def wait_for(
    driver: Browser,
    predicate: Callable[[Any], object],
    timeout: float,
    reload: bool = True,
    what: str = "",
    every: float | None = None,
) -> Any:
    """``predicate(driver.web)`` once it is truthy, looking every ``every`` seconds (1 s when
    reloading, else 0.2 s) until ``timeout``; with ``reload`` the page is reloaded between
    looks (for pages that do not update themselves). Without ``reload`` a marker set on
    ``window`` first must still be there at the end: the page changed in place, it was
    not loaded again. A predicate that raises Selenium's errors (an element not there
    yet, or gone with a reload) counts as not yet.

    Raises AssertionError naming ``what``, the page and the start of its text."""
    from selenium.common.exceptions import WebDriverException

    pause = every if every is not None else (1.0 if reload else 0.2)
    deadline = time.monotonic() + timeout
    if not reload:
        driver.web.execute_script("window.__inPlace = true")
    while True:
        try:
            value = predicate(driver.web)
        except WebDriverException:
            value = None
        if value:
            if not reload:
                assert driver.web.execute_script("return window.__inPlace === true"), (
                    f"{what or 'the condition'}: the page was loaded again, not updated in place"
                )
            return value
        if time.monotonic() + pause > deadline:
            try:
                text = driver.web.find_element("tag name", "body").text
            except WebDriverException as exc:
                text = f"(the page cannot be read: {exc.msg})"
            raise AssertionError(
                f"{what or 'the condition'} not seen within {timeout:g} s at "
                f"{driver.web.current_url}:\n{text[:3000]}"
            )
        time.sleep(pause)
        if reload:
            with contextlib.suppress(WebDriverException):  # a slow load: the next look tells
                driver.web.refresh()


@contextlib.contextmanager
def browser(width: int = 1280, height: int = 900) -> Iterator[Browser]:
    """A headless Chromium (set ``base`` to the server under test)."""
    paths = chromium_paths()
    if paths is None:
        pytest.skip("chromium and chromium-driver are not installed (apt-get install them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = paths
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for argument in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
        ):
            options.add_argument(argument)
        driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
        try:
            driver.set_page_load_timeout(PAGE_LOAD_S)
            driver.set_script_timeout(WAIT_S)
            yield Browser(driver)
        finally:
            driver.quit()
