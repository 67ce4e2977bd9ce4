"""Metric math: hand-computed values on small arrays (ties, single class), scikit-learn agreement, and laws."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from stages.lib.evaluation.metrics import (
    auprc,
    auroc,
    bootstrap_ci,
    exact_ties,
    paired_difference,
    permutation_p_value,
    roc_curve_table,
    single_class_reason,
)

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


def test_exact_ties_merges_rounding_not_values():
    values = [2.0000000000000013, 2.0, 1.9999999999999998, 3.0, np.inf, 2.5, -np.inf]
    assert exact_ties(values).tolist() == [1.9999999999999998] * 3 + [3.0, np.inf, 2.5, -np.inf]
    assert auroc([True, False, True, False], exact_ties([1 + 4e-16, 1.0, 1 + 4e-16, 1.0])) == 0.5
    # order-independent, idempotent, and values apart by more than rounding stay apart
    rng = np.random.default_rng(0)
    noisy = np.repeat([0.1, 0.5, 7.0], 4) * (1 + rng.uniform(-1e-15, 1e-15, 12))
    order = rng.permutation(12)
    np.testing.assert_array_equal(exact_ties(noisy)[order], exact_ties(noisy[order]))
    assert len(np.unique(exact_ties(noisy))) == 3
    np.testing.assert_array_equal(exact_ties(exact_ties(noisy)), exact_ties(noisy))
    assert len(np.unique(exact_ties([0.5, 0.5 + 1e-6]))) == 2


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


# ---- question-level permutations -------------------------------------------------------------------------

def test_question_level_permutations_move_whole_label_vectors():
    # two questions of 2 runs, three of 3: a permutation may only swap label vectors between questions of one size
    groups = np.array(["a", "a", "b", "b", "c", "c", "c", "d", "d", "d", "e", "e", "e"])
    labels = np.array([1, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0], dtype=bool)
    vectors = {size: {tuple(labels[groups == g]) for g in np.unique(groups) if (groups == g).sum() == size}
               for size in (2, 3)}
    seen = []

    def recording_metric(permuted, scores):
        for g in np.unique(groups):
            rows = groups == g
            assert tuple(permuted[rows]) in vectors[int(rows.sum())]
        assert sorted(tuple(permuted[groups == g]) for g in "cde") == sorted(vectors[3])
        seen.append(tuple(permuted))
        return 0.5

    assert permutation_p_value(labels, np.arange(13.0), recording_metric, 200, np.random.default_rng(0),
                               groups=groups) == 1.0
    # every arrangement occurs: 2 of the size-2 vectors {10, 11} times 3! of the distinct size-3 {001, 100, 000}
    assert len(set(seen)) == 2 * 6


def test_questions_of_a_unique_size_cannot_be_permuted():
    # sizes 1, 2, 3: no two questions can trade labels, so every permutation is the identity and p = 1
    groups = np.array([0, 1, 1, 2, 2, 2])
    labels = np.array([1, 0, 1, 0, 0, 1], dtype=bool)
    assert permutation_p_value(labels, labels.astype(float), auroc, 30, np.random.default_rng(0), groups=groups) == 1.0


def _null_size(n_simulations: int, n_permutations: int, question_level: bool) -> float:
    """P(p <= 0.05) on clustered data where the score is independent of correctness.

    50 questions x 10 runs; question q's accuracy is Beta(0.5, 0.5) (many questions nearly all right or all
    wrong, so runs of a question are strongly correlated) and its score one N(0, 1) draw shared by its runs.
    """
    rejections = 0
    groups = np.repeat(np.arange(50), 10)
    for simulation in range(n_simulations):
        rng = np.random.default_rng([2024, simulation])
        accuracy = rng.beta(0.5, 0.5, size=50)
        incorrect = (rng.random((50, 10)) >= accuracy[:, None]).ravel()
        scores = np.repeat(rng.normal(size=50), 10)
        p_value = permutation_p_value(incorrect, scores, auroc, n_permutations,
                                      np.random.default_rng([2024, simulation, 1]),
                                      groups=groups if question_level else None)
        rejections += p_value <= 0.05
    return rejections / n_simulations


def test_question_level_permutation_test_has_nominal_size_on_clustered_data():
    # 19 permutations: p = (1 + k) / 20, so p <= 0.05 iff no permutation reaches the observed AUROC, which under
    # exact exchangeability has probability 1/20 = 0.05 (few permutations cost power, never size). 400 simulations:
    # Monte Carlo standard error sqrt(0.05 * 0.95 / 400) = 0.011, so 3 SE is [0.017, 0.083]. Seeds are fixed.
    # Measured: 0.0425 at the question level (and 0.050 with 99 permutations); run level 0.21 (0.235 with 99).
    assert 0.017 <= _null_size(400, 19, question_level=True) <= 0.083
    # the run-level test (groups=None) on the same data rejects about four times too often
    assert _null_size(400, 19, question_level=False) > 0.15


# ---- paired differences ------------------------------------------------------------------------------------

def test_paired_difference_by_hand():
    # a: 0.75 (test_auroc_by_hand), b: 0.875 (test_auroc_counts_ties_as_half) -> a - b = -0.125
    result = paired_difference(LABELS, [0.9, 0.1, 0.4, 0.6], [0.5, 0.5, 0.8, 0.2], ["q1", "q2", "q3", "q4"], auroc,
                               200, 0.95, np.random.default_rng(0))
    assert result.difference == pytest.approx(-0.125)
    assert result.low <= -0.125 <= result.high and result.n_requested == 200 and 0 < result.n_used < 200


def test_paired_difference_of_rank_equivalent_scores_is_exactly_zero():
    # b is a strictly increasing transform of a: equal AUROC on EVERY resample (a paired bootstrap), so the
    # interval is [0, 0] and p = min(1, 2 (1 + n) / (1 + n)) = 1
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(20), 5)
    labels = rng.random(100) < 0.4
    scores = labels + rng.normal(0, 1, 100)
    result = paired_difference(labels, scores, scores ** 3 + 1, groups, auroc, 100, 0.9, np.random.default_rng(2))
    assert (result.difference, result.low, result.high, result.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_paired_difference_uses_the_bootstrap_resamples():
    # b constant: AUROC 1/2 on every usable resample, so d* = AUROC_a* - 1/2 on exactly bootstrap_ci's resamples
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(15), 4)
    labels = rng.random(60) < 0.5
    scores = labels + rng.normal(0, 1.5, 60)
    paired = paired_difference(labels, scores, np.zeros(60), groups, auroc, 300, 0.9, np.random.default_rng(4))
    alone = bootstrap_ci(labels, scores, groups, auroc, 300, 0.9, np.random.default_rng(4))
    assert paired.n_used == alone.n_used
    assert paired.low == pytest.approx(alone.low - 0.5) and paired.high == pytest.approx(alone.high - 0.5)
    assert paired.difference == pytest.approx(auroc(labels, scores) - 0.5)


def test_paired_difference_p_value_floor_and_pairing():
    # a separates perfectly (AUROC 1 on every resample), b is constant (1/2): d* = 1/2 always, so no resample is
    # <= 0 and p = 2 (1 + 0) / (1 + n_used), the floor
    labels = np.array([True, False] * 10)
    groups = np.repeat(np.arange(10), 2)
    result = paired_difference(labels, labels.astype(float), np.zeros(20), groups, auroc, 99, 0.95,
                               np.random.default_rng(0))
    assert (result.low, result.high, result.n_used) == (0.5, 0.5, 99)
    assert result.p_value == pytest.approx(2 / 100)
    # two scores that share most of their noise: the paired interval is far narrower than either score's own
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(40), 5)
    labels = rng.random(200) < 0.5
    shared = labels + rng.normal(0, 1, 200)
    a, b = shared + rng.normal(0, 0.1, 200), shared + rng.normal(0, 0.1, 200)
    paired = paired_difference(labels, a, b, groups, auroc, 200, 0.95, np.random.default_rng(6))
    alone = bootstrap_ci(labels, a, groups, auroc, 200, 0.95, np.random.default_rng(6))
    assert paired.high - paired.low < (alone.high - alone.low) / 3
    assert paired.p_value > 0.05  # no real difference


def test_paired_difference_undefined():
    result = paired_difference([True, True], [0.1, 0.2], [0.3, 0.4], ["a", "b"], auroc, 10, 0.95,
                               np.random.default_rng(0))
    assert (result.difference, result.low, result.p_value, result.n_used) == (None, None, None, 0)
    with pytest.raises(ValueError, match="groups"):
        paired_difference(LABELS, [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4], ["a"], auroc, 10, 0.95,
                          np.random.default_rng(0))
