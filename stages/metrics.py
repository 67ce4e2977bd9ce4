"""Pure metric math for the evaluate stage: AUROC, AUPRC, question-level bootstrap CIs, permutation p-values.

No file I/O. Every metric takes ``labels`` (positive class = True / 1) and ``scores`` (higher = more
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
    groups = np.asarray(groups)
    if len(groups) != len(labels):
        raise ValueError(f"groups has {len(groups)} entries; expected {len(labels)}")
    if len(labels) == 0:
        return BootstrapResult(None, None, 0, n_resamples)
    _, group_codes = np.unique(groups, return_inverse=True)
    order = np.argsort(group_codes, kind="mergesort")
    # runs of group g are order[starts[g]:starts[g] + counts[g]]
    counts = np.bincount(group_codes)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    n_groups = len(counts)
    values = []
    for _ in range(n_resamples):
        drawn = rng.integers(0, n_groups, size=n_groups)
        rows = np.concatenate([order[starts[g]:starts[g] + counts[g]] for g in drawn])
        value = metric(labels[rows], scores[rows])
        if value is not None:
            values.append(value)
    if not values:
        return BootstrapResult(None, None, 0, n_resamples)
    tail = (1 - confidence) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return BootstrapResult(float(low), float(high), len(values), n_resamples)


def permutation_p_value(labels, scores, metric: Metric, n_permutations: int,
                        rng: np.random.Generator) -> float | None:
    """One-sided permutation p-value: (1 + #{permuted metric >= observed}) / (1 + n_permutations).

    The labels are shuffled across all runs (the null: scores carry no information about labels).
    The +1 counts the observed labelling as one of the permutations, so p is never 0.
    None when the observed metric is undefined.

    Parameters
    ----------
    labels : (n,) bool
    scores : (n,) float
    metric : callable(labels, scores) -> float or None
    n_permutations : int
    rng : numpy Generator
    """
    labels, scores = _as_arrays(labels, scores)
    observed = metric(labels, scores)
    if observed is None:
        return None
    # permutations keep the class counts, so the metric is always defined; the tolerance keeps exact
    # ties (equal rank sums computed in a different order) counted as ">="
    at_least = sum(metric(rng.permutation(labels), scores) >= observed - 1e-12 for _ in range(n_permutations))
    return (1 + at_least) / (1 + n_permutations)
