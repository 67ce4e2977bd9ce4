"""Selective prediction, calibration and rank-correlation metrics: hand-computed values, ties, laws, references."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss

from stages.lib.evaluation.selective import (
    aurac,
    aurac_all_n,
    aurc,
    brier_score,
    expected_calibration_error,
    prediction_rejection_ratio,
    reliability_table,
    risk_coverage_curve,
    spearman,
)

# Five runs; runs 1 and 3 tie at uncertainty 0.5 (one wrong, one right).
# Ascending uncertainty: 0.1 (right), 0.2 (right), {0.5 wrong, 0.5 right}, 0.9 (wrong).
CORRECT = np.array([True, False, True, True, False])
UNCERTAINTY = np.array([0.1, 0.5, 0.2, 0.5, 0.9])
# Tie-averaged correctness in that order: 1, 1, 1/2, 1/2, 0; cumulative: 1, 2, 2.5, 3, 3
# kept accuracy for k = 1..5: 1, 1, 2.5/3, 3/4, 3/5
# AURAC = (1 + 1 + 5/6 + 3/4 + 3/5) / 5 = (60 + 60 + 50 + 45 + 36) / 300 = 251/300
AURAC_BY_HAND = 251 / 300
# Oracle (both wrong runs last): 1, 1, 1, 3/4, 3/5 -> (60 + 60 + 60 + 45 + 36)/300 = 261/300; random = 3/5 = 180/300
# PRR = (251 - 180) / (261 - 180) = 71/81
PRR_BY_HAND = 71 / 81


def test_risk_coverage_curve_by_hand():
    table = risk_coverage_curve(CORRECT, UNCERTAINTY)
    assert table.columns.tolist() == ["threshold", "coverage", "risk"]
    assert table["threshold"].tolist() == [0.1, 0.2, 0.5, 0.9]
    # kept 1, 2, 4 (the whole tie group enters at once), 5 of 5 runs
    np.testing.assert_allclose(table["coverage"], [0.2, 0.4, 0.8, 1.0])
    # errors among the kept: 0/1, 0/2, 1/4, 2/5
    np.testing.assert_allclose(table["risk"], [0.0, 0.0, 0.25, 0.4])


def test_aurc_and_aurac_by_hand():
    assert aurac_all_n(CORRECT, UNCERTAINTY) == pytest.approx(AURAC_BY_HAND)
    # kept risk for k = 1..5: 0, 0, 0.5/3, 1/4, 2/5 -> (0 + 0 + 10 + 15 + 24)/60 / 5 = 49/300 = 1 - 251/300
    assert aurc(CORRECT, UNCERTAINTY) == pytest.approx(49 / 300)
    assert aurc(CORRECT, UNCERTAINTY) == pytest.approx(1 - AURAC_BY_HAND)


def test_tie_averaging_is_the_mean_over_both_orders_of_the_tie():
    # the tie {0.5 wrong, 0.5 right} ordered wrong-first: kept accuracy 1, 1, 2/3, 3/4, 3/5;
    # right-first: 1, 1, 1, 3/4, 3/5. The mean of the two AURACs is the tie-aware one.
    wrong_first = (1 + 1 + 2 / 3 + 3 / 4 + 3 / 5) / 5
    right_first = (1 + 1 + 1 + 3 / 4 + 3 / 5) / 5
    assert aurac_all_n(CORRECT, UNCERTAINTY) == pytest.approx((wrong_first + right_first) / 2)
    # breaking the tie by hand reproduces each order exactly
    assert aurac_all_n(CORRECT, [0.1, 0.5, 0.2, 0.6, 0.9]) == pytest.approx(wrong_first)
    assert aurac_all_n(CORRECT, [0.1, 0.6, 0.2, 0.5, 0.9]) == pytest.approx(right_first)


def test_prediction_rejection_ratio_by_hand():
    assert prediction_rejection_ratio(CORRECT, UNCERTAINTY) == pytest.approx(PRR_BY_HAND)


def test_oracle_ordering_gives_prr_one():
    # every wrong run more uncertain than every right run
    assert prediction_rejection_ratio(CORRECT, np.where(CORRECT, 0.1, 0.9)) == pytest.approx(1.0)
    assert prediction_rejection_ratio(CORRECT, [0.3, 0.8, 0.1, 0.2, 0.9]) == pytest.approx(1.0)


def test_reversed_ordering_gives_negative_prr():
    # wrong runs first: kept accuracy 0, 0, 1/3, 2/4, 3/5 -> AR = (0 + 0 + 10 + 15 + 18)/30 / 5 = 43/150
    # PRR = (43/150 - 90/150) / (81/300) = -94/81
    reversed_uncertainty = np.where(CORRECT, 0.9, 0.1)
    assert aurac_all_n(CORRECT, reversed_uncertainty) == pytest.approx(43 / 150)
    assert prediction_rejection_ratio(CORRECT, reversed_uncertainty) == pytest.approx(-94 / 81)


def test_constant_uncertainty_is_exactly_random():
    # one tie group: every k keeps the overall accuracy 3/5 in expectation
    constant = np.full(5, 0.4)
    assert aurac_all_n(CORRECT, constant) == pytest.approx(0.6)
    assert prediction_rejection_ratio(CORRECT, constant) == pytest.approx(0.0)
    table = risk_coverage_curve(CORRECT, constant)
    assert table[["coverage", "risk"]].values.tolist() == [[1.0, pytest.approx(0.4)]]


def test_random_orderings_average_to_prr_zero():
    rng = np.random.default_rng(0)
    correct = np.arange(20) < 10
    values = [prediction_rejection_ratio(correct, rng.permutation(20).astype(float)) for _ in range(2000)]
    # E[AR] over uniform orderings is AR_random exactly, and PRR is linear in AR; the spread of one value
    # is about 0.3, so the mean of 2000 is within 0.05 of 0 with overwhelming probability
    assert abs(np.mean(values)) < 0.05
    assert np.std(values) > 0.1  # the individual values do vary: the test is not vacuous


@pytest.mark.parametrize("correct, expected_aurac", [([True] * 4, 1.0), ([False] * 4, 0.0)])
def test_single_class(correct, expected_aurac):
    uncertainty = [0.3, 0.1, 0.1, 0.7]
    assert aurac_all_n(correct, uncertainty) == expected_aurac
    assert aurc(correct, uncertainty) == 1 - expected_aurac
    assert prediction_rejection_ratio(correct, uncertainty) is None
    np.testing.assert_allclose(risk_coverage_curve(correct, uncertainty)["risk"], 1 - expected_aurac)


# ---- the paper's AURAC (20 retention levels) -----------------------------------------------------------

def reference_aurac(accuracies, uncertainties):
    """jlko/semantic_uncertainty's ``area_under_thresholded_accuracy`` (uncertainty/utils/eval_utils.py)."""
    quantiles = np.linspace(0.1, 1, 20)
    select_accuracies = np.array([np.mean(accuracies[uncertainties <= np.quantile(uncertainties, q)])
                                  for q in quantiles])
    return (select_accuracies * (quantiles[1] - quantiles[0])).sum()


