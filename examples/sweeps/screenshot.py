"""Screenshot a `leantune report` page in headless chromium (Debian's chromium and chromium-driver, through Selenium),
as the README's report images were made:

    python examples/sweeps/screenshot.py out/sweep/lora-r-alpha/report.html examples/sweeps/screenshots/lora-r-alpha.png

The window is as tall as the page (up to --max_height), so the table, the plots and the answers are in one image;
the PNG is saved with a 256-colour palette to keep it small.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="the report's HTML file")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1300)
    parser.add_argument("--max_height", type=int, default=3000)
    args = parser.parse_args()
    if not args.report.is_file():
        sys.exit(f"error: no such report: {args.report}")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        sys.exit("error: Debian's chromium and chromium-driver are needed (apt-get install chromium chromium-driver)")
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--window-size={args.width},1000", "--proxy-server=127.0.0.1:9"):  # the page needs no network
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    try:
        browser.get(args.report.resolve().as_uri())
        for _ in range(3):  # the window's frame takes part of its height: grow until the viewport holds the page
            page, view = browser.execute_script(
                "return [document.documentElement.scrollHeight, window.innerHeight]")
            if view >= page or browser.get_window_size()["height"] >= args.max_height:
                break
            browser.set_window_size(args.width, min(browser.get_window_size()["height"] + page - view + 20,
                                                    args.max_height))
        png = browser.get_screenshot_as_png()
    finally:
        browser.quit()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(256).save(args.out, optimize=True)
    print(f"{args.out}: {image.width}x{image.height}, {args.out.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
