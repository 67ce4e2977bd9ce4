"""The Results tab's text tables, each made from evaluate.json, stability.json or cost_ratio.json as written: the
metrics with their intervals, the ranking against a reference score, calibration, SE regression, answer
extraction, stability and the cost ratio. Nothing is recomputed."""

from __future__ import annotations
import logging
import math
from typing import Any
import pandas as pd
from stages.lib import registry
from stages.lib.schema.reports import (
    CostRatio,
    EvaluateReport,
    IncorrectMetrics,
    StabilityReport,
    StabilitySpread,
)


log = logging.getLogger(__name__)


# Selective-prediction columns of the metrics table (evaluate.json key -> label), and what their values mean.
SELECTIVE_METRICS = {"aurac": "AURAC", "aurc": "AURC", "prr": "PRR"}


SELECTIVE_LEGEND = ("Selective prediction (answer only the runs a score finds least uncertain): AURAC higher is "
                    "better, AURC lower is better, PRR 1 = oracle, 0 = random.")


# Headline columns of the Experiments view: (split, score) AUROCs from evaluate.json.
HEADLINE_SCORES = tuple(score.name for score in registry.SCORES if score.headline)


# ---- derived tables for the Results view ------------------------------------------------------------------


def _interval(value: Any, low: Any, high: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if low is None or high is None:
        return f"{value:.3f}"
    return f"{value:.3f} ({low:.3f}-{high:.3f})"


def metrics_table(metrics: EvaluateReport) -> pd.DataFrame:
    """One row per score: AUROC and AUPRC with their CIs, AUPRC chance and p-values, and for scores of incorrect
    runs AURAC, AURC and PRR (SELECTIVE_METRICS), for test and OOD.

    Scores keep evaluate.json's order; higher always means "this run is more likely" its label (incorrect, or
    high SE for the SE probe on its own label).
    """
    splits = [split for split in ("test", "ood") if split in metrics.splits]
    scores = list(dict.fromkeys(score for split in splits for score in metrics.splits[split]))
    descriptions = {**metrics.settings.other_labels, **metrics.settings.scores}
    rows = []
    for score in scores:
        row = {"score": score, "meaning": descriptions.get(score, "")}
        for split in splits:
            entry = metrics.splits[split].get(score)
            label = _split_label(split)
            if entry is None:  # not scored on this split
                row.update({f"{label} {column}": "n/a" for column in ("AUROC (CI)", "AUPRC (CI)", "AUPRC chance",
                                                                       "AUROC p", *SELECTIVE_METRICS.values())})
                continue
            row[f"{label} AUROC (CI)"] = _interval(entry.auroc, entry.auroc_ci_low, entry.auroc_ci_high)
            row[f"{label} AUPRC (CI)"] = _interval(entry.auprc, entry.auprc_ci_low, entry.auprc_ci_high)
            row[f"{label} AUPRC chance"] = _number(entry.auprc_chance)
            row[f"{label} AUROC p"] = _number(entry.auroc_p_value, 4)
            for key, name in SELECTIVE_METRICS.items():
                row[f"{label} {name}"] = _number(getattr(entry, key)) if isinstance(entry, IncorrectMetrics) else "n/a"
        rows.append(row)
    return pd.DataFrame(rows)


def score_label(metrics: EvaluateReport, score: str) -> str:
    """The label a score is evaluated against (``incorrect`` for most; e.g. ``high_se`` for the SE probe)."""
    for split in metrics.splits.values():
        if score in split:
            return split[score].label
    return ""


def paired_differences(metrics: EvaluateReport) -> dict[tuple[str, str, str], tuple[float, float, float]]:
    """evaluate.json's paired AUROC differences (``schema.PairedDifferenceMetrics``, paired question-level
    bootstrap): {(split, score, reference): (difference, ci_low, ci_high)}, in both orders (b - a is the negated,
    flipped interval). Undefined differences (a single-class split) are left out."""
    found: dict[tuple[str, str, str], tuple[float, float, float]] = {}
    for entry in metrics.paired_differences:
        if entry.difference is None or entry.ci_low is None or entry.ci_high is None:
            continue
        found[(entry.split, entry.a, entry.b)] = (entry.difference, entry.ci_low, entry.ci_high)
        found[(entry.split, entry.b, entry.a)] = (-entry.difference, -entry.ci_high, -entry.ci_low)
    return found


def ranked_scores(metrics: EvaluateReport, reference: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The metrics table split in two and ranked: (scores of incorrect runs, best test AUROC first, with each one's
    AUROC difference from ``reference`` per split; scores of other labels, e.g. the SE probe on high SE, which
    compete with nothing here).

    The difference columns (``<split> ΔAUROC vs <reference>``) hold the paired bootstrap difference and CI where
    evaluate.json has ``paired_differences``, else the plain difference of the two AUROCs marked "(no CI)".
    """
    table = metrics_table(metrics)
    if table.empty:
        return table, table
    labels = table["score"].map(lambda score: score_label(metrics, score))
    incorrect, other = table[labels == "incorrect"].copy(), table[labels != "incorrect"].reset_index(drop=True)
    splits = [split for split in ("test", "ood") if split in metrics.splits]
    def auroc(split, score):
        entry = metrics.splits[split].get(score)
        return None if entry is None or entry.auroc is None else float(entry.auroc)
    order = sorted(incorrect["score"], key=lambda score: -(auroc(splits[0], score) or -1.0) if splits else 0.0)
    incorrect = incorrect.set_index("score").loc[order].reset_index()
    if reference is None or reference not in set(incorrect["score"]):
        reference = incorrect["score"].iloc[0]
    paired = paired_differences(metrics)
    for split in splits:
        column = f"{_split_label(split)} ΔAUROC vs {reference}"
        values = []
        for score in incorrect["score"]:
            if score == reference:
                values.append("reference")
            elif (split, score, reference) in paired:
                difference, low, high = paired[(split, score, reference)]
                values.append(f"{difference:+.3f} ({low:+.3f} to {high:+.3f})")
            elif auroc(split, score) is not None and auroc(split, reference) is not None:
                values.append(f"{auroc(split, score) - auroc(split, reference):+.3f} (no CI)")
            else:
                values.append("n/a")
        incorrect.insert(incorrect.columns.get_loc(f"{_split_label(split)} AUROC (CI)") + 1, column, values)
    meaning = incorrect.pop("meaning")
    incorrect["meaning"] = meaning  # the long text last, so the numbers fit at 1280 px
    return incorrect, other


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _split_label(split: str) -> str:
    return "OOD" if split == "ood" else split


def calibration_table(metrics: EvaluateReport) -> pd.DataFrame:
    """evaluate.json's ``calibration``: one row per (split, calibrated score) with ECE and Brier score (lower is
    better)."""
    rows = [{"split": _split_label(split), "probe": probe, "ECE": _number(entry.ece), "Brier": _number(entry.brier),
             "bins": entry.n_bins, "runs": entry.n_runs}
            for split, by_probe in metrics.calibration.items() for probe, entry in by_probe.items()]
    return pd.DataFrame(rows, columns=["split", "probe", "ECE", "Brier", "bins", "runs"])


def se_regression_table(metrics: EvaluateReport) -> pd.DataFrame:
    """evaluate.json's ``se_regression``: per split, the Spearman correlation of the ridge probe's predicted SE
    with the true SE over runs and over questions."""
    rows = [{"split": _split_label(split), "Spearman (runs)": _number(entry.spearman_runs),
             "Spearman (questions)": _number(entry.spearman_questions), "runs": entry.n_runs,
             "questions": entry.n_questions}
            for split, entry in metrics.se_regression.items()]
    return pd.DataFrame(rows, columns=["split", "Spearman (runs)", "Spearman (questions)", "runs", "questions"])


ANSWER_EXTRACTION_LABELS = {"n_runs": "runs", "n_truncated": "truncated (token cap)",
                            "n_truncated_in_think": "stopped inside the think span (no answer, wrong)",
                            "n_no_answer": "no parseable answer", "n_last_number_fallback": "last-number fallback"}


def answer_extraction_table(metrics: EvaluateReport) -> pd.DataFrame:
    """evaluate.json's ``answer_extraction``: per split, how many runs were truncated, stopped in the think span,
    had no parseable answer or were answered by the last-number fallback (possible label noise)."""
    rows = [{"split": _split_label(split), **{label: getattr(entry, key)
                                              for key, label in ANSWER_EXTRACTION_LABELS.items()}}
            for split, entry in metrics.answer_extraction.items()]
    return pd.DataFrame(rows, columns=["split", *ANSWER_EXTRACTION_LABELS.values()])


def _spread(entry: StabilitySpread | None) -> str:
    """"mean ± std (min-max)" of one stability.json entry, with what is defined."""
    if entry is None or entry.mean is None:
        return "n/a"
    text = f"{entry.mean:.3f}" if entry.std is None else f"{entry.mean:.3f} ± {entry.std:.3f}"
    return text if entry.min is None or entry.max is None else f"{text} ({entry.min:.3f}-{entry.max:.3f})"


def stability_table(stability: StabilityReport) -> pd.DataFrame:
    """stability.json as one row per score: per split, AUROC mean ± sample std over the seeds (min-max), and the
    number of seeds where AUROC was defined ("test/OOD" counts when they differ)."""
    splits = [split for split in ("test", "ood") if split in stability.splits]
    scores = list(dict.fromkeys(score for split in splits for score in stability.splits[split]))
    rows = []
    for score in scores:
        entries = [stability.splits[split].get(score) for split in splits]
        row = {"score": score}
        row.update({f"{_split_label(split)} AUROC": _spread(entry) for split, entry in zip(splits, entries)})
        counts = list(dict.fromkeys("n/a" if entry is None else str(entry.n_seeds) for entry in entries))
        row["seeds"] = "/".join(counts)
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["score"])


def _times(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}x" if value >= 100 else f"{value:.1f}x"


def cost_ratio_text(cost: CostRatio) -> str:
    """cost_ratio.json as one sentence: what SE costs per question against one probe evaluation."""
    return (f"SE costs {_times(cost.seconds_ratio)} a probe evaluation in seconds ({cost.se_seconds_per_question:.3g}"
            f" s vs {cost.probe_seconds_per_question:.3g} s per question) and {_times(cost.tokens_ratio)} in tokens "
            f"({cost.se_generated_tokens_per_question:,.0f} generated vs {cost.probe_tokens_per_question:,.0f} in one"
            f" pass), with K = {cost.runs_per_question} runs per question.")
