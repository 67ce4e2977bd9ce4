"""The served viewer in a real headless Chromium (Debian's `chromium`, driven by Playwright; `.ci/run` installs it).

One server (`panel serve`, the deployment command, on 127.0.0.1) over a synthetic project of 40 questions x 5 runs
whose question 0 has ``<script>alert(1)</script>`` in its text, answers and think text. One page walks through what
a user does: load, filter, box-select, open a question, open the other tabs. Everything the page requests must stay
on 127.0.0.1, the console must stay free of errors, and no dialog may open. The server and the browser are always
stopped, so pytest exits.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from viewer_support import (
    RESULT_TABS,
    IMG_ANSWER,
    SCRIPT_ANSWER,
    ViewerServer,
    launch_chromium,
    synthetic_analysis,
    write_early_exit_outputs,
    write_viewer_project,
)

sync_api = pytest.importorskip("playwright.sync_api")

if not Path("/usr/bin/chromium").exists() and not shutil.which("chromium"):
    pytest.skip("Debian's chromium is not installed (.ci/run installs it)", allow_module_level=True)

N_QUESTIONS, RUNS = 40, 5
LONG_RUN = 3000  # extra reasoning tokens of question 2's run 0 (synthetic_tokens)
TIMEOUT_MS = 20_000

# Runs drawn by the plots' point sources, read from the page's Bokeh document: every source with a `runs` column
# (how many runs each marker stands for) is a layer of stacked runs; `*_points` sums the runs of the base layers,
# `*_selected` those of the selection's layer (its `ring` column). The UMAP's sources have `umap_x`.
PLOT_ROWS_JS = """() => {
  const rows = {}; const seen = new Set();
  const count = (data) => {
    const get = (key) => data instanceof Map ? data.get(key) : data[key];
    const keys = data instanceof Map ? [...data.keys()] : Object.keys(data);
    if (keys.includes("accuracy") && keys.includes("n_runs")) {  // the Questions tab: one point per question
      rows.question_points = (rows.question_points || 0) + get("n_runs").length; return;
    }
    if (!keys.includes("runs") || keys.includes("run_id")) return;
    const plot = keys.includes("umap_x") ? "umap" : "scatter";
    const kind = keys.includes("ring") ? "_selected" : "_points";
    const runs = [...get("runs")].reduce((sum, k) => sum + Number(k), 0);
    rows[plot + kind] = (rows[plot + kind] || 0) + runs;
  };
  const walk = (view) => {  // only what is rendered: the views of the page's roots
    if (!view || seen.has(view)) return; seen.add(view);
    if (view.model && view.model.data_source && view.model.glyph) count(view.model.data_source.data);
    for (const child of (view.child_views ?? [])) walk(child);
    for (const renderer of (view.renderer_views?.values?.() ?? [])) walk(renderer);
  };
  for (const root of Bokeh.index.roots) walk(root);
  return rows;
}"""

# The plot frames (inside the axes) in page coordinates, by plot title.
FRAMES_JS = """() => {
  const frames = {}; const seen = new Set();
  const walk = (view) => {
    if (!view || seen.has(view)) return; seen.add(view);
    if (view.frame && view.frame.bbox && view.canvas_view && view.model.title) {
      const canvas = view.canvas_view.el.getBoundingClientRect(); const box = view.frame.bbox;
      frames[view.model.title.text] = [canvas.left + box.left, canvas.top + box.top, box.width, box.height];
    }
    for (const child of (view.child_views ?? [])) walk(child);
  };
  for (const root of Bokeh.index.roots) walk(root);
  return frames;
}"""

# Page coordinates of the data point (x, y) in the plot titled `title`, through the plot's own scales.
DATA_TO_PAGE_JS = """([title, x, y]) => {
  const seen = new Set(); let found = null;
  const walk = (view) => {
    if (!view || seen.has(view) || found) return; seen.add(view);
    if (view.frame && view.canvas_view && view.model.title && view.model.title.text === title) {
      const canvas = view.canvas_view.el.getBoundingClientRect();
      found = [canvas.left + view.frame.x_scale.compute(x), canvas.top + view.frame.y_scale.compute(y)];
    }
    for (const child of (view.child_views ?? [])) walk(child);
  };
  for (const root of Bokeh.index.roots) walk(root);
  return found;
}"""

# The text of every shown hover tooltip (Bokeh draws its content inside the tooltip's shadow root).
TOOLTIP_TEXT_JS = """() => {
  const deepText = (node) => node.nodeType === Node.TEXT_NODE ? node.textContent :
    [...(node.shadowRoot ? node.shadowRoot.childNodes : []), ...node.childNodes].map(deepText).join(" ");
  const texts = [];
  const walk = (root) => {
    for (const element of root.querySelectorAll("*")) {
      if (element.classList.contains("bk-Tooltip") && element.checkVisibility()) texts.push(deepText(element));
      if (element.shadowRoot) walk(element.shadowRoot);
    }
  };
  walk(document);
  return texts.join("\\n");
}"""

# Elements the payloads would create if they were ever inserted as markup, anywhere (shadow roots included).
INJECTED_ELEMENTS_JS = """() => {
  let found = 0;
  const walk = (root) => {
    for (const element of root.querySelectorAll("*")) {
      if (element.tagName === "IMG" && element.getAttribute("src") === "x") found += 1;
      if (element.tagName === "SCRIPT" && element.textContent.includes("alert(1)")) found += 1;
      if (element.shadowRoot) walk(element.shadowRoot);
    }
  };
  walk(document);
  return found;
}"""

# Any <script> element anywhere in the page (shadow roots included) whose text runs the payload.
INJECTED_SCRIPTS_JS = """() => {
  let found = 0;
  const walk = (root) => {
    for (const element of root.querySelectorAll("*")) {
      if (element.tagName === "SCRIPT" && element.textContent.includes("alert(1)")) found += 1;
      if (element.shadowRoot) walk(element.shadowRoot);
    }
  };
  walk(document);
  return found;
}"""


@pytest.fixture(scope="module")
def analysis():
    return synthetic_analysis(N_QUESTIONS, RUNS, seed=3)


@pytest.fixture(scope="module")
def server(tmp_path_factory, analysis):
    root = write_viewer_project(tmp_path_factory.mktemp("served_project"), analysis, long_run=LONG_RUN)
    # --warm: datashader's kernels are compiled before the first page (viewer.app.warm_up), not during it
    with ViewerServer(root, warm=True, ready_timeout_s=120) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        try:
            yield chromium
        finally:
            chromium.close()


def _count(page) -> tuple[int, int]:
    """(runs in view, runs selected) as the sidebar shows them."""
    text = page.locator("div.run-count").inner_text()
    in_view = int(text.split(" of ")[0].replace(",", ""))
    selected = int(page.locator("div.run-count .selected-count").inner_text().replace(",", ""))
    return in_view, selected


def _wait_for_rows(page, timeout_ms: float = TIMEOUT_MS, **expected):
    try:
        page.wait_for_function(f"() => {{ const rows = ({PLOT_ROWS_JS})(); const want = {expected!r};"
                               " return Object.entries(want).every(([k, v]) => (rows[k] || 0) === v); }",
                               timeout=timeout_ms)
    except sync_api.TimeoutError:
        raise AssertionError(f"plots show {page.evaluate(PLOT_ROWS_JS)}, expected {expected}") from None


def _box_select(page, title: str, inset: float = 6):
    """Drag a box-select over the frame of the plot titled ``title``, ``inset`` pixels inside its edges.

    The axes are padded by 5% of the data's range, so every run lies inside such a box.
    """
    left, top, width, height = page.evaluate(FRAMES_JS)[title]
    page.mouse.move(left + inset, top + inset)
    page.mouse.down()
    page.mouse.move(left + width / 2, top + height / 2, steps=4)
    page.mouse.move(left + width - inset, top + height - inset, steps=4)
    page.mouse.up()


def test_served_viewer_in_chromium(server, browser, analysis):
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    requests, console_errors, dialogs = [], [], []
    page.on("request", lambda request: requests.append(request.url))
    page.on("console", lambda message: console_errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: console_errors.append(str(error)))
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    total = len(analysis)
    try:
        # Load (URL parameters naming other paths change nothing), and wait until both plots have drawn every run.
        page.goto(f"{server.url}?root=/etc&analysis=/etc/passwd&path=..%2F..%2Fetc", timeout=TIMEOUT_MS)
        page.wait_for_selector("div.run-count", timeout=TIMEOUT_MS)
        page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0 && Bokeh.documents[0].is_idle",
                               timeout=TIMEOUT_MS)
        _wait_for_rows(page, scatter_points=total, umap_points=total)
        assert _count(page) == (total, 0)
        assert page.locator(".scatter-plot canvas").count() > 0 and page.locator(".umap-plot canvas").count() > 0

        # A filter changes the count and both plots.
        incorrect = int((~analysis["correct"]).sum())
        assert 0 < incorrect < total
        page.get_by_role("button", name="incorrect", exact=True).click()
        _wait_for_rows(page, scatter_points=incorrect, umap_points=incorrect)
        assert _count(page)[0] == incorrect

        # Box-select in the scatter: the selection shows in the UMAP and fills the table.
        _box_select(page, "Probe margin vs entropy")
        _wait_for_rows(page, scatter_selected=incorrect, umap_selected=incorrect)
        assert _count(page) == (incorrect, incorrect)
        page.locator(".selection-caption", has_text=f"{incorrect} selected runs").wait_for(timeout=TIMEOUT_MS)
        assert page.locator(".selection-table .tabulator-row").count() > 0

        # Back to all runs, search the question whose text carries the payload, select it in the UMAP.
        page.get_by_role("button", name="all", exact=True).click()
        search = page.get_by_placeholder("text or id, Enter")
        search.fill("alert(1)")
        search.press("Enter")
        _wait_for_rows(page, scatter_points=RUNS, umap_points=RUNS)
        _box_select(page, "UMAP of hidden states")
        _wait_for_rows(page, scatter_selected=RUNS, umap_selected=RUNS)
        page.locator(".selection-caption", has_text=f"{RUNS} selected runs").wait_for(timeout=TIMEOUT_MS)
        table_rows = page.locator(".selection-table .tabulator-row")
        assert table_rows.count() == RUNS
        assert SCRIPT_ANSWER in table_rows.first.inner_text()  # shown as text, not run

        # Open the question: its K runs grouped by semantic cluster, the payload as text everywhere.
        table_rows.first.locator(".tabulator-cell").nth(4).click()
        details = page.locator(".question-runs")
        details.locator(".tabulator-group").first.wait_for(timeout=TIMEOUT_MS)
        assert details.locator(".tabulator-group").count() == 2
        question_text = page.locator(".question-text").inner_text()
        assert SCRIPT_ANSWER in question_text
        cells = details.locator(".tabulator-cell")
        assert cells.filter(has_text="alert(1)").count() == RUNS // 2 + RUNS  # the answers, and every think text
        assert cells.get_by_text(SCRIPT_ANSWER, exact=True).count() == RUNS // 2  # the answer cells, verbatim
        gold = analysis.loc[analysis["question_id"] == "id-00000", "gold"].iloc[0]
        assert page.locator(".question-header .gold").inner_text() == gold
        assert page.evaluate(INJECTED_SCRIPTS_JS) == 0

        # The other tabs render: evaluate's table, the small tables and every plot of Results (each Bokeh plot drawn:
        # its title is in the page's views), and experiments (no DVC repo here: the fallback and why).
        page.locator(".bk-tab", has_text="Results").click()
        page.locator(".metrics-table .tabulator-row").first.wait_for(timeout=TIMEOUT_MS)
        assert page.locator(".metrics-table .tabulator-cell", has_text="0.600 (0.550-0.650)").count() >= 1
        assert page.locator(".metrics-table .tabulator-col", has_text="test AURAC").count() == 1
        for heading in ("Calibration of the accuracy probes' P(correct)", "SE regression probe",
                        "Stability: AUROC across seeds", "ROC curves"):  # the last: the first plot tab's
            assert page.get_by_role("heading", name=heading, exact=True).count() == 1, heading
        assert page.locator(".calibration-table tbody tr").count() == 4
        # ranked, best first and highlighted; the SE probe's high-SE AUROC in its own table; a CSV per table
        first_score = page.locator(".metrics-table .tabulator-row").first.locator(
            ".tabulator-cell[tabulator-field='score']")
        assert first_score.inner_text() == "se_range_probe"  # the synthetic run's best test AUROC
        # Tabulator may redraw the row after it first shows (a detached cell has no computed style): expect retries
        sync_api.expect(first_score).to_have_css("font-weight", re.compile(r"^(700|bold)$"), timeout=TIMEOUT_MS)
        score_cells = ".tabulator-cell[tabulator-field='score']"
        assert page.locator(".other-labels-table tbody td:first-child", has_text="se_probe_high_se").count() == 1
        assert page.locator(f".metrics-table {score_cells}", has_text="se_probe_high_se").count() == 0
        assert page.get_by_role("button", name="CSV: scores.csv").count() == 1
        assert page.locator(".metrics-table .tabulator-col", has_text="ΔAUROC vs semantic_entropy").count() == 2
        assert page.locator(".cost-ratio", has_text="SE costs 125x a probe evaluation").count() == 1
        # one tab per plot, each drawn when first shown: slower than the tables on a busy machine
        for tab, title in RESULT_TABS.items():
            page.locator(".result-plots").get_by_text(tab, exact=True).click()
            page.wait_for_function(f"() => [{title!r}, {title.replace('ood', 'test')!r}]"
                                   f".every(title => title in ({FRAMES_JS})())", timeout=4 * TIMEOUT_MS)
        page.locator(".bk-tab", has_text="Experiments").click()
        page.locator(".experiments-message").wait_for(timeout=TIMEOUT_MS)
        assert page.locator(".experiments-message", has_text="dvc exp show").count() == 1
    finally:
        page.close()

    assert dialogs == []
    assert console_errors == []
    local = (f"http://127.0.0.1:{server.port}/", f"ws://127.0.0.1:{server.port}/", "blob:", "data:")
    assert requests and [url for url in requests if not url.startswith(local)] == []


def test_viewer_works_inside_an_iframe(server, browser, analysis):
    """The README's embedding: another page frames the served app, and the app still connects and draws."""
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    try:
        page.set_content(f'<iframe src="{server.url}" style="width:1400px;height:900px;border:0"></iframe>')
        frame = page.frame_locator("iframe")
        frame.locator("div.run-count .count").wait_for(timeout=TIMEOUT_MS)
        assert frame.locator("div.run-count .count").inner_text() == f"{len(analysis):,}"
        assert frame.locator(".umap-plot canvas").count() > 0
    finally:
        page.close()


