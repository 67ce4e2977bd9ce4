"""Data for the viewer: cached loaders for one run's artifacts, and the one store every view follows.

The viewer reads only what the `evaluate`, `stability`, `cost_ratio` and `analysis` stages wrote (DESIGN.md),
found through the project's own ``params.yaml`` ``paths:``; it never recomputes the pipeline. Every loader takes
the project root as an argument (``viewer/app.py`` passes the checkout it lives in, tests pass a temporary
project), and no path comes from a URL, a widget or an environment variable.

``RunStore`` holds the filters and the frames derived from them (Panel's structure_data_store pattern):

    table     every run (ANALYSIS.columns + ``outcome``), shared read-only by all sessions
    filtered  the runs passing the sidebar filters            -> both plots, the count
    selected  the filtered runs inside the last box or lasso selection -> both plots' ring, the selection table
    question_runs  all K runs of the chosen question (unfiltered), for the question details
    run       the row (of ``table``) of the run drilled into: its probe scores per location and its tokens
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import panel as pn
import param
import yaml

from stages.lib import registry
from stages.lib.params import Paths
from stages.lib.registry import ANALYSIS
from stages.lib.schema.tables import (
    ANALYSIS_KEY,
    AUROC_BY_LAYER,
    EARLY_WARNING,
    LOCATION_SCORES_FILE,
    LOCATION_SCORES_META_FILE,
    RELIABILITY,
    RISK_COVERAGE,
    ROC,
    STABILITY_PLOT,
    TOKENS,
    LocationScoresMeta,
    validate_location_scores,
)
from stages.lib.schema.reports import (
    COST_RATIO_FILE,
    EVALUATE_FILE,
    STABILITY_FILE,
    CostRatio,
    EvaluateReport,
    IncorrectMetrics,
    StabilityReport,
    StabilitySpread,
)
from stages.lib.schema.machinery import Contract, SchemaError, validate_frame

log = logging.getLogger(__name__)

HOW_TO_GET_A_RUN = "Run `dvc repro` to compute it, or `dvc pull` to fetch a shared run."

# What the sidebar offers, as {label shown: value stored}.
DATASET_CHOICES = {"in-distribution": "id", "OOD": "ood"}
SPLIT_ORDER = ("train", "val", "test", "ood")
CORRECTNESS_CHOICES = {"all": "all", "correct": "correct", "incorrect": "incorrect"}
# The registry's per-run probes (their margin and P columns of the analysis table) and its entropies (columns of the
# same name).
PROBE_CHOICES = {score.display_name: probe.name for score, probe in registry.per_run_probes()}
ENTROPY_CHOICES = {score.display_name: score.name for score in registry.scores(kind="entropy")}
OUTCOMES = ("correct", "incorrect")

# The CSVs of `paths.plots` the viewer reads (file name -> schema columns, both from stages/lib/schema/); each is
# drawn by an entry of viewer.views.results.RESULT_PLOTS.
PLOT_TABLES = {AUROC_BY_LAYER.file: AUROC_BY_LAYER.columns, ROC.file: ROC.columns,
               EARLY_WARNING.file: EARLY_WARNING.columns, RISK_COVERAGE.file: RISK_COVERAGE.columns,
               RELIABILITY.file: RELIABILITY.columns, STABILITY_PLOT.file: STABILITY_PLOT.columns}
# The JSON files of `paths.metrics` the viewer reads (evaluate's, stability's and cost_ratio's), each read through its
# schema model; file name -> (model, the stage that writes it).
METRICS_FILES: dict[str, tuple[type[Contract], str]] = {EVALUATE_FILE: (EvaluateReport, "evaluate"),
                                                         STABILITY_FILE: (StabilityReport, "stability"),
                                                         COST_RATIO_FILE: (CostRatio, "cost_ratio")}
# Selective-prediction columns of the metrics table (evaluate.json key -> label), and what their values mean.
SELECTIVE_METRICS = {"aurac": "AURAC", "aurc": "AURC", "prr": "PRR"}
SELECTIVE_LEGEND = ("Selective prediction (answer only the runs a score finds least uncertain): AURAC higher is "
                    "better, AURC lower is better, PRR 1 = oracle, 0 = random.")

# Headline columns of the Experiments view: (split, score) AUROCs from evaluate.json.
HEADLINE_SCORES = tuple(score.name for score in registry.SCORES if score.headline)
EXPERIMENT_TIMEOUT_S = 30.0


class MissingArtifact(FileNotFoundError):
    """An artifact the viewer needs is absent or unreadable; the message says what to run."""


# ---- where the run lives ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunFiles:
    """The artifact files of one project checkout, resolved from its params.yaml ``paths:``."""

    root: Path
    analysis: Path
    metrics: Path
    plots: Path  # the directory of evaluate's CSVs (PLOT_TABLES)

    def analysis_file(self, name: str) -> Path:
        """A file the analysis stage writes beside analysis.parquet (location scores, tokens)."""
        return self.analysis.parent / name

    @property
    def metrics_relative(self) -> str:
        """evaluate.json relative to the root, as `dvc exp show --json` keys it."""
        return self.metrics.relative_to(self.root).as_posix()

    def metrics_file(self, name: str) -> Path:
        """The JSON ``name`` (a key of METRICS_FILES) in the metrics directory, beside evaluate.json."""
        if name not in METRICS_FILES:
            raise KeyError(f"{name!r} is not one of the viewer's metrics files {list(METRICS_FILES)}")
        return self.metrics.parent / name

    def plot_table(self, name: str) -> Path:
        """The CSV ``name`` (a key of PLOT_TABLES) in the plots directory."""
        if name not in PLOT_TABLES:
            raise KeyError(f"{name!r} is not one of the viewer's plot tables {sorted(PLOT_TABLES)}")
        return self.plots / name


def run_files(root: str | Path) -> RunFiles:
    """Resolve the viewer's input files from ``<root>/params.yaml``.

    Paths must stay inside ``root``: a params.yaml pointing elsewhere is refused rather than followed.
    """
    root = Path(root).resolve()
    params_path = root / "params.yaml"
    try:
        raw = yaml.safe_load(params_path.read_text())
        paths = Paths(**raw["paths"])
    except FileNotFoundError:
        raise MissingArtifact(f"{params_path} not found: the viewer needs the project's params.yaml.") from None
    except (TypeError, KeyError, ValueError, yaml.YAMLError) as error:
        raise MissingArtifact(f"{params_path}: cannot read `paths:` ({error}).") from None

    def inside(relative: str, name: str) -> Path:
        path = (root / relative / name).resolve()
        if not path.is_relative_to(root):
            raise MissingArtifact(f"{params_path}: `{relative}` points outside the project; the viewer reads only "
                                  "the project's own artifacts.")
        return path

    return RunFiles(root=root, analysis=inside(paths.analysis, ANALYSIS.file),
                    metrics=inside(paths.metrics, EVALUATE_FILE), plots=inside(paths.plots, ""))


def _modified(path: Path) -> int:
    """mtime in ns, the cache key that makes a re-run pipeline show up without restarting the server."""
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        raise MissingArtifact(f"No `{path.name}` at {path}. {HOW_TO_GET_A_RUN}") from None


# ---- cached loaders (one copy per server process, shared read-only by every session) -----------------------


@pn.cache(max_items=4)
def _read_analysis(path: str, modified_ns: int) -> pd.DataFrame:
    try:
        frame = pd.read_parquet(path)
    except Exception as error:  # noqa: BLE001 - a half-synced or foreign file: say so instead of a traceback
        raise MissingArtifact(f"Cannot read {path} ({error}). {HOW_TO_GET_A_RUN}") from None
    try:
        validate_frame(frame, ANALYSIS.columns, path, key=ANALYSIS_KEY)
    except SchemaError as error:
        raise MissingArtifact(f"{error}. Rerun `dvc repro analysis` to rebuild it.") from None
    frame = frame.reset_index(drop=True)
    # Categorical columns: filters compare small integer codes, and the raster counts by `outcome`'s codes.
    for column in ("dataset", "split"):
        frame[column] = frame[column].astype("category")
    frame["outcome"] = pd.Categorical(np.where(frame["correct"], "correct", "incorrect"), categories=OUTCOMES)
    log.info("read %s: %d runs, %d questions", path, len(frame), frame.groupby(["dataset", "question_id"]).ngroups)
    return frame


def load_analysis(root: str | Path) -> pd.DataFrame:
    """Every run of the project at ``root`` (ANALYSIS.columns plus ``outcome``), cached until the file changes.

    The frame is shared by all sessions: treat it as read-only.
    """
    path = run_files(root).analysis
    return _read_analysis(str(path), _modified(path))


@pn.cache(max_items=2)
def _read_location_scores(path: str, meta_path: str, modified_ns: int) -> tuple[np.ndarray, LocationScoresMeta]:
    try:
        meta = LocationScoresMeta.read(meta_path, writer="analysis")
        # memory-mapped: a drill-down reads one run's (probes, positions, layers) block, never the whole array
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        validate_location_scores(array, meta, path)
    except SchemaError as error:
        raise MissingArtifact(f"{error}. Rerun `dvc repro analysis` to rebuild it.") from None
    except (OSError, ValueError) as error:
        raise MissingArtifact(f"Cannot read {path} ({error}). {HOW_TO_GET_A_RUN}") from None
    return array, meta


@dataclass(frozen=True)
class LocationScores:
    """One run's probe scores at every traced location: ``scores`` (probes, positions, layers) with its axes."""

    scores: np.ndarray
    meta: LocationScoresMeta


