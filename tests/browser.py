"""A real headless browser for tests: Debian's Chromium and chromedriver, driven by Selenium.

Use the ``browser`` fixture (``from tests.browser import browser``, then ask for it as a
test argument). It skips the test, with the reason, when Selenium, Chromium or
chromedriver is absent (``apt-get install chromium chromium-driver``; Selenium is in the
``dev`` extra). Nothing is downloaded: the driver and the browser are the machine's.

The browser's console is recorded (``goog:loggingPrefs``), so a test can assert that a
page logged no errors; waits poll the DOM with a bound, never sleep a fixed time.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_NAME = "chromedriver"


def find_chromium() -> tuple[str, str] | str:
    """(browser, driver) paths, or why the browser tests cannot run here."""
    binary = next((p for p in map(shutil.which, BROWSER_NAMES) if p), None)
    driver = shutil.which(DRIVER_NAME)
    if binary is None or driver is None:
        missing = " and ".join(
            n for n, p in (("Chromium", binary), ("chromedriver", driver)) if p is None
        )
        return f"{missing} not installed (apt-get install chromium chromium-driver)"
    return binary, driver


class Browser:
    """A Selenium Chrome driver with the waits and checks the tests need."""

    def __init__(self, driver: Any, out_dir: Path) -> None:
        self.driver = driver
        self.out_dir = out_dir
        self._console: list[dict[str, Any]] = []

    def open(self, url: str) -> None:
        self.driver.get(url)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def wait_for(self, probe: Callable[[], T | None], *, timeout: float, what: str) -> T:
        """Poll ``probe`` until it returns something truthy (returned) or ``timeout`` s pass."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = probe()
            if last:
                return last
            time.sleep(0.1)
        raise AssertionError(f"waited {timeout:.0f} s for {what}; last value {last!r}")

    def console(self) -> list[dict[str, Any]]:
        """Every console entry so far (the driver hands each out once; kept here)."""
        self._console.extend(self.driver.get_log("browser"))
        return list(self._console)

    def console_errors(self) -> list[dict[str, Any]]:
        return [e for e in self.console() if e.get("level") == "SEVERE"]

    def screenshot(self, name: str) -> Path:
        path = self.out_dir / name
        self.driver.save_screenshot(str(path))
        print(f"screenshot: {path}")
        return path


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    """A headless Chromium for one test; quits when the test ends, whatever its outcome."""
    found = find_chromium()
    if isinstance(found, str):
        pytest.skip(found)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    binary, driver_path = found
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--no-first-run",
        "--window-size=1400,1800",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver_path, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(120)
    driver.set_script_timeout(60)
    try:
        yield Browser(driver, tmp_path)
    finally:
        driver.quit()
