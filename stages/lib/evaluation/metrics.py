"""Pure metric math for the evaluate stage: AUROC, AUPRC, question-level bootstrap CIs, paired differences and
permutation p-values (the selective-prediction and calibration metrics are in ``selective.py``).

No file I/O. Every ranking metric takes ``labels`` (positive class = True / 1) and ``scores`` (higher = more
likely positive) and returns ``None`` instead of raising when the labels hold a single class, because a
test or OOD split where every run is correct is a legitimate outcome to report, not a crash.
``single_class_reason`` says why in words, for the ``note`` field of the metrics JSON.

AUROC is computed from ranks (the Mann-Whitney U statistic, ties counted as half) and AUPRC as
scikit-learn's average precision; both match scikit-learn exactly (tests check it) but skip its input
validation, which dominates the cost of thousands of bootstrap and permutation resamples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pandas as pd
from scipy.stats import rankdata

log = logging.getLogger(__name__)

Metric = Callable[[np.ndarray, np.ndarray], Optional[float]]


def _as_arrays(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or scores.ndim != 1 or len(labels) != len(scores):
        raise ValueError(f"labels and scores must be 1-D of equal length; got shapes {labels.shape}, {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"scores contain {int(np.sum(~np.isfinite(scores)))} non-finite values")
    if labels.dtype != bool:
        if not np.all(np.isin(labels, (0, 1))):
            raise ValueError("labels must be boolean or 0/1")
        labels = labels.astype(bool)
    return labels, scores


TIE_RTOL = 1e-9
"""Scores closer than this (relative to their magnitude, ``TIE_ATOL`` near zero) are one value: ``exact_ties``."""
TIE_ATOL = 1e-12


def exact_ties(values, rtol: float = TIE_RTOL, atol: float = TIE_ATOL) -> np.ndarray:
    """``values`` with every group of values equal up to floating-point rounding replaced by one value.

    Sorted, two neighbours belong to one tie group when they differ by at most ``atol + rtol * max(|a|, |b|)``;
    each group takes its smallest member's value. A score that is exactly constant on a set of runs but computed
    through an eigen-solver or a sum in a different order (EigV = C and Eccentricity = sqrt(C - 1) for C cliques,
    off by up to 4.4e-15 depending on the cluster sizes) would otherwise rank those runs in an order set by the
    rounding, which every rank-based metric (AUROC, AUPRC, risk-coverage, PRR, the paired differences) and every
    threshold rule reads as signal. The groups do not depend on the order of ``values``; non-finite values
    (-inf for "no confidence", NaN) are kept as they are.

    Parameters
    ----------
    values : (...) float
    rtol, atol : float >= 0

    Returns
    -------
    float64 array of the same shape.
    """
    values = np.array(values, dtype=np.float64)
    flat = values.reshape(-1)
    finite = np.flatnonzero(np.isfinite(flat))
    if len(finite) < 2:
        return values
    order = finite[np.argsort(flat[finite], kind="mergesort")]
    ordered = flat[order]
    gap_allowed = atol + rtol * np.maximum(np.abs(ordered[1:]), np.abs(ordered[:-1]))
    group = np.r_[0, np.cumsum(np.diff(ordered) > gap_allowed)]  # (n finite,) tie-group id, ascending
    first_of_group = np.r_[0, np.flatnonzero(np.diff(group)) + 1]
    flat[order] = ordered[first_of_group][group]
    return values


def single_class_reason(labels, label_name: str = "label") -> str | None:
    """Why a ranking metric is undefined for ``labels`` (shape (n,)), or None when both classes occur.

    ``label_name`` names the label in the message (``all 40 runs have `correct` = True``).
    """
    labels = np.asarray(labels).astype(bool)
    if len(labels) == 0:
        return "no runs"
    n_positive = int(labels.sum())
    if n_positive in (0, len(labels)):
        return f"single class: all {len(labels)} runs have `{label_name}` = {n_positive > 0}"
    return None


def auroc(labels, scores) -> float | None:
    """Area under the ROC curve; the probability a random positive outscores a random negative (ties = 1/2).

    AUROC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg), with R_pos the sum of the positives' mid-ranks.

    Parameters
    ----------
    labels : (n,) bool or 0/1
    scores : (n,) float, higher = more likely positive

    Returns
    -------
    float in [0, 1], or None when the labels hold a single class (see ``single_class_reason``).
    """
    labels, scores = _as_arrays(labels, scores)
    reason = single_class_reason(labels)
    if reason is not None:
        log.debug("AUROC undefined: %s", reason)
        return None
    n_positive = int(labels.sum())
    n_negative = len(labels) - n_positive
    ranks = rankdata(scores)  # mid-ranks: a tie between a positive and a negative counts one half
    rank_sum = float(ranks[labels].sum())
    return (rank_sum - n_positive * (n_positive + 1) / 2) / (n_positive * n_negative)


def auprc(labels, scores) -> float | None:
    """Area under the precision-recall curve as average precision: AP = sum_k (R_k - R_{k-1}) P_k.

    Thresholds are the distinct scores in decreasing order, so tied scores enter together (as in
    ``sklearn.metrics.average_precision_score``). Chance level is the positive fraction.

    Parameters
    ----------
    labels : (n,) bool or 0/1
    scores : (n,) float, higher = more likely positive

    Returns
    -------
    float in (0, 1], or None when the labels hold a single class.
    """
    labels, scores = _as_arrays(labels, scores)
    reason = single_class_reason(labels)
    if reason is not None:
        log.debug("AUPRC undefined: %s", reason)
        return None
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # last index of each run of equal scores: one operating point per distinct threshold
    threshold_ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    true_positives = np.cumsum(sorted_labels)[threshold_ends]
    predicted_positives = threshold_ends + 1
    precision = true_positives / predicted_positives
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def roc_curve_table(labels, scores, drop_intermediate: bool = True) -> pd.DataFrame:
    """The ROC curve as a table with columns ``fpr``, ``tpr``, ``threshold`` (one row per operating point).

    Starts at (0, 0) with threshold +inf; empty when the labels hold a single class. With
    ``drop_intermediate`` the points lying on a straight segment between their neighbours are dropped
    (as in ``sklearn.metrics.roc_curve``): the curve is the same, the plot file much smaller.

    Parameters
    ----------
    labels : (n,) bool or 0/1
    scores : (n,) float, higher = more likely positive
    """
    labels, scores = _as_arrays(labels, scores)
    if single_class_reason(labels) is not None:
        return pd.DataFrame({"fpr": pd.Series(dtype=float), "tpr": pd.Series(dtype=float),
                             "threshold": pd.Series(dtype=float)})
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    threshold_ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(scores) - 1]
    true_positives = np.cumsum(sorted_labels)[threshold_ends]
    false_positives = threshold_ends + 1 - true_positives
    thresholds = sorted_scores[threshold_ends]
    if drop_intermediate and len(thresholds) > 2:
        corners = np.flatnonzero(np.r_[True, np.logical_or(np.diff(false_positives, 2), np.diff(true_positives, 2)),
                                       True])
        true_positives, false_positives = true_positives[corners], false_positives[corners]
        thresholds = thresholds[corners]
    return pd.DataFrame({
        "fpr": np.r_[0.0, false_positives / false_positives[-1]],
        "tpr": np.r_[0.0, true_positives / true_positives[-1]],
        "threshold": np.r_[np.inf, thresholds],
    })


@dataclass(frozen=True)
class BootstrapResult:
    """A percentile confidence interval; ``low``/``high`` are None when no resample was usable."""

    low: float | None
    high: float | None
    n_used: int
    """Resamples with both classes present (the others are skipped, not counted as failures)."""
    n_requested: int


def _group_runs(groups, n_runs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index the runs by question: ``order[starts[g]:starts[g] + counts[g]]`` are the rows of group g, in input order.

    Groups are numbered in sorted order of their values (``np.unique``), so the result does not depend on the
    order of the rows beyond the order of the runs within each question.
    """
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) != n_runs:
        raise ValueError(f"groups has shape {groups.shape}; expected ({n_runs},), the question of each run")
    _, group_codes = np.unique(groups, return_inverse=True)
    order = np.argsort(group_codes, kind="mergesort")
    counts = np.bincount(group_codes)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    return order, starts, counts


