"""Evaluation: how well each uncertainty score flags incorrect runs, on the test and OOD splits.

Used by the stage ``python -m stages.evaluate`` (or ``dvc repro evaluate``).

Positive class = an INCORRECT run; every score is oriented so that higher = more likely incorrect (see
``SCORES``). For each split and score: AUROC and AUPRC, each with a percentile CI from resampling questions
(``evaluate.bootstrap``, ``evaluate.confidence``) and a one-sided permutation p-value
(``evaluate.permutations``). The SE probe is also scored on its own target (high-SE questions, threshold
from train). A split with one class, or no runs (``data.ood_source: none``), gets null metrics and a note.

Beyond AUROC/AUPRC each score gets AURAC, AURC and PRR (selective prediction); the accuracy probes' P(correct)
gets ECE, Brier and a reliability table; the ridge SE probe its Spearman with SE; and the probe at each traced
position (its layer chosen on val) its AUROC with CI against the share of the reasoning seen (early warning).

Writes
- ``{paths.metrics}/evaluate.json``: ``{split: {score: {auroc, auroc_ci_low, ..., aurac, aurc, prr}}}`` plus
  ``summary`` (counts, accuracy and mean probe confidence per split), ``calibration``, ``se_regression``,
  ``early_warning`` and ``settings``;
- ``{paths.plots}/auroc_by_layer.csv``: AUROC of the probe train_probes fitted on train at every
  (position, layer) (``location_probes``), on val, test and ood;
- ``{paths.plots}/roc.csv``, ``risk_coverage.csv``: ROC and risk-coverage curves of every score on test and ood;
- ``{paths.plots}/reliability.csv``, ``early_warning.csv``: the reliability diagrams and the early-warning curve;
- ``{paths.metrics}/cost/evaluate.json``.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
import pandas as pd
from scipy.special import expit

from stages.lib.metrics import (
    auprc,
    aurac,
    aurc,
    auroc,
    bootstrap_ci,
    brier_score,
    expected_calibration_error,
    permutation_p_value,
    prediction_rejection_ratio,
    reliability_table,
    risk_coverage_curve,
    roc_curve_table,
    single_class_reason,
    spearman,
)
from stages.lib.params import EvaluateParams
from stages.lib.probes import LinearProbe, probe_features, probe_output, score_location_probes
from stages.lib.schema import (
    AUROC_BY_LAYER_COLUMNS,
    CALIBRATED,
    EARLY_WARNING_COLUMNS,
    RELIABILITY_COLUMNS,
    RISK_COVERAGE_COLUMNS,
    ROC_COLUMNS,
    SCORES,
    empty_frame,
    prefix_fraction,
)
from stages.lib.selection import BINARY_LABELS, PROBE_LABEL, probe_labels

log = logging.getLogger(__name__)

EVALUATED_SPLITS = ("test", "ood")
BINARY_PROBES = tuple(name for name, label in PROBE_LABEL.items() if label in BINARY_LABELS)
# the SE probe scored on the label it was trained for
SE_PROBE_ON_HIGH_SE = "se_probe_high_se"


# ---- compute ---------------------------------------------------------------------------------------------
def score_runs(runs: pd.DataFrame, hidden, positions, layers, probes: Mapping[str, LinearProbe]) -> pd.DataFrame:
    """Every score in ``SCORES`` for each run, plus the P(correct) columns of CALIBRATED; one row per row of ``runs``.

    Parameters
    ----------
    runs : (n runs) frame with hidden_row and the run / SE columns of ``train_probes.load_dataset``
    hidden : (rows, positions, layers, hidden) float16 array the hidden_row values index
    probes : every probe of PROBE_FILES (train_probes writes them)
    """
    rows = runs["hidden_row"].to_numpy()

    def decision(name: str) -> np.ndarray:
        probe = probes[name]
        return probe_output(probe, probe_features(probe, hidden, rows, positions, layers))

    p_correct = expit(decision("accuracy"))
    range_p_correct = expit(decision("accuracy_range"))
    baseline_p_correct = probes["entropy_baseline"].predict_proba(runs[["mean_token_entropy"]].to_numpy(float))[:, 1]
    return pd.DataFrame({
        "accuracy_probe": 1 - p_correct,
        "se_probe": expit(decision("se")),
        "semantic_entropy": runs["semantic_entropy"].to_numpy(float),
        "semantic_entropy_weighted": runs["semantic_entropy_weighted"].to_numpy(float),
        "naive_entropy": runs["naive_entropy"].to_numpy(float),
        "mean_token_entropy": runs["mean_token_entropy"].to_numpy(float),
        "entropy_baseline": 1 - baseline_p_correct,
        "negative_sequence_loglik": -runs["sequence_loglik"].to_numpy(float),
        "se_regression_probe": decision("se_regression"),
        "accuracy_range_probe": 1 - range_p_correct,
        "se_range_probe": expit(decision("se_range")),
        "accuracy_probe_p_correct": p_correct,
        "accuracy_range_probe_p_correct": range_p_correct,
    }, index=runs.index)


def metric_record(labels, scores, groups, label_name: str, settings: EvaluateParams, seed: list[int],
                  empty_note: str) -> dict[str, Any]:
    """AUROC and AUPRC of ``scores`` (n,) for ``labels`` (n,) bool, with CIs and p-values; nulls + note if undefined.

    The bootstrap and the permutations of both metrics reuse one seed, so they see the same resamples
    (``bootstrap_resamples_used`` holds for both).
    """
    labels = np.asarray(labels, dtype=bool)
    record: dict[str, Any] = {
        "label": label_name, "n_runs": int(len(labels)), "n_questions": int(len(np.unique(groups))),
        "n_positive": int(labels.sum()), "auroc": None, "auroc_ci_low": None, "auroc_ci_high": None,
        "auroc_p_value": None, "auprc": None, "auprc_ci_low": None, "auprc_ci_high": None, "auprc_p_value": None,
        "auprc_chance": float(labels.mean()) if len(labels) else None, "bootstrap_resamples_used": 0, "note": None,
    }
    reason = single_class_reason(labels, label_name)
    if reason is not None:
        record["note"] = empty_note if len(labels) == 0 else f"{reason}: metrics undefined"
        return record
    for name, metric in (("auroc", auroc), ("auprc", auprc)):
        interval = bootstrap_ci(labels, scores, groups, metric, settings.bootstrap, settings.confidence,
                                np.random.default_rng(seed + [0]))
        record.update({
            name: metric(labels, scores),
            f"{name}_ci_low": interval.low,
            f"{name}_ci_high": interval.high,
            f"{name}_p_value": permutation_p_value(labels, scores, metric, settings.permutations,
                                                   np.random.default_rng(seed + [1])),
        })
        record["bootstrap_resamples_used"] = interval.n_used
    if record["bootstrap_resamples_used"] < settings.bootstrap:
        record["note"] = (f"{settings.bootstrap - record['bootstrap_resamples_used']} of {settings.bootstrap} "
                          "bootstrap resamples had a single class and were skipped")
    return record


def split_metrics(runs: pd.DataFrame, scores: pd.DataFrame, high_se: np.ndarray, split: str,
                  settings: EvaluateParams, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Metrics of every score on one split's runs, and the split's summary (counts, accuracy, confidence).

    Parameters
    ----------
    runs : the split's runs (question_id, correct)
    scores : output of ``score_runs`` for those runs
    high_se : (n,) bool, the high-SE label of each run
    """
    empty_note = f"no runs in split `{split}` (e.g. data.ood_source is none)"
    incorrect = ~runs["correct"].to_numpy(bool)
    groups = runs["question_id"].to_numpy()
    split_index = EVALUATED_SPLITS.index(split)  # part of each metric's seed: independent of the other splits
    by_score = {}
    for score_index, score_name in enumerate(SCORES):
        by_score[score_name] = metric_record(incorrect, scores[score_name].to_numpy(float), groups, "incorrect",
                                             settings, [seed, split_index, score_index], empty_note)
        by_score[score_name].update(selective_metrics(~incorrect, scores[score_name].to_numpy(float)))
        log.info("%s %s: AUROC %s", split, score_name, _fmt(by_score[score_name]["auroc"]))
    by_score[SE_PROBE_ON_HIGH_SE] = metric_record(high_se, scores["se_probe"].to_numpy(float), groups, "high_se",
                                                  settings, [seed, split_index, len(SCORES)], empty_note)

    p_correct = scores["accuracy_probe_p_correct"].to_numpy(float)
    summary = {
        "n_runs": int(len(runs)), "n_questions": int(runs["question_id"].nunique()),
        "n_correct": int((~incorrect).sum()), "n_incorrect": int(incorrect.sum()),
        "accuracy": float((~incorrect).mean()) if len(runs) else None,
        "n_high_se_questions": int(runs.loc[high_se, "question_id"].nunique()),
        "mean_p_correct_on_correct": float(p_correct[~incorrect].mean()) if (~incorrect).any() else None,
        "mean_p_correct_on_incorrect": float(p_correct[incorrect].mean()) if incorrect.any() else None,
        "note": empty_note if len(runs) == 0 else single_class_reason(incorrect, "incorrect"),
    }
    return by_score, summary


