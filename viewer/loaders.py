"""The viewer's loaders: every file of a run the viewer opens, found through the project's own ``params.yaml``
``paths:`` and checked to lie inside the project (``run_files``), read once per server process and shared read-only
by every session (cached on the file's modification time).

The viewer reads only what the stages wrote (DESIGN.md); it never recomputes the pipeline. Every loader takes the
project root as an argument (``viewer/app.py`` passes the checkout it lives in, tests pass a temporary project), and
no path comes from a URL, a widget or an environment variable.
"""

from __future__ import annotations
import json
import logging
from dataclasses import dataclass
from pathlib import Path
import numpy as np
import pandas as pd
import panel as pn
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
    StabilityReport,
)
from stages.lib.schema.machinery import Contract, SchemaError, validate_frame

from stages.lib.schema.machinery import DATASETS
from stages.lib.schema.reports import EARLY_EXIT_FILE, EarlyExitReport
from stages.lib.schema.tables import EARLY_EXIT_PARETO, FORCED_ANSWERS, RUNS

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
    forced_answers: Path  # the directory of the forced_answers stage's tables
    runs: Path  # the directory of the runs tables

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
                    metrics=inside(paths.metrics, EVALUATE_FILE), plots=inside(paths.plots, ""),
                    forced_answers=inside(paths.forced_answers, ""), runs=inside(paths.runs, ""))


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


# ---- the early-exit outputs (the Early exit tab) ----------------------------------------------------------

@dataclass(frozen=True)
class EarlyExitData:
    report: EarlyExitReport
    pareto: pd.DataFrame  # EARLY_EXIT_PARETO.columns
    forced: pd.DataFrame  # FORCED_ANSWERS.columns of both datasets
    runs: pd.DataFrame  # question_id, run_id, dataset, answer, correct, n_generated


def load_early_exit(root: str | Path) -> EarlyExitData:
    """Read the early-exit outputs of the project at ``root`` (SchemaError naming the file when one is missing)."""
    files = run_files(root)  # every path checked to lie inside the project
    report = EarlyExitReport.read(files.metrics.parent / EARLY_EXIT_FILE, writer="early_exit")
    pareto_path = files.plots / EARLY_EXIT_PARETO.file
    if not pareto_path.exists():
        raise SchemaError(f"{pareto_path}: not found; run the early_exit stage (`dvc repro early_exit`)")
    pareto = validate_frame(pd.read_csv(pareto_path), EARLY_EXIT_PARETO.columns, pareto_path)
    forced, runs = [], []
    for dataset in DATASETS:
        path = FORCED_ANSWERS.path(files.forced_answers, dataset)
        if not path.exists():
            raise SchemaError(f"{path}: not found; run the forced_answers stage (`dvc repro forced_answers`)")
        forced.append(validate_frame(pd.read_parquet(path), FORCED_ANSWERS.columns, path, FORCED_ANSWERS.key))
        runs.append(pd.read_parquet(RUNS.path(files.runs, dataset),
                                    columns=["question_id", "run_id", "dataset", "answer", "correct",
                                             "n_generated"]))  # not `text`: every run's reasoning, unused here
    return EarlyExitData(report, pareto, pd.concat(forced, ignore_index=True), pd.concat(runs, ignore_index=True))
