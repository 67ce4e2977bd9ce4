"""Benchmark: the served viewer in headless Chromium, on a synthetic 100k-run table and a default-size one.

Run: ``python tests/benchmarks/bench_viewer.py [--sizes 7000,100000] [--repeats 5] [--compare DIR]``

For each table size it starts the server ``--repeats`` times (``panel serve``, as README deploys it; ``--warm``
serves with ``panel serve --warm``) and measures, in one fresh browser page per start:

- server ready: process start until the server answers (without ``--warm`` it serves at once and the first page
  pays the imports and the read; with ``--warm``, after loading the run and rendering one page for nobody); with
  ``--warm``, split into the launcher's phases
  (``panel serve`` start-up, the viewer's imports, its warm-up, the first ``create_app``, the rest of the page);
- first render (the server's first page) and first render on the running server (the median of ``--pages`` more
  pages, each a new browser page, so its scripts are fetched again): ``page.goto`` until both plots have drawn
  (Bokeh document idle, both plots holding data), split into the page's HTML arriving (the server builds the
  session, and without ``--warm`` imports the viewer and reads the run first), the scripts loaded (``load`` event)
  and the rest (websocket, Bokeh building and drawing the views);
- filter change: click "incorrect" / "all" in the sidebar until the last plot data source changed in the page
  (measured in the browser: a requestAnimationFrame loop timestamps every change of the plots' data);
- server memory: RSS of the server process after the filter changes (psutil), and the bytes the page downloaded;
- Results: a click on the tab until its tables show and until the first plot tab has drawn; then each other plot
  tab, clicked as soon as the one before has drawn, until its figures show (median and slowest), and the total until
  every plot tab has been seen (RSS again after).

``--compare DIR`` also serves the ``viewer`` package found in DIR (e.g. a copy of an earlier version), alternating
the two start by start in the same run, so that a machine shared with other work slows both alike; it prints both
medians and their ratio (``--compare-warm`` serves it with ``--warm``, as README deployed that version).
Asserts nothing about time. Needs Debian's chromium (``apt-get install chromium``) and
Playwright.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from viewer_support import RESULT_TABS, ViewerServer, launch_chromium, synthetic_analysis, write_viewer_project  # noqa: E402

TIMEOUT_MS = 60_000
PLOT_TITLES = ("Probe margin vs entropy", "UMAP of hidden states")

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

# True once the Bokeh document is idle and both point plots (found by title) draw a data source holding data.
PLOTS_DRAWN_JS = """(titles) => {
  if (!(window.Bokeh && Bokeh.documents.length > 0 && Bokeh.documents[0].is_idle)) return false;
  const filled = new Set(); const seen = new Set();
  const rows = (source) => {
    const data = source.data; const keys = data instanceof Map ? [...data.keys()] : Object.keys(data);
    return keys.length ? (data instanceof Map ? data.get(keys[0]) : data[keys[0]]).length : 0;
  };
  const walk = (view) => {
    if (!view || seen.has(view)) return; seen.add(view);
    const title = view.model && view.model.title && view.model.title.text;
    if (titles.includes(title) && view.model.renderers.some(r => r.data_source && rows(r.data_source) > 0)) {
      filled.add(title);
    }
    for (const child of (view.child_views ?? [])) walk(child);
  };
  for (const root of Bokeh.index.roots) walk(root);
  return filled.size === titles.length;
}"""

# The titles of every drawn figure in the page.
FIGURE_TITLES_JS = """() => { const titles = []; const seen = new Set();
  const walk = (view) => { if (!view || seen.has(view)) return; seen.add(view);
    if (view.frame && view.model.title) titles.push(view.model.title.text);
    for (const child of (view.child_views ?? [])) walk(child); };
  for (const root of Bokeh.index.roots) walk(root); return titles; }"""

PAGE_TIMES_JS = """() => {
  const nav = performance.getEntriesByType("navigation")[0];
  const bytes = performance.getEntriesByType("resource").reduce((sum, r) => sum + (r.encodedBodySize || 0),
                                                                nav.encodedBodySize || 0);
  return {html: nav.responseEnd, loaded: nav.loadEventEnd, now: performance.now(), bytes};
}"""


def in_view(page) -> int:
    return int(page.locator("div.run-count .count").inner_text().replace(",", ""))


def measure_filter_change(page, button: str, expected: int) -> float:
    """Seconds from the click until the last plot update it caused reached the page."""
    start = page.evaluate("performance.now()")
    page.get_by_role("button", name=button, exact=True).click()
    page.wait_for_function(f"() => window.__lastPlotChange > {start}", timeout=TIMEOUT_MS)
    # settled: no plot change for 400 ms, and the count shows the new number
    page.wait_for_function("() => performance.now() - window.__lastPlotChange > 400", timeout=TIMEOUT_MS)
    assert in_view(page) == expected, (in_view(page), expected)
    return (page.evaluate("window.__lastPlotChange") - start) / 1000


def server_phases(server: ViewerServer) -> dict[str, float]:
    """Seconds per start-up phase, from the launcher's first "viewer-phase" lines and the ready time."""
    first: dict[str, float] = {}
    for name, at in server.phases():
        first.setdefault(name, at)
    marks = [("  panel serve start-up", "script"), ("  viewer imports", "imports"), ("  viewer warm_up", "warm_up"),
             ("  create_app + page build", "create_app")]
    phases, before = {}, 0.0
    for label, name in marks:
        if name in first:
            phases[label] = first[name] - before
            before = first[name]
    if phases:
        phases["  rest (serve)"] = server.ready_s - before
    return phases