@pytest.mark.parametrize("payload", [IMG_ANSWER, SCRIPT_ANSWER], ids=["img-onerror", "script"])
def test_hover_shows_model_output_as_text(server, browser, analysis, payload):
    """Hovering a run whose question and answer are markup shows that markup as text, and none of it runs."""
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    errors, dialogs = [], []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    run = analysis[analysis["answer"] == payload].iloc[0]
    try:
        page.goto(server.url, timeout=TIMEOUT_MS)
        page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0 && Bokeh.documents[0].is_idle",
                               timeout=TIMEOUT_MS)
        search = page.get_by_placeholder("text or id, Enter")  # only this question's runs in view
        search.fill(run["question_id"])
        search.press("Enter")
        _wait_for_rows(page, scatter_points=RUNS)
        left, top = page.evaluate(DATA_TO_PAGE_JS, ["Probe margin vs entropy", float(run["accuracy_probe_margin"]),
                                                    float(run["semantic_entropy"])])
        page.mouse.move(left - 20, top - 20)
        page.mouse.move(left, top, steps=5)
        page.wait_for_function(f"() => ({TOOLTIP_TEXT_JS})().includes('answer')", timeout=TIMEOUT_MS)
        text = page.evaluate(TOOLTIP_TEXT_JS)
        assert text.count(payload) >= 2, text  # in the question and as the answer, verbatim
        assert page.evaluate(INJECTED_ELEMENTS_JS) == 0
        assert page.evaluate("() => window.__pwned") is None
    finally:
        page.close()
    assert dialogs == [] and errors == []