def load_location_scores(root: str | Path, row: int, n_runs: int) -> LocationScores:
    """Row ``row`` of location_scores.npy (aligned with analysis.parquet, which has ``n_runs`` rows)."""
    files = run_files(root)
    path, meta_path = files.analysis_file(LOCATION_SCORES_FILE), files.analysis_file(LOCATION_SCORES_META_FILE)
    _modified(meta_path)
    array, meta = _read_location_scores(str(path), str(meta_path), _modified(path))
    if meta.n_runs != n_runs:
        raise MissingArtifact(f"{path}: {meta.n_runs} runs but analysis.parquet has {n_runs}; rerun `dvc repro "
                              "analysis`.")
    return LocationScores(np.asarray(array[row], dtype=np.float32), meta)


@pn.cache(max_items=32)
def _read_question_tokens(path: str, modified_ns: int, dataset: str, question_id: str) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        # Row-group statistics skip every group without this question: one question's rows are read, not the file.
        wanted = [("dataset", "==", dataset), ("question_id", "==", question_id)]
        frame = pq.read_table(path, filters=wanted).to_pandas()
        return validate_frame(frame, TOKENS.columns, path)
    except SchemaError as error:
        raise MissingArtifact(f"{error}. Rerun `dvc repro analysis` to rebuild it.") from None
    except (OSError, ValueError) as error:
        raise MissingArtifact(f"Cannot read {path} ({error}). {HOW_TO_GET_A_RUN}") from None


