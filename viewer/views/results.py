"""The viewer's views: each one a ``pn.viewable.Viewer`` that reads a ``RunStore`` and draws one thing.

Model outputs (questions, answers, think text) are untrusted. They reach the page only through
Tabulator cells (Tabulator's default formatters escape), Bokeh hover tooltips (``@{column}`` fields are inserted
as text) or ``escaped_html`` (``html.escape`` first: Panel's ``Str``/``HTML``/``Markdown`` panes all end in
innerHTML, so even ``pn.pane.Str`` renders ``<img onerror=...>`` as a live element in Panel 1.9).
"""

from __future__ import annotations

import html
import logging
import io
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datashader as ds
import datashader.transfer_functions as tf
import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401 - registers HoloViews' Bokeh renderer (what hv.extension does)
import hvplot.pandas  # noqa: F401 - DataFrame.hvplot: the question scatter and the Results curves
import numpy as np
import pandas as pd
import panel as pn
import param
from bokeh.models import TeeHead
from bokeh.models.widgets.tables import NumberFormatter
from bokeh.palettes import Category20, Viridis256

from stages.lib import registry
from stages.lib.schema.tables import AUROC_BY_LAYER, EARLY_WARNING, RELIABILITY, RISK_COVERAGE, ROC, STABILITY_PLOT
from stages.lib.schema.reports import (
    COST_RATIO_FILE,
    STABILITY_FILE,
    CostRatio,
    EvaluateReport,
    EvaluateSettings,
    StabilityReport,
)
from viewer.data import (
    DATASET_CHOICES,
    ENTROPY_CHOICES,
    Experiments,
    OUTCOMES,
    SELECTIVE_LEGEND,
    MissingArtifact,
    RunStore,
    answer_extraction_table,
    change_against_baseline,
    load_location_scores,
    load_question_tokens,
    calibration_table,
    cost_ratio_text,
    headline_metric_columns,
    load_experiments,
    load_metrics,
    load_plot_table,
    ranked_scores,
    se_regression_table,
    stability_table,
    question_summary,
    stack_codes,
    stack_runs,
    sweeps,
    varying_params,
)
log = logging.getLogger(__name__)

# What `hv.extension("bokeh")` does outside a notebook: the Bokeh backend current, so that `hv.opts.<Element>` exist.
hv.Store.set_current_backend("bokeh")
# Canvas, not WebGL (HoloViews' default): a plot draws at most RASTERIZE_ABOVE markers, which canvas draws at once,
# and each WebGL glyph costs a blit of the whole canvas per redraw (~0.3 s of a page's first draw in headless
# Chromium; tests/benchmarks/bench_viewer.py).
hv.Store.renderers["bokeh"].webgl = False

OUTCOME_COLOURS = {"correct": "#2b83ba", "incorrect": "#d7301f"}
SELECTED_COLOUR = "#111111"
VIRIDIS = list(Viridis256)
RASTERIZE_ABOVE = 5_000  # markers (stacks of runs) in the viewport above which datashader draws the runs
RASTER_SHAPE = (300, 210)  # that image's (width, height); about half the plot's size in pixels, so that dynspread's
# 1-3 px spreading reads as a marker
POINT_SIZE = 6
POINT_ALPHA, DIMMED_ALPHA = 0.7, 0.12  # the runs' opacity; the unselected ones' while a selection is drawn
SELECTION_PAGE_SIZE = 15  # rows per page of the selection table
PLOT_HEIGHT = 420
TAP_TOLERANCE = 0.015  # a click opens the run nearest it within this share of the viewport (~8 px) on each axis

# The registry's per-run probes: their analysis columns (margin, P(positive)) and what the columns are called.
PROBE_MARGINS = [f"{probe.name}_probe_margin" for _, probe in registry.per_run_probes()]
PROBE_COLUMNS = [column for _, probe in registry.per_run_probes()
                 for column in (f"{probe.name}_probe_prob", f"{probe.name}_probe_margin")]
LABELS = {
    **{score.name: f"{score.display_name} (nats)" for score in registry.scores(kind="entropy")},
    **{column: label for score, probe in registry.per_run_probes() for column, label in (
        (f"{probe.name}_probe_margin",
         f"{score.display_name} margin (+ = predicts {registry.TARGETS[probe.target].display_name})"),
        (f"{probe.name}_probe_prob", f"{score.display_name} P({registry.TARGETS[probe.target].display_name})"))},
    "umap_x": "UMAP 1",
    "umap_y": "UMAP 2",
    "sequence_loglik": "sequence log-likelihood",
}


def escaped_html(text: object, tag: str = "span", css_class: str = "") -> str:
    """``<tag>text</tag>`` with ``text`` escaped, for building HTML that shows untrusted text as text."""
    attribute = f' class="{html.escape(css_class)}"' if css_class else ""
    return f"<{tag}{attribute}>{html.escape(str(text))}</{tag}>"


def notice(message: str) -> pn.pane.Alert:
    """A visible message in place of a view (a missing artifact, an empty selection); the text is escaped."""
    return pn.pane.Alert(html.escape(message), alert_type="warning", sizing_mode="stretch_width", disable_math=True)


def _padded_range(values: pd.Series) -> tuple[float, float]:
    values = values[np.isfinite(values)]
    if values.empty:
        return (-1.0, 1.0)
    low, high = float(values.min()), float(values.max())
    pad = (high - low) * 0.05 or 0.5
    return (low - pad, high + pad)


def _viewport(requested, fallback: tuple[float, float]) -> tuple[float, float]:
    """The range the browser reported, or ``fallback`` before it has (None or NaN while the plot is being sized)."""
    if requested is None or not np.isfinite(requested).all():
        return fallback
    return float(requested[0]), float(requested[1])


# ---- the linked point plots -----------------------------------------------------------------------------------


