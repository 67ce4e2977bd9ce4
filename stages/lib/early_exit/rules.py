"""Early exit: stopping rules over forced answers at reasoning prefixes, with a threshold chosen on val by
Learn-then-Test so that the accuracy lost against full reasoning is at most epsilon with probability >= 1 - delta.

The pieces, all pure functions over arrays:

- ``PrefixOutcomes``: per run (n) and prefix (m), the forced answer's correctness, cost and confidence, plus the
  run's full-reasoning correctness and cost (``prefix_outcomes`` builds it from the two tables).
- ``RULES``: each rule turns a run into a score per prefix (n, m); the rule stops at the FIRST prefix whose score
  is >= tau, otherwise the run thinks to the end (``stop_index``, ``apply_rule``). The probe rule's score is the
  stopping probe's P(correct if stopped); the baselines are a fixed budget, the forced answer's own confidence
  (DEER-style), agreement of consecutive forced answers, and the forced answer's token entropy.
- ``calibrate``: Learn-then-Test (Angelopoulos, Bates, Candes, Jordan, Lei 2021) with fixed-sequence testing and
  Hoeffding-Bentkus p-values (Bates et al. 2021). The loss of a run is 1 when full reasoning answers it right and
  the rule's answer is wrong (so the accuracy drop is at most the mean loss); the calibration unit is the
  QUESTION (its runs' mean loss, in [0, 1]), because runs of one question are not independent. Candidates are
  tested from the most conservative tau down, each at level delta, and the walk stops at the first that is not
  rejected; the chosen tau is the last rejected one, or no stopping at all. The candidate list comes from the
  train split's scores, so it is fixed before val is seen; test and OOD are never used for any choice.
- ``outcome_report`` / ``pareto_rows``: what a rule does on a split, with question-bootstrap percentile CIs, and
  its accuracy-against-tokens curve over the candidate taus.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import xlogy
from scipy.stats import binom, binomtest
from sklearn.base import clone
from sklearn.model_selection import GroupKFold, cross_val_score

from stages.lib.questions.answers import answers_equivalent
from stages.lib.evaluation.metrics import auroc, exact_ties, single_class_reason
from stages.lib.params import ProbeParams
from stages.lib.probes.linear import LogisticProbe, SingleClassError
from stages.lib.probes.fitting import fit_probe, probe_features
from stages.lib.schema.machinery import SchemaError
from stages.lib.schema.reports import StoppingProbeChoice
from stages.lib.schema.tables import EARLY_EXIT_GUARANTEE

log = logging.getLogger(__name__)


# ---- the data a rule sees ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrefixOutcomes:
    """One split's runs (n, sorted by question_id, run_id) at the m prefixes of ``early_exit.prefixes``."""

    question_id: np.ndarray  # (n,)
    run_id: np.ndarray  # (n,)
    prefixes: tuple[int, ...]  # (m,) percents
    forced_correct: np.ndarray  # (n, m) bool
    forced_answer: np.ndarray  # (n, m) str
    forced_tokens: np.ndarray  # (n, m) generated tokens of a run stopped there (kept reasoning + answer)
    trial_tokens: np.ndarray  # (n, m) tokens of the forced answer alone (</think>, answer prefix, answer)
    reasoning_kept: np.ndarray  # (n, m)
    mean_logprob: np.ndarray  # (n, m) float, NaN where nothing was decoded
    mean_entropy: np.ndarray  # (n, m) float, NaN where nothing was decoded
    reasoning_tokens: np.ndarray  # (n,)
    full_correct: np.ndarray  # (n,) bool
    full_tokens: np.ndarray  # (n,) generated tokens with full reasoning

    @property
    def n_runs(self) -> int:
        return len(self.question_id)

    def subset(self, mask: np.ndarray) -> "PrefixOutcomes":
        return PrefixOutcomes(**{name: (value if name == "prefixes" else value[mask])
                                 for name, value in self.__dict__.items()})


def concatenate_outcomes(first: PrefixOutcomes, second: PrefixOutcomes) -> PrefixOutcomes:
    """The runs of two splits (of disjoint questions, at the same prefixes) as one, ``first``'s rows first."""
    return PrefixOutcomes(**{name: (value if name == "prefixes" else np.concatenate([value, getattr(second, name)]))
                             for name, value in first.__dict__.items()})


