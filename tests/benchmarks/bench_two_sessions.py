"""Benchmark: how long a second session's filter change waits while a first session opens Results or Early exit.

Run: ``python tests/benchmarks/bench_two_sessions.py [--runs 7000] [--text-chars 4000] [--rounds 3] [--compare DIR]``

One synthetic project (``--runs`` runs, each run's reasoning ``--text-chars`` long in runs/*.parquet, early-exit
outputs included; tests/viewer_support.py). Per server start: session B loads the page; then per round a new
session A loads it, and B's filter click ("incorrect" / "all") is timed, in the browser, until B's scatter has
redrawn with the filtered runs: once right after A clicks Results, once right after A clicks Early exit.
``--compare DIR`` also serves the ``viewer`` package found in DIR (e.g. the code before a change), alternating the
two, so that a machine shared with other work slows both alike. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from viewer_support import (  # noqa: E402
    ViewerServer,
    launch_chromium,
    synthetic_analysis,
    write_early_exit_outputs,
    write_viewer_project,
)

TIMEOUT_MS = 120_000
# Runs drawn by the margin-vs-entropy scatter's base layers (sources with a `runs` column, no `ring`, no `umap_x`).
SCATTER_RUNS_JS = """() => {
  let runs = 0;
  for (const model of Bokeh.documents[0].all_models) {
    if (model.constructor.__name__ !== "ColumnDataSource") continue;
    const data = model.data; const get = (key) => data instanceof Map ? data.get(key) : data[key];
    const keys = data instanceof Map ? [...data.keys()] : Object.keys(data);
    if (!keys.includes("runs") || keys.includes("ring") || keys.includes("umap_x") || keys.includes("run_id")) continue;
    runs += [...get("runs")].reduce((sum, k) => sum + Number(k), 0);
  }
  return runs;
}"""


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(url, timeout=TIMEOUT_MS)
    page.wait_for_selector("div.run-count", timeout=TIMEOUT_MS)
    return page


def timed_filter(page, button: str, runs: int) -> float:
    """Seconds from a click on the filter ``button`` until the scatter draws ``runs`` runs."""
    started = time.perf_counter()
    page.get_by_role("button", name=button, exact=True).click()
    page.wait_for_function(f"() => ({SCATTER_RUNS_JS})() === {runs}", timeout=TIMEOUT_MS)
    return time.perf_counter() - started


def measure(browser, root: Path, code_root: Path, rounds: int, counts: dict[str, int]) -> dict[str, list[float]]:
    waits: dict[str, list[float]] = {"alone": [], "A opens Results": [], "A opens Early exit": []}
    with ViewerServer(root, warm=True, ready_timeout_s=300, code_root=code_root) as server:
        second = open_page(browser, server.url)
        second.wait_for_function(f"() => ({SCATTER_RUNS_JS})() === {counts['all']}", timeout=TIMEOUT_MS)
        for _ in range(rounds):
            waits["alone"].append(timed_filter(second, "incorrect", counts["incorrect"]))
            timed_filter(second, "all", counts["all"])
            first = open_page(browser, server.url)
            first.locator(".bk-tab", has_text="Results").click()
            waits["A opens Results"].append(timed_filter(second, "incorrect", counts["incorrect"]))
            first.locator(".bk-tab", has_text="Early exit").click()
            waits["A opens Early exit"].append(timed_filter(second, "all", counts["all"]))
            first.close()
        second.close()
    return waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7000, help="runs in the synthetic project (5 per question)")
    parser.add_argument("--text-chars", type=int, default=4000, help="characters of each run's reasoning text")
    parser.add_argument("--rounds", type=int, default=3, help="sessions A per server start")
    parser.add_argument("--starts", type=int, default=1, help="server starts per version")
    parser.add_argument("--compare", type=Path, help="a directory holding another `viewer` package to compare")
    args = parser.parse_args()
    analysis = synthetic_analysis(args.runs // 5, 5, seed=1)
    counts = {"all": len(analysis), "incorrect": int((~analysis["correct"]).sum())}
    versions = {"this": ROOT, **({"compared": args.compare.resolve()} if args.compare else {})}
    results: dict[str, dict[str, list[float]]] = {name: {} for name in versions}
    with tempfile.TemporaryDirectory() as directory, sync_playwright() as playwright:
        root = write_viewer_project(Path(directory) / "project", analysis)
        write_early_exit_outputs(root, analysis, text_chars=args.text_chars)
        browser = launch_chromium(playwright)
        try:
            for _ in range(args.starts):
                for name, code_root in versions.items():
                    for case, seconds in measure(browser, root, code_root, args.rounds, counts).items():
                        results[name].setdefault(case, []).extend(seconds)
        finally:
            browser.close()
    for name, cases in results.items():
        for case, seconds in cases.items():
            print(f"{name:9} B's filter change, {case:20}: median {statistics.median(seconds):6.2f} s, "
                  f"max {max(seconds):6.2f} s ({', '.join(f'{s:.2f}' for s in seconds)})")


if __name__ == "__main__":
    main()
