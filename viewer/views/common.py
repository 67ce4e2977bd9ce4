"""What every view shares: the outcome colours and labels, escaping of untrusted text, notices, and the
HoloViews set-up (the Bokeh backend, canvas rendering).

Model outputs (questions, answers, think text) are untrusted. They reach the page only through
Tabulator cells (Tabulator's default formatters escape), Bokeh hover tooltips (``@{column}`` fields are inserted
as text) or ``escaped_html`` (``html.escape`` first: Panel's ``Str``/``HTML``/``Markdown`` panes all end in
innerHTML, so even ``pn.pane.Str`` renders ``<img onerror=...>`` as a live element in Panel 1.9).
"""

from __future__ import annotations
import html
import logging
import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401 - registers HoloViews' Bokeh renderer (what hv.extension does)
import hvplot.pandas  # noqa: F401 - DataFrame.hvplot: the question scatter and the Results curves
import numpy as np
import pandas as pd
import panel as pn
from bokeh.models.widgets.tables import NumberFormatter
from bokeh.palettes import Viridis256
from stages.lib import registry


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

NUMBER = NumberFormatter(format="0.000")  # numbers only, so Bokeh's HTML formatting is safe here

# The selection table's column saying whether the probes saw the run in training (the train split) or not.
IN_SAMPLE_COLUMN, IN_SAMPLE, HELD_OUT = "probe scores", "in-sample (train)", "held-out"

def _grey_in_sample(row: pd.Series) -> list[str]:
    """Tabulator cell styles for one row: an in-sample run's probe scores grey and italic."""
    grey = row.get(IN_SAMPLE_COLUMN) == IN_SAMPLE
    return ["color: #999; font-style: italic" if grey and (column in PROBE_MARGINS or column == IN_SAMPLE_COLUMN)
            else "" for column in row.index]
