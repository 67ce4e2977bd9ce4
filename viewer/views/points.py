"""The Runs tab's linked point plots: every run as a point (margin against entropy, the UMAP of the hidden
states), drawn by datashader above a threshold, a click or a box selecting runs in the shared store."""

from __future__ import annotations
import logging
import datashader as ds
import datashader.transfer_functions as tf
import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401 - registers HoloViews' Bokeh renderer (what hv.extension does)
import hvplot.pandas  # noqa: F401 - DataFrame.hvplot: the question scatter and the Results curves
import numpy as np
import pandas as pd
import panel as pn
import param
from viewer.loaders import ENTROPY_CHOICES, OUTCOMES
from viewer.data import RunStore, stack_codes, stack_runs
from viewer.views.common import (
    DIMMED_ALPHA,
    LABELS,
    OUTCOME_COLOURS,
    PLOT_HEIGHT,
    POINT_ALPHA,
    POINT_SIZE,
    RASTERIZE_ABOVE,
    RASTER_SHAPE,
    SELECTED_COLOUR,
    TAP_TOLERANCE,
    VIRIDIS,
    _padded_range,
    _viewport,
)

log = logging.getLogger(__name__)

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
