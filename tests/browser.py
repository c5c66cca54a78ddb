"""Headless Chromium (Debian's `chromium`) for the report's browser test, and the README's screenshot:

    python -m tests.browser report.html docs/report.png
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")
_CONSOLE = re.compile(r":CONSOLE(?:\(\d+\)|:\d+)\]\s*(.*)")  # a console message, as --enable-logging prints it
_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
          "--disable-extensions", "--enable-logging=stderr", "--v=0")


def find_chromium() -> str | None:
    for name in CANDIDATES:
        if path := shutil.which(name):
            return path
    return None


def load(chromium: str, page: str, *extra: str, timeout_s: float = 60) -> tuple[str, list[str]]:
    """Opens `page` (a local file) and returns (the DOM once loaded, the console messages it logged)."""
    url = pathlib.Path(page).resolve().as_uri()
    proc = subprocess.run([chromium, *_FLAGS, *extra, "--dump-dom", url], capture_output=True, text=True,
                          timeout=timeout_s, env={**os.environ, "HOME": os.environ.get("HOME", "/tmp")})
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited with {proc.returncode}: {proc.stderr[-2000:]}")
    console = [m.group(1) for line in proc.stderr.splitlines() if (m := _CONSOLE.search(line))]
    return proc.stdout, console


def screenshot(chromium: str, page: str, png: str, width: int = 900, height: int = 2300) -> list[str]:
    """Writes a screenshot of `page` to `png`; returns the console messages."""
    _, console = load(chromium, page, f"--screenshot={os.path.abspath(png)}", f"--window-size={width},{height}")
    return console


if __name__ == "__main__":
    browser = find_chromium()
    if browser is None:
        sys.exit("no chromium here: apt-get install chromium")
    messages = screenshot(browser, sys.argv[1], sys.argv[2])
    print("\n".join(messages) or f"{sys.argv[2]} written; no console messages")