def prefix_outcomes(runs: pd.DataFrame, forced: pd.DataFrame, prefixes, source: str = "forced answers"
                    ) -> PrefixOutcomes:
    """Join the runs (question_id, run_id, correct, n_generated) with their forced answers at every prefix.

    Every run needs a forced answer at every prefix (else SchemaError naming ``source``: rerun forced_answers).
    """
    runs = runs.sort_values(["question_id", "run_id"], kind="mergesort").reset_index(drop=True)
    if not len(runs):  # e.g. data.ood_source: none
        m = len(prefixes)
        matrix = {dtype: np.zeros((0, m), dtype=dtype) for dtype in (bool, object, np.int64, np.float64)}
        return PrefixOutcomes(np.zeros(0, object), np.zeros(0, np.int64), tuple(int(p) for p in prefixes),
                              matrix[bool], matrix[object], matrix[np.int64], matrix[np.int64], matrix[np.int64],
                              matrix[np.float64], matrix[np.float64], np.zeros(0, np.int64), np.zeros(0, bool),
                              np.zeros(0, np.int64))
    keys = pd.MultiIndex.from_frame(runs[["question_id", "run_id"]])
    wide = {}
    indexed = forced.set_index(["question_id", "run_id", "prefix"])
    for prefix in prefixes:
        try:
            at = indexed.xs(int(prefix), level="prefix").reindex(keys)
        except KeyError:
            at = None
        if at is None or at["correct"].isna().any():
            raise SchemaError(f"{source}: no forced answer at prefix {prefix} for some runs; rerun forced_answers "
                              f"(`dvc repro forced_answers`)")
        wide[prefix] = at

    def stack(column: str, dtype=None) -> np.ndarray:
        return np.column_stack([wide[p][column].to_numpy(dtype=dtype) for p in prefixes]) if prefixes else None

    first = wide[prefixes[0]]
    return PrefixOutcomes(
        question_id=runs["question_id"].to_numpy(object), run_id=runs["run_id"].to_numpy(np.int64),
        prefixes=tuple(int(p) for p in prefixes), forced_correct=stack("correct", bool),
        forced_answer=stack("answer", object), forced_tokens=stack("tokens_used", np.int64),
        trial_tokens=stack("tokens_used", np.int64) - stack("generated_kept", np.int64),
        reasoning_kept=stack("reasoning_kept", np.int64), mean_logprob=stack("mean_logprob", np.float64),
        mean_entropy=stack("mean_entropy", np.float64), reasoning_tokens=first["reasoning_tokens"].to_numpy(np.int64),
        full_correct=runs["correct"].to_numpy(bool), full_tokens=runs["n_generated"].to_numpy(np.int64))


# ---- the rules -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    name: str
    description: str
    pays_trial_answers: bool
    """The rule needs the forced answer at every prefix it checks, so their tokens count as spent."""


RULES = (
    Rule("probe", "stopping probe at think_<p>: P(forced answer correct) >= tau", False),
    Rule("fixed_budget", "a fixed budget: stop every run at the first prefix p/100 >= tau", False),
    Rule("trial_confidence", "DEER-style: the forced answer's mean token probability >= tau", True),
    Rule("consistency", "the forced answers of the last tau + 1 prefixes agree (tau = 1: two consecutive)", True),
    Rule("answer_entropy", "the forced answer's mean token entropy <= -tau (score: minus the entropy, nats)", True),
    Rule("probe_give_up", "Conformal Thinking's lower threshold: give up at the first prefix where the stopping "
         "probe's P(forced answer correct) <= -tau, answering with the forced answer there", False),
)
RULE_NAMES = tuple(rule.name for rule in RULES)


def rule(name: str) -> Rule:
    return RULES[RULE_NAMES.index(name)]


def agreement_streak(answers: np.ndarray) -> np.ndarray:
    """(n, m) int: how many prefixes back the forced answer has stayed the same (math-verify equivalence; an empty
    answer agrees with nothing). 0 at the first prefix; ``streak[:, j] >= 1`` means prefixes j-1 and j agree."""
    n, m = answers.shape
    streak = np.zeros((n, m), dtype=np.int64)
    for j in range(1, m):
        same = np.array([bool(a) and answers_equivalent(str(a), str(b))
                         for a, b in zip(answers[:, j], answers[:, j - 1])],
                        dtype=bool)
        streak[:, j] = np.where(same, streak[:, j - 1] + 1, 0)
    return streak


def rule_scores(name: str, outcomes: PrefixOutcomes, probe_p_correct: np.ndarray | None = None) -> np.ndarray:
    """(n, m) float: the score a rule compares with tau at each prefix (higher = more ready to stop).

    A forced answer with no tokens has no confidence: its trial_confidence and answer_entropy scores are -inf.
    Values equal up to rounding are made equal (``metrics.exact_ties``), so a threshold never splits them.
    """
    return exact_ties(_raw_rule_scores(name, outcomes, probe_p_correct))