def test_paper_aurac_by_hand():
    # sorted uncertainty 0.1 (R), 0.2 (R), 0.5 (W), 0.5 (R), 0.9 (W); level q cuts at the linear quantile of
    # position 4q, with q_i = 0.1 + 0.9 i / 19, so 4 q_i = 0.4 + 3.6 i / 19:
    #   i = 0..3   (4 q < 1): keep {0.1}                 accuracy 1
    #   i = 4..8   (4 q < 2): keep {0.1, 0.2}            accuracy 1
    #   i = 9..18  (4 q < 4): keep all but 0.9 (tie kept whole) accuracy 3/4
    #   i = 19     (q = 1):   keep all                    accuracy 3/5
    # AURAC = (0.9 / 19) (4 + 5 + 10 * 3/4 + 3/5) = (0.9 / 19) 17.1 = 0.81
    assert aurac(CORRECT, UNCERTAINTY) == pytest.approx(0.81)
    assert reference_aurac(CORRECT, UNCERTAINTY) == pytest.approx(0.81)


def test_paper_aurac_scale():
    # 20 levels times the spacing of 19 intervals: all correct is 18/19, a constant score 18/19 x accuracy
    uncertainty = np.array([0.3, 0.1, 0.1, 0.7, 0.2])
    assert aurac([True] * 5, uncertainty) == pytest.approx(18 / 19)
    assert aurac([False] * 5, uncertainty) == 0.0
    assert aurac(CORRECT, np.full(5, 0.4)) == pytest.approx(18 / 19 * 0.6)
    assert aurac([], []) is None


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 30).flatmap(lambda n: st.tuples(
    st.lists(st.booleans(), min_size=n, max_size=n),
    st.lists(st.one_of(st.integers(0, 3).map(float), st.floats(-5, 5)), min_size=n, max_size=n))))
