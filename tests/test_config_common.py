"""params.yaml validation (the typed models, their one-line errors, a stage stopping at start), and the
atomic-write and schema helpers every stage relies on."""

from __future__ import annotations

import copy
import json
import logging
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from pydantic import ValidationError

from stages.lib.io.files import atomic_path, cost_record, read_table, write_json, write_table
from stages.lib.params import Params, ParamsError, load_params, parse_params
from stages.lib.schema.tables import QUESTIONS
from stages.lib.schema.machinery import SchemaError, validate_frame

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


def error_line(raw) -> str:
    with pytest.raises(ParamsError) as caught:
        parse_params(raw)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("params.yaml: ")
    return message


def test_the_repository_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.sampling.runs >= 2 and params.model.name == "toy"
    # YAML lists are held as tuples, as the callers (and hashing a frozen model) expect
    assert isinstance(params.trace.positions, tuple) and isinstance(params.probes.c_grid, tuple)
    assert params.trace.positions == tuple(RAW["trace"]["positions"])
    assert params.sampling.vllm.dtype == RAW["sampling"]["vllm"]["dtype"] and hash(params)


# accepted or crashing before the typed models, and every older check
BAD_VALUES = [
    ("data.n_questions", "500"), ("sampling.max_new_tokens", "96"), ("toy.steps", True), ("trace.batch_size", True),
    ("trace.batch_size", 2.5), ("analysis.umap_min_dist", "x"),
    ("sampling.temp", -0.1), ("sampling.runs", 1), ("sampling.backend", "tgi"), ("sampling.top_p", 0),
    ("data.source", "csv:questions.csv"), ("data.ood_source", "jsonl:"), ("semantic_entropy.method", "vibes"),
    ("trace.backend", "jax"), ("trace.positions", ["tbg", "middle"]), ("trace.layers", "some"),
    ("probes.high_se_threshold", "mean"), ("probes.val_fraction", 0.5), ("evaluate.confidence", 95),
    ("trace.positions", ["think_0"]), ("trace.positions", ["think_100"]), ("trace.positions", ["slt", "slt"]),
    ("trace.positions", []), ("trace.layers", [0, -1]), ("trace.layers", [0, 1.0]),
    ("probes.max_layer_range", -1), ("evaluate.calibration_bins", 0), ("stability.seeds", 0),
    ("stability.seeds", True), ("evaluate.calibration_bins", True), ("stability.c_grid", []),
    ("probes.c_grid", [0.1, 0]), ("probes.c_grid", [0.1, True]), ("probes.c_grid", 0.1), ("seed", "0"),
    ("toy.heads", 3), ("toy.min_terms", 5), ("toy.ood_max_terms", 4), ("toy.ood_max_operand", 19),
    ("toy.learning_rate", 0), ("sampling.temp", float("nan")), ("sampling.vllm.max_model_len", 1),
    ("sampling.vllm.enforce_eager", 0), ("semantic_entropy.cosine_threshold", True), ("model.name", ""),
    ("sampling", 3),
]


@pytest.mark.parametrize("dotted, value", BAD_VALUES)
def test_a_bad_value_names_its_key_the_value_and_what_was_expected(dotted, value):
    message = error_line(with_value(dotted, value))
    assert message.startswith(f"params.yaml: `{dotted}` = {value!r} is invalid; expected ")
    assert len(message.split("expected ", 1)[1]) > 5


def test_the_messages_say_the_type_and_range():
    assert error_line(with_value("sampling.temp", -1)) == \
        "params.yaml: `sampling.temp` = -1 is invalid; expected a number >= 0 (0 means greedy)"
    assert error_line(with_value("trace.batch_size", 2.5)).endswith("expected an integer >= 1")
    assert error_line(with_value("sampling.top_p", 1.5)).endswith("expected a fraction in (0, 1]")
    assert error_line(with_value("sampling.backend", "tgi")).endswith("expected one of ('hf', 'vllm', 'auto')")
    assert error_line(with_value("sampling.vllm.enforce_eager", 1)).endswith("expected true or false")
    assert error_line(with_value("toy.heads", 3)).endswith("expected a divisor of toy.hidden_size")
    assert "leaving room for a test split" in error_line(with_value("probes.val_fraction", 0.5))


