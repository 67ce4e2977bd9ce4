"""Every table handed from stage to stage: its file, columns, dtypes and key, and the array layouts beside them.

Keys: a question is identified by ``question_id`` (unique within a dataset); a run by
(``question_id``, ``run_id``) with ``run_id`` in ``0..K-1``. ``dataset`` is ``id`` (in-distribution) or ``ood``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Self, Sequence

import numpy as np
import pandas as pd
from pydantic import Field, field_validator, model_validator

from stages.lib.schema.machinery import Column, Contract, SchemaError, Table, validate_frame


# ---- questions: data/questions/{id,ood}.jsonl -------------------------------------------------------
QUESTIONS = Table("questions", "{dataset}.jsonl", key=("question_id",), columns=(
    Column("question_id", "str"),
    Column("dataset", "str", doc="`id` or `ood`"),
    Column("question", "str", doc="the text shown to the model (before any chat template)"),
    Column("gold", "str", doc="the reference final answer"),
    Column("level", "int", nullable=True, doc="MATH's difficulty level (1-5) when the source gives one; absent "
                                              "from the file otherwise"),
))

# ---- runs: data/runs/{id,ood}.parquet, one row per sampled run --------------------------------------
RUNS = Table("runs", "{dataset}.parquet", key=("question_id", "run_id"), columns=(
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
    Column("token_topk_logprob_mean", "list", doc="mean of the top-k (runs.TOP_LOGPROBS) untempered log-probs at "
                                                  "each generated token; minus it is DeepConf's token confidence"),
    Column("sequence_loglik", "float", doc="sum of token_logprobs"),
    Column("mean_token_entropy", "float", doc="mean token entropy over the think span (all tokens if none)"),
    Column("n_generated", "int"),
    Column("correct", "bool", doc="math-verify equivalence of answer and gold"),
))

# ---- semantic entropy: data/semantic_entropy/{id,ood}.parquet, one row per run ------------------------
SEMANTIC_ENTROPY = Table("semantic_entropy", "{dataset}.parquet", key=("question_id", "run_id"), columns=(
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
    Column("kernel_language_entropy", "float", doc="von Neumann entropy of the graph's heat kernel, t = 0.3 (KLE, "
                                                   "nats)"),
))

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
HIDDEN_INDEX = Table("hidden_index", "{dataset}_index.parquet", key=("question_id", "run_id"), columns=(
    Column("row", "int"),
    Column("question_id", "str"),
    Column("run_id", "int"),
    Column("sequence_length", "int", doc="prompt + generated tokens fed to the teacher-forced pass"),
    Column("think_end_fallback", "bool", doc="no </think>: the think_end position holds the slt vector"),
))


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
    must match HIDDEN_INDEX.columns with a unique run key. Called before the trace stage's rename and on every read."""
    validate_frame(index, HIDDEN_INDEX.columns, source, key=RUNS.key)
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
QUESTION_SPLITS = Table("splits", "splits.parquet", key=("dataset", "question_id"), columns=(
    Column("question_id", "str"),
    Column("dataset", "str"),
    Column("split", "str", doc="train / val / test for in-distribution questions, ood for the OOD set"),
))

# ---- analysis: artifacts/analysis/analysis.parquet, one row per run -----------------------------------
# The table is ``analysis_table(...)`` of the registry's per-run probes: ``stages.lib.registry.ANALYSIS.columns``.
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
    Column("answer_source", "str", doc="how the answer was found (RUNS.columns); all but `boxed` are flagged"),
)
ANALYSIS_KEY = ("dataset", "question_id", "run_id")  # analysis.parquet (registry.ANALYSIS) and tokens.parquet


# ---- analysis: artifacts/analysis/tokens.parquet, one row per run, sorted by (dataset, question_id, run_id) -------
# The generated tokens of each run as text pieces with their entropies, for the viewer's drill-down. Written in small
# row groups, so a reader filtering on question_id (pyarrow's ``filters``) reads only that question's groups.
TOKENS = Table("tokens", "tokens.parquet", key=ANALYSIS_KEY, columns=(
    Column("dataset", "str"),
    Column("question_id", "str"),
    Column("run_id", "int"),
    Column("tokens", "list", doc="the generated tokens, each decoded alone (special tokens kept), in order"),
    Column("token_entropies", "list", doc="RUNS.columns token_entropies (nats), one per token"),
    Column("think_start_index", "int", nullable=True, doc="index of <think> in tokens (RUNS.columns)"),
    Column("think_end_index", "int", nullable=True, doc="index of </think> in tokens (RUNS.columns)"),
))
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


def analysis_table(probes: Sequence[tuple[str, str, str]]) -> Table:
    """analysis.parquet, one row per run (in paths.analysis): the run's own columns, then ``<probe>_probe_prob``
    (P(positive class)) and ``<probe>_probe_margin`` (decision function / ||w||: signed distance to the boundary) for
    each (probe name, display name, positive class) of ``probes``, then high_se, the UMAP coordinates and the rest."""
    per_probe = tuple(column for name, display, positive in probes for column in (
        Column(f"{name}_probe_prob", "float", doc=f"P({positive}) from the {display}"),
        Column(f"{name}_probe_margin", "float", doc=f"the {display}'s margin (+ = predicts {positive})")))
    return Table("analysis", "analysis.parquet", ANALYSIS_RUN_COLUMNS + per_probe + ANALYSIS_TAIL_COLUMNS,
                 key=ANALYSIS_KEY)


