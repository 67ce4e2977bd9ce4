"""Evaluation: how well each uncertainty score flags incorrect runs, on the test and OOD splits.

Used by the stage ``python -m stages.evaluate`` (or ``dvc repro evaluate``).

Every score of the registry (``stages.lib.registry.SCORES``) is tested against its label: an INCORRECT run for all
but the SE probe's second entry, which is tested on its own target (high-SE questions, threshold from train); every
score is oriented so that higher = more likely its label. For each split and score: AUROC and AUPRC, each with a
percentile CI from resampling questions (``evaluate.bootstrap``, ``evaluate.confidence``; one set of resamples per
split, shared by every score) and a one-sided permutation p-value that permutes whole questions
(``evaluate.permutations``). A split with one class, or no runs (``data.ood_source: none``), gets null metrics and
a note. The pairs of ``registry.PAIRED_COMPARISONS`` get their AUROC difference with a paired CI and p on those same
resamples; the headline scores their AUROC per difficulty bucket (MATH level or chain length); every split its
answer-extraction counts.

Beyond AUROC/AUPRC each score of incorrect runs gets AURAC, AURC and PRR (selective prediction); each calibrated
score's P(correct) gets ECE, Brier and a reliability table; the ridge SE probe its Spearman with SE; and the probe
at each traced position (its layer chosen on val) its AUROC with CI against the share of the reasoning seen (early
warning).

Writes
- ``{paths.metrics}/evaluate.json`` (``schema.EvaluateReport``): ``{split: {score: {auroc, auroc_ci_low, ...,
  aurac, aurc, prr}}}`` plus ``paired_differences``, ``answer_extraction``, ``by_difficulty``, ``summary`` (counts,
  accuracy and mean probe confidence per split), ``calibration``, ``se_regression``, ``settings`` and
  ``early_warning``;
- ``{paths.plots}/auroc_by_difficulty.csv``: ``by_difficulty`` as a plot table;
- ``{paths.plots}/auroc_by_layer.csv``: AUROC of the probe train_probes fitted on train at every
  (position, layer) (``location_probes``), on val, test and ood;
- ``{paths.plots}/roc.csv``, ``risk_coverage.csv``: ROC and risk-coverage curves of every score on test and ood;
- ``{paths.plots}/reliability.csv``, ``early_warning.csv``: the reliability diagrams and the early-warning curve;
- ``{paths.metrics}/cost/evaluate.json``.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from stages.lib.questions import arithmetic
from stages.lib import registry
from stages.lib.questions.answers import LAST_NUMBER_FALLBACK, NO_ANSWER_FOUND, TRUNCATED_IN_THINK
from stages.lib.io.files import progress_bar
from stages.lib.evaluation.metrics import (
    auprc,
    auroc,
    bootstrap_ci,
    difference_from_resamples,
    exact_ties,
    interval_from_resamples,
    permutation_p_value,
    question_resamples,
    resampled_metric,
    roc_curve_table,
    single_class_reason,
)
from stages.lib.evaluation.selective import (
    aurac,
    aurc,
    brier_score,
    expected_calibration_error,
    prediction_rejection_ratio,
    reliability_table,
    risk_coverage_curve,
    spearman,
)
from stages.lib.params import EvaluateParams
from stages.lib.probes.linear import LinearProbe, probe_output
from stages.lib.probes.fitting import probe_features, score_location_probes
from stages.lib.schema.tables import (
    AUROC_BY_LAYER,
    DIFFICULTY,
    EARLY_WARNING,
    RELIABILITY,
    RISK_COVERAGE,
    ROC,
    prefix_fraction,
)
from stages.lib.schema.reports import (
    AnswerExtraction,
    CalibrationMetrics,
    EvaluateSettings,
    IncorrectMetrics,
    LabelMetrics,
    PairedDifferenceMetrics,
    ProbeLocation,
    RegressionMetrics,
    ScoreMetrics,
    Selection,
    SplitSummary,
)
from stages.lib.schema.machinery import empty_frame
from stages.lib.probes.selection import probe_labels

log = logging.getLogger(__name__)

EVALUATED_SPLITS = ("test", "ood")
# the summary's mean probe confidence, and the SE regression probe's own metrics
CONFIDENCE_SCORE = "accuracy_probe"
REGRESSION_SCORE = "se_regression_probe"


# ---- compute ---------------------------------------------------------------------------------------------
class ScoreInputs:
    """What the registry's score functions read for a set of runs (``registry.ScoreInputs``).

    Parameters
    ----------
    runs : (n runs) frame with hidden_row and the run / SE columns of ``dataset.load_dataset``
    hidden : (rows, positions, layers, hidden) float16 array the hidden_row values index
    probes : every probe of ``registry.probes()`` by name (train_probes writes them)
    """

    def __init__(self, runs: pd.DataFrame, hidden, positions, layers, probes: Mapping[str, LinearProbe]):
        self.runs, self.hidden, self.positions, self.layers, self.probes = runs, hidden, positions, layers, probes
        self._decisions: dict[str, np.ndarray] = {}

    def column(self, name: str) -> np.ndarray:
        return self.runs[name].to_numpy(float)

    def decision(self, probe: str) -> np.ndarray:
        """Computed once per probe: two scores (a score and its P(correct), or one probe on two labels) share it."""
        if probe not in self._decisions:
            fitted = self.probes[probe]
            features = probe_features(fitted, self.hidden, self.runs["hidden_row"].to_numpy(), self.positions,
                                      self.layers)
            self._decisions[probe] = probe_output(fitted, features)
        return self._decisions[probe]

    def feature_proba(self, probe: str) -> np.ndarray:
        fitted = self.probes[probe]
        return fitted.predict_proba(self.runs[[fitted.feature]].to_numpy(float))[:, 1]

    def values(self, name: str) -> pd.Series:
        return self.runs[name]


def score_runs(runs: pd.DataFrame, hidden, positions, layers, probes: Mapping[str, LinearProbe],
               entries: Sequence[registry.Score] | None = None) -> pd.DataFrame:
    """Every registry score (or those of ``entries``) for each run, higher = more likely its label, plus
    ``<name>_p_correct`` for the calibrated ones; one row per row of ``runs`` (see ``ScoreInputs`` for the rest).

    Each score's values that are equal up to floating-point rounding are made exactly equal (``metrics.exact_ties``),
    here where every score is produced, so every metric and paired difference downstream ranks them as ties."""
    entries = registry.SCORES if entries is None else entries
    inputs = ScoreInputs(runs, hidden, positions, layers, probes)
    columns = {}
    for entry in entries:
        values = entry.compute(inputs)
        columns[entry.name] = exact_ties(values if entry.orientation == "higher" else -values)
    for entry in entries:
        if entry.calibrated:
            columns[entry.p_correct_column] = entry.p_correct(inputs)
    return pd.DataFrame(columns, index=runs.index)


def metric_record(labels, scores, groups, label_name: str, settings: EvaluateParams, seed: list[int],
                  empty_note: str, resamples: Sequence[np.ndarray]) -> tuple[dict[str, Any], np.ndarray | None]:
    """AUROC and AUPRC of ``scores`` (n,) for ``labels`` (n,) bool, with CIs and p-values; nulls + note if undefined
    (the fields of ``schema.LabelMetrics``), and the AUROC on each resample (B,) for the paired differences (None
    when undefined).

    Both intervals come from ``resamples`` (``metrics.question_resamples`` of the split: the same draws for every
    score of the split). The p-values permute whole label vectors between questions of the same size
    (``permutation_p_value`` with ``groups``), seeded by ``seed``: valid although a question's runs are correlated.
    """
    labels = np.asarray(labels, dtype=bool)
    record: dict[str, Any] = {
        "label": label_name, "n_runs": int(len(labels)), "n_questions": int(len(np.unique(groups))),
        "n_positive": int(labels.sum()), "auroc": None, "auroc_ci_low": None, "auroc_ci_high": None,
        "auroc_p_value": None, "auprc": None, "auprc_ci_low": None, "auprc_ci_high": None, "auprc_p_value": None,
        "auprc_chance": float(labels.mean()) if len(labels) else None, "bootstrap_resamples_used": 0, "note": None,
    }
    reason = single_class_reason(labels, label_name)
    if reason is not None:
        record["note"] = empty_note if len(labels) == 0 else f"{reason}: metrics undefined"
        return record, None
    resampled_auroc = None
    for name, metric in (("auroc", auroc), ("auprc", auprc)):
        resampled = resampled_metric(labels, scores, list(resamples), metric)
        interval = interval_from_resamples(resampled, settings.confidence)
        record.update({
            name: metric(labels, scores),
            f"{name}_ci_low": interval.low,
            f"{name}_ci_high": interval.high,
            f"{name}_p_value": permutation_p_value(labels, scores, metric, settings.permutations,
                                                   np.random.default_rng(seed + [1]), groups=groups),
        })
        record["bootstrap_resamples_used"] = interval.n_used
        if name == "auroc":
            resampled_auroc = resampled
    if record["bootstrap_resamples_used"] < settings.bootstrap:
        record["note"] = (f"{settings.bootstrap - record['bootstrap_resamples_used']} of {settings.bootstrap} "
                          "bootstrap resamples had a single class and were skipped")
    return record, resampled_auroc


def split_metrics(runs: pd.DataFrame, scores: pd.DataFrame, high_se_threshold: float, split: str,
                  settings: EvaluateParams, seed: int
                  ) -> tuple[dict[str, ScoreMetrics], SplitSummary, list[PairedDifferenceMetrics]]:
    """Metrics of every registry score against its label on one split's runs, the split's summary (counts,
    accuracy, the accuracy probe's mean confidence) and the paired AUROC differences of
    ``registry.PAIRED_COMPARISONS``.

    Every interval and every paired difference of the split uses one set of question-level resamples
    (seed ``[seed, split index, 0]``), so a difference's CI is computed on exactly the resamples of its two
    scores' own intervals.

    Parameters
    ----------
    runs : the split's runs (question_id, correct, semantic_entropy)
    scores : output of ``score_runs`` for those runs
    high_se_threshold : the SE above which a question is high-SE (fitted on train)
    """
    empty_note = f"no runs in split `{split}` (e.g. data.ood_source is none)"
    incorrect = registry.LABELS["incorrect"](runs, high_se_threshold)
    groups = runs["question_id"].to_numpy()
    split_index = EVALUATED_SPLITS.index(split)  # part of each metric's seed: independent of the other splits
    resamples = (question_resamples(groups, len(runs), settings.bootstrap,
                                    np.random.default_rng([seed, split_index, 0])) if len(runs) else [])
    by_score: dict[str, ScoreMetrics] = {}
    resampled_aurocs: dict[str, np.ndarray | None] = {}
    for score_index, entry in enumerate(progress_bar(registry.SCORES, desc=f"evaluate {split}")):
        values = scores[entry.name].to_numpy(float)
        record, resampled_aurocs[entry.name] = metric_record(
            registry.LABELS[entry.label](runs, high_se_threshold), values, groups, entry.label, settings,
            [seed, split_index, score_index], empty_note, resamples)
        if entry.label == "incorrect":
            by_score[entry.name] = IncorrectMetrics(**record, **selective_metrics(~incorrect, values))
        else:
            by_score[entry.name] = LabelMetrics(**record)
        log.info("%s %s (%s): AUROC %s", split, entry.name, entry.label, _fmt(record["auroc"]))

    paired = []
    for first, second in registry.PAIRED_COMPARISONS:
        a, b = by_score[first], by_score[second]
        note = None
        if a.auroc is None or b.auroc is None:
            difference = difference_from_resamples(None, None, np.zeros(0), np.zeros(0), settings.confidence)
            note = a.note or b.note
        else:
            difference = difference_from_resamples(a.auroc, b.auroc, resampled_aurocs[first],
                                                   resampled_aurocs[second], settings.confidence)
            if difference.n_used < settings.bootstrap:
                note = (f"{settings.bootstrap - difference.n_used} of {settings.bootstrap} bootstrap resamples had a "
                        "single class and were skipped")
        paired.append(PairedDifferenceMetrics(
            a=first, b=second, split=split,
            label=f"{registry.BY_NAME[first].display_name} - {registry.BY_NAME[second].display_name}",
            difference=difference.difference, ci_low=difference.low, ci_high=difference.high,
            p_value=difference.p_value, bootstrap_resamples_used=difference.n_used, note=note))

    high_se = registry.LABELS["high_se"](runs, high_se_threshold)
    p_correct = scores[registry.BY_NAME[CONFIDENCE_SCORE].p_correct_column].to_numpy(float)
    summary = SplitSummary(
        n_runs=int(len(runs)), n_questions=int(runs["question_id"].nunique()),
        n_correct=int((~incorrect).sum()), n_incorrect=int(incorrect.sum()),
        accuracy=float((~incorrect).mean()) if len(runs) else None,
        n_high_se_questions=int(runs.loc[high_se, "question_id"].nunique()),
        mean_p_correct_on_correct=float(p_correct[~incorrect].mean()) if (~incorrect).any() else None,
        mean_p_correct_on_incorrect=float(p_correct[incorrect].mean()) if incorrect.any() else None,
        note=empty_note if len(runs) == 0 else single_class_reason(incorrect, "incorrect"),
    )
    return by_score, summary, paired


def answer_extraction(runs: pd.DataFrame) -> AnswerExtraction:
    """How one split's runs (truncated, answer_source) got their answers, counted."""
    source = runs["answer_source"]
    return AnswerExtraction(
        n_runs=int(len(runs)), n_truncated=int(runs["truncated"].astype(bool).sum()),
        n_truncated_in_think=int((source == TRUNCATED_IN_THINK).sum()),
        n_no_answer=int((source == NO_ANSWER_FOUND).sum()),
        n_last_number_fallback=int((source == LAST_NUMBER_FALLBACK).sum()))


def question_difficulty(questions: pd.DataFrame) -> tuple[str, pd.Series] | None:
    """Each question's difficulty bucket (question_id -> int) and its kind: MATH's ``level`` where the questions carry
    one (questions without a level are left out), else ``n_terms``, the number of operands, when every question is an
    arithmetic chain (the toy's task); None when neither applies (GSM8K, a plain JSONL file)."""
    if questions.empty:
        return None
    levels = questions.set_index("question_id")["level"]
    if levels.notna().any():
        return "level", levels.dropna().astype(np.int64)
    try:
        terms = [len(arithmetic.parse_chain(question)) for question in questions["question"]]
    except ValueError:
        return None
    return "n_terms", pd.Series(terms, index=questions["question_id"].to_numpy(), dtype=np.int64)


def difficulty_table(runs: pd.DataFrame, scores: pd.DataFrame, difficulty: tuple[str, pd.Series] | None, split: str,
                     settings: EvaluateParams, seed: int) -> pd.DataFrame:
    """DIFFICULTY.columns rows: per difficulty bucket of the split's runs, the accuracy and every headline score's
    AUROC for flagging incorrect runs with a question-bootstrap CI (null AUROC in a single-class bucket). No rows
    without a difficulty or runs."""
    columns = [c.name for c in DIFFICULTY.columns]
    if difficulty is None or runs.empty:
        return empty_frame(DIFFICULTY.columns)
    kind, by_question = difficulty
    bucket = runs["question_id"].map(by_question)
    headline = [entry for entry in registry.scores(label="incorrect") if entry.headline]
    rows = []
    for value in sorted(bucket.dropna().unique()):
        member = (bucket == value).to_numpy()
        incorrect = ~runs["correct"].to_numpy(bool)[member]
        groups = runs["question_id"].to_numpy()[member]
        resamples = question_resamples(groups, len(groups), settings.bootstrap,
                                       np.random.default_rng([seed, 11, EVALUATED_SPLITS.index(split), int(value)]))
        for entry in headline:
            values = scores[entry.name].to_numpy(float)[member]
            value_auroc = auroc(incorrect, values)
            interval = (interval_from_resamples(resampled_metric(incorrect, values, resamples, auroc),
                                                settings.confidence) if value_auroc is not None else None)
            rows.append({"split": split, "difficulty": kind, "value": int(value), "score": entry.name,
                         "n_runs": int(member.sum()), "n_questions": int(len(np.unique(groups))),
                         "accuracy": float(1 - incorrect.mean()), "auroc": value_auroc,
                         "auroc_ci_low": interval.low if interval else None,
                         "auroc_ci_high": interval.high if interval else None})
    if not rows:
        return empty_frame(DIFFICULTY.columns)
    # float even when every bucket is single-class (all AUROCs null)
    return pd.DataFrame.from_records(rows, columns=columns).astype(
        {"auroc": float, "auroc_ci_low": float, "auroc_ci_high": float})


def selective_metrics(correct, uncertainty) -> dict[str, float | None]:
    """Selective prediction with one score: AURAC (higher = better), AURC (lower = better) and PRR (1 = oracle,
    0 = random); None for an empty split, PRR None when every run is right or every run is wrong."""
    if len(correct) == 0:
        return {"aurac": None, "aurc": None, "prr": None}
    return {"aurac": aurac(correct, uncertainty), "aurc": aurc(correct, uncertainty),
            "prr": prediction_rejection_ratio(correct, uncertainty)}


def calibration(correct, scores: pd.DataFrame, split: str,
                n_bins: int) -> tuple[dict[str, CalibrationMetrics], pd.DataFrame]:
    """ECE and Brier score of each calibrated registry score's P(correct) on one split, and its reliability rows
    (RELIABILITY.columns); nulls and no rows for an empty split."""
    summary, frames = {}, []
    for entry in registry.calibrated():
        p_correct = scores[entry.p_correct_column].to_numpy(float)
        empty = len(p_correct) == 0
        summary[entry.name] = CalibrationMetrics(
            ece=None if empty else expected_calibration_error(correct, p_correct, n_bins),
            brier=None if empty else brier_score(correct, p_correct), n_bins=n_bins, n_runs=int(len(p_correct)))
        if len(p_correct):
            frames.append(reliability_table(correct, p_correct, n_bins).assign(probe=entry.name, split=split))
    columns = [c.name for c in RELIABILITY.columns]
    return summary, (pd.concat(frames, ignore_index=True)[columns] if frames else empty_frame(RELIABILITY.columns))


def regression_metrics(runs: pd.DataFrame, scores: pd.DataFrame) -> RegressionMetrics:
    """How well the ridge probe's predicted SE tracks the real SE: Spearman over runs, and over questions
    (each question's mean prediction against its SE, which all its runs share)."""
    predicted = scores[REGRESSION_SCORE].to_numpy(float)
    entropy = runs["semantic_entropy"].to_numpy(float)
    per_question = pd.DataFrame({"q": runs["question_id"].to_numpy(), "predicted": predicted, "se": entropy})
    per_question = per_question.groupby("q").mean()
    return RegressionMetrics(
        spearman_runs=spearman(entropy, predicted) if len(runs) else None,
        spearman_questions=spearman(per_question["se"], per_question["predicted"]) if len(runs) else None,
        n_runs=int(len(runs)), n_questions=int(len(per_question)))


def evaluate_settings(settings: EvaluateParams, selection: Selection,
                      probes: Mapping[str, LinearProbe]) -> EvaluateSettings:
    """evaluate.json's ``settings``: what every score is, the resampling settings, the high-SE threshold and where
    each hidden-state probe reads."""
    return EvaluateSettings(
        positive_class="incorrect run",
        scores={entry.name: entry.description for entry in registry.scores(label="incorrect")},
        other_labels={entry.name: entry.description for entry in registry.SCORES if entry.label != "incorrect"},
        bootstrap=settings.bootstrap, permutations=settings.permutations, confidence=settings.confidence,
        high_se_threshold=selection.high_se_threshold,
        high_se_threshold_method=selection.high_se_threshold_method,
        probes={f"{probe.name}_probe": ProbeLocation(position=probes[probe.name].position,
                                                     layer=probes[probe.name].layer,
                                                     layer_end=probes[probe.name].layer_end)
                for probe in registry.located_probes()},
        calibration_bins=settings.calibration_bins,
    )


def early_warning(selection: Selection, location_probes, datasets: Mapping[str, tuple[pd.DataFrame, Any]],
                  positions, layers, high_se_threshold: float, settings: EvaluateParams,
                  seed: int) -> pd.DataFrame:
    """EARLY_WARNING.columns rows: at each traced position, the probe at the layer chosen on val for that
    position (selection.json ``by_position``), scored for its own label on each split with a bootstrap CI.

    Only the probes of a class label (accuracy, se); ``fraction`` is the share of the reasoning seen at the position.
    """
    binary = set(registry.binary_targets())
    rows = []
    for choice_index, choice in enumerate(selection.by_position):
        label_name = registry.probe(choice.probe).target
        if label_name not in binary:
            continue
        probe = location_probes[(label_name, choice.position, choice.layer)]
        for split_index, (split, (runs, hidden)) in enumerate(datasets.items()):
            record = {"probe": choice.probe, "position": choice.position,
                      "fraction": prefix_fraction(choice.position), "layer": choice.layer, "split": split,
                      "auroc": None, "auroc_ci_low": None, "auroc_ci_high": None}
            labels = probe_labels(runs, high_se_threshold)[label_name]
            if single_class_reason(labels, label_name) is None:
                decision = probe.decision_function(probe_features(probe, hidden, runs["hidden_row"].to_numpy(),
                                                                  positions, layers))
                interval = bootstrap_ci(labels, decision, runs["question_id"].to_numpy(), auroc, settings.bootstrap,
                                        settings.confidence,
                                        np.random.default_rng([seed, 7, choice_index, split_index]))
                record.update(auroc=auroc(labels, decision), auroc_ci_low=interval.low, auroc_ci_high=interval.high)
            rows.append(record)
    # the schema's dtypes: a column of None (a single-class split) is then float NaN, not object
    return pd.DataFrame.from_records(rows, columns=[c.name for c in EARLY_WARNING.columns]).astype(
        empty_frame(EARLY_WARNING.columns).dtypes.to_dict())


def risk_coverage_table(correct, scores: pd.DataFrame, split: str) -> pd.DataFrame:
    """RISK_COVERAGE.columns rows for every registry score of incorrect runs on one split (none for an empty
    split)."""
    if len(correct) == 0:
        return empty_frame(RISK_COVERAGE.columns)
    frames = [risk_coverage_curve(correct, scores[entry.name].to_numpy(float)).assign(score=entry.name, split=split)
              for entry in registry.scores(label="incorrect")]
    return pd.concat(frames, ignore_index=True)[[c.name for c in RISK_COVERAGE.columns]]


def roc_table(labels, scores: pd.DataFrame, split: str) -> pd.DataFrame:
    """ROC.columns rows (score, split, fpr, tpr) for every registry score of incorrect runs; empty for a
    single-class split."""
    frames = [roc_curve_table(labels, scores[entry.name].to_numpy(float)).assign(score=entry.name, split=split)
              for entry in registry.scores(label="incorrect")]
    return pd.concat(frames, ignore_index=True)[[c.name for c in ROC.columns]]


def auroc_by_layer(location_probes, datasets: Mapping[str, tuple[pd.DataFrame, Any]], positions, layers,
                   high_se_threshold: float) -> pd.DataFrame:
    """AUROC_BY_LAYER.columns rows: each train-fitted (probe, position, layer) scored on each split.

    ``datasets`` maps split -> (its runs, the hidden array their hidden_row indexes); empty splits are skipped.
    Only the single-layer probes of a class label (accuracy: correct; SE: high_se), each for its training label.
    """
    probe_of_label = {probe.target: probe.name for probe in registry.layer_probes()}
    frames = []
    for split, (runs, hidden) in datasets.items():
        if len(runs) == 0:
            log.info("auroc_by_layer: split `%s` has no runs; no rows", split)
            continue
        labels = probe_labels(runs, high_se_threshold)
        table = score_location_probes(location_probes, hidden, runs["hidden_row"].to_numpy(), positions, layers,
                                      {name: labels[name] for name in registry.binary_targets()})
        frames.append(table.assign(probe=table["label"].map(probe_of_label), split=split, auroc=table["score"]))
    return pd.concat(frames, ignore_index=True)[[c.name for c in AUROC_BY_LAYER.columns]]


def concat_rows(frames: list[pd.DataFrame], columns) -> pd.DataFrame:
    """Concatenate the non-empty frames (empty ones would turn numeric columns into objects)."""
    frames = [frame for frame in frames if len(frame)]
    return pd.concat(frames, ignore_index=True) if frames else empty_frame(columns)


def _fmt(value) -> str:
    return "null" if value is None else f"{value:.3f}"
