"""Metric math: hand-computed values on small arrays (ties, single class), scikit-learn agreement, and laws."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from stages.lib.metrics import auprc, auroc, bootstrap_ci, permutation_p_value, roc_curve_table, single_class_reason

LABELS = np.array([True, False, True, False])


def test_auroc_by_hand():
    # positives 0.9, 0.4 vs negatives 0.1, 0.6: pairs won 0.9>0.1, 0.9>0.6, 0.4>0.1; lost 0.4<0.6 -> 3/4
    assert auroc(LABELS, [0.9, 0.1, 0.4, 0.6]) == pytest.approx(0.75)


def test_auroc_counts_ties_as_half():
    # positives 0.5, 0.8 vs negatives 0.5, 0.2: 0.5=0.5 (1/2), 0.5>0.2, 0.8>0.5, 0.8>0.2 -> 3.5/4
    assert auroc(LABELS, [0.5, 0.5, 0.8, 0.2]) == pytest.approx(0.875)
    assert auroc(LABELS, [1.0, 1.0, 1.0, 1.0]) == pytest.approx(0.5)


def test_auprc_by_hand():
    # descending: 0.9(+) 0.6(-) 0.4(+) 0.1(-): recall steps 0.5 at precision 1, then 0.5 at precision 2/3
    assert auprc(LABELS, [0.9, 0.1, 0.4, 0.6]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_auprc_enters_tied_scores_together():
    # descending: 0.8(+), then the tie {0.5(+), 0.5(-)} as one threshold: precision 2/3 at recall 1
    assert auprc(LABELS, [0.5, 0.5, 0.8, 0.2]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


@pytest.mark.parametrize("labels", [[True, True, True], [0, 0, 0], []])
def test_single_class_gives_none_not_a_crash(labels):
    scores = np.linspace(0, 1, len(labels))
    assert auroc(labels, scores) is None
    assert auprc(labels, scores) is None
    assert single_class_reason(labels, "incorrect") is not None
    assert roc_curve_table(labels, scores).empty
    assert permutation_p_value(labels, scores, auroc, 10, np.random.default_rng(0)) is None


def test_single_class_reason_names_the_label():
    assert single_class_reason([True, True], "correct") == "single class: all 2 runs have `correct` = True"
    assert single_class_reason([True, False]) is None


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="non-finite"):
        auroc([True, False], [0.1, np.nan])
    with pytest.raises(ValueError, match="equal length"):
        auroc([True, False], [0.1])
    with pytest.raises(ValueError, match="0/1"):
        auroc([2, 0], [0.1, 0.2])


def test_roc_curve_table_by_hand():
    table = roc_curve_table(LABELS, [0.9, 0.1, 0.4, 0.6], drop_intermediate=False)
    assert table["fpr"].tolist() == [0, 0, 0.5, 0.5, 1]
    assert table["tpr"].tolist() == [0, 0.5, 0.5, 1, 1]
    assert np.isinf(table["threshold"].iloc[0])


label_score_pairs = st.integers(2, 40).flatmap(lambda n: st.tuples(
    st.lists(st.booleans(), min_size=n, max_size=n).filter(lambda x: 0 < sum(x) < len(x)),
    st.lists(st.integers(-5, 5), min_size=n, max_size=n)))  # small integers: plenty of ties


@settings(max_examples=60, deadline=None)
@given(label_score_pairs)
def test_matches_scikit_learn(pair):
    labels, scores = np.array(pair[0]), np.array(pair[1], dtype=float)
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    assert auprc(labels, scores) == pytest.approx(average_precision_score(labels, scores))
    for drop_intermediate in (False, True):
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=drop_intermediate)
        table = roc_curve_table(labels, scores, drop_intermediate=drop_intermediate)
        np.testing.assert_allclose(table["fpr"], fpr)
        np.testing.assert_allclose(table["tpr"], tpr)


@settings(max_examples=60, deadline=None)
@given(label_score_pairs)
def test_reversed_scores_give_one_minus_auroc(pair):
    labels, scores = np.array(pair[0]), np.array(pair[1], dtype=float)
    assert auroc(labels, -scores) == pytest.approx(1 - auroc(labels, scores))


@settings(max_examples=60, deadline=None)
@given(label_score_pairs)
def test_invariant_to_strictly_increasing_transforms(pair):
    labels, scores = np.array(pair[0]), np.array(pair[1], dtype=float)
    transformed = scores ** 3 + 2 * scores + 7  # strictly increasing on the reals; ties stay ties
    assert auroc(labels, transformed) == pytest.approx(auroc(labels, scores))
    assert auprc(labels, transformed) == pytest.approx(auprc(labels, scores))


def test_bootstrap_resamples_questions_not_runs():
    # question a: 5 positive runs, question b: 5 negative runs. Resampling the 2 QUESTIONS draws one
    # question twice half the time (single class, skipped); resampling runs would almost never do so.
    labels = np.array([True] * 5 + [False] * 5)
    scores = np.r_[np.ones(5), np.zeros(5)]
    groups = np.array(["a"] * 5 + ["b"] * 5)
    result = bootstrap_ci(labels, scores, groups, auroc, 400, 0.95, np.random.default_rng(0))
    assert result.n_requested == 400
    assert 150 < result.n_used < 250
    assert result.low == result.high == 1.0


def test_bootstrap_interval_brackets_the_estimate_and_is_seeded():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(30), 4)
    labels = rng.random(120) < 0.5
    scores = labels + rng.normal(0, 1, 120)
    first = bootstrap_ci(labels, scores, groups, auroc, 200, 0.9, np.random.default_rng(7))
    again = bootstrap_ci(labels, scores, groups, auroc, 200, 0.9, np.random.default_rng(7))
    assert first == again
    assert first.n_used == 200
    assert first.low < auroc(labels, scores) < first.high


def test_bootstrap_of_a_single_class_uses_nothing():
    result = bootstrap_ci([True, True], [0.1, 0.2], ["a", "b"], auroc, 20, 0.95, np.random.default_rng(0))
    assert (result.low, result.high, result.n_used) == (None, None, 0)


def test_permutation_p_value_formula():
    labels = np.array([True] * 10 + [False] * 10)
    constant = permutation_p_value(labels, np.arange(20.0), lambda y, s: 0.5, 49, np.random.default_rng(0))
    assert constant == 1.0  # every permutation ties the observed value: (1 + 49) / (1 + 49)
    # perfect separation: a permutation reaches AUROC 1 with probability 1 / C(20, 10), so (1 + 0) / (1 + 99)
    separated = permutation_p_value(labels, labels.astype(float), auroc, 99, np.random.default_rng(0))
    assert separated == pytest.approx(1 / 100)
    # no signal: p is roughly uniform, far from the floor
    noise = permutation_p_value(labels, np.random.default_rng(3).random(20), auroc, 99, np.random.default_rng(0))
    assert noise > 0.02