class LinkedPoints(pn.viewable.Viewer):
    """A HoloViews scatter of the filtered runs; box or lasso selection sets the store's selection, which both plots
    draw: the selected runs in their own colours on top, every other run dimmed.

    One ``hv.DynamicMap`` per plot, fed by the viewport (``RangeXY``) and the store's revision counters
    (``Params``): each change refills the same Bokeh figure in place. Runs on the same spot (identical answers give
    identical hidden states) are one marker carrying ``×k`` and one tooltip (``viewer.data.stack_runs``). Up to
    ``rasterize_above`` markers in the viewport are drawn as points with hover; above that datashader rasterises
    the runs (``datashade`` by outcome, or the mean of a numeric colour, then ``dynspread`` so isolated runs stay
    visible). Box and lasso reach the store through HoloViews' ``BoundsXY`` and ``Lasso`` streams. Axis ranges come
    from the whole table, so they stay put while filters change. Subclasses say which columns are x, y and colour.
    """

    store = param.ClassSelector(class_=RunStore)
    rasterize_above = param.Integer(default=RASTERIZE_ABOVE, bounds=(0, None))
    title = param.String(default="")

    _rebuild_on: tuple[str, ...] = ()  # parameters (own or `store.*`) that change axes or colouring
    css_class = "points-plot"

    def __init__(self, **params):
        super().__init__(**params)
        self._revisions: hv.streams.Params | None = None  # the stream of the drawn figure
        self._pane = self._new_pane()
        self._holder = pn.Column(self._pane, sizing_mode="stretch_width", margin=0)
        own = [name for name in self._rebuild_on if not name.startswith("store.")]
        stored = [name.split(".", 1)[1] for name in self._rebuild_on if name.startswith("store.")]
        # New axes or colours: a new DynamicMap in the same pane, which replaces its figure (never adds one).
        if own:
            self.param.watch(lambda *_: self._rebuild(), own)
        if stored:
            self.store.param.watch(lambda *_: self._rebuild(), stored)

    def axes(self) -> tuple[str, str]:
        raise NotImplementedError

    def colour(self) -> str:
        """Column to colour by: ``outcome`` (categorical) or a numeric column."""
        return "outcome"

    def hover_columns(self) -> list[str]:
        x, y = self.axes()
        return list(dict.fromkeys(["question", "answer", "gold", "outcome", x, y, "semantic_entropy",
                                   self.store.score_column()]))

    def _tooltips(self) -> list[tuple[str, str]]:
        """Hover rows; Bokeh inserts ``@{column}`` values as text, so model outputs stay inert."""
        numbers = [column for column in self.hover_columns() if column not in ("question", "answer", "gold", "outcome")]
        return [("runs here", "@{runs} (@{runs_correct} correct)"), ("question", "@{question}"),
                ("answer", "@{answer}"), ("gold", "@{gold}"), ("outcome", "@{outcome}"),
                *[(LABELS.get(column, column), f"@{{{column}}}{{0.000}}") for column in numbers]]

    def _vdims(self) -> list[str]:
        """The point sources' value columns (no others reach the page): hover fields, colour, stack size, style."""
        colour = [] if self.colour() == "outcome" else [self.colour()]
        return list(dict.fromkeys([*self.hover_columns()[:4], *[c for c in self.hover_columns()[4:]
                                                                   if c not in self.axes()],
                                   *colour, "runs", "runs_correct", "stack", "alpha", "fill"]))

    def limits(self) -> tuple[tuple[float, float], tuple[float, float]]:
        table = self.store.table
        x, y = self.axes()
        return _padded_range(table[x]), _padded_range(table[y])

    # -- one frame of the plot: a function of the store's frames and the viewport --
    def layers(self, x_range=None, y_range=None, **_) -> hv.Overlay:
        """What the plot draws for the store's frames and the viewport (None: the whole table's extent), always
        the same five layers, empty where unused: datashader's image (every run in view, dimmed under the selected
        ones while a selection is drawn), the stacks of every run (one layer per outcome, for the legend, or one
        coloured by value), the selection's stacks (ringed), and the ``×k`` labels."""
        x, y = self.axes()
        colour = self.colour()
        xlim, ylim = self.limits()
        x_range, y_range = _viewport(x_range, xlim), _viewport(y_range, ylim)
        frame = self.store.filtered
        inside = (frame[x].between(*x_range) & frame[y].between(*y_range)).to_numpy()
        in_view = frame if inside.all() else frame[inside]
        anything_selected = len(self.store.selected) > 0
        selected = in_view[in_view.index.isin(self.store.selected.index)] if anything_selected else in_view.iloc[:0]
        # Count the spots first: above the threshold the runs are pixels, and their stacks are never built.
        codes, spots = stack_codes(in_view, x, y)
        selected_codes, selected_spots = stack_codes(selected, x, y)
        base_raster, selected_raster = spots > self.rasterize_above, selected_spots > self.rasterize_above
        stacks = stack_runs(in_view.iloc[:0] if base_raster else in_view, x, y, None if base_raster else codes)
        selected_stacks = stack_runs(selected.iloc[:0] if selected_raster else selected, x, y,
                                     None if selected_raster else selected_codes)
        bounds = (x_range[0], y_range[0], x_range[1], y_range[1])
        alpha = DIMMED_ALPHA if anything_selected else POINT_ALPHA

        images = [self._shade(in_view, x_range, y_range, dimmed=anything_selected)] if base_raster else []
        if selected_raster:
            images.append(self._shade(selected, x_range, y_range, dimmed=False))
        # tf.stack only for two images: importing its compositing compiles numba ufuncs (~2.5 s once per process)
        raster = _rgb(images[0] if len(images) == 1 else tf.stack(*images), bounds) if images else _empty_rgb(bounds)
        hover = {"tools": ["hover", "box_select", "lasso_select"], "hover_tooltips": self._tooltips()}
        style = {"selection_alpha": "alpha", "nonselection_alpha": "alpha", "line_color": None}  # Bokeh's own
        # selection state (its box and lasso tools mark the glyphs they cover) restyles nothing: the store's is drawn
        if colour == "outcome":
            runs = [self._points(stacks[stacks["outcome"] == outcome], alpha, label=outcome).opts(
                        color=OUTCOME_COLOURS[outcome], alpha="alpha", size=POINT_SIZE, **style, **hover)
                    for outcome in OUTCOMES]
        else:
            low, high = _padded_range(self.store.table[colour])
            runs = [self._points(stacks, alpha).opts(
                color=colour, cmap=VIRIDIS, clim=(low, high), colorbar=True, alpha="alpha", size=POINT_SIZE,
                colorbar_opts={"title": LABELS.get(colour, colour)}, **style, **hover)]
        ringed = self._points(selected_stacks, 1.0, ringed=True).opts(
            color="fill", alpha=1.0, size=POINT_SIZE + 3, line_color=SELECTED_COLOUR, line_width=1.5,
            selection_alpha=1.0, nonselection_alpha=1.0, show_legend=False, **hover)
        labels = selected_stacks if anything_selected and not selected_raster else stacks
        counts = hv.Labels(labels[labels["runs"] > 1], [x, y], "stack").opts(
            text_font_size="8pt", text_color="#333333", xoffset=_offset(x_range), yoffset=_offset(y_range),
            text_align="left", text_baseline="bottom")
        return hv.Overlay([raster, *runs, ringed, counts])

    def _points(self, stacks: pd.DataFrame, alpha: float, label: str = "", ringed: bool = False) -> hv.Points:
        """The stacks as HoloViews points; ``ringed`` marks the selection's layer (its ``ring`` column)."""
        x, y = self.axes()
        fill = (stacks["outcome"].map(OUTCOME_COLOURS).astype(object) if self.colour() == "outcome"
                else pd.Series(_value_colours(stacks[self.colour()], self.store.table[self.colour()]),
                               index=stacks.index, dtype=object))
        data = stacks[[x, y, *[column for column in self._vdims() if column in stacks.columns and
                               column not in (x, y)]]].assign(alpha=alpha, fill=fill,
                                                               outcome=stacks["outcome"].astype(str))
        if ringed:
            data = data.assign(ring=True)
        return hv.Points(data, [x, y], self._vdims() + (["ring"] if ringed else []), label=label)

    def _shade(self, runs: pd.DataFrame, x_range, y_range, dimmed: bool) -> tf.Image:
        """datashader's image of ``runs`` over the viewport: counts by outcome (colours mixed by count) or the mean
        of the colour column, each run grown up to 3 px by ``dynspread`` so sparse runs stay visible. (datashader
        itself, not HoloViews' ``datashade`` operation: the same canvas, shading and spreading in 3 ms instead of
        ~35 ms at 100k runs, as the operation copies the frame into an element and computes its ranges first.)"""
        x, y = self.axes()
        colour = self.colour()
        canvas = ds.Canvas(plot_width=RASTER_SHAPE[0], plot_height=RASTER_SHAPE[1], x_range=x_range, y_range=y_range)
        shading = {"alpha": 70, "min_alpha": 40} if dimmed else {"alpha": 255, "min_alpha": 160}
        if colour == "outcome":
            image = tf.shade(canvas.points(runs, x, y, ds.count_cat("outcome")), color_key=OUTCOME_COLOURS,
                             **shading)
        else:
            # linear over the colour bar's range, so pixels and markers read off the same bar
            image = tf.shade(canvas.points(runs, x, y, ds.mean(colour)), cmap=VIRIDIS, how="linear",
                             span=_padded_range(self.store.table[colour]), **shading)
        return tf.dynspread(image, max_px=3, threshold=0.5)

    # -- wiring --
    def _dynamic_map(self) -> hv.DynamicMap:
        x, y = self.axes()
        xlim, ylim = self.limits()
        if self._revisions is not None:
            self._revisions.unwatch()  # the figure this replaces stops following the store
        revisions = self._revisions = hv.streams.Params(self.store, ["filtered_revision", "selected_revision"])
        self._viewport = hv.streams.RangeXY(x_range=xlim, y_range=ylim)
        plot = hv.DynamicMap(self.layers, streams=[self._viewport, revisions])
        hv.streams.BoundsXY(source=plot).add_subscriber(self._on_box)
        hv.streams.Lasso(source=plot).add_subscriber(self._on_lasso)
        hv.streams.Tap(source=plot).add_subscriber(self._on_tap)
        return plot.opts(
            hv.opts.Overlay(title=self.title, padding=0, responsive=True, height=PLOT_HEIGHT,
                            xlabel=LABELS.get(x, x), ylabel=LABELS.get(y, y), legend_position="top_right",
                            active_tools=["box_select", "wheel_zoom"],
                            toolbar="right", show_grid=False))

    def _new_pane(self) -> pn.pane.HoloViews:
        return pn.pane.HoloViews(self._dynamic_map(), sizing_mode="stretch_width", height=PLOT_HEIGHT,
                                 css_classes=[self.css_class], linked_axes=False)

    def _rebuild(self) -> None:
        # A new pane in the holder: Panel removes the old one's figure from the page (setting the pane's `object`
        # instead left replaced figures in the document, found by the browser test).
        self._pane = self._new_pane()
        self._holder.objects = [self._pane]

    def _on_box(self, bounds=None, **_) -> None:
        if bounds is not None:
            self.store.select_box(*self.axes(), bounds)

    def _on_tap(self, x=None, y=None, **_) -> None:
        """A click on a run opens its question and drills into it (as the selection table's rows do)."""
        if x is None or y is None:
            return
        xlim, ylim = self.limits()
        x_range = _viewport(self._viewport.x_range, xlim)
        y_range = _viewport(self._viewport.y_range, ylim)
        tolerance = ((x_range[1] - x_range[0]) * TAP_TOLERANCE, (y_range[1] - y_range[0]) * TAP_TOLERANCE)
        row = self.store.nearest_run(*self.axes(), (x, y), tolerance)
        if row is not None:
            self.store.open_run(row)

    def _on_lasso(self, geometry=None, **_) -> None:
        if geometry is not None:
            self.store.select_lasso(*self.axes(), np.asarray(geometry, dtype=float))

    def hint(self) -> pn.pane.HTML:
        return pn.pane.HTML(f"Drag a box (or pick the lasso in the toolbar) to select runs: they keep their colour in "
                            "both plots and the rest dim. Click a run to open its question. <b>×k</b>: k runs on one "
                            "spot (identical answers). Wheel to "
                            f"zoom. Above {self.rasterize_above:,} points in view the runs are rasterised: zoom in "
                            "for hover.", sizing_mode="stretch_width", margin=(0, 10),
                            styles={"color": "#555", "font-size": "0.85em"})

    def _plot(self):
        return self._holder