def test_paper_aurac_matches_the_reference_code(pair):
    correct, uncertainty = np.array(pair[0]), np.array(pair[1], dtype=float)
    assert aurac(correct, uncertainty) == pytest.approx(reference_aurac(correct, uncertainty), abs=1e-12)
    shuffle = np.random.default_rng(len(correct)).permutation(len(correct))
    assert aurac(correct[shuffle], uncertainty[shuffle]) == pytest.approx(aurac(correct, uncertainty), abs=1e-12)


def test_no_runs():
    assert aurc([], []) is None
    assert aurac_all_n([], []) is None
    assert prediction_rejection_ratio([], []) is None
    empty = risk_coverage_curve([], [])
    assert empty.empty and empty.columns.tolist() == ["threshold", "coverage", "risk"]
    assert brier_score([], []) is None
    assert expected_calibration_error([], [], n_bins=3) is None
    assert reliability_table([], [], n_bins=3)["n"].tolist() == [0, 0, 0]


def test_rejects_bad_selective_inputs():
    with pytest.raises(ValueError, match="equal length"):
        aurc([True, False], [0.1])
    with pytest.raises(ValueError, match="non-finite"):
        prediction_rejection_ratio([True, False], [0.1, np.inf])
    with pytest.raises(ValueError, match="0/1"):
        aurac_all_n([2, 0], [0.1, 0.2])


def test_order_invariance_with_ties():
    rng = np.random.default_rng(5)
    correct = rng.random(40) < 0.6
    uncertainty = rng.integers(0, 4, 40).astype(float)  # four values: large tie groups
    reference = (aurc(correct, uncertainty), aurac_all_n(correct, uncertainty),
                 prediction_rejection_ratio(correct, uncertainty), risk_coverage_curve(correct, uncertainty))
    for _ in range(20):
        shuffle = rng.permutation(40)
        c, u = correct[shuffle], uncertainty[shuffle]
        assert aurc(c, u) == pytest.approx(reference[0], abs=1e-12)
        assert aurac_all_n(c, u) == pytest.approx(reference[1], abs=1e-12)
        assert prediction_rejection_ratio(c, u) == pytest.approx(reference[2], abs=1e-12)
        pd.testing.assert_frame_equal(risk_coverage_curve(c, u), reference[3])


def _untied_aurac(correct_in_order: np.ndarray) -> float:
    return float(np.mean(np.cumsum(correct_in_order) / np.arange(1, len(correct_in_order) + 1)))


selective_pairs = st.integers(1, 6).flatmap(lambda n: st.tuples(
    st.lists(st.booleans(), min_size=n, max_size=n),
    st.lists(st.integers(0, 2), min_size=n, max_size=n)))  # at most 6 runs: every tie order can be listed