def _raw_rule_scores(name: str, outcomes: PrefixOutcomes, probe_p_correct: np.ndarray | None) -> np.ndarray:
    n, m = outcomes.forced_correct.shape
    if name in ("probe", "probe_give_up"):
        if probe_p_correct is None or probe_p_correct.shape != (n, m):
            raise ValueError(f"the {name} rule needs P(correct) of shape {(n, m)}")
        p_correct = np.asarray(probe_p_correct, dtype=np.float64)
        # giving up is stopping where success looks unlikely: the score is -P, so score >= tau means P <= -tau
        return p_correct if name == "probe" else -p_correct
    if name == "fixed_budget":
        return np.broadcast_to(np.asarray(outcomes.prefixes, dtype=np.float64) / 100, (n, m)).copy()
    if name == "trial_confidence":
        return np.where(np.isnan(outcomes.mean_logprob), -np.inf, np.exp(outcomes.mean_logprob))
    if name == "consistency":
        return agreement_streak(outcomes.forced_answer).astype(np.float64)
    if name == "answer_entropy":
        return np.where(np.isnan(outcomes.mean_entropy), -np.inf, -outcomes.mean_entropy)
    raise ValueError(f"unknown stopping rule {name!r}; expected one of {RULE_NAMES}")


def stop_index(scores: np.ndarray, tau: float | None) -> np.ndarray:
    """(n,) int: the first prefix j with ``scores[:, j] >= tau``, or m (think to the end); tau None never stops."""
    n, m = scores.shape
    if tau is None:
        return np.full(n, m, dtype=np.int64)
    ready = scores >= tau
    return np.where(ready.any(axis=1), ready.argmax(axis=1), m)


@dataclass(frozen=True)
class RunOutcome:
    """What a rule does to each run (n,)."""

    stop: np.ndarray  # int: the prefix index stopped at; m = thought to the end
    correct: np.ndarray  # bool: the answer given is right
    tokens: np.ndarray  # generated tokens spent (trial answers included for rules that need them)
    think_saved: np.ndarray  # reasoning tokens not generated
    loss: np.ndarray  # float 0/1: right with full reasoning, wrong under the rule


def apply_rule(outcomes: PrefixOutcomes, scores: np.ndarray, tau: float | None, pays_trial_answers: bool
               ) -> RunOutcome:
    """Stop each run at its first prefix with score >= tau and answer with the forced answer there."""
    n, m = scores.shape
    stop = stop_index(scores, tau)
    stopped = stop < m
    rows, column = np.arange(n), np.minimum(stop, m - 1)
    correct = np.where(stopped, outcomes.forced_correct[rows, column], outcomes.full_correct)
    tokens = np.where(stopped, outcomes.forced_tokens[rows, column], outcomes.full_tokens).astype(np.float64)
    if pays_trial_answers:  # every earlier check decoded a trial answer (the one at the stop is the answer given)
        spent = np.concatenate([np.zeros((n, 1)), np.cumsum(outcomes.trial_tokens, axis=1)], axis=1)
        tokens = tokens + spent[rows, stop]
    think_saved = np.where(stopped, outcomes.reasoning_tokens - outcomes.reasoning_kept[rows, column], 0)
    loss = (outcomes.full_correct & ~correct).astype(np.float64)
    return RunOutcome(stop, correct, tokens, think_saved.astype(np.float64), loss)


def tau_candidates(train_scores: np.ndarray, n_candidates: int) -> np.ndarray:
    """Descending candidate thresholds: the distinct quantiles (0..1, ``n_candidates`` of them) of the finite
    train scores. Descending = from the rule that stops least to the one that stops most (the test order)."""
    finite = train_scores[np.isfinite(train_scores)]
    if not len(finite):
        return np.empty(0)
    return np.unique(np.quantile(finite, np.linspace(0, 1, n_candidates)))[::-1]


# ---- Learn-then-Test -----------------------------------------------------------------------------------------
def hoeffding_bentkus_p_values(risks: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """``hoeffding_bentkus_p_value`` of every entry of ``risks`` (any shape) at once, same shape."""
    risks = np.asarray(risks, dtype=np.float64)
    if n == 0:
        return np.ones_like(risks)
    a = np.minimum(risks, alpha)
    h = xlogy(a, a / alpha) + xlogy(1 - a, (1 - a) / (1 - alpha))
    bentkus = math.e * binom.cdf(np.ceil(n * risks - 1e-9), n, alpha)
    return np.minimum(1.0, np.minimum(np.exp(-n * h), bentkus))


def hoeffding_bentkus_p_value(risk: float, n: int, alpha: float) -> float:
    """p-value of H0: E[loss] > alpha from the mean ``risk`` of n independent losses in [0, 1] (Bates et al. 2021,
    the one Learn-then-Test uses):

        p = min( exp(-n h(min(risk, alpha), alpha)),  e * P(Binomial(n, alpha) <= ceil(n risk)) ),
        h(a, b) = a log(a / b) + (1 - a) log((1 - a) / (1 - b)).
    """
    if n == 0:
        return 1.0
    a = min(risk, alpha)
    h = (a * math.log(a / alpha) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - alpha))
    hoeffding = math.exp(-n * h)
    bentkus = math.e * float(binom.cdf(math.ceil(n * risk - 1e-9), n, alpha))
    return float(min(1.0, hoeffding, bentkus))