def question_resamples(groups, n_runs: int, n_resamples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``n_resamples`` row-index arrays, each all runs of as many questions drawn with replacement as there are.

    The one resampling scheme of every bootstrap here: ``bootstrap_ci`` and ``paired_difference`` draw exactly
    these for the same generator, and evaluate draws them once per split so that every score's interval and every
    paired difference of that split sees the same resamples.
    """
    order, starts, counts = _group_runs(groups, n_runs)
    n_groups = len(counts)
    resamples = []
    for _ in range(n_resamples):
        drawn = rng.integers(0, n_groups, size=n_groups)
        resamples.append(np.concatenate([order[starts[g]:starts[g] + counts[g]] for g in drawn]))
    return resamples


def resampled_metric(labels, scores, resamples: list[np.ndarray], metric: Metric) -> np.ndarray:
    """``metric`` on each resample (``question_resamples``), NaN where it is undefined (a single class). (B,)"""
    labels, scores = _as_arrays(labels, scores)
    values = np.full(len(resamples), np.nan)
    for index, rows in enumerate(resamples):
        value = metric(labels[rows], scores[rows])
        if value is not None:
            values[index] = value
    return values


def _percentile_interval(values, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def bootstrap_ci(labels, scores, groups, metric: Metric, n_resamples: int, confidence: float,
                 rng: np.random.Generator) -> BootstrapResult:
    """Percentile CI of ``metric`` from resampling GROUPS (questions) with replacement, not runs.

    Runs of one question are correlated (same prompt, same difficulty), so resampling runs would
    understate the variance. A resample draws as many questions as there are, with replacement, and
    takes all runs of each drawn question. Resamples where the metric is undefined (a single class)
    are skipped; ``n_used`` says how many remained.

    Parameters
    ----------
    labels : (n,) bool
    scores : (n,) float
    groups : (n,) hashable, the question of each run
    metric : callable(labels, scores) -> float or None
    n_resamples : int
    confidence : float in (0, 1), e.g. 0.95
    rng : numpy Generator (the caller seeds it)
    """
    labels, scores = _as_arrays(labels, scores)
    if len(np.asarray(groups)) != len(labels):
        raise ValueError(f"groups has {len(np.asarray(groups))} entries; expected {len(labels)}")
    if len(labels) == 0:
        return BootstrapResult(None, None, 0, n_resamples)
    return interval_from_resamples(
        resampled_metric(labels, scores, question_resamples(groups, len(labels), n_resamples, rng), metric),
        confidence)


def interval_from_resamples(values, confidence: float) -> BootstrapResult:
    """The percentile interval of a metric's resampled values (B,), NaN = undefined resample (skipped)."""
    values = np.asarray(values, dtype=np.float64)
    used = values[~np.isnan(values)]
    if not len(used):
        return BootstrapResult(None, None, 0, len(values))
    low, high = _percentile_interval(used, confidence)
    return BootstrapResult(low, high, len(used), len(values))


@dataclass(frozen=True)
class PairedDifference:
    """``metric(scores_a) - metric(scores_b)`` on the same runs, with a paired question-level bootstrap.

    ``low``/``high`` is the percentile CI and ``p_value`` the two-sided bootstrap p of "no difference";
    all three are None when no resample was usable, and ``difference`` is None when the metric is undefined.
    """

    difference: float | None
    low: float | None
    high: float | None
    p_value: float | None
    n_used: int
    """Resamples where the metric was defined for both scores (the same resamples for both)."""
    n_requested: int


def paired_difference(labels, scores_a, scores_b, groups, metric: Metric, n_resamples: int, confidence: float,
                      rng: np.random.Generator) -> PairedDifference:
    """The difference of one metric between two scores of the same runs, with a paired question-level CI and p.

    d = metric(labels, scores_a) - metric(labels, scores_b). Each bootstrap resample draws questions with
    replacement (``question_resamples``: the same draws as ``bootstrap_ci`` for the same generator) and computes
    BOTH metrics on it, d* = metric_a* - metric_b*: what the two scores share (the questions drawn, their
    difficulty) cancels, so the interval is much narrower than two separate intervals would suggest when the
    scores agree.

    The p-value is the two-sided bootstrap p of H0: d = 0, the smallest alpha at which the (1 - alpha)
    percentile interval excludes 0 (test inversion):

        p = min(1, 2 (1 + min(#{d* <= 0}, #{d* >= 0})) / (1 + n_used))

    The +1 counts the observed sample as a resample, so p is never 0 (its floor is 2 / (1 + n_used)). It needs
    no exchangeability of the two scores, so it is valid for scores on different scales (a probe's
    probability against an entropy in nats), where a test that swaps scores between methods would not be.

    Parameters
    ----------
    labels : (n,) bool or 0/1
    scores_a, scores_b : (n,) float, higher = more likely positive, for the same runs
    groups : (n,) hashable, the question of each run
    metric : callable(labels, scores) -> float or None, e.g. ``auroc``
    n_resamples : int
    confidence : float in (0, 1)
    rng : numpy Generator (the caller seeds it)
    """
    labels, scores_a = _as_arrays(labels, scores_a)
    _, scores_b = _as_arrays(labels, scores_b)
    if len(np.asarray(groups)) != len(labels):
        raise ValueError(f"groups has {len(np.asarray(groups))} entries; expected {len(labels)}")
    value_a = metric(labels, scores_a) if len(labels) else None
    value_b = metric(labels, scores_b) if len(labels) else None
    if value_a is None or value_b is None:
        return PairedDifference(None, None, None, None, 0, n_resamples)
    resamples = question_resamples(groups, len(labels), n_resamples, rng)
    return difference_from_resamples(value_a, value_b, resampled_metric(labels, scores_a, resamples, metric),
                                     resampled_metric(labels, scores_b, resamples, metric), confidence)


def difference_from_resamples(value_a: float | None, value_b: float | None, resampled_a, resampled_b,
                              confidence: float) -> PairedDifference:
    """``paired_difference`` from the two metrics' observed values and their values on the SAME resamples (B,)
    each (``resampled_metric``; NaN = undefined, and a resample counts only where both are defined)."""
    resampled_a, resampled_b = np.asarray(resampled_a, dtype=np.float64), np.asarray(resampled_b, dtype=np.float64)
    if resampled_a.shape != resampled_b.shape:
        raise ValueError(f"resampled values of shapes {resampled_a.shape} and {resampled_b.shape}: expected the "
                         "same resamples for both scores")
    n_requested = len(resampled_a)
    if value_a is None or value_b is None:
        return PairedDifference(None, None, None, None, 0, n_requested)
    differences = (resampled_a - resampled_b)[~(np.isnan(resampled_a) | np.isnan(resampled_b))]
    if not len(differences):
        return PairedDifference(value_a - value_b, None, None, None, 0, n_requested)
    low, high = _percentile_interval(differences, confidence)
    # differences that are 0 up to rounding (identical rank sums summed in another order) count on both sides
    at_most_zero = int(np.sum(differences <= 1e-12))
    at_least_zero = int(np.sum(differences >= -1e-12))
    p_value = min(1.0, 2 * (1 + min(at_most_zero, at_least_zero)) / (1 + len(differences)))
    return PairedDifference(value_a - value_b, low, high, p_value, len(differences), n_requested)


def _same_size_blocks(groups, n_runs: int) -> list[np.ndarray]:
    """The questions grouped by their number of runs: one (questions, runs) matrix of row indices per size.

    Row q of a block holds the rows of one question in input order; only blocks of 2+ questions are returned
    (a question of a size no other question has can only be paired with itself).
    """
    order, starts, counts = _group_runs(groups, n_runs)
    blocks = []
    for size in np.unique(counts):
        members = np.flatnonzero(counts == size)
        if len(members) > 1:
            blocks.append(order[starts[members][:, None] + np.arange(size)[None, :]])
    return blocks


def permutation_p_value(labels, scores, metric: Metric, n_permutations: int, rng: np.random.Generator,
                        groups=None) -> float | None:
    """One-sided permutation p-value of ``metric`` at the question level: (1 + #{permuted >= observed}) / (1 + B).

    The K runs of one question are correlated (one prompt, one difficulty): when a question's score is
    constant over its runs and its accuracy varies between questions, shuffling labels across single runs
    treats 10 correlated runs as 10 independent ones, and the test rejects far too often (measured: 18% at
    nominal 5% on 50 questions x 10 runs, ``tests/test_metrics.py``). So each permutation reassigns WHOLE
    label vectors between questions of the same size: question q's runs, in their input order, take the
    labels of question pi(q)'s runs, pi a uniform random permutation within each size. The null is that
    questions' label vectors are exchangeable given the scores (the scores carry no information about which
    question is right); the dependence within a question is kept, as it is in the data.

    A question whose number of runs no other question shares keeps its labels; if every question does, every
    permutation is the identity and p = 1. The +1 counts the observed labelling as one of the permutations,
    so p is never 0. None when the observed metric is undefined.

    Parameters
    ----------
    labels : (n,) bool
    scores : (n,) float
    metric : callable(labels, scores) -> float or None
    n_permutations : int, B
    rng : numpy Generator
    groups : (n,) hashable, the question of each run. None treats every run as its own question (the
        run-level test: valid only when the runs are independent).
    """
    labels, scores = _as_arrays(labels, scores)
    observed = metric(labels, scores)
    if observed is None:
        return None
    blocks = _same_size_blocks(np.arange(len(labels)) if groups is None else groups, len(labels))
    at_least = 0
    permuted = labels.copy()
    for _ in range(n_permutations):
        for block in blocks:
            permuted[block] = labels[block[rng.permutation(len(block))]]
        # a permutation keeps the class counts, so the metric is defined; the tolerance keeps exact ties
        # (equal rank sums computed in a different order) counted as ">="
        at_least += metric(permuted, scores) >= observed - 1e-12
    return (1 + at_least) / (1 + n_permutations)