@pytest.mark.parametrize("dotted, value", [
    ("sampling.temp", 1), ("sampling.top_p", 1), ("toy.learning_rate", 1), ("probes.c_grid", [1, 10]),
    ("semantic_entropy.cosine_threshold", -1), ("analysis.umap_min_dist", 0),
])
def test_a_number_field_takes_a_yaml_int_as_a_float(dotted, value):
    params = parse_params(with_value(dotted, value))
    *groups, key = dotted.split(".")
    for group in groups:
        params = getattr(params, group)
    loaded = getattr(params, key)
    assert loaded == (tuple(value) if isinstance(value, list) else value)
    assert all(isinstance(x, float) for x in (loaded if isinstance(loaded, tuple) else (loaded,)))


@pytest.mark.parametrize("value", [64.0, 2.5, True, "64", None])
def test_an_integer_field_takes_only_an_integer(value):
    error_line(with_value("trace.batch_size", value))


@pytest.mark.parametrize("value", [0, 1, "true", "yes", None])
def test_a_true_or_false_field_takes_only_a_bool(value):
    assert "expected true or false" in error_line(with_value("semantic_entropy.strict_entailment", value))


def test_cross_field_checks_pass_on_consistent_values():
    raw = with_value("toy.hidden_size", 96)
    raw["toy"].update(heads=3, min_terms=4, max_terms=4, ood_max_terms=5, ood_max_operand=20)
    raw["probes"].update(train_fraction=0.5, val_fraction=0.4)
    params = parse_params(raw)
    assert (params.toy.heads, params.probes.val_fraction) == (3, 0.4)


GROUPS = ["paths", "toy", "model", "data", "sampling", "sampling.vllm", "semantic_entropy", "trace", "probes",
          "evaluate", "stability", "analysis"]


@pytest.mark.parametrize("group", GROUPS + [None])
def test_an_unknown_key_is_named_with_the_known_ones(group):
    dotted = f"{group}.temprature" if group else "temprature"
    message = error_line(with_value(dotted, 0.7))
    assert message.startswith(f"params.yaml: unknown key `{dotted}` (")
    assert "known: " in message
    target = RAW
    for part in (group or "").split(".") if group else []:
        target = target[part]
    assert all(key in message for key in target)


@pytest.mark.parametrize("dotted", ["sampling.temp", "sampling.vllm.dtype", "trace", "seed", "toy.heads"])
def test_a_missing_key_is_named(dotted):
    raw = copy.deepcopy(RAW)
    *groups, key = dotted.split(".")
    target = raw
    for group in groups:
        target = target[group]
    del target[key]
    assert error_line(raw) == f"params.yaml: missing key `{dotted}`"


@pytest.mark.parametrize("dotted, typo", [("sampling.temp", "temprature"), ("model.name", "nmae"),
                                          ("semantic_entropy.nli_model", "nli_modle"), ("seed", "sede"),
                                          ("sampling.vllm.dtype", "dtpye")])
def test_a_misspelt_key_names_the_typo_and_its_closest_valid_key(dotted, typo):
    """A misspelt key also leaves the right one missing; the typo is what to report, with the key it resembles."""
    raw = copy.deepcopy(RAW)
    *groups, key = dotted.split(".")
    target = raw
    for group in groups:
        target = target[group]
    target[typo] = target.pop(key)
    wrong = ".".join([*groups, typo])
    assert error_line(raw).startswith(f"params.yaml: unknown key `{wrong}` (did you mean `{dotted}`? known: ")


def test_not_a_mapping_and_not_yaml_are_one_line_errors(tmp_path):
    with pytest.raises(ParamsError, match="top level must be a mapping"):
        parse_params(None)
    broken = tmp_path / "params.yaml"
    broken.write_text("seed: 0\nsampling: [1, 2\n")
    with pytest.raises(ParamsError, match=r"params.yaml:\d+: not valid YAML") as caught:
        load_params(broken)
    assert "\n" not in str(caught.value)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent.yaml")


def test_every_field_has_a_docstring_and_the_models_are_frozen():
    params = load_params(ROOT / "params.yaml")
    groups = [Params] + [type(getattr(params, name)) for name in Params.model_fields if name != "seed"]
    groups.append(type(params.sampling.vllm))
    for group in groups:
        for name, field in group.model_fields.items():
            assert field.description or group is Params, f"{group.__name__}.{name} has no docstring"
    with pytest.raises(ValidationError, match="frozen"):
        params.sampling.temp = 0.1
    copied = params.probes.model_copy(update={"c_grid": (0.01,), "max_layer_range": 1})  # as stability does
    assert copied.c_grid == (0.01,) and params.probes.c_grid == tuple(RAW["probes"]["c_grid"])