def first_page_phases(server: ViewerServer) -> dict[str, float]:
    """Without ``--warm``: seconds of the first page's HTML spent in the launcher's phases (the script runs first
    for that page: the viewer's imports, reading the run, then ``create_app``; the rest is Panel's session)."""
    first: dict[str, float] = {}
    for name, at in server.phases():
        first.setdefault(name, at)
    if not {"script", "imports", "warm_up", "create_app"} <= first.keys():
        return {}
    return {"    viewer imports": first["imports"] - first["script"],
            "    read the run (warm_up)": first["warm_up"] - first["imports"],
            "    create_app + page build": first["create_app"] - first["warm_up"]}


def wait_for_figure(page, title: str) -> None:
    page.wait_for_function(f"() => ({FIGURE_TITLES_JS})().includes({title!r})", timeout=2 * TIMEOUT_MS)


def open_page(browser, url: str):
    """A new browser page at ``url``; returns it, the seconds until both plots have drawn, and PAGE_TIMES_JS."""
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    start = time.perf_counter()
    page.goto(url, timeout=TIMEOUT_MS)
    page.wait_for_selector("div.run-count", timeout=TIMEOUT_MS)
    page.wait_for_function(PLOTS_DRAWN_JS, arg=list(PLOT_TITLES), timeout=TIMEOUT_MS)
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
    return page, time.perf_counter() - start, page.evaluate(PAGE_TIMES_JS)


