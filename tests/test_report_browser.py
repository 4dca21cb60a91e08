"""The report in a real headless browser (Debian's chromium through Selenium and chromium-driver): it loads from a
file with no console error and no network, the table has one row per run, every plot decodes (natural width > 0),
and a screenshot is saved."""

from __future__ import annotations

import os
import shutil

import pytest

from leantune.report import write_report
from tests.test_report import fake_run, fake_sweep


def chromium_driver():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CI") == "true":
            pytest.fail("chromium and chromium-driver are not installed under CI: scripts/system_packages.sh "
                        "installs them")
        pytest.skip("Debian's chromium and chromium-driver are absent: bash scripts/system_packages.sh")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the dev extra) is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1800",
                "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>"):  # any fetch from a network fails
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver), options=options)


def test_report_in_headless_chromium(tmp_path):
    sweep = fake_sweep(tmp_path / "sweep")
    other = fake_run(tmp_path / "dora", "dora", 4, 2.2, 250.0, sample="<script>alert(1)</script>")
    out = tmp_path / "report.html"
    result = write_report([sweep, other], out)
    browser = chromium_driver()
    try:
        browser.get(out.as_uri())
        assert browser.title == "leantune report"
        rows = browser.find_elements("css selector", "#runs tbody tr")
        assert len(rows) == result["runs"] == 5
        widths = browser.execute_script(
            "return Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
        assert len(widths) == result["plots"] >= 3 and all(w > 0 for w in widths), widths
        assert browser.execute_script("return document.querySelectorAll('script').length") == 0  # escaped text
        errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert not errors, errors
        shot = tmp_path / "report.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    finally:
        browser.quit()