@settings(max_examples=60, deadline=None)
@given(selective_pairs)
def test_tie_aware_areas_equal_the_mean_over_every_tie_order(pair):
    correct, uncertainty = np.array(pair[0]), np.array(pair[1], dtype=float)
    groups = [correct[uncertainty == value] for value in np.unique(uncertainty)]  # ascending uncertainty
    orders = itertools.product(*(itertools.permutations(group) for group in groups))
    brute_force = np.mean([_untied_aurac(np.concatenate(order).astype(float)) for order in orders])
    assert aurac_all_n(correct, uncertainty) == pytest.approx(brute_force)
    assert aurc(correct, uncertainty) == pytest.approx(1 - brute_force)


@settings(max_examples=60, deadline=None)
@given(selective_pairs)
def test_prr_lies_between_reversed_oracle_and_one(pair):
    correct, uncertainty = np.array(pair[0]), np.array(pair[1], dtype=float)
    prr = prediction_rejection_ratio(correct, uncertainty)
    if 0 < correct.sum() < len(correct):
        reversed_oracle = prediction_rejection_ratio(correct, correct.astype(float))
        assert reversed_oracle - 1e-9 <= prr <= 1 + 1e-9
    else:
        assert prr is None


# Calibration: six runs, three bins [0, 1/3), [1/3, 2/3), [2/3, 1]
LABELS = np.array([0, 1, 1, 0, 1, 1])
PROBABILITIES = np.array([0.1, 0.2, 0.5, 0.6, 0.9, 1.0])


def test_brier_score_by_hand():
    # squared errors: 0.01, 0.64, 0.25, 0.36, 0.01, 0 -> 1.27 / 6
    assert brier_score(LABELS, PROBABILITIES) == pytest.approx(1.27 / 6)
    assert brier_score(LABELS, PROBABILITIES) == pytest.approx(brier_score_loss(LABELS, PROBABILITIES))


def test_reliability_table_by_hand():
    table = reliability_table(LABELS, PROBABILITIES, n_bins=3)
    assert table.columns.tolist() == ["bin", "lower", "upper", "n", "mean_predicted", "observed_frequency"]
    assert table["bin"].tolist() == [0, 1, 2]
    np.testing.assert_allclose(table["lower"], [0, 1 / 3, 2 / 3])
    np.testing.assert_allclose(table["upper"], [1 / 3, 2 / 3, 1])
    # bin 0: {0.1 (0), 0.2 (1)}; bin 1: {0.5 (1), 0.6 (0)}; bin 2: {0.9 (1), 1.0 (1)} (1.0 in the last bin)
    assert table["n"].tolist() == [2, 2, 2]
    np.testing.assert_allclose(table["mean_predicted"], [0.15, 0.55, 0.95])
    np.testing.assert_allclose(table["observed_frequency"], [0.5, 0.5, 1.0])


def test_expected_calibration_error_by_hand():
    # gaps |0.5 - 0.15| = 0.35, |0.5 - 0.55| = 0.05, |1 - 0.95| = 0.05, each bin 2/6 of the runs
    # ECE = (2 * 0.35 + 2 * 0.05 + 2 * 0.05) / 6 = 0.15
    assert expected_calibration_error(LABELS, PROBABILITIES, n_bins=3) == pytest.approx(0.15)


def test_empty_bins_are_kept_as_rows_and_skipped_by_ece():
    # four bins [0, .25) [.25, .5) [.5, .75) [.75, 1]: the same three groups, with bin 1 empty
    table = reliability_table(LABELS, PROBABILITIES, n_bins=4)
    assert table["n"].tolist() == [2, 0, 2, 2]
    assert np.isnan(table.loc[1, "mean_predicted"]) and np.isnan(table.loc[1, "observed_frequency"])
    assert expected_calibration_error(LABELS, PROBABILITIES, n_bins=4) == pytest.approx(0.15)


