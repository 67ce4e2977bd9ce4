"""Bad inputs stop a stage at once with one line that names the file (and line, key or question) and what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from test_train_evaluate import make_params, write_fixture

from stages import generate, toy_model, trace
from stages.lib.probes import dataset as dataset_lib
from stages.lib.models import loading as models
from stages.lib.sampling.checkpoints import GenerationCheckpoints
from stages.lib.io.files import read_table, run_stage, stage_outputs
from stages.lib.errors import UserError
from stages.lib.questions.sources import QuestionSourceError, jsonl_questions
from stages.lib.sampling.runs import SampledRun
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
    assert f"restore it with `dvc checkout --force {path}`" in str(error.value)


def test_a_truncated_hidden_state_array_is_named_with_the_command_that_restores_it(tmp_path):
    params = make_params(tmp_path)
    write_fixture(params, n_id=10, n_ood=4)
    array_path = hidden_shard(hidden_files(params.paths.hidden, "id")[0], "slt")
    truncate(array_path)
    with pytest.raises(SchemaError) as error:
        dataset_lib.load_dataset(params, "id")
    message = one_line(error)
    assert message.startswith(f"{array_path}: truncated or corrupt .npy array (mmap length is greater than file size)")
    assert f"`dvc checkout --force {array_path}`" in message


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


# ---- issue 23, item 7: every fault is one line naming the key or file -----------------------------------------
def test_nan_in_a_hidden_state_file_names_the_file_and_row(tmp_path):
    params = make_params(tmp_path)
    write_fixture(params, n_id=10, n_ood=4)
    array_path = hidden_shard(hidden_files(params.paths.hidden, "id")[0], "slt")
    array = np.load(array_path)
    array[3, 0, 5] = np.nan
    np.save(array_path, array)
    with pytest.raises(SchemaError) as error:
        dataset_lib.load_dataset(params, "id")
    assert one_line(error).startswith(f"{array_path}: non-finite hidden state in row 3 (question_id=")


def test_a_corrupt_generate_checkpoint_is_named_removed_and_resampled(tmp_path, caplog):
    run = SampledRun(generated_ids=[5, 6], token_logprobs=[-0.5, -0.25], token_entropies=[1.0, 0.5],
                     stop_entropy=0.1, truncated=False, token_topk_logprob_mean=[-2.0, -1.5])
    checkpoints = GenerationCheckpoints("key", root=tmp_path)
    checkpoints.save("id", 0, [run])
    checkpoints.save("id", 1, [run])
    path = checkpoints.directory / "id-000000.npz"
    truncate(path)
    assert checkpoints.load("id", 0) is None  # sampled again, not a traceback
    assert not path.exists()
    assert f"{path}: corrupt generation checkpoint (" in caplog.text
    assert checkpoints.load("id", 1)[0].generated_ids == [5, 6]


def test_disk_full_is_one_line_and_leaves_the_previous_outputs(tmp_path, capsys, monkeypatch):
    """A real ENOSPC from the kernel (/dev/full) inside a stage run: one line, status 2, no traceback."""
    monkeypatch.setattr("sys.argv", ["stage"])
    previous = tmp_path / "out.json"
    previous.write_text("old")

    def main():
        with stage_outputs() as outputs:
            outputs.path(previous).write_text("new")
            with open("/dev/full", "w") as full:
                full.write("x" * 100_000)
                full.flush()

    with pytest.raises(SystemExit) as exit_info:
        run_stage(main, None)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert message == "error: no space left on device; free some space and rerun (the previous outputs are left as " \
                      "they were)"
    assert previous.read_text() == "old"


def test_a_missing_local_model_stops_toy_model_and_keeps_the_trained_toy(tmp_path, monkeypatch):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["model"]["name"] = "data/models/not-there"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    toy = tmp_path / raw["paths"]["toy_model"]
    toy.mkdir(parents=True)
    (toy / "config.json").write_text("{}")  # the trained toy
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as error:
        toy_model.main()
    assert one_line(error).startswith("params.yaml: `model.name` = 'data/models/not-there': no such file or "
                                      "directory")
    assert sorted(p.name for p in toy.iterdir()) == ["config.json"]


def test_an_unknown_nli_model_hub_id_is_one_line_at_once():
    """The Hub is unreachable here: one metadata request, not transformers' 50 s of retries."""
    from stages.lib.semantic.equivalence import NliClassifier

    with pytest.raises(UserError) as error:
        NliClassifier("nobody-here/no-such-nli-model")
    assert one_line(error).startswith("params.yaml: `semantic_entropy.nli_model` = 'nobody-here/no-such-nli-model': ")


def test_the_printed_recovery_command_restores_a_corrupt_output(tmp_path):
    """`dvc checkout <path>` fails in DVC 3.67 on a modified file; the command the error prints must work."""
    import re
    import subprocess

    from dvc_project import ENV, sh

    sh("git", "init", "-q", cwd=tmp_path)
    sh("dvc", "init", "-q", cwd=tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    frame = pd.DataFrame({"question_id": ["q"] * 500, "run_id": range(500)})
    frame.to_parquet(out / "id.parquet")
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: 'true'\n    outs:\n      - out:\n"
                                       "          persist: true\n")
    sh("dvc", "commit", "-f", "-q", "s", cwd=tmp_path)
    truncate(out / "id.parquet")
    with pytest.raises(SchemaError) as error:
        read_table(RUNS, out / "id.parquet")
    command = re.search(r"restore it with `([^`]+)`", one_line(error)).group(1)
    subprocess.run(command, shell=True, cwd=tmp_path, env=ENV, check=True, capture_output=True, timeout=300)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "id.parquet"), frame)