def _empty_rgb(bounds) -> hv.RGB:
    return hv.RGB(np.zeros((1, 1, 4), dtype=np.uint8), bounds=bounds).opts(show_legend=False)


def _rgb(image: tf.Image, bounds) -> hv.RGB:
    """A datashader image as a HoloViews RGBA element over ``bounds`` (its rows run bottom-up, an RGB's top-down)."""
    pixels = image.to_numpy()
    rgba = np.ascontiguousarray(pixels[::-1]).view(np.uint8).reshape(*pixels.shape, 4)
    return hv.RGB(rgba, bounds=bounds, vdims=list("RGBA")).opts(show_legend=False)


def _offset(span: tuple[float, float]) -> float:
    return (span[1] - span[0]) * 0.006


def _value_colours(values: pd.Series, everything: pd.Series) -> list[str]:
    """Viridis hex colours of ``values`` on the scale of ``everything`` (what the colour bar shows)."""
    low, high = _padded_range(everything)
    position = np.clip((values.to_numpy(dtype=float) - low) / ((high - low) or 1.0), 0, 1)
    return [VIRIDIS[int(p * (len(VIRIDIS) - 1))] if np.isfinite(p) else "#999999" for p in position]


class MarginEntropyScatter(LinkedPoints):
    """x: the chosen probe's normalised margin; y: a chosen entropy; colour: correct / incorrect."""

    entropy = param.Selector(default="semantic_entropy", objects=ENTROPY_CHOICES, label="y axis")
    title = param.String(default="Probe margin vs entropy")
    css_class = "scatter-plot"
    _rebuild_on = ("entropy", "store.probe")

    def axes(self) -> tuple[str, str]:
        return self.store.margin_column(), self.entropy

    def __panel__(self):
        controls = pn.widgets.Select.from_param(self.param.entropy, width=220, margin=(0, 10))
        return pn.Column(controls, self._plot, self.hint(), sizing_mode="stretch_width")


UMAP_COLOURS = {"correctness": "outcome", "semantic entropy": "semantic_entropy", "probe score": "probe"}


class UmapExplorer(LinkedPoints):
    """The 2-D UMAP of hidden states (fitted by the analysis stage), coloured by correctness, SE or probe score."""

    colour_by = param.Selector(default="outcome", objects=UMAP_COLOURS, label="colour by")
    title = param.String(default="UMAP of hidden states")
    css_class = "umap-plot"
    _rebuild_on = ("colour_by", "store.probe")

    def axes(self) -> tuple[str, str]:
        return "umap_x", "umap_y"

    def colour(self) -> str:
        return self.store.score_column() if self.colour_by == "probe" else self.colour_by

    def __panel__(self):
        controls = pn.widgets.Select.from_param(self.param.colour_by, width=220, margin=(0, 10))
        return pn.Column(controls, self._plot, self.hint(), sizing_mode="stretch_width")


class QuestionScatter(pn.viewable.Viewer):
    """One point per question of the runs in view: its semantic entropy against the share of its runs that are
    correct (a question the model always gets right should have low SE). Hover names the question."""

    store = param.ClassSelector(class_=RunStore)

    def __panel__(self):
        revisions = hv.streams.Params(self.store, ["filtered_revision"])
        plot = hv.DynamicMap(self.points, streams=[revisions])
        hint = pn.pane.HTML("One point per question of the runs in view (the sidebar's filters): its semantic "
                            "entropy against the share of its runs that are correct. Hover names the question.",
                            sizing_mode="stretch_width", styles={"color": "#555", "font-size": "0.85em"})
        return pn.Column(hint, pn.pane.HoloViews(plot, sizing_mode="stretch_width", height=420,
                                                 css_classes=["question-scatter"]), sizing_mode="stretch_width")

    def points(self, **_) -> hv.Points:
        summary = question_summary(self.store.filtered)
        return summary.hvplot.points(
            x="accuracy", y="semantic_entropy", hover_cols=["question_id", "dataset", "split", "question", "n_runs"],
            color="#555555", alpha=0.6, size=6, responsive=True, height=420, grid=True, xlim=(-0.05, 1.05),
            title="Questions: semantic entropy vs accuracy", xlabel="accuracy (share of the question's runs correct)",
            ylabel=LABELS["semantic_entropy"],
            hover_tooltips=[("question", "@{question_id} (@{dataset}, @{split})"), ("text", "@{question}"),
                            ("runs in view", "@{n_runs}"), ("accuracy", "@{accuracy}{0.00}"),
                            ("SE", "@{semantic_entropy}{0.000}")])


# ---- sidebar ---------------------------------------------------------------------------------------------------


class FilterPanel(pn.viewable.Viewer):
    """The sidebar: every filter of the store, and the count of runs in view."""

    store = param.ClassSelector(class_=RunStore)

    def __panel__(self):
        store = self.store
        se_low, se_high = store.param.se_range.bounds
        cluster_low, cluster_high = store.param.n_clusters.bounds
        count = pn.pane.HTML(pn.bind(self._count_html, store.param.filtered, store.param.selected),
                             sizing_mode="stretch_width")
        reset = pn.widgets.Button(name="Reset filters", button_type="light", sizing_mode="stretch_width")
        reset.on_click(lambda _: store.reset_filters())
        return pn.Column(
            count,
            pn.widgets.CheckButtonGroup.from_param(store.param.datasets, name="Dataset", button_type="primary",
                                                   button_style="outline", sizing_mode="stretch_width"),
            pn.widgets.CheckButtonGroup.from_param(store.param.splits, name="Split", button_type="primary",
                                                   button_style="outline", sizing_mode="stretch_width"),
            pn.widgets.RadioButtonGroup.from_param(store.param.correctness, name="Runs", button_type="primary",
                                                   button_style="outline", sizing_mode="stretch_width"),
            pn.widgets.RangeSlider.from_param(store.param.se_range, name="Semantic entropy (nats)", start=se_low,
                                              end=max(se_high, se_low + 1e-9), step=max((se_high - se_low) / 100, 1e-3),
                                              format="0.00", sizing_mode="stretch_width"),
            pn.widgets.IntRangeSlider.from_param(store.param.n_clusters, name="Semantic clusters", start=cluster_low,
                                                 end=max(cluster_high, cluster_low + 1), step=1,
                                                 sizing_mode="stretch_width"),
            pn.widgets.TextInput.from_param(store.param.search, name="Search questions",
                                            placeholder="text or id, Enter", sizing_mode="stretch_width"),
            pn.widgets.RadioButtonGroup.from_param(store.param.probe, name="Probe", button_type="primary",
                                                   button_style="outline", sizing_mode="stretch_width"),
            reset,
            sizing_mode="stretch_width",
        )

    def _count_html(self, filtered: pd.DataFrame, selected: pd.DataFrame) -> str:
        store = self.store
        questions = filtered.groupby(["dataset", "question_id"], observed=True).ngroups if len(filtered) else 0
        return (f"<div class='run-count'><b class='count'>{len(filtered):,}</b> of {len(store.table):,} runs in view "
                f"({questions:,} questions)<br><b class='selected-count'>{len(selected):,}</b> selected</div>")


# ---- selection table and question details ----------------------------------------------------------------------


SELECTION_COLUMNS = ["dataset", "split", "question_id", "run_id", "question", "answer", "gold", "correct",
                     "semantic_entropy", "n_clusters", *PROBE_MARGINS]
NUMBER = NumberFormatter(format="0.000")  # numbers only, so Bokeh's HTML formatting is safe here
# The selection table's column saying whether the probes saw the run in training (the train split) or not.
IN_SAMPLE_COLUMN, IN_SAMPLE, HELD_OUT = "probe scores", "in-sample (train)", "held-out"