def question_losses(loss: np.ndarray, question_id: np.ndarray) -> np.ndarray:
    """(n_questions,) the mean loss of each question's runs, in sorted question order."""
    _, codes = np.unique(question_id, return_inverse=True)
    return np.bincount(codes, weights=loss) / np.bincount(codes)


@dataclass(frozen=True)
class Calibration:
    tau: float | None
    """The chosen threshold; None when no candidate was rejected (the rule never stops)."""
    risk: float | None
    p_value: float | None
    tested: int
    rejected: int
    n_questions: int


def fixed_sequence_test(risks: np.ndarray, n: int, epsilon: float, delta: float) -> tuple[int, np.ndarray]:
    """Test H0_k: risk_k > epsilon in the given order, each at level delta, stopping at the first non-rejection.

    ``risks`` (k,) are empirical risks over n independent units. Controls the chance of rejecting any true H0 at
    delta whatever the order, provided the order is fixed before the data. Returns (number rejected, p-values of
    the tested ones).
    """
    p_values = []
    for risk in risks:
        p_values.append(hoeffding_bentkus_p_value(float(risk), n, epsilon))
        if p_values[-1] > delta:
            return len(p_values) - 1, np.asarray(p_values)
    return len(p_values), np.asarray(p_values)


def calibrate(outcomes: PrefixOutcomes, scores: np.ndarray, candidates: np.ndarray, pays_trial_answers: bool,
              epsilon: float, delta: float) -> Calibration:
    """Learn-then-Test on the calibration runs ``outcomes`` (val): the least conservative candidate tau (in the
    descending order of ``candidates``) whose risk is certified <= epsilon at level delta."""
    risks = np.array([question_losses(apply_rule(outcomes, scores, tau, pays_trial_answers).loss,
                                      outcomes.question_id).mean() for tau in candidates])
    n_questions = len(np.unique(outcomes.question_id))
    rejected, p_values = fixed_sequence_test(risks, n_questions, epsilon, delta)
    if rejected == 0:
        return Calibration(None, 0.0, None, len(p_values), 0, n_questions)
    chosen = rejected - 1
    return Calibration(float(candidates[chosen]), float(risks[chosen]), float(p_values[chosen]), len(p_values),
                       rejected, n_questions)


# ---- what a rule does on a split -----------------------------------------------------------------------------
def _question_sums(values: dict[str, np.ndarray], question_id: np.ndarray) -> dict[str, np.ndarray]:
    _, codes = np.unique(question_id, return_inverse=True)
    return {name: np.bincount(codes, weights=value.astype(np.float64)) for name, value in values.items()}


def _ratio(numerator, denominator):
    return np.divide(numerator, denominator, out=np.full(np.shape(numerator), np.nan, dtype=np.float64),
                     where=np.asarray(denominator) > 0)


