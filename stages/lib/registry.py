"""The one registry of probes and scores: everything that rates a run's risk of being wrong, in one table.

``SCORES`` lists every score evaluate computes for a run, in the order evaluate.json, the plots and the viewer show
them. train_probes fits the probes the scores read (``PROBES``), evaluate scores each entry against its label,
stability refits those marked ``stability``, analysis writes a probability and a margin column for those marked
``per_run`` and the viewer offers them all by their display names. Nothing else enumerates scores.

To add a score: write ``def my_score(inputs) -> (n,) array`` below (higher = more likely ``label``; ``inputs`` is
evaluation's ``ScoreInputs``: the runs' columns, each probe's decision function at its selected location, a
feature probe's P(positive)) and append a ``Score`` entry to ``SCORES``. A score that reads a new kind of probe also
needs that probe fitted in ``stages.lib.probes.selection.train``; a new hidden-state probe on an existing target needs
only its ``Probe`` (fitted and selected like the others).

This module imports no fitting code (scipy only when a score is computed), so the viewer iterates it cheaply; the
schema does not import it, so adding a score reruns only the stages that fit or score probes, never generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Protocol

import numpy as np
import pandas as pd

from stages.lib.evaluation import baselines
from stages.lib.schema.tables import analysis_table

Label = Literal["incorrect", "high_se"]
"""What a high score flags: the run is incorrect, or its question has high semantic entropy (SE above the
threshold fitted on train)."""

Kind = Literal["hidden_state_probe", "range_probe", "entropy", "graph", "baseline"]
"""hidden_state_probe: a linear probe at the (position, layer) chosen on val; range_probe: one over the best
contiguous layer range at its single-layer probe's position; entropy: an entropy of the run or its question;
graph: a measure of the question's equivalence graph over its K answers (lm-polygraph's, semantic_entropy stage);
baseline: a cheap score from the run's own tokens and log-probabilities (stages.lib.evaluation.baselines)."""


# ---- targets: what the probes are fitted to predict ---------------------------------------------------------
@dataclass(frozen=True)
class Target:
    name: str
    """Its name in the probes (``LinearProbe.label_name``) and in location_probes.json's keys."""
    display_name: str
    """How the viewer names the positive class: ``P(<display_name>)``, ``+ = predicts <display_name>``."""
    binary: bool
    """A class label (logistic probes, AUROC) rather than a continuous target (ridge probes, Spearman)."""
    values: Callable[[pd.DataFrame, float], np.ndarray]
    """(runs with correct and semantic_entropy, high_se_threshold) -> the target of each run, shape (n,)."""


TARGETS = {target.name: target for target in (
    Target("correct", "correct", True, lambda runs, threshold: runs["correct"].to_numpy(bool)),
    Target("high_se", "high SE", True, lambda runs, threshold: runs["semantic_entropy"].to_numpy(float) > threshold),
    Target("semantic_entropy", "semantic entropy", False,
           lambda runs, threshold: runs["semantic_entropy"].to_numpy(float)),
)}

LABELS: dict[str, Callable[[pd.DataFrame, float], np.ndarray]] = {
    "incorrect": lambda runs, threshold: ~TARGETS["correct"].values(runs, threshold),
    "high_se": TARGETS["high_se"].values,
}
"""Each ``Label`` as a function of (runs, high_se_threshold) -> (n,) bool: the positive class a score is tested on."""


# ---- probes: the fitted models scores read (artifacts/probes/<file>) ----------------------------------------------
@dataclass(frozen=True)
class Probe:
    name: str
    """Short name: selection.json and evaluate.json settings key ``<name>_probe``, the ``probe`` column of the
    per-layer tables, the analysis columns ``<name>_probe_prob`` / ``_margin``."""
    target: str
    """The key of TARGETS it is fitted to predict."""
    file: str
    """Its file stem in ``paths.probes``: ``<file>.json`` metadata + ``<file>.npz`` weights (probe_store)."""
    range_of: str | None = None
    """Layer-range probes: the single-layer probe at whose position the best contiguous range is searched."""
    feature: str | None = None
    """Probes of a run column instead of hidden states (the entropy baseline): that column."""


ACCURACY = Probe("accuracy", "correct", "accuracy_probe")
SE = Probe("se", "high_se", "se_probe")
SE_REGRESSION = Probe("se_regression", "semantic_entropy", "se_regression_probe")
ACCURACY_RANGE = Probe("accuracy_range", "correct", "accuracy_range_probe", range_of="accuracy")
SE_RANGE = Probe("se_range", "high_se", "se_range_probe", range_of="se")
ENTROPY_BASELINE = Probe("entropy_baseline", "correct", "entropy_baseline", feature="mean_token_entropy")


