"""Selective prediction, calibration and rank correlation, for the evaluate stage: risk-coverage, AURC, AURAC (in
the paper's and in the all-n convention), the prediction rejection ratio, Brier, ECE, the reliability table and
Spearman's rho.

No file I/O. The selective-prediction metrics take ``correct`` and ``uncertainty``; each is documented one by one
(AURAC, AURC, Brier and ECE stay defined for a single class; PRR and Spearman return None where undefined).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from stages.lib.evaluation.metrics import _as_arrays, single_class_reason

log = logging.getLogger(__name__)


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
    """Spearman rank correlation (``scipy.stats.spearmanr``: the Pearson correlation of the mid-ranks, ties averaged).

    Parameters
    ----------
    x, y : (n,) float, finite

    Returns
    -------
    float in [-1, 1], or None when n < 2 or either input is constant (where scipy returns NaN).
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
    return float(np.clip(spearmanr(x, y).statistic, -1.0, 1.0))
