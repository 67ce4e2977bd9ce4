"""`dvc plots diff` of the committed plot CSVs draws readable charts in a browser without any network request.

The repository's `.dvc/config` sets `plots.html_template` to `.dvc/plots/offline.html`, which carries vega,
vega-lite and vega-embed inline, and dvc.yaml's plots use the templates in `.dvc/plots/` (one line per
probe position or score, a panel per split, dashes per revision). The page is opened in headless Chromium with
every request recorded, and any request that is not for a local file or 127.0.0.1 is aborted and reported.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest
from dvc_project import ROOT, init_repository, sh
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]
PLOTS = ["artifacts/plots/auroc_by_layer.csv", "artifacts/plots/roc.csv", "artifacts/plots/early_warning.csv",
         "artifacts/plots/risk_coverage.csv", "artifacts/plots/reliability.csv", "artifacts/plots/stability.csv"]
# chart title -> labels its legend / panel headers must show
CHART_LABELS = {
    "AUROC per layer": ("tbg", "think_end", "slt", "HEAD", "workspace", "val", "test", "ood"),
    "ROC curves": ("accuracy_probe", "se_probe", "semantic_entropy", "HEAD", "workspace", "test", "ood"),
    "How early": ("accuracy", "se", "test", "ood"),
    "Risk-coverage": ("accuracy_probe", "negative_sequence_loglik", "test", "ood"),
    "Reliability": ("accuracy_probe", "accuracy_range_probe", "test", "ood"),
    "Stability": ("accuracy_probe", "semantic_entropy", "test", "ood"),
}


def is_local(url: str) -> bool:
    parsed = urlparse(url)
    return parsed.scheme in ("file", "data", "about", "blob") or parsed.hostname == "127.0.0.1"


@pytest.fixture
def plots_project(tmp_path) -> Path:
    """A git + DVC repository holding this repo's dvc.yaml, params, DVC settings and committed plot CSVs."""
    project = tmp_path / "project"
    (project / "artifacts/plots").mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", *PLOTS):
        shutil.copy(ROOT / name, project / name)
    return init_repository(project, "committed plots")


def test_plots_diff_page_renders_offline(plots_project):
    # A second revision in the workspace: every AUROC a little lower, the ROC curves unchanged.
    by_layer = pd.read_csv(plots_project / PLOTS[0])
    by_layer["auroc"] = by_layer["auroc"] - 0.02
    by_layer.to_csv(plots_project / PLOTS[0], index=False)

    result = sh("dvc", "plots", "diff", "-o", "plots_page", cwd=plots_project)
    page_path = plots_project / "plots_page/index.html"
    assert page_path.as_uri() in result.stdout
    html = page_path.read_text()
    assert not re.search(r"<script[^>]*\bsrc\s*=", html, re.IGNORECASE), "the page loads a script from a file or URL"

    assert CHROMIUM.exists(), f"{CHROMIUM} missing: `apt-get install -y chromium` (as .ci/run does)"
    requests, blocked, errors = [], [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            context = browser.new_context()

            def guard(route):
                if is_local(route.request.url):
                    route.continue_()
                else:
                    blocked.append(route.request.url)
                    route.abort()

            context.route("**/*", guard)
            page = context.new_page()
            page.on("request", lambda request: requests.append(request.url))
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(page_path.as_uri())
            try:
                page.wait_for_function(f"document.querySelectorAll('.vega-embed svg.marks').length >= {len(PLOTS)}",
                                       timeout=30_000)
            except PlaywrightTimeout:
                errors.append(f"fewer than {len(PLOTS)} vega charts rendered within 30 s")
            charts = page.locator(".vega-embed svg.marks")
            chart_text = [charts.nth(i).text_content() for i in range(charts.count())]
        finally:
            browser.close()

    assert not blocked, f"the page tried to reach the network: {blocked}"
    assert requests and all(is_local(url) for url in requests), requests
    assert not errors, f"console errors: {errors}"
    # Legends name every series (and both revisions where they differ); panel headers name the splits.
    for title, labels in CHART_LABELS.items():
        chart = next((text for text in chart_text if title in text), None)
        assert chart, f"no chart titled {title!r}: {[t[:60] for t in chart_text]}"
        for label in labels:
            assert label in chart, f"{label!r} missing from the {title!r} chart"
