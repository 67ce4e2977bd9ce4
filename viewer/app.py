"""The run viewer: `panel serve viewer/app.py` (from anywhere), then open http://localhost:5006/app.

Read-only: it shows the artifacts of the checkout this file lives in (found through its params.yaml `paths:`),
never a path from the URL. Behind a proxy or in an iframe:
`panel serve viewer/app.py --address 0.0.0.0 --port $PORT --allow-websocket-origin=<host:port>`.
This module only assembles the views (viewer/views.py) around one store (viewer/data.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# `panel serve` runs this file as a script: import this checkout's `viewer` and `stages`, not whatever copy an
# editable install elsewhere points at.
if str(PROJECT_ROOT) not in sys.path[:1]:
    sys.path.insert(0, str(PROJECT_ROOT))

# ruff: noqa: E402 (imports after the sys.path line above, on purpose)
import panel as pn
import panel.io.resources as pn_resources

from viewer.data import MissingArtifact, RunStore, load_analysis
from viewer.views import (
    ExperimentsView,
    FilterPanel,
    MarginEntropyScatter,
    QuestionDetails,
    ResultsView,
    SelectionTable,
    UmapExplorer,
    notice,
)

# The Bootstrap template, Tabulator and Bokeh are all served by this server (the Fast templates would fetch a
# Google font): the page loads with no internet, which the browser test checks.
pn.extension("tabulator", sizing_mode="stretch_width")


def _no_mathjax(roots) -> bool:
    return False


# Panel adds Bokeh's MathJax bundle (1.8 MB, the page's largest script) whenever any HTML pane is on the page, in
# case it typesets TeX. Nothing here does (HTML panes default to `disable_math`, the Markdown is our own text), and
# model output must never be typeset; Bokeh's own check (math text in axes, labels) still applies.
pn_resources._panel_use_mathjax = _no_mathjax

TITLE = "Semantic entropy probes: run viewer"


def create_app(root: Path = PROJECT_ROOT) -> pn.template.BootstrapTemplate:
    """The whole page for the project at ``root``; one per browser session (the loaders are shared and cached)."""
    template = pn.template.BootstrapTemplate(title=TITLE, sidebar_width=330)
    try:
        table = load_analysis(root)
    except MissingArtifact as missing:
        template.main.append(pn.Column(
            notice(f"No run to show. {missing}"),
            pn.pane.Markdown(f"This viewer reads the project at `{root}`; reload this page once the run is there.")))
        return template

    store = RunStore(table)
    experiments = ExperimentsView(root=Path(root))
    tabs = pn.Tabs(
        ("Runs", pn.Column(
            pn.Row(MarginEntropyScatter(store=store), UmapExplorer(store=store), sizing_mode="stretch_width"),
            pn.pane.HTML("<h4>Selection</h4>"), SelectionTable(store=store),
            pn.pane.HTML("<h4>Question</h4>"), QuestionDetails(store=store), sizing_mode="stretch_width")),
        ("Results", ResultsView(root=Path(root))),
        ("Experiments", experiments),
        dynamic=True, sizing_mode="stretch_width")
    # `dvc exp show` takes seconds: ask only once someone opens the tab.
    experiments_tab = 2
    tabs.param.watch(lambda event: experiments.load_once() if event.new == experiments_tab else None, "active")
    template.sidebar.append(FilterPanel(store=store))
    template.main.append(tabs)
    return template


def warm_up(root: Path = PROJECT_ROOT) -> None:
    """Read the run into the loader's cache once per process (`panel serve --warm` does it before serving)."""
    try:
        load_analysis(root)
    except MissingArtifact:
        pass  # the page will say what to run


if __name__.startswith("bokeh"):  # `panel serve viewer/app.py`: this module runs once per browser session
    warm_up()
    create_app().servable(title=TITLE)