class SelectionTable(pn.viewable.Viewer):
    """Every selected run, sorted and paged on the server (Tabulator's remote pagination: a header click sorts the
    whole selection, and only the page shown travels to the browser); clicking a row opens its question. Runs of
    the train split are marked in-sample: the probes were fitted on them, so their scores are greyed and say so.
    The selection downloads as CSV.

    The table is created with the first selection, not with the page (a first page load is the benchmark's
    slowest step, and an empty table is a few hundred Bokeh and Tabulator objects for nothing).
    """

    store = param.ClassSelector(class_=RunStore)
    page_size = param.Integer(default=SELECTION_PAGE_SIZE, bounds=(1, None))

    def __init__(self, **params):
        super().__init__(**params)
        self._table: pn.widgets.Tabulator | None = None
        self._caption = pn.pane.HTML(self._caption_html(self.store.selected), sizing_mode="stretch_width",
                                     css_classes=["selection-caption"])
        self.store.param.watch(self._update, "selected")
        self._clear = pn.widgets.Button(name="Clear selection", button_type="light", width=140)
        self._clear.on_click(lambda _: self.store.clear_selection())
        self._download = pn.widgets.FileDownload(callback=self._csv, filename="selection.csv", label="Selection CSV",
                                                 button_type="light", width=140, css_classes=["selection-csv"])
        self._body = pn.Column(pn.Row(self._caption, self._download, self._clear), sizing_mode="stretch_width")

    def _make_table(self, rows: pd.DataFrame) -> pn.widgets.Tabulator:
        table = pn.widgets.Tabulator(
            rows, disabled=True, show_index=False, selectable=False, sizing_mode="stretch_width",
            layout="fit_data_stretch", pagination="remote", page_size=self.page_size,
            formatters={column: NUMBER for column in ("semantic_entropy", *PROBE_MARGINS)},
            css_classes=["selection-table"])
        table.style.apply(_grey_in_sample, axis=1)
        table.on_click(self._open)
        return table

    def _rows(self, selected: pd.DataFrame) -> pd.DataFrame:
        rows = selected[SELECTION_COLUMNS].copy()
        for column in ("dataset", "split"):
            rows[column] = rows[column].astype(str)
        rows.insert(rows.columns.get_loc(PROBE_MARGINS[0]), IN_SAMPLE_COLUMN,
                    np.where(rows["split"] == "train", IN_SAMPLE, HELD_OUT))
        return rows.reset_index(drop=True)

    def _csv(self) -> io.StringIO:
        return io.StringIO(self._rows(self.store.selected).to_csv(index=False))

    def _caption_html(self, selected: pd.DataFrame) -> str:
        if selected.empty:
            return ("<i>Select runs in either plot (drag a box, or use the lasso) to list them here; click a row to "
                    "open its question.</i>")
        in_sample = int((selected["split"] == "train").sum())
        return (f"<b>{len(selected):,}</b> selected runs ({in_sample:,} of the train split: in-sample, their probe "
                "scores greyed). A header click sorts all of them. Click a row to open its question.")

    def _update(self, event) -> None:
        self._caption.object = self._caption_html(event.new)
        if self._table is not None:
            self._table.value = self._rows(event.new)
        elif not event.new.empty:
            self._table = self._make_table(self._rows(event.new))
            self._body.append(self._table)

    def _open(self, event) -> None:
        row = self._table.value.iloc[event.row]
        self.store.open_question(row["dataset"], row["question_id"])

    def __panel__(self):
        return self._body


def _grey_in_sample(row: pd.Series) -> list[str]:
    """Tabulator cell styles for one row: an in-sample run's probe scores grey and italic."""
    grey = row.get(IN_SAMPLE_COLUMN) == IN_SAMPLE
    return ["color: #999; font-style: italic" if grey and (column in PROBE_MARGINS or column == IN_SAMPLE_COLUMN)
            else "" for column in row.index]


QUESTION_CSS = """
.question-text { white-space: pre-wrap; font-size: 1.1em; background: #f4f4f4; padding: 6px 8px; margin: 4px 0; }
.gold { font-size: 1.1em; }
"""
QUESTION_NUMBER_COLUMNS = ["sequence_loglik", *PROBE_COLUMNS]
QUESTION_RUN_COLUMNS = ["semantic cluster", "row", "run_id", "answer", "correct", "text", *QUESTION_NUMBER_COLUMNS,
                        "think_length", "truncated"]


class QuestionDetails(pn.viewable.Viewer):
    """One question: its text and gold answer, and all K runs grouped by semantic cluster.

    The runs table is created when the first question is opened (see ``SelectionTable``).
    """

    store = param.ClassSelector(class_=RunStore)

    def __init__(self, **params):
        super().__init__(**params)
        self._header = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["question-header"],
                                    stylesheets=[QUESTION_CSS])
        self._runs: pn.widgets.Tabulator | None = None
        self._body = pn.Column(self._header, sizing_mode="stretch_width")
        self.store.param.watch(self._update, "question_runs")
        self._update()

    def _table(self) -> pn.widgets.Tabulator:
        if self._runs is None:
            self._runs = pn.widgets.Tabulator(
                pd.DataFrame(columns=QUESTION_RUN_COLUMNS), disabled=True, show_index=False, selectable=False,
                groupby=["semantic cluster"], hidden_columns=["semantic cluster", "row"], sizing_mode="stretch_width",
                layout="fit_data_stretch", pagination=None,
                formatters={"text": {"type": "textarea"},
                            **{column: NUMBER for column in QUESTION_NUMBER_COLUMNS}},
                widths={"text": 360}, css_classes=["question-runs"], height=420)
            self._runs.on_click(self._open_run)
            self._body.append(self._runs)
        return self._runs

    def _open_run(self, event) -> None:
        """A click on a run drills into it (RunDrillDown)."""
        self.store.open_run(int(self._runs.value.iloc[event.row]["row"]))

    def _update(self, *_) -> None:
        runs = self.store.question_runs
        if runs.empty:
            self._header.object = "<i>Open a question by clicking a row of the selection table.</i>"
            if self._runs is not None:
                self._runs.value = pd.DataFrame(columns=QUESTION_RUN_COLUMNS)
            return
        first = runs.iloc[0]
        sizes = runs.groupby("cluster_id").size()
        # The group label is built from numbers only: Tabulator writes group headers as HTML.
        rows = runs.assign(**{"semantic cluster": [
            f"{cluster}: {sizes[cluster]} of {len(runs)} runs, {'correct' if correct else 'incorrect'}"
            for cluster, correct in zip(runs["cluster_id"], runs["correct"])]})
        self._table().value = rows.assign(row=rows.index)[QUESTION_RUN_COLUMNS].reset_index(drop=True)
        dataset = {value: label for label, value in DATASET_CHOICES.items()}.get(str(first["dataset"]), "")
        self._header.object = (
            f"<h4>Question {escaped_html(first['question_id'])} "
            f"<small>({html.escape(dataset)}, {escaped_html(first['split'])} split)</small></h4>"
            f"{escaped_html(first['question'], 'pre', 'question-text')}"
            f"<p>gold answer: {escaped_html(first['gold'], 'code', 'gold')} &middot; {len(runs)} runs in "
            f"{int(first['n_clusters'])} semantic clusters &middot; SE {first['semantic_entropy']:.3f} nats "
            f"(weighted {first['semantic_entropy_weighted']:.3f}) &middot; "
            f"{'high' if first['high_se'] else 'low'} SE &middot; <a class='question-link' "
            f"href='?question={html.escape(urllib.parse.quote(str(first['question_id']), safe=''))}'>link to this "
            "question</a></p>")

    def __panel__(self):
        return self._body


# ---- one run: its probe scores at every location, its tokens by entropy ---------------------------------------

TOKEN_CSS = """
.run-tokens .token-box { max-height: 320px; overflow-y: auto; white-space: pre-wrap; font-family: monospace;
  font-size: 0.9em; line-height: 1.6; border: 1px solid #ddd; padding: 6px 8px; background: #fff; }
.run-tokens summary { cursor: pointer; font-weight: bold; margin: 4px 0; }
.run-tokens .token { border-radius: 2px; }
.run-tokens .scale span { display: inline-block; padding: 0 6px; font-size: 0.8em; }
"""
ENTROPY_PALETTE = ("#ffffff", "#fff5eb", "#fee6ce", "#fdd0a2", "#fdae6b", "#fd8d3c", "#f16913", "#d94801",
                   "#a63603", "#7f2704")  # white, then Bokeh's Oranges9 from light to dark
