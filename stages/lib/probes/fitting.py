"""Fitting probes where they read: the SE thresholds, a probe's features at a (position, layer), one probe's fit and
its own metric, and the per-location fit.

- ``best_split_threshold`` / ``median_threshold``: turn semantic entropy into a binary high-SE label.
- ``fit_location_probes`` / ``score_location_probes``: one probe per (position, layer) of a hidden-state
  array; the single code path both train_probes and evaluate use, so their probes are identical.
- ``probe_features`` / ``fit_probe`` / ``probe_score``: the features a probe reads from a hidden-state array,
  fitting one probe there, and its own metric (AUROC for logistic, Spearman for ridge).
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from stages.lib.hidden.store import release_mapped_pages
from stages.lib.io.files import progress_bar
from stages.lib.probes.linear import (
    LinearProbe,
    PROBE_CLASSES,
    MeanDifferenceProbe,
    held_out_score,
    probe_output,
    require_two_classes,
)

log = logging.getLogger(__name__)


# ---- thresholds that turn semantic entropy into a high-SE label ---------------------------------------
def best_split_threshold(values) -> float:
    """The threshold splitting ``values`` (n,) into a low and a high group with least within-group squared error.

    As in the SEP paper: sort the values, try every cut between two neighbours, and keep the cut that
    minimises SSE(low) + SSE(high). Equal values are never separated (a cut only falls between distinct
    neighbours); among equally good cuts the lowest wins. Returns the midpoint of the two neighbours, so
    ``value > threshold`` reproduces the split exactly.

    Raises ValueError when fewer than two distinct values exist (nothing to split).
    """
    values = np.sort(np.asarray(values, dtype=np.float64))
    if not np.all(np.isfinite(values)):
        raise ValueError("best_split_threshold: values contain non-finite entries")
    cuts = np.flatnonzero(np.diff(values) > 0) + 1  # cut k: low = values[:k], high = values[k:]
    if len(cuts) == 0:
        raise ValueError(f"best_split_threshold: need >= 2 distinct values, got {len(values)} values all equal"
                         if len(values) else "best_split_threshold: no values")
    # prefix sums give each side's SSE = sum(x^2) - (sum x)^2 / n in O(n); centred first for precision
    centred = values - values.mean()
    prefix_sum = np.r_[0.0, np.cumsum(centred)]
    prefix_square = np.r_[0.0, np.cumsum(centred ** 2)]
    n = len(values)
    low_sse = prefix_square[cuts] - prefix_sum[cuts] ** 2 / cuts
    high_sse = (prefix_square[n] - prefix_square[cuts]) - (prefix_sum[n] - prefix_sum[cuts]) ** 2 / (n - cuts)
    total = low_sse + high_sse
    best = cuts[int(np.flatnonzero(total <= total.min() + 1e-12 * max(1.0, abs(total.min())))[0])]
    return float((values[best - 1] + values[best]) / 2)


def median_threshold(values) -> float:
    """The median of ``values`` (n,); ``value > threshold`` is high."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        raise ValueError("median_threshold: no values")
    return float(np.median(values))


THRESHOLD_FUNCTIONS = {"best_split": best_split_threshold, "median": median_threshold}


# ---- one probe per (position, layer) ------------------------------------------------------------------
def location_features(hidden, rows, position_index: int, layer_index: int) -> np.ndarray:
    """Hidden states of ``rows`` at one (position, layer) as float32, shape (len(rows), hidden).

    ``hidden`` is the (runs, positions, layers, hidden) float16 array, usually the memory-mapped shards of
    ``hidden.HiddenStates`` (or one ``np.ndarray``): only the
    requested slice is read, and its pages are released after (``release_mapped_pages``), so memory stays at
    one location's features however many are read.
    """
    rows = np.asarray(rows, dtype=np.int64)
    features = np.asarray(hidden[rows, position_index, layer_index, :], dtype=np.float32)
    release_mapped_pages(hidden)
    return features


def probe_features(probe: LinearProbe, hidden, rows, positions: Sequence[str], layers: Sequence[int]) -> np.ndarray:
    """The features ``probe`` reads: its (position, layer), or its layers ``layer..layer_end`` concatenated in
    the array's layer order, shape (len(rows), hidden * n_layers) float32."""
    position_index = list(positions).index(probe.position)
    first = list(layers).index(probe.layer)
    last = first if probe.layer_end is None else list(layers).index(probe.layer_end)
    if last == first:
        return location_features(hidden, rows, position_index, first)
    rows = np.asarray(rows, dtype=np.int64)
    block = np.asarray(hidden[rows, position_index, first:last + 1, :], dtype=np.float32)
    release_mapped_pages(hidden)
    return block.reshape(len(rows), block.shape[1] * block.shape[2])


