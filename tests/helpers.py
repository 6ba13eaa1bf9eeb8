"""Helpers shared by tests in several folders (``from tests.helpers import ...``)."""

from __future__ import annotations

import os
import shutil

import pytest


def need(reason: str) -> None:
    """Skip for want of something this machine lacks or does not allow; under CI=true, fail
    instead: CI runs every check (.ci/run installs what they need)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: this check must run)", pytrace=False)
    pytest.skip(reason)


def chromium(width: int, height: int):
    """A headless Chromium (Debian's chromium and chromedriver) driven through selenium."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        need("selenium is not installed (pip install -e '.[test]')")
    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        need("no chromium/chromedriver on PATH (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    # --no-sandbox: chromium refuses to start as root (CI runs as root) with its sandbox on.
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_path), options=options)
