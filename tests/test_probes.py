"""The probe estimators (scikit-learn API, grouped CV, margin), their files (JSON + npz, no pickle), and the
high-SE thresholds."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import GroupKFold
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import check_estimator

from stages.lib.evaluation.metrics import auroc
from stages.lib.probes.store import load_location_probes, load_probe, save_location_probes, save_probe
from stages.lib.probes.linear import (
    LinearProbe,
    LogisticProbe,
    MeanDifferenceProbe,
    RidgeProbe,
    SingleClassError,
    held_out_score,
)
from stages.lib.probes.fitting import (
    best_split_threshold,
    fit_location_probes,
    location_features,
    median_threshold,
    probe_features,
    probe_score,
    score_location_probes,
)
from stages.lib.schema.machinery import SchemaError
from stages.lib.probes.selection import layer_ranges, select_layer_range


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
    probe = LogisticProbe(c_grid=(0.01, 1.0), cv_folds=3, max_iter=500, random_state=0)
    assert probe.fit(features, labels, groups) is probe
    assert probe.C_ in (0.01, 1.0) and set(probe.cv_scores_) == {0.01, 1.0}
    assert probe.coef_.shape == (5,) and probe.n_features_in_ == 5 and probe.classes_.tolist() == [False, True]
    probability = probe.predict_proba(features)
    assert probability.shape == (len(labels), 2) and np.all((probability > 0) & (probability < 1))
    np.testing.assert_allclose(probability.sum(axis=1), 1.0)
    assert auroc(labels, probability[:, 1]) > 0.8
    # margin: signed distance in the standardised space, same sign as the decision function
    decision = probe.decision_function(features)
    assert decision.shape == (len(labels),)
    np.testing.assert_allclose(probe.margin(features), decision / np.linalg.norm(probe.coef_))
    standardised = (features - probe.scaler_mean_) / probe.scaler_scale_
    np.testing.assert_allclose(decision, standardised @ probe.coef_ + probe.intercept_)
    np.testing.assert_array_equal(probe.predict(features), probability[:, 1] > 0.5)
    assert probe.score(features, labels) == np.mean(probe.predict(features) == labels)  # ClassifierMixin


def test_probes_follow_the_scikit_learn_estimator_api():
    features, labels, groups = signal_data()
    probe = LogisticProbe(c_grid=(0.1, 1.0), cv_folds=3, random_state=7, label_name="correct", position="slt",
                          layer=3)
    params = probe.get_params()
    assert params == {"c_grid": (0.1, 1.0), "cv_folds": 3, "max_iter": 1000, "random_state": 7, "dtype": "float64",
                      "label_name": "correct", "feature": "hidden_state", "position": "slt", "layer": 3,
                      "layer_end": None}
    assert not [name for name in vars(probe) if name.endswith("_")]  # the constructor only stores params
    with pytest.raises(NotFittedError):
        probe.predict_proba(features)
    copy = clone(probe)
    assert copy is not probe and copy.get_params() == params
    assert LogisticProbe().set_params(**params).get_params() == params
    assert probe.set_params(layer_end=4) is probe and probe.layer_end == 4
    probe.fit(features, labels, groups)
    np.testing.assert_array_equal(clone(probe).fit(features, labels, groups).coef_, probe.coef_)  # seeded
    assert not hasattr(clone(probe), "coef_")  # clone copies params, never fitted state
    ridge = RidgeProbe(c_grid=(0.1, 1.0), cv_folds=3, random_state=0)
    assert ridge.fit(features, features[:, 0], groups) is ridge and ridge.predict(features).shape == (len(labels),)
    assert not hasattr(ridge, "predict_proba") and not hasattr(ridge, "decision_function")  # a regressor


def test_scikit_learn_check_estimator_passes():
    """sklearn's own estimator checks (56 for the classifier); the ridge probe misses one, by design."""
    check_estimator(LogisticProbe(random_state=0))
    check_estimator(RidgeProbe(random_state=0), expected_failed_checks={
        "check_non_transformer_estimators_n_iter": "max_iter bounds the logistic solver; ridge is solved in closed "
                                                   "form and has no iteration count"})


