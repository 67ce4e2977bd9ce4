"""End to end: `dvc repro` of the real dvc.yaml on a tiny configuration, in a fresh git + DVC repository.

Checks what a user relies on: every output appears and matches its schema, `dvc status` is then clean, a
second `dvc repro` runs nothing, `dvc exp run -S evaluate.calibration_bins=5` reruns exactly the stages DVC's
graph puts downstream of that param (evaluate alone: a short tail; tests/test_dvc_conventions.py checks the graph
for README's `-S sampling.temp=0.6`), `dvc exp show --json` lists both runs with their params, `dvc metrics diff`
shows the calibration change (and no AUROC moves), and the README's `--queue` sweep queues one experiment per
value. The tiny run itself is made once per session by the `tiny_run` fixture (tests/dvc_project.py) and shared
with tests/test_architecture.py and tests/test_remote_s3.py.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from dvc_project import STAGES, ran_stages, sh, stages_a_param_reruns

from stages.lib.registry import ANALYSIS
from stages.lib.schema.tables import ANALYSIS_KEY
from stages.lib.schema.machinery import validate_frame


def sampling_params(exp_show_entry: dict) -> dict:
    return exp_show_entry["data"]["params"]["params.yaml"]["data"]["sampling"]


def calibration_bins(exp_show_entry: dict) -> int:
    return exp_show_entry["data"]["params"]["params.yaml"]["data"]["evaluate"]["calibration_bins"]


def check_location_scores_and_tokens(directory, table: pd.DataFrame) -> None:
    """analysis' drill-down files: the scores per location agree with analysis.parquet at each chosen location, and
    tokens.parquet holds every run's tokens, one entropy each, sorted by question in more than one row group when
    there are enough runs."""
    import numpy as np
    import pyarrow.parquet as pq

    from stages.lib.schema.tables import TOKENS, LocationScoresMeta, validate_location_scores

    meta = LocationScoresMeta.read(directory / "location_scores.json")
    scores = np.load(directory / "location_scores.npy", allow_pickle=False)
    validate_location_scores(scores, meta, "location_scores.npy")
    assert meta.n_runs == len(table)
    for index, (probe, chosen) in enumerate(zip(meta.probes, meta.chosen)):
        if f"{probe}_probe_prob" in table:
            at_chosen = scores[:, index, meta.positions.index(chosen.position), meta.layers.index(chosen.layer)]
            np.testing.assert_allclose(at_chosen, table[f"{probe}_probe_prob"], atol=1e-6)
    tokens = validate_frame(pd.read_parquet(directory / "tokens.parquet"), TOKENS.columns, "tokens", TOKENS.key)
    assert len(tokens) == len(table)
    assert (tokens["tokens"].map(len) == tokens["token_entropies"].map(len)).all()
    assert list(zip(tokens["dataset"], tokens["question_id"])) == sorted(zip(tokens["dataset"], tokens["question_id"]))
    assert "</think>" in set(tokens["tokens"].explode())
    assert pq.ParquetFile(directory / "tokens.parquet").metadata.num_row_groups == -(-len(tokens) // 256)


@pytest.mark.slow
def test_dvc_repro_exp_run_and_metrics_diff(tiny_run, tiny_project):
    assert ran_stages(tiny_run.repro_stdout) == STAGES
    project = tiny_project

    table = pd.read_parquet(project / "artifacts/analysis/analysis.parquet")
    validate_frame(table, ANALYSIS.columns, "analysis.parquet", ANALYSIS_KEY)
    assert set(table["split"]) == {"train", "val", "test", "ood"}
    assert len(table) == (40 + 12) * 4
    check_location_scores_and_tokens(project / "artifacts/analysis", table)
    metrics = json.loads((project / "artifacts/metrics/evaluate.json").read_text())
    assert metrics["test"]["accuracy_probe"]["auroc"] is not None
    for stage in ("toy_model", "generate", "semantic_entropy", "trace", "train_probes", "evaluate", "analysis"):
        cost = json.loads((project / f"artifacts/metrics/cost/{stage}.json").read_text())
        assert cost["wall_seconds"] > 0
    assert json.loads((project / "artifacts/metrics/cost/generate.json").read_text())["tokens_generated"] > 0

    assert "up to date" in sh("dvc", "status", cwd=project).stdout
    assert ran_stages(sh("dvc", "repro", cwd=project).stdout) == []

    # A short-tail experiment: one evaluate setting (tests/test_dvc_conventions.py checks from DVC's graph that
    # README's `-S sampling.temp=0.6` reruns generate and everything after it).
    experiment = sh("dvc", "exp", "run", "-S", "evaluate.calibration_bins=5", cwd=project)
    assert ran_stages(experiment.stdout) == stages_a_param_reruns("evaluate.calibration_bins", project) == ["evaluate"]
    assert yaml.safe_load((project / "params.yaml").read_text())["evaluate"]["calibration_bins"] == 5

    head = sh("git", "rev-parse", "HEAD", cwd=project).stdout.strip()
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=project).stdout)
    baseline = next(entry for entry in shown if entry["rev"] == head)
    assert calibration_bins(baseline) == 10
    runs = [rev for experiment in baseline["experiments"] or [] for rev in experiment["revs"]]
    assert [calibration_bins(run) for run in runs] == [5], "`dvc exp show` does not list the experiment"
    assert "artifacts/metrics/evaluate.json" in runs[0]["data"]["metrics"]

    diff = sh("dvc", "metrics", "diff", "--json", cwd=project)
    changes = json.loads(diff.stdout)["artifacts/metrics/evaluate.json"]
    assert changes["calibration.test.accuracy_probe.n_bins"] == {"old": 10, "new": 5, "diff": -5}
    assert not [key for key in changes if key.endswith(".auroc")], "evaluate's rerun moved an AUROC"


@pytest.mark.slow
def test_a_queued_temperature_sweep_is_one_experiment_per_value(tiny_project):
    """The README's sweep, queued but not started (running it takes a pipeline run per value; done by hand)."""
    sh("dvc", "exp", "run", "--queue", "-S", "sampling.temp=0.3,0.6", cwd=tiny_project)
    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=tiny_project).stdout)
    queued = [(experiment["executor"]["state"], sampling_params(rev)["temp"])
              for entry in shown for experiment in entry["experiments"] or [] for rev in experiment["revs"]]
    assert sorted(queued) == [("queued", 0.3), ("queued", 0.6)]
    assert yaml.safe_load((tiny_project / "params.yaml").read_text())["sampling"]["temp"] == 1.0
    assert "Queued" in sh("dvc", "queue", "status", cwd=tiny_project).stdout
