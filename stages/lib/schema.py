"""The one definition of every hand-off between stages: file names, columns, dtypes, keys and array shapes.

Writers call ``validate_frame`` before writing and readers call it after reading, so a mismatch fails
loudly with the file and column named instead of surfacing later as a KeyError or a silent NaN.

Keys: a question is identified by ``question_id`` (unique within a dataset); a run by
(``question_id``, ``run_id``) with ``run_id`` in ``0..K-1``. ``dataset`` is ``id`` (in-distribution) or ``ood``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from stages.lib.errors import UserError

DATASETS = ("id", "ood")
SPLITS = ("train", "val", "test", "ood")


class SchemaError(UserError):
    """A table or array does not match its contract."""


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # one of: str, int, float, bool, list
    nullable: bool = False
    doc: str = ""


def _kind_ok(series: pd.Series, kind: str) -> bool:
    values = series.dropna()
    if kind == "str":
        return pd.api.types.is_string_dtype(series) or pd.api.types.is_object_dtype(series) and all(
            isinstance(v, str) for v in values)
    if kind == "int":
        return pd.api.types.is_integer_dtype(series) or (len(values) == 0) or (
            pd.api.types.is_float_dtype(series) and bool(np.all(np.mod(values, 1) == 0)))
    if kind == "float":
        return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)
    if kind == "bool":
        return pd.api.types.is_bool_dtype(series) or (len(values) == 0)
    if kind == "list":
        return all(isinstance(v, (list, tuple, np.ndarray)) for v in values)
    raise ValueError(f"unknown column kind {kind!r}")


_EMPTY_DTYPES = {"str": object, "int": "int64", "float": "float64", "bool": bool, "list": object}


def empty_frame(columns: tuple[Column, ...]) -> pd.DataFrame:
    """A frame with no rows and the columns' dtypes (so it validates and concatenates cleanly)."""
    return pd.DataFrame({col.name: pd.Series(dtype=_EMPTY_DTYPES[col.kind]) for col in columns})


def validate_frame(frame: pd.DataFrame, columns: tuple[Column, ...], source: str | Path,
                   key: tuple[str, ...] = ()) -> pd.DataFrame:
    """Check that ``frame`` has every column with the right kind, no unexpected nulls, and a unique key.

    ``source`` names the file (or stage output) in the error message.
    """
    for col in columns:
        if col.name not in frame.columns:
            raise SchemaError(f"{source}: missing column `{col.name}` ({col.kind}{': ' + col.doc if col.doc else ''})")
        series = frame[col.name]
        if not col.nullable and series.isna().any():
            row = int(np.flatnonzero(series.isna().to_numpy())[0])
            raise SchemaError(f"{source}: column `{col.name}` has a null at row {row}; expected {col.kind}")
        if not _kind_ok(series, col.kind):
            raise SchemaError(f"{source}: column `{col.name}` has dtype {series.dtype}; expected {col.kind}")
    if key and frame.duplicated(list(key)).any():
        row = int(np.flatnonzero(frame.duplicated(list(key)).to_numpy())[0])
        raise SchemaError(f"{source}: duplicate key {tuple(frame.iloc[row][list(key)])} for {key}")
    return frame


# ---- questions: data/questions/{id,ood}.jsonl -------------------------------------------------------
QUESTION_COLUMNS = (
    Column("question_id", "str"),
    Column("dataset", "str", doc="`id` or `ood`"),
    Column("question", "str", doc="the text shown to the model (before any chat template)"),
    Column("gold", "str", doc="the reference final answer"),
)
QUESTION_KEY = ("question_id",)

