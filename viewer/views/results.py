"""The Results tab: the figures of the evaluate and stability stages' plot tables and their metrics tables, every
number read from the stage outputs."""

from __future__ import annotations
import html
import logging
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401 - registers HoloViews' Bokeh renderer (what hv.extension does)
import hvplot.pandas  # noqa: F401 - DataFrame.hvplot: the question scatter and the Results curves
import numpy as np
import pandas as pd
import panel as pn
import param
from bokeh.models import TeeHead
from bokeh.palettes import Category20
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
from viewer.tables import (
    SELECTIVE_LEGEND,
    answer_extraction_table,
    calibration_table,
    cost_ratio_text,
    ranked_scores,
    se_regression_table,
    stability_table,
)
from viewer.loaders import MissingArtifact, load_metrics, load_plot_table
from viewer.views.common import notice

log = logging.getLogger(__name__)

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

    To show another CSV that `evaluate` writes: add its name and schema columns to ``viewer.loaders.PLOT_TABLES``, write
    ``draw(frame, settings)`` (the validated table, evaluate.json's ``settings`` or None when evaluate.json is
    missing; return any HoloViews object) and
    add an entry to ``RESULT_PLOTS``. A missing or malformed file, or a ``draw`` raising ``NothingToDraw`` (no
    rows to draw), shows as a notice in its section only.
    """

    table: str  # a key of viewer.loaders.PLOT_TABLES
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
        """Fill the shown tab's section with its figure, and each other one when its tab is first shown; without a
        server (a script or a test), every section right away.

        Only reading a plot's table runs in a worker thread. HoloViews builds and renders each panel on the event
        loop, which other sessions get back between panels: rendering also updates process-wide state (HoloViews
        turns Bokeh's property validation, one switch for the whole process, off and back on around each update),
        so figures drawn in threads (two sessions opening Results) could leave validation off for good and break
        every later page (issue 28). Drawing only what is shown keeps that work on the loop small."""
        doc = pn.state.curdoc
        if doc is None or doc.session_context is None or tabs is None:
            for plot, section in sections:
                section[1] = self.draw(plot, settings)
            return
        # Panel's own HoloViews pane renders this way: a server-mode renderer, the figure owned by this session's
        # document (which cleans it up when the session ends).
        renderer = hv.renderer("bokeh").instance(mode="server")
        started: set[int] = set()

        def fill(index: int) -> None:
            if index in started or index not in range(len(sections)):
                return
            started.add(index)
            plot, section = sections[index]

            async def draw() -> None:
                import asyncio

                try:
                    table = await asyncio.to_thread(load_plot_table, self.root, plot.table)
                    panels = result_panels(plot.draw(table, settings))
                    figures = []
                    for panel in panels:
                        await asyncio.sleep(PAUSE_S)  # other sessions' events run between two steps
                        figures.append(renderer.get_plot(panel, doc=doc).state)
                except (MissingArtifact, NothingToDraw) as missing:
                    section[1] = notice(str(missing))
                    return
                except Exception as error:  # noqa: BLE001 - say so in its section, not only in the log
                    log.exception("drawing %s", plot.title)
                    section[1] = notice(f"{plot.title}: could not be drawn ({type(error).__name__}: {error})")
                    return
                section[1] = _panel_grid([pn.pane.Bokeh(figure, sizing_mode="stretch_width") for figure in figures],
                                         plot.columns)

            pn.state.execute(draw)

        tabs.param.watch(lambda event: fill(event.new), "active")
        fill(tabs.active)

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
