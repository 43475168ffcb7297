"""Render an HTML report in headless Chromium and save a PNG screenshot of it.

    python scripts/screenshot_report.py REPORT.html SCREENSHOT.png [--width 1400] [--height 3000]

Uses Debian's `chromium` (or `chromium-browser`, `google-chrome`) from PATH; exits 3 when none
is installed. The page is self-contained (plots are embedded PNGs), so nothing is fetched.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
NO_BROWSER = 3


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(report: Path, out: Path, width: int = 1400, height: int = 3000, timeout_s: float = 120.0) -> Path:
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError(f"no headless browser found (tried {', '.join(BROWSERS)}); apt-get install chromium")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kftune-chromium-") as profile:
        cmd = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={out.resolve()}",
            report.resolve().as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
        raise RuntimeError(f"{browser} failed ({proc.returncode}): {proc.stderr[-1500:]}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=3000)
    args = p.parse_args(argv)
    if not args.report.is_file():
        print(f"error: {args.report}: no such file", file=sys.stderr)
        return 2
    try:
        print(screenshot(args.report, args.output, args.width, args.height))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return NO_BROWSER
    return 0


if __name__ == "__main__":
    sys.exit(main())
