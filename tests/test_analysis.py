"""Pure pieces of the analysis stage (the whole stage runs in tests/test_pipeline_dvc.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stages.lib.analysis import think_length, umap_coordinates
from stages.lib.params import AnalysisParams


def test_think_length_counts_tokens_strictly_inside_the_span():
    start = pd.Series([0, None, 2, 0], dtype="Int64")
    end = pd.Series([5, 3, None, 1], dtype="Int64")
    assert think_length(start, end).tolist() == [4, 3, pd.NA, 0]


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