def selective_metrics(correct, uncertainty) -> dict[str, float | None]:
    """Selective prediction with one score: AURAC (higher = better), AURC (lower = better) and PRR (1 = oracle,
    0 = random); None for an empty split, PRR None when every run is right or every run is wrong."""
    if len(correct) == 0:
        return {"aurac": None, "aurc": None, "prr": None}
    return {"aurac": aurac(correct, uncertainty), "aurc": aurc(correct, uncertainty),
            "prr": prediction_rejection_ratio(correct, uncertainty)}


def calibration(correct, scores: pd.DataFrame, split: str, n_bins: int) -> tuple[dict[str, Any], pd.DataFrame]:
    """ECE and Brier score of each CALIBRATED probe's P(correct) on one split, and its reliability rows
    (RELIABILITY_COLUMNS); nulls and no rows for an empty split."""
    summary, frames = {}, []
    for probe_name, column in CALIBRATED.items():
        p_correct = scores[column].to_numpy(float)
        empty = len(p_correct) == 0
        summary[probe_name] = {"ece": None if empty else expected_calibration_error(correct, p_correct, n_bins),
                               "brier": None if empty else brier_score(correct, p_correct),
                               "n_bins": n_bins, "n_runs": int(len(p_correct))}
        if len(p_correct):
            frames.append(reliability_table(correct, p_correct, n_bins).assign(probe=probe_name, split=split))
    columns = [c.name for c in RELIABILITY_COLUMNS]
    return summary, (pd.concat(frames, ignore_index=True)[columns] if frames else empty_frame(RELIABILITY_COLUMNS))


