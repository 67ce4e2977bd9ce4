"""Pure metric math for the evaluate stage: AUROC, AUPRC, question-level bootstrap CIs, paired differences and
permutation p-values.

No file I/O. Every ranking metric takes ``labels`` (positive class = True / 1) and ``scores`` (higher = more
likely positive) and returns ``None`` instead of raising when the labels hold a single class, because a
test or OOD split where every run is correct is a legitimate outcome to report, not a crash. The selective-
prediction metrics (risk-coverage, AURC, AURAC in the paper's and in the all-n convention, PRR) take ``correct``
and ``uncertainty``; they, the calibration metrics (Brier, ECE, reliability table) and ``spearman`` are
documented one by one (AURAC, AURC, Brier and ECE stay defined for a single class; PRR and Spearman return None
where undefined).
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


# --- Selective prediction: risk-coverage, AURC, AURAC, prediction rejection ratio ------------------------
#
# These take ``correct`` (did the run answer correctly) and ``uncertainty`` (higher = less sure). A
# selective predictor keeps the k most certain runs and abstains on the rest. Runs with EQUAL uncertainty
# cannot be told apart, so no metric may depend on the order in which they were passed: the curve has a
# point only after a whole tie group, and the areas are the exact expectation over a uniformly random order
# within each tie group (the paper's ``aurac`` instead keeps every run tied at a cut-off, as its reference does).


def _tie_averaged_correctness(correct, uncertainty) -> np.ndarray:
    """Correctness in ascending-uncertainty order with each tie group replaced by its mean, shape (n,).

    The k most certain runs under a random order within ties hold, in expectation, the earlier groups'
    correct runs plus j/n_g of the correct runs of the group split at k (the hypergeometric mean, j runs
    drawn from a group of n_g). The cumulative sum of this array is that expectation for every k, so a
    metric that is linear in the correct count of the kept runs at each fixed k is exactly tie-averaged.
    """
    correct, uncertainty = _as_arrays(correct, uncertainty)
    order = np.argsort(uncertainty, kind="mergesort")
    sorted_uncertainty = uncertainty[order]
    group = np.r_[0, np.cumsum(np.diff(sorted_uncertainty) != 0)]  # (n,) tie-group id, ascending uncertainty
    group_mean = np.bincount(group, weights=correct[order]) / np.bincount(group)
    return group_mean[group]


def _kept_accuracy(correct, uncertainty) -> np.ndarray:
    """Expected accuracy of the k most certain runs for k = 1..n (tie-averaged), shape (n,)."""
    averaged = _tie_averaged_correctness(correct, uncertainty)
    return np.cumsum(averaged) / np.arange(1, len(averaged) + 1)


def risk_coverage_curve(correct, uncertainty) -> pd.DataFrame:
    """The risk-coverage curve: error rate of the runs kept when keeping every run with uncertainty <= t.

    One row per distinct uncertainty t in increasing order (a tie group enters whole, so the table does not
    depend on the input order): ``coverage`` = N(t) / n, the fraction kept, and ``risk`` = 1 - C(t) / N(t),
    the error rate among them, with N(t) runs kept of which C(t) are correct. Coverage runs over (0, 1]
    and the last row is the overall error rate; there is no coverage-0 row (the risk of nothing is
    undefined). Empty (same columns) when there are no runs.

    Parameters
    ----------
    correct : (n,) bool or 0/1
    uncertainty : (n,) float, higher = less sure

    Returns
    -------
    DataFrame with columns ``threshold``, ``coverage``, ``risk`` (float), one row per distinct uncertainty.
    """
    correct, uncertainty = _as_arrays(correct, uncertainty)
    if len(correct) == 0:
        return pd.DataFrame({column: pd.Series(dtype=float) for column in ("threshold", "coverage", "risk")})
    order = np.argsort(uncertainty, kind="mergesort")
    sorted_uncertainty = uncertainty[order]
    # last index of each tie group: one point per distinct threshold
    group_ends = np.r_[np.flatnonzero(np.diff(sorted_uncertainty)), len(uncertainty) - 1]
    kept = group_ends + 1
    kept_correct = np.cumsum(correct[order])[group_ends]
    return pd.DataFrame({
        "threshold": sorted_uncertainty[group_ends],
        "coverage": kept / len(uncertainty),
        "risk": 1.0 - kept_correct / kept,
    })


def aurc(correct, uncertainty) -> float | None:
    """Area under the risk-coverage curve (lower = better), the mean risk over the coverages k/n.

    AURC = (1/n) sum_{k=1}^{n} E[risk of the k most certain runs], where the expectation is over a random
    order within tie groups: if k splits a tie group of n_g runs with e_g errors, taking j of them, the kept
    errors are the earlier groups' errors plus j e_g / n_g. Equivalently each run's error indicator is
    replaced by its tie group's mean before the cumulative sum. With no ties this is the usual discrete
    AURC (Geifman et al. 2019). AURC = 1 - ``aurac_all_n``.

    Parameters
    ----------
    correct : (n,) bool or 0/1
    uncertainty : (n,) float, higher = less sure

    Returns
    -------
    float in [0, 1] (all correct -> 0, all wrong -> 1), or None when there are no runs.
    """
    correct, uncertainty = _as_arrays(correct, uncertainty)
    if len(correct) == 0:
        return None
    errors = np.cumsum(1.0 - _tie_averaged_correctness(correct, uncertainty))
    return float(np.mean(errors / np.arange(1, len(errors) + 1)))


def aurac_all_n(correct, uncertainty) -> float | None:
    """Area under the rejection-accuracy curve over every n (higher = better), rejecting the most uncertain first.

    AURAC_all_n = (1/n) sum_{r=0}^{n-1} acc(n - r), the mean over rejecting r = 0, 1, ..., n-1 runs of the
    accuracy acc(k) of the k = n - r runs kept; the fraction rejected r/n runs over {0, 1/n, ..., (n-1)/n}. Ties
    are averaged as in ``aurc`` (the exact expectation over a random order within each tie group), so
    AURAC_all_n = 1 - AURC. A constant ``uncertainty`` gives the overall accuracy; all correct gives 1.0, all
    wrong 0.0. ``aurac`` is the paper's 20-level convention; the two are not interchangeable (see there).

    Parameters
    ----------
    correct : (n,) bool or 0/1
    uncertainty : (n,) float, higher = less sure

    Returns
    -------
    float in [0, 1], or None when there are no runs.
    """
    correct, uncertainty = _as_arrays(correct, uncertainty)
    if len(correct) == 0:
        return None
    return float(np.mean(_kept_accuracy(correct, uncertainty)))


# The retention levels of the Nature paper's AURAC (jlko/semantic_uncertainty, uncertainty/utils/eval_utils.py,
# ``area_under_thresholded_accuracy``): keep the runs at or below the q-quantile of the uncertainty.
AURAC_RETENTION_LEVELS = np.linspace(0.1, 1, 20)


def aurac(correct, uncertainty) -> float | None:
    """AURAC as Farquhar et al. (Nature 2024) compute it: a Riemann sum over 20 retention levels (higher = better).

        AURAC = dq * sum_{q in Q} acc(q),  Q = {0.1, 0.1 + dq, ..., 1} (20 levels), dq = 0.9 / 19,
        acc(q) = mean correctness of the runs with uncertainty <= quantile_q(uncertainty)

    exactly as the reference code: ``np.quantile`` with its default linear interpolation, and every run tied
    at the cut-off is kept (so the value does not depend on the input order). Note what the reference's sum
    implies: 20 points times the spacing of 19 intervals, so all correct gives 20 dq = 18/19 ~ 0.947, not 1, and
    a constant uncertainty gives 18/19 x accuracy; retention below 10% is never scored. Use this to compare
    with the paper's numbers; ``aurac_all_n`` is the area over every n (= 1 - AURC).

    Parameters
    ----------
    correct : (n,) bool or 0/1
    uncertainty : (n,) float, higher = less sure

    Returns
    -------
    float in [0, 18/19], or None when there are no runs.
    """
    correct, uncertainty = _as_arrays(correct, uncertainty)
    if len(correct) == 0:
        return None
    order = np.argsort(uncertainty, kind="mergesort")
    sorted_uncertainty = uncertainty[order]
    cutoffs = np.quantile(uncertainty, AURAC_RETENTION_LEVELS)
    kept = np.searchsorted(sorted_uncertainty, cutoffs, side="right")  # runs with uncertainty <= cutoff, >= 1
    kept_correct = np.r_[0.0, np.cumsum(correct[order])][kept]
    step = AURAC_RETENTION_LEVELS[1] - AURAC_RETENTION_LEVELS[0]
    return float(np.sum(kept_correct / kept) * step)


def prediction_rejection_ratio(correct, uncertainty) -> float | None:
    """Prediction rejection ratio: PRR = (AR_uncertainty - AR_random) / (AR_oracle - AR_random).

    AR is the area under the rejection-accuracy curve with the discretisation of ``aurac_all_n``: AR_uncertainty
    rejects by ``uncertainty``; AR_random = C/n, the overall accuracy (a random order keeps C/n accuracy in
    expectation at every k); AR_oracle rejects every wrong run first, AR_oracle = (1/n) (C + sum_{k=C+1}^{n}
    C/k), with C correct runs of n. PRR = 1 is the oracle, 0 no better than random, negative worse than
    random (Malinin et al. 2017; Malinin & Gales 2021 use the same ratio on the rejection curve that counts
    the rejected runs as corrected, which weights acc(k) by k/n, so values differ from theirs).

    Parameters
    ----------
    correct : (n,) bool or 0/1
    uncertainty : (n,) float, higher = less sure

    Returns
    -------
    float <= 1 (its minimum is reached by rejecting every correct run first), or None when all runs are
    correct, all are wrong or there are none (the oracle is then no better than random).
    """
    correct, uncertainty = _as_arrays(correct, uncertainty)
    reason = single_class_reason(correct, "correct")
    if reason is not None:
        log.debug("PRR undefined: %s", reason)
        return None
    n, n_correct = len(correct), int(correct.sum())
    ar_random = n_correct / n
    ar_oracle = (n_correct + n_correct * np.sum(1.0 / np.arange(n_correct + 1, n + 1))) / n
    ar_uncertainty = float(np.mean(_kept_accuracy(correct, uncertainty)))
    return float((ar_uncertainty - ar_random) / (ar_oracle - ar_random))


# --- Calibration: Brier score, expected calibration error, reliability table ----------------------------
#
# ``labels`` is the event (e.g. the run is correct) and ``probabilities`` the predicted probability of it.


def _as_probabilities(labels, probabilities) -> tuple[np.ndarray, np.ndarray]:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim == 1 and not np.all(np.isfinite(probabilities)):
        raise ValueError(f"probabilities contain {int(np.sum(~np.isfinite(probabilities)))} non-finite values; "
                         "expected finite values in [0, 1]")
    labels, probabilities = _as_arrays(labels, probabilities)
    outside = (probabilities < 0) | (probabilities > 1)
    if np.any(outside):
        raise ValueError(f"probabilities must lie in [0, 1]; {int(outside.sum())} values do not "
                         f"(min {probabilities.min():g}, max {probabilities.max():g})")
    return labels, probabilities


def _check_n_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins = {n_bins!r} is invalid; expected an integer >= 1")
    return int(n_bins)


def brier_score(labels, probabilities) -> float | None:
    """Brier score, the mean squared error of the probabilities: BS = (1/n) sum_i (p_i - y_i)^2 (lower = better).

    Parameters
    ----------
    labels : (n,) bool or 0/1, the event
    probabilities : (n,) float in [0, 1], the predicted probability of the event

    Returns
    -------
    float in [0, 1], or None when there are no runs.
    """
    labels, probabilities = _as_probabilities(labels, probabilities)
    if len(labels) == 0:
        return None
    return float(np.mean((probabilities - labels) ** 2))


def reliability_table(labels, probabilities, n_bins: int = 10) -> pd.DataFrame:
    """Reliability diagram data: per equal-width probability bin, the mean prediction and the observed rate.

    Bin b covers [b/B, (b+1)/B) for b < B-1 and the last bin [(B-1)/B, 1], so probability 1.0 falls in the
    last bin and a probability on an edge falls in the bin that starts there. Every bin has a row, empty
    ones included (``n`` = 0, NaN means), so the table always has ``n_bins`` rows.

    Parameters
    ----------
    labels : (n,) bool or 0/1, the event
    probabilities : (n,) float in [0, 1]
    n_bins : int >= 1, B

    Returns
    -------
    DataFrame with columns ``bin`` (0..B-1), ``lower``, ``upper`` (the edges), ``n`` (runs in the bin),
    ``mean_predicted`` (mean probability) and ``observed_frequency`` (fraction of labels True).
    """
    labels, probabilities = _as_probabilities(labels, probabilities)
    n_bins = _check_n_bins(n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted on the same edges the table reports, so a bin's runs are exactly those within its edges
    bin_of_run = np.clip(np.searchsorted(edges, probabilities, side="right") - 1, 0, n_bins - 1)
    counts = np.bincount(bin_of_run, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(bin_of_run, weights=probabilities, minlength=n_bins) / counts
        observed_frequency = np.bincount(bin_of_run, weights=labels.astype(float), minlength=n_bins) / counts
    return pd.DataFrame({
        "bin": np.arange(n_bins),
        "lower": edges[:-1],
        "upper": edges[1:],
        "n": counts,
        "mean_predicted": mean_predicted,
        "observed_frequency": observed_frequency,
    })


def expected_calibration_error(labels, probabilities, n_bins: int = 10) -> float | None:
    """Expected calibration error: ECE = sum_b (n_b / N) |observed_b - predicted_b| over non-empty bins.

    The bins are those of ``reliability_table`` (B equal-width bins on [0, 1], 1.0 in the last bin);
    observed_b is the fraction of labels True in bin b and predicted_b its mean probability.

    Parameters
    ----------
    labels : (n,) bool or 0/1, the event
    probabilities : (n,) float in [0, 1]
    n_bins : int >= 1

    Returns
    -------
    float in [0, 1], or None when there are no runs.
    """
    table = reliability_table(labels, probabilities, n_bins)
    total = int(table["n"].sum())
    if total == 0:
        return None
    filled = table[table["n"] > 0]
    return float(np.sum(filled["n"] / total * np.abs(filled["observed_frequency"] - filled["mean_predicted"])))


# --- Rank correlation -------------------------------------------------------------------------------------


def spearman(x, y) -> float | None:
    """Spearman rank correlation: the Pearson correlation of the mid-ranks of ``x`` and ``y`` (ties averaged).

    rho = sum_i (r_i - mean r)(s_i - mean s) / sqrt(sum_i (r_i - mean r)^2 sum_i (s_i - mean s)^2), which is
    1 - 6 sum_i d_i^2 / (n (n^2 - 1)) when there are no ties. Matches ``scipy.stats.spearmanr``.

    Parameters
    ----------
    x, y : (n,) float, finite

    Returns
    -------
    float in [-1, 1], or None when n < 2 or either input is constant.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"x and y must be 1-D of equal length; got shapes {x.shape}, {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError(f"x and y must be finite; got {int(np.sum(~np.isfinite(x)) + np.sum(~np.isfinite(y)))} "
                         "non-finite values")
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return None
    x_ranks = rankdata(x) - (len(x) + 1) / 2  # centred mid-ranks
    y_ranks = rankdata(y) - (len(y) + 1) / 2
    rho = np.sum(x_ranks * y_ranks) / np.sqrt(np.sum(x_ranks ** 2) * np.sum(y_ranks ** 2))
    return float(np.clip(rho, -1.0, 1.0))
