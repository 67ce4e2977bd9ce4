"""Every JSON hand-off's model (pydantic, through ``Contract``), each beside its file name: selection.json,
evaluate.json, stability.json, the cost records, cost_ratio.json and early_exit.json."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import ConfigDict, Discriminator, Field, Tag, field_validator

from stages.lib.schema.machinery import SPLITS, Contract


# ---- probes: artifacts/probes/selection.json (written by train_probes) -----------------------------------
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


# ---- evaluate.json: the scores evaluated per split (written by stages.evaluate, read by the viewer) ----------
EVALUATE_FILE = "evaluate.json"  # in paths.metrics; EvaluateReport
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
    """EARLY_WARNING.columns as a JSON record."""

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
STABILITY_FILE = "stability.json"  # in paths.metrics; StabilityReport
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
COST_DIR = "cost"  # in paths.metrics: <stage>.json, CostRecord
class CostRecord(Contract):
    """What one stage run cost: wall seconds, then the counters the stage adds (written as top-level keys)."""

    stage: str
    wall_seconds: float
    counters: dict[str, int | float | str | bool | None]
    machine: dict[str, str | int | None] | None = Field(default=None, exclude_if=lambda machine: machine is None)
    """The CPU, its flags, the pinned kernel switches and the library versions (stages.lib.cpu.machine_record);
    absent from records written before it was added."""
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
COST_RATIO_FILE = "cost_ratio.json"  # in paths.metrics; CostRatio
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



# ---- early_exit.json (written by stages.early_exit) ----------------------------------------------------------
EARLY_EXIT_FILE = "early_exit.json"  # in paths.metrics; EarlyExitReport


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


class EarlyExitRedrawSplit(Contract):
    """A rule recalibrated on each redraw of the calibration questions: its realised loss on one split's questions,
    over the draws."""

    exceedance: float
    """Share of draws whose realised (question-level) loss exceeds epsilon: Learn-then-Test promises <= delta on
    test; on OOD nothing is promised."""
    exceedance_ci_low: float
    exceedance_ci_high: float
    """Clopper-Pearson interval of the exceedance (scipy.stats.binomtest), at ``settings.confidence``."""
    loss_mean: float
    loss_q05: float
    loss_median: float
    loss_q95: float
    think_tokens_saved_mean: float
    think_tokens_saved_q05: float
    think_tokens_saved_median: float
    think_tokens_saved_q95: float


class EarlyExitRedraws(Contract):
    """The guarantee observed: val and test questions pooled, split again at random ``n_draws`` times into as many
    calibration questions as val has and test questions (the rest), the rule recalibrated on each."""

    n_draws: int
    n_calibration_questions: int
    n_test_questions: int
    never_stops: float
    """Share of draws where no candidate was certified (the rule thinks to the end: no loss, no saving)."""
    within_delta: bool
    """The test exceedance is consistent with the promise: its interval's lower end is <= delta."""
    splits: dict[str, EarlyExitRedrawSplit]
    """test and, when there are OOD questions, ood (the same calibrated tau applied to every OOD question)."""


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
    redraws: EarlyExitRedraws | None = None
    """The guarantee checked over redraws of the calibration questions (null in files written before it was)."""


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
    redraws: int | None = None
    """Redraws of the calibration questions (``EarlyExitRedraws``); null in files written before they were."""
    epsilon_grid: list[float] | None = None
    """The risk levels of the guarantee plot (early_exit_guarantee.csv)."""


class EarlyExitReport(Contract):
    """early_exit.json: the stopping probes, and every rule calibrated on val and evaluated on test and OOD."""

    settings: EarlyExitSettings
    stopping_probes: dict[str, StoppingProbeChoice]
    """think_<p> -> the probe reading it."""
    rules: dict[str, EarlyExitRule]