def regression_metrics(runs: pd.DataFrame, scores: pd.DataFrame) -> dict[str, Any]:
    """How well the ridge probe's predicted SE tracks the real SE: Spearman over runs, and over questions
    (each question's mean prediction against its SE, which all its runs share)."""
    predicted = scores["se_regression_probe"].to_numpy(float)
    entropy = runs["semantic_entropy"].to_numpy(float)
    per_question = pd.DataFrame({"q": runs["question_id"].to_numpy(), "predicted": predicted, "se": entropy})
    per_question = per_question.groupby("q").mean()
    return {"spearman_runs": spearman(entropy, predicted) if len(runs) else None,
            "spearman_questions": spearman(per_question["se"], per_question["predicted"]) if len(runs) else None,
            "n_runs": int(len(runs)), "n_questions": int(len(per_question))}


def early_warning(selection: Mapping[str, Any], location_probes, datasets: Mapping[str, tuple[pd.DataFrame, Any]],
                  positions, layers, high_se_threshold: float, settings: EvaluateParams,
                  seed: int) -> pd.DataFrame:
    """EARLY_WARNING_COLUMNS rows: at each traced position, the probe at the layer chosen on val for that
    position (selection.json ``by_position``), scored for its own label on each split with a bootstrap CI.

    Only the binary probes (accuracy, se); ``fraction`` is the share of the reasoning seen at the position.
    """
    rows = []
    for choice_index, choice in enumerate(selection["by_position"]):
        if choice["probe"] not in BINARY_PROBES:
            continue
        label_name = PROBE_LABEL[choice["probe"]]
        probe = location_probes[(label_name, choice["position"], int(choice["layer"]))]
        for split_index, (split, (runs, hidden)) in enumerate(datasets.items()):
            record = {"probe": choice["probe"], "position": choice["position"],
                      "fraction": prefix_fraction(choice["position"]), "layer": int(choice["layer"]), "split": split,
                      "auroc": None, "auroc_ci_low": None, "auroc_ci_high": None}
            labels = probe_labels(runs, high_se_threshold)[label_name]
            if single_class_reason(labels, label_name) is None:
                decision = probe.decision_function(probe_features(probe, hidden, runs["hidden_row"].to_numpy(),
                                                                  positions, layers))
                interval = bootstrap_ci(labels, decision, runs["question_id"].to_numpy(), auroc, settings.bootstrap,
                                        settings.confidence,
                                        np.random.default_rng([seed, 7, choice_index, split_index]))
                record.update(auroc=auroc(labels, decision), auroc_ci_low=interval.low, auroc_ci_high=interval.high)
            rows.append(record)
    return pd.DataFrame.from_records(rows, columns=[c.name for c in EARLY_WARNING_COLUMNS])