def test_lasso_selection_is_linked(server, browser, analysis):
    """The lasso (picked in the UMAP's toolbar) selects what it encloses; the scatter rings the same runs."""
    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    try:
        page.goto(server.url, timeout=TIMEOUT_MS)
        page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0 && Bokeh.documents[0].is_idle",
                               timeout=TIMEOUT_MS)
        total = len(analysis)
        _wait_for_rows(page, scatter_points=total, umap_points=total)
        page.locator(".umap-plot .bk-tool-icon-lasso-select").click()
        left, top, width, height = page.evaluate(FRAMES_JS)["UMAP of hidden states"]
        # A triangle over the left half of the frame: the runs left of its centre, some of them.
        corners = [(left + 4, top + 4), (left + width / 2, top + height / 2), (left + 4, top + height - 4)]
        page.mouse.move(*corners[0])
        page.mouse.down()
        for corner in [*corners[1:], corners[0]]:
            page.mouse.move(*corner, steps=8)
        page.mouse.up()
        page.locator(".selection-caption", has_text="selected runs").wait_for(timeout=TIMEOUT_MS)
        selected = _count(page)[1]
        assert 0 < selected < total
        _wait_for_rows(page, scatter_selected=selected, umap_selected=selected)
    finally:
        page.close()


# Figures in the page, and the legends' entries as (label, swatch colour: the fill of the glyph the entry draws).
FIGURES_JS = """() => {
  const seen = new Set(); let figures = 0;
  const walk = (view) => {
    if (!view || seen.has(view)) return; seen.add(view);
    if (view.model && view.model.constructor.__name__ === "Figure" && view.el.isConnected) figures += 1;
    for (const child of (view.child_views ?? [])) walk(child);
  };
  for (const root of Bokeh.index.roots) walk(root);
  return figures;
}"""
LEGENDS_JS = """() => [...Bokeh.documents[0].all_models].filter(m => m.constructor.__name__ === "Legend").map(
  legend => legend.items.map(item => {
    const label = item.label && (item.label.value ?? item.label);
    const glyph = item.renderers.length ? item.renderers[0].glyph : null;
    const fill = glyph && glyph.fill_color && (glyph.fill_color.value ?? glyph.fill_color);
    return [label, fill];
  }))"""