# ---- runs: data/runs/{id,ood}.parquet, one row per sampled run --------------------------------------
RUN_COLUMNS = (
    Column("question_id", "str"),
    Column("run_id", "int"),
    Column("dataset", "str"),
    Column("prompt_ids", "list", doc="token ids fed to the model (chat template applied)"),
    Column("generated_ids", "list", doc="sampled token ids, EOS excluded"),
    Column("text", "str", doc="decoded generated text, special tokens kept"),
    Column("think_start_index", "int", nullable=True, doc="index of <think> in generated_ids"),
    Column("think_end_index", "int", nullable=True, doc="index of </think> in generated_ids"),
    Column("think_missing", "bool", doc="no complete <think>...</think> span was generated"),
    Column("truncated", "bool", doc="generation hit max_new_tokens before EOS"),
    Column("answer", "str", doc="extracted final answer (last \\boxed{}, else last number; '' if none)"),
    Column("token_logprobs", "list", doc="log p(chosen token) under the model's untempered distribution"),
    Column("token_entropies", "list", doc="entropy (nats) of the model's untempered next-token distribution "
                                          "(vLLM backend: a lower bound from the top-N log-probs)"),
    Column("sequence_loglik", "float", doc="sum of token_logprobs"),
    Column("mean_token_entropy", "float", doc="mean token entropy over the think span (all tokens if none)"),
    Column("n_generated", "int"),
    Column("correct", "bool", doc="math-verify equivalence of answer and gold"),
)
RUN_KEY = ("question_id", "run_id")

# ---- semantic entropy: data/semantic_entropy/{id,ood}.parquet, one row per run ------------------------
SE_COLUMNS = (
    Column("question_id", "str"),
    Column("run_id", "int"),
    Column("cluster_id", "int", doc="semantic cluster of this run's answer within its question (0-based)"),
    Column("n_clusters", "int"),
    Column("semantic_entropy", "float", doc="discrete SE from cluster frequencies (nats)"),
    Column("semantic_entropy_weighted", "float", doc="likelihood-weighted SE (Farquhar et al. 2024, nats)"),
    Column("naive_entropy", "float", doc="mean over runs of the length-normalised negative log-likelihood"),
)
SE_KEY = RUN_KEY

# ---- trace positions: tbg, think_<p> (early warning), think_end, slt ---------------------------------------
PREFIX_PATTERN = re.compile(r"think_([1-9][0-9]?)")  # early-warning positions think_1 .. think_99


def prefix_fraction(position: str) -> float | None:
    """Share of the reasoning seen at a position: ``think_25`` -> 0.25, ``tbg`` -> 0, ``think_end`` -> 1;
    None for ``slt`` (it has also seen the answer) and for names that are not positions."""
    if position == "tbg":
        return 0.0
    if position == "think_end":
        return 1.0
    match = PREFIX_PATTERN.fullmatch(position)
    return int(match.group(1)) / 100 if match else None


# ---- hidden states: artifacts/hidden/{id,ood}.npy + {id,ood}_index.parquet + {id,ood}_meta.json --------
# The array is float16, shape (runs, positions, layers, hidden); row i belongs to index row i.
HIDDEN_INDEX_COLUMNS = (
    Column("row", "int"),
    Column("question_id", "str"),
    Column("run_id", "int"),
    Column("sequence_length", "int", doc="prompt + generated tokens fed to the teacher-forced pass"),
    Column("think_end_fallback", "bool", doc="no </think>: the think_end position holds the slt vector"),
)


def hidden_files(directory: str | Path, dataset: str) -> tuple[Path, Path, Path]:
    """(array .npy, index .parquet, meta .json) for one dataset's hidden states."""
    directory = Path(directory)
    return directory / f"{dataset}.npy", directory / f"{dataset}_index.parquet", directory / f"{dataset}_meta.json"


def validate_hidden(array: np.ndarray, index: pd.DataFrame, meta: dict, source: str | Path) -> None:
    validate_frame(index, HIDDEN_INDEX_COLUMNS, source, key=RUN_KEY)
    expected = (len(index), len(meta["positions"]), len(meta["layers"]), meta["hidden_size"])
    if array.shape != expected:
        raise SchemaError(f"{source}: array shape {array.shape}; expected (runs, positions, layers, hidden) = "
                          f"{expected}")
    if array.dtype != np.float16:
        raise SchemaError(f"{source}: array dtype {array.dtype}; expected float16")


