"""A stage writes all of its outputs or none (stages/lib/io/files.py ``stage_outputs``), and evaluate finishes on
single-class splits with null metrics and well-typed, empty plot tables."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
from test_train_evaluate import make_params, write_fixture

from stages import evaluate, train_probes
from stages.lib.io.files import cost_record, stage_outputs
from stages.lib.schema.tables import AUROC_BY_LAYER, EARLY_WARNING, RELIABILITY, RISK_COVERAGE, ROC
from stages.lib.schema.reports import EvaluateReport
from stages.lib.schema.machinery import validate_frame


def previous_outputs(root: Path) -> dict[Path, str]:
    (root / "out_dir").mkdir(parents=True)
    (root / "out_dir" / "stale.txt").write_text("old")
    (root / "metrics.json").write_text("old")
    return {root / "out_dir" / "stale.txt": "old", root / "metrics.json": "old"}


def test_an_exception_leaves_every_previous_output_and_no_temporary(tmp_path):
    before = previous_outputs(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        with stage_outputs() as outputs, cost_record(tmp_path / "m", "x", outputs):
            directory = outputs.path(tmp_path / "out_dir")
            directory.mkdir()
            (directory / "new.txt").write_text("new")
            outputs.path(tmp_path / "metrics.json").write_text("new")
            raise RuntimeError("boom")
    assert {path: path.read_text() for path in before} == before
    assert not (tmp_path / "m").exists()  # nor the cost record
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "out_dir"]


def test_a_clean_exit_replaces_every_output_and_directories_whole(tmp_path):
    previous_outputs(tmp_path)
    with stage_outputs() as outputs, cost_record(tmp_path / "m", "x", outputs) as cost:
        directory = outputs.path(tmp_path / "out_dir")
        directory.mkdir()
        (directory / "new.txt").write_text("new")
        outputs.path(tmp_path / "metrics.json").write_text("new")
        cost["rows"] = 1
        assert (tmp_path / "metrics.json").read_text() == "old"  # nothing moves before the set is complete
    assert sorted(p.name for p in (tmp_path / "out_dir").iterdir()) == ["new.txt"]  # no stale file survives
    assert (tmp_path / "metrics.json").read_text() == "new"
    assert json.loads((tmp_path / "m" / "cost" / "x.json").read_text())["rows"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "metrics.json", "out_dir"]


def test_an_output_asked_for_but_not_written_fails_and_replaces_nothing(tmp_path):
    before = previous_outputs(tmp_path)
    with pytest.raises(RuntimeError, match="never wrote"):
        with stage_outputs() as outputs:
            outputs.path(tmp_path / "metrics.json").write_text("new")
            outputs.path(tmp_path / "out_dir")
    assert {path: path.read_text() for path in before} == before


def test_temporaries_of_a_killed_run_are_removed_by_the_next(tmp_path):
    dead_pid = 2 ** 22 + 17  # above the default pid_max: no such process
    assert not Path(f"/proc/{dead_pid}").exists()
    stale = tmp_path / f".tmp-metrics.json-{dead_pid}-abc"
    stale.mkdir()
    live = tmp_path / f".tmp-metrics.json-{os.getpid()}-def"  # a running writer's: kept
    live.mkdir()
    with stage_outputs() as outputs:
        outputs.path(tmp_path / "metrics.json").write_text("new")
    assert not stale.exists() and live.exists()


# ---- evaluate with one class in every evaluated split --------------------------------------------------------
PLOTS = {"auroc_by_layer.csv": AUROC_BY_LAYER.columns, "roc.csv": ROC.columns,
         "early_warning.csv": EARLY_WARNING.columns, "risk_coverage.csv": RISK_COVERAGE.columns,
         "reliability.csv": RELIABILITY.columns}


def test_evaluate_with_every_test_and_ood_run_wrong_writes_null_metrics_and_typed_plots(tmp_path):
    params = make_params(tmp_path)
    write_fixture(params)
    train_probes.run(params)
    splits = pd.read_parquet(Path(params.paths.probes) / "splits.parquet")
    test_questions = set(splits.query("split == 'test'")["question_id"])
    for dataset in ("id", "ood"):  # every test and OOD run wrong with no semantic entropy; train and val untouched
        for directory, column, value in ((params.paths.runs, "correct", False),
                                         (params.paths.semantic_entropy, "semantic_entropy", 0.0)):
            path = Path(directory) / f"{dataset}.parquet"
            table = pd.read_parquet(path)
            rows = table["question_id"].isin(test_questions) if dataset == "id" else slice(None)
            table.loc[rows, column] = value
            table.to_parquet(path, index=False)

    report = evaluate.run(params)
    written = EvaluateReport.model_validate_json((Path(params.paths.metrics) / "evaluate.json").read_text())
    assert written == report
    for split in ("test", "ood"):
        record = report.splits[split]["accuracy_probe"]
        assert record.auroc is None and record.auprc is None and "`incorrect` = True" in record.note
        assert report.summary[split].accuracy == 0.0
        assert report.splits[split]["se_probe_high_se"].auroc is None  # no high-SE question either
    for name, columns in PLOTS.items():
        path = Path(params.paths.plots) / name
        frame = pd.read_csv(path)
        if frame.empty:  # read back as text: give an empty table its schema's dtypes, as the viewer does
            frame = frame.astype({c.name: {"float": float, "int": int, "bool": bool, "str": object}.get(c.kind, object)
                                  for c in columns})
        validate_frame(frame, columns, path)
    warning = pd.read_csv(Path(params.paths.plots) / "early_warning.csv")
    assert warning.query("split in ['test', 'ood'] and probe == 'accuracy'")["auroc"].isna().all()