def outcome_report(outcomes: PrefixOutcomes, run: RunOutcome, epsilon: float, n_resamples: int, confidence: float,
                   rng: np.random.Generator) -> dict:
    """EarlyExitOutcome fields: accuracy with and without the rule, think tokens saved, tokens used and the
    realised loss, with percentile CIs from resampling questions (all runs of each drawn question)."""
    n = outcomes.n_runs
    n_questions = len(np.unique(outcomes.question_id))
    if n == 0:
        return dict(n_runs=0, n_questions=0, **{key: None for key in (
            "accuracy_full", "accuracy_early_exit", "accuracy_change", "accuracy_change_ci_low",
            "accuracy_change_ci_high", "think_tokens_saved", "think_tokens_saved_ci_low", "think_tokens_saved_ci_high",
            "tokens_used", "tokens_full", "loss", "loss_ci_low", "loss_ci_high", "loss_within_epsilon", "stop_rate")})
    m = outcomes.forced_correct.shape[1]
    sums = _question_sums({"runs": np.ones(n), "change": run.correct.astype(float) - outcomes.full_correct,
                           "saved": run.think_saved, "think": outcomes.reasoning_tokens, "loss": run.loss},
                          outcomes.question_id)
    draws = rng.integers(0, n_questions, size=(n_resamples, n_questions))
    resampled = {name: value[draws].sum(axis=1) for name, value in sums.items()}
    tail = (1 - confidence) / 2

    def interval(numerator: str, denominator: str) -> tuple[float | None, float | None]:
        values = _ratio(resampled[numerator], resampled[denominator])
        values = values[np.isfinite(values)]
        if not len(values):
            return None, None
        low, high = np.quantile(values, [tail, 1 - tail])
        return float(low), float(high)

    def clean(value) -> float | None:
        value = float(value)
        return None if not np.isfinite(value) else value

    change_low, change_high = interval("change", "runs")
    saved_low, saved_high = interval("saved", "think")
    loss_low, loss_high = interval("loss", "runs")
    loss = float(run.loss.mean())
    return dict(
        n_runs=n, n_questions=n_questions, accuracy_full=float(outcomes.full_correct.mean()),
        accuracy_early_exit=float(run.correct.mean()), accuracy_change=float(run.correct.mean()
                                                                             - outcomes.full_correct.mean()),
        accuracy_change_ci_low=change_low, accuracy_change_ci_high=change_high,
        think_tokens_saved=clean(_ratio(run.think_saved.sum(), outcomes.reasoning_tokens.sum())),
        think_tokens_saved_ci_low=saved_low, think_tokens_saved_ci_high=saved_high,
        tokens_used=float(run.tokens.mean()), tokens_full=float(outcomes.full_tokens.mean()), loss=loss,
        loss_ci_low=loss_low, loss_ci_high=loss_high, loss_within_epsilon=bool(loss <= epsilon),
        stop_rate=float((run.stop < m).mean()))


def pareto_rows(rule_name: str, split: str, outcomes: PrefixOutcomes, scores: np.ndarray, candidates: np.ndarray,
                chosen: float | None, pays_trial_answers: bool) -> pd.DataFrame:
    """EARLY_EXIT_PARETO.columns: the rule at "never stop" and at every candidate tau, on one split."""
    rows = []
    for tau in [None, *map(float, candidates)]:
        run = apply_rule(outcomes, scores, tau, pays_trial_answers)
        think = outcomes.reasoning_tokens.sum()
        rows.append({"rule": rule_name, "split": split, "tau": tau,
                     "accuracy": float(run.correct.mean()) if outcomes.n_runs else np.nan,
                     "tokens_used": float(run.tokens.mean()) if outcomes.n_runs else np.nan,
                     "think_tokens_saved": float(run.think_saved.sum() / think) if think > 0 else 0.0,
                     "loss": float(run.loss.mean()) if outcomes.n_runs else np.nan, "chosen": tau == chosen})
    frame = pd.DataFrame(rows)
    frame["tau"] = frame["tau"].astype(float)
    return frame


# ---- stopping probes -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoppingProbe:
    """P(the forced answer at one prefix is correct), read from the hidden state at ``think_<p>``."""

    position: str
    layer: int
    probe: LogisticProbe | None
    """None when the train labels held one class: P is then ``constant`` for every run."""
    constant: float
    train_cv_auroc: float | None

    def p_correct(self, hidden, rows, positions, layers) -> np.ndarray:
        """(len(rows),) P(correct if stopped here)."""
        if self.probe is None:
            return np.full(len(rows), self.constant)
        return self.probe.predict_proba(probe_features(self.probe, hidden, rows, positions, layers))[:, 1]


def grouped_cv_auroc(probe: LogisticProbe, features: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                     folds: int, seed: int) -> float | None:
    """The probe's question-grouped cross-validated AUROC on train: its own CV score at the chosen C when it ran
    one (``cv_scores_``), else scikit-learn's ``cross_val_score`` at that C (folds with one class skipped)."""
    score = probe.cv_scores_.get(probe.C_)
    if score is not None:
        return float(score)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        return None
    splitter = GroupKFold(n_splits=min(folds, n_groups), shuffle=True, random_state=seed)
    usable = [(fit_rows, held_out) for fit_rows, held_out in splitter.split(features, labels, groups)
              if len(np.unique(labels[fit_rows])) == 2 and len(np.unique(labels[held_out])) == 2]
    if not usable:
        return None
    scores = cross_val_score(clone(probe).set_params(c_grid=(probe.C_,)), features, labels, cv=usable,
                             scoring="roc_auc")
    return float(np.mean(scores))