def test_legends_have_swatches_and_redraws_replace_figures(server, browser, analysis):
    """Both run plots carry a legend whose entries draw a marker in the outcome's colour; changing the probe and
    the UMAP's colouring several times leaves the same three figures on the page (no replaced one stays)."""
    from viewer.views.common import OUTCOME_COLOURS

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(server.url, timeout=TIMEOUT_MS)
        page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0 && Bokeh.documents[0].is_idle",
                               timeout=TIMEOUT_MS)
        total = len(analysis)
        _wait_for_rows(page, scatter_points=total, umap_points=total)
        expected = [["correct", OUTCOME_COLOURS["correct"]], ["incorrect", OUTCOME_COLOURS["incorrect"]]]
        assert page.evaluate(LEGENDS_JS) == [expected, expected]
        assert page.evaluate(FIGURES_JS) == 2  # the two run plots (the questions' scatter has its own tab)
        for probe in ("SE probe", "accuracy probe", "SE probe"):
            page.get_by_role("button", name=probe, exact=True).click()
            page.wait_for_timeout(600)
            _wait_for_rows(page, scatter_points=total, umap_points=total)
        page.locator("select").nth(1).select_option(label="semantic entropy")  # the UMAP's "colour by"
        page.wait_for_timeout(800)
        _wait_for_rows(page, scatter_points=total, umap_points=total)
        assert page.evaluate(FIGURES_JS) == 2
        # the Questions tab: one point per question of the runs in view, drawn only once the tab is shown
        questions = analysis.groupby(["dataset", "question_id"]).ngroups
        page.locator(".bk-tab", has_text="Questions").click()
        _wait_for_rows(page, question_points=questions)
        page.get_by_role("button", name="incorrect", exact=True).click()
        _wait_for_rows(page, question_points=analysis.loc[~analysis["correct"]].groupby(
            ["dataset", "question_id"]).ngroups)
    finally:
        page.close()


