"""The Experiments tab: the runs of ``dvc exp show`` side by side, each with its params and metrics."""

from __future__ import annotations
import html
import logging
from pathlib import Path
import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401 - registers HoloViews' Bokeh renderer (what hv.extension does)
import hvplot.pandas  # noqa: F401 - DataFrame.hvplot: the question scatter and the Results curves
import pandas as pd
import panel as pn
import param
from viewer.experiments import (
    Experiments,
    change_against_baseline,
    headline_metric_columns,
    load_experiments,
    sweeps,
    varying_params,
)
from viewer.loaders import MissingArtifact
from viewer.views.common import NUMBER, notice

log = logging.getLogger(__name__)

# ---- experiments ----------------------------------------------------------------------------------------------

# The `dvc exp show` running for each project, on the event loop: a session asking while one runs waits for that
# one's answer rather than starting another.
_DVC_QUERIES: dict = {}

class ExperimentsView(pn.viewable.Viewer):
    """Headline metrics across commits and DVC experiments (`dvc exp show --json`), and a sweep plot.

    DVC is asked only when ``load()`` is called (the app calls it when the tab is first opened), in a worker
    thread, so neither the first page load nor other sessions wait for it; the table and plot are built on the
    event loop when the answer arrives. One query at a time: Refresh is disabled (and ignored) while this view's
    query runs, and sessions asking while another session's query runs share its answer (``_DVC_QUERIES``).
    """

    root = param.ClassSelector(class_=Path)

    def __init__(self, **params):
        super().__init__(**params)
        self._body = pn.Column(pn.pane.HTML("<i>Open this tab to ask DVC for experiments.</i>"),
                               sizing_mode="stretch_width")
        self._refresh = pn.widgets.Button(name="Refresh", button_type="light", width=100)
        self._refresh.on_click(lambda _: self.load())
        self._started = False

    def load_once(self) -> None:
        if not self._started:
            self.load()

    def load(self) -> None:
        """(Re)read the experiments in the background and show them when they arrive; nothing while a read runs."""
        if self._refresh.disabled:
            return
        self._started = True
        self._body.objects = [pn.indicators.LoadingSpinner(value=True, size=30, name="Asking DVC...")]
        if pn.state.curdoc is None or pn.state.curdoc.session_context is None:
            self._body.objects = self._render(self._query())  # no server (a script or a test): just do it
        else:
            self._refresh.disabled = True
            pn.state.execute(self._show_async)

    async def _show_async(self) -> None:
        import asyncio

        try:
            # `dvc exp show` takes seconds: off the event loop, so the page and other sessions stay responsive.
            query = _DVC_QUERIES.get(self.root)
            if query is None:
                query = _DVC_QUERIES[self.root] = asyncio.ensure_future(asyncio.to_thread(self._query))
                query.add_done_callback(lambda done: _DVC_QUERIES.pop(self.root, None)
                                        if _DVC_QUERIES.get(self.root) is done else None)
            self._body.objects = self._render(await asyncio.shield(query))
        finally:
            self._refresh.disabled = False

    def _query(self) -> Experiments | MissingArtifact:
        try:
            return load_experiments(self.root)
        except MissingArtifact as missing:
            return missing

    def _render(self, experiments: Experiments | MissingArtifact) -> list:
        if isinstance(experiments, MissingArtifact):
            return [notice(str(experiments))]
        table = experiments.table
        params = varying_params(table) if experiments.from_dvc else []
        metrics = headline_metric_columns(table)
        changes = change_against_baseline(table, metrics) if experiments.from_dvc else pd.DataFrame(index=table.index)
        shown = pd.concat([table[["name", "kind", "rev", "baseline", "timestamp", *params, *metrics]], changes,
                           table[["error"]]], axis=1)
        shown.columns = [column.removeprefix("param:").removeprefix("metric:") for column in shown.columns]
        objects = [
            pn.pane.Alert(html.escape(experiments.message), alert_type="info" if experiments.from_dvc else "warning",
                          sizing_mode="stretch_width", css_classes=["experiments-message"], disable_math=True),
            pn.pane.HTML("<small>Δ: an experiment's value minus its baseline commit's (the commit it was run "
                         "from).</small>", sizing_mode="stretch_width"),
            pn.widgets.Tabulator(shown, disabled=True, show_index=False, selectable=False, sizing_mode="stretch_width",
                                 layout="fit_data_table", frozen_columns=["name"],
                                 formatters={column: NUMBER for column in [
                                     *(m.removeprefix("metric:") for m in metrics), *changes.columns]},
                                 css_classes=["experiments-table"]),
        ]
        found = sweeps(table) if experiments.from_dvc else []
        if found and metrics:
            objects.append(self._sweep(found, metrics))
        return objects

    def _sweep(self, found: list, metrics: list[str]):
        options = {f"{sweep.baseline}: {sweep.parameter.removeprefix('param:')} ({len(sweep.rows)} points)": sweep
                   for sweep in found}
        choose = pn.widgets.Select(name="sweep (a baseline commit and the parameter its experiments change)",
                                   options=options, width=420, css_classes=["sweep-choice"])

        def plot(sweep):
            lines = []
            for metric in [column for column in metrics if column.endswith(".auroc")]:
                label = metric.removeprefix("metric:").removesuffix(".auroc")
                points = sweep.rows.dropna(subset=[metric])
                lines.append(hv.Curve(points, "x", metric, label=label)
                             * hv.Scatter(points, "x", [metric, "name"], label=label).opts(size=6, tools=["hover"]))
            return hv.Overlay(lines).opts(responsive=True, min_width=400, height=380, legend_position="right",
                                          show_grid=True, xlabel=sweep.parameter.removeprefix("param:"),
                                          ylabel="AUROC", legend_opts={"click_policy": "hide"},
                                          title=f"AUROC across the experiments of {sweep.baseline}")
        return pn.Column(choose, pn.pane.HoloViews(pn.bind(plot, choose), sizing_mode="stretch_width",
                                                   css_classes=["sweep-plot"]), sizing_mode="stretch_width")

    def __panel__(self):
        return pn.Column(pn.Row(pn.pane.HTML("<h4>Experiments</h4>"), self._refresh), self._body,
                         sizing_mode="stretch_width")