def test_probability_on_an_edge_goes_into_the_bin_starting_there():
    table = reliability_table([1, 0, 1, 1], [0.0, 0.5, 0.5, 1.0], n_bins=2)
    # [0, 0.5): {0.0}; [0.5, 1]: {0.5, 0.5, 1.0}
    assert table["n"].tolist() == [1, 3]
    np.testing.assert_allclose(table["mean_predicted"], [0.0, 2 / 3])
    np.testing.assert_allclose(table["observed_frequency"], [1.0, 2 / 3])
    # ECE = 1/4 * |1 - 0| + 3/4 * |2/3 - 2/3| = 0.25
    assert expected_calibration_error([1, 0, 1, 1], [0.0, 0.5, 0.5, 1.0], n_bins=2) == pytest.approx(0.25)


def test_calibration_matches_scikit_learn_and_the_table():
    rng = np.random.default_rng(3)
    probabilities = rng.random(500)  # no value on a bin edge, where scikit-learn puts it in the lower bin
    labels = rng.random(500) < probabilities ** 2
    table = reliability_table(labels, probabilities, n_bins=10)
    filled = table[table["n"] > 0]
    observed, predicted = calibration_curve(labels, probabilities, n_bins=10, strategy="uniform")
    np.testing.assert_allclose(filled["observed_frequency"], observed)
    np.testing.assert_allclose(filled["mean_predicted"], predicted)
    ece = np.sum(filled["n"] / 500 * np.abs(filled["observed_frequency"] - filled["mean_predicted"]))
    assert expected_calibration_error(labels, probabilities) == pytest.approx(ece)
    assert brier_score(labels, probabilities) == pytest.approx(brier_score_loss(labels, probabilities))
    assert table["n"].sum() == 500


def test_perfectly_sharp_and_calibrated_predictions():
    assert expected_calibration_error([0, 1, 1], [0.0, 1.0, 1.0]) == 0.0
    assert brier_score([0, 1, 1], [0.0, 1.0, 1.0]) == 0.0
    assert brier_score([0, 1], [1.0, 0.0]) == 1.0


def test_rejects_bad_probabilities():
    with pytest.raises(ValueError, match=r"probabilities must lie in \[0, 1\]; 2 values"):
        brier_score([0, 1, 1], [-0.1, 0.5, 1.2])
    with pytest.raises(ValueError, match="probabilities contain 1 non-finite"):
        expected_calibration_error([0, 1], [np.nan, 0.5])
    with pytest.raises(ValueError, match="equal length"):
        reliability_table([0, 1], [0.5])
    with pytest.raises(ValueError, match="n_bins = 0 is invalid"):
        expected_calibration_error([0, 1], [0.2, 0.5], n_bins=0)
    with pytest.raises(ValueError, match="n_bins = 2.5 is invalid"):
        reliability_table([0, 1], [0.2, 0.5], n_bins=2.5)


def test_spearman_by_hand():
    # no ties: d = 0, -1, 1, 0 -> rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert spearman([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    # ties: x ranks 1, 2.5, 2.5, 4 (centred -1.5, 0, 0, 1.5); y ranks 1..4 (centred -1.5, -.5, .5, 1.5)
    # rho = 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.sqrt(0.9))


@pytest.mark.parametrize("x, y", [([1, 1, 1], [1, 2, 3]), ([1, 2, 3], [5, 5, 5]), ([1], [2]), ([], [])])
def test_spearman_undefined_gives_none(x, y):
    assert spearman(x, y) is None


def test_spearman_rejects_bad_inputs():
    with pytest.raises(ValueError, match="equal length"):
        spearman([1, 2], [1])
    with pytest.raises(ValueError, match="non-finite"):
        spearman([1, np.nan], [1, 2])


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 30).flatmap(lambda n: st.tuples(
    st.lists(st.integers(-3, 3), min_size=n, max_size=n),
    st.lists(st.integers(-3, 3), min_size=n, max_size=n))))
def test_spearman_matches_scipy(pair):
    x, y = np.array(pair[0], dtype=float), np.array(pair[1], dtype=float)
    rho = spearman(x, y)
    if np.all(x == x[0]) or np.all(y == y[0]):
        assert rho is None
    else:
        assert rho == pytest.approx(spearmanr(x, y).statistic)