def fit_stopping_probe(hidden, positions, layers, prefix: int, train_rows, train_labels, train_groups,
                       probe_params: ProbeParams, seed: int) -> StoppingProbe:
    """The logistic stopping probe at ``think_<prefix>``: one probe per traced layer fitted on the train runs'
    forced-answer correctness (C by question-grouped CV, as every probe), and the layer with the best grouped CV
    AUROC on train kept. Val is not used: it is the calibration set of Learn-then-Test, whose guarantee needs a
    score function fixed without it."""
    position = f"think_{prefix}"
    train_labels = np.asarray(train_labels, dtype=bool)
    if single_class_reason(train_labels, f"forced correct at {position}") is not None:
        log.warning("%s: forced answers on train are all %s; the stopping probe is constant", position,
                    bool(train_labels[0]) if len(train_labels) else None)
        return StoppingProbe(position, int(layers[0]), None, float(train_labels.mean()) if len(train_labels)
                             else 0.0, None)
    best: StoppingProbe | None = None
    for layer in layers:
        fit = dict(hidden=hidden, rows=train_rows, positions=positions, layers=layers,
                   label_name=f"forced_correct_{position}", targets=train_labels, groups=train_groups,
                   position=position, layer=layer, cv_folds=probe_params.cv_folds, max_iter=probe_params.max_iter,
                   random_state=seed)
        try:
            probe = fit_probe(c_grid=probe_params.c_grid, **fit)
        except SingleClassError as error:  # too few right forced answers for every fold to hold both classes
            log.warning("%s layer %s: %s; fitted at the strongest regularisation, C = %g", position, layer, error,
                        min(probe_params.c_grid))
            probe = fit_probe(c_grid=(min(probe_params.c_grid),), **fit)
        score = grouped_cv_auroc(probe, probe_features(probe, hidden, train_rows, positions, layers), train_labels,
                                 np.asarray(train_groups), probe_params.cv_folds, seed)
        candidate = StoppingProbe(position, int(layer), probe, float(train_labels.mean()), score)
        if best is None or (score is not None and (best.train_cv_auroc is None or score > best.train_cv_auroc)):
            best = candidate  # ties keep the earlier layer
    log.info("stopping probe %s: layer %d, train grouped-CV AUROC %s", position, best.layer, best.train_cv_auroc)
    return best


def stopping_probe_choices(probes: list[StoppingProbe], outcomes: dict[str, PrefixOutcomes],
                           p_correct: dict[str, np.ndarray]) -> dict[str, StoppingProbeChoice]:
    """early_exit.json's record of each stopping probe (in prefix order): where it reads, its train CV AUROC and,
    for information only, its val AUROC."""
    return {probe.position: StoppingProbeChoice(
        position=probe.position, layer=probe.layer, C=None if probe.probe is None else float(probe.probe.C_),
        train_cv_auroc=probe.train_cv_auroc,
        val_auroc=auroc(outcomes["val"].forced_correct[:, j], p_correct["val"][:, j]),
        train_accuracy=float(outcomes["train"].forced_correct[:, j].mean()) if outcomes["train"].n_runs else 0.0,
        constant=probe.probe is None) for j, probe in enumerate(probes)}


# ---- every rule, calibrated and evaluated ----------------------------------------------------------------------
CALIBRATION_SPLIT = "val"
EVALUATED_SPLITS = ("test", "ood")
METHOD = ("Learn-then-Test (Angelopoulos et al. 2021): fixed-sequence testing over tau, most conservative first, "
          "Hoeffding-Bentkus p-values on question-level losses")
LOSS = "1 if full reasoning is right and the early answer wrong; mean over a question's runs (>= accuracy lost)"


