"""The Runs tab: the sidebar's filters, the selection table and one run's drill-down (its probe scores at every
location, its tokens coloured by entropy)."""

from __future__ import annotations
import html
import logging
import io
from pathlib import Path
import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401 - registers HoloViews' Bokeh renderer (what hv.extension does)
import hvplot.pandas  # noqa: F401 - DataFrame.hvplot: the question scatter and the Results curves
import numpy as np
import pandas as pd
import panel as pn
import param
from viewer.loaders import MissingArtifact, load_location_scores, load_question_tokens
from viewer.data import RunStore
from viewer.views.common import (
    HELD_OUT,
    IN_SAMPLE,
    IN_SAMPLE_COLUMN,
    NUMBER,
    PROBE_MARGINS,
    SELECTION_PAGE_SIZE,
    _grey_in_sample,
    escaped_html,
    notice,
)

log = logging.getLogger(__name__)

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
