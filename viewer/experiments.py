"""The Experiments tab's data: ``dvc exp show --json`` read into one row per experiment (params and metrics),
with the parameters that vary, the sweeps and each experiment's change against its baseline."""

from __future__ import annotations
import importlib.util
import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
import numpy as np
import pandas as pd
from viewer.loaders import load_metrics, run_files
from viewer.tables import HEADLINE_SCORES

log = logging.getLogger(__name__)


EXPERIMENT_TIMEOUT_S = 30.0


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
