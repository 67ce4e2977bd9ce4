"""The analysis table: one compact row per run for the viewer, with entropies, probe scores and UMAP coordinates.

Used by the stage ``python -m stages.analysis`` (writes ``{paths.analysis}/analysis.parquet``, ANALYSIS_COLUMNS).

Probe probabilities and margins (one pair of columns per ``registry.per_run_probes()``) come from the probes
train_probes saved, at the (position, layer) each was selected at on validation. The 2-D UMAP is fitted on TRAIN
runs' hidden states at the accuracy probe's location and applied to every other run, so no test or OOD row shapes
the embedding.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from stages.lib import baselines, registry
from stages.lib.common import progress_bar, read_table
from stages.lib.dataset import DatasetRuns, load_dataset
from stages.lib.params import AnalysisParams, Params
from stages.lib.probe_store import load_probes
from stages.lib.probes import LogisticProbe, location_features
from stages.lib.questions import load_questions
from stages.lib.registry import ANALYSIS_COLUMNS
from stages.lib.schema import DATASETS, RUN_COLUMNS, SE_COLUMNS

log = logging.getLogger(__name__)

UMAP_PROBE = registry.ACCURACY  # the embedding is of the hidden states at this probe's location
RUN_TEXT_FIELDS = ("question_id", "run_id", "dataset", "text", "answer")  # beside dataset.RUN_FIELDS


def think_length(start: pd.Series, end: pd.Series, n_generated: pd.Series) -> pd.Series:
    """Tokens strictly inside the think span (``baselines.think_length``, the one definition); null when there is
    no </think>, so the viewer does not show a truncated run's partial reasoning as its length."""
    length = baselines.think_length(start, end, n_generated)
    return pd.Series(length, index=start.index).round().astype("Int64").mask(end.isna())


def probe_scores(probe: LogisticProbe, data: DatasetRuns, prefix: str) -> pd.DataFrame:
    """P(positive) and margin of ``probe`` for every run of ``data``, at the probe's own location."""
    features = location_features(data.hidden, data.runs["hidden_row"].to_numpy(),
                                 data.positions.index(probe.position), data.layers.index(probe.layer))
    return pd.DataFrame({f"{prefix}_prob": probe.predict_proba(features)[:, 1],
                         f"{prefix}_margin": probe.margin(features)})


def umap_coordinates(train_features: np.ndarray, all_features: np.ndarray, params: AnalysisParams,
                     seed: int) -> np.ndarray:
    """Fit a 2-D UMAP on ``train_features`` (n_train, hidden) and embed ``all_features`` (n, hidden) -> (n, 2).

    The fit sees each distinct training vector once: identical runs have identical hidden states, and the
    ties they create in the neighbour graph made the embedding differ from run to run despite the seed
    (measured: coordinates moved by up to ~40 units between two runs of the same stage).
    """
    import umap  # imported here: numba compiles on import, which the other stages need not pay for

    distinct = np.unique(train_features, axis=0)
    neighbors = min(params.umap_neighbors, len(distinct) - 1)
    reducer = umap.UMAP(n_components=2, n_neighbors=neighbors, min_dist=params.umap_min_dist, random_state=seed)
    reducer.fit(distinct)
    return reducer.transform(all_features).astype(np.float64)


def build_table(params: Params) -> pd.DataFrame:
    probes, selection, splits = load_probes(params.paths.probes)
    umap_probe = probes[UMAP_PROBE.name]

    frames, features = [], []
    for dataset in progress_bar(DATASETS, desc="analysis"):
        data = load_dataset(params, dataset)
        if not len(data.runs):
            continue
        runs_path = Path(params.paths.runs) / f"{dataset}.parquet"
        text = read_table(runs_path, RUN_COLUMNS, names=RUN_TEXT_FIELDS)
        clusters = read_table(Path(params.paths.semantic_entropy) / f"{dataset}.parquet", SE_COLUMNS)
        questions = load_questions(Path(params.paths.questions) / f"{dataset}.jsonl")
        frame = (data.runs
                 .merge(text, on=["question_id", "run_id"], validate="one_to_one")
                 .merge(clusters[["question_id", "run_id", "n_clusters"]], on=["question_id", "run_id"])
                 .merge(questions[["question_id", "question", "gold"]], on="question_id", validate="many_to_one")
                 .merge(splits[splits["dataset"] == dataset][["question_id", "split"]], on="question_id",
                        validate="many_to_one"))
        frame = pd.concat([frame, *(probe_scores(probes[probe.name], data, f"{probe.name}_probe")
                                    for _, probe in registry.per_run_probes())], axis=1)
        features.append(location_features(data.hidden, data.runs["hidden_row"].to_numpy(),
                                          data.positions.index(umap_probe.position),
                                          data.layers.index(umap_probe.layer)))
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    all_features = np.concatenate(features)
    coordinates = umap_coordinates(all_features[(table["split"] == "train").to_numpy()], all_features,
                                   params.analysis, params.seed)
    table["umap_x"], table["umap_y"] = coordinates[:, 0], coordinates[:, 1]
    table["high_se"] = registry.LABELS["high_se"](table, selection.high_se_threshold)
    table["think_length"] = think_length(table["think_start_index"], table["think_end_index"], table["n_generated"])
    return table[[c.name for c in ANALYSIS_COLUMNS]]