def load_question_tokens(root: str | Path, dataset: str, question_id: str) -> pd.DataFrame:
    """tokens.parquet's rows of one question (TOKENS.columns): each run's token pieces and their entropies."""
    path = run_files(root).analysis_file(TOKENS.file)
    return _read_question_tokens(str(path), _modified(path), str(dataset), str(question_id))


@pn.cache(max_items=8)
def _read_metrics(path: str, modified_ns: int, name: str) -> Contract:
    model, stage = METRICS_FILES[name]
    try:
        content = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise MissingArtifact(f"Cannot read {path} ({error}). {HOW_TO_GET_A_RUN}") from None
    try:
        return model.parse(content, path)
    except SchemaError as error:
        raise MissingArtifact(f"{error}. Rerun `dvc repro {stage}` to rebuild it.") from None


def load_metrics(root: str | Path, name: str = EVALUATE_FILE) -> Contract:
    """A JSON file of the metrics directory (a key of METRICS_FILES) as its schema model, cached until the file
    changes; a file that does not match its model is a MissingArtifact naming the field.

    ``evaluate.json`` (the default, ``EvaluateReport``): per split (test, ood), per score, AUROC/AUPRC with CIs and
    p-values, the selective-prediction areas, plus ``summary``, ``calibration``, ``se_regression``, ``early_warning``
    and ``settings``; ``stability.json`` (``StabilityReport``): per split and score the AUROC's mean, std, min and
    max over seeds; ``cost_ratio.json`` (``CostRatio``): SE's cost per question against one probe evaluation.
    """
    path = run_files(root).metrics_file(name)
    return _read_metrics(str(path), _modified(path), name)


@pn.cache(max_items=16)
def _read_plot_table(path: str, modified_ns: int, name: str) -> pd.DataFrame:
    try:
        return validate_frame(pd.read_csv(path), PLOT_TABLES[name], path)
    except (OSError, ValueError) as error:
        raise MissingArtifact(f"Cannot read {path} ({error}). {HOW_TO_GET_A_RUN}") from None


def load_plot_table(root: str | Path, name: str) -> pd.DataFrame:
    """The CSV ``name`` of the plots directory (a key of PLOT_TABLES), checked against its schema columns and
    cached until the file changes. E.g. ``auroc_by_layer.csv``: probe, position, layer, split, auroc;
    ``roc.csv``: score, split, fpr, tpr."""
    path = run_files(root).plot_table(name)
    return _read_plot_table(str(path), _modified(path), name)


# ---- derived tables for the Results view ------------------------------------------------------------------