def hand_grouped_cv(features, targets, groups, c_grid, cv_folds, random_state, kind):
    """The grouped CV of C written out by hand, as LinearProbe did it before GridSearchCV: per usable fold a
    scaler fitted on the fold's training rows, one fit per C, the held-out score, the mean over folds; the
    highest mean wins, ties to the smallest C; then one fit on all rows."""
    def model(c):
        if kind == "ridge":
            return Ridge(alpha=1 / c)
        return LogisticRegression(C=c, max_iter=1000, random_state=random_state)

    folds = GroupKFold(n_splits=min(cv_folds, len(np.unique(groups))), shuffle=True, random_state=random_state)
    scores = {c: [] for c in c_grid}
    for fit_rows, held_out_rows in folds.split(features, targets, groups):
        if kind == "logistic" and (len(set(targets[fit_rows])) < 2 or len(set(targets[held_out_rows])) < 2):
            continue
        if kind == "ridge" and len(set(targets[held_out_rows])) < 2:
            continue
        scaler = StandardScaler().fit(features[fit_rows])
        for c in c_grid:
            fitted = model(c).fit(scaler.transform(features[fit_rows]), targets[fit_rows])
            held_out = scaler.transform(features[held_out_rows])
            output = fitted.decision_function(held_out) if kind == "logistic" else fitted.predict(held_out)
            metric = "auroc" if kind == "logistic" else "spearman"
            scores[c].append(held_out_score(metric, targets[held_out_rows], output))
    means = {c: float(np.mean(s)) for c, s in scores.items()}
    best = min(c for c in c_grid if means[c] == max(means.values()))
    scaler = StandardScaler().fit(features)
    return best, means, np.ravel(model(best).fit(scaler.transform(features), targets).coef_)


