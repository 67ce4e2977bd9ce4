"""Stage train_probes: split questions, then fit the accuracy probe, the SE probe and the entropy baseline.

Run from the repository root: ``python -m stages.train_probes`` (or ``dvc repro train_probes``).

- In-distribution questions are split by question into train / val / test (``probes.train_fraction``,
  ``probes.val_fraction``, the rest test; seeded with ``seed``); OOD questions get split ``ood``.
- Accuracy probe: label = the run is correct. SE probe: label = the run's question has high semantic
  entropy, the threshold fitted on train questions only (``probes.high_se_threshold``).
- For every (position, layer) one probe per label is fitted on train (C by question-grouped CV inside
  train); the (position, layer) with the best AUROC on val is kept. Test and OOD are never looked at.
- Entropy baseline: logistic regression of correctness on ``mean_token_entropy`` alone, fitted on train.

Writes ``{paths.probes}/`` atomically: splits.parquet, accuracy_probe.json, se_probe.json,
entropy_baseline.json (``LinearProbe.to_dict``) and selection.json; cost in
``{paths.metrics}/cost/train_probes.json``. ``load_dataset`` and ``probe_labels`` are shared with evaluate.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.common import atomic_path, cost_record, read_table, setup_logging
from stages.config import ProbeParams, Params, load_params
from stages.probes import (THRESHOLD_FUNCTIONS, LinearProbe, fit_location_probes, require_two_classes,
                           save_location_probes, save_probe, score_location_probes)
from stages.schema import (LOCATION_PROBES_FILE, PROBE_FILES, RUN_COLUMNS, RUN_KEY, SE_COLUMNS, SE_KEY,
                           SELECTION_FILE, SPLIT_COLUMNS, SPLIT_KEY, SPLITS_FILE, SchemaError, hidden_files,
                           validate_frame, validate_hidden)

log = logging.getLogger(__name__)

# which label each hidden-state probe predicts (positive class)
PROBE_LABEL = {"accuracy": "correct", "se": "high_se"}

RUN_FIELDS = ("question_id", "run_id", "correct", "mean_token_entropy", "sequence_loglik", "n_generated")
SE_FIELDS = ("question_id", "run_id", "semantic_entropy", "semantic_entropy_weighted", "naive_entropy", "cluster_id")


@dataclass(frozen=True)
class DatasetRuns:
    """One dataset's runs joined across stages, plus its hidden-state array."""

    runs: pd.DataFrame
    """One row per run, sorted by (question_id, run_id): RUN_FIELDS, SE_FIELDS and ``hidden_row``."""
    hidden: np.ndarray
    """(rows, positions, layers, hidden) float16, memory-mapped; row ``runs.hidden_row`` belongs to a run."""
    positions: tuple[str, ...]
    layers: tuple[int, ...]