def _interval(value: Any, low: Any, high: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if low is None or high is None:
        return f"{value:.3f}"
    return f"{value:.3f} ({low:.3f}-{high:.3f})"


def metrics_table(metrics: EvaluateReport) -> pd.DataFrame:
    """One row per score: AUROC and AUPRC with their CIs, AUPRC chance and p-values, and for scores of incorrect
    runs AURAC, AURC and PRR (SELECTIVE_METRICS), for test and OOD.

    Scores keep evaluate.json's order; higher always means "this run is more likely" its label (incorrect, or
    high SE for the SE probe on its own label).
    """
    splits = [split for split in ("test", "ood") if split in metrics.splits]
    scores = list(dict.fromkeys(score for split in splits for score in metrics.splits[split]))
    descriptions = {**metrics.settings.other_labels, **metrics.settings.scores}
    rows = []
    for score in scores:
        row = {"score": score, "meaning": descriptions.get(score, "")}
        for split in splits:
            entry = metrics.splits[split].get(score)
            label = _split_label(split)
            if entry is None:  # not scored on this split
                row.update({f"{label} {column}": "n/a" for column in ("AUROC (CI)", "AUPRC (CI)", "AUPRC chance",
                                                                       "AUROC p", *SELECTIVE_METRICS.values())})
                continue
            row[f"{label} AUROC (CI)"] = _interval(entry.auroc, entry.auroc_ci_low, entry.auroc_ci_high)
            row[f"{label} AUPRC (CI)"] = _interval(entry.auprc, entry.auprc_ci_low, entry.auprc_ci_high)
            row[f"{label} AUPRC chance"] = _number(entry.auprc_chance)
            row[f"{label} AUROC p"] = _number(entry.auroc_p_value, 4)
            for key, name in SELECTIVE_METRICS.items():
                row[f"{label} {name}"] = _number(getattr(entry, key)) if isinstance(entry, IncorrectMetrics) else "n/a"
        rows.append(row)
    return pd.DataFrame(rows)


def score_label(metrics: EvaluateReport, score: str) -> str:
    """The label a score is evaluated against (``incorrect`` for most; e.g. ``high_se`` for the SE probe)."""
    for split in metrics.splits.values():
        if score in split:
            return split[score].label
    return ""


def paired_differences(metrics: EvaluateReport) -> dict[tuple[str, str, str], tuple[float, float, float]]:
    """evaluate.json's paired AUROC differences (``schema.PairedDifferenceMetrics``, paired question-level
    bootstrap): {(split, score, reference): (difference, ci_low, ci_high)}, in both orders (b - a is the negated,
    flipped interval). Undefined differences (a single-class split) are left out."""
    found: dict[tuple[str, str, str], tuple[float, float, float]] = {}
    for entry in metrics.paired_differences:
        if entry.difference is None or entry.ci_low is None or entry.ci_high is None:
            continue
        found[(entry.split, entry.a, entry.b)] = (entry.difference, entry.ci_low, entry.ci_high)
        found[(entry.split, entry.b, entry.a)] = (-entry.difference, -entry.ci_high, -entry.ci_low)
    return found


def ranked_scores(metrics: EvaluateReport, reference: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The metrics table split in two and ranked: (scores of incorrect runs, best test AUROC first, with each one's
    AUROC difference from ``reference`` per split; scores of other labels, e.g. the SE probe on high SE, which
    compete with nothing here).

    The difference columns (``<split> ΔAUROC vs <reference>``) hold the paired bootstrap difference and CI where
    evaluate.json has ``paired_differences``, else the plain difference of the two AUROCs marked "(no CI)".
    """
    table = metrics_table(metrics)
    if table.empty:
        return table, table
    labels = table["score"].map(lambda score: score_label(metrics, score))
    incorrect, other = table[labels == "incorrect"].copy(), table[labels != "incorrect"].reset_index(drop=True)
    splits = [split for split in ("test", "ood") if split in metrics.splits]
    def auroc(split, score):
        entry = metrics.splits[split].get(score)
        return None if entry is None or entry.auroc is None else float(entry.auroc)
    order = sorted(incorrect["score"], key=lambda score: -(auroc(splits[0], score) or -1.0) if splits else 0.0)
    incorrect = incorrect.set_index("score").loc[order].reset_index()
    if reference is None or reference not in set(incorrect["score"]):
        reference = incorrect["score"].iloc[0]
    paired = paired_differences(metrics)
    for split in splits:
        column = f"{_split_label(split)} ΔAUROC vs {reference}"
        values = []
        for score in incorrect["score"]:
            if score == reference:
                values.append("reference")
            elif (split, score, reference) in paired:
                difference, low, high = paired[(split, score, reference)]
                values.append(f"{difference:+.3f} ({low:+.3f} to {high:+.3f})")
            elif auroc(split, score) is not None and auroc(split, reference) is not None:
                values.append(f"{auroc(split, score) - auroc(split, reference):+.3f} (no CI)")
            else:
                values.append("n/a")
        incorrect.insert(incorrect.columns.get_loc(f"{_split_label(split)} AUROC (CI)") + 1, column, values)
    meaning = incorrect.pop("meaning")
    incorrect["meaning"] = meaning  # the long text last, so the numbers fit at 1280 px
    return incorrect, other


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _split_label(split: str) -> str:
    return "OOD" if split == "ood" else split


def calibration_table(metrics: EvaluateReport) -> pd.DataFrame:
    """evaluate.json's ``calibration``: one row per (split, calibrated score) with ECE and Brier score (lower is
    better)."""
    rows = [{"split": _split_label(split), "probe": probe, "ECE": _number(entry.ece), "Brier": _number(entry.brier),
             "bins": entry.n_bins, "runs": entry.n_runs}
            for split, by_probe in metrics.calibration.items() for probe, entry in by_probe.items()]
    return pd.DataFrame(rows, columns=["split", "probe", "ECE", "Brier", "bins", "runs"])


def se_regression_table(metrics: EvaluateReport) -> pd.DataFrame:
    """evaluate.json's ``se_regression``: per split, the Spearman correlation of the ridge probe's predicted SE
    with the true SE over runs and over questions."""
    rows = [{"split": _split_label(split), "Spearman (runs)": _number(entry.spearman_runs),
             "Spearman (questions)": _number(entry.spearman_questions), "runs": entry.n_runs,
             "questions": entry.n_questions}
            for split, entry in metrics.se_regression.items()]
    return pd.DataFrame(rows, columns=["split", "Spearman (runs)", "Spearman (questions)", "runs", "questions"])


ANSWER_EXTRACTION_LABELS = {"n_runs": "runs", "n_truncated": "truncated (token cap)",
                            "n_truncated_in_think": "stopped inside the think span (no answer, wrong)",
                            "n_no_answer": "no parseable answer", "n_last_number_fallback": "last-number fallback"}


def answer_extraction_table(metrics: EvaluateReport) -> pd.DataFrame:
    """evaluate.json's ``answer_extraction``: per split, how many runs were truncated, stopped in the think span,
    had no parseable answer or were answered by the last-number fallback (possible label noise)."""
    rows = [{"split": _split_label(split), **{label: getattr(entry, key)
                                              for key, label in ANSWER_EXTRACTION_LABELS.items()}}
            for split, entry in metrics.answer_extraction.items()]
    return pd.DataFrame(rows, columns=["split", *ANSWER_EXTRACTION_LABELS.values()])


def _spread(entry: StabilitySpread | None) -> str:
    """"mean ± std (min-max)" of one stability.json entry, with what is defined."""
    if entry is None or entry.mean is None:
        return "n/a"
    text = f"{entry.mean:.3f}" if entry.std is None else f"{entry.mean:.3f} ± {entry.std:.3f}"
    return text if entry.min is None or entry.max is None else f"{text} ({entry.min:.3f}-{entry.max:.3f})"


def stability_table(stability: StabilityReport) -> pd.DataFrame:
    """stability.json as one row per score: per split, AUROC mean ± sample std over the seeds (min-max), and the
    number of seeds where AUROC was defined ("test/OOD" counts when they differ)."""
    splits = [split for split in ("test", "ood") if split in stability.splits]
    scores = list(dict.fromkeys(score for split in splits for score in stability.splits[split]))
    rows = []
    for score in scores:
        entries = [stability.splits[split].get(score) for split in splits]
        row = {"score": score}
        row.update({f"{_split_label(split)} AUROC": _spread(entry) for split, entry in zip(splits, entries)})
        counts = list(dict.fromkeys("n/a" if entry is None else str(entry.n_seeds) for entry in entries))
        row["seeds"] = "/".join(counts)
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["score"])


def _times(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}x" if value >= 100 else f"{value:.1f}x"


def cost_ratio_text(cost: CostRatio) -> str:
    """cost_ratio.json as one sentence: what SE costs per question against one probe evaluation."""
    return (f"SE costs {_times(cost.seconds_ratio)} a probe evaluation in seconds ({cost.se_seconds_per_question:.3g}"
            f" s vs {cost.probe_seconds_per_question:.3g} s per question) and {_times(cost.tokens_ratio)} in tokens "
            f"({cost.se_generated_tokens_per_question:,.0f} generated vs {cost.probe_tokens_per_question:,.0f} in one"
            f" pass), with K = {cost.runs_per_question} runs per question.")


# ---- experiments: `dvc exp show --json` --------------------------------------------------------------------


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and other leaves are kept as they are."""
    if not isinstance(tree, dict):
        return {prefix: tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _error_text(error: Any) -> str:
    """DVC's {"type", "msg"} error as one short line."""
    if isinstance(error, dict):
        if error.get("type") == "FileNotFoundError":
            return "not at this revision"
        return f"{error.get('type', 'error')}: {error.get('msg', '')}".strip(": ")[:200]
    return str(error)[:200]


def _exp_row(record: dict, kind: str, baseline: str | None, metrics_file: str) -> dict[str, Any]:
    data = record.get("data") if isinstance(record.get("data"), dict) else {}
    rev = str(record.get("rev") or data.get("rev") or "")
    row: dict[str, Any] = {
        "name": record.get("name") or (rev if rev == "workspace" else rev[:7]),
        "kind": kind,
        "rev": rev if rev == "workspace" else rev[:7],
        "baseline": baseline,
        "timestamp": data.get("timestamp"),
        "error": None,
    }
    errors = [_error_text(record["error"])] if record.get("error") else []
    for content in (data.get("params") or {}).values():
        if isinstance(content, dict) and isinstance(content.get("data"), dict):
            row.update({f"param:{key}": value for key, value in _flatten(content["data"]).items()
                        if not isinstance(value, (list, dict))})
    metrics = (data.get("metrics") or {}).get(metrics_file)
    if isinstance(metrics, dict) and isinstance(metrics.get("data"), dict):
        row.update({f"metric:{key}": value for key, value in _flatten(metrics["data"]).items()
                    if isinstance(value, (int, float)) and not isinstance(value, bool)})
    elif isinstance(metrics, dict) and metrics.get("error"):
        errors.append(f"{metrics_file}: {_error_text(metrics['error'])}")
    row["error"] = "; ".join(errors) or None
    return row


def parse_exp_show(records: Any, metrics_file: str) -> pd.DataFrame:
    """Flatten `dvc exp show --json` into one row per workspace / commit / experiment.

    Columns: name, kind (``workspace``, ``commit`` or ``experiment``), rev (7 characters), baseline (the
    commit an experiment branched from), timestamp, error, then ``param:<dotted key>`` for every scalar in every
    params file and ``metric:<dotted key>`` for every number in ``metrics_file`` (e.g.
    ``metric:test.accuracy_probe.auroc``). Unknown or malformed entries are skipped, never raised.
    """
    rows = []
    for record in records if isinstance(records, list) else []:
        if not isinstance(record, dict):
            continue
        rev = str(record.get("rev") or "")
        kind = "workspace" if rev == "workspace" else "commit"
        rows.append(_exp_row(record, kind, None, metrics_file))
        baseline = rows[-1]["name"]
        for experiment in record.get("experiments") or []:
            if not isinstance(experiment, dict):
                continue
            for revision in experiment.get("revs") or []:
                if isinstance(revision, dict):
                    row = _exp_row(revision, "experiment", baseline, metrics_file)
                    row["name"] = revision.get("name") or experiment.get("name") or row["name"]
                    rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else ["name", "kind", "rev", "baseline", "timestamp", "error"])


def varying_params(experiments: pd.DataFrame) -> list[str]:
    """The ``param:`` columns whose value differs between rows (what an experiment changed)."""
    columns = [column for column in experiments.columns if column.startswith("param:")]
    return [column for column in columns if experiments[column].astype(str).nunique(dropna=False) > 1]


def change_against_baseline(experiments: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """``Δ <metric>`` for each of ``metrics``: an experiment's value minus its baseline commit's (``baseline`` names
    the commit row it branched from, as `dvc exp show` nests it); empty for commits and the workspace, and where
    either value is missing. One column per metric, aligned with ``experiments``."""
    commits = experiments[experiments["kind"] == "commit"].drop_duplicates("name").set_index("name")
    changes = pd.DataFrame(index=experiments.index)
    is_experiment = (experiments["kind"] == "experiment").to_numpy()
    for metric in metrics:
        values = pd.to_numeric(experiments[metric], errors="coerce")
        base = pd.to_numeric(experiments["baseline"].map(commits[metric]) if len(commits) else np.nan, errors="coerce")
        changes[f"Δ {metric.removeprefix('metric:')}"] = (values - base).where(is_experiment)
    return changes


@dataclass(frozen=True)
class Sweep:
    """The experiments of one baseline commit, with the one parameter they vary: a sweep's points."""

    baseline: str
    parameter: str
    """A ``param:`` column: the only one whose value differs between the baseline and its experiments (the first
    numeric one when several do)."""
    rows: pd.DataFrame
    """The baseline's row and its experiments', with ``x`` (the parameter as a number), sorted by it."""


def sweeps(experiments: pd.DataFrame) -> list[Sweep]:
    """One Sweep per baseline commit with experiments whose changed parameter is numeric. Points of different
    commits are never in one sweep: the code, data or other params may differ between commits."""
    found = []
    experiment_rows = experiments[experiments["kind"] == "experiment"]
    for baseline in experiment_rows["baseline"].dropna().unique():
        group = experiments[((experiments["kind"] == "commit") & (experiments["name"] == baseline))
                            | ((experiments["kind"] == "experiment") & (experiments["baseline"] == baseline))]
        numeric = [column for column in varying_params(group)
                   if pd.to_numeric(group[column], errors="coerce").notna().sum() > 1]
        if not numeric:
            continue
        parameter = numeric[0]
        rows = group.assign(x=pd.to_numeric(group[parameter], errors="coerce")).dropna(subset=["x"]).sort_values("x")
        found.append(Sweep(str(baseline), parameter, rows))
    return found


def headline_metric_columns(experiments: pd.DataFrame) -> list[str]:
    """Test and OOD AUROC of the headline scores, then accuracy, where the frame has them."""
    wanted = [f"metric:{split}.{score}.auroc" for split in ("test", "ood") for score in HEADLINE_SCORES]
    wanted += [f"metric:summary.{split}.accuracy" for split in ("test", "ood")]
    return [column for column in wanted if column in experiments.columns]


@dataclass(frozen=True)
class Experiments:
    """What the Experiments view shows: a table, and a sentence on where it came from."""

    table: pd.DataFrame
    message: str
    from_dvc: bool


def committed_metrics_row(root: str | Path) -> pd.DataFrame:
    """The workspace's own evaluate.json as a one-row experiments table (the fallback without DVC)."""
    metrics = load_metrics(root)
    row = {"name": "workspace", "kind": "workspace", "rev": "workspace", "baseline": None, "timestamp": None,
           "error": None}
    row.update({f"metric:{key}": value for key, value in _flatten(metrics.model_dump()).items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)})
    return pd.DataFrame([row])


def load_experiments(root: str | Path, num_commits: int = 10, timeout_s: float = EXPERIMENT_TIMEOUT_S) -> Experiments:
    """Metrics across the last ``num_commits`` commits and their DVC experiments, from `dvc exp show --json`.

    When DVC is missing, fails, times out or lists nothing, falls back to the workspace's evaluate.json and says
    why; raises only MissingArtifact (no evaluate.json either).
    """
    files = run_files(root)
    # The DVC of the Python that runs this server (`<venv>/bin/panel serve` works without an activated venv),
    # never whatever `dvc` comes first on PATH.
    command = [sys.executable, "-m", "dvc", "exp", "show", "--json", "--num", str(num_commits)]
    reason = None
    try:
        if importlib.util.find_spec("dvc") is None:
            raise FileNotFoundError("dvc")
        done = subprocess.run(command, cwd=files.root, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
        if done.returncode != 0:
            last_line = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            reason = f"`dvc exp show` failed: {last_line}"
        else:
            table = parse_exp_show(json.loads(done.stdout or "[]"), files.metrics_relative)
            if len(table) and headline_metric_columns(table):
                n_experiments = int((table["kind"] == "experiment").sum())
                n_commits = int((table["kind"] == "commit").sum())
                return Experiments(table, f"{n_commits} commit(s) and {n_experiments} experiment(s) from "
                                          f"`dvc exp show` (last {num_commits} commits).", from_dvc=True)
            reason = "`dvc exp show` listed no commits or experiments with metrics"
    except FileNotFoundError:
        reason = f"`dvc` is not installed in this server's Python ({sys.executable})"
    except subprocess.TimeoutExpired:
        reason = f"`dvc exp show` took longer than {timeout_s:.0f} s"
    except ValueError as error:
        reason = f"`dvc exp show` printed something other than JSON ({error})"
    log.info("experiments: %s", reason)
    return Experiments(committed_metrics_row(root), f"{reason}; showing this workspace's metrics only. "
                       "Run `dvc exp run -S sampling.temp=0.6` to add an experiment.", from_dvc=False)


# ---- point geometry for the run plots ------------------------------------------------------------------------


def points_in_polygon(xs: np.ndarray, ys: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    """Mask of the points inside ``polygon`` (``(n, 2)`` vertices, closed implicitly), by the even-odd rule.

    HoloViews' own lasso test (``holoviews.element.selection.spatial_select``) needs spatialpandas or shapely,
    neither of which the project installs; this crossing-number test is vectorised over points, O(points x
    vertices), about 20 ms for 100k points and a 100-vertex lasso.
    """
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    polygon = np.asarray(polygon, dtype=float)
    inside = np.zeros(xs.shape, dtype=bool)
    if polygon.ndim != 2 or len(polygon) < 3:
        return inside
    x_start, y_start = polygon[:, 0], polygon[:, 1]
    x_end, y_end = np.roll(x_start, -1), np.roll(y_start, -1)
    for xa, ya, xb, yb in zip(x_start, y_start, x_end, y_end):
        if ya == yb:
            continue  # a horizontal edge never crosses the horizontal ray
        spans = (ya > ys) != (yb > ys)
        crossing_x = xa + (ys - ya) * (xb - xa) / (yb - ya)
        inside ^= spans & (xs < crossing_x)
    return inside


def stack_codes(frame: pd.DataFrame, x: str, y: str) -> tuple[np.ndarray, int]:
    """The spot of each run of ``frame``: codes numbering its distinct ``(x, y)`` points in order of first appearance,
    and how many there are (one hash pass, ~6 ms at 100k runs: the plots call it before deciding to rasterise)."""
    points = np.empty(len(frame), dtype=np.complex128)
    points.real, points.imag = frame[x].to_numpy(dtype=float), frame[y].to_numpy(dtype=float)
    codes, spots = pd.factorize(points, use_na_sentinel=False)
    return codes, len(spots)


def stack_runs(frame: pd.DataFrame, x: str, y: str, codes: np.ndarray | None = None) -> pd.DataFrame:
    """One row per distinct ``(x, y)`` point of ``frame``: runs with identical answers have identical hidden states,
    so many runs sit on one spot (2,740 points for 7,000 runs in the default run).

    Returns the first run of each stack (its columns and row label), plus ``runs`` (how many runs the point
    holds, k), ``runs_correct`` (how many of them are correct) and ``stack`` (``"×k"``, empty for a single run),
    in the order of first appearance. ``codes``: ``stack_codes(frame, x, y)[0]``, when the caller has them.
    """
    if frame.empty:
        return frame.assign(runs=np.zeros(0, dtype=np.int64), runs_correct=np.zeros(0, dtype=np.int64),
                            stack=np.array([], dtype=object))
    if codes is None:
        codes = stack_codes(frame, x, y)[0]
    # codes count up in order of first appearance, so a run opens its stack where its code exceeds all before it
    first = codes > np.maximum.accumulate(np.concatenate([[-1], codes[:-1]]))
    sizes = np.bincount(codes)
    correct = np.bincount(codes, weights=frame["correct"].to_numpy(dtype=float)).astype(np.int64)
    stacks = frame[first]
    return stacks.assign(runs=sizes, runs_correct=correct,
                         stack=np.where(sizes > 1, np.char.add("×", sizes.astype(str)), ""))


def question_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per question of ``runs``: dataset, question_id, split, question, semantic_entropy, accuracy (the share
    of its runs in ``runs`` that are correct) and n_runs (how many)."""
    if runs.empty:
        return pd.DataFrame(columns=["dataset", "question_id", "split", "question", "semantic_entropy", "accuracy",
                                     "n_runs"])
    grouped = runs.groupby(["dataset", "question_id"], observed=True, sort=False)
    summary = grouped.agg(split=("split", "first"), question=("question", "first"),
                          semantic_entropy=("semantic_entropy", "first"), accuracy=("correct", "mean"),
                          n_runs=("correct", "size")).reset_index()
    for column in ("dataset", "split"):
        summary[column] = summary[column].astype(str)
    return summary


def question_from_link(table: pd.DataFrame, value: Any) -> tuple[str, str] | None:
    """The (dataset, question_id) a ``?question=<id>`` link names, or None: only an id present in ``table``, compared
    as an exact string (bytes decoded as UTF-8, at most 200 characters), is accepted; anything else is ignored."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str) or not value or len(value) > 200:
        return None
    matches = table.loc[(table["question_id"] == value).to_numpy(), "dataset"]
    if matches.empty:
        return None
    return str(matches.iloc[0]), value


# ---- the store ---------------------------------------------------------------------------------------------


class RunStore(param.Parameterized):
    """The filters every view follows, and the frames derived from them.

    Filtering never copies more than the rows in view; ``table`` is shared and never modified.
    """

    table = param.DataFrame(precedence=-1, doc="Every run: ANALYSIS.columns plus `outcome`.")

    datasets = param.ListSelector(default=["id", "ood"], objects=DATASET_CHOICES, doc="Question sets in view.")
    splits = param.ListSelector(default=list(SPLIT_ORDER), objects=list(SPLIT_ORDER), doc="Question splits in view.")
    correctness = param.Selector(default="all", objects=CORRECTNESS_CHOICES, doc="Keep all, correct or incorrect runs.")
    se_range = param.Range(default=(0.0, 1.0), doc="Semantic entropy (nats) of the run's question, inclusive.")
    n_clusters = param.Range(default=(1, 1), doc="Semantic clusters among the question's K answers, inclusive.")
    search = param.String(default="", doc="Case-insensitive text in the question (or its id).")
    probe = param.Selector(default="accuracy", objects=PROBE_CHOICES, doc="Probe whose margin and score are shown.")

    selection = param.Array(default=np.empty(0, dtype=np.int64),
                            doc="Row labels (of `table`) chosen by the last box or lasso selection.")
    question = param.Tuple(default=None, length=2, allow_None=True, doc="(dataset, question_id) being read.")
    run = param.Integer(default=None, allow_None=True, doc="Row label (of `table`) of the run drilled into: one of "
                                                           "`question_runs`, the first when a question opens.")

    filtered = param.DataFrame(precedence=-1, doc="Runs passing the filters.")
    selected = param.DataFrame(precedence=-1, doc="Filtered runs inside the selection.")
    # Bumped after `filtered` / `selected` change. Plots watch these instead of the frames: a watcher of a
    # DataFrame parameter compares the old and new 100k-run frames on every change.
    filtered_revision = param.Integer(default=0, precedence=-1)
    selected_revision = param.Integer(default=0, precedence=-1)
    question_runs = param.DataFrame(precedence=-1, doc="All K runs of `question`, by cluster then run.")

    def __init__(self, table: pd.DataFrame, **params):
        se = table["semantic_entropy"]
        clusters = table["n_clusters"]
        se_bounds = (float(se.min()), float(se.max())) if len(table) else (0.0, 1.0)
        cluster_bounds = (int(clusters.min()), int(clusters.max())) if len(table) else (1, 1)
        splits = {str(split) for split in table["split"].unique()}
        present_splits = [split for split in SPLIT_ORDER if split in splits] + sorted(splits - set(SPLIT_ORDER))
        super().__init__(table=table)
        # Bounds come from the data, so they are set on this store's own copies of the parameters.
        self.param.se_range.bounds = se_bounds
        self.param.n_clusters.bounds = cluster_bounds
        self.param.splits.objects = present_splits
        with param.parameterized.discard_events(self):
            self.param.update(**{"se_range": se_bounds, "n_clusters": cluster_bounds, "splits": present_splits,
                                 **params})
        self._apply_filters()
        self._load_question()

    # -- derived frames --
    def filter_mask(self) -> np.ndarray:
        """Boolean mask over ``table`` for the current filters."""
        table = self.table
        mask = table["dataset"].isin(self.datasets).to_numpy() & table["split"].isin(self.splits).to_numpy()
        if self.correctness != "all":
            mask &= table["correct"].to_numpy() == (self.correctness == "correct")
        low, high = self.se_range
        mask &= table["semantic_entropy"].between(low, high).to_numpy()
        low, high = self.n_clusters
        mask &= table["n_clusters"].between(low, high).to_numpy()
        text = self.search.strip()
        if text:
            found = table["question"].str.contains(text, case=False, regex=False)
            found |= table["question_id"].str.contains(text, case=False, regex=False)
            mask &= found.fillna(False).to_numpy(dtype=bool)
        return mask

    @param.depends("datasets", "splits", "correctness", "se_range", "n_clusters", "search", watch=True)
    def _apply_filters(self) -> None:
        # One batch of page updates for the count, both plots and the table (a no-op outside a served session),
        # and one param.update, so that a view following both frames redraws once.
        with pn.io.hold(freeze=True):
            filtered = self.table[self.filter_mask()]
            self.param.update(filtered=filtered, selected=self._selected_rows(filtered),
                              filtered_revision=self.filtered_revision + 1,
                              selected_revision=self.selected_revision + 1)

    def _selected_rows(self, filtered: pd.DataFrame) -> pd.DataFrame:
        if len(self.selection) == 0:
            return filtered.iloc[:0]
        return filtered[filtered.index.isin(self.selection)]

    @param.depends("selection", watch=True)
    def _select(self) -> None:
        before, selected = self.selected, self._selected_rows(self.filtered)
        if before is not None and before.empty and selected.empty:
            return  # an empty selection stays drawn as it is
        with pn.io.hold(freeze=True):
            self.param.update(selected=selected, selected_revision=self.selected_revision + 1)

    @param.depends("question", watch=True)
    def _load_question(self) -> None:
        table = self.table
        if self.question is None:
            self.param.update(question_runs=table.iloc[:0], run=None)
            return
        dataset, question_id = self.question
        runs = table[(table["dataset"] == dataset).to_numpy() & (table["question_id"] == question_id).to_numpy()]
        runs = runs.sort_values(["cluster_id", "run_id"])
        self.param.update(question_runs=runs, run=int(runs.index[0]) if len(runs) else None)

    # -- actions the views call --
    def margin_column(self) -> str:
        return f"{self.probe}_probe_margin"

    def score_column(self) -> str:
        return f"{self.probe}_probe_prob"

    def select_box(self, x: str, y: str, bounds: tuple[float, float, float, float] | None) -> None:
        """Select the filtered runs with ``x0 <= row[x] <= x1`` and ``y0 <= row[y] <= y1``; None clears."""
        if bounds is None:
            self.selection = np.empty(0, dtype=np.int64)
            return
        x0, y0, x1, y1 = bounds
        frame = self.filtered
        inside = frame[x].between(min(x0, x1), max(x0, x1)) & frame[y].between(min(y0, y1), max(y0, y1))
        self.selection = frame.index[inside.to_numpy()].to_numpy(dtype=np.int64)

    def select_lasso(self, x: str, y: str, polygon: np.ndarray | None) -> None:
        """Select the filtered runs whose ``(row[x], row[y])`` lies inside ``polygon`` (``(n, 2)`` vertices)."""
        if polygon is None or len(polygon) < 3:
            self.clear_selection()
            return
        frame = self.filtered
        inside = points_in_polygon(frame[x].to_numpy(), frame[y].to_numpy(), np.asarray(polygon, dtype=float))
        self.selection = frame.index[inside].to_numpy(dtype=np.int64)

    def clear_selection(self) -> None:
        self.selection = np.empty(0, dtype=np.int64)

    def open_question(self, dataset: str, question_id: str) -> None:
        self.question = (str(dataset), str(question_id))

    def open_run(self, row: int) -> None:
        """Drill into the run at row label ``row`` of ``table`` (opening its question first if need be)."""
        run = self.table.loc[row]
        question = (str(run["dataset"]), str(run["question_id"]))
        if self.question != question:
            self.question = question
        self.run = int(row)

    def nearest_run(self, x: str, y: str, point: tuple[float, float], tolerance: tuple[float, float]) -> int | None:
        """Row label of the filtered run nearest ``point`` in (x, y), distances scaled by ``tolerance`` (the
        data units of a few pixels on each axis); None when none is within it."""
        frame = self.filtered
        if frame.empty or point[0] is None or point[1] is None:
            return None
        dx = (frame[x].to_numpy(float) - point[0]) / tolerance[0]
        dy = (frame[y].to_numpy(float) - point[1]) / tolerance[1]
        distance = np.hypot(dx, dy)
        best = int(np.nanargmin(distance)) if np.isfinite(distance).any() else None
        return None if best is None or distance[best] > 1.0 else int(frame.index[best])

    def reset_filters(self) -> None:
        defaults = {name: self.param[name].default for name in ("correctness", "search", "probe")}
        self.param.update(datasets=list(DATASET_CHOICES.values()), splits=list(self.param.splits.objects),
                          se_range=self.param.se_range.bounds, n_clusters=self.param.n_clusters.bounds, **defaults)

    # -- what the count says --
    def count_text(self) -> str:
        return f"{len(self.filtered):,} of {len(self.table):,} runs in view"
