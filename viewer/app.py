"""The run viewer: `panel serve viewer/app.py` (from the repository root or anywhere else), then open
http://localhost:5006/app.

Read-only: it shows the artifacts of the checkout this file lives in (found through its params.yaml `paths:`),
never a path from the URL; the one URL parameter read is ``?question=<id>``, which opens that question when the run
has it and is ignored otherwise. Behind a proxy or in an iframe:
`panel serve viewer/app.py --address 0.0.0.0 --port $PORT --allow-websocket-origin=<host:port>`.
The `viewer` and `stages` packages it imports are the installed ones: `pip install -e ".[viewer]"` in this checkout
(the log warns when the installed copy is another checkout's).
This module only assembles the views (viewer/views/) around one store (viewer/data.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import panel as pn

import viewer
from viewer.views.early_exit import early_exit_layout, early_exit_view, load_early_exit
from stages.lib.schema.machinery import SchemaError
from viewer.loaders import MissingArtifact, load_analysis
from viewer.data import RunStore, question_from_link
from viewer.views.experiments import ExperimentsView
from viewer.views.runs import FilterPanel, RunDrillDown, SelectionTable
from viewer.views.points import MarginEntropyScatter, UmapExplorer
from viewer.views.questions import QuestionDetails, QuestionScatter
from viewer.views.results import ResultsView
from viewer.views.common import notice

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if Path(viewer.__file__).resolve().parents[1] != PROJECT_ROOT:
    log.warning("serving %s with the viewer code of %s (the installed copy); run `pip install -e .` in %s to serve "
                "its own code", PROJECT_ROOT, Path(viewer.__file__).resolve().parents[1], PROJECT_ROOT)

# The Bootstrap template, Tabulator and Bokeh are all served by this server (the Fast templates would fetch a
# Google font): the page loads with no internet, which the browser test checks. Panel also serves Bokeh's MathJax
# bundle whenever an HTML pane is on the page (it has no public setting to leave it out); every pane that could hold
# model output keeps `disable_math` on, so nothing is typeset.
pn.extension("tabulator", sizing_mode="stretch_width")

TITLE = "Semantic entropy probes: run viewer"


def create_app(root: Path = PROJECT_ROOT) -> pn.template.BootstrapTemplate:
    """The whole page for the project at ``root``; one per browser session (the loaders are shared and cached)."""
    template = pn.template.BootstrapTemplate(title=TITLE, sidebar_width=330)
    try:
        table = load_analysis(root)
    except MissingArtifact as missing:
        template.main.append(pn.Column(
            notice(f"No run to show. {missing}"),
            pn.pane.Markdown(f"This viewer reads the project at `{root}`; reload this page once the run is there.",
                             disable_math=True)))
        return template

    store = RunStore(table)
    # `?question=<id>` opens that question, if the run has it; any other value is ignored (never used as a path).
    linked = question_from_link(table, (pn.state.session_args or {}).get("question")) if pn.state.curdoc else None
    if linked is not None:
        store.open_question(*linked)
    experiments = ExperimentsView(root=Path(root))
    tabs = pn.Tabs(
        ("Runs", pn.Column(
            pn.Row(MarginEntropyScatter(store=store), UmapExplorer(store=store), sizing_mode="stretch_width"),
            pn.pane.HTML("<h4>Selection</h4>"), SelectionTable(store=store),
            pn.pane.HTML("<h4>Question</h4>"), QuestionDetails(store=store),
            pn.pane.HTML("<h4>Run</h4>"), RunDrillDown(store=store, root=Path(root)),
            sizing_mode="stretch_width")),
        # Its own tab: one point per question is 10k points with their texts at 100k runs, which the Runs tab
        # would build on every page and redraw on every filter change (a dynamic tab draws only while shown).
        ("Questions", QuestionScatter(store=store)),
        ("Results", ResultsView(root=Path(root))),
        ("Experiments", experiments),
        ("Early exit", pn.Column(sizing_mode="stretch_width")),
        dynamic=True, sizing_mode="stretch_width")
    # `dvc exp show` takes seconds, the forced answers a few: read each only once someone opens its tab.
    experiments_tab, early_exit_tab = 3, 4

    def on_tab(event) -> None:
        if event.new == experiments_tab:
            experiments.load_once()
        elif event.new == early_exit_tab and not tabs[early_exit_tab].objects:
            show_early_exit(tabs[early_exit_tab], Path(root))
    tabs.param.watch(on_tab, "active")
    template.sidebar.append(FilterPanel(store=store))
    template.main.append(tabs)
    return template


def early_exit_section(root: Path) -> pn.viewable.Viewable:
    """The early-exit tab (viewer/views/early_exit.py), or what to run when its stages have not run."""
    try:
        return early_exit_view(root)
    except (SchemaError, FileNotFoundError) as missing:
        return _no_early_exit(missing)


def _no_early_exit(missing: Exception) -> pn.viewable.Viewable:
    return notice(f"No early-exit results to show. {missing}")


def show_early_exit(holder: pn.Column, root: Path) -> None:
    """Fill ``holder`` with the early-exit tab without making other sessions wait: the files (every run's forced
    answers) are read in a worker thread, the widgets and the Pareto figure built on the event loop (HoloViews and
    Bokeh objects are never built off it: issue 28); without a server, right away."""
    doc = pn.state.curdoc
    if doc is None or doc.session_context is None:
        holder.append(early_exit_section(root))
        return
    holder.append(pn.indicators.LoadingSpinner(value=True, size=30, name="Reading the early-exit results..."))

    async def fill() -> None:
        import asyncio

        try:
            data = await asyncio.to_thread(load_early_exit, root)
        except (SchemaError, FileNotFoundError) as missing:
            holder.objects = [_no_early_exit(missing)]
            return
        except Exception as error:  # noqa: BLE001 - say so on the page rather than spin forever
            log.exception("reading the early-exit results")
            holder.objects = [notice(f"Early exit: could not be read ({type(error).__name__}: {error})")]
            return
        holder.objects = [early_exit_layout(data)]

    pn.state.execute(fill)


def warm_up(root: Path = PROJECT_ROOT) -> None:
    """Once per process (`panel serve --warm` does it before serving): read the run into the loader's cache, and
    draw one frame of each run plot, so that datashader's numba kernels (compiled per aggregation and per pair of
    columns, ~1-3 s each in a fresh process) are compiled before the first user's page rather than during it."""
    global _warmed
    try:
        table = load_analysis(root)
    except MissingArtifact:
        return  # the page will say what to run
    if _warmed:
        return
    _warmed = True
    store = RunStore(table)
    for view in (MarginEntropyScatter(store=store, rasterize_above=0), UmapExplorer(store=store, rasterize_above=0)):
        view.layers()


_warmed = False


if __name__.startswith("bokeh"):  # `panel serve viewer/app.py`: this module runs once per browser session
    warm_up()
    create_app().servable(title=TITLE)