# ---- load ------------------------------------------------------------------------------------------------
def load_dataset(params: Params, dataset: str) -> DatasetRuns:
    """Join runs, semantic entropy and the hidden-state index of ``dataset`` (``id`` or ``ood``), one row per run.

    Raises SchemaError naming the files when their run keys disagree.
    """
    runs_path = Path(params.paths.runs) / f"{dataset}.parquet"
    se_path = Path(params.paths.semantic_entropy) / f"{dataset}.parquet"
    runs = read_table(runs_path, RUN_COLUMNS, RUN_KEY, names=RUN_FIELDS)
    entropy = read_table(se_path, SE_COLUMNS, SE_KEY, names=SE_FIELDS)
    array_path, index_path, meta_path = hidden_files(params.paths.hidden, dataset)
    for path in (array_path, index_path, meta_path):
        if not path.exists():
            raise SchemaError(f"{path}: not found; run the trace stage (`dvc repro trace`)")
    hidden = np.load(array_path, mmap_mode="r")
    index = pd.read_parquet(index_path)
    meta = json.loads(meta_path.read_text())
    validate_hidden(hidden, index, meta, array_path)
    log.info("read %s: shape %s (runs, positions, layers, hidden)", array_path, hidden.shape)

    joined = runs.merge(entropy, on=list(RUN_KEY), how="outer", indicator=True, validate="one_to_one")
    _require_same_runs(joined, runs_path, se_path)
    joined = joined.drop(columns="_merge").merge(
        index[["question_id", "run_id", "row"]].rename(columns={"row": "hidden_row"}),
        on=list(RUN_KEY), how="left", validate="one_to_one")
    missing = joined["hidden_row"].isna()
    if missing.any():
        first = joined.loc[missing].iloc[0]
        raise SchemaError(f"{index_path}: no hidden-state row for {int(missing.sum())} runs of {runs_path}, e.g. "
                          f"question_id={first.question_id!r} run_id={first.run_id}; rerun the trace stage")
    joined["hidden_row"] = joined["hidden_row"].astype(np.int64)
    joined["correct"] = joined["correct"].astype(bool)
    joined = joined.sort_values(list(RUN_KEY), kind="mergesort").reset_index(drop=True)
    return DatasetRuns(joined, hidden, tuple(meta["positions"]), tuple(int(x) for x in meta["layers"]))


def _require_same_runs(joined: pd.DataFrame, runs_path: Path, se_path: Path) -> None:
    for side, path, other in (("left_only", runs_path, se_path), ("right_only", se_path, runs_path)):
        extra = joined[joined["_merge"] == side]
        if len(extra):
            raise SchemaError(f"{path}: {len(extra)} runs absent from {other}, e.g. question_id="
                              f"{extra.iloc[0].question_id!r} run_id={extra.iloc[0].run_id}; rerun the stages")


def require_same_locations(id_data: DatasetRuns, ood_data: DatasetRuns) -> None:
    """The id and ood hidden arrays must share positions and layers, or one probe cannot score both."""
    if len(ood_data.runs) and (id_data.positions, id_data.layers) != (ood_data.positions, ood_data.layers):
        raise SchemaError(f"hidden states: id has positions {id_data.positions} layers {id_data.layers}, ood has "
                          f"positions {ood_data.positions} layers {ood_data.layers}; rerun the trace stage")


# ---- compute ---------------------------------------------------------------------------------------------
def split_questions(id_question_ids, ood_question_ids, train_fraction: float, val_fraction: float,
                    seed: int) -> pd.DataFrame:
    """Assign each question a split: id questions to train / val / test at random, ood questions to ``ood``.

    Returns a frame with SPLIT_COLUMNS (question_id, dataset, split), one row per question. The shuffle
    starts from sorted ids, so the split depends only on the set of questions and the seed.
    Raises ValueError when a split would be empty.
    """
    id_questions = np.array(sorted(set(id_question_ids)), dtype=object)
    shuffled = id_questions[np.random.default_rng(seed).permutation(len(id_questions))]
    n_train = int(round(train_fraction * len(shuffled)))
    n_val = int(round(val_fraction * len(shuffled)))
    sizes = {"train": n_train, "val": n_val, "test": len(shuffled) - n_train - n_val}
    empty = [name for name, size in sizes.items() if size <= 0]
    if empty:
        raise ValueError(f"{len(shuffled)} in-distribution questions give an empty `{empty[0]}` split with "
                         f"probes.train_fraction={train_fraction}, probes.val_fraction={val_fraction}")
    split = np.repeat(["train", "val", "test"], [sizes["train"], sizes["val"], sizes["test"]])
    ood_questions = sorted(set(ood_question_ids))
    frame = pd.DataFrame({
        "question_id": list(shuffled) + ood_questions,
        "dataset": ["id"] * len(shuffled) + ["ood"] * len(ood_questions),
        "split": list(split) + ["ood"] * len(ood_questions),
    })
    log.info("split %d questions: %s", len(frame), frame["split"].value_counts().to_dict())
    return frame