OPEN_TOKENS_UP_TO = 600  # a think text longer than this starts collapsed


def entropy_colour(entropy: float, high: float) -> str:
    """The background of a token of ``entropy`` nats on a scale from 0 to ``high`` (ENTROPY_PALETTE)."""
    if not np.isfinite(entropy) or high <= 0:
        return ENTROPY_PALETTE[0]
    index = int(np.clip(entropy / high, 0, 1) * (len(ENTROPY_PALETTE) - 1))
    return ENTROPY_PALETTE[index]


def token_spans(tokens, entropies, high: float) -> str:
    """Each token as ``<span title="H nats">piece</span>`` on its entropy's colour; every piece (model output) and
    nothing else escaped into the page."""
    return "".join(f'<span class="token" style="background:{entropy_colour(float(h), high)}" '
                   f'title="{float(h):.3f} nats">{html.escape(str(piece), quote=True)}</span>'
                   for piece, h in zip(tokens, entropies))


def tokens_html(run: pd.Series, high: float) -> str:
    """The run's generated tokens coloured by entropy: the think span in a fixed-height scroll box inside a
    <details> (collapsed when long), then what follows it (the answer)."""
    tokens, entropies = list(run["tokens"]), np.asarray(run["token_entropies"], dtype=float)
    start = run["think_start_index"]
    end = run["think_end_index"]
    start = 0 if pd.isna(start) else int(start)
    end = len(tokens) if pd.isna(end) else int(end) + 1
    think, answer = slice(start, end), slice(end, len(tokens))
    n_think = end - start
    mean = float(np.nanmean(entropies[think])) if n_think else float("nan")
    scale = "".join(f'<span style="background:{colour}">{high * i / (len(ENTROPY_PALETTE) - 1):.2f}</span>'
                    for i, colour in enumerate(ENTROPY_PALETTE))
    return (f"<div class='run-tokens'><div class='scale'>token entropy (nats): {scale} &middot; hover a token for "
            "its value</div>"
            f"<details class='think-tokens'{' open' if n_think <= OPEN_TOKENS_UP_TO else ''}><summary>Think text: "
            f"{n_think:,} tokens, mean entropy {mean:.3f} nats</summary>"
            f"<div class='token-box'>{token_spans(tokens[think], entropies[think], high)}</div></details>"
            f"<div class='answer-tokens token-box'>{token_spans(tokens[answer], entropies[answer], high)}</div>"
            "</div>")


