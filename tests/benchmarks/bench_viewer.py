"""Benchmark: the served viewer in headless Chromium, on a synthetic 100k-run table against a default-size one.

Run: ``python tests/benchmarks/bench_viewer.py [--runs 100000] [--baseline-runs 7000] [--repeats 5]``

For each table size it starts the server ``--repeats`` times (``panel serve --warm``, as README deploys it) and
measures, in one fresh browser page per start:

- server ready: process start until the server answers (with ``--warm``, after loading the run, compiling
  datashader's kernel and rendering one page; ``--no-warm`` starts serving at once and the first page pays);
- first render: ``page.goto`` until both plots have drawn (Bokeh document idle, plot data on the page);
- filter change: click "incorrect" / "all" in the sidebar until the last plot data source changed in the page
  (measured in the browser: a requestAnimationFrame loop timestamps every change of the plots' data);
- server memory: RSS of the server process after the filter changes (psutil).

Prints medians and the ratio against the baseline size measured in the same run; asserts nothing about time
(the machine is shared). Needs Debian's chromium (``apt-get install chromium``) and Playwright.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from viewer_support import ViewerServer, launch_chromium, synthetic_analysis, write_viewer_project  # noqa: E402

TIMEOUT_MS = 60_000

# Installs window.__lastPlotChange: the performance.now() of the last frame in which any plot source changed.
WATCH_PLOTS_JS = """() => {
  const signature = () => {
    const parts = [];
    for (const model of Bokeh.documents[0].all_models) {
      if (model.constructor.__name__ !== "ColumnDataSource") continue;
      const data = model.data;
      const keys = data instanceof Map ? [...data.keys()] : Object.keys(data);
      if (keys.includes("run_id") || keys.length === 0) continue;
      const get = (key) => data instanceof Map ? data.get(key) : data[key];
      let part = model.id + ":" + get(keys[0]).length;
      if (keys.includes("image")) {
        const image = get("image")[0];
        let sum = 0;
        for (let i = 0; image && i < image.length; i += 61) sum += image[i];
        part += ":" + sum;
      }
      parts.push(part);
    }
    return parts.join("|");
  };
  let last = signature();
  window.__lastPlotChange = performance.now();
  const tick = () => {
    const now = signature();
    if (now !== last) { last = now; window.__lastPlotChange = performance.now(); }
    requestAnimationFrame(tick);
  };
  requestAnimationFrame(tick);
}"""

PLOTS_DRAWN_JS = """() => window.Bokeh && Bokeh.documents.length > 0 && Bokeh.documents[0].is_idle &&
  [...Bokeh.documents[0].all_models].filter(m => m.constructor.__name__ === "ColumnDataSource").length >= 8"""


def in_view(page) -> int:
    return int(page.locator("div.run-count .count").inner_text().replace(",", ""))


def measure_filter_change(page, button: str, expected: int) -> float:
    """Seconds from the click until the last plot update it caused reached the page."""
    start = page.evaluate("performance.now()")
    page.get_by_role("button", name=button, exact=True).click()
    page.wait_for_function(f"() => window.__lastPlotChange > {start}",
                           timeout=TIMEOUT_MS)
    # settled: no plot change for 400 ms, and the count shows the new number
    page.wait_for_function("() => performance.now() - window.__lastPlotChange > 400", timeout=TIMEOUT_MS)
    assert in_view(page) == expected, (in_view(page), expected)
    return (page.evaluate("window.__lastPlotChange") - start) / 1000


def bench_size(browser, n_runs: int, repeats: int, changes: int, warm: bool) -> dict[str, list[float]]:
    table = synthetic_analysis(n_questions=n_runs // 10, runs_per_question=10, seed=0)
    incorrect, total = int((~table["correct"]).sum()), len(table)
    results: dict[str, list[float]] = {"server ready s": [], "first render s": [], "ready + first render s": [],
                                       "filter change s": [], "server RSS MiB": []}
    with tempfile.TemporaryDirectory(prefix="bench-viewer-") as directory:
        root = write_viewer_project(Path(directory), table)
        for _ in range(repeats):
            with ViewerServer(root, ready_timeout_s=120, warm=warm) as server:
                page = browser.new_page(viewport={"width": 1500, "height": 1000})
                start = time.perf_counter()
                page.goto(server.url, timeout=TIMEOUT_MS)
                page.wait_for_selector("div.run-count", timeout=TIMEOUT_MS)
                page.wait_for_function(PLOTS_DRAWN_JS, timeout=TIMEOUT_MS)
                page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
                first_render = time.perf_counter() - start
                assert in_view(page) == total
                page.evaluate(WATCH_PLOTS_JS)
                for change in range(changes):
                    button, expected = ("incorrect", incorrect) if change % 2 == 0 else ("all", total)
                    results["filter change s"].append(measure_filter_change(page, button, expected))
                results["server RSS MiB"].append(psutil.Process(server.process.pid).memory_info().rss / 2**20)
                results["server ready s"].append(server.ready_s)
                results["first render s"].append(first_render)
                results["ready + first render s"].append(server.ready_s + first_render)
                page.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000)
    parser.add_argument("--baseline-runs", type=int, default=7_000, help="the default run's size")
    parser.add_argument("--repeats", type=int, default=5, help="server starts per size")
    parser.add_argument("--changes", type=int, default=6, help="filter changes per server start")
    parser.add_argument("--no-warm", action="store_true", help="serve without `panel serve --warm`")
    args = parser.parse_args()

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            baseline = bench_size(browser, args.baseline_runs, args.repeats, args.changes, warm=not args.no_warm)
            large = bench_size(browser, args.runs, args.repeats, args.changes, warm=not args.no_warm)
        finally:
            browser.close()

    print(f"\nviewer, medians ({args.repeats} server starts per size, {args.changes} filter changes each; "
          f"{'without' if args.no_warm else 'with'} --warm; {psutil.cpu_count()} CPUs)")
    print(f"{'':26s} {f'{args.baseline_runs:,} runs':>12s} {f'{args.runs:,} runs':>12s} {'ratio':>7s}")
    for name in baseline:
        low, high = statistics.median(baseline[name]), statistics.median(large[name])
        print(f"{name:26s} {low:12.3f} {high:12.3f} {high / low:7.2f}")


if __name__ == "__main__":
    main()