def risk_coverage_table(correct, scores: pd.DataFrame, split: str) -> pd.DataFrame:
    """RISK_COVERAGE_COLUMNS rows for every score in SCORES on one split (none for an empty split)."""
    if len(correct) == 0:
        return empty_frame(RISK_COVERAGE_COLUMNS)
    frames = [risk_coverage_curve(correct, scores[name].to_numpy(float)).assign(score=name, split=split)
              for name in SCORES]
    return pd.concat(frames, ignore_index=True)[[c.name for c in RISK_COVERAGE_COLUMNS]]


def roc_table(labels, scores: pd.DataFrame, split: str) -> pd.DataFrame:
    """ROC_COLUMNS rows (score, split, fpr, tpr) for every score in SCORES; empty for a single-class split."""
    frames = [roc_curve_table(labels, scores[name].to_numpy(float)).assign(score=name, split=split)
              for name in SCORES]
    return pd.concat(frames, ignore_index=True)[[c.name for c in ROC_COLUMNS]]


def auroc_by_layer(location_probes, datasets: Mapping[str, tuple[pd.DataFrame, Any]], positions, layers,
                   high_se_threshold: float) -> pd.DataFrame:
    """AUROC_BY_LAYER_COLUMNS rows: each train-fitted (probe, position, layer) scored on each split.

    ``datasets`` maps split -> (its runs, the hidden array their hidden_row indexes); empty splits are skipped.
    The accuracy probe is scored for ``correct``, the SE probe for ``high_se`` (their training labels).
    """
    probe_of_label = {label: probe for probe, label in PROBE_LABEL.items()}
    frames = []
    for split, (runs, hidden) in datasets.items():
        if len(runs) == 0:
            log.info("auroc_by_layer: split `%s` has no runs; no rows", split)
            continue
        labels = probe_labels(runs, high_se_threshold)
        table = score_location_probes(location_probes, hidden, runs["hidden_row"].to_numpy(), positions, layers,
                                      {name: labels[name] for name in BINARY_LABELS})
        frames.append(table.assign(probe=table["label"].map(probe_of_label), split=split, auroc=table["score"]))
    return pd.concat(frames, ignore_index=True)[[c.name for c in AUROC_BY_LAYER_COLUMNS]]


def concat_rows(frames: list[pd.DataFrame], columns) -> pd.DataFrame:
    """Concatenate the non-empty frames (empty ones would turn numeric columns into objects)."""
    frames = [frame for frame in frames if len(frame)]
    return pd.concat(frames, ignore_index=True) if frames else empty_frame(columns)


def _fmt(value) -> str:
    return "null" if value is None else f"{value:.3f}"