def test_selection_table_sorts_the_whole_selection_and_downloads_it(server, browser, analysis, tmp_path):
    """Selecting every run lists them a page at a time; a header click sorts all of them on the server (the top
    row is the selection's extreme, not the first page's), train runs say in-sample, and the CSV holds them all."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    try:
        page.goto(server.url, timeout=TIMEOUT_MS)
        page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0 && Bokeh.documents[0].is_idle",
                               timeout=TIMEOUT_MS)
        total = len(analysis)
        _wait_for_rows(page, scatter_points=total, umap_points=total)
        _box_select(page, "UMAP of hidden states")
        page.locator(".selection-caption", has_text=f"{total} selected runs").wait_for(timeout=TIMEOUT_MS)
        rows = page.locator(".selection-table .tabulator-row")
        assert 0 < rows.count() < total  # a page, not everything
        header = page.locator(".selection-table .tabulator-col[tabulator-field='semantic_entropy']")
        header.first.click()  # ascending
        page.wait_for_timeout(1000)
        header.first.click()  # descending
        expected = f"{analysis['semantic_entropy'].max():.3f}"
        column = [cell.inner_text() for cell in page.locator(".selection-table .tabulator-cell[tabulator-field="
                                                             "'semantic_entropy']").all()]
        deadline = 0
        while (not column or column[0] != expected) and deadline < 20:
            page.wait_for_timeout(500)
            deadline += 1
            column = [cell.inner_text() for cell in page.locator(".selection-table .tabulator-cell[tabulator-field="
                                                                 "'semantic_entropy']").all()]
        assert column and column[0] == expected, (column[:3], expected)
        in_sample = page.locator(".selection-table .tabulator-cell", has_text="in-sample (train)")
        held_out = page.locator(".selection-table .tabulator-cell", has_text="held-out")
        assert in_sample.count() + held_out.count() == rows.count()
        with page.expect_download(timeout=TIMEOUT_MS) as download:
            page.get_by_role("button", name="Selection CSV").click()
        saved = tmp_path / "selection.csv"
        download.value.save_as(saved)
        import pandas as pd

        exported = pd.read_csv(saved)
        assert len(exported) == total
        assert set(exported["probe scores"]) == {"in-sample (train)", "held-out"}
        assert (exported["probe scores"] == "in-sample (train)").sum() == (analysis["split"] == "train").sum()
    finally:
        page.close()


def test_results_never_block_another_session(server, browser, analysis):
    """While one page opens Results (tables at once, each plot behind a spinner saying what it draws, figures
    rendered a panel at a time on the event loop), a filter click in a second page still answers promptly."""
    import time

    first = browser.new_page(viewport={"width": 1280, "height": 900})
    second = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        for page in (first, second):
            page.goto(server.url, timeout=TIMEOUT_MS)
            page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0 && Bokeh.documents[0].is_idle",
                                   timeout=TIMEOUT_MS)
        total = len(analysis)
        _wait_for_rows(second, scatter_points=total, umap_points=total)
        first.locator(".bk-tab", has_text="Results").click()
        first.locator(".metrics-table .tabulator-row").first.wait_for(timeout=TIMEOUT_MS)
        loading = first.locator(".results-loading", has_text="Drawing")
        spinners_seen = loading.count()
        started = time.perf_counter()
        second.get_by_role("button", name="incorrect", exact=True).click()
        _wait_for_rows(second, scatter_points=int((~analysis["correct"]).sum()))
        answered_s = time.perf_counter() - started
        assert answered_s < 5.0, f"the second session waited {answered_s:.1f} s for a filter change"
        for tab, title in RESULT_TABS.items():
            first.locator(".result-plots").get_by_text(tab, exact=True).click()
            first.wait_for_function(f"() => {title!r} in ({FRAMES_JS})()", timeout=6 * TIMEOUT_MS)
            assert loading.count() == 0
        print(f"spinners when the tables showed: {spinners_seen}; second session's filter change: {answered_s:.2f} s")
    finally:
        first.close()
        second.close()


SESSION_ROUNDS = 3


def _dvc_queries(pid: int) -> int:
    """How many `dvc exp show` processes the process ``pid`` has running."""
    import psutil

    count = 0
    for child in psutil.Process(pid).children(recursive=True):
        try:
            command = child.cmdline()
        except psutil.Error:  # ended meanwhile
            continue
        count += "dvc" in command and "exp" in command and "show" in command
    return count


def test_sessions_never_break_the_server(tmp_path, browser, analysis):
    """Issue 28: two sessions opening Results and Early exit at once while a third changes filters, several times,
    leave the server serving: a NEW page still renders every run, and the server's log holds no error. (Results drew
    its figures in a worker thread per session; HoloViews turns Bokeh's property validation, one switch for the
    whole process, off and back on around updates, so two overlapping threads left it off, and every later page
    failed in create_app with "'str' object has no attribute 'update'".) Then Experiments' Refresh, clicked 8 times
    in a row, runs one `dvc exp show` at a time. Its own server, so that its log is read whole."""
    import re
    import time

    root = write_viewer_project(tmp_path / "project", analysis)
    write_early_exit_outputs(root, analysis)
    total = len(analysis)
    shown = {"incorrect": int((~analysis["correct"]).sum()), "correct": int(analysis["correct"].sum()), "all": total}
    first_figure = next(iter(RESULT_TABS.values()))

    def open_page(url):
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        pages.append(page)
        page.goto(url, timeout=TIMEOUT_MS)
        page.wait_for_selector("div.run-count", timeout=TIMEOUT_MS)
        return page

    def filter_all_ways(page):
        for name, runs in shown.items():
            page.get_by_role("button", name=name, exact=True).click()
            _wait_for_rows(page, scatter_points=runs, umap_points=runs, timeout_ms=3 * TIMEOUT_MS)

    failure, queries, pages = None, [], []
    with ViewerServer(root, warm=True, ready_timeout_s=120) as running:
        try:
            filterer = open_page(running.url)
            _wait_for_rows(filterer, scatter_points=total, umap_points=total)
            for _ in range(SESSION_ROUNDS):
                openers = [open_page(running.url) for _ in range(2)]
                for opener in openers:
                    opener.locator(".bk-tab", has_text="Results").click()
                filter_all_ways(filterer)  # while the openers' Results draw their figures
                for opener in openers:
                    opener.locator(".bk-tab", has_text="Early exit").click()
                filter_all_ways(filterer)
                for opener in openers:
                    opener.wait_for_function("() => 'Early exit, test: accuracy against tokens' in "
                                             f"({FRAMES_JS})()", timeout=TIMEOUT_MS)
                    opener.locator(".bk-tab", has_text="Results").click()
                    opener.wait_for_function(f"() => {first_figure!r} in ({FRAMES_JS})()", timeout=TIMEOUT_MS)
            fresh = open_page(running.url)
            _wait_for_rows(fresh, scatter_points=total, umap_points=total)

            fresh.locator(".bk-tab", has_text="Experiments").click()
            for _ in range(8):
                fresh.get_by_role("button", name="Refresh").click(force=True)  # force: also while disabled
            for _ in range(30):
                queries.append(_dvc_queries(running.process.pid))
                time.sleep(0.1)
            fresh.locator(".experiments-message").wait_for(timeout=TIMEOUT_MS)
        except (AssertionError, sync_api.Error) as error:
            failure = error
        finally:
            for page in pages:
                page.close()
    # Not: the viewer's note that `dvc exp show` failed (this project is no DVC repository), and tornado's
    # complaints about a page that closed while the server wrote to it.
    errors = [line for line in running.log.splitlines()
              if re.search(r"\w+Error\b|Error running|ERROR|Exception", line)
              and not re.search(r"experiments: |StreamClosedError|WebSocketClosedError", line)]
    assert failure is None and errors == [], f"{failure}\nthe server logged:\n" + "\n".join(errors[:20])
    assert queries and max(queries) <= 1, f"`dvc exp show` processes at once: {queries}"


@pytest.mark.parametrize("value, opens", [("id-00003", True), ("id-99999", False),
                                          ("%3Cimg%20src%3Dx%20onerror%3D%22window.__pwned%3D1%22%3E", False),
                                          ("..%2F..%2Fetc%2Fpasswd", False)],
                         ids=["valid", "unknown", "markup", "path"])
def test_question_link_opens_only_a_question_of_the_run(server, browser, value, opens):
    """`?question=<id>` opens that question's details; an unknown, markup or path value is ignored, and runs
    nothing."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors, dialogs = [], []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    try:
        page.goto(f"{server.url}?question={value}", timeout=TIMEOUT_MS)
        page.wait_for_selector("div.run-count", timeout=TIMEOUT_MS)
        if opens:
            page.locator(".question-header h4", has_text="Question id-00003").wait_for(timeout=TIMEOUT_MS)
            page.locator(".question-runs .tabulator-row").first.wait_for(timeout=TIMEOUT_MS)
        else:
            page.locator(".question-header i", has_text="Open a question").wait_for(timeout=TIMEOUT_MS)
            assert page.locator(".question-header h4").count() == 0
        assert page.evaluate(INJECTED_ELEMENTS_JS) == 0 and page.evaluate("() => window.__pwned") is None
    finally:
        page.close()
    assert errors == [] and dialogs == []


