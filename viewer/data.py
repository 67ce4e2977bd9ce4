"""Data for the viewer: cached loaders for one run's artifacts, and the one store every view follows.

The viewer reads only what the `evaluate`, `stability`, `cost_ratio` and `analysis` stages wrote (DESIGN.md),
found through the project's own ``params.yaml`` ``paths:``; it never recomputes the pipeline. Every loader takes
the project root as an argument (``viewer/app.py`` passes the checkout it lives in, tests pass a temporary
project), and no path comes from a URL, a widget or an environment variable.

``RunStore`` holds the filters and the frames derived from them (Panel's structure_data_store pattern):

    table     every run (ANALYSIS.columns + ``outcome``), shared read-only by all sessions
    filtered  the runs passing the sidebar filters            -> both plots, the count
    selected  the filtered runs inside the last box or lasso selection -> both plots' ring, the selection table
    question_runs  all K runs of the chosen question (unfiltered), for the question details
    run       the row (of ``table``) of the run drilled into: its probe scores per location and its tokens
"""

from __future__ import annotations
import logging
from typing import Any
import numpy as np
import pandas as pd
import panel as pn
import param
from viewer.loaders import CORRECTNESS_CHOICES, DATASET_CHOICES, PROBE_CHOICES, SPLIT_ORDER

log = logging.getLogger(__name__)


# ---- point geometry for the run plots ------------------------------------------------------------------------


