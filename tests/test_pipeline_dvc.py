"""End to end: `dvc repro` of the real dvc.yaml on a tiny configuration, in a fresh git + DVC repository.

Checks what a user relies on: every output appears and matches its schema, `dvc status` is then clean, a
second `dvc repro` runs nothing, `dvc exp run -S sampling.temp=0.6` reruns exactly the stages downstream of
sampling, and `dvc metrics diff` shows the AUROC changes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from stages.schema import ANALYSIS_COLUMNS, ANALYSIS_KEY, validate_frame

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["toy_model", "questions", "generate", "semantic_entropy", "trace", "train_probes", "evaluate", "analysis"]

# Small enough to run in about a minute, large enough that every split holds both classes.
TINY = {
    "toy": dict(layers=2, hidden_size=64, heads=2, intermediate_size=128, steps=400, batch_size=64, min_terms=2,
                max_terms=3, max_operand=12, ood_max_terms=4, ood_max_operand=12, ood_train_fraction=0.1),
    "data": dict(n_questions=40, n_ood_questions=12),
    "sampling": dict(runs=4, temp=1.0, max_new_tokens=40),
    "probes": dict(cv_folds=2, c_grid=[0.1, 1.0]),
    "evaluate": dict(bootstrap=50, permutations=50),
    "analysis": dict(umap_neighbors=5),
}

ENV = {**os.environ, "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
       "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com", "DVC_NO_ANALYTICS": "1"}


def sh(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def make_project(directory: Path) -> Path:
    for name in ("stages", "dvc.yaml", "params.yaml"):
        source = ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, directory / name)
    shutil.rmtree(directory / "stages" / "__pycache__", ignore_errors=True)
    params = yaml.safe_load((directory / "params.yaml").read_text())
    for group, values in TINY.items():
        params[group].update(values)
    (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", cwd=directory)
    sh("dvc", "init", "-q", cwd=directory)
    sh("dvc", "config", "core.autostage", "true", cwd=directory)
    sh("git", "add", "-A", cwd=directory)
    sh("git", "commit", "-qm", "tiny pipeline", cwd=directory)
    return directory


def ran_stages(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


@pytest.mark.slow
def test_dvc_repro_exp_run_and_metrics_diff(tmp_path):
    project = make_project(tmp_path / "project")

    first = sh("dvc", "repro", cwd=project)
    assert ran_stages(first.stdout) == STAGES

    table = pd.read_parquet(project / "artifacts/analysis/analysis.parquet")
    validate_frame(table, ANALYSIS_COLUMNS, "analysis.parquet", ANALYSIS_KEY)
    assert set(table["split"]) == {"train", "val", "test", "ood"}
    assert len(table) == (40 + 12) * 4
    metrics = json.loads((project / "artifacts/metrics/evaluate.json").read_text())
    assert metrics["test"]["accuracy_probe"]["auroc"] is not None
    for stage in ("toy_model", "generate", "semantic_entropy", "trace", "train_probes", "evaluate", "analysis"):
        cost = json.loads((project / f"artifacts/metrics/cost/{stage}.json").read_text())
        assert cost["wall_seconds"] > 0
    assert json.loads((project / "artifacts/metrics/cost/generate.json").read_text())["tokens_generated"] > 0

    assert "up to date" in sh("dvc", "status", cwd=project).stdout
    assert ran_stages(sh("dvc", "repro", cwd=project).stdout) == []

    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-qm", "default run", cwd=project)
    experiment = sh("dvc", "exp", "run", "-S", "sampling.temp=0.6", cwd=project)
    assert ran_stages(experiment.stdout) == STAGES[2:]
    assert yaml.safe_load((project / "params.yaml").read_text())["sampling"]["temp"] == 0.6

    diff = sh("dvc", "metrics", "diff", "--json", cwd=project)
    changes = json.loads(diff.stdout)["artifacts/metrics/evaluate.json"]
    auroc_changes = {key: value for key, value in changes.items() if key.endswith(".auroc")}
    assert auroc_changes, f"no AUROC in `dvc metrics diff`: {sorted(changes)[:10]}"
    assert any(value.get("diff") not in (None, 0) for value in auroc_changes.values())


def test_a_bad_parameter_fails_at_stage_start_naming_the_key(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sampling"]["temp"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(["python", "-m", "stages.generate"], cwd=tmp_path, capture_output=True, text=True,
                            env={**ENV, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode != 0
    assert "`sampling.temp` = -1 is invalid" in result.stderr
    assert not (tmp_path / "data").exists()