# ---- scores ----------------------------------------------------------------------------------------------------
class ScoreInputs(Protocol):
    """What a score function reads (``stages.lib.evaluation.scoring.ScoreInputs`` implements it)."""

    def column(self, name: str) -> np.ndarray:
        """A float column of the runs, shape (n,)."""

    def decision(self, probe: str) -> np.ndarray:
        """The hidden-state probe's decision function (log-odds; the prediction for ridge) at its location, (n,)."""

    def feature_proba(self, probe: str) -> np.ndarray:
        """A feature probe's P(positive) from its run column, (n,)."""

    def values(self, name: str) -> pd.Series:
        """A run column as loaded (token lists, nullable indices), n rows."""


@dataclass(frozen=True)
class Score:
    name: str
    """Key in evaluate.json's splits, stability.json, the ``score`` column of the plot tables."""
    label: Label
    """What a high value flags; evaluate tests the score against it."""
    kind: Kind
    display_name: str
    """How the viewer names it."""
    description: str
    """How it is computed, one line (evaluate.json ``settings``)."""
    compute: Callable[[ScoreInputs], np.ndarray]
    """ScoreInputs -> the score of each run, shape (n,)."""
    probe: Probe | None = None
    """The fitted probe it reads, if any."""
    p_correct: Callable[[ScoreInputs], np.ndarray] | None = None
    """Calibrated scores: ScoreInputs -> P(correct) of each run (evaluate measures its ECE, Brier and reliability)."""
    orientation: Literal["higher", "lower"] = "higher"
    """Which end of ``compute``'s values flags ``label``; evaluate negates a ``lower`` score so that every score
    it reports reads higher = more likely ``label``."""
    stability: bool = True
    """Reported by the stability stage (which refits the probes on each seed's split but searches no layer ranges)."""
    headline: bool = False
    """Among the AUROCs the viewer's Experiments tab compares across commits."""
    per_run: bool = False
    """Its probe's P(positive) and margin per run go in the analysis table, and the viewer offers the probe."""
    compared_with: tuple[str, ...] = ()
    """Entries it is compared with: evaluate reports AUROC(this) - AUROC(other) with a paired CI for each
    (``PAIRED_COMPARISONS``)."""

    @property
    def calibrated(self) -> bool:
        return self.p_correct is not None

    @property
    def p_correct_column(self) -> str:
        """Column of ``evaluation.score_runs`` holding P(correct) (calibrated scores only)."""
        return f"{self.name}_p_correct"


def _expit(values: np.ndarray) -> np.ndarray:
    from scipy.special import expit  # here, not at import: the viewer iterates the registry without scipy

    return expit(values)


def _p_positive(probe: Probe) -> Callable[[ScoreInputs], np.ndarray]:
    """P(the probe's positive class): P(correct) for an accuracy probe, P(high SE) for an SE probe."""
    return lambda inputs: _expit(inputs.decision(probe.name))


def _one_minus_p_correct(probe: Probe) -> Callable[[ScoreInputs], np.ndarray]:
    return lambda inputs: 1 - _expit(inputs.decision(probe.name))


def _column(name: str) -> Callable[[ScoreInputs], np.ndarray]:
    return lambda inputs: inputs.column(name)


def negative_sequence_loglik(inputs: ScoreInputs) -> np.ndarray:
    """-log p(s): the raw sum over the run's tokens, so it grows with the run's length."""
    return -inputs.column("sequence_loglik")


def length_normalised_negative_loglik(inputs: ScoreInputs) -> np.ndarray:
    return baselines.length_normalised_negative_loglik(inputs.column("sequence_loglik"), inputs.column("n_generated"))


def think_length(inputs: ScoreInputs) -> np.ndarray:
    return baselines.think_length(inputs.values("think_start_index"), inputs.values("think_end_index"),
                                  inputs.column("n_generated"))


def negative_min_answer_logprob(inputs: ScoreInputs) -> np.ndarray:
    return baselines.negative_min_answer_logprob(inputs.values("token_logprobs").tolist(),
                                                 inputs.values("think_end_index"))


def _token_confidence(aggregate: Callable[[list], np.ndarray]) -> Callable[[ScoreInputs], np.ndarray]:
    """A DeepConf confidence of each run from its per-token top-k log-prob means (higher = more confident)."""
    return lambda inputs: aggregate(inputs.values("token_topk_logprob_mean").tolist())


def entropy_baseline(inputs: ScoreInputs) -> np.ndarray:
    return 1 - inputs.feature_proba(ENTROPY_BASELINE.name)


def se_regression(inputs: ScoreInputs) -> np.ndarray:
    return inputs.decision(SE_REGRESSION.name)


_NEW_SCORE_REFERENCES = ("semantic_entropy", "accuracy_probe")
"""What a newly added score is compared with: semantic entropy and the accuracy probe (``Score.compared_with``)."""