# ---- splits: artifacts/probes/splits.parquet, one row per question -----------------------------------
SPLIT_COLUMNS = (
    Column("question_id", "str"),
    Column("dataset", "str"),
    Column("split", "str", doc="train / val / test for in-distribution questions, ood for the OOD set"),
)
SPLIT_KEY = ("dataset", "question_id")

# ---- analysis: artifacts/analysis/analysis.parquet, one row per run -----------------------------------
ANALYSIS_COLUMNS = (
    Column("question_id", "str"),
    Column("run_id", "int"),
    Column("dataset", "str"),
    Column("split", "str"),
    Column("question", "str"),
    Column("gold", "str"),
    Column("text", "str"),
    Column("answer", "str"),
    Column("cluster_id", "int"),
    Column("n_clusters", "int"),
    Column("correct", "bool"),
    Column("semantic_entropy", "float"),
    Column("semantic_entropy_weighted", "float"),
    Column("naive_entropy", "float"),
    Column("mean_token_entropy", "float"),
    Column("sequence_loglik", "float"),
    Column("accuracy_probe_prob", "float", doc="P(correct) from the accuracy probe"),
    Column("accuracy_probe_margin", "float", doc="decision function / ||w||: signed distance to the boundary"),
    Column("se_probe_prob", "float", doc="P(high SE) from the SE probe"),
    Column("se_probe_margin", "float"),
    Column("high_se", "bool", doc="question's SE above the threshold fitted on train"),
    Column("umap_x", "float"),
    Column("umap_y", "float"),
    Column("think_length", "int", nullable=True, doc="tokens between <think> and </think>"),
    Column("truncated", "bool"),
)
ANALYSIS_KEY = ("dataset", "question_id", "run_id")

# ---- probes: artifacts/probes/ (written by train_probes, read by evaluate and analysis) ------------------
# Written and read only by ``stages.lib.probe_store``. Each probe is two files named by a stem: ``<stem>.json``
# (kind, params with its location, chosen C, CV scores) and ``<stem>.npz`` (float64 weights, read without pickle).
PROBE_METADATA_SUFFIX, PROBE_WEIGHTS_SUFFIX = ".json", ".npz"
PROBE_FILES = {"accuracy": "accuracy_probe", "se": "se_probe", "se_regression": "se_regression_probe",
               "accuracy_range": "accuracy_range_probe", "se_range": "se_range_probe",
               "entropy_baseline": "entropy_baseline"}  # probe name -> file stem
SPLITS_FILE = "splits.parquet"  # SPLIT_COLUMNS
# stem: every (label, position, layer) probe fitted on train; a .json list of metadata + one .npz of stacked weights
LOCATION_PROBES_FILE = "location_probes"
SELECTION_FILE = "selection.json"  # chosen (position, layer) per probe, val AUROC per location, high-SE threshold

# ---- plots: artifacts/plots/*.csv (written by evaluate) ----------------------------------------------
AUROC_BY_LAYER_COLUMNS = (
    Column("probe", "str", doc="`accuracy` (label: correct) or `se` (label: high_se)"),
    Column("position", "str"),
    Column("layer", "int", doc="hidden-state index (0 = embedding output)"),
    Column("split", "str", doc="val, test or ood"),
    Column("auroc", "float", nullable=True, doc="probe fitted on train, scored for its own label; null if one class"),
)
ROC_COLUMNS = (
    Column("score", "str", doc="a key of SCORES; positive class = incorrect run"),
    Column("split", "str", doc="test or ood"),
    Column("fpr", "float"),
    Column("tpr", "float"),
)

