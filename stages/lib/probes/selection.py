"""Probe training and selection: split questions, fit the accuracy, SE and SE-regression probes and the entropy
baseline on train, and choose each probe's location on val.

Run from the repository root: ``python -m stages.train_probes`` (or ``dvc repro train_probes``).

- In-distribution questions are split by question into train / val / test (``probes.train_fraction``,
  ``probes.val_fraction``, the rest test; seeded with ``seed``); OOD questions get split ``ood``.
- Accuracy probe: label = the run is correct. SE probe: label = the run's question has high semantic
  entropy, the threshold fitted on train questions only (``probes.high_se_threshold``). SE regression probe:
  ridge regression of the semantic entropy itself (continuous), scored by Spearman correlation.
- For every (position, layer) one probe per label is fitted on train (C by question-grouped CV inside
  train); the (position, layer) with the best val score is kept, and the best layer at each position is
  recorded (the early-warning curve). Test and OOD are never looked at.
- At a real model's shapes (``probes.screen_locations`` = N > 0) that is ~17,000 fits; instead every location is
  screened once on train (the location probes: a difference-in-means direction per label, or a fit at
  ``probes.screen_c``; ``probes.screen_method``), ranked on val, and only the N best per probe are fitted with the
  grouped CV of C; the best of those N on val is kept. Still train for fitting and C, val for choosing.
- Layer ranges: at the accuracy and SE probes' positions, every contiguous range of up to
  ``probes.max_layer_range`` layers, concatenated, is fitted on train; the best on val is kept.
- Entropy baseline: logistic regression of correctness on ``mean_token_entropy`` alone, fitted on train.

The probes are those of the registry (``stages.lib.registry.probes()``): its single-layer probes, its layer-range
probes and its feature probe (the entropy baseline); each probe's target is a ``registry.TARGETS`` entry.

Writes ``{paths.probes}/`` atomically: splits.parquet, a JSON + npz pair per registry probe
(``stages.lib.probes.store``), location_probes.json + .npz and selection.json (``schema.Selection``); cost in
``{paths.metrics}/cost/train_probes.json``.
``probe_labels`` is shared with evaluate.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import pandas as pd

from stages.lib import registry
from stages.lib.params import ProbeParams
from stages.lib.probes.fitting import (
    THRESHOLD_FUNCTIONS,
    fit_location_probes,
    fit_probe,
    probe_features,
    probe_score,
    score_location_probes,
)
from stages.lib.probes.linear import LinearProbe, LogisticProbe, require_two_classes
from stages.lib.schema.reports import LayerChoice, PositionChoice, RangeCandidate, RangeChoice, Selection, ValScore

log = logging.getLogger(__name__)

def fit_high_se_threshold(question_ids, semantic_entropy, method: str) -> float:
    """Threshold on semantic entropy fitted on one value per question (SE is a property of the question).

    Parameters
    ----------
    question_ids : (n,) the question of each TRAIN run
    semantic_entropy : (n,) float, the SE of each train run (equal across a question's runs)
    method : ``best_split`` or ``median``
    """
    per_question = pd.Series(np.asarray(semantic_entropy, dtype=float)).groupby(np.asarray(question_ids)).first()
    return THRESHOLD_FUNCTIONS[method](per_question.to_numpy())


def probe_labels(runs: pd.DataFrame, high_se_threshold: float) -> dict[str, np.ndarray]:
    """Every target of ``registry.TARGETS`` per run, shape (n,): ``correct`` and ``high_se`` (SE > threshold) bool,
    and ``semantic_entropy`` float (the ridge probe's continuous target)."""
    return {name: target.values(runs, high_se_threshold) for name, target in registry.TARGETS.items()}


def fit_probes_on_train(runs: pd.DataFrame, hidden, positions, layers, high_se_threshold: float,
                        probe_params: ProbeParams, seed: int, method: str = "fitted",
                        ) -> dict[tuple[str, str, int], LinearProbe]:
    """Every (label, position, layer) probe fitted on the train runs: the one code path train_probes and
    evaluate share, so evaluate's per-layer curves come from exactly the probes selected here.

    ``runs`` needs columns split, question_id, hidden_row, correct, semantic_entropy. ``method``: as in
    ``probes.fit_location_probes``.
    """
    train = runs[runs["split"] == "train"]
    return fit_location_probes(hidden, train["hidden_row"].to_numpy(), positions, layers,
                               probe_labels(train, high_se_threshold), train["question_id"].to_numpy(),
                               c_grid=probe_params.c_grid, cv_folds=probe_params.cv_folds,
                               max_iter=probe_params.max_iter, random_state=seed, dtype=probe_params.dtype,
                               method=method)


def fit_entropy_baseline(runs: pd.DataFrame, probe_params: ProbeParams, seed: int) -> LogisticProbe:
    """Logistic regression of ``correct`` on mean_token_entropy alone, fitted on the train runs."""
    train = runs[runs["split"] == "train"]
    baseline = LogisticProbe(c_grid=probe_params.c_grid, cv_folds=probe_params.cv_folds,
                             max_iter=probe_params.max_iter, random_state=seed, dtype=probe_params.dtype,
                             label_name="correct",
                             feature="mean_token_entropy")
    return baseline.fit(train[["mean_token_entropy"]].to_numpy(float), train["correct"].to_numpy(bool),
                        train["question_id"].to_numpy())


@dataclass(frozen=True)
class TrainedProbes:
    probes: dict[str, LinearProbe]
    """Every probe of ``registry.probes()`` by name: the hidden-state probes at their selected locations and the
    entropy baseline."""
    selection: Selection
    """Contents of selection.json."""
    location_probes: dict[tuple[str, str, int], LinearProbe]
    """Every (label, position, layer) probe fitted on train; evaluate scores them per layer without refitting."""
    n_range_fits: int = 0
    """Probes fitted beyond the location probes: layer ranges (single layers reuse the location probes) and,
    after screening (``probes.screen_locations``), the cross-validated refits of the best locations."""

    @property
    def n_fitted(self) -> int:
        """Final fits (excluding the cross-validation fits inside each): locations, ranges and the baseline."""
        return len(self.location_probes) + self.n_range_fits + 1


def first_best(scores) -> int:
    """Index of the first maximum of ``scores`` (n,), ignoring NaN; ValueError when every score is NaN."""
    scores = np.asarray(scores, dtype=float)
    if np.all(np.isnan(scores)):
        raise ValueError("no candidate has a defined validation score (single-class or constant val labels)")
    return int(np.flatnonzero(scores == np.nanmax(scores))[0])


def layer_ranges(n_layers: int, max_length: int) -> list[tuple[int, int]]:
    """Contiguous (first, last) index ranges over ``n_layers`` traced layers, lengths 1..max_length
    (0 = any length), in (length, first) order, so ties go to the shortest and then the earliest range."""
    longest = n_layers if max_length == 0 else min(max_length, n_layers)
    return [(first, first + length - 1) for length in range(1, longest + 1)
            for first in range(n_layers - length + 1)]


def select_layer_range(runs: pd.DataFrame, hidden, positions, layers, single: LinearProbe,
                       location_probes, targets: Mapping[str, np.ndarray], probe_params: ProbeParams,
                       seed: int) -> tuple[LinearProbe, list[RangeCandidate], int]:
    """The best contiguous layer range at ``single``'s position, chosen on val: every range of up to
    ``probes.max_layer_range`` traced layers, concatenated, fitted on train.

    With ``probes.screen_locations`` > 0 only the ranges through ``single``'s layer are tried (at most
    ``max_layer_range`` (``max_layer_range`` + 1) / 2 of them instead of about ``max_layer_range`` per layer).

    Each range reuses the C that the grouped CV chose for ``single`` instead of its own CV: the wide
    concatenated features make lbfgs slow at weak regularisation (tens of seconds per fit at 640 features and
    C = 10), and a C chosen on train keeps the choice leak-free. Single-layer candidates are the location
    probes themselves. Returns the chosen probe, every candidate's val score, and the number of range probes
    fitted.
    """
    train_runs, val_runs = runs[runs["split"] == "train"], runs[runs["split"] == "val"]
    label_name = single.label_name
    candidates, probes, fitted = [], [], 0
    ranges = layer_ranges(len(layers), probe_params.max_layer_range)
    if probe_params.screen_locations:
        through = list(layers).index(single.layer)
        ranges = [(first, last) for first, last in ranges if first <= through <= last]
    log.info("%s: %d layer ranges of up to %s layers at %s", label_name, len(ranges),
             probe_params.max_layer_range or "any number of", single.position)
    for first, last in ranges:
        if first == last:  # the single-layer probe itself at its layer (after screening, the cross-validated one)
            probe = (single if int(layers[first]) == single.layer
                     else location_probes[(label_name, single.position, int(layers[first]))])
        else:
            probe = fit_probe(hidden, train_runs["hidden_row"].to_numpy(), positions, layers, label_name,
                              targets["train"], train_runs["question_id"].to_numpy(), single.position,
                              layers[first], layers[last], c_grid=(single.C_,), cv_folds=probe_params.cv_folds,
                              max_iter=probe_params.max_iter, random_state=seed, dtype=probe_params.dtype)
            fitted += 1
        score = probe_score(probe, probe_features(probe, hidden, val_runs["hidden_row"].to_numpy(), positions, layers),
                            targets["val"])
        probes.append(probe)
        candidates.append(RangeCandidate(layer=int(layers[first]), layer_end=int(layers[last]),
                                         val_score=None if score is None else float(score)))
    best = first_best([np.nan if c.val_score is None else c.val_score for c in candidates])
    chosen = probes[best]
    if chosen.layer_end is None:  # a single layer won: record it as the range layer..layer
        chosen = copy.deepcopy(chosen).set_params(layer_end=chosen.layer)
    return chosen, candidates, fitted


def cross_validate_best(runs: pd.DataFrame, hidden, positions, layers, candidates: pd.DataFrame, label_name: str,
                        labels: Mapping[str, Mapping[str, np.ndarray]], probe_params: ProbeParams,
                        seed: int) -> tuple[LinearProbe, pd.Series]:
    """After screening: refit the ``probes.screen_locations`` best locations of ``candidates`` (one label's
    screening val scores, in (position, layer) order) with C cross-validated on train over ``probes.c_grid``, and
    return the refit with the best val score and its ``candidates`` row with ``score`` replaced by that val score.

    Ties keep the (position, layer) order, in the ranking and in the final choice. Only train (fit, C) and val
    (ranking, choice) are read.
    """
    train_runs, val_runs = runs[runs["split"] == "train"], runs[runs["split"] == "val"]
    scores = candidates["score"].to_numpy(float)
    ranked = np.argsort(np.where(np.isnan(scores), np.inf, -scores), kind="stable")
    shortlist = candidates.iloc[ranked[:probe_params.screen_locations]].sort_index()
    refits, refit_scores = [], []
    for row in shortlist.itertuples():
        probe = fit_probe(hidden, train_runs["hidden_row"].to_numpy(), positions, layers, label_name,
                          labels["train"][label_name], train_runs["question_id"].to_numpy(), row.position,
                          row.layer, c_grid=probe_params.c_grid, cv_folds=probe_params.cv_folds,
                          max_iter=probe_params.max_iter, random_state=seed, dtype=probe_params.dtype)
        score = probe_score(probe, probe_features(probe, hidden, val_runs["hidden_row"].to_numpy(), positions,
                                                  layers), labels["val"][label_name])
        refits.append(probe)
        refit_scores.append(np.nan if score is None else score)
        log.info("%s: cross-validated at (%s, %d): C %g, val %.3f (screening %.3f)", label_name, row.position,
                 row.layer, probe.C_, refit_scores[-1], row.score)
    best = first_best(refit_scores)
    chosen = shortlist.iloc[best].copy()
    chosen["score"] = refit_scores[best]
    return refits[best], chosen


def train(runs: pd.DataFrame, hidden, positions, layers, probe_params: ProbeParams, seed: int) -> TrainedProbes:
    """Fit every probe on train and select each hidden-state probe's location on val.

    Parameters
    ----------
    runs : one row per id run with columns split, question_id, hidden_row, correct, semantic_entropy,
        mean_token_entropy
    hidden : (rows, positions, layers, hidden) float16 array
    positions, layers : the array's position names and hidden-state indices

    For each of ``registry.layer_probes()``: the (position, layer) with the best val score (AUROC; Spearman for
    the ridge ``se_regression`` probe), and the best layer per position (``by_position``: the early-warning
    curve). For each of ``registry.range_probes()``: the best contiguous layer range at its single-layer probe's
    position.
    """
    train_runs, val_runs = runs[runs["split"] == "train"], runs[runs["split"] == "val"]
    high_se_threshold = fit_high_se_threshold(train_runs["question_id"], train_runs["semantic_entropy"],
                                              probe_params.high_se_threshold)
    log.info("high-SE threshold (%s, %d train questions): %.4f", probe_params.high_se_threshold,
             train_runs["question_id"].nunique(), high_se_threshold)
    labels = {split_name: probe_labels(split_runs, high_se_threshold)
              for split_name, split_runs in (("train", train_runs), ("val", val_runs))}
    for split_name, split_labels in labels.items():
        for label_name in registry.binary_targets():
            require_two_classes(split_labels[label_name], label_name, split_name)

    screening = probe_params.screen_locations > 0
    location_params = (probe_params.model_copy(update={"c_grid": [probe_params.screen_c]}) if screening
                       else probe_params)
    method = probe_params.screen_method if screening and probe_params.screen_method == "mean_difference" else "fitted"
    location_probes = fit_probes_on_train(runs, hidden, positions, layers, high_se_threshold, location_params,
                                          seed, method)
    val_scores = score_location_probes(location_probes, hidden, val_runs["hidden_row"].to_numpy(), positions,
                                       layers, labels["val"])
    n_cv_fits = 0
    selected: dict[str, LinearProbe] = {}
    choices: dict[str, LayerChoice | RangeChoice] = {}
    by_position = []
    for spec in registry.layer_probes():
        probe_name, label_name = spec.name, spec.target
        candidates = val_scores[val_scores["label"] == label_name].reset_index(drop=True)
        if screening:
            probe, best = cross_validate_best(runs, hidden, positions, layers, candidates, label_name,
                                              labels, probe_params, seed)
            n_cv_fits += min(probe_params.screen_locations, len(candidates))
        else:
            best = candidates.iloc[first_best(candidates["score"])]  # first maximum in (position, layer) order
            probe = location_probes[(label_name, best["position"], int(best["layer"]))]
        selected[probe_name] = probe
        choices[f"{probe_name}_probe"] = LayerChoice(label=label_name, position=best["position"],
                                                     layer=int(best["layer"]), metric=best["metric"],
                                                     val_score=float(best["score"]), C=probe.C_)
        log.info("%s probe: position %s, layer %d, val %s %.3f, C %g", probe_name, best["position"],
                 int(best["layer"]), best["metric"], best["score"], probe.C_)
        for position, at_position in candidates.groupby("position", sort=False):
            row = at_position.iloc[first_best(at_position["score"])]
            by_position.append(PositionChoice(probe=probe_name, position=position, layer=int(row["layer"]),
                                              metric=row["metric"], val_score=float(row["score"])))

    n_range_fits = 0
    for spec in registry.range_probes():
        range_name, probe_name, label_name = spec.name, spec.range_of, spec.target
        probe, candidates, fitted = select_layer_range(
            runs, hidden, positions, layers, selected[probe_name], location_probes,
            {split_name: split_labels[label_name] for split_name, split_labels in labels.items()}, probe_params, seed)
        n_range_fits += fitted
        selected[range_name] = probe
        chosen = next(c for c in candidates if (c.layer, c.layer_end) == (probe.layer, probe.layer_end))
        choices[f"{range_name}_probe"] = RangeChoice(label=label_name, position=probe.position, layer=probe.layer,
                                                     layer_end=probe.layer_end, metric="auroc",
                                                     val_score=chosen.val_score, C=probe.C_, candidates=candidates)
        log.info("%s probe: position %s, layers %d..%d, val AUROC %.3f", range_name, probe.position, probe.layer,
                 probe.layer_end, chosen.val_score)
    selected[registry.ENTROPY_BASELINE.name] = fit_entropy_baseline(runs, probe_params, seed)

    selection = Selection(
        probes=choices,
        high_se_threshold=high_se_threshold,
        high_se_threshold_method=probe_params.high_se_threshold,
        n_questions=runs.groupby("split")["question_id"].nunique().to_dict(),
        n_runs=runs["split"].value_counts().to_dict(),
        by_position=by_position,
        val_scores=[ValScore(probe=spec.name, position=row.position, layer=int(row.layer), metric=row.metric,
                             score=None if np.isnan(row.score) else float(row.score))
                    for spec in registry.layer_probes()
                    for row in val_scores[val_scores["label"] == spec.target].itertuples()],
    )
    return TrainedProbes(selected, selection, location_probes, n_range_fits + n_cv_fits)