SCORES: tuple[Score, ...] = (
    Score("accuracy_probe", "incorrect", "hidden_state_probe", "accuracy probe",
          "1 - P(correct) from the accuracy probe", _one_minus_p_correct(ACCURACY), probe=ACCURACY,
          p_correct=_p_positive(ACCURACY), headline=True, per_run=True),
    Score("se_probe", "incorrect", "hidden_state_probe", "SE probe",
          "P(high semantic entropy) from the SE probe", _p_positive(SE), probe=SE, headline=True, per_run=True),
    Score("semantic_entropy", "incorrect", "entropy", "semantic entropy",
          "discrete semantic entropy of the run's question", _column("semantic_entropy"), headline=True),
    Score("semantic_entropy_weighted", "incorrect", "entropy", "likelihood-weighted SE",
          "likelihood-weighted semantic entropy of the run's question", _column("semantic_entropy_weighted"),
          headline=True),
    Score("naive_entropy", "incorrect", "entropy", "naive entropy",
          "naive (length-normalised) predictive entropy of the run's question", _column("naive_entropy"),
          headline=True),
    Score("mean_token_entropy", "incorrect", "entropy", "mean token entropy",
          "mean token entropy over the run's think span", _column("mean_token_entropy")),
    Score("entropy_baseline", "incorrect", "baseline", "entropy baseline",
          "1 - P(correct) from logistic regression on mean_token_entropy", entropy_baseline, probe=ENTROPY_BASELINE),
    Score("negative_sequence_loglik", "incorrect", "baseline", "negative sequence log-likelihood",
          "-sequence_loglik of the run: the raw sum over its tokens (grows with length)", negative_sequence_loglik,
          headline=True),
    Score("length_normalised_negative_loglik", "incorrect", "baseline", "length-normalised NLL",
          "-sequence_loglik / n_generated: the run's mean token surprisal (nats)", length_normalised_negative_loglik),
    Score("think_length", "incorrect", "baseline", "think length",
          "tokens inside the run's think span (all after <think> when it never closed)", think_length),
    Score("negative_min_answer_logprob", "incorrect", "baseline", "lowest answer-token probability",
          "-log of the lowest token probability after </think> (the whole run when there is none)",
          negative_min_answer_logprob),
    Score("num_semantic_sets", "incorrect", "graph", "number of semantic sets",
          "connected components of the question's answer-equivalence graph (lm-polygraph NumSemSets)",
          _column("num_semantic_sets")),
    Score("eigv", "incorrect", "graph", "EigV",
          "sum over the graph Laplacian's eigenvalues of max(0, 1 - lambda) (lm-polygraph EigValLaplacian)",
          _column("eigv")),
    Score("degree", "incorrect", "graph", "degree (Deg)",
          "1 - mean of the answer-equivalence graph's adjacency (lm-polygraph DegMat)", _column("degree")),
    Score("eccentricity", "incorrect", "graph", "eccentricity (Ecc)",
          "spread of the graph's spectral embedding, eigenvalues < 0.9 (lm-polygraph Eccentricity)",
          _column("eccentricity")),
    Score("kernel_language_entropy", "incorrect", "graph", "kernel language entropy (KLE)",
          "von Neumann entropy of the heat kernel exp(-0.3 L) of the question's answer-equivalence graph "
          "(Nikitin et al. 2024)", _column("kernel_language_entropy"), compared_with=_NEW_SCORE_REFERENCES),
    Score("deepconf_lowest_group", "incorrect", "baseline", "DeepConf lowest group confidence",
          "lowest sliding-window mean of the token confidence -mean(top-20 log-probs) over the run (Fu et al. "
          "2025; window min(2048, n/8) tokens)", _token_confidence(baselines.lowest_group_confidence),
          orientation="lower", compared_with=_NEW_SCORE_REFERENCES),
    Score("deepconf_bottom_10", "incorrect", "baseline", "DeepConf bottom-10% group confidence",
          "mean of the lowest 10% of the run's sliding-window token confidences (Fu et al. 2025)",
          _token_confidence(baselines.bottom_group_confidence), orientation="lower",
          compared_with=_NEW_SCORE_REFERENCES),
    Score("deepconf_tail", "incorrect", "baseline", "DeepConf tail confidence",
          "mean token confidence over the run's last min(2048, n/8) tokens (Fu et al. 2025)",
          _token_confidence(baselines.tail_confidence), orientation="lower", compared_with=_NEW_SCORE_REFERENCES),
    Score("se_regression_probe", "incorrect", "hidden_state_probe", "SE regression probe",
          "semantic entropy predicted by the ridge SE probe", se_regression, probe=SE_REGRESSION),
    Score("accuracy_range_probe", "incorrect", "range_probe", "accuracy range probe",
          "1 - P(correct) from the accuracy probe on its best layer range", _one_minus_p_correct(ACCURACY_RANGE),
          probe=ACCURACY_RANGE, p_correct=_p_positive(ACCURACY_RANGE), stability=False),
    Score("se_range_probe", "incorrect", "range_probe", "SE range probe",
          "P(high semantic entropy) from the SE probe on its best layer range", _p_positive(SE_RANGE),
          probe=SE_RANGE, stability=False),
    Score("se_probe_high_se", "high_se", "hidden_state_probe", "SE probe (high SE)",
          "P(high semantic entropy) from the SE probe, for the high_se label", _p_positive(SE), probe=SE,
          stability=False),
)

