"""params.yaml validation and the atomic-write and schema helpers every stage relies on."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from stages.lib.common import atomic_path, cost_record, read_table, write_json, write_table
from stages.lib.params import ParamsError, load_params, parse_params
from stages.lib.schema import QUESTION_COLUMNS, QUESTION_KEY, SchemaError, validate_frame

ROOT = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((ROOT / "params.yaml").read_text())


def with_value(dotted: str, value):
    raw = copy.deepcopy(RAW)
    *groups, key = dotted.split(".")
    target = raw
    for group in groups:
        target = target[group]
    target[key] = value
    return raw


def test_the_repository_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.sampling.runs >= 2 and params.model.name == "toy"


@pytest.mark.parametrize("dotted, value", [
    ("sampling.temp", -0.1), ("sampling.runs", 1), ("sampling.backend", "tgi"), ("sampling.top_p", 0),
    ("data.source", "csv:questions.csv"), ("data.ood_source", "jsonl:"), ("semantic_entropy.method", "vibes"),
    ("trace.backend", "jax"), ("trace.positions", ["tbg", "middle"]), ("trace.layers", "some"),
    ("probes.high_se_threshold", "mean"), ("probes.val_fraction", 0.5), ("evaluate.confidence", 95),
    ("trace.positions", ["think_0"]), ("trace.positions", ["think_100"]), ("trace.positions", ["slt", "slt"]),
    ("probes.max_layer_range", -1), ("evaluate.calibration_bins", 0), ("stability.seeds", 0),
    ("stability.seeds", True), ("evaluate.calibration_bins", True),
])
def test_a_bad_value_names_its_key(dotted, value):
    with pytest.raises(ParamsError, match=f"`{dotted}` = "):
        parse_params(with_value(dotted, value))


def test_missing_and_unknown_keys_are_named():
    raw = copy.deepcopy(RAW)
    del raw["sampling"]["temp"]
    with pytest.raises(ParamsError, match="missing key `sampling.temp`"):
        parse_params(raw)
    with pytest.raises(ParamsError, match="unknown key `sampling.temperature`"):
        parse_params(with_value("sampling.temperature", 0.7))


def test_atomic_path_replaces_files_and_directories_only_on_success(tmp_path):
    target = tmp_path / "out.json"
    write_json({"version": 1}, target)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half a file")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"version": 1}

    directory = tmp_path / "runs"
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        (tmp / "id.parquet").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            (tmp / "id.parquet").write_text("new")
            raise RuntimeError("killed")
    assert (directory / "id.parquet").read_text() == "old"
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        (tmp / "ood.parquet").write_text("new")
    assert sorted(p.name for p in directory.iterdir()) == ["ood.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "runs"]  # no temporary left behind


def test_cost_record_is_written_only_when_the_stage_succeeds(tmp_path):
    with cost_record(tmp_path, "demo") as cost:
        cost["forward_passes"] = 3
    record = json.loads((tmp_path / "cost" / "demo.json").read_text())
    assert record["forward_passes"] == 3 and record["wall_seconds"] >= 0
    with pytest.raises(ValueError):
        with cost_record(tmp_path, "broken"):
            raise ValueError("stage failed")
    assert not (tmp_path / "cost" / "broken.json").exists()


def test_tables_are_validated_on_write_and_read(tmp_path):
    good = pd.DataFrame({"question_id": ["a", "b"], "dataset": ["id", "id"], "question": ["1+1", "2+2"],
                         "gold": ["2", "4"]})
    write_table(good, tmp_path / "q.parquet", QUESTION_COLUMNS, QUESTION_KEY)
    assert read_table(tmp_path / "q.parquet", QUESTION_COLUMNS, QUESTION_KEY).equals(good)
    with pytest.raises(SchemaError, match="missing column `gold`"):
        write_table(good.drop(columns="gold"), tmp_path / "bad.parquet", QUESTION_COLUMNS)
    with pytest.raises(SchemaError, match=r"duplicate key \('a',\)"):
        validate_frame(pd.concat([good, good.iloc[:1]]), QUESTION_COLUMNS, "q", QUESTION_KEY)
    with pytest.raises(SchemaError, match="column `question` has a null at row 1"):
        validate_frame(good.assign(question=["x", None]), QUESTION_COLUMNS, "q")
    with pytest.raises(SchemaError, match="missing.parquet: not found"):
        read_table(tmp_path / "missing.parquet", QUESTION_COLUMNS)
    assert not (tmp_path / "bad.parquet").exists()