def one_start(browser, root: Path, code_root: Path, warm: bool, changes: int, total: int,
              incorrect: int, pages: int) -> dict[str, float]:
    results: dict[str, float] = {}
    with ViewerServer(root, ready_timeout_s=120, warm=warm, code_root=code_root) as server:
        results["server ready s"] = server.ready_s
        results.update(server_phases(server))
        page, first_render, times = open_page(browser, server.url)
        results["first render s"] = first_render
        results["  page HTML (server builds the session)"] = times["html"] / 1000
        if not warm:
            results.update(first_page_phases(server))
        results["  scripts loaded"] = (times["loaded"] - times["html"]) / 1000
        results["  websocket, Bokeh views, drawing"] = first_render - times["loaded"] / 1000
        results["ready + first render s"] = server.ready_s + first_render
        results["page download MB"] = times["bytes"] / 1e6
        assert in_view(page) == total
        # The target's case: a user opening the page on a server that is already running (imports, the read and
        # datashader's compiling are done). Each page is a new browser page, so it downloads every script again.
        renders = defaultdict(list)
        for _ in range(pages):
            page.close()
            page, render, times = open_page(browser, server.url)
            renders["first render, running server s"].append(render)
            renders["  page HTML (server builds the session) "].append(times["html"] / 1000)
            renders["  scripts loaded "].append((times["loaded"] - times["html"]) / 1000)
            renders["  websocket, Bokeh views, drawing "].append(render - times["loaded"] / 1000)
        results.update({name: statistics.median(values) for name, values in renders.items()})
        page.evaluate(WATCH_PLOTS_JS)
        filter_changes = []
        for change in range(changes):
            button, expected = ("incorrect", incorrect) if change % 2 == 0 else ("all", total)
            filter_changes.append(measure_filter_change(page, button, expected))
        results["filter change s"] = statistics.median(filter_changes)
        results["server RSS MiB"] = psutil.Process(server.process.pid).memory_info().rss / 2**20
        start = time.perf_counter()
        page.locator(".bk-tab", has_text="Results").click()
        page.locator(".metrics-table .tabulator-row").first.wait_for(timeout=TIMEOUT_MS)
        results["Results tables s"] = time.perf_counter() - start
        tabs = iter(RESULT_TABS.items())
        _, title = next(tabs)
        wait_for_figure(page, title)
        results["Results first plot tab s"] = time.perf_counter() - start
        if page.locator(".result-plots").count():
            switches = []
            for tab, title in tabs:  # each other tab, clicked as soon as the one before has drawn
                clicked = time.perf_counter()
                page.locator(".result-plots").get_by_text(tab, exact=True).click()
                wait_for_figure(page, title)
                switches.append(time.perf_counter() - clicked)
            results["Results: another plot tab (median) s"] = statistics.median(switches)
            results["Results: slowest other plot tab s"] = max(switches)
        else:  # a version drawing every plot on one page (before the plot tabs)
            for _, title in tabs:
                wait_for_figure(page, title)
        results["Results: every plot seen s"] = time.perf_counter() - start
        results["server RSS after Results MiB"] = psutil.Process(server.process.pid).memory_info().rss / 2**20
        page.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="7000,100000", help="table sizes (runs), comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="server starts per size (and per version)")
    parser.add_argument("--changes", type=int, default=6, help="filter changes per server start")
    parser.add_argument("--pages", type=int, default=3, help="pages opened on the running server after the first")
    parser.add_argument("--warm", action="store_true", help="serve with `panel serve --warm`")
    parser.add_argument("--compare", type=Path, help="a directory holding another `viewer` package to compare")
    parser.add_argument("--compare-warm", action="store_true", help="serve the compared version with `--warm`")
    parser.add_argument("--both-warm-modes", action="store_true",
                        help="serve this checkout both with and without --warm (alternating)")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    warm = args.warm
    # label -> (checkout holding `viewer`, serve with --warm); the first is the reference of the ratio column
    versions = {"compared": (args.compare.resolve(), warm or args.compare_warm)} if args.compare else {}
    versions["this"] = (ROOT, warm)
    if args.both_warm_modes:
        versions["this-other"] = (ROOT, not warm)

    # results[size][version][metric] -> one value per start
    results: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="bench-viewer-") as directory:
        browser = launch_chromium(playwright)
        try:
            for size in sizes:
                table = synthetic_analysis(n_questions=size // 10, runs_per_question=10, seed=0)
                incorrect, total = int((~table["correct"]).sum()), len(table)
                root = write_viewer_project(Path(directory) / str(size), table)
                for repeat in range(args.repeats):
                    for version, (code_root, version_warm) in versions.items():
                        start = one_start(browser, root, code_root, version_warm, args.changes, total, incorrect,
                                          args.pages)
                        for name, value in start.items():
                            results[size][version][name].append(value)
                        print(f"{size:,} runs, {version}, start {repeat + 1}: ready + first render "
                              f"{start['ready + first render s']:.2f} s", flush=True)
        finally:
            browser.close()

    print(f"\nviewer, medians ({args.repeats} server starts per size and version, {args.changes} filter changes each; "
          f"{psutil.cpu_count()} CPUs, load average {' / '.join(f'{load:.1f}' for load in psutil.getloadavg())} "
          "over 1 / 5 / 15 min at the end); ratio: each version / the first")
    labels = {version: f"{version} ({'' if version_warm else 'no '}--warm)"
              for version, (_, version_warm) in versions.items()}
    for size in sizes:
        names = list(dict.fromkeys(name for version in versions for name in results[size][version]))
        header = "".join(f"{labels[version]:>24s}" for version in versions)
        print(f"\n{f'{size:,} runs':42s}{header}")
        for name in names:
            medians = [statistics.median(results[size][version][name]) if results[size][version][name]
                       else float("nan") for version in versions]
            cells = [f"{value:10.3f}" + (f" ({value / medians[0]:4.2f}x)" if index and medians[0] else " " * 8)
                     for index, value in enumerate(medians)]
            print(f"{name:42s}" + "".join(f"{cell:>24s}" for cell in cells))


if __name__ == "__main__":
    main()
