"""The early-exit view: the Pareto curve (accuracy against tokens over tau, per stopping rule) with the operating
point calibrated on val, and for a chosen run the answer forced at each prefix of its reasoning.

The app's Early exit tab: ``early_exit_view(root)`` returns a Panel layout built only from what the forced_answers
and early_exit stages wrote (``{paths.metrics}/early_exit.json``, ``{paths.plots}/early_exit_pareto.csv``,
``{paths.forced_answers}/{id,ood}.parquet``) and the runs table, read by ``viewer.loaders.load_early_exit`` (every path
inside the project); nothing is recomputed. ``pareto_plot`` and ``forced_answer_table`` are the pure parts, tested with
plain pytest; the app reads the files with ``load_early_exit`` in a worker thread and builds the layout
(``early_exit_layout``) on the event loop.
"""

from __future__ import annotations

import html
from pathlib import Path

import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401  (registers the Bokeh renderer, as hv.extension does, without output)
import pandas as pd
import panel as pn

from stages.lib.schema.reports import EarlyExitReport
from viewer.loaders import EarlyExitData, load_early_exit

RULE_COLOURS = {"probe": "#1b9e77", "fixed_budget": "#7570b3", "trial_confidence": "#d95f02",
                "consistency": "#e7298a", "answer_entropy": "#66a61e", "probe_give_up": "#e6ab02"}
FORCED_COLUMNS_SHOWN = ["prefix", "reasoning_kept", "reasoning_tokens", "answer", "correct", "mean_logprob",
                        "mean_entropy", "tokens_used"]


def pareto_plot(pareto: pd.DataFrame, split: str, rules: list[str] | None = None) -> hv.Overlay:
    """Accuracy against generated tokens per run over tau, one curve per rule on ``split``; the operating point
    calibrated on val is a large diamond, full reasoning (tau null) a grey cross."""
    part = pareto[pareto["split"] == split]
    if rules is not None:
        part = part[part["rule"].isin(rules)]
    if part.empty:
        raise ValueError(f"no Pareto rows for split {split!r}")
    layers = []
    for rule, rows in part.groupby("rule", sort=False):
        colour = RULE_COLOURS.get(rule, "black")
        rows = rows.sort_values("tokens_used")
        layers.append(hv.Curve(rows, "tokens_used", ["accuracy", "tau", "think_tokens_saved", "loss"],
                               label=rule).opts(color=colour, tools=["hover"]))
        chosen = rows[rows["chosen"].astype(bool)]
        if len(chosen):
            layers.append(hv.Scatter(chosen, "tokens_used", ["accuracy", "tau"]).opts(
                color=colour, marker="diamond", size=14, tools=["hover"]))
    full = part[part["tau"].isna()].head(1)
    layers.append(hv.Scatter(full, "tokens_used", "accuracy", label="full reasoning").opts(
        color="#555555", marker="x", size=12))
    return hv.Overlay(layers).opts(title=f"Early exit, {split}: accuracy against tokens", width=560, height=400,
                                   xlabel="generated tokens per run (trial answers included)", ylabel="accuracy",
                                   legend_position="bottom_right", show_grid=True)


def forced_answer_table(forced: pd.DataFrame, question_id: str, run_id: int, dataset: str = "id") -> pd.DataFrame:
    """The forced answer at each prefix of one run, in prefix order (FORCED_COLUMNS_SHOWN)."""
    rows = forced[(forced["question_id"] == question_id) & (forced["run_id"] == run_id)
                  & (forced["dataset"] == dataset)]
    if rows.empty:
        raise KeyError(f"no forced answers for question {question_id!r} run {run_id} ({dataset})")
    return rows.sort_values("prefix")[FORCED_COLUMNS_SHOWN].reset_index(drop=True)


def operating_points(report: EarlyExitReport, split: str) -> pd.DataFrame:
    """One row per rule: its tau and, on ``split``, accuracy change, think tokens saved and loss against epsilon."""
    rows = []
    for name, rule in report.rules.items():
        outcome = rule.splits.get(split)
        rows.append({"rule": name, "tau": rule.tau,
                     "accuracy full": None if outcome is None else outcome.accuracy_full,
                     "accuracy early exit": None if outcome is None else outcome.accuracy_early_exit,
                     "think tokens saved": None if outcome is None else outcome.think_tokens_saved,
                     "loss": None if outcome is None else outcome.loss,
                     "loss <= epsilon": None if outcome is None else outcome.loss_within_epsilon})
    return pd.DataFrame(rows)


def run_summary(runs: pd.DataFrame, dataset: str, question_id: str, run_id: int) -> str:
    """One line of HTML on a run's full reasoning: its answer (model text, escaped), right or wrong, its tokens."""
    full = runs[(runs["dataset"] == dataset) & (runs["question_id"] == question_id) & (runs["run_id"] == run_id)]
    if full.empty:
        return ""
    return (f"full reasoning: answer <code>{html.escape(str(full['answer'].iloc[0]))}</code> "
            f"({'right' if full['correct'].iloc[0] else 'wrong'}), {int(full['n_generated'].iloc[0])} tokens")


def early_exit_view(root: str | Path) -> pn.viewable.Viewable:
    """The page section for the project at ``root`` (``early_exit_layout`` of ``load_early_exit``)."""
    return early_exit_layout(load_early_exit(root))


def early_exit_layout(data: EarlyExitData) -> pn.viewable.Viewable:
    """The page section: split and rule pickers, the Pareto curve, the operating points, and a run picker with
    that run's forced answers at each prefix."""
    splits = [s for s in ("test", "ood", "val") if (data.pareto["split"] == s).any()]
    split = pn.widgets.Select(label="split", options=splits, value=splits[0])
    rules = pn.widgets.MultiChoice(label="rules", options=list(data.report.rules), value=list(data.report.rules))
    keys = data.forced[["dataset", "question_id", "run_id"]].drop_duplicates()
    labels = {f"{row.dataset} {row.question_id} #{row.run_id}": (row.dataset, row.question_id, int(row.run_id))
              for row in keys.itertuples()}
    run = pn.widgets.Select(label="run", options=list(labels))

    def curve(split_name, chosen_rules):
        return pn.pane.HoloViews(pareto_plot(data.pareto, split_name, chosen_rules or None))

    def table(label):
        dataset, question_id, run_id = labels[label]
        summary = run_summary(data.runs, dataset, question_id, run_id)
        return pn.Column(pn.pane.HTML(summary, disable_math=True),
                         pn.widgets.Tabulator(forced_answer_table(data.forced, question_id, run_id, dataset),
                                              disabled=True, show_index=False))

    settings = data.report.settings
    header = pn.pane.Markdown(f"**{settings.method}**; epsilon = {settings.epsilon}, delta = {settings.delta}, "
                              f"{settings.n_calibration_questions} calibration questions "
                              f"({settings.calibration_split})")
    points = pn.bind(lambda s: pn.widgets.Tabulator(operating_points(data.report, s), disabled=True,
                                                    show_index=False), split)
    return pn.Column(header, pn.Row(split, rules), pn.bind(curve, split, rules), points, run, pn.bind(table, run))
