"""LinearProbe (grouped CV, margin, JSON round trip) and the high-SE thresholds."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.lib.metrics import auroc
from stages.lib.probes import (
    LinearProbe,
    SingleClassError,
    best_split_threshold,
    fit_location_probes,
    load_probe,
    median_threshold,
    probe_features,
    probe_score,
    save_probe,
    score_location_probes,
)
from stages.lib.selection import layer_ranges, select_layer_range


def signal_data(n_questions=30, runs=4, dims=5, seed=0):
    """Features whose first dimension carries the label; groups = question of each run."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_questions), runs)
    labels = rng.random(len(groups)) < 0.5
    features = rng.normal(0, 1, (len(groups), dims)) * np.r_[1.0, 10 * np.ones(dims - 1)]  # unequal scales
    features[:, 0] += 2 * labels
    return features, labels, groups


def test_fit_predict_and_margin():
    features, labels, groups = signal_data()
    probe = LinearProbe(c_grid=(0.01, 1.0), cv_folds=3, max_iter=500, random_state=0).fit(features, labels, groups)
    assert probe.C_ in (0.01, 1.0) and set(probe.cv_auroc_) == {0.01, 1.0}
    assert probe.coef_.shape == (5,) and probe.n_features_in_ == 5
    probability = probe.predict_proba(features)
    assert probability.shape == (len(labels),) and np.all((probability > 0) & (probability < 1))
    assert auroc(labels, probability) > 0.8
    # margin: signed distance in the standardised space, same sign as the decision function
    decision = probe.decision_function(features)
    np.testing.assert_allclose(probe.margin(features), decision / np.linalg.norm(probe.coef_))
    standardised = (features - probe.scaler_mean_) / probe.scaler_scale_
    np.testing.assert_allclose(decision, standardised @ probe.coef_ + probe.intercept_)
    np.testing.assert_array_equal(probe.predict(features), probability > 0.5)


def test_json_round_trip_gives_identical_predictions(tmp_path):
    features, labels, groups = signal_data()
    probe = LinearProbe(c_grid=(0.1, 1.0), cv_folds=3, random_state=0, label_name="correct", position="slt",
                        layer=3).fit(features, labels, groups)
    text = json.dumps(probe.to_dict())  # plain JSON: no pickle anywhere
    loaded = LinearProbe.from_dict(json.loads(text))
    save_probe(probe, tmp_path / "probe.json")
    from_file = load_probe(tmp_path / "probe.json")
    for other in (loaded, from_file):
        np.testing.assert_array_equal(other.predict_proba(features), probe.predict_proba(features))
        np.testing.assert_array_equal(other.margin(features), probe.margin(features))
        assert (other.label_name, other.position, other.layer, other.C_) == ("correct", "slt", 3, probe.C_)
        assert other.cv_auroc_ == probe.cv_auroc_


def test_from_dict_rejects_foreign_or_inconsistent_dicts(tmp_path):
    features, labels, groups = signal_data()
    data = LinearProbe(random_state=0).fit(features, labels, groups).to_dict()
    with pytest.raises(ValueError, match="not a sep-linear-probe"):
        LinearProbe.from_dict({**data, "format": "pickle"})
    with pytest.raises(ValueError, match="coef"):
        LinearProbe.from_dict({**data, "coef": data["coef"][:-1]})
    with pytest.raises(FileNotFoundError, match="train_probes"):
        load_probe(tmp_path / "missing.json")


def test_single_class_labels_name_the_label_and_split():
    features, _, groups = signal_data()
    with pytest.raises(SingleClassError, match=r"label `high_se` in split `train`.*= False"):
        LinearProbe(label_name="high_se").fit(features, np.zeros(len(features), bool), groups)


def test_cross_validation_is_grouped_by_question():
    # Each question has its own feature vector and one random label for all its runs. Runs of a held-out
    # question are unseen, so grouped CV sees no signal; ungrouped CV would see the same question in
    # training and score high by memorising it.
    rng = np.random.default_rng(0)
    n_questions, runs = 30, 5
    question_features = rng.normal(0, 1, (n_questions, 20))
    question_labels = rng.random(n_questions) < 0.5
    groups = np.repeat(np.arange(n_questions), runs)
    features = question_features[groups] + rng.normal(0, 0.01, (len(groups), 20))
    labels = question_labels[groups]
    grouped = LinearProbe(c_grid=(1.0, 100.0), cv_folds=5, random_state=0).fit(features, labels, groups)
    per_run = LinearProbe(c_grid=(1.0, 100.0), cv_folds=5, random_state=0).fit(features, labels)
    assert max(grouped.cv_auroc_.values()) < 0.8
    assert min(per_run.cv_auroc_.values()) > 0.95