def points_in_polygon(xs: np.ndarray, ys: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Mask of the points inside ``polygon`` (``(n, 2)`` vertices, closed implicitly), by the even-odd rule.

    HoloViews' own lasso test (``holoviews.element.selection.spatial_select``) needs spatialpandas or shapely,
    neither of which the project installs; this crossing-number test is vectorised over points, O(points x
    vertices), about 20 ms for 100k points and a 100-vertex lasso.
    """
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    polygon = np.asarray(polygon, dtype=float)
    inside = np.zeros(xs.shape, dtype=bool)
    if polygon.ndim != 2 or len(polygon) < 3:
        return inside
    x_start, y_start = polygon[:, 0], polygon[:, 1]
    x_end, y_end = np.roll(x_start, -1), np.roll(y_start, -1)
    for xa, ya, xb, yb in zip(x_start, y_start, x_end, y_end):
        if ya == yb:
            continue  # a horizontal edge never crosses the horizontal ray
        spans = (ya > ys) != (yb > ys)
        crossing_x = xa + (ys - ya) * (xb - xa) / (yb - ya)
        inside ^= spans & (xs < crossing_x)
    return inside


def stack_codes(frame: pd.DataFrame, x: str, y: str) -> tuple[np.ndarray, int]:
    """The spot of each run of ``frame``: codes numbering its distinct ``(x, y)`` points in order of first appearance,
    and how many there are (one hash pass, ~6 ms at 100k runs: the plots call it before deciding to rasterise)."""
    points = np.empty(len(frame), dtype=np.complex128)
    points.real, points.imag = frame[x].to_numpy(dtype=float), frame[y].to_numpy(dtype=float)
    codes, spots = pd.factorize(points, use_na_sentinel=False)
    return codes, len(spots)


def stack_runs(frame: pd.DataFrame, x: str, y: str, codes: np.ndarray | None = None) -> pd.DataFrame:
    """One row per distinct ``(x, y)`` point of ``frame``: runs with identical answers have identical hidden states,
    so many runs sit on one spot (2,740 points for 7,000 runs in the default run).

    Returns the first run of each stack (its columns and row label), plus ``runs`` (how many runs the point
    holds, k), ``runs_correct`` (how many of them are correct) and ``stack`` (``"×k"``, empty for a single run),
    in the order of first appearance. ``codes``: ``stack_codes(frame, x, y)[0]``, when the caller has them.
    """
    if frame.empty:
        return frame.assign(runs=np.zeros(0, dtype=np.int64), runs_correct=np.zeros(0, dtype=np.int64),
                            stack=np.array([], dtype=object))
    if codes is None:
        codes = stack_codes(frame, x, y)[0]
    # codes count up in order of first appearance, so a run opens its stack where its code exceeds all before it
    first = codes > np.maximum.accumulate(np.concatenate([[-1], codes[:-1]]))
    sizes = np.bincount(codes)
    correct = np.bincount(codes, weights=frame["correct"].to_numpy(dtype=float)).astype(np.int64)
    stacks = frame[first]
    return stacks.assign(runs=sizes, runs_correct=correct,
                         stack=np.where(sizes > 1, np.char.add("×", sizes.astype(str)), ""))


def question_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per question of ``runs``: dataset, question_id, split, question, semantic_entropy, accuracy (the share
    of its runs in ``runs`` that are correct) and n_runs (how many)."""
    if runs.empty:
        return pd.DataFrame(columns=["dataset", "question_id", "split", "question", "semantic_entropy", "accuracy",
                                     "n_runs"])
    grouped = runs.groupby(["dataset", "question_id"], observed=True, sort=False)
    summary = grouped.agg(split=("split", "first"), question=("question", "first"),
                          semantic_entropy=("semantic_entropy", "first"), accuracy=("correct", "mean"),
                          n_runs=("correct", "size")).reset_index()
    for column in ("dataset", "split"):
        summary[column] = summary[column].astype(str)
    return summary


def question_from_link(table: pd.DataFrame, value: Any) -> tuple[str, str] | None:
    """The (dataset, question_id) a ``?question=<id>`` link names, or None: only an id present in ``table``, compared
    as an exact string (bytes decoded as UTF-8, at most 200 characters), is accepted; anything else is ignored."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str) or not value or len(value) > 200:
        return None
    matches = table.loc[(table["question_id"] == value).to_numpy(), "dataset"]
    if matches.empty:
        return None
    return str(matches.iloc[0]), value


# ---- the store ---------------------------------------------------------------------------------------------


class RunStore(param.Parameterized):
    """The filters every view follows, and the frames derived from them.

    Filtering never copies more than the rows in view; ``table`` is shared and never modified.
    """

    table = param.DataFrame(precedence=-1, doc="Every run: ANALYSIS.columns plus `outcome`.")

    datasets = param.ListSelector(default=["id", "ood"], objects=DATASET_CHOICES, doc="Question sets in view.")
    splits = param.ListSelector(default=list(SPLIT_ORDER), objects=list(SPLIT_ORDER), doc="Question splits in view.")
    correctness = param.Selector(default="all", objects=CORRECTNESS_CHOICES, doc="Keep all, correct or incorrect runs.")
    se_range = param.Range(default=(0.0, 1.0), doc="Semantic entropy (nats) of the run's question, inclusive.")
    n_clusters = param.Range(default=(1, 1), doc="Semantic clusters among the question's K answers, inclusive.")
    search = param.String(default="", doc="Case-insensitive text in the question (or its id).")
    probe = param.Selector(default="accuracy", objects=PROBE_CHOICES, doc="Probe whose margin and score are shown.")

    selection = param.Array(default=np.empty(0, dtype=np.int64),
                            doc="Row labels (of `table`) chosen by the last box or lasso selection.")
    question = param.Tuple(default=None, length=2, allow_None=True, doc="(dataset, question_id) being read.")
    run = param.Integer(default=None, allow_None=True, doc="Row label (of `table`) of the run drilled into: one of "
                                                           "`question_runs`, the first when a question opens.")

    filtered = param.DataFrame(precedence=-1, doc="Runs passing the filters.")
    selected = param.DataFrame(precedence=-1, doc="Filtered runs inside the selection.")
    # Bumped after `filtered` / `selected` change. Plots watch these instead of the frames: a watcher of a
    # DataFrame parameter compares the old and new 100k-run frames on every change.
    filtered_revision = param.Integer(default=0, precedence=-1)
    selected_revision = param.Integer(default=0, precedence=-1)
    question_runs = param.DataFrame(precedence=-1, doc="All K runs of `question`, by cluster then run.")

    def __init__(self, table: pd.DataFrame, **params):
        se = table["semantic_entropy"]
        clusters = table["n_clusters"]
        se_bounds = (float(se.min()), float(se.max())) if len(table) else (0.0, 1.0)
        cluster_bounds = (int(clusters.min()), int(clusters.max())) if len(table) else (1, 1)
        splits = {str(split) for split in table["split"].unique()}
        present_splits = [split for split in SPLIT_ORDER if split in splits] + sorted(splits - set(SPLIT_ORDER))
        super().__init__(table=table)
        # Bounds come from the data, so they are set on this store's own copies of the parameters.
        self.param.se_range.bounds = se_bounds
        self.param.n_clusters.bounds = cluster_bounds
        self.param.splits.objects = present_splits
        with param.parameterized.discard_events(self):
            self.param.update(**{"se_range": se_bounds, "n_clusters": cluster_bounds, "splits": present_splits,
                                 **params})
        self._apply_filters()
        self._load_question()

    # -- derived frames --
    def filter_mask(self) -> np.ndarray:
        """Boolean mask over ``table`` for the current filters."""
        table = self.table
        mask = table["dataset"].isin(self.datasets).to_numpy() & table["split"].isin(self.splits).to_numpy()
        if self.correctness != "all":
            mask &= table["correct"].to_numpy() == (self.correctness == "correct")
        low, high = self.se_range
        mask &= table["semantic_entropy"].between(low, high).to_numpy()
        low, high = self.n_clusters
        mask &= table["n_clusters"].between(low, high).to_numpy()
        text = self.search.strip()
        if text:
            found = table["question"].str.contains(text, case=False, regex=False)
            found |= table["question_id"].str.contains(text, case=False, regex=False)
            mask &= found.fillna(False).to_numpy(dtype=bool)
        return mask

    @param.depends("datasets", "splits", "correctness", "se_range", "n_clusters", "search", watch=True)
    def _apply_filters(self) -> None:
        # One batch of page updates for the count, both plots and the table (a no-op outside a served session),
        # and one param.update, so that a view following both frames redraws once.
        with pn.io.hold(freeze=True):
            filtered = self.table[self.filter_mask()]
            self.param.update(filtered=filtered, selected=self._selected_rows(filtered),
                              filtered_revision=self.filtered_revision + 1,
                              selected_revision=self.selected_revision + 1)

    def _selected_rows(self, filtered: pd.DataFrame) -> pd.DataFrame:
        if len(self.selection) == 0:
            return filtered.iloc[:0]
        return filtered[filtered.index.isin(self.selection)]

    @param.depends("selection", watch=True)
    def _select(self) -> None:
        before, selected = self.selected, self._selected_rows(self.filtered)
        if before is not None and before.empty and selected.empty:
            return  # an empty selection stays drawn as it is
        with pn.io.hold(freeze=True):
            self.param.update(selected=selected, selected_revision=self.selected_revision + 1)

    @param.depends("question", watch=True)
    def _load_question(self) -> None:
        table = self.table
        if self.question is None:
            self.param.update(question_runs=table.iloc[:0], run=None)
            return
        dataset, question_id = self.question
        runs = table[(table["dataset"] == dataset).to_numpy() & (table["question_id"] == question_id).to_numpy()]
        runs = runs.sort_values(["cluster_id", "run_id"])
        self.param.update(question_runs=runs, run=int(runs.index[0]) if len(runs) else None)

    # -- actions the views call --
    def margin_column(self) -> str:
        return f"{self.probe}_probe_margin"

    def score_column(self) -> str:
        return f"{self.probe}_probe_prob"

    def select_box(self, x: str, y: str, bounds: tuple[float, float, float, float] | None) -> None:
        """Select the filtered runs with ``x0 <= row[x] <= x1`` and ``y0 <= row[y] <= y1``; None clears."""
        if bounds is None:
            self.selection = np.empty(0, dtype=np.int64)
            return
        x0, y0, x1, y1 = bounds
        frame = self.filtered
        inside = frame[x].between(min(x0, x1), max(x0, x1)) & frame[y].between(min(y0, y1), max(y0, y1))
        self.selection = frame.index[inside.to_numpy()].to_numpy(dtype=np.int64)

    def select_lasso(self, x: str, y: str, polygon: np.ndarray | None) -> None:
        """Select the filtered runs whose ``(row[x], row[y])`` lies inside ``polygon`` (``(n, 2)`` vertices)."""
        if polygon is None or len(polygon) < 3:
            self.clear_selection()
            return
        frame = self.filtered
        inside = points_in_polygon(frame[x].to_numpy(), frame[y].to_numpy(), np.asarray(polygon, dtype=float))
        self.selection = frame.index[inside].to_numpy(dtype=np.int64)

    def clear_selection(self) -> None:
        self.selection = np.empty(0, dtype=np.int64)

    def open_question(self, dataset: str, question_id: str) -> None:
        self.question = (str(dataset), str(question_id))

    def open_run(self, row: int) -> None:
        """Drill into the run at row label ``row`` of ``table`` (opening its question first if need be)."""
        run = self.table.loc[row]
        question = (str(run["dataset"]), str(run["question_id"]))
        if self.question != question:
            self.question = question
        self.run = int(row)

    def nearest_run(self, x: str, y: str, point: tuple[float, float], tolerance: tuple[float, float]) -> int | None:
        """Row label of the filtered run nearest ``point`` in (x, y), distances scaled by ``tolerance`` (the
        data units of a few pixels on each axis); None when none is within it."""
        frame = self.filtered
        if frame.empty or point[0] is None or point[1] is None:
            return None
        dx = (frame[x].to_numpy(float) - point[0]) / tolerance[0]
        dy = (frame[y].to_numpy(float) - point[1]) / tolerance[1]
        distance = np.hypot(dx, dy)
        best = int(np.nanargmin(distance)) if np.isfinite(distance).any() else None
        return None if best is None or distance[best] > 1.0 else int(frame.index[best])

    def reset_filters(self) -> None:
        defaults = {name: self.param[name].default for name in ("correctness", "search", "probe")}
        self.param.update(datasets=list(DATASET_CHOICES.values()), splits=list(self.param.splits.objects),
                          se_range=self.param.se_range.bounds, n_clusters=self.param.n_clusters.bounds, **defaults)

    # -- what the count says --
    def count_text(self) -> str:
        return f"{len(self.filtered):,} of {len(self.table):,} runs in view"