def evaluate_rules(outcomes: dict[str, PrefixOutcomes], probe_p_correct: dict[str, np.ndarray], epsilon: float,
                   delta: float, n_candidates: int, n_resamples: int, confidence: float, seed: int, *,
                   n_draws: int, epsilon_grid: tuple[float, ...] = ()
                   ) -> tuple[dict[str, dict], pd.DataFrame, pd.DataFrame]:
    """Every rule of RULES: candidate taus from train, tau by Learn-then-Test on val, outcomes on test and OOD, and
    the guarantee observed over ``n_draws`` redraws of the calibration questions from val and test pooled (at
    ``epsilon`` for early_exit.json, and at each of ``epsilon_grid`` for the guarantee plot; seeded by ``seed``).

    ``outcomes`` and ``probe_p_correct`` hold the splits train, val, test and ood. Returns (rule -> EarlyExitRule
    fields, the Pareto rows of val, test and ood, the EARLY_EXIT_GUARANTEE rows).
    """
    pooled = concatenate_outcomes(outcomes[CALIBRATION_SPLIT], outcomes["test"])  # val and test questions
    n_pooled = len(np.unique(pooled.question_id))
    n_calibration = len(np.unique(outcomes[CALIBRATION_SPLIT].question_id))
    draws = (calibration_draws(n_pooled, n_calibration, n_draws, np.random.default_rng([seed, 11]))
             if n_draws and 0 < n_calibration < n_pooled else None)
    rules, frames, guarantee_rows = {}, [], []
    for offset, spec in enumerate(RULES):
        scores = {split: rule_scores(spec.name, data, probe_p_correct.get(split)) for split, data in outcomes.items()}
        candidates = tau_candidates(scores["train"], n_candidates)
        calibration = calibrate(outcomes[CALIBRATION_SPLIT], scores[CALIBRATION_SPLIT], candidates,
                                spec.pays_trial_answers, epsilon, delta)
        log.info("%s: tau %s (val risk %s, p %s; %d of %d candidates rejected)", spec.name, calibration.tau,
                 calibration.risk, calibration.p_value, calibration.rejected, calibration.tested)
        splits = {}
        for split in EVALUATED_SPLITS:
            run = apply_rule(outcomes[split], scores[split], calibration.tau, spec.pays_trial_answers)
            splits[split] = outcome_report(outcomes[split], run, epsilon, n_resamples, confidence,
                                           np.random.default_rng([seed, offset, EVALUATED_SPLITS.index(split)]))
        for split in (CALIBRATION_SPLIT, *EVALUATED_SPLITS):
            if outcomes[split].n_runs:
                frames.append(pareto_rows(spec.name, split, outcomes[split], scores[split], candidates,
                                          calibration.tau, spec.pays_trial_answers))
        redraws = None
        if draws is not None:
            pool_table = question_table(pooled, np.concatenate([scores[CALIBRATION_SPLIT], scores["test"]]),
                                        candidates, spec.pays_trial_answers)
            ood_table = (question_table(outcomes["ood"], scores["ood"], candidates, spec.pays_trial_answers)
                         if outcomes["ood"].n_runs else None)
            observed = redraw_outcomes(pool_table, ood_table, draws, epsilon, delta)
            by_split = redraw_report(observed, epsilon, confidence)
            redraws = dict(n_draws=n_draws, n_calibration_questions=n_calibration,
                           n_test_questions=n_pooled - n_calibration,
                           never_stops=float(np.mean(observed["chosen"] == len(candidates))),
                           within_delta=bool(by_split["test"]["exceedance_ci_low"] <= delta), splits=by_split)
            log.info("%s over %d redraws: test loss > epsilon in %.3f of them (delta %g)", spec.name, n_draws,
                     by_split["test"]["exceedance"], delta)
            for level in sorted({*epsilon_grid, epsilon}):
                at_level = observed if level == epsilon else redraw_outcomes(pool_table, ood_table, draws, level,
                                                                             delta)
                for split in ("test", "ood"):
                    if f"{split}_loss" in at_level:
                        losses = at_level[f"{split}_loss"]
                        guarantee_rows.append(dict(
                            rule=spec.name, split=split, epsilon=float(level), delta=float(delta),
                            loss_mean=float(losses.mean()), loss_q95=float(np.quantile(losses, 0.95)),
                            exceedance=float(np.mean(losses > level)),
                            think_tokens_saved_mean=float(at_level[f"{split}_saved"].mean())))
        rules[spec.name] = dict(description=spec.description, tau=calibration.tau, val_risk=calibration.risk,
                                val_p_value=calibration.p_value, candidates_tested=calibration.tested,
                                candidates_rejected=calibration.rejected, splits=splits, redraws=redraws)
    guarantee = pd.DataFrame(guarantee_rows, columns=[column.name for column in EARLY_EXIT_GUARANTEE.columns])
    return rules, pd.concat(frames, ignore_index=True), guarantee


# ---- the guarantee, observed: recalibrate on many redraws of the calibration questions -------------------------
@dataclass(frozen=True)
class QuestionTable:
    """What a rule does to each question at every candidate tau and at "never stop" (the last column).

    ``loss`` (q, c + 1) is each question's mean run loss (the calibration unit); ``think_saved`` (q, c + 1) and
    ``reasoning`` (q,) are its reasoning tokens not generated and its reasoning tokens in all, summed over its runs.
    """

    loss: np.ndarray
    think_saved: np.ndarray
    reasoning: np.ndarray


def question_table(outcomes: PrefixOutcomes, scores: np.ndarray, candidates: np.ndarray,
                   pays_trial_answers: bool) -> QuestionTable:
    """``QuestionTable`` of one split's runs, questions in sorted order (as ``question_losses``)."""
    _, codes = np.unique(outcomes.question_id, return_inverse=True)
    runs_per_question = np.bincount(codes)
    loss, saved = [], []
    for tau in [*map(float, candidates), None]:
        run = apply_rule(outcomes, scores, tau, pays_trial_answers)
        loss.append(np.bincount(codes, weights=run.loss, minlength=len(runs_per_question)) / runs_per_question)
        saved.append(np.bincount(codes, weights=run.think_saved, minlength=len(runs_per_question)))
    reasoning = np.bincount(codes, weights=outcomes.reasoning_tokens.astype(np.float64),
                            minlength=len(runs_per_question))
    return QuestionTable(np.column_stack(loss), np.column_stack(saved), reasoning)