# ---- probes: artifacts/probes/ (written by train_probes, read by evaluate and analysis) ------------------
# Written and read only by ``stages.lib.probes.store``. Each probe of ``stages.lib.registry.probes()`` is two files
# named by its ``file`` stem: ``<stem>.json`` (kind, params with its location, chosen C, CV scores) and
# ``<stem>.npz`` (float64 weights, read without pickle).
PROBE_METADATA_SUFFIX, PROBE_WEIGHTS_SUFFIX = ".json", ".npz"
# stem: every (label, position, layer) probe fitted on train; a .json list of metadata + one .npz of stacked weights
LOCATION_PROBES_FILE = "location_probes"

# ---- plots: artifacts/plots/*.csv (written by evaluate) ----------------------------------------------
AUROC_BY_LAYER = Table("auroc_by_layer", "auroc_by_layer.csv", columns=(
    Column("probe", "str", doc="`accuracy` (label: correct) or `se` (label: high_se)"),
    Column("position", "str"),
    Column("layer", "int", doc="hidden-state index (0 = embedding output)"),
    Column("split", "str", doc="val, test or ood"),
    Column("auroc", "float", nullable=True, doc="probe fitted on train, scored for its own label; null if one class"),
))
ROC = Table("roc", "roc.csv", columns=(
    Column("score", "str", doc="a score of stages.lib.registry.SCORES flagging incorrect runs (the positive class)"),
    Column("split", "str", doc="test or ood"),
    Column("fpr", "float"),
    Column("tpr", "float"),
))

EARLY_WARNING = Table("early_warning", "early_warning.csv", columns=(
    Column("probe", "str", doc="`accuracy` (label: correct) or `se` (label: high_se)"),
    Column("position", "str"),
    Column("fraction", "float", nullable=True, doc="share of the reasoning seen (tbg 0, think_<p> p/100, "
                                                   "think_end 1); null for slt, which has also seen the answer"),
    Column("layer", "int", doc="the best layer at this position, chosen on val"),
    Column("split", "str", doc="test or ood"),
    Column("auroc", "float", nullable=True, doc="for the probe's own label; null if one class"),
    Column("auroc_ci_low", "float", nullable=True),
    Column("auroc_ci_high", "float", nullable=True),
))
RISK_COVERAGE = Table("risk_coverage", "risk_coverage.csv", columns=(
    Column("score", "str", doc="a registry score flagging incorrect runs; runs kept from the lowest score up"),
    Column("split", "str", doc="test or ood"),
    Column("coverage", "float", doc="fraction of runs kept"),
    Column("risk", "float", doc="error rate of the kept runs"),
))
RELIABILITY = Table("reliability", "reliability.csv", columns=(
    Column("probe", "str", doc="a calibrated registry score (accuracy_probe, accuracy_range_probe): its P(correct)"),
    Column("split", "str", doc="test or ood"),
    Column("bin", "int"),
    Column("lower", "float"),
    Column("upper", "float"),
    Column("n", "int"),
    Column("mean_predicted", "float", nullable=True, doc="mean P(correct) in the bin; null if empty"),
    Column("observed_frequency", "float", nullable=True, doc="fraction correct in the bin; null if empty"),
))

DIFFICULTY = Table("auroc_by_difficulty", "auroc_by_difficulty.csv", columns=(
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
))

STABILITY_PLOT = Table("stability", "stability.csv", columns=(
    Column("seed", "int", doc="seed of the question split and the probe fits"),
    Column("split", "str", doc="test or ood"),
    Column("score", "str", doc="a score of stages.lib.registry.stable_scores()"),
    Column("auroc", "float", nullable=True, doc="for flagging incorrect runs; null if one class"),
))

# ---- file names inside the `paths:` directories, shared by the stages that write them and the viewer ----
LOCATION_SCORES_FILE = "location_scores.npy"  # in paths.analysis; LocationScoresMeta
LOCATION_SCORES_META_FILE = "location_scores.json"  # in paths.analysis; LocationScoresMeta

# ---- early exit: forced answers at reasoning prefixes and the calibrated stopping rules -----------------------
FORCED_ANSWERS = Table("forced_answers", "{dataset}.parquet", key=("question_id", "run_id", "prefix"), columns=(
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
))

EARLY_EXIT_PARETO = Table("early_exit_pareto", "early_exit_pareto.csv", columns=(
    Column("rule", "str", doc="a stopping rule of stages.lib.early_exit.rules.RULES"),
    Column("split", "str", doc="val, test or ood"),
    Column("tau", "float", nullable=True, doc="the threshold (null: never stop, think to the end)"),
    Column("accuracy", "float", doc="accuracy of the answers given under the rule"),
    Column("tokens_used", "float", doc="mean generated tokens per run, trial answers the rule needs included"),
    Column("think_tokens_saved", "float", doc="share of the reasoning tokens not generated"),
    Column("loss", "float", doc="share of runs right with full reasoning and wrong under the rule"),
    Column("chosen", "bool", doc="the operating point calibrated on val"),
))

EARLY_EXIT_GUARANTEE = Table("early_exit_guarantee", "early_exit_guarantee.csv", columns=(
    Column("rule", "str", doc="a stopping rule of stages.lib.early_exit.rules.RULES"),
    Column("split", "str", doc="test (the redrawn in-distribution test questions) or ood"),
    Column("epsilon", "float", doc="the risk level the rule was recalibrated for"),
    Column("delta", "float", doc="the allowed chance of exceeding it"),
    Column("loss_mean", "float", doc="realised loss, mean over the redraws"),
    Column("loss_q95", "float", doc="realised loss, 95th percentile over the redraws"),
    Column("exceedance", "float", doc="share of redraws whose realised loss exceeds epsilon (promised <= delta on "
                                      "test)"),
    Column("think_tokens_saved_mean", "float", doc="share of the reasoning tokens not generated, mean over redraws"),
))