def draw_location_scores(scores: np.ndarray, meta, probe_index: int) -> hv.Overlay:
    """One probe's score for one run at every (position, layer): an image over the layer and position indices
    (whole layers as ticks), the location chosen on val marked by a ring."""
    values = scores[probe_index]  # (positions, layers)
    positions, layers = meta.positions, meta.layers
    binary = meta.outputs[probe_index].startswith("P(")
    finite = values[np.isfinite(values)]
    clim = (0.0, 1.0) if binary or not len(finite) else (float(finite.min()), float(finite.max()) or 1.0)
    # Image rows run top-down: flipped, so that y = j is positions[j] (the marker's and the ticks' coordinate)
    image = hv.Image(values[::-1], bounds=(-0.5, -0.5, len(layers) - 0.5, len(positions) - 0.5),
                     kdims=["layer", "position"], vdims=[meta.outputs[probe_index]])
    chosen = meta.chosen[probe_index]
    marker = []
    if chosen.position in positions and chosen.layer in layers:
        marker = [(layers.index(chosen.layer), positions.index(chosen.position))]
    step = max(1, len(layers) // 12)
    ring = hv.Points(marker, ["layer", "position"]).opts(
        marker="square", size=14, fill_alpha=0, line_color="#e7298a", line_width=3)
    return (image.opts(cmap="viridis", clim=clim, colorbar=True, tools=["hover"],
                       xticks=[(i, str(layer)) for i, layer in enumerate(layers)][::step],
                       yticks=[(j, position) for j, position in enumerate(positions)])
            * ring).opts(title=f"{meta.probes[probe_index]} probe: {meta.outputs[probe_index]}", responsive=True,
                         height=240, min_width=260, xlabel="layer", ylabel="position", toolbar=None)


class RunDrillDown(pn.viewable.Viewer):
    """The run drilled into (the store's ``run``): each single-layer probe's score at every traced (position, layer),
    the chosen location ringed, and its generated tokens coloured by entropy. Each reads only this run's data:
    one row of the memory-mapped location_scores.npy, one question's row groups of tokens.parquet."""

    store = param.ClassSelector(class_=RunStore)
    root = param.ClassSelector(class_=Path)

    def __init__(self, **params):
        super().__init__(**params)
        self._header = pn.pane.HTML("", sizing_mode="stretch_width", css_classes=["run-header"])
        self._scores = pn.FlexBox(sizing_mode="stretch_width", css_classes=["run-location-scores"])
        self._tokens = pn.pane.HTML("", sizing_mode="stretch_width", stylesheets=[TOKEN_CSS],
                                    css_classes=["run-tokens-pane"], disable_math=True)
        self._body = pn.Column(self._header, self._scores, self._tokens, sizing_mode="stretch_width")
        self.store.param.watch(self._update, "run")
        self._update()

    def _update(self, *_) -> None:
        row = self.store.run
        if row is None:
            self._header.object = "<i>Open a question to see its first run here; click a run of the question to "\
                                  "see that one.</i>"
            self._scores.objects, self._tokens.object = [], ""
            return
        run = self.store.table.loc[row]
        self._header.object = (f"<h4>Run {int(run['run_id'])} of question {escaped_html(run['question_id'])}</h4>"
                               f"<p>answer {escaped_html(run['answer'], 'code')} &middot; "
                               f"{'correct' if run['correct'] else 'incorrect'}</p>")
        try:
            located = load_location_scores(self.root, self.store.table.index.get_loc(row), len(self.store.table))
            self._scores.objects = [
                pn.pane.HoloViews(draw_location_scores(located.scores, located.meta, i), min_width=280,
                                  sizing_mode="stretch_width", height=250, css_classes=["location-heatmap"])
                for i in range(len(located.meta.probes))]
        except MissingArtifact as missing:
            self._scores.objects = [notice(str(missing))]
        try:
            tokens = load_question_tokens(self.root, str(run["dataset"]), str(run["question_id"]))
            mine = tokens[tokens["run_id"] == run["run_id"]]
            if mine.empty:
                raise MissingArtifact(f"No tokens of run {int(run['run_id'])} in tokens.parquet; rerun `dvc repro "
                                      "analysis`.")
            high = max((float(np.nanmax(values)) for values in tokens["token_entropies"] if len(values)), default=1.0)
            self._tokens.object = tokens_html(mine.iloc[0], high)
        except MissingArtifact as missing:
            self._tokens.object = f"<div class='run-tokens'>{escaped_html(str(missing), 'i')}</div>"

    def __panel__(self):
        return self._body


# ---- results --------------------------------------------------------------------------------------------------


SPLIT_COLOURS = {"val": "#999999", "test": "#2b83ba", "ood": "#d7301f"}
MIN_PANEL_WIDTH = 260  # px: a Results panel's narrowest (three side by side fit a 1280 px page beside the sidebar)


def draw_auroc_by_layer(frame: pd.DataFrame, settings: EvaluateSettings | None) -> hv.Layout:
    """One panel per (probe, position): AUROC against layer per split, the location chosen on val dashed."""
    frame = frame.dropna(subset=["auroc"])
    plots = []
    for probe in PROBE_NAMES:
        for position in frame.loc[frame["probe"] == probe, "position"].unique():
            part = frame[(frame["probe"] == probe) & (frame["position"] == position)]
            curves = [hv.Curve(part[part["split"] == split], "layer", "auroc", label=split).opts(
                          color=SPLIT_COLOURS.get(split, "black"))
                      * hv.Scatter(part[part["split"] == split], "layer", "auroc", label=split).opts(
                          color=SPLIT_COLOURS.get(split, "black"), size=5)
                      for split in ("val", "test", "ood") if (part["split"] == split).any()]
            overlay = hv.Overlay(curves)
            picked = settings.probes.get(f"{probe}_probe") if settings is not None else None
            if picked is not None and picked.position == position:
                overlay = overlay * hv.VLine(picked.layer).opts(color="black", line_dash="dashed", line_width=1)
            layers = sorted(int(layer) for layer in part["layer"].unique())
            plots.append(overlay.opts(title=f"{PROBE_NAMES[probe]} @ {position}", ylim=(0.4, 1.0), responsive=True,
                                      min_width=MIN_PANEL_WIDTH,
                                      xticks=layers[::max(1, len(layers) // 10)],  # whole layers only
                                      height=250, legend_position="bottom_right", show_grid=True, xlabel="layer",
                                      ylabel="AUROC"))
    return hv.Layout(plots).cols(3).opts(shared_axes=False)


def merge_identical_curves(part: pd.DataFrame, key: str, x: str, y: str) -> list[tuple[str, pd.DataFrame]]:
    """(label, rows) per distinct curve of ``part`` (one curve per value of ``key``): scores whose (x, y) points
    are identical become one curve labelled "a = b", so no curve hides another."""
    merged: dict[bytes, tuple[list[str], pd.DataFrame]] = {}
    for name in part[key].unique():
        rows = part[part[key] == name]
        signature = rows[[x, y]].to_numpy(dtype=float).round(12).tobytes()
        merged.setdefault(signature, ([], rows))[0].append(str(name))
    return [(" = ".join(names), rows) for names, rows in merged.values()]


def _area(curve: pd.DataFrame) -> float:
    """The area under a drawn ROC curve (trapezoids over its stored points): the AUROC the legend shows."""
    rows = curve.sort_values(["fpr", "tpr"])
    return float(np.trapezoid(rows["tpr"].to_numpy(float), rows["fpr"].to_numpy(float)))


def draw_roc(frame: pd.DataFrame, settings: EvaluateSettings | None) -> hv.Layout:
    """ROC curves of every score, one panel per split, with the chance diagonal; identical curves merged."""
    plots, colours = [], _score_colours(frame["score"].unique())
    for split in ("test", "ood"):
        part = frame[frame["split"] == split]
        curves = [rows.hvplot.line(x="fpr", y="tpr", label=f"{label} (AUROC {_area(rows):.3f})",
                                   color=colours[label.split(" = ")[0]], responsive=True)
                  for label, rows in merge_identical_curves(part, "score", "fpr", "tpr")]
        diagonal = hv.Curve([(0, 0), (1, 1)], "fpr", "tpr").opts(color="#bbbbbb", line_dash="dotted")
        plots.append(hv.Overlay([diagonal, *curves]).opts(
            title=f"ROC, {split} (positive: incorrect run)", responsive=True, min_width=MIN_PANEL_WIDTH,
            height=420, legend_position="bottom_right",
            xlabel="false positive rate", ylabel="true positive rate", show_grid=True))
    return hv.Layout(plots).cols(2)


class NothingToDraw(ValueError):
    """A plot table holds no drawable rows (e.g. every AUROC null); the message says why, shown as a notice."""


# (colour, marker, dash) given in turn to the probes of a plot, in registry order
STYLES = (("#2b83ba", "circle", "solid"), ("#e66101", "square", "dashed"), ("#1a9641", "triangle", "dotdash"),
          ("#7b3294", "diamond", "dotted"))
# The single-layer probes of a class label (the per-layer and early-warning curves), by the name of the score that
# reads each one first; and the calibrated scores (the reliability diagram).
PROBE_NAMES = {probe.name: next(score.display_name for score in registry.SCORES if score.probe == probe)
               for probe in registry.layer_probes() if registry.TARGETS[probe.target].binary}
PROBE_COLOURS = {probe: STYLES[i % len(STYLES)][0] for i, probe in enumerate(PROBE_NAMES)}
CALIBRATED_STYLES = {score.name: STYLES[i % len(STYLES)] for i, score in enumerate(registry.calibrated())}
AFTER_ANSWER_X = 1.15  # where early_warning draws slt (no fraction: it has seen the whole reasoning and the answer)


def _score_colours(scores) -> dict[str, str]:
    """A distinct colour per score, in the order given (ROC's default cycle has 10 colours; there are 11 scores)."""
    palette = Category20[20]
    return {score: palette[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20] for i, score in enumerate(scores)}


def _split_parts(frame: pd.DataFrame, file_name: str):
    """(split, its rows) for test then OOD, skipping splits without rows; NothingToDraw if none has any."""
    parts = [(split, frame[frame["split"] == split]) for split in ("test", "ood")]
    parts = [(split, part) for split, part in parts if len(part)]
    if not parts:
        raise NothingToDraw(f"`{file_name}` has no rows with values for test or OOD (a split with one class, or "
                            "no OOD questions, leaves them null).")
    return parts


def _whiskers(colour: str, **style) -> dict:
    """ErrorBars style with the caps in the bars' colour (new Bokeh models per call: one per session's document)."""
    return {"line_color": colour, "upper_head": TeeHead(line_color=colour, size=8),
            "lower_head": TeeHead(line_color=colour, size=8), **style}


def draw_early_warning(frame: pd.DataFrame, settings: EvaluateSettings | None) -> hv.Layout:
    """One panel per split: each probe's AUROC (for its own label) against the share of the reasoning it has
    seen, at the layer chosen on val for each position, with CI bars. slt, which has also seen the answer, is a
    diamond at the right, not joined to the line."""
    frame = frame.dropna(subset=["auroc"]).assign(x=lambda rows: rows["fraction"].fillna(AFTER_ANSWER_X))
    ticks = sorted(dict(zip(frame["x"], frame["position"])).items())
    hover = ["auroc", "position", "layer", "auroc_ci_low", "auroc_ci_high"]
    low = min(0.4, float(frame["auroc_ci_low"].min(skipna=True)) - 0.02) if frame["auroc_ci_low"].notna().any() else 0.4
    plots = []
    for split, part in _split_parts(frame, EARLY_WARNING.file):
        layers = [hv.HLine(0.5).opts(color="#bbbbbb", line_dash="dotted", line_width=1)]
        for offset, probe in zip((-0.008, 0.008), part["probe"].unique()):
            rows = part[part["probe"] == probe].sort_values("x").assign(x=lambda rows: rows["x"] + offset)
            colour, label = PROBE_COLOURS.get(probe, "black"), PROBE_NAMES.get(probe, probe)
            reasoning, after = rows[rows["fraction"].notna()], rows[rows["fraction"].isna()]
            bars = rows.dropna(subset=["auroc_ci_low", "auroc_ci_high"])
            layers += [hv.ErrorBars(bars.assign(neg=bars["auroc"] - bars["auroc_ci_low"],
                                                pos=bars["auroc_ci_high"] - bars["auroc"]),
                                    "x", ["auroc", "neg", "pos"]).opts(**_whiskers(colour, alpha=0.7)),
                       hv.Curve(reasoning, "x", "auroc", label=label).opts(color=colour),
                       hv.Scatter(reasoning, "x", hover, label=label).opts(color=colour, size=7, tools=["hover"]),
                       hv.Scatter(after, "x", hover).opts(color=colour, size=11, marker="diamond", tools=["hover"])]
        plots.append(hv.Overlay(layers).opts(
            title=f"Early warning, {split}", responsive=True, min_width=MIN_PANEL_WIDTH,
            height=360, legend_position="top_left", show_grid=True,
            xlabel="position: share of the reasoning seen (slt: after the answer)", ylabel="AUROC",
            xticks=[(x, position) for x, position in ticks], xrotation=30 if len(ticks) > 6 else 0,
            xlim=(-0.05, AFTER_ANSWER_X + 0.07 if (frame["fraction"].isna()).any() else 1.05), ylim=(low, 1.02)))
    return hv.Layout(plots).cols(2).opts(shared_axes=False)


def draw_risk_coverage(frame: pd.DataFrame, settings: EvaluateSettings | None) -> hv.Layout:
    """One panel per split: risk (error rate of the answered runs) against coverage (share answered, least
    uncertain first), a step line per score; lower is better, and every line ends at the split's error rate."""
    colours = _score_colours(frame["score"].unique())
    parts = _split_parts(frame, RISK_COVERAGE.file)
    plots = []
    for index, (split, part) in enumerate(parts):
        curves = [part[part["score"] == score].sort_values("coverage").hvplot.step(
                      x="coverage", y="risk", where="pre", label=score, color=colours[score], hover=True,
                      responsive=True)
                  for score in part["score"].unique()]
        # Eleven scores: one legend, right of the last panel, where it hides no curve.
        last = index == len(parts) - 1
        plots.append(hv.Overlay(curves).opts(
            title=f"Risk-coverage, {split}", responsive=True, min_width=MIN_PANEL_WIDTH, height=400, show_legend=last,
            legend_position="right", show_grid=True, xlabel="coverage (share of runs answered)",
            ylabel="risk (error rate of the answered runs)", xlim=(0, 1.01)))
    return hv.Layout(plots).cols(2).opts(shared_axes=False)


def draw_reliability(frame: pd.DataFrame, settings: EvaluateSettings | None) -> hv.Layout:
    """One panel per split: each accuracy probe's observed accuracy against its mean P(correct), per bin (empty
    bins left out; hover for the count); a calibrated probe lies on the diagonal."""
    frame = frame[frame["n"] > 0].dropna(subset=["mean_predicted", "observed_frequency"])
    plots = []
    for split, part in _split_parts(frame, RELIABILITY.file):
        layers = [hv.Curve([(0, 0), (1, 1)], "mean_predicted", "observed_frequency").opts(
            color="#bbbbbb", line_dash="dotted")]
        for probe in part["probe"].unique():
            rows = part[part["probe"] == probe].sort_values("bin")
            colour, marker, dash = CALIBRATED_STYLES.get(probe, ("black", "circle", "solid"))
            layers += [hv.Curve(rows, "mean_predicted", "observed_frequency", label=probe).opts(
                           color=colour, line_dash=dash),
                       hv.Scatter(rows, "mean_predicted", ["observed_frequency", "n", "lower", "upper"],
                                  label=probe).opts(color=colour, marker=marker, size=7, tools=["hover"])]
        plots.append(hv.Overlay(layers).opts(
            title=f"Reliability, {split}", responsive=True, min_width=MIN_PANEL_WIDTH,
            height=400, legend_position="top_left", show_grid=True,
            xlabel="mean predicted P(correct) in the bin", ylabel="observed accuracy in the bin",
            xlim=(-0.02, 1.02), ylim=(-0.02, 1.02)))
    return hv.Layout(plots).cols(2).opts(shared_axes=False)


def draw_stability(frame: pd.DataFrame, settings: EvaluateSettings | None) -> hv.Layout:
    """One panel per split: every seed's AUROC per score (points), the min-max range over seeds (bar) and the
    mean (dash)."""
    frame = frame.dropna(subset=["auroc"])
    plots = []
    for split, part in _split_parts(frame, STABILITY_PLOT.file):
        summary = (part.groupby("score", sort=False)["auroc"].agg(["mean", "min", "max"]).reset_index()
                   .assign(neg=lambda rows: rows["mean"] - rows["min"], pos=lambda rows: rows["max"] - rows["mean"]))
        colour = SPLIT_COLOURS.get(split, "black")
        plots.append(hv.Overlay([
            hv.HLine(0.5).opts(color="#bbbbbb", line_dash="dotted", line_width=1),
            hv.ErrorBars(summary, "score", ["mean", "neg", "pos"]).opts(**_whiskers(colour, line_width=2)),
            hv.Scatter(summary, "score", ["mean", "min", "max"]).opts(color="black", marker="dash", size=16,
                                                                      tools=["hover"]),
            hv.Scatter(part, "score", ["auroc", "seed"]).opts(color=colour, size=6, alpha=0.6, jitter=0.25,
                                                              tools=["hover"]),
        ]).opts(title=f"AUROC over seeds, {split}", responsive=True, min_width=MIN_PANEL_WIDTH,
                height=400, show_grid=True, xrotation=45,
                xlabel="", ylabel="AUROC (positive: incorrect run)"))
    return hv.Layout(plots).cols(2).opts(shared_axes=False)


@dataclass(frozen=True)
class ResultPlot:
    """One section of the Results tab: a CSV of ``paths.plots`` drawn by a function.

    To show another CSV that `evaluate` writes: add its name and schema columns to ``viewer.data.PLOT_TABLES``, write
    ``draw(frame, settings)`` (the validated table, evaluate.json's ``settings`` or None when evaluate.json is
    missing; return any HoloViews object) and
    add an entry to ``RESULT_PLOTS``. A missing or malformed file, or a ``draw`` raising ``NothingToDraw`` (no
    rows to draw), shows as a notice in its section only.
    """

    table: str  # a key of viewer.data.PLOT_TABLES
    title: str
    caption: str
    draw: Callable[[pd.DataFrame, EvaluateSettings | None], object]
    columns: int = 2  # panels of the drawn Layout side by side, sharing the page's width
    tab: str = ""  # its tab's label (default: the title)




def result_panels(drawn) -> list:
    """The panels of a Results plot (the elements of a Layout, or the one element; each draws itself responsive,
    filling its grid cell), their legend entries hiding their curve when clicked."""
    elements = list(drawn.values()) if isinstance(drawn, hv.Layout) else [drawn]
    return [element.opts(legend_opts={"click_policy": "hide"}, clone=True) for element in elements]


def _panel_grid(panes: list, columns: int) -> pn.GridBox:
    return pn.GridBox(*panes, ncols=min(columns, len(panes)), sizing_mode="stretch_width",
                      css_classes=["result-plot"])


RESULT_PLOTS = (  # in tab order: the headline curves first
    ResultPlot(ROC.file, "ROC curves", "", draw_roc, tab="ROC"),
    ResultPlot(RISK_COVERAGE.file, "Risk-coverage curves",
               "Answer only the runs a score finds least uncertain: the error rate of those answered (lower is "
               "better) against the share answered. AURAC / AURC / PRR in the table above summarise these curves.",
               draw_risk_coverage, tab="Risk-coverage"),
    ResultPlot(EARLY_WARNING.file, "Early warning: AUROC against the share of the reasoning seen",
               "Each probe at every traced position, on the layer chosen on val for that position, scored for its own "
               "label with a 95% bootstrap CI; higher further left = the uncertainty shows earlier.",
               draw_early_warning, tab="Early warning"),
    ResultPlot(AUROC_BY_LAYER.file, "AUROC per layer and position",
               "A probe fitted on train at each (position, layer), scored for its own label (accuracy probe: correct; "
               "SE probe: high SE); dashed: the location chosen on val.", draw_auroc_by_layer, columns=3,
               tab="AUROC per layer"),
    ResultPlot(RELIABILITY.file, "Reliability of the accuracy probes' P(correct)",
               "Per bin of predicted P(correct): observed accuracy against mean prediction; on the dotted diagonal "
               "when calibrated (ECE and Brier in the calibration table above).", draw_reliability, tab="Reliability"),
    ResultPlot(STABILITY_PLOT.file, "AUROC across seeds (stability stage)",
               "Each point is one seed's split of the questions with the probes refitted; bar: min-max, dash: mean.",
               draw_stability, tab="Seeds"),
)


def _split_name(split: str) -> str:
    return "OOD" if split == "ood" else split


def _small_table(frame: pd.DataFrame, css_class: str) -> pn.pane.DataFrame:
    """A few rows as a static HTML table (pandas escapes every cell). Not a Tabulator: each one measures its data
    again on every layout of the page, most of the browser's ~1.2 s in Tabulator while Results opens."""
    return pn.pane.DataFrame(frame, index=False, escape=True, sizing_mode="stretch_width", css_classes=[css_class],
                             stylesheets=[SMALL_TABLE_CSS])


SMALL_TABLE_CSS = """
table.dataframe { border-collapse: collapse; font-size: 0.85em; }
table.dataframe th, table.dataframe td { padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: left; }
table.dataframe thead th { background: #f4f4f4; }
"""


PAUSE_S = 0.01  # between two steps of drawing Results' figures on the event loop, for other sessions' events


def _subheading(title: str, caption: str = "") -> pn.pane.HTML:
    return pn.pane.HTML(f"<h4>{html.escape(title)}</h4>{html.escape(caption)}", sizing_mode="stretch_width")


class ResultsView(pn.viewable.Viewer):
    """evaluate's numbers (AUROC/AUPRC with CIs and the selective-prediction areas per score, calibration, the
    SE regression probe), stability's spread over seeds and cost_ratio's sentence, then one tab per entry of
    ``plots``. Each file missing (older runs lack the newer ones) is a notice in its own section only."""

    root = param.ClassSelector(class_=Path)
    plots = param.List(default=list(RESULT_PLOTS), item_type=ResultPlot)

    def __panel__(self):
        # Built when the tab is first shown, not with the page.
        return pn.param.ParamMethod(self._content, lazy=True, sizing_mode="stretch_width")

    def _content(self):
        """The tables at once, each plot a spinner saying what it draws until its figure is ready."""
        parts = [pn.pane.Markdown(
            "Every score is oriented so that higher means *this run is more likely wrong*; the positive class is "
            "an **incorrect** run. CIs are 95% bootstrap intervals over questions. These come from the `evaluate` "
            "stage on the full test and OOD splits: the sidebar filters do not change them.",
            sizing_mode="stretch_width", disable_math=True)]
        settings = None
        try:
            metrics: EvaluateReport = load_metrics(self.root)
            parts.append(self._metrics(metrics))
            settings = metrics.settings
        except MissingArtifact as missing:
            parts.append(notice(str(missing)))
        parts += [self._stability(), self._cost()]
        sections = []
        for plot in self.plots:
            heading = pn.pane.HTML(f"<h4>{html.escape(plot.title)}</h4>{html.escape(plot.caption)}",
                                   sizing_mode="stretch_width")
            waiting = pn.Row(pn.indicators.LoadingSpinner(value=True, size=24, width=24, height=24),
                             pn.pane.HTML(f"<i>Drawing {html.escape(plot.title)}...</i>"),
                             css_classes=["results-loading"])
            sections.append(pn.Column(heading, waiting, sizing_mode="stretch_width"))
        # One tab per plot, drawn by the browser only while shown: 18 Bokeh figures on one page cost the browser
        # ~8 s of layout and paint on 2 cores (Bokeh reads every colour from the page's CSS), a tab's 2-8 a second.
        tabs = pn.Tabs(*[(plot.tab or plot.title, section) for plot, section in zip(self.plots, sections)],
                       dynamic=True, sizing_mode="stretch_width", css_classes=["result-plots"])
        parts += [pn.pane.HTML("<h4>Plots</h4>", sizing_mode="stretch_width"), tabs]
        self._draw_later(list(zip(self.plots, sections)), settings, tabs)
        return pn.Column(*parts, sizing_mode="stretch_width")

    def _draw_later(self, sections: list, settings: EvaluateSettings | None, tabs: pn.Tabs | None = None) -> None:
        """Fill each section with its figure, one section at a time, the shown tab's first (a click on another tab
        moves it to the front); without a server (a script or a test), right away.

        Only reading a plot's table runs in a worker thread. HoloViews builds and renders each panel on the event
        loop, which other sessions get back between panels: rendering also updates process-wide state (HoloViews
        turns Bokeh's property validation, one switch for the whole process, off and back on around each update),
        so a figure drawn in a thread while another session's plot updated could leave validation off for good and
        break every later page (issue 28)."""
        doc = pn.state.curdoc
        if doc is None or doc.session_context is None:
            for plot, section in sections:
                section[1] = self.draw(plot, settings)
            return
        # Panel's own HoloViews pane renders this way: a server-mode renderer, the figure owned by this session's
        # document (which cleans it up when the session ends).
        renderer = hv.renderer("bokeh").instance(mode="server")

        async def fill() -> None:
            import asyncio

            waiting = list(range(len(sections)))
            while waiting:
                index = tabs.active if tabs is not None and tabs.active in waiting else waiting[0]
                waiting.remove(index)
                plot, section = sections[index]
                try:
                    table = await asyncio.to_thread(load_plot_table, self.root, plot.table)
                    panels = result_panels(plot.draw(table, settings))
                    figures = []
                    for panel in panels:
                        await asyncio.sleep(PAUSE_S)  # other sessions' events run between two steps
                        figures.append(renderer.get_plot(panel, doc=doc).state)
                except (MissingArtifact, NothingToDraw) as missing:
                    section[1] = notice(str(missing))
                    continue
                except Exception as error:  # noqa: BLE001 - one plot failing must not leave the others unstarted
                    log.exception("drawing %s", plot.title)
                    section[1] = notice(f"{plot.title}: could not be drawn ({type(error).__name__}: {error})")
                    continue
                section[1] = _panel_grid([pn.pane.Bokeh(figure, sizing_mode="stretch_width") for figure in figures],
                                         plot.columns)

        pn.state.execute(fill)

    def draw(self, plot: ResultPlot, settings: EvaluateSettings | None):
        """The HoloViews pane of ``plot``, or a notice when its table is missing or holds nothing to draw."""
        try:
            return _panel_grid([pn.pane.HoloViews(panel, sizing_mode="stretch_width") for panel in
                                result_panels(plot.draw(load_plot_table(self.root, plot.table), settings))],
                               plot.columns)
        except (MissingArtifact, NothingToDraw) as missing:
            return notice(str(missing))

    def _stability(self):
        heading = _subheading("Stability: AUROC across seeds",
                              "AUROC for flagging incorrect runs as mean ± sample std (min-max) over seeds, each "
                              "seed a new split of the questions with the probes refitted (the stability stage); a "
                              "smaller spread = a single split's number can be trusted more.")
        try:
            stability: StabilityReport = load_metrics(self.root, STABILITY_FILE)
            body = _small_table(stability_table(stability), "stability-table")
        except MissingArtifact as missing:
            body = notice(str(missing))
        return pn.Column(heading, body, sizing_mode="stretch_width")

    def _cost(self):
        heading = _subheading("Cost of semantic entropy against a probe")
        try:
            cost: CostRatio = load_metrics(self.root, COST_RATIO_FILE)
            body = pn.pane.HTML(f"<p><b>{html.escape(cost_ratio_text(cost))}</b><br><small>"
                                f"{html.escape(cost.note)}</small></p>",
                                sizing_mode="stretch_width", css_classes=["cost-ratio"])
        except MissingArtifact as missing:
            body = notice(str(missing))
        return pn.Column(heading, body, sizing_mode="stretch_width")

    def _metrics(self, metrics: EvaluateReport):
        facts = [f"{_split_name(split)}: {entry.n_runs:,} runs of {entry.n_questions:,} questions, "
                 f"{entry.accuracy:.1%} correct"
                 for split, entry in metrics.summary.items() if entry.accuracy is not None]
        ranked, other = ranked_scores(metrics)
        scores = list(ranked["score"]) if len(ranked) else []
        reference = pn.widgets.Select(name="AUROC difference against", options=scores, width=260,
                                      value=DEFAULT_REFERENCE if DEFAULT_REFERENCE in scores else
                                      (scores[0] if scores else None), css_classes=["reference-score"])
        table = pn.widgets.Tabulator(ranked_scores(metrics, reference.value)[0], disabled=True, show_index=False,
                                     selectable=False, sizing_mode="stretch_width", layout="fit_data_table",
                                     frozen_columns=["score"], widths={"meaning": 260}, css_classes=["metrics-table"])
        table.style.apply(_highlight_best, axis=1)
        reference.param.watch(lambda event: setattr(table, "value", ranked_scores(metrics, event.new)[0]), "value")
        others = _small_table(other, "other-labels-table")
        return pn.Column(
            pn.pane.HTML("<h4>AUROC / AUPRC for flagging incorrect runs</h4>" + html.escape("; ".join(facts)) +
                         "<br><small>Best test AUROC first (highlighted). ΔAUROC: each score's AUROC minus the "
                         "reference's, with the paired question-bootstrap CI where evaluate.json has it.</small>",
                         sizing_mode="stretch_width"),
            pn.Row(reference, _csv_button(lambda: table.value, "scores.csv")),
            table,
            pn.pane.HTML(f"<small>{html.escape(SELECTIVE_LEGEND)}</small>", sizing_mode="stretch_width"),
            _subheading("Scores of other labels",
                        "Each scored for its own label (e.g. the SE probe flagging high-SE questions), so not "
                        "comparable with the scores above."),
            pn.Row(_csv_button(lambda: other, "other_labels.csv")), others,
            _subheading("Calibration of the accuracy probes' P(correct)",
                        "ECE and Brier score: lower is better, 0 = perfect."),
            pn.Row(_csv_button(lambda: calibration_table(metrics), "calibration.csv")),
            _small_table(calibration_table(metrics), "calibration-table"),
            _subheading("SE regression probe",
                        "Spearman correlation of the predicted with the true SE: higher is better, 1 = same ranking."),
            pn.Row(_csv_button(lambda: se_regression_table(metrics), "se_regression.csv")),
            _small_table(se_regression_table(metrics), "se-regression-table"),
            _subheading("Answer extraction",
                        "Runs whose answer may be label noise, per split "
                        "(stages/lib/questions/answers.py; docs/design.md)."),
            pn.Row(_csv_button(lambda: answer_extraction_table(metrics), "answer_extraction.csv")),
            _small_table(answer_extraction_table(metrics), "answer-extraction-table"),
            sizing_mode="stretch_width")


DEFAULT_REFERENCE = "semantic_entropy"  # the score the others are compared with until the user picks another


def _highlight_best(row: pd.Series) -> list[str]:
    """Tabulator styles: the first row (the best test AUROC, as ranked_scores sorts) bold on green."""
    return ["font-weight: bold; background-color: #e3f4e1" if row.name == 0 else "" for _ in row.index]


def _csv_button(frame: Callable[[], pd.DataFrame], filename: str) -> pn.widgets.FileDownload:
    """A button downloading ``frame()`` (called on click) as ``filename``."""
    return pn.widgets.FileDownload(callback=lambda: io.StringIO(frame().to_csv(index=False)), filename=filename,
                                   label=f"CSV: {filename}", button_type="light", width=200,
                                   css_classes=["results-csv"])


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
