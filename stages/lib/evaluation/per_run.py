"""The analysis outputs for the viewer: one compact row per run (entropies, probe scores, UMAP coordinates), each
single-layer probe's score at every traced location, and every run's tokens with their entropies.

Used by the stage ``python -m stages.analysis``, which writes in ``{paths.analysis}/``: ``analysis.parquet``
(ANALYSIS.columns), ``location_scores.npy`` + ``.json`` (``schema.LocationScoresMeta``: (runs, probes, positions,
layers) float32, rows aligned with analysis.parquet's) and ``tokens.parquet`` (TOKENS.columns, sorted by question in
small row groups, so the viewer reads one question's tokens without the rest).

Probe probabilities and margins (one pair of columns per ``registry.per_run_probes()``) come from the probes
train_probes saved, at the (position, layer) each was selected at on validation. The 2-D UMAP is fitted on TRAIN
runs' hidden states at the accuracy probe's location and applied to every other run, so no test or OOD row shapes
the embedding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np
import pandas as pd

from stages.lib.evaluation import baselines
from stages.lib import registry
from stages.lib.io.files import progress_bar
from stages.lib.probes.dataset import DatasetRuns
from stages.lib.params import AnalysisParams
from stages.lib.probes.linear import LinearProbe, LogisticProbe, probe_output
from stages.lib.probes.fitting import location_features
from stages.lib.registry import ANALYSIS
from stages.lib.schema.tables import TOKENS, ChosenLocation, LocationScoresMeta
from stages.lib.schema.reports import Selection

if TYPE_CHECKING:
    from stages.lib.models.loading import ModelSource

log = logging.getLogger(__name__)

UMAP_PROBE = registry.ACCURACY  # the embedding is of the hidden states at this probe's location
RUN_TEXT_FIELDS = ("question_id", "run_id", "dataset", "text", "answer")  # beside dataset.RUN_FIELDS
RUN_TOKEN_FIELDS = ("question_id", "run_id", "dataset", "generated_ids", "token_entropies", "think_start_index",
                    "think_end_index")


@dataclass(frozen=True)
class DatasetInputs:
    """What the analysis reads of one dataset (the stage reads it): its runs joined with their hidden states, the
    runs' text and token columns, the SE clusters and the questions."""

    data: DatasetRuns
    text: pd.DataFrame
    """RUNS, RUN_TEXT_FIELDS only."""
    token_runs: pd.DataFrame
    """RUNS, RUN_TOKEN_FIELDS only."""
    clusters: pd.DataFrame
    """SEMANTIC_ENTROPY."""
    questions: pd.DataFrame
    """QUESTIONS."""


@dataclass(frozen=True)
class AnalysisOutputs:
    table: pd.DataFrame
    """ANALYSIS.columns, one row per run."""
    location_scores: np.ndarray
    """(runs, probes, positions, layers) float32, rows aligned with ``table``'s."""
    location_meta: LocationScoresMeta
    tokens: pd.DataFrame
    """TOKENS.columns, sorted by (dataset, question_id, run_id)."""


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


def probe_output_name(probe: registry.Probe, kind: str = "logistic") -> str:
    """What a location probe's value in location_scores is: P(positive class), the predicted target, or (after
    ``probes.screen_method: mean_difference``) the projection on the difference-in-means direction."""
    target = registry.TARGETS[probe.target]
    if kind == "mean_difference":
        return f"{target.display_name} direction (difference in means)"
    return f"P({target.display_name})" if target.binary else f"predicted {target.display_name}"


def location_scores(location_probes: Mapping[tuple[str, str, int], LinearProbe], data: DatasetRuns,
                    probes: tuple[registry.Probe, ...]) -> np.ndarray:
    """Each of ``probes``' output at every traced (position, layer) for every run of ``data``, from the location
    probes train_probes fitted there (keyed (target, position, layer)): P(positive) of a logistic probe, the
    prediction of a ridge one. Shape (runs, probes, positions, layers) float32; NaN where no probe was fitted.

    Each location's features are read once for all probes, so memory stays at one location's (runs, hidden)."""
    rows = data.runs["hidden_row"].to_numpy()
    scores = np.full((len(rows), len(probes), len(data.positions), len(data.layers)), np.nan, dtype=np.float32)
    for position_index, position in enumerate(data.positions):
        for layer_index, layer in enumerate(data.layers):
            fitted = [(i, location_probes.get((probe.target, position, int(layer)))) for i, probe in enumerate(probes)]
            fitted = [(i, probe) for i, probe in fitted if probe is not None]
            if not fitted or not len(rows):
                continue
            features = location_features(data.hidden, rows, position_index, layer_index)
            for i, probe in fitted:
                output = (probe.predict_proba(features)[:, 1] if isinstance(probe, LogisticProbe)
                          else probe_output(probe, features))
                scores[:, i, position_index, layer_index] = output
    return scores