def test_folds_clamped_to_the_number_of_questions():
    features, labels, groups = signal_data(n_questions=3, runs=10)
    probe = LinearProbe(c_grid=(0.1, 1.0), cv_folds=10, random_state=0).fit(features, labels, groups)
    assert probe.C_ in (0.1, 1.0)
    with pytest.raises(ValueError, match=">= 2 questions"):
        LinearProbe(c_grid=(0.1, 1.0)).fit(features, labels, np.zeros(len(labels)))


def test_location_probes_find_the_signal_location():
    rng = np.random.default_rng(0)
    n = 120
    labels = rng.random(n) < 0.5
    hidden = rng.normal(0, 1, (n, 2, 3, 4)).astype(np.float16)  # (runs, positions, layers, hidden)
    hidden[:, 1, 2, 0] += (3 * labels).astype(np.float16)
    groups = np.repeat(np.arange(30), 4)
    train = np.arange(80)
    probes = fit_location_probes(hidden, train, ["tbg", "slt"], [0, 5, 7], {"correct": labels[train]}, groups[train],
                                 c_grid=(1.0,), cv_folds=3, max_iter=200, random_state=0)
    assert set(probes) == {("correct", p, layer) for p in ("tbg", "slt") for layer in (0, 5, 7)}
    table = score_location_probes(probes, hidden, np.arange(80, n), ["tbg", "slt"], [0, 5, 7],
                                  {"correct": labels[80:]})
    assert set(table["metric"]) == {"auroc"}
    best = table.loc[table["score"].idxmax()]
    assert (best["position"], best["layer"]) == ("slt", 7) and best["score"] > 0.9


# ---- thresholds --------------------------------------------------------------------------------------
@pytest.mark.parametrize("values, expected", [
    ([0, 0, 0, 1, 1], 0.5),
    ([5.1, 0, 0.2, 5, 0.1], 2.6),   # unsorted input; the gap between the clusters
    ([0, 1, 2, 3], 1.5),            # SSE 2 | 1 | 2 for the three cuts
    ([0, 2, 3, 5], 2.5),
    ([1, 1, 1, 2], 1.5),            # ties are never separated: the only cut is between 1 and 2
    ([0, 1, 2], 0.5),               # cuts 0|12 and 01|2 both give SSE 0.5: the lowest wins
])
def test_best_split_threshold_by_hand(values, expected):
    assert best_split_threshold(values) == pytest.approx(expected)


def test_best_split_threshold_needs_two_distinct_values():
    with pytest.raises(ValueError, match="distinct"):
        best_split_threshold([0.3, 0.3, 0.3])
    with pytest.raises(ValueError, match="no values"):
        best_split_threshold([])


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(0, 6), min_size=2, max_size=12).filter(lambda v: len(set(v)) > 1))
def test_best_split_threshold_is_the_brute_force_minimum(values):
    values = np.sort(np.array(values, dtype=float) / 3)

    def total_sse(threshold):
        low, high = values[values <= threshold], values[values > threshold]
        return ((low - low.mean()) ** 2).sum() + ((high - high.mean()) ** 2).sum()

    distinct = np.unique(values)
    candidates = [(a + b) / 2 for a, b in zip(distinct[:-1], distinct[1:])]
    threshold = best_split_threshold(values)
    assert np.isclose(candidates, threshold).any()  # a midpoint between neighbouring distinct values
    assert total_sse(threshold) == pytest.approx(min(total_sse(c) for c in candidates))


def test_median_threshold():
    assert median_threshold([3, 1, 2]) == 2
    assert median_threshold([0, 0, 0, 1.5]) == 0
    with pytest.raises(ValueError):
        median_threshold([])