def test_screenshot_script_writes_one_png_per_tab(tmp_path, analysis):
    """`python -m viewer.screenshots` (as the lead runs it on the real run) on a synthetic project."""
    import subprocess
    import sys

    root = write_viewer_project(tmp_path / "project", analysis)
    done = subprocess.run([sys.executable, "-m", "viewer.screenshots", "--root", str(root), "--out",
                           str(tmp_path / "docs")], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("viewer-runs.png", "viewer-questions.png", "viewer-results.png", "viewer-experiments.png"):
        png = (tmp_path / "docs" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000, name


# The drill-down's tokens: (text, title, background) of every token span, and the think box's geometry.
TOKENS_JS = """() => { const found = [];
  const walk = (root) => { for (const el of root.querySelectorAll('*')) {
    if (el.matches('.run-tokens .token')) found.push([el.textContent, el.getAttribute('title'), el.style.background]);
    if (el.shadowRoot) walk(el.shadowRoot); } };
  walk(document); return found; }"""
THINK_BOX_JS = """() => { const find = (root) => { for (const el of root.querySelectorAll('*')) {
    if (el.matches('.think-tokens')) return el; if (el.shadowRoot) { const f = find(el.shadowRoot); if (f) return f; } }
    return null; };
  const details = find(document); if (!details) return null; const box = details.querySelector('.token-box');
  return {open: details.open, height: box.getBoundingClientRect().height, scroll: box.scrollHeight,
          tokens: box.querySelectorAll('.token').length}; }"""


def _open_page(browser, url, width=1280):
    page = browser.new_page(viewport={"width": width, "height": 1000})
    errors, dialogs = [], []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(url, timeout=TIMEOUT_MS)
    page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0 && Bokeh.documents[0].is_idle",
                           timeout=TIMEOUT_MS)
    return page, errors, dialogs


def test_run_drill_down_shows_scores_per_location_and_tokens_by_entropy(server, browser, analysis):
    """Opening a question drills into its first run: one heatmap per single-layer probe over (layer, position),
    and its tokens as spans coloured by entropy with the value in a tooltip; a token that is markup stays text.
    Clicking another run of the question drills into that one; a long think text is a collapsed scroll box."""
    import re

    from stages.lib import registry

    page, errors, dialogs = _open_page(browser, f"{server.url}?question=id-00000")
    try:
        page.locator(".run-header h4", has_text="of question id-00000").wait_for(timeout=TIMEOUT_MS)
        titles = [f"{probe.name} probe: " for probe in registry.layer_probes()]
        page.wait_for_function(f"() => {{ const shown = Object.keys(({FRAMES_JS})()); return {titles!r}.every("
                               "t => shown.some(s => s.startsWith(t))); }", timeout=TIMEOUT_MS)
        spans = page.evaluate(TOKENS_JS)
        assert spans, "no token spans"
        assert [text for text, _, _ in spans].count(SCRIPT_ANSWER) >= 1  # the payload token, as text
        assert all(re.fullmatch(r"\d+\.\d{3} nats", title) for _, title, _ in spans), spans[:3]
        assert len({background for _, _, background in spans}) > 2  # entropies give several colours
        assert page.evaluate(INJECTED_ELEMENTS_JS) == 0

        # another run of the question: the header and the tokens follow
        shown = page.locator(".run-header h4").inner_text()
        rows = page.locator(".question-runs .tabulator-row")
        rows.nth(1).locator(".tabulator-cell[tabulator-field='run_id']").click()
        page.wait_for_function(f"() => !document.body.innerText.includes({shown!r})", timeout=TIMEOUT_MS)
        assert "of question id-00000" in page.locator(".run-header h4").inner_text()
    finally:
        page.close()
    assert errors == [] and dialogs == []

    page, errors, dialogs = _open_page(browser, f"{server.url}?question=id-00002")
    try:
        page.locator(".run-header h4", has_text="of question id-00002").wait_for(timeout=TIMEOUT_MS)
        page.locator(".question-runs .tabulator-cell[tabulator-field='run_id']").get_by_text("0", exact=True).click()
        page.locator(".run-header h4", has_text="Run 0 of question id-00002").wait_for(timeout=TIMEOUT_MS)
        page.wait_for_function(f"() => {{ const box = ({THINK_BOX_JS})(); return box && box.tokens > {LONG_RUN}; }}",
                               timeout=TIMEOUT_MS)
        box = page.evaluate(THINK_BOX_JS)
        assert box["open"] is False  # collapsed
        page.locator(".think-tokens summary").click()
        box = page.evaluate(THINK_BOX_JS)
        assert box["open"] and box["height"] <= 340 and box["scroll"] > 3 * box["height"], box  # scrolls in place
    finally:
        page.close()
    assert errors == [] and dialogs == []


def test_click_on_a_run_opens_its_question(server, browser, analysis):
    """A click on a point of the scatter opens that run's question and drills into the run (the Tap stream)."""
    run = analysis[analysis["question_id"] == "id-00005"].iloc[2]
    page, errors, dialogs = _open_page(browser, server.url)
    try:
        search = page.get_by_placeholder("text or id, Enter")
        search.fill(run["question_id"])
        search.press("Enter")
        _wait_for_rows(page, scatter_points=RUNS)
        left, top = page.evaluate(DATA_TO_PAGE_JS, ["Probe margin vs entropy", float(run["accuracy_probe_margin"]),
                                                    float(run["semantic_entropy"])])
        page.mouse.click(left, top)
        page.locator(".question-header h4", has_text="Question id-00005").wait_for(timeout=TIMEOUT_MS)
        page.locator(".run-header h4", has_text="of question id-00005").wait_for(timeout=TIMEOUT_MS)
    finally:
        page.close()
    assert errors == [] and dialogs == []


# Every drawn figure's box in page coordinates (left, right, width) by title, and whether each legend hides on click.
FIGURE_BOXES_JS = """() => {
  const boxes = []; const seen = new Set();
  const walk = (view) => {
    if (!view || seen.has(view)) return; seen.add(view);
    if (view.model && view.model.constructor.__name__ === "Figure" && view.el.isConnected) {
      const box = view.el.getBoundingClientRect();
      if (box.width > 0) boxes.push([view.model.title ? view.model.title.text : "", box.left, box.right, box.width]);
    }
    for (const child of (view.child_views ?? [])) walk(child);
  };
  for (const root of Bokeh.index.roots) walk(root);
  return boxes;
}"""
LEGEND_POLICIES_JS = """() => [...Bokeh.documents[0].all_models].filter(m => m.constructor.__name__ === "Legend"
  && m.visible && m.items.length > 0).map(legend => [legend.id, legend.click_policy])"""


def test_results_fit_a_1280_px_page_and_legends_hide_curves(server, browser):
    """At 1280 px every Results figure lies inside the viewport (no fixed width overflows; the page never scrolls
    sideways), and each legend entry hides its curve when clicked."""
    page, errors, dialogs = _open_page(browser, server.url, width=1280)
    try:
        page.locator(".bk-tab", has_text="Results").click()
        policies = {}
        for tab, title in RESULT_TABS.items():  # each plot tab in turn, its figures only on the page while shown
            page.locator(".result-plots").get_by_text(tab, exact=True).click()
            page.wait_for_function(f"() => {title!r} in ({FRAMES_JS})()", timeout=4 * TIMEOUT_MS)
            page.wait_for_timeout(800)  # the last layout pass
            boxes = page.evaluate(FIGURE_BOXES_JS)
            assert any(box[0] == title for box in boxes), (tab, boxes)
            overflowing = [box for box in boxes if box[2] > 1280 + 1 or box[1] < 0]
            assert overflowing == [], overflowing
            assert page.evaluate("() => document.documentElement.scrollWidth") <= 1280
            policies.update(dict(page.evaluate(LEGEND_POLICIES_JS)))
        # every legend of ROC, risk-coverage, early warning, per layer and reliability hides its curve; only the
        # two run plots' (HoloViews' default, mute; in the document though their tab is not shown) do not
        values = list(policies.values())
        assert values.count("mute") in (0, 2) and values.count("hide") == len(values) - values.count("mute") >= 6, \
            values
    finally:
        page.close()
    assert errors == [] and dialogs == []
