"""Pure pieces of the analysis stage (the whole stage runs in tests/test_pipeline_dvc.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stages.lib.analysis import probe_scores, think_length, umap_coordinates
from stages.lib.dataset import DatasetRuns
from stages.lib.params import AnalysisParams
from stages.lib.probes import LogisticProbe


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