# ---- ridge probes and layer ranges -------------------------------------------------------------------
def test_ridge_probe_predicts_a_continuous_target_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    features = rng.normal(0, 1, (200, 5))
    target = 2.0 * features[:, 3] + rng.normal(0, 0.3, 200)
    groups = np.repeat(np.arange(50), 4)
    probe = LinearProbe(c_grid=(0.01, 1.0), cv_folds=3, random_state=0, label_name="semantic_entropy",
                        kind="ridge").fit(features, target, groups)
    assert probe.cv_auroc_[1.0] > 0.9  # CV scores are Spearman correlations for a ridge probe
    assert probe_score(probe, features, target) > 0.95
    assert np.argmax(np.abs(probe.coef_)) == 3
    for method in (probe.predict_proba, probe.predict, probe.margin):
        with pytest.raises(ValueError, match="ridge regression"):
            method(features)
    save_probe(probe, tmp_path / "ridge.json")
    again = load_probe(tmp_path / "ridge.json")
    assert again.kind == "ridge" and again.layer_end is None
    np.testing.assert_array_equal(again.decision_function(features), probe.decision_function(features))
    with pytest.raises(SingleClassError, match="non-constant"):
        LinearProbe(kind="ridge").fit(features, np.ones(200))


def test_a_v1_probe_file_without_kind_loads_as_logistic():
    rng = np.random.default_rng(1)
    features, labels = rng.normal(0, 1, (40, 2)), np.arange(40) % 2 == 0
    record = LinearProbe().fit(features, labels).to_dict()
    del record["kind"], record["layer_end"]
    probe = LinearProbe.from_dict(record)
    assert probe.kind == "logistic" and probe.layer_end is None


def test_range_features_concatenate_layers_in_order():
    hidden = np.arange(2 * 1 * 3 * 2, dtype=np.float16).reshape(2, 1, 3, 2)  # (runs, positions, layers, hidden)
    probe = LinearProbe(position="slt", layer=5, layer_end=7)
    features = probe_features(probe, hidden, [1, 0], ["slt"], [0, 5, 7])
    # run 1, layers 5 and 7 (indices 1, 2): [8, 9] then [10, 11]
    np.testing.assert_array_equal(features, [[8, 9, 10, 11], [2, 3, 4, 5]])
    single = probe_features(LinearProbe(position="slt", layer=0), hidden, [1], ["slt"], [0, 5, 7])
    np.testing.assert_array_equal(single, [[6, 7]])


def test_layer_ranges_by_hand():
    assert layer_ranges(3, 0) == [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2)]
    assert layer_ranges(3, 2) == [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2)]
    assert layer_ranges(1, 0) == [(0, 0)]


def test_a_signal_split_over_two_layers_is_found_by_the_range_probe():
    rng = np.random.default_rng(0)
    n = 400
    labels = rng.random(n) < 0.5
    hidden = rng.normal(0, 1, (n, 1, 4, 3)).astype(np.float16)
    # each of layers 1 and 2 carries half the signal with its own noise: together they separate better
    hidden[:, 0, 1, 0] += (1.2 * labels).astype(np.float16)
    hidden[:, 0, 2, 0] += (1.2 * labels).astype(np.float16)
    runs = pd.DataFrame({"split": np.where(np.arange(n) < 240, "train", "val"), "hidden_row": np.arange(n),
                         "question_id": np.arange(n) // 4})
    estimator = dict(c_grid=(1.0,), cv_folds=3, max_iter=500, random_state=0)
    train_rows = np.arange(240)
    location = fit_location_probes(hidden, train_rows, ["slt"], [0, 1, 2, 3], {"correct": labels[:240]},
                                   runs["question_id"][:240], **estimator)
    single = location[("correct", "slt", 1)]
    params = type("P", (), {"max_layer_range": 0, **estimator})
    probe, candidates, fitted = select_layer_range(runs, hidden, ["slt"], [0, 1, 2, 3], single, location,
                                                   {"train": labels[:240], "val": labels[240:]}, params, seed=0)
    assert fitted == 6 and len(candidates) == 10
    assert (probe.layer, probe.layer_end) == (1, 2)
    by_range = {(c["layer"], c["layer_end"]): c["val_score"] for c in candidates}
    assert by_range[(1, 2)] > max(by_range[(1, 1)], by_range[(2, 2)])


def test_a_constant_feature_gives_a_ridge_probe_spearman_zero_not_a_crash():
    rng = np.random.default_rng(2)
    target = rng.normal(0, 1, 60)
    probe = LinearProbe(c_grid=(0.1, 1.0), cv_folds=3, kind="ridge", random_state=0).fit(
        np.ones((60, 3)), target, np.arange(60) // 3)  # e.g. the embedding of the same last prompt token
    assert probe.cv_auroc_ == {0.1: 0.0, 1.0: 0.0} and probe_score(probe, np.ones((5, 3)), target[:5]) == 0.0
