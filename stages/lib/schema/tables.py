"""The one definition of every hand-off between stages: file names, columns, dtypes, keys, array shapes, and a
typed model (pydantic) for every JSON file.

Writers call ``validate_frame`` before writing and readers call it after reading, so a mismatch fails
loudly with the file and column named instead of surfacing later as a KeyError or a silent NaN. JSON files are
written from a ``Contract`` model (``to_json``) and read back through it (``Contract.read``), so a malformed
file fails with one line naming the file and the field.

Keys: a question is identified by ``question_id`` (unique within a dataset); a run by
(``question_id``, ``run_id``) with ``run_id`` in ``0..K-1``. ``dataset`` is ``id`` (in-distribution) or ``ood``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self, Sequence, Union

import numpy as np
import pandas as pd
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

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


# ---- JSON hand-offs: the base of every model ---------------------------------------------------------------
class Contract(BaseModel):
    """A JSON hand-off: strict types (no "1" for 1, no bool for an int), no unknown keys.

    ``to_json`` writes it as every stage always has (``json.dumps(indent=2)`` plus a newline, keys in field
    order, Python's float repr), so the files stay byte-identical for the same values. A dict field named in
    ``_flattened`` is written as the model's own keys, in the field's place (evaluate.json's splits, the probes
    of selection.json, a cost record's counters); reading gathers the keys that are not fields back into it
    (``_route`` says into which).
    """

    model_config = ConfigDict(extra="forbid", strict=True)
    _flattened: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def _route(cls, key: str, value: Any) -> str:
        """The flattened field an undeclared key belongs to (the only one, unless a model says otherwise)."""
        return cls._flattened[0]

    @model_validator(mode="before")
    @classmethod
    def _gather(cls, data: Any) -> Any:
        if not cls._flattened or not isinstance(data, dict) or any(name in data for name in cls._flattened):
            return data  # built in code with the fields themselves
        gathered: dict[str, Any] = {name: {} for name in cls._flattened}
        for key, value in data.items():
            if key in cls.model_fields:
                gathered[key] = value
            else:
                gathered[cls._route(key, value)][key] = value
        return gathered

    @model_serializer(mode="wrap")
    def _flatten(self, handler) -> dict[str, Any]:
        data = handler(self)
        if not self._flattened:
            return data
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if key in self._flattened:
                flat.update(value)
            else:
                flat[key] = value
        return flat

    def to_json(self) -> str:
        """The file's text (write it atomically: ``stages.lib.io.files.write_model``)."""
        return json.dumps(self.model_dump(), indent=2) + "\n"

    @classmethod
    def parse(cls, data: Any, source: str | Path) -> Self:
        """Validate ``data`` (parsed JSON); a mismatch raises SchemaError naming ``source`` and the field."""
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise SchemaError(describe_error(error, data, source)) from None

    @classmethod
    def read(cls, path: str | Path, writer: str | None = None) -> Self:
        """Read and validate the JSON file at ``path``; SchemaError (one line) when absent or malformed.
        ``writer`` names the stage that writes it, for the message."""
        path = Path(path)
        if not path.exists():
            rerun = f"run the {writer} stage (`dvc repro {writer}`)" if writer else "run the stage that writes it"
            raise SchemaError(f"{path}: not found; {rerun}")
        try:
            data = json.loads(path.read_text())
        except ValueError as error:
            raise SchemaError(f"{path}: not valid JSON ({error})") from None
        return cls.parse(data, path)


def describe_error(error: ValidationError, data: Any, source: str | Path) -> str:
    """One line for the first problem pydantic found: the file, the field's path as it is in the file (union tags
    and flattened fields left out) and what was expected."""
    first = error.errors()[0]
    path, node = [], data
    for item in first["loc"]:
        if isinstance(node, dict) and item in node:
            node = node[item]
        elif isinstance(node, list) and isinstance(item, int) and 0 <= item < len(node):
            node = node[item]
        elif item != first["loc"][-1] or first["type"] not in ("missing", "extra_forbidden"):
            continue  # a union tag or a flattened field: not a key of the file
        path.append(f"[{item}]" if isinstance(item, int) else str(item))
    field = ".".join(path).replace(".[", "[") or "(top level)"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    if first["type"] == "missing":
        return f"{source}: missing field `{field}`{more}"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown field `{field}`{more}"
    if first["type"] == "value_error":
        where = "" if field == "(top level)" else f"field `{field}`: "
        return f"{source}: {where}{first['msg'].removeprefix('Value error, ')}{more}"
    shown = repr(first["input"])
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"{source}: field `{field}`: {first['msg']}, got {shown}{more}"


# ---- questions: data/questions/{id,ood}.jsonl -------------------------------------------------------
QUESTION_COLUMNS = (
    Column("question_id", "str"),
    Column("dataset", "str", doc="`id` or `ood`"),
    Column("question", "str", doc="the text shown to the model (before any chat template)"),
    Column("gold", "str", doc="the reference final answer"),
    Column("level", "int", nullable=True, doc="MATH's difficulty level (1-5) when the source gives one; absent "
                                              "from the file otherwise"),
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
    Column("answer", "str", doc="extracted final answer after the reasoning (last \\boxed{}, else last number; '' "
                                "if none or still reasoning: stages.lib.questions.answers.extract_answer)"),
    Column("answer_source", "str", doc="how the answer was found: boxed, last_number_fallback, none or "
                                       "truncated_in_think (stages.lib.questions.answers.ANSWER_SOURCES)"),
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
    # the question's equivalence graph over its K answers, lm-polygraph's measures
    # (stages.lib.semantic.entropy.graph_measures)
    Column("num_semantic_sets", "int", doc="connected components of the equivalence graph (NumSemSets)"),
    Column("eigv", "float", doc="sum of max(0, 1 - eigenvalue) of the graph's normalised Laplacian (EigValLaplacian)"),
    Column("degree", "float", doc="1 - sum of the adjacency / K^2 (DegMat)"),
    Column("eccentricity", "float", doc="norm of the centred spectral embedding, eigenvalues < 0.9 (Eccentricity)"),
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


# ---- hidden states: artifacts/hidden/{id,ood}/{position}.npy + {id,ood}_index.parquet + {id,ood}_meta.json ----
# One float16 shard per position, shape (runs, layers, hidden); seen together (stages/lib/hidden/store.py) they are the
# (runs, positions, layers, hidden) array; row i belongs to index row i.
HIDDEN_INDEX_COLUMNS = (
    Column("row", "int"),
    Column("question_id", "str"),
    Column("run_id", "int"),
    Column("sequence_length", "int", doc="prompt + generated tokens fed to the teacher-forced pass"),
    Column("think_end_fallback", "bool", doc="no </think>: the think_end position holds the slt vector"),
)


def hidden_files(directory: str | Path, dataset: str) -> tuple[Path, Path, Path]:
    """(shard directory, index .parquet, meta .json) for one dataset's hidden states; the shards are
    ``hidden_shard(shard directory, position)``."""
    directory = Path(directory)
    return directory / dataset, directory / f"{dataset}_index.parquet", directory / f"{dataset}_meta.json"


def hidden_shard(shard_dir: str | Path, position: str) -> Path:
    """The (runs, layers, hidden) float16 ``.npy`` shard of one position."""
    return Path(shard_dir) / f"{position}.npy"


class HiddenMeta(Contract):
    """``{dataset}_meta.json``: what the axes of the hidden-state array are (written by the trace stage)."""

    positions: list[str] = Field(min_length=1)
    """Axis 1: the traced positions (tbg, think_<p>, think_end, slt), in trace.positions order; one shard each."""
    layers: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)
    """Axis 2: hidden-state indices (0 = embedding output)."""
    hidden_size: int = Field(gt=0)
    """Axis 3."""
    dtype: Literal["float16"]
    model: str
    """``model.name`` of the traced model."""
    model_revision: str | None = None
    """``model.revision``: the Hub revision it was loaded at (null: the default branch, or a local model)."""
    layer_0: str = "embedding output"
    layer_i: str = "output of block i (last: after final norm)"

    @field_validator("positions", "layers")
    @classmethod
    def _distinct(cls, values: list) -> list:
        if len(set(values)) != len(values):
            raise ValueError(f"has a repeated entry: {values}")
        return values


def validate_hidden(array: np.ndarray, index: pd.DataFrame, meta: HiddenMeta, source: str | Path) -> None:
    """The array must be float16 of shape (index rows, meta positions, meta layers, meta hidden_size); the index
    must match HIDDEN_INDEX_COLUMNS with a unique run key. Called before the trace stage's rename and on every read."""
    validate_frame(index, HIDDEN_INDEX_COLUMNS, source, key=RUN_KEY)
    expected = (len(index), len(meta.positions), len(meta.layers), meta.hidden_size)
    if array.shape != expected:
        raise SchemaError(f"{source}: array shape {array.shape}; expected (runs, positions, layers, hidden) = "
                          f"{expected}")
    if array.dtype != np.dtype(meta.dtype):
        raise SchemaError(f"{source}: array dtype {array.dtype}; expected {meta.dtype}")


def validate_hidden_shard(array: np.ndarray, index: pd.DataFrame, meta: HiddenMeta, source: str | Path,
                          position: str) -> None:
    """One position's shard must be float16 of shape (index rows, meta layers, meta hidden_size)."""
    expected = (len(index), len(meta.layers), meta.hidden_size)
    if array.shape != expected:
        raise SchemaError(f"{source}: position `{position}`: array shape {array.shape}; expected (runs, layers, "
                          f"hidden) = {expected}")
    if array.dtype != np.dtype(meta.dtype):
        raise SchemaError(f"{source}: position `{position}`: array dtype {array.dtype}; expected {meta.dtype}")


def require_finite_hidden(array: np.ndarray, index: pd.DataFrame, source: str | Path, chunk_rows: int = 1024) -> None:
    """Every hidden state finite (a float16 overflow gives inf, and a probe fitted on it NaN); read in chunks of
    rows so a memory-mapped array is never loaded whole. Called by the trace stage before its rename."""
    for start in range(0, len(array), chunk_rows):
        finite = np.isfinite(array[start:start + chunk_rows]).reshape(min(chunk_rows, len(array) - start), -1)
        bad = np.flatnonzero(~finite.all(axis=1))
        if len(bad):
            row = index.iloc[start + int(bad[0])]
            raise SchemaError(f"{source}: non-finite hidden state in row {start + int(bad[0])} (question_id="
                              f"{row['question_id']!r} run_id={row['run_id']}); float16 overflow? check model.dtype")


# ---- splits: artifacts/probes/splits.parquet, one row per question -----------------------------------
SPLIT_COLUMNS = (
    Column("question_id", "str"),
    Column("dataset", "str"),
    Column("split", "str", doc="train / val / test for in-distribution questions, ood for the OOD set"),
)
SPLIT_KEY = ("dataset", "question_id")

# ---- analysis: artifacts/analysis/analysis.parquet, one row per run -----------------------------------
# The columns are ``analysis_columns(...)`` of the registry's per-run probes: ``stages.lib.registry.ANALYSIS_COLUMNS``.
ANALYSIS_RUN_COLUMNS = (
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
)
ANALYSIS_TAIL_COLUMNS = (
    Column("high_se", "bool", doc="question's SE above the threshold fitted on train"),
    Column("umap_x", "float"),
    Column("umap_y", "float"),
    Column("think_length", "int", nullable=True, doc="tokens between <think> and </think>"),
    Column("truncated", "bool"),
    Column("answer_source", "str", doc="how the answer was found (RUN_COLUMNS); all but `boxed` are flagged"),
)
ANALYSIS_KEY = ("dataset", "question_id", "run_id")


# ---- analysis: artifacts/analysis/tokens.parquet, one row per run, sorted by (dataset, question_id, run_id) -------
# The generated tokens of each run as text pieces with their entropies, for the viewer's drill-down. Written in small
# row groups, so a reader filtering on question_id (pyarrow's ``filters``) reads only that question's groups.
TOKEN_COLUMNS = (
    Column("dataset", "str"),
    Column("question_id", "str"),
    Column("run_id", "int"),
    Column("tokens", "list", doc="the generated tokens, each decoded alone (special tokens kept), in order"),
    Column("token_entropies", "list", doc="RUN_COLUMNS token_entropies (nats), one per token"),
    Column("think_start_index", "int", nullable=True, doc="index of <think> in tokens (RUN_COLUMNS)"),
    Column("think_end_index", "int", nullable=True, doc="index of </think> in tokens (RUN_COLUMNS)"),
)
TOKEN_KEY = ANALYSIS_KEY
TOKENS_ROW_GROUP_RUNS = 256  # runs per parquet row group of tokens.parquet


# ---- analysis: artifacts/analysis/location_scores.npy + location_scores.json ------------------------------------
# float32, shape (runs, probes, positions, layers): each single-layer probe's output at every traced (position, layer)
# for every run, row i belonging to row i of analysis.parquet; NaN where train_probes fitted no probe there.
class ChosenLocation(Contract):
    position: str
    layer: int


class LocationScoresMeta(Contract):
    """``location_scores.json``: the axes of ``location_scores.npy`` (written by the analysis stage)."""

    rows: Literal["analysis.parquet"] = "analysis.parquet"
    """Axis 0: the rows of analysis.parquet, in its order."""
    n_runs: int = Field(ge=0)
    probes: list[str] = Field(min_length=1)
    """Axis 1: registry single-layer probe names (``registry.layer_probes()``)."""
    outputs: list[str] = Field(min_length=1)
    """What each value is: ``P(<positive class>)`` for a logistic probe, the predicted target for a ridge one."""
    chosen: list[ChosenLocation] = Field(min_length=1)
    """Each probe's location chosen on val (selection.json)."""
    positions: list[str] = Field(min_length=1)
    """Axis 2: the traced positions (HiddenMeta.positions)."""
    layers: list[Annotated[int, Field(ge=0)]] = Field(min_length=1)
    """Axis 3: the traced layers (HiddenMeta.layers)."""
    dtype: Literal["float32"] = "float32"

    @model_validator(mode="after")
    def _aligned(self) -> Self:
        if not len(self.probes) == len(self.outputs) == len(self.chosen):
            raise ValueError(f"probes, outputs and chosen differ in length ({len(self.probes)}, {len(self.outputs)}, "
                             f"{len(self.chosen)})")
        return self

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.n_runs, len(self.probes), len(self.positions), len(self.layers))


def validate_location_scores(array: np.ndarray, meta: LocationScoresMeta, source: str | Path) -> None:
    """The array must be float32 of ``meta.shape`` (runs, probes, positions, layers)."""
    if array.shape != meta.shape:
        raise SchemaError(f"{source}: array shape {array.shape}; expected (runs, probes, positions, layers) = "
                          f"{meta.shape}")
    if array.dtype != np.float32:
        raise SchemaError(f"{source}: array dtype {array.dtype}; expected float32")


def analysis_columns(probes: Sequence[tuple[str, str, str]]) -> tuple[Column, ...]:
    """The analysis table's columns: the run's own, then ``<probe>_probe_prob`` (P(positive class)) and
    ``<probe>_probe_margin`` (decision function / ||w||: signed distance to the boundary) for each
    (probe name, display name, positive class) of ``probes``, then high_se, the UMAP coordinates and the rest."""
    per_probe = tuple(column for name, display, positive in probes for column in (
        Column(f"{name}_probe_prob", "float", doc=f"P({positive}) from the {display}"),
        Column(f"{name}_probe_margin", "float", doc=f"the {display}'s margin (+ = predicts {positive})")))
    return ANALYSIS_RUN_COLUMNS + per_probe + ANALYSIS_TAIL_COLUMNS


# ---- probes: artifacts/probes/ (written by train_probes, read by evaluate and analysis) ------------------
# Written and read only by ``stages.lib.probes.store``. Each probe of ``stages.lib.registry.probes()`` is two files
# named by its ``file`` stem: ``<stem>.json`` (kind, params with its location, chosen C, CV scores) and
# ``<stem>.npz`` (float64 weights, read without pickle).
PROBE_METADATA_SUFFIX, PROBE_WEIGHTS_SUFFIX = ".json", ".npz"
SPLITS_FILE = "splits.parquet"  # SPLIT_COLUMNS
# stem: every (label, position, layer) probe fitted on train; a .json list of metadata + one .npz of stacked weights
LOCATION_PROBES_FILE = "location_probes"
SELECTION_FILE = "selection.json"  # Selection


class LayerChoice(Contract):
    """A single-layer probe's location, chosen on val (selection.json ``<probe>_probe``)."""

    label: str
    """The target it is fitted to predict (a key of registry.TARGETS)."""
    position: str
    layer: int
    metric: Literal["auroc", "spearman"]
    val_score: float
    C: float


class RangeCandidate(Contract):
    layer: int
    layer_end: int
    val_score: float | None
    """Null when val has one class (AUROC undefined)."""


class RangeChoice(Contract):
    """A layer-range probe's range at its single-layer probe's position, chosen on val, and every candidate."""

    label: str
    position: str
    layer: int
    layer_end: int
    metric: Literal["auroc"]
    val_score: float
    C: float
    candidates: list[RangeCandidate]


def _choice_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "range" if "candidates" in value else "layer"
    return "range" if isinstance(value, RangeChoice) else "layer"


ProbeChoice = Annotated[Union[Annotated[LayerChoice, Tag("layer")], Annotated[RangeChoice, Tag("range")]],
                        Discriminator(_choice_kind)]


class PositionChoice(Contract):
    """The best layer at one position for one probe (the early-warning curve)."""

    probe: str
    position: str
    layer: int
    metric: Literal["auroc", "spearman"]
    val_score: float


class ValScore(Contract):
    """A train-fitted probe's own metric on val at one (position, layer); null when undefined."""

    probe: str
    position: str
    layer: int
    metric: Literal["auroc", "spearman"]
    score: float | None


class Selection(Contract):
    """selection.json: what train_probes chose on val (``stages.lib.probes.selection.train``)."""

    probes: dict[str, ProbeChoice]
    """``<probe>_probe`` -> its location; written as top-level keys, before the rest."""
    high_se_threshold: float
    high_se_threshold_method: Literal["best_split", "median"]
    n_questions: dict[str, int]
    """Questions per split."""
    n_runs: dict[str, int]
    by_position: list[PositionChoice]
    val_scores: list[ValScore]
    _flattened: ClassVar[tuple[str, ...]] = ("probes",)


# ---- plots: artifacts/plots/*.csv (written by evaluate) ----------------------------------------------
AUROC_BY_LAYER_COLUMNS = (
    Column("probe", "str", doc="`accuracy` (label: correct) or `se` (label: high_se)"),
    Column("position", "str"),
    Column("layer", "int", doc="hidden-state index (0 = embedding output)"),
    Column("split", "str", doc="val, test or ood"),
    Column("auroc", "float", nullable=True, doc="probe fitted on train, scored for its own label; null if one class"),
)
ROC_COLUMNS = (
    Column("score", "str", doc="a score of stages.lib.registry.SCORES flagging incorrect runs (the positive class)"),
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
    Column("score", "str", doc="a registry score flagging incorrect runs; runs kept from the lowest score up"),
    Column("split", "str", doc="test or ood"),
    Column("coverage", "float", doc="fraction of runs kept"),
    Column("risk", "float", doc="error rate of the kept runs"),
)
RELIABILITY_COLUMNS = (
    Column("probe", "str", doc="a calibrated registry score (accuracy_probe, accuracy_range_probe): its P(correct)"),
    Column("split", "str", doc="test or ood"),
    Column("bin", "int"),
    Column("lower", "float"),
    Column("upper", "float"),
    Column("n", "int"),
    Column("mean_predicted", "float", nullable=True, doc="mean P(correct) in the bin; null if empty"),
    Column("observed_frequency", "float", nullable=True, doc="fraction correct in the bin; null if empty"),
)

DIFFICULTY_COLUMNS = (
    Column("split", "str", doc="test or ood"),
    Column("difficulty", "str", doc="`level` (MATH) or `n_terms` (arithmetic chain length)"),
    Column("value", "int", doc="the level or the number of terms"),
    Column("score", "str", doc="a headline registry score flagging incorrect runs"),
    Column("n_runs", "int"),
    Column("n_questions", "int"),
    Column("accuracy", "float", doc="fraction of the bucket's runs that are correct"),
    Column("auroc", "float", nullable=True, doc="null if the bucket has one class"),
    Column("auroc_ci_low", "float", nullable=True),
    Column("auroc_ci_high", "float", nullable=True),
)

STABILITY_COLUMNS = (
    Column("seed", "int", doc="seed of the question split and the probe fits"),
    Column("split", "str", doc="test or ood"),
    Column("score", "str", doc="a score of stages.lib.registry.stable_scores()"),
    Column("auroc", "float", nullable=True, doc="for flagging incorrect runs; null if one class"),
)

# ---- evaluate.json: the scores evaluated per split (written by stages.evaluate, read by the viewer) ----------
class LabelMetrics(Contract):
    """One score against one label on one split: AUROC and AUPRC with bootstrap CIs and permutation p-values;
    nulls and a ``note`` when undefined (an empty or single-class split)."""

    label: str
    """The positive class: ``incorrect`` or ``high_se`` (registry.Label)."""
    n_runs: int
    n_questions: int
    n_positive: int
    auroc: float | None
    auroc_ci_low: float | None
    auroc_ci_high: float | None
    auroc_p_value: float | None
    auprc: float | None
    auprc_ci_low: float | None
    auprc_ci_high: float | None
    auprc_p_value: float | None
    auprc_chance: float | None
    bootstrap_resamples_used: int
    note: str | None


class IncorrectMetrics(LabelMetrics):
    """A score flagging incorrect runs, with its selective-prediction areas (AURAC higher is better, AURC lower,
    PRR 1 = oracle, 0 = random; null for an empty split, PRR null when every run is right or every run wrong)."""

    label: Literal["incorrect"]
    aurac: float | None
    aurc: float | None
    prr: float | None


def _metrics_kind(value: Any) -> str:
    label = value.get("label") if isinstance(value, dict) else getattr(value, "label", None)
    return "incorrect" if label == "incorrect" else "other"


ScoreMetrics = Annotated[Union[Annotated[IncorrectMetrics, Tag("incorrect")], Annotated[LabelMetrics, Tag("other")]],
                         Discriminator(_metrics_kind)]


class SplitSummary(Contract):
    n_runs: int
    n_questions: int
    n_correct: int
    n_incorrect: int
    accuracy: float | None
    n_high_se_questions: int
    mean_p_correct_on_correct: float | None
    """Mean P(correct) of the accuracy probe over the correct runs."""
    mean_p_correct_on_incorrect: float | None
    note: str | None


class CalibrationMetrics(Contract):
    ece: float | None
    brier: float | None
    n_bins: int
    n_runs: int


class RegressionMetrics(Contract):
    """The ridge SE probe's predicted SE against the real SE."""

    spearman_runs: float | None
    spearman_questions: float | None
    n_runs: int
    n_questions: int


class ProbeLocation(Contract):
    position: str
    layer: int
    layer_end: int | None
    """Last layer of a range probe; null for a single-layer probe."""


class EvaluateSettings(Contract):
    positive_class: str
    scores: dict[str, str]
    """Score -> how it is computed, for the scores flagging incorrect runs (registry order)."""
    other_labels: dict[str, str]
    """The same for scores of another label (the SE probe on high_se); written as top-level keys."""
    bootstrap: int
    permutations: int
    confidence: float
    high_se_threshold: float
    high_se_threshold_method: Literal["best_split", "median"]
    probes: dict[str, ProbeLocation]
    """``<probe>_probe`` -> where it reads the hidden states; written as top-level keys."""
    calibration_bins: int
    _flattened: ClassVar[tuple[str, ...]] = ("other_labels", "probes")

    @classmethod
    def _route(cls, key: str, value: Any) -> str:
        return "other_labels" if isinstance(value, str) else "probes"


class EarlyWarningRow(Contract):
    """EARLY_WARNING_COLUMNS as a JSON record."""

    probe: str
    position: str
    fraction: float | None
    layer: int
    split: str
    auroc: float | None
    auroc_ci_low: float | None
    auroc_ci_high: float | None


class PairedDifferenceMetrics(Contract):
    """AUROC(a) - AUROC(b) for flagging incorrect runs on one split, both scored on the same runs, with a paired
    question-level bootstrap CI and two-sided p (``metrics.difference_from_resamples``) on the resamples every
    score's own CI of that split uses. Nulls and a note when undefined (an empty or single-class split)."""

    a: str
    b: str
    """Registry score names (``registry.PAIRED_COMPARISONS``)."""
    label: str
    """``<display name of a> - <display name of b>``."""
    split: str
    difference: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    bootstrap_resamples_used: int
    note: str | None


class AnswerExtraction(Contract):
    """How the runs of one split got their answers (``stages.lib.questions.answers.extract_answer``), counted."""

    n_runs: int
    n_truncated: int
    """Hit max_new_tokens before EOS."""
    n_truncated_in_think: int
    """Stopped while still reasoning: no answer (answer_source truncated_in_think)."""
    n_no_answer: int
    """Finished reasoning but gave nothing parseable (answer_source none)."""
    n_last_number_fallback: int
    """No \\boxed{} after the reasoning; its last number was taken (answer_source last_number_fallback)."""


class DifficultyRow(Contract):
    """One headline score's AUROC (question-bootstrap CI) and the accuracy on the runs of one difficulty bucket."""

    split: str
    difficulty: Literal["level", "n_terms"]
    """``level``: MATH's level (1-5); ``n_terms``: the arithmetic chain's number of operands."""
    value: int
    score: str
    n_runs: int
    n_questions: int
    accuracy: float
    auroc: float | None
    auroc_ci_low: float | None
    auroc_ci_high: float | None


class EvaluateReport(Contract):
    """evaluate.json. Per split (test, ood; top-level keys) and score (registry order): ``ScoreMetrics``."""

    splits: dict[str, dict[str, ScoreMetrics]]
    paired_differences: list[PairedDifferenceMetrics]
    """Every pair of ``registry.PAIRED_COMPARISONS`` on test, then on ood."""
    answer_extraction: dict[str, AnswerExtraction]
    """Split (train, val, test, ood) -> how its runs' answers were found."""
    by_difficulty: list[DifficultyRow]
    """Headline scores by difficulty on test and ood (empty when the questions carry none)."""
    summary: dict[str, SplitSummary]
    calibration: dict[str, dict[str, CalibrationMetrics]]
    """Split -> calibrated score -> ECE and Brier score of its P(correct)."""
    se_regression: dict[str, RegressionMetrics]
    settings: EvaluateSettings
    early_warning: list[EarlyWarningRow]
    _flattened: ClassVar[tuple[str, ...]] = ("splits",)

    @field_validator("splits")
    @classmethod
    def _known_splits(cls, splits: dict) -> dict:
        return _known_splits(splits)


def _known_splits(splits: dict) -> dict:
    unknown = [name for name in splits if name not in SPLITS]
    if unknown:
        raise ValueError(f"unknown key `{unknown[0]}`: expected one of the fields or a split {SPLITS}")
    return splits


# ---- stability.json (written by stages.stability) -------------------------------------------------------------
class StabilitySpread(Contract):
    """AUROC over the seeds where it is defined: mean, sample std (ddof 1), min, max; every seed's value."""

    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    n_seeds: int
    values: list[float | None]


class SkippedSeed(Contract):
    seed: int
    reason: str


class StabilitySettings(Contract):
    seeds: list[int]
    c_grid: list[float]
    layer_ranges: str
    positive_class: str


class StabilityReport(Contract):
    """stability.json: per split with runs (top-level keys) and stable score, the AUROC's spread over seeds."""

    splits: dict[str, dict[str, StabilitySpread]]
    skipped_seeds: list[SkippedSeed]
    settings: StabilitySettings
    _flattened: ClassVar[tuple[str, ...]] = ("splits",)

    @field_validator("splits")
    @classmethod
    def _known_splits(cls, splits: dict) -> dict:
        return _known_splits(splits)


# ---- cost records: {paths.metrics}/cost/<stage>.json (stages.lib.io.files.cost_record) --------------------------
class CostRecord(Contract):
    """What one stage run cost: wall seconds, then the counters the stage adds (written as top-level keys)."""

    stage: str
    wall_seconds: float
    counters: dict[str, int | float | str | bool | None]
    _flattened: ClassVar[tuple[str, ...]] = ("counters",)


class _Counters(Contract):
    model_config = ConfigDict(extra="ignore", strict=True)


class GenerateCounters(_Counters):
    sequences: int
    tokens_generated: int


class SemanticEntropyCounters(_Counters):
    questions: int
    equivalence_checks: int


class TraceCounters(_Counters):
    sequences: int
    tokens_processed: int


COST_COUNTERS: dict[str, type[_Counters]] = {"generate": GenerateCounters, "semantic_entropy": SemanticEntropyCounters,
                                             "trace": TraceCounters}
"""The counters a stage's cost record must hold (checked when written; cost_ratio reads exactly these)."""


# ---- cost_ratio.json (written by stages.cost_ratio) --------------------------------------------------------------
class CostRatio(Contract):
    runs_per_question: int
    questions: int
    se_seconds_per_question: float
    probe_seconds_per_question: float
    seconds_ratio: float | None
    se_generated_tokens_per_question: float
    probe_tokens_per_question: float
    tokens_ratio: float | None
    equivalence_checks_per_question: float
    note: str


# ---- file names inside the `paths:` directories, shared by the stages that write them and the viewer ----
ANALYSIS_FILE = "analysis.parquet"  # in paths.analysis; ANALYSIS_COLUMNS
TOKENS_FILE = "tokens.parquet"  # in paths.analysis; TOKEN_COLUMNS
LOCATION_SCORES_FILE = "location_scores.npy"  # in paths.analysis; LocationScoresMeta
LOCATION_SCORES_META_FILE = "location_scores.json"  # in paths.analysis; LocationScoresMeta
EVALUATE_FILE = "evaluate.json"  # in paths.metrics; EvaluateReport
AUROC_BY_LAYER_FILE = "auroc_by_layer.csv"  # in paths.plots; AUROC_BY_LAYER_COLUMNS
ROC_FILE = "roc.csv"  # in paths.plots; ROC_COLUMNS
EARLY_WARNING_FILE = "early_warning.csv"  # in paths.plots; EARLY_WARNING_COLUMNS
RISK_COVERAGE_FILE = "risk_coverage.csv"  # in paths.plots; RISK_COVERAGE_COLUMNS
RELIABILITY_FILE = "reliability.csv"  # in paths.plots; RELIABILITY_COLUMNS
DIFFICULTY_FILE = "auroc_by_difficulty.csv"  # in paths.plots; DIFFICULTY_COLUMNS
STABILITY_FILE = "stability.json"  # in paths.metrics; StabilityReport
STABILITY_PLOT_FILE = "stability.csv"  # in paths.plots; STABILITY_COLUMNS
COST_RATIO_FILE = "cost_ratio.json"  # in paths.metrics; CostRatio
COST_DIR = "cost"  # in paths.metrics: <stage>.json, CostRecord


# ---- early exit: forced answers at reasoning prefixes and the calibrated stopping rules -----------------------
FORCED_ANSWER_COLUMNS = (
    Column("question_id", "str"),
    Column("run_id", "int"),
    Column("dataset", "str"),
    Column("prefix", "int", doc="percent of the reasoning kept (early_exit.prefixes)"),
    Column("position", "str", doc="the trace position of the last kept reasoning token, think_<prefix>"),
    Column("reasoning_tokens", "int", doc="R: the run's reasoning tokens (inside <think>...</think>)"),
    Column("reasoning_kept", "int", doc="round(prefix/100 * R): reasoning tokens kept before the cut"),
    Column("generated_kept", "int", doc="generated tokens kept (the <think> token and the kept reasoning)"),
    Column("answer_ids", "list", doc="the greedily decoded answer tokens (after </think> and the answer prefix)"),
    Column("answer_text", "str", doc="</think>, the answer prefix and the decoded answer, as text"),
    Column("answer", "str", doc="the answer extracted from answer_text ('' if none)"),
    Column("answer_source", "str", doc="how the answer was found (stages.lib.questions.answers.ANSWER_SOURCES)"),
    Column("correct", "bool", doc="math-verify equivalence of the forced answer and gold"),
    Column("mean_logprob", "float", nullable=True, doc="mean log p of the answer tokens; null if none"),
    Column("mean_entropy", "float", nullable=True, doc="mean token entropy (nats) of the answer; null if none"),
    Column("answer_tokens", "int", doc="tokens decoded for the forced answer (EOS excluded)"),
    Column("truncated", "bool", doc="the answer hit early_exit.max_answer_tokens before EOS"),
    Column("tokens_used", "int", doc="generated tokens a run stopped here costs: generated_kept + </think> + "
                                     "answer prefix + answer_tokens"),
)
FORCED_ANSWER_KEY = ("question_id", "run_id", "prefix")

EARLY_EXIT_PARETO_COLUMNS = (
    Column("rule", "str", doc="a stopping rule of stages.lib.early_exit.rules.RULES"),
    Column("split", "str", doc="val, test or ood"),
    Column("tau", "float", nullable=True, doc="the threshold (null: never stop, think to the end)"),
    Column("accuracy", "float", doc="accuracy of the answers given under the rule"),
    Column("tokens_used", "float", doc="mean generated tokens per run, trial answers the rule needs included"),
    Column("think_tokens_saved", "float", doc="share of the reasoning tokens not generated"),
    Column("loss", "float", doc="share of runs right with full reasoning and wrong under the rule"),
    Column("chosen", "bool", doc="the operating point calibrated on val"),
)
EARLY_EXIT_FILE = "early_exit.json"  # in paths.metrics; EarlyExitReport
EARLY_EXIT_PARETO_FILE = "early_exit_pareto.csv"  # in paths.plots; EARLY_EXIT_PARETO_COLUMNS


class StoppingProbeChoice(Contract):
    """The stopping probe at one prefix: where it reads, and how well it ranks forced-answer correctness."""

    position: str
    layer: int
    """Chosen by the question-grouped cross-validated AUROC on train (val is kept for the calibration)."""
    C: float | None
    train_cv_auroc: float | None
    val_auroc: float | None
    """Reported only; not used for any choice."""
    train_accuracy: float
    """Share of train runs whose forced answer at this prefix is right."""
    constant: bool
    """True when the train labels held one class: P(correct) is then that share, for every run."""


class EarlyExitOutcome(Contract):
    """One rule at its calibrated threshold on one split, with question-bootstrap percentile CIs."""

    n_runs: int
    n_questions: int
    accuracy_full: float | None
    accuracy_early_exit: float | None
    accuracy_change: float | None
    accuracy_change_ci_low: float | None
    accuracy_change_ci_high: float | None
    think_tokens_saved: float | None
    """Share of the reasoning tokens not generated."""
    think_tokens_saved_ci_low: float | None
    think_tokens_saved_ci_high: float | None
    tokens_used: float | None
    """Mean generated tokens per run under the rule (trial answers included)."""
    tokens_full: float | None
    """Mean generated tokens per run with full reasoning."""
    loss: float | None
    """Realised risk: share of runs right with full reasoning and wrong under the rule (>= the accuracy drop)."""
    loss_ci_low: float | None
    loss_ci_high: float | None
    loss_within_epsilon: bool | None
    stop_rate: float | None
    """Share of runs stopped before the end of their reasoning."""


class EarlyExitRule(Contract):
    """A stopping rule: its threshold chosen on val by Learn-then-Test, and what it does on test and OOD."""

    description: str
    tau: float | None
    """Stop at the first prefix whose score >= tau; null: no candidate passed, the rule never stops."""
    val_risk: float | None
    """The loss on the val (calibration) questions at tau."""
    val_p_value: float | None
    """Hoeffding-Bentkus p-value of H0: risk(tau) > epsilon (rejected: p <= delta)."""
    candidates_tested: int
    candidates_rejected: int
    splits: dict[str, EarlyExitOutcome]
    """test and ood."""


class EarlyExitSettings(Contract):
    method: str
    loss: str
    epsilon: float
    delta: float
    prefixes: list[int]
    answer_prefix: str
    calibration_split: str
    n_calibration_questions: int
    bootstrap: int
    confidence: float


class EarlyExitReport(Contract):
    """early_exit.json: the stopping probes, and every rule calibrated on val and evaluated on test and OOD."""

    settings: EarlyExitSettings
    stopping_probes: dict[str, StoppingProbeChoice]
    """think_<p> -> the probe reading it."""
    rules: dict[str, EarlyExitRule]
