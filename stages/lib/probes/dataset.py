"""One dataset's runs joined across stages (runs, semantic entropy, hidden-state index) and the question split.

Every stage that needs runs with their hidden states (train_probes, evaluate, stability, analysis) loads them with
``load_dataset``; splits go by question, never by run."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stages.lib.io.files import read_table
from stages.lib.hidden.store import HiddenStates, open_hidden
from stages.lib.params import Params
from stages.lib.schema.tables import RUNS, SEMANTIC_ENTROPY, hidden_files
from stages.lib.errors import UserError
from stages.lib.schema.machinery import SchemaError

log = logging.getLogger(__name__)


RUN_FIELDS = ("question_id", "run_id", "correct", "mean_token_entropy", "sequence_loglik", "n_generated",
              "think_start_index", "think_end_index", "truncated", "answer_source", "token_logprobs",
              "token_topk_logprob_mean")
"""The run columns every score can read (``registry.ScoreInputs``) and evaluate's answer-source counts."""

SE_FIELDS = ("question_id", "run_id", "semantic_entropy", "semantic_entropy_weighted", "naive_entropy", "cluster_id",
             "num_semantic_sets", "eigv", "degree", "eccentricity", "kernel_language_entropy")


@dataclass(frozen=True)
class DatasetRuns:
    """One dataset's runs joined across stages, plus its hidden-state array."""

    runs: pd.DataFrame
    """One row per run, sorted by (question_id, run_id): RUN_FIELDS, SE_FIELDS and ``hidden_row``."""
    hidden: HiddenStates
    """(rows, positions, layers, hidden) float16, one memory-mapped shard per position; row ``runs.hidden_row``
    belongs to a run."""
    positions: tuple[str, ...]
    layers: tuple[int, ...]


# ---- load ------------------------------------------------------------------------------------------------
def load_dataset(params: Params, dataset: str) -> DatasetRuns:
    """Join runs, semantic entropy and the hidden-state index of ``dataset`` (``id`` or ``ood``), one row per run.

    Raises SchemaError naming the files when their run keys disagree.
    """
    runs_path = Path(params.paths.runs) / f"{dataset}.parquet"
    se_path = Path(params.paths.semantic_entropy) / f"{dataset}.parquet"
    runs = read_table(RUNS, runs_path, names=RUN_FIELDS)
    entropy = read_table(SEMANTIC_ENTROPY, se_path, names=SE_FIELDS)
    shard_dir, index_path, _ = hidden_files(params.paths.hidden, dataset)
    hidden, index, meta = open_hidden(params.paths.hidden, dataset)
    log.info("read %s/: shape %s (runs, positions, layers, hidden), one shard per position", shard_dir, hidden.shape)

    joined = runs.merge(entropy, on=list(RUNS.key), how="outer", indicator=True, validate="one_to_one")
    _require_same_runs(joined, runs_path, se_path)
    joined = joined.drop(columns="_merge").merge(
        index[["question_id", "run_id", "row"]].rename(columns={"row": "hidden_row"}),
        on=list(RUNS.key), how="left", validate="one_to_one")
    missing = joined["hidden_row"].isna()
    if missing.any():
        first = joined.loc[missing].iloc[0]
        raise SchemaError(f"{index_path}: no hidden-state row for {int(missing.sum())} runs of {runs_path}, e.g. "
                          f"question_id={first.question_id!r} run_id={first.run_id}; rerun the trace stage")
    joined["hidden_row"] = joined["hidden_row"].astype(np.int64)
    joined["correct"] = joined["correct"].astype(bool)
    joined = joined.sort_values(list(RUNS.key), kind="mergesort").reset_index(drop=True)
    return DatasetRuns(joined, hidden, tuple(meta.positions), tuple(meta.layers))


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

    Returns a frame with QUESTION_SPLITS.columns (question_id, dataset, split), one row per question. The shuffle
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
        raise UserError(f"{len(shuffled)} in-distribution questions give an empty `{empty[0]}` split with "
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