EARLY_WARNING_COLUMNS = (
    Column("probe", "str", doc="`accuracy` (label: correct) or `se` (label: high_se)"),
    Column("position", "str"),
    Column("fraction", "float", nullable=True, doc="share of the reasoning seen (tbg 0, think_<p> p/100, "
                                                   "think_end 1); null for slt, which has also seen the answer"),
    Column("layer", "int", doc="the best layer at this position, chosen on val"),
    Column("split", "str", doc="test or ood"),
    Column("auroc", "float", nullable=True, doc="for the probe's own label; null if one class"),
    Column("auroc_ci_low", "float", nullable=True),
    Column("auroc_ci_high", "float", nullable=True),
)
RISK_COVERAGE_COLUMNS = (
    Column("score", "str", doc="a key of SCORES; runs kept from the lowest score up"),
    Column("split", "str", doc="test or ood"),
    Column("coverage", "float", doc="fraction of runs kept"),
    Column("risk", "float", doc="error rate of the kept runs"),
)
RELIABILITY_COLUMNS = (
    Column("probe", "str", doc="accuracy_probe or accuracy_range_probe: P(correct)"),
    Column("split", "str", doc="test or ood"),
    Column("bin", "int"),
    Column("lower", "float"),
    Column("upper", "float"),
    Column("n", "int"),
    Column("mean_predicted", "float", nullable=True, doc="mean P(correct) in the bin; null if empty"),
    Column("observed_frequency", "float", nullable=True, doc="fraction correct in the bin; null if empty"),
)

STABILITY_COLUMNS = (
    Column("seed", "int", doc="seed of the question split and the probe fits"),
    Column("split", "str", doc="test or ood"),
    Column("score", "str", doc="a key of stages.stability.STABLE_SCORES"),
    Column("auroc", "float", nullable=True, doc="for flagging incorrect runs; null if one class"),
)

# ---- evaluate.json: the scores evaluated per split (written by stages.evaluate, read by the viewer) ----------
# score name -> how it is computed (the keys of evaluate.json's splits); every one is oriented so that
# higher = more likely incorrect
SCORES = {
    "accuracy_probe": "1 - P(correct) from the accuracy probe",
    "se_probe": "P(high semantic entropy) from the SE probe",
    "semantic_entropy": "discrete semantic entropy of the run's question",
    "semantic_entropy_weighted": "likelihood-weighted semantic entropy of the run's question",
    "naive_entropy": "naive (length-normalised) predictive entropy of the run's question",
    "mean_token_entropy": "mean token entropy over the run's think span",
    "entropy_baseline": "1 - P(correct) from logistic regression on mean_token_entropy",
    "negative_sequence_loglik": "-sequence_loglik of the run",
    "se_regression_probe": "semantic entropy predicted by the ridge SE probe",
    "accuracy_range_probe": "1 - P(correct) from the accuracy probe on its best layer range",
    "se_range_probe": "P(high semantic entropy) from the SE probe on its best layer range",
}
# the accuracy probes' P(correct), whose calibration is measured
CALIBRATED = {"accuracy_probe": "accuracy_probe_p_correct", "accuracy_range_probe": "accuracy_range_probe_p_correct"}

# ---- file names inside the `paths:` directories, shared by the stages that write them and the viewer ----
ANALYSIS_FILE = "analysis.parquet"  # in paths.analysis; ANALYSIS_COLUMNS
EVALUATE_FILE = "evaluate.json"  # in paths.metrics; {split: {score: {auroc, ...}}, summary, settings}
AUROC_BY_LAYER_FILE = "auroc_by_layer.csv"  # in paths.plots; AUROC_BY_LAYER_COLUMNS
ROC_FILE = "roc.csv"  # in paths.plots; ROC_COLUMNS
EARLY_WARNING_FILE = "early_warning.csv"  # in paths.plots; EARLY_WARNING_COLUMNS
RISK_COVERAGE_FILE = "risk_coverage.csv"  # in paths.plots; RISK_COVERAGE_COLUMNS
RELIABILITY_FILE = "reliability.csv"  # in paths.plots; RELIABILITY_COLUMNS
STABILITY_FILE = "stability.json"  # in paths.metrics; {split: {score: {mean, std, min, max, values}}, settings}
STABILITY_PLOT_FILE = "stability.csv"  # in paths.plots; STABILITY_COLUMNS
COST_RATIO_FILE = "cost_ratio.json"  # in paths.metrics; written by stages.cost_ratio