def learn_then_test_choices(risks: np.ndarray, n: int, epsilon: float, delta: float) -> np.ndarray:
    """Fixed-sequence Learn-then-Test on many calibration sets at once: ``risks`` (B, c) are each set's empirical
    risks at the c candidates (most conservative first) over n questions; returns (B,) the chosen candidate's column,
    c where none was rejected (never stop). The same choice as ``calibrate`` makes for each set."""
    not_rejected = hoeffding_bentkus_p_values(risks, n, epsilon) > delta  # (B, c)
    rejected = np.where(not_rejected.any(axis=1), not_rejected.argmax(axis=1), risks.shape[1])
    return np.where(rejected > 0, rejected - 1, risks.shape[1])


def calibration_draws(n_questions: int, n_calibration: int, n_draws: int, rng: np.random.Generator) -> np.ndarray:
    """(B, q) bool: each row a uniformly random set of ``n_calibration`` of the q questions (the rest are test)."""
    ranks = rng.random((n_draws, n_questions)).argsort(axis=1).argsort(axis=1)
    return ranks < n_calibration


def _saved_share(think_saved: np.ndarray, reasoning: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(reasoning > 0, think_saved / np.where(reasoning > 0, reasoning, 1), 0.0)


def redraw_outcomes(pool: QuestionTable, ood: QuestionTable | None, calibration: np.ndarray, epsilon: float,
                    delta: float) -> dict[str, np.ndarray]:
    """For every draw (row of ``calibration``, (B, q) over the pooled in-distribution questions): the tau Learn-then-
    Test picks on its calibration questions, and the realised question-level loss and share of reasoning tokens
    saved on its test questions and on the OOD questions (all of them, every draw). Returns (B,) arrays ``chosen``,
    ``test_loss``, ``test_saved`` and, when ``ood`` has questions, ``ood_loss``, ``ood_saved``. No loop over draws:
    every draw is a row of one matrix product."""
    n_candidates = pool.loss.shape[1] - 1
    calibration = np.asarray(calibration, dtype=np.float64)
    test = 1.0 - calibration
    n_calibration = int(calibration[0].sum())
    risks = calibration @ pool.loss[:, :n_candidates] / n_calibration  # (B, c)
    chosen = learn_then_test_choices(risks, n_calibration, epsilon, delta)  # (B,)
    rows = np.arange(len(chosen))
    result = {"chosen": chosen,
              "test_loss": (test @ pool.loss)[rows, chosen] / test.sum(axis=1),
              "test_saved": _saved_share((test @ pool.think_saved)[rows, chosen], test @ pool.reasoning)}
    if ood is not None and len(ood.reasoning):
        result["ood_loss"] = ood.loss.mean(axis=0)[chosen]
        result["ood_saved"] = np.broadcast_to(_saved_share(ood.think_saved.sum(axis=0), ood.reasoning.sum()),
                                              (len(chosen), n_candidates + 1))[rows, chosen]
    return result


def exceedance(losses: np.ndarray, epsilon: float, confidence: float) -> dict:
    """How often a realised loss exceeds epsilon over the draws, with the Clopper-Pearson interval."""
    exceeded = int(np.sum(losses > epsilon))
    interval = binomtest(exceeded, len(losses)).proportion_ci(confidence_level=confidence, method="exact")
    return dict(exceedance=exceeded / len(losses), exceedance_ci_low=float(interval.low),
                exceedance_ci_high=float(interval.high))


def _quantiles(values: np.ndarray, prefix: str) -> dict:
    low, median, high = np.quantile(values, [0.05, 0.5, 0.95])
    return {f"{prefix}_mean": float(values.mean()), f"{prefix}_q05": float(low), f"{prefix}_median": float(median),
            f"{prefix}_q95": float(high)}


def redraw_report(draws: dict[str, np.ndarray], epsilon: float, confidence: float) -> dict:
    """``schema.EarlyExitRedraws``' per-split fields from ``redraw_outcomes``: test and, when present, ood."""
    report = {}
    for split in ("test", "ood"):
        if f"{split}_loss" not in draws:
            continue
        report[split] = dict(**exceedance(draws[f"{split}_loss"], epsilon, confidence),
                             **_quantiles(draws[f"{split}_loss"], "loss"),
                             **_quantiles(draws[f"{split}_saved"], "think_tokens_saved"))
    return report
