"""Bad inputs stop a stage at once with one line that names the file (and line, key or question) and what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from test_train_evaluate import make_params, write_fixture

from stages import generate, trace
from stages.lib.probes import dataset as dataset_lib
from stages.lib.models import loading as models
from stages.lib.io.files import read_table
from stages.lib.errors import UserError
from stages.lib.questions.sources import QuestionSourceError, jsonl_questions
from stages.lib.schema.tables import RUNS, hidden_files, hidden_shard
from stages.lib.schema.machinery import SchemaError

REPO = Path(__file__).resolve().parents[1]


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_parquet_is_named_with_the_command_that_restores_it(tmp_path):
    path = tmp_path / "id.parquet"
    pd.DataFrame({"question_id": ["q"] * 500, "run_id": range(500)}).to_parquet(path)
    truncate(path)
    with pytest.raises(SchemaError) as error:
        read_table(RUNS, path)
    assert one_line(error).startswith(f"{path}: truncated or corrupt parquet file (")
    assert f"restore it with `dvc checkout {path}`" in str(error.value)


def test_a_truncated_hidden_state_array_is_named_with_the_command_that_restores_it(tmp_path):
    params = make_params(tmp_path)
    write_fixture(params, n_id=10, n_ood=4)
    array_path = hidden_shard(hidden_files(params.paths.hidden, "id")[0], "slt")
    truncate(array_path)
    with pytest.raises(SchemaError) as error:
        dataset_lib.load_dataset(params, "id")
    message = one_line(error)
    assert message.startswith(f"{array_path}: truncated or corrupt .npy array (mmap length is greater than file size)")
    assert f"`dvc checkout {array_path}`" in message


def test_non_utf8_bytes_in_a_question_file_name_the_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_bytes(b'{"id": "a", "question": "1+1", "answer": "2"}\n'
                     b'{"id": "b", "question": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(QuestionSourceError) as error:
        jsonl_questions(path, 5)
    assert one_line(error) == f"{path}:2: not UTF-8 (byte 0xe9 at column 29); save the file as UTF-8"


@pytest.mark.parametrize("field, value, kind", [("question", ["1+1"], "array"), ("answer", {"x": 2}, "object"),
                                                ("answer", True, "boolean")])
def test_a_list_or_dict_where_a_string_is_expected_is_refused(tmp_path, field, value, kind):
    path = tmp_path / "q.jsonl"
    record = {"id": "a", "question": "1+1", "answer": "2"} | {field: value}
    path.write_text(json.dumps({"id": "z", "question": "2+2", "answer": 4}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(QuestionSourceError) as error:
        jsonl_questions(path, 5)
    assert one_line(error) == (f"{path}: line 2: field `{field}` is a JSON {kind}; expected a string (or a number)")
    assert jsonl_questions(path, 1) == [("z", "2+2", "4")]  # a number is fine


# ---- model limits, checked before any work ----------------------------------------------------------------
@pytest.fixture
def project(tmp_path, tiny_lm_dir, monkeypatch):
    """A working directory with params.yaml naming the tiny LM (copied under data/models/) and question files."""
    shutil.copytree(tiny_lm_dir, tmp_path / "data/models/tiny")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["model"]["name"] = "data/models/tiny"
    raw["sampling"]["max_new_tokens"] = 100
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    questions = tmp_path / raw["paths"]["questions"]
    questions.mkdir(parents=True)
    rows = [{"question_id": "id-0", "dataset": "id", "question": "1+2", "gold": "3"}]
    (questions / "id.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    long = {"question_id": "ood-long", "dataset": "ood", "question": "1+" * 250 + "1", "gold": "251"}
    (questions / "ood.jsonl").write_text(json.dumps(rows[0] | {"question_id": "ood-0", "dataset": "ood"}) + "\n"
                                         + json.dumps(long) + "\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path, raw


def test_a_prompt_past_the_models_positions_fails_before_anything_is_generated(project, monkeypatch):
    root, raw = project

    def must_not_sample(*args, **kwargs):
        raise AssertionError("generation started")

    monkeypatch.setattr(generate, "sample_runs", must_not_sample)
    with pytest.raises(UserError) as error:
        generate.main()
    message = one_line(error)
    path = Path(raw["paths"]["questions"]) / "ood.jsonl"
    assert message.startswith(f"{path}: question 'ood-long' is ")
    assert "+ sampling.max_new_tokens 100 = " in message and "> the model's 512 positions (1 question(s) too long)" \
        in message and "lower sampling.max_new_tokens" in message
    assert not (root / raw["paths"]["runs"]).exists()


def test_trace_layers_out_of_range_fail_before_the_weights_load(project, monkeypatch):
    root, raw = project
    raw["trace"]["layers"] = [0, 7]
    (root / "params.yaml").write_text(yaml.safe_dump(raw))

    def must_not_load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", must_not_load)
    with pytest.raises(UserError) as error:
        trace.main()
    assert one_line(error) == "params.yaml: `trace.layers` has [7]; this model has hidden states 0..2"


def test_models_require_prompts_fit_by_hand():
    models.require_prompts_fit([3, 10], ["a", "b"], 2, 12, "q.jsonl")  # 10 + 2 = 12 fits exactly
    models.require_prompts_fit([10_000], ["a"], 2, None, "q.jsonl")  # no limit known
    with pytest.raises(UserError, match=r"^q.jsonl: question 'c' is 12 prompt tokens, \+ sampling.max_new_tokens 2 "
                                        r"= 14 > the model's 12 positions \(2 question\(s\) too long\)"):
        models.require_prompts_fit([11, 3, 12], ["a", "b", "c"], 2, 12, "q.jsonl")