@pytest.mark.parametrize("kind", ["logistic", "ridge"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grid_search_reproduces_the_hand_written_grouped_cv_exactly(kind, seed):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(40), 5)
    features = rng.normal(0, 1, (200, 12)) * rng.uniform(0.1, 10, 12)
    labels = features[:, 0] / features[:, 0].std() + rng.normal(0, 1.5, 200) > 0.5  # unbalanced, noisy
    targets = labels if kind == "logistic" else features[:, 1] + rng.normal(0, 5, 200)
    c_grid = (0.001, 0.01, 0.1, 1.0, 10.0)
    probe = (LogisticProbe if kind == "logistic" else RidgeProbe)(c_grid=c_grid, cv_folds=5, random_state=seed)
    probe.fit(features, targets, groups)
    best, means, coef = hand_grouped_cv(features, targets, groups, c_grid, 5, seed, kind)
    assert probe.C_ == best and probe.cv_scores_ == means  # bit for bit
    np.testing.assert_array_equal(probe.coef_, coef)


def test_round_trip_through_json_and_npz_gives_identical_predictions(tmp_path):
    features, labels, groups = signal_data()
    probe = LogisticProbe(c_grid=(0.1, 1.0), cv_folds=3, random_state=0, label_name="correct", position="slt",
                          layer=3).fit(features, labels, groups)
    save_probe(probe, tmp_path, "probe")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.json", "probe.npz"]
    metadata = json.loads((tmp_path / "probe.json").read_text())
    assert metadata["kind"] == "logistic" and "coef" not in metadata  # weights live in the npz only
    loaded = load_probe(tmp_path, "probe")
    assert type(loaded) is LogisticProbe and loaded.get_params() == {**probe.get_params(), "c_grid": [0.1, 1.0]}
    np.testing.assert_array_equal(loaded.decision_function(features), probe.decision_function(features))
    np.testing.assert_array_equal(loaded.predict_proba(features), probe.predict_proba(features))
    np.testing.assert_array_equal(loaded.margin(features), probe.margin(features))
    assert (loaded.C_, loaded.cv_scores_, loaded.n_iter_) == (probe.C_, probe.cv_scores_, probe.n_iter_)
    np.testing.assert_array_equal(loaded.classes_, probe.classes_)
    first = (tmp_path / "probe.npz").read_bytes()
    save_probe(loaded, tmp_path, "probe")  # equal probes, equal bytes: DVC sees no change
    assert (tmp_path / "probe.npz").read_bytes() == first


def test_location_probes_are_one_json_index_and_one_npz_of_stacked_weights(tmp_path):
    rng = np.random.default_rng(0)
    hidden = rng.normal(0, 1, (60, 2, 3, 16)).astype(np.float16)
    labels = {"correct": rng.random(60) < 0.5, "semantic_entropy": rng.normal(0, 1, 60)}
    probes = fit_location_probes(hidden, np.arange(60), ["tbg", "slt"], [0, 5, 7], labels, np.arange(60) // 3,
                                 c_grid=(0.1, 1.0), cv_folds=3, max_iter=200, random_state=0)
    save_location_probes(probes, tmp_path)
    with np.load(tmp_path / "location_probes.npz", allow_pickle=False) as archive:
        assert archive["coef"].shape == (12, 16) and archive["intercept"].shape == (12,)
    index = json.loads((tmp_path / "location_probes.json").read_text())
    assert index["n_probes"] == 12 and all("coef" not in record for record in index["probes"])
    loaded = load_location_probes(tmp_path)
    assert list(loaded) == list(probes)
    features = hidden[:, 1, 2, :].astype(np.float32)
    for key, probe in probes.items():
        assert type(loaded[key]) is type(probe) and loaded[key].C_ == probe.C_
        np.testing.assert_array_equal(loaded[key].predict(features), probe.predict(features))
    with pytest.raises(ValueError, match="different feature counts"):
        save_location_probes({**probes, ("x", "slt", 9): LogisticProbe().fit(features[:, :3], labels["correct"])},
                             tmp_path)


def test_loading_never_unpickles(tmp_path):
    features, labels, groups = signal_data()
    save_probe(LogisticProbe(random_state=0).fit(features, labels, groups), tmp_path, "probe")
    weights = dict(np.load(tmp_path / "probe.npz"))
    np.savez(tmp_path / "probe.npz", **{**weights, "coef": np.array([object()] * 5, dtype=object)})
    with pytest.raises(SchemaError, match=r"probe\.npz.*allow_pickle=False"):
        load_probe(tmp_path, "probe")
    (tmp_path / "probe.npz").write_bytes(pickle.dumps(weights))  # a pickle under the .npz name
    with pytest.raises(SchemaError, match=r"probe\.npz: not a probe weights \.npz"):
        load_probe(tmp_path, "probe")
    np.savez(tmp_path / "probe.npz", **{**weights, "coef": weights["coef"].astype(np.float32)})
    with pytest.raises(SchemaError, match="`coef` is float32"):
        load_probe(tmp_path, "probe")


def test_foreign_or_inconsistent_probe_files_are_refused(tmp_path):
    features, labels, groups = signal_data()
    probe = LogisticProbe(random_state=0).fit(features, labels, groups)
    metadata, weights = probe.to_arrays()
    with pytest.raises(ValueError, match="not a sep-linear-probe v2"):
        LinearProbe.from_arrays({**metadata, "format_version": 1}, weights)
    with pytest.raises(ValueError, match="coef"):
        LinearProbe.from_arrays(metadata, {**weights, "coef": weights["coef"][:-1]})
    with pytest.raises(ValueError, match="unknown probe params"):
        LinearProbe.from_arrays({**metadata, "params": {**metadata["params"], "kernel": "rbf"}}, weights)
    with pytest.raises(SchemaError, match="not found; run the train_probes stage"):
        load_probe(tmp_path, "missing")
    save_probe(probe, tmp_path, "probe")
    (tmp_path / "probe.json").write_text("[1, 2")
    with pytest.raises(SchemaError, match=r"probe\.json: not valid JSON"):
        load_probe(tmp_path, "probe")


def test_single_class_labels_name_the_label_and_split():
    features, _, groups = signal_data()
    with pytest.raises(SingleClassError, match=r"label `high_se` in split `train`.*= False"):
        LogisticProbe(label_name="high_se").fit(features, np.zeros(len(features), bool), groups)


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
    grouped = LogisticProbe(c_grid=(1.0, 100.0), cv_folds=5, random_state=0).fit(features, labels, groups)
    per_run = LogisticProbe(c_grid=(1.0, 100.0), cv_folds=5, random_state=0).fit(features, labels)
    assert max(grouped.cv_scores_.values()) < 0.8
    assert min(per_run.cv_scores_.values()) > 0.95


def test_folds_clamped_to_the_number_of_questions():
    features, labels, groups = signal_data(n_questions=3, runs=10)
    probe = LogisticProbe(c_grid=(0.1, 1.0), cv_folds=10, random_state=0).fit(features, labels, groups)
    assert probe.C_ in (0.1, 1.0)
    with pytest.raises(ValueError, match=">= 2 questions"):
        LogisticProbe(c_grid=(0.1, 1.0)).fit(features, labels, np.zeros(len(labels)))


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
    probe = RidgeProbe(c_grid=(0.01, 1.0), cv_folds=3, random_state=0,
                       label_name="semantic_entropy").fit(features, target, groups)
    assert probe.cv_scores_[1.0] > 0.9  # CV scores are Spearman correlations for a ridge probe
    assert probe_score(probe, features, target) > 0.95
    assert np.argmax(np.abs(probe.coef_)) == 3
    assert probe.score(features, target) > 0.9  # RegressorMixin: R^2
    save_probe(probe, tmp_path, "ridge")
    again = load_probe(tmp_path, "ridge")
    assert type(again) is RidgeProbe and again.kind == "ridge" and again.layer_end is None
    np.testing.assert_array_equal(again.predict(features), probe.predict(features))
    with pytest.raises(SingleClassError, match="non-constant"):
        RidgeProbe().fit(features, np.ones(200))


def test_range_features_concatenate_layers_in_order():
    hidden = np.arange(2 * 1 * 3 * 2, dtype=np.float16).reshape(2, 1, 3, 2)  # (runs, positions, layers, hidden)
    probe = LogisticProbe(position="slt", layer=5, layer_end=7)
    features = probe_features(probe, hidden, [1, 0], ["slt"], [0, 5, 7])
    # run 1, layers 5 and 7 (indices 1, 2): [8, 9] then [10, 11]
    np.testing.assert_array_equal(features, [[8, 9, 10, 11], [2, 3, 4, 5]])
    single = probe_features(LogisticProbe(position="slt", layer=0), hidden, [1], ["slt"], [0, 5, 7])
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
    params = type("P", (), {"max_layer_range": 0, "screen_locations": 0, "dtype": "float64", **estimator})
    probe, candidates, fitted = select_layer_range(runs, hidden, ["slt"], [0, 1, 2, 3], single, location,
                                                   {"train": labels[:240], "val": labels[240:]}, params, seed=0)
    assert fitted == 6 and len(candidates) == 10
    assert (probe.layer, probe.layer_end) == (1, 2)
    by_range = {(c.layer, c.layer_end): c.val_score for c in candidates}
    assert by_range[(1, 2)] > max(by_range[(1, 1)], by_range[(2, 2)])


def test_a_constant_feature_gives_a_ridge_probe_spearman_zero_not_a_crash():
    rng = np.random.default_rng(2)
    target = rng.normal(0, 1, 60)
    probe = RidgeProbe(c_grid=(0.1, 1.0), cv_folds=3, random_state=0).fit(
        np.ones((60, 3)), target, np.arange(60) // 3)  # e.g. the embedding of the same last prompt token
    assert probe.cv_scores_ == {0.1: 0.0, 1.0: 0.0} and probe_score(probe, np.ones((5, 3)), target[:5]) == 0.0


def resident_kib() -> int:
    return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmRSS:"))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_reading_every_location_of_a_mapped_array_keeps_memory_at_one_location(tmp_path):
    """Touched pages of a memory-mapped array stay resident until released: location_features releases them,
    so reading all (position, layer) slices of a 160 MB array leaves resident memory far below 160 MB."""
    path = tmp_path / "hidden.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(1000, 4, 10, 2048))
    array[:] = 1
    array.flush()
    del array
    hidden = np.load(path, mmap_mode="r")
    rows = np.arange(1000)
    before = resident_kib()
    for position in range(4):
        for layer in range(10):
            features = location_features(hidden, rows, position, layer)
    assert features.shape == (1000, 2048) and features.dtype == np.float32
    assert resident_kib() - before < 40_000  # one location is 4 MB as float16 (8 MB as float32); all are 160 MB
    hidden[:, :, :, 0].astype(np.float32).sum()  # touches every page, copies 40k values; no release after it
    assert resident_kib() - before > 120_000


def test_mean_difference_probe_is_the_class_mean_difference_of_standardised_features():
    """By hand: on standardised z, coef = mean(z * (y - mean y)) = p (1 - p) (mean z | True - mean z | False);
    its projection ranks like that difference; a continuous target gives the covariance direction (Spearman)."""
    rng = np.random.default_rng(3)
    features = rng.normal(size=(200, 6)) * [1, 2, 3, 4, 5, 6] + [0, 1, 2, 3, 4, 5]
    labels = rng.random(200) < 0.3
    features[labels, 2] += 8.0
    probe = MeanDifferenceProbe(label_name="correct", position="slt", layer=1).fit(features, labels)
    z = (features - features.mean(0)) / features.std(0)
    p = labels.mean()
    np.testing.assert_allclose(probe.coef_, p * (1 - p) * (z[labels].mean(0) - z[~labels].mean(0)), rtol=1e-10)
    assert probe.metric == "auroc" and probe.intercept_ == 0.0 and int(np.argmax(np.abs(probe.coef_))) == 2
    np.testing.assert_allclose(probe.decision_function(features), z @ probe.coef_, rtol=1e-9, atol=1e-12)
    assert probe_score(probe, features, labels) > 0.9
    assert not hasattr(probe, "predict_proba")  # a projection, not a probability

    target = features[:, 4] + rng.normal(0, 1, 200)
    regression = MeanDifferenceProbe(label_name="semantic_entropy").fit(features, target)
    np.testing.assert_allclose(regression.coef_, (z * (target - target.mean())[:, None]).mean(0), rtol=1e-10)
    assert regression.metric == "spearman" and probe_score(regression, features, target) > 0.8

    again = LinearProbe.from_arrays(*probe.to_arrays())
    assert type(again) is MeanDifferenceProbe and again.metric == "auroc"
    np.testing.assert_array_equal(again.decision_function(features), probe.decision_function(features))
    with pytest.raises(SingleClassError, match="label `correct` in split `train`"):
        MeanDifferenceProbe(label_name="correct").fit(features, np.ones(200, bool))


def test_mean_difference_location_probes_round_trip_through_the_store(tmp_path):
    """fit_location_probes(method="mean_difference") gives one MeanDifferenceProbe per label and location, with
    the metric of its label, and the probes directory stores and restores them exactly."""
    rng = np.random.default_rng(4)
    hidden = rng.normal(size=(60, 2, 3, 8)).astype(np.float16)
    labels = {"correct": rng.random(60) < 0.5, "semantic_entropy": rng.random(60)}
    probes = fit_location_probes(hidden, np.arange(60), ["think_end", "slt"], [0, 1, 2], labels,
                                 np.repeat(np.arange(12), 5), c_grid=[0.01], cv_folds=3, max_iter=100,
                                 random_state=0, method="mean_difference")
    assert {type(p) for p in probes.values()} == {MeanDifferenceProbe} and len(probes) == 2 * 2 * 3
    assert {key[0]: p.metric for key, p in probes.items()} == {"correct": "auroc", "semantic_entropy": "spearman"}
    save_location_probes(probes, tmp_path)
    loaded = load_location_probes(tmp_path)
    for key, probe in probes.items():
        np.testing.assert_array_equal(loaded[key].coef_, probe.coef_)
        assert loaded[key].metric == probe.metric
