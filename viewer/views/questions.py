"""The Questions tab: every question as a point (accuracy against semantic entropy) and one question's runs."""

from __future__ import annotations
import html
import logging
import urllib.parse
import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401 - registers HoloViews' Bokeh renderer (what hv.extension does)
import hvplot.pandas  # noqa: F401 - DataFrame.hvplot: the question scatter and the Results curves
import pandas as pd
import panel as pn
import param
from viewer.loaders import DATASET_CHOICES
from viewer.data import RunStore, question_summary
from viewer.views.common import LABELS, NUMBER, PROBE_COLUMNS, escaped_html

log = logging.getLogger(__name__)

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