def attach_splits(runs: pd.DataFrame, splits: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """``runs`` with a ``split`` column from ``splits``; raise when a run's question has no split."""
    mapping = splits[splits["dataset"] == dataset].set_index("question_id")["split"]
    split = runs["question_id"].map(mapping)
    if split.isna().any():
        raise SchemaError(f"splits: question {runs.loc[split.isna(), 'question_id'].iloc[0]!r} of dataset "
                          f"`{dataset}` has no split; rerun train_probes")
    return runs.assign(split=split.astype(str))


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
    """The label of each probe per run, shape (n,) bool: ``correct`` and ``high_se`` (SE > threshold)."""
    return {"correct": runs["correct"].to_numpy(bool),
            "high_se": runs["semantic_entropy"].to_numpy(float) > high_se_threshold}


def fit_probes_on_train(runs: pd.DataFrame, hidden, positions, layers, high_se_threshold: float,
                        probe_params: ProbeParams, seed: int) -> dict[tuple[str, str, int], LinearProbe]:
    """Every (label, position, layer) probe fitted on the train runs: the one code path train_probes and
    evaluate share, so evaluate's per-layer curves come from exactly the probes selected here.

    ``runs`` needs columns split, question_id, hidden_row, correct, semantic_entropy.
    """
    train = runs[runs["split"] == "train"]
    return fit_location_probes(hidden, train["hidden_row"].to_numpy(), positions, layers,
                               probe_labels(train, high_se_threshold), train["question_id"].to_numpy(),
                               c_grid=probe_params.c_grid, cv_folds=probe_params.cv_folds,
                               max_iter=probe_params.max_iter, random_state=seed)


def fit_entropy_baseline(runs: pd.DataFrame, probe_params: ProbeParams, seed: int) -> LinearProbe:
    """Logistic regression of ``correct`` on mean_token_entropy alone, fitted on the train runs."""
    train = runs[runs["split"] == "train"]
    baseline = LinearProbe(c_grid=probe_params.c_grid, cv_folds=probe_params.cv_folds,
                           max_iter=probe_params.max_iter, random_state=seed, label_name="correct",
                           feature="mean_token_entropy")
    return baseline.fit(train[["mean_token_entropy"]].to_numpy(float), train["correct"].to_numpy(bool),
                        train["question_id"].to_numpy())


@dataclass(frozen=True)
class TrainedProbes:
    probes: dict[str, LinearProbe]
    """``accuracy``, ``se`` (at their selected locations) and ``entropy_baseline``."""
    selection: dict[str, Any]
    """Contents of selection.json."""
    location_probes: dict[tuple[str, str, int], LinearProbe]
    """Every (label, position, layer) probe fitted on train; evaluate scores them per layer without refitting."""

    @property
    def n_fitted(self) -> int:
        """Final fits (excluding the cross-validation fits inside each): every location plus the baseline."""
        return len(self.location_probes) + 1


def train(runs: pd.DataFrame, hidden, positions, layers, probe_params: ProbeParams, seed: int) -> TrainedProbes:
    """Fit every probe on train and select each hidden-state probe's (position, layer) on val.

    Parameters
    ----------
    runs : one row per id run with columns split, question_id, hidden_row, correct, semantic_entropy,
        mean_token_entropy
    hidden : (rows, positions, layers, hidden) float16 array
    positions, layers : the array's position names and hidden-state indices
    """
    train_runs, val_runs = runs[runs["split"] == "train"], runs[runs["split"] == "val"]
    high_se_threshold = fit_high_se_threshold(train_runs["question_id"], train_runs["semantic_entropy"],
                                              probe_params.high_se_threshold)
    log.info("high-SE threshold (%s, %d train questions): %.4f", probe_params.high_se_threshold,
             train_runs["question_id"].nunique(), high_se_threshold)
    for split_name, split_runs in (("train", train_runs), ("val", val_runs)):
        for label_name, labels in probe_labels(split_runs, high_se_threshold).items():
            require_two_classes(labels, label_name, split_name)

    location_probes = fit_probes_on_train(runs, hidden, positions, layers, high_se_threshold, probe_params, seed)
    val_auroc = score_location_probes(location_probes, hidden, val_runs["hidden_row"].to_numpy(), positions,
                                      layers, probe_labels(val_runs, high_se_threshold))
    selected: dict[str, LinearProbe] = {}
    selection: dict[str, Any] = {}
    for probe_name, label_name in PROBE_LABEL.items():
        # first maximum in (position, layer) order: deterministic under ties
        candidates = val_auroc[val_auroc["label"] == label_name].reset_index(drop=True)
        best = candidates.iloc[int(np.argmax(candidates["auroc"].to_numpy()))]
        probe = location_probes[(label_name, best["position"], int(best["layer"]))]
        selected[probe_name] = probe
        selection[f"{probe_name}_probe"] = {"label": label_name, "position": best["position"],
                                            "layer": int(best["layer"]), "val_auroc": float(best["auroc"]),
                                            "C": probe.C_}
        log.info("%s probe: position %s, layer %d, val AUROC %.3f, C %g", probe_name, best["position"],
                 int(best["layer"]), best["auroc"], probe.C_)
    selected["entropy_baseline"] = fit_entropy_baseline(runs, probe_params, seed)

    selection.update({
        "high_se_threshold": high_se_threshold,
        "high_se_threshold_method": probe_params.high_se_threshold,
        "n_questions": runs.groupby("split")["question_id"].nunique().to_dict(),
        "n_runs": runs["split"].value_counts().to_dict(),
        "val_auroc": [{"probe": probe_name, "position": row.position, "layer": int(row.layer),
                       "auroc": None if np.isnan(row.auroc) else float(row.auroc)}
                      for probe_name, label_name in PROBE_LABEL.items()
                      for row in val_auroc[val_auroc["label"] == label_name].itertuples()],
    })
    return TrainedProbes(selected, selection, location_probes)


# ---- write -----------------------------------------------------------------------------------------------
def write_probes(directory: str | Path, splits: pd.DataFrame, trained: TrainedProbes) -> None:
    """Write the whole probes directory atomically: a killed stage leaves the previous one intact."""
    validate_frame(splits, SPLIT_COLUMNS, f"{directory}/{SPLITS_FILE}", SPLIT_KEY)
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        splits.to_parquet(tmp / SPLITS_FILE, index=False)
        for name, file_name in PROBE_FILES.items():
            save_probe(trained.probes[name], tmp / file_name)
        save_location_probes(trained.location_probes, tmp / LOCATION_PROBES_FILE)
        (tmp / SELECTION_FILE).write_text(json.dumps(trained.selection, indent=2) + "\n")
    log.info("wrote %s: %s, %s, %s, %s", directory, SPLITS_FILE, ", ".join(PROBE_FILES.values()), SELECTION_FILE,
             LOCATION_PROBES_FILE)


def run(params: Params) -> TrainedProbes:
    with cost_record(params.paths.metrics, "train_probes") as cost:
        id_data = load_dataset(params, "id")
        ood_data = load_dataset(params, "ood")
        require_same_locations(id_data, ood_data)
        splits = split_questions(id_data.runs["question_id"], ood_data.runs["question_id"],
                                 params.probes.train_fraction, params.probes.val_fraction, params.seed)
        runs = attach_splits(id_data.runs, splits, "id")
        trained = train(runs, id_data.hidden, id_data.positions, id_data.layers, params.probes, params.seed)
        write_probes(params.paths.probes, splits, trained)
        cost.update({"probes_fitted": trained.n_fitted, "train_runs": int((runs["split"] == "train").sum()),
                     "locations": len(id_data.positions) * len(id_data.layers)})
    return trained


def main() -> None:
    setup_logging()
    run(load_params())


if __name__ == "__main__":
    main()