def run_stage_module(stage: str, directory: Path, monkeypatch, capsys) -> tuple[int, str]:
    """``python -m stages.<stage>`` in ``directory``, in this process (runpy runs the module's ``__main__`` block;
    the imports are shared): its exit status and stderr. The root logger's level is restored."""
    monkeypatch.chdir(directory)
    monkeypatch.setattr(sys, "argv", [f"stages/{stage}.py"])
    root = logging.getLogger()
    level = root.level
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module(f"stages.{stage}", run_name="__main__")
    finally:
        root.setLevel(level)
    return exit_info.value.code, capsys.readouterr().err


# (stage, key, bad value, what its one line says)
START_ERRORS = [
    ("questions", "data.n_questions", "500", "`data.n_questions` = '500' is invalid"),
    ("questions", "sampling.max_new_tokens", "96", "`sampling.max_new_tokens` = '96' is invalid"),
    ("questions", "sampling.vllm.temprature", 1, "unknown key `sampling.vllm.temprature`"),
    ("analysis", "analysis.umap_min_dist", "x", "`analysis.umap_min_dist` = 'x' is invalid"),
    ("trace", "trace.batch_size", 2.5, "`trace.batch_size` = 2.5 is invalid"),
    ("generate", "sampling.temp", -1, "`sampling.temp` = -1 is invalid"),
]


@pytest.mark.parametrize("stage, dotted, value, says", START_ERRORS)
def test_a_stage_stops_at_start_with_the_one_line(tmp_path, monkeypatch, capsys, stage, dotted, value, says):
    """In process; the next test runs one case as a real ``python -m`` process."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_value(dotted, value)))
    code, stderr = run_stage_module(stage, tmp_path, monkeypatch, capsys)
    assert code == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: params.yaml: ") and says in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_a_stage_process_stops_at_start_with_one_line_and_no_traceback(tmp_path):
    stage, dotted, value, says = START_ERRORS[0]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_value(dotted, value)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: params.yaml: ") and says in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


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
                         "gold": ["2", "4"], "level": pd.array([None, 3], dtype="Int64")})
    write_table(good, QUESTIONS, tmp_path / "q.parquet")
    assert read_table(QUESTIONS, tmp_path / "q.parquet").equals(good)
    with pytest.raises(SchemaError, match="missing column `gold`"):
        write_table(good.drop(columns="gold"), QUESTIONS, tmp_path / "bad.parquet")
    with pytest.raises(SchemaError, match=r"duplicate key \('a',\)"):
        validate_frame(pd.concat([good, good.iloc[:1]]), QUESTIONS.columns, "q", QUESTIONS.key)
    with pytest.raises(SchemaError, match="column `question` has a null at row 1"):
        validate_frame(good.assign(question=["x", None]), QUESTIONS.columns, "q")
    with pytest.raises(SchemaError, match="missing.parquet: not found"):
        read_table(QUESTIONS, tmp_path / "missing.parquet")
    assert not (tmp_path / "bad.parquet").exists()


def run_questions_stage(tmp_path: Path, level: str) -> subprocess.CompletedProcess:
    """The questions stage (fast, offline) in a scratch directory with the repository's params."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    env = {**os.environ, "SEP_LOG_LEVEL": level, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "stages.questions"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def test_one_log_level_setting_quiets_every_stage_log_line(tmp_path):
    chatty = run_questions_stage(tmp_path, "INFO")
    assert chatty.returncode == 0 and " INFO " in chatty.stderr
    quiet = run_questions_stage(tmp_path, "warning")
    assert quiet.returncode == 0 and " INFO " not in quiet.stderr
    assert (tmp_path / "data/questions/id.jsonl").is_file()


def test_a_bad_log_level_is_one_line_naming_the_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEP_LOG_LEVEL", "LOUD")
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    code, stderr = run_stage_module("questions", tmp_path, monkeypatch, capsys)
    assert code == 2 and stderr == "error: SEP_LOG_LEVEL='LOUD': expected one of DEBUG, INFO, WARNING, ERROR\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_progress_bars_follow_the_log_level(capsys):
    import logging

    from stages.lib.io.files import progress_bar
    root = logging.getLogger()
    previous = root.level
    try:
        root.setLevel(logging.INFO)
        assert list(progress_bar(range(3), desc="shown")) == [0, 1, 2]
        assert "shown" in capsys.readouterr().err
        root.setLevel(logging.WARNING)
        assert list(progress_bar(range(3), desc="hidden")) == [0, 1, 2]
        assert "hidden" not in capsys.readouterr().err
        root.setLevel(logging.INFO)
        list(progress_bar(range(3), desc="off", enabled=False))
        assert "off" not in capsys.readouterr().err
    finally:
        root.setLevel(previous)