BY_NAME = {score.name: score for score in SCORES}


# ---- paired comparisons: AUROC(a) - AUROC(b) on the same runs, with a paired question-level bootstrap ------------
_PROBE_SCORES = ("accuracy_probe", "se_probe", "se_regression_probe", "accuracy_range_probe", "se_range_probe")
_ENTROPY_BASELINES = ("semantic_entropy", "semantic_entropy_weighted", "naive_entropy", "negative_sequence_loglik",
                      "length_normalised_negative_loglik")
_NEW_BASELINES = ("length_normalised_negative_loglik", "think_length", "negative_min_answer_logprob",
                  "num_semantic_sets", "eigv", "degree", "eccentricity")

PAIRED_COMPARISONS: tuple[tuple[str, str], ...] = (
    *((probe_score, baseline) for probe_score in _PROBE_SCORES for baseline in _ENTROPY_BASELINES),
    ("accuracy_probe", "se_probe"),
    *(("accuracy_probe", baseline) for baseline in _NEW_BASELINES if baseline not in _ENTROPY_BASELINES),
    *((score.name, other) for score in SCORES for other in score.compared_with),
)
"""(a, b) score pairs whose AUROC difference for flagging incorrect runs evaluate reports (evaluate.json
``paired_differences``): every probe against SE, weighted SE, naive entropy and both log-likelihoods; the accuracy
probe against the SE probe; the other baselines against the accuracy probe; every entry against those of its
``compared_with`` (the newer scores against SE and the accuracy probe). Both of a pair flag ``incorrect``."""


# ---- views of the table ----------------------------------------------------------------------------------------
def scores(label: Label | None = None, kind: Kind | None = None) -> tuple[Score, ...]:
    """The entries flagging ``label`` and / or of ``kind``, in registry order."""
    return tuple(score for score in SCORES if label in (None, score.label) and kind in (None, score.kind))


def calibrated() -> tuple[Score, ...]:
    """Entries with a P(correct): their calibration is measured."""
    return tuple(score for score in SCORES if score.calibrated)


def stable_scores() -> tuple[Score, ...]:
    """Entries the stability stage reports (AUROC for flagging incorrect runs, per seed)."""
    return tuple(score for score in SCORES if score.stability and score.label == "incorrect")


def probes() -> tuple[Probe, ...]:
    """Every fitted probe a score reads, once each, in registry order: the files of ``paths.probes``."""
    return tuple(dict.fromkeys(score.probe for score in SCORES if score.probe is not None))


def layer_probes() -> tuple[Probe, ...]:
    """Single-layer hidden-state probes: each fitted at every (position, layer), its location chosen on val."""
    return tuple(probe for probe in probes() if probe.range_of is None and probe.feature is None)


def range_probes() -> tuple[Probe, ...]:
    """Layer-range probes, each at its single-layer probe's position."""
    return tuple(probe for probe in probes() if probe.range_of is not None)


def located_probes() -> tuple[Probe, ...]:
    """Probes of hidden states (single layer or range): their locations are part of evaluate.json's settings."""
    return tuple(probe for probe in probes() if probe.feature is None)


def probe(name: str) -> Probe:
    """The probe called ``name`` (``accuracy``, ``se``, ...)."""
    for candidate in probes():
        if candidate.name == name:
            return candidate
    raise KeyError(f"no probe `{name}` in the registry; probes: {[p.name for p in probes()]}")


def per_run_probes() -> tuple[tuple[Score, Probe], ...]:
    """(entry, probe) of the entries whose probe has per-run columns in the analysis table (the viewer's probes)."""
    return tuple((score, score.probe) for score in SCORES if score.per_run and score.probe is not None)


def binary_targets() -> tuple[str, ...]:
    """Targets that are class labels: each needs both classes in train and val."""
    return tuple(name for name, target in TARGETS.items() if target.binary)


ANALYSIS = analysis_table([(probe.name, score.display_name, TARGETS[probe.target].display_name)
                           for score, probe in per_run_probes()])
"""The analysis table (``schema.tables.analysis_table`` for the per-run probes): what analysis writes and the viewer
reads."""