def target_kind(values) -> str:
    """``logistic`` for a boolean label, ``ridge`` for a continuous target."""
    return "logistic" if np.asarray(values).dtype == bool else "ridge"


def probe_score(probe: LinearProbe, features, targets) -> float | None:
    """The probe's own metric on (features, targets): AUROC of its log-odds for a logistic probe, Spearman
    correlation of its prediction for a ridge probe; None when undefined (one class, constant, no rows)."""
    targets = np.asarray(targets)
    if len(targets) == 0:
        return None
    return held_out_score(probe.metric, targets, probe_output(probe, features))


def fit_probe(hidden, rows, positions: Sequence[str], layers: Sequence[int], label_name: str, targets, groups,
              position: str, layer: int, layer_end: int | None = None, split: str = "train",
              **estimator) -> LinearProbe:
    """Fit one probe for ``targets`` (n,) on the given rows at ``position`` and ``layer`` (..``layer_end``).

    ``estimator`` holds c_grid, cv_folds, max_iter and random_state; the kind follows the targets' dtype.
    """
    probe = PROBE_CLASSES[target_kind(targets)](label_name=label_name, position=position, layer=int(layer),
                                                layer_end=None if layer_end is None else int(layer_end), **estimator)
    return probe.fit(probe_features(probe, hidden, rows, positions, layers), targets, groups, split=split)


def fit_location_probes(hidden, rows, positions: Sequence[str], layers: Sequence[int],
                        labels: Mapping[str, np.ndarray], groups, *, c_grid: Sequence[float], cv_folds: int,
                        max_iter: int, random_state: int | None, dtype: str = "float64",
                        split: str = "train", method: str = "fitted") -> dict[tuple[str, str, int], LinearProbe]:
    """Fit one probe per label and (position, layer) on the given rows of a hidden-state array.

    Parameters
    ----------
    hidden : (runs, positions, layers, hidden) array, float16 memmap
    rows : (n,) int, the array rows of the training runs
    positions, layers : names / hidden-state indices of the array's axes 1 and 2 (from the meta JSON)
    labels : label name -> (n,) targets aligned with ``rows``: bool for a logistic probe, float for ridge
    groups : (n,) question ids, for the grouped cross-validation of C
    c_grid, cv_folds, max_iter, random_state, dtype : passed to each probe (LogisticProbe for a bool label,
        RidgeProbe for a float target)
    method : ``fitted`` (those probes) or ``mean_difference`` (a MeanDifferenceProbe for every label: no solver,
        for screening the locations of a real model)

    Returns
    -------
    dict (label name, position, layer) -> fitted LinearProbe
    """
    for label_name, values in labels.items():
        if target_kind(values) == "logistic":
            require_two_classes(values, label_name, split)
    probes = {}
    locations = [(p, pos, i, layer) for p, pos in enumerate(positions) for i, layer in enumerate(layers)]
    for position_index, position, layer_index, layer in progress_bar(locations, desc="probes per (position, layer)",
                                                                   leave=False):
        features = location_features(hidden, rows, position_index, layer_index)
        for label_name, values in labels.items():
            probe_class = MeanDifferenceProbe if method == "mean_difference" else PROBE_CLASSES[target_kind(values)]
            probe = probe_class(c_grid=c_grid, cv_folds=cv_folds, max_iter=max_iter, random_state=random_state,
                                dtype=dtype, label_name=label_name, position=position, layer=int(layer))
            probes[(label_name, position, int(layer))] = probe.fit(features, values, groups, split=split)
    log.info("fitted %d probes (%d labels x %d positions x %d layers) on %d runs",
             len(probes), len(labels), len(positions), len(layers), len(np.asarray(rows)))
    return probes


def score_location_probes(probes: Mapping[tuple[str, str, int], LinearProbe], hidden, rows,
                          positions: Sequence[str], layers: Sequence[int],
                          labels: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """Each probe's own metric for its own label on the given rows (``probe_score``).

    Parameters
    ----------
    probes : output of ``fit_location_probes``
    hidden, rows, positions, layers : as in ``fit_location_probes`` (rows of the evaluated runs)
    labels : label name -> (n,) targets aligned with ``rows``

    Returns
    -------
    DataFrame with columns label, position, layer, metric (``auroc`` or ``spearman``), score (NaN when
    undefined: a single class, a constant target, or n = 0)
    """
    records = []
    for position_index, position in enumerate(positions):
        for layer_index, layer in enumerate(layers):
            features = location_features(hidden, rows, position_index, layer_index)
            for label_name, values in labels.items():
                probe = probes[(label_name, position, int(layer))]
                value = probe_score(probe, features, values)
                records.append({"label": label_name, "position": position, "layer": int(layer),
                                "metric": probe.metric,
                                "score": np.nan if value is None else value})
    return pd.DataFrame.from_records(records, columns=["label", "position", "layer", "metric", "score"])