def location_meta(selection: Selection, probes: tuple[registry.Probe, ...], positions, layers,
                  n_runs: int, location_probes: Mapping[tuple[str, str, int], LinearProbe]) -> LocationScoresMeta:
    chosen = [selection.probes[f"{probe.name}_probe"] for probe in probes]
    kinds = [next((fitted.kind for (target, _, _), fitted in location_probes.items() if target == probe.target),
                  "logistic") for probe in probes]
    return LocationScoresMeta(n_runs=n_runs, probes=[probe.name for probe in probes],
                              outputs=[probe_output_name(probe, kind) for probe, kind in zip(probes, kinds)],
                              chosen=[ChosenLocation(position=c.position, layer=c.layer) for c in chosen],
                              positions=list(positions), layers=[int(layer) for layer in layers])


def token_table(runs: pd.DataFrame, decode: Callable[[list[int]], list[str]]) -> pd.DataFrame:
    """TOKENS.columns for ``runs`` (RUN_TOKEN_FIELDS): each generated token as its own text piece, sorted by
    (dataset, question_id, run_id).

    ``decode`` maps a list of distinct token ids to their pieces (one tokenizer call for the whole vocabulary in
    use, not one per token of every run). A token that is part of a multi-byte character decodes alone to U+FFFD.
    """
    runs = runs.sort_values(["dataset", "question_id", "run_id"]).reset_index(drop=True)
    lengths = runs["generated_ids"].map(len).to_numpy()
    entropy_lengths = runs["token_entropies"].map(len).to_numpy()
    if (lengths != entropy_lengths).any():
        row = runs.iloc[int(np.flatnonzero(lengths != entropy_lengths)[0])]
        raise ValueError(f"run ({row['question_id']!r}, {row['run_id']}): {len(row['generated_ids'])} generated ids "
                         f"but {len(row['token_entropies'])} token entropies")
    ids = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in runs["generated_ids"]]) if len(runs) \
        else np.zeros(0, dtype=np.int64)
    distinct, inverse = np.unique(ids, return_inverse=True)
    pieces = np.asarray(decode([int(i) for i in distinct]) if len(distinct) else [], dtype=object)
    flat = pieces[inverse] if len(ids) else np.zeros(0, dtype=object)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return pd.DataFrame({
        "dataset": runs["dataset"], "question_id": runs["question_id"], "run_id": runs["run_id"],
        "tokens": [list(flat[start:end]) for start, end in zip(bounds[:-1], bounds[1:])],
        "token_entropies": [np.asarray(values, dtype=np.float32) for values in runs["token_entropies"]],
        "think_start_index": runs["think_start_index"], "think_end_index": runs["think_end_index"],
    })[[column.name for column in TOKENS.columns]]


def tokenizer_decoder(source: ModelSource) -> Callable[[list[int]], list[str]]:
    """``decode`` for ``token_table``: the model's tokenizer (never its weights), each id decoded alone with the
    special tokens kept."""
    from transformers import AutoTokenizer  # imported here: the rest of the stage does not need transformers

    tokenizer = AutoTokenizer.from_pretrained(source.path, **source.from_pretrained_kwargs())
    return lambda ids: tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                              clean_up_tokenization_spaces=False)


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


def build(inputs: dict[str, DatasetInputs], probes: Mapping[str, LinearProbe], selection: Selection,
          splits: pd.DataFrame, location_probes: Mapping[tuple[str, str, int], LinearProbe],
          decode: Callable[[list[int]], list[str]], settings: AnalysisParams, seed: int) -> AnalysisOutputs:
    """The analysis outputs from what the stage read: ``inputs`` per dataset (datasets without runs left out), the
    probes, selection and splits of train_probes, the location probes and the tokenizer's ``decode``."""
    layer_probes = registry.layer_probes()
    umap_probe = probes[UMAP_PROBE.name]

    frames, features, scores, tokens, axes = [], [], [], [], None
    for dataset, loaded in progress_bar(inputs.items(), desc="analysis"):
        data, text, clusters, questions = loaded.data, loaded.text, loaded.clusters, loaded.questions
        tokens.append(token_table(loaded.token_runs, decode))
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
        if len(frame) != len(data.runs):
            raise ValueError(f"{dataset}: {len(data.runs)} runs but {len(frame)} rows after joining their text, "
                             "clusters, questions and splits")
        scores.append(location_scores(location_probes, data, layer_probes))
        if axes is not None and axes != (data.positions, data.layers):
            raise ValueError(f"{dataset}: traced at {data.positions} x {data.layers}, unlike {axes}")
        axes = (data.positions, data.layers)
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    all_features = np.concatenate(features)
    coordinates = umap_coordinates(all_features[(table["split"] == "train").to_numpy()], all_features,
                                   settings, seed)
    table["umap_x"], table["umap_y"] = coordinates[:, 0], coordinates[:, 1]
    table["high_se"] = registry.LABELS["high_se"](table, selection.high_se_threshold)
    table["think_length"] = think_length(table["think_start_index"], table["think_end_index"], table["n_generated"])
    all_scores = np.concatenate(scores)
    return AnalysisOutputs(table=table[[c.name for c in ANALYSIS.columns]], location_scores=all_scores,
                           location_meta=location_meta(selection, layer_probes, *axes, n_runs=len(all_scores),
                                                       location_probes=location_probes),
                           tokens=pd.concat(tokens, ignore_index=True))
