"""Headless Chromium for the dashboard's tests: Debian's ``chromium`` driven through its
``chromedriver`` with Selenium (no browser downloads: they cannot reach their host here).

``browser()`` starts one headless Chromium with a temp profile and bounded timeouts and
yields a :class:`Browser`; ``Browser.shot(name)`` saves a screenshot into
``screenshots/`` at the repository's root (ignored by git). Tests skip only when
chromium or chromedriver is not installed (``.ci/run`` installs both).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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

    def shot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.web.save_screenshot(str(path))
        return path


@contextmanager
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
