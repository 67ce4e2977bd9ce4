"""A screenshot of each tab of the viewer, for docs/: ``python -m viewer.screenshots [--root DIR] [--out docs]``.

Serves ``viewer.app.create_app(root)`` (``root``: the project whose artifacts to show, default this checkout) on
127.0.0.1 in this process, opens it in Debian's headless Chromium through Playwright, and writes
``viewer-runs.png`` (a box selection in the UMAP, one question open), ``viewer-questions.png``,
``viewer-results.png`` and ``viewer-experiments.png`` into ``--out``. docs/viewer.md links them. The server
is always stopped.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from pathlib import Path

import panel as pn

from viewer.app import PROJECT_ROOT, create_app, warm_up

log = logging.getLogger(__name__)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
TIMEOUT_MS = 120_000
WIDTH, HEIGHT = 1400, 1100
IDLE_JS = "() => window.Bokeh && Bokeh.documents.length > 0 && Bokeh.documents[0].is_idle"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def take(root: Path, out: Path) -> list[Path]:
    """Write the three screenshots of the viewer over ``root`` into ``out``; returns their paths."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    warm_up(root)
    port = _free_port()
    pn.serve({"app": lambda: create_app(root)}, port=port, address="127.0.0.1", show=False, threaded=True,
                      websocket_origin=[f"127.0.0.1:{port}"])
    written = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": WIDTH, "height": HEIGHT})
                page.goto(f"http://127.0.0.1:{port}/app", timeout=TIMEOUT_MS)
                page.wait_for_selector("div.run-count", timeout=TIMEOUT_MS)
                page.wait_for_function(IDLE_JS, timeout=TIMEOUT_MS)
                page.wait_for_timeout(1500)
                _select_and_open(page)
                written.append(_shot(page, out / "viewer-runs.png"))
                page.locator(".bk-tab", has_text="Questions").click()
                page.locator(".question-scatter canvas").first.wait_for(timeout=TIMEOUT_MS)
                page.wait_for_timeout(1500)
                written.append(_shot(page, out / "viewer-questions.png"))
                page.locator(".bk-tab", has_text="Results").click()
                page.locator(".metrics-table .tabulator-row").first.wait_for(timeout=TIMEOUT_MS)
                page.locator(".results-loading").first.wait_for(state="detached", timeout=TIMEOUT_MS)
                page.wait_for_timeout(1500)
                written.append(_shot(page, out / "viewer-results.png"))
                page.locator(".bk-tab", has_text="Experiments").click()
                page.locator(".experiments-message").wait_for(timeout=TIMEOUT_MS)
                page.wait_for_timeout(1000)
                written.append(_shot(page, out / "viewer-experiments.png"))
            finally:
                browser.close()
    finally:
        pn.state.kill_all_servers()  # stops `server` (its thread) and any other this process started
    return written


def _select_and_open(page) -> None:
    """Drag a box over the left half of the UMAP and open the first selected run's question."""
    umap = page.locator(".umap-plot canvas").first
    box = umap.bounding_box()
    if box is None:
        return
    page.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.15)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.45, box["y"] + box["height"] * 0.85, steps=8)
    page.mouse.up()
    rows = page.locator(".selection-table .tabulator-row")
    try:
        rows.first.wait_for(timeout=30_000)
        rows.first.locator(".tabulator-cell").nth(4).click()
        page.locator(".question-runs .tabulator-row").first.wait_for(timeout=30_000)
    except Exception:  # noqa: BLE001 - nothing selectable there: the screenshot shows the page without a question
        log.warning("no run under the box: the Runs screenshot has no question open")
    page.wait_for_timeout(1000)


def _shot(page, path: Path) -> Path:
    page.screenshot(path=str(path), full_page=True)
    log.info("wrote %s", path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=PROJECT_ROOT, help="the project whose run to show")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs", help="where the PNGs go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)", file=sys.stderr)
        return 1
    for path in take(args.root.resolve(), args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
