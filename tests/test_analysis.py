"""Pure pieces of the analysis stage (the whole stage runs in tests/test_pipeline_dvc.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stages.lib.evaluation.per_run import probe_scores, think_length, umap_coordinates
from stages.lib.probes.dataset import DatasetRuns
from stages.lib.params import AnalysisParams
from stages.lib.probes.linear import LogisticProbe


def test_think_length_counts_tokens_strictly_inside_the_span():
    start = pd.Series([0, None, 2, 0], dtype="Int64")
    end = pd.Series([5, 3, None, 1], dtype="Int64")
    assert think_length(start, end, pd.Series([9, 9, 9, 9])).tolist() == [4, 3, pd.NA, 0]


def test_umap_is_fitted_on_train_rows_only():
    """Rows outside train are only transformed: moving them leaves the train embedding unchanged."""
    rng = np.random.default_rng(0)
    train = rng.normal(size=(60, 8))
    others = rng.normal(size=(20, 8))
    params = AnalysisParams(umap_neighbors=5, umap_min_dist=0.1)
    first = umap_coordinates(train, np.concatenate([train, others]), params, seed=0)
    second = umap_coordinates(train, np.concatenate([train, others + 5.0]), params, seed=0)
    assert first.shape == (80, 2) and np.isfinite(first).all()
    np.testing.assert_allclose(first[:60], second[:60])
    assert not np.allclose(first[60:], second[60:])


def test_probe_scores_read_the_probe_at_its_own_location():
    """P(positive) is predict_proba's positive column and the margin its signed distance, from the probe's
    (position, layer) of the rows ``hidden_row`` points to."""
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(40, 2, 3, 4)).astype(np.float16)  # (rows, positions, layers, hidden)
    labels = hidden[:, 1, 2, 0] > 0
    probe = LogisticProbe(position="slt", layer=7).fit(hidden[:, 1, 2, :].astype(np.float32), labels)
    rows = rng.permutation(40)
    data = DatasetRuns(runs=pd.DataFrame({"hidden_row": rows}), hidden=hidden, positions=("tbg", "slt"),
                       layers=(0, 5, 7))
    table = probe_scores(probe, data, "accuracy_probe")
    features = hidden[rows, 1, 2, :].astype(np.float32)
    np.testing.assert_array_equal(table["accuracy_probe_prob"], probe.predict_proba(features)[:, 1])
    np.testing.assert_array_equal(table["accuracy_probe_margin"], probe.margin(features))
    assert ((table["accuracy_probe_prob"] > 0.5) == labels[rows]).mean() > 0.9


def test_location_scores_hold_each_probe_at_every_location():
    """Every (position, layer) cell is the location probe of that probe's target there, applied to the run's hidden
    state at that cell; a location without a fitted probe is NaN."""
    from stages.lib import registry
    from stages.lib.evaluation.per_run import location_scores
    from stages.lib.probes.linear import RidgeProbe

    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(30, 2, 3, 4)).astype(np.float16)  # (rows, positions, layers, hidden)
    positions, layers = ("tbg", "slt"), (0, 1, 2)
    location_probes = {}
    for p, position in enumerate(positions):
        for j, layer in enumerate(layers):
            features = hidden[:, p, j, :].astype(np.float32)
            location_probes[("correct", position, layer)] = LogisticProbe(position=position, layer=layer).fit(
                features, features[:, 0] > 0)
            if (position, layer) != ("slt", 2):
                location_probes[("semantic_entropy", position, layer)] = RidgeProbe(
                    position=position, layer=layer).fit(features, features[:, 1] + 0.1 * rng.normal(size=30))
    rows = rng.permutation(30)[:20]
    data = DatasetRuns(runs=pd.DataFrame({"hidden_row": rows}), hidden=hidden, positions=positions, layers=layers)
    probes = (registry.ACCURACY, registry.SE_REGRESSION)
    scores = location_scores(location_probes, data, probes)
    assert scores.shape == (20, 2, 2, 3) and scores.dtype == np.float32
    features = hidden[rows, 1, 0, :].astype(np.float32)
    np.testing.assert_allclose(scores[:, 0, 1, 0], location_probes[("correct", "slt", 0)].predict_proba(features)[:, 1],
                               rtol=1e-6)
    np.testing.assert_allclose(scores[:, 1, 1, 0], location_probes[("semantic_entropy", "slt", 0)].predict(features),
                               rtol=1e-5, atol=1e-6)
    assert np.isnan(scores[:, 1, 1, 2]).all() and np.isfinite(scores[:, 0]).all()


def test_location_scores_of_screening_probes_are_their_projections_and_say_so():
    """After probes.screen_method: mean_difference the location probes are difference-in-means directions: the
    cells hold their projections (no probability), and the meta names them as such."""
    from stages.lib import registry
    from stages.lib.evaluation.per_run import location_meta, location_scores
    from stages.lib.probes.linear import MeanDifferenceProbe
    from stages.lib.schema.reports import LayerChoice, Selection

    rng = np.random.default_rng(2)
    hidden = rng.normal(size=(30, 1, 2, 4)).astype(np.float16)
    features = [hidden[:, 0, j, :].astype(np.float32) for j in range(2)]
    location_probes = {("correct", "slt", layer): MeanDifferenceProbe(position="slt", layer=layer).fit(
        features[layer], features[layer][:, 0] > 0) for layer in (0, 1)}
    data = DatasetRuns(runs=pd.DataFrame({"hidden_row": np.arange(30)}), hidden=hidden, positions=("slt",),
                       layers=(0, 1))
    scores = location_scores(location_probes, data, (registry.ACCURACY,))
    np.testing.assert_allclose(scores[:, 0, 0, 1], location_probes[("correct", "slt", 1)].decision_function(
        features[1]), rtol=1e-5, atol=1e-6)
    choice = LayerChoice(label="correct", position="slt", layer=1, metric="auroc", val_score=0.9, C=1.0)
    selection = Selection.model_construct(probes={"accuracy_probe": choice})
    meta = location_meta(selection, (registry.ACCURACY,), ("slt",), (0, 1), 30, location_probes)
    assert meta.outputs == ["correct direction (difference in means)"]


def test_token_table_decodes_each_distinct_id_once_and_sorts_by_question():
    from stages.lib.evaluation.per_run import token_table
    from stages.lib.schema.tables import TOKENS
    from stages.lib.schema.machinery import validate_frame

    calls = []

    def decode(ids):
        calls.append(list(ids))
        return [f"<{i}>" for i in ids]

    runs = pd.DataFrame({"question_id": ["q2", "q1", "q1"], "run_id": [0, 1, 0], "dataset": ["id", "id", "id"],
                         "generated_ids": [[5, 6], [6, 7, 5], []], "token_entropies": [[0.1, 0.2], [0.3, 0.4, 0.5], []],
                         "think_start_index": pd.array([0, 0, None], dtype="Int64"),
                         "think_end_index": pd.array([1, None, None], dtype="Int64")})
    table = validate_frame(token_table(runs, decode), TOKENS.columns, "tokens", TOKENS.key)
    assert calls == [[5, 6, 7]]
    assert list(zip(table["question_id"], table["run_id"])) == [("q1", 0), ("q1", 1), ("q2", 0)]
    assert [list(tokens) for tokens in table["tokens"]] == [[], ["<6>", "<7>", "<5>"], ["<5>", "<6>"]]
    np.testing.assert_allclose(table["token_entropies"].iloc[1], [0.3, 0.4, 0.5], rtol=1e-6)
    bad = runs.assign(token_entropies=[[0.1], [0.3, 0.4, 0.5], []])
    import pytest

    with pytest.raises(ValueError, match="2 generated ids but 1 token entropies"):
        token_table(bad, decode)
