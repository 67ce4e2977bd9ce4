"""A generate stage killed with SIGKILL halfway resumes from its checkpoints and writes exactly the runs of an
uninterrupted stage; checkpoints of other params, questions or models are never read (tiny local model)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from stages.lib.sampling.checkpoints import CHECKPOINT_ROOT, GenerationCheckpoints, generation_key
from stages.lib.params import parse_params
from stages.lib.questions.sources import questions_frame, write_questions
from stages.lib.sampling.runs import SampledRun

ROOT = Path(__file__).resolve().parents[1]
N_QUESTIONS = 20


def make_project(directory: Path, model_dir: Path) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"] = {name: str(directory / name) for name in raw["paths"]}
    (directory / "data/models").mkdir(parents=True, exist_ok=True)  # a local model is a DVC dep under data/models/
    (directory / "data/models/tiny_lm").symlink_to(Path(model_dir).resolve(), target_is_directory=True)
    raw["model"]["name"] = "data/models/tiny_lm"  # relative: the stage runs in ``directory``
    raw["sampling"].update(runs=2, batch_size=2, max_new_tokens=32)  # one question per generate() call
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.yaml").write_text(yaml.safe_dump(raw))
    questions = directory / "questions"
    questions.mkdir(exist_ok=True)
    rows = [(f"q{i:02d}", f"{i}+{i % 7}", str(i + i % 7)) for i in range(N_QUESTIONS)]
    write_questions(questions_frame(rows, "id", "jsonl:x"), questions / "id.jsonl")
    write_questions(questions_frame([], "ood", "jsonl:x"), questions / "ood.jsonl")
    return raw


def start_generate(directory: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stages.generate"], cwd=directory,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_a_killed_generate_resumes_with_the_same_records(tiny_lm_dir, tmp_path):
    reference_dir, killed_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    for directory in (reference_dir, killed_dir):
        make_project(directory, tiny_lm_dir)
    reference = start_generate(reference_dir)
    assert reference.wait(timeout=600) == 0, reference.stderr.read()[-2000:]

    process = start_generate(killed_dir)
    checkpoint_root = killed_dir / CHECKPOINT_ROOT
    deadline = time.monotonic() + 600
    while len(list(checkpoint_root.glob("*/id-*.npz"))) < 3:
        assert process.poll() is None and time.monotonic() < deadline, "generate ended before 3 calls finished"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = len(list(checkpoint_root.glob("*/id-*.npz")))
    assert finished < N_QUESTIONS and not (killed_dir / "runs" / "id.parquet").exists()  # killed halfway

    resumed = start_generate(killed_dir)
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:]
    for dataset in ("id", "ood"):
        pd.testing.assert_frame_equal(pd.read_parquet(killed_dir / "runs" / f"{dataset}.parquet"),
                                      pd.read_parquet(reference_dir / "runs" / f"{dataset}.parquet"))
    cost = json.loads((killed_dir / "metrics" / "cost" / "generate.json").read_text())
    assert finished <= cost["calls_resumed"] < N_QUESTIONS  # read back, not resampled; the rest sampled
    assert not list(checkpoint_root.glob("*/*.npz"))  # removed once the outputs are in place


def test_the_key_changes_with_params_questions_and_model(tiny_lm_dir, tmp_path, monkeypatch):
    raw = make_project(tmp_path, tiny_lm_dir)
    monkeypatch.chdir(tmp_path)
    questions = [tmp_path / "questions" / "id.jsonl", tmp_path / "questions" / "ood.jsonl"]
    key = generation_key(parse_params(raw), questions)
    assert generation_key(parse_params(raw), questions) == key
    changed = {**raw, "sampling": {**raw["sampling"], "temp": 0.5}}
    assert generation_key(parse_params(changed), questions) != key
    assert generation_key(parse_params({**raw, "seed": 1}), questions) != key
    moved = tmp_path / "data/models/other_model"
    moved.mkdir()
    (moved / "config.json").write_text((Path(tiny_lm_dir) / "config.json").read_text() + " ")
    other = {**raw, "model": {**raw["model"], "name": "data/models/other_model"}}
    assert generation_key(parse_params(other), questions) != key
    with questions[0].open("a") as out:
        out.write(json.dumps({"question_id": "new", "dataset": "id", "question": "1+1", "gold": "2"}) + "\n")
    assert generation_key(parse_params(raw), questions) != key


def test_a_checkpoint_of_other_code_is_discarded_on_resume(tiny_lm_dir, tmp_path, monkeypatch):
    """A checkpoint written, then a code dep of generate edited (the entropy computation in sampling_hf.py): the
    resume gets a new key and deletes the old checkpoint unread, so no run mixes two versions of the code. An edit
    of a file generate does not import keeps the key (and the hours of finished calls)."""
    raw = make_project(tmp_path / "project", tiny_lm_dir)
    monkeypatch.chdir(tmp_path / "project")
    code = tmp_path / "code"  # a copy of the repository's code, to edit
    shutil.copytree(ROOT / "stages", code / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", code / "dvc.yaml")
    params, questions = parse_params(raw), [Path("questions/id.jsonl"), Path("questions/ood.jsonl")]
    key = generation_key(params, questions, code_root=code)
    assert key == generation_key(params, questions, code_root=code)
    run = SampledRun(generated_ids=[5, 6], token_logprobs=[-0.5, -0.25], token_entropies=[1.0, 0.5],
                     stop_entropy=0.1, truncated=False, token_topk_logprob_mean=[-2.0, -1.5])
    GenerationCheckpoints(key).save("id", 0, [run])

    with (code / "stages/lib/evaluation/scoring.py").open("a") as out:  # not a dep of generate
        out.write("# an edit elsewhere\n")
    assert generation_key(params, questions, code_root=code) == key
    assert GenerationCheckpoints(key).load("id", 0)[0].generated_ids == [5, 6]

    sampling = code / "stages/lib/sampling/hf.py"
    sampling.write_text(sampling.read_text().replace("entropy", "entropy ", 1))
    resumed_key = generation_key(params, questions, code_root=code)
    assert resumed_key != key
    resumed = GenerationCheckpoints(resumed_key)
    assert resumed.load("id", 0) is None and not (CHECKPOINT_ROOT / key).exists()


def test_stale_checkpoints_are_deleted_and_never_read(tmp_path):
    run = SampledRun(generated_ids=[5, 6], token_logprobs=[-0.5, -0.25], token_entropies=[1.0, 0.5],
                     stop_entropy=0.1, truncated=False, token_topk_logprob_mean=[-2.0, -1.5])
    old = GenerationCheckpoints("old", root=tmp_path)
    old.save("id", 0, [run])
    assert GenerationCheckpoints("old", root=tmp_path).load("id", 0)[0].generated_ids == [5, 6]
    new = GenerationCheckpoints("new", root=tmp_path)
    assert new.load("id", 0) is None and not (tmp_path / "old").exists()


def test_a_failed_vllm_generate_resumes_from_its_finished_calls(tiny_lm_dir, tmp_path, monkeypatch):
    """vLLM backend (the stand-in engine of test_vllm_backend) with checkpoint_questions = 2: an engine that dies
    on its third call leaves two calls checkpointed; the rerun sends only the rest and writes the records of an
    uninterrupted run."""
    from test_vllm_backend import FAKE_VLLM, FakeLLM

    from stages import generate
    from stages.lib.sampling import vllm as sampling_vllm

    raw = make_project(tmp_path, tiny_lm_dir)
    raw["sampling"].update(backend="vllm", temp=1.0, top_p=1.0, max_new_tokens=6)
    raw["sampling"]["vllm"].update(checkpoint_questions=2, entropy_top_n=5)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sampling_vllm, "resolve_backend", lambda requested: "vllm")
    monkeypatch.setattr(sampling_vllm, "import_vllm", lambda: FAKE_VLLM)
    calls_per_dataset = -(-N_QUESTIONS // 2)

    FakeLLM.instances.clear()
    generate.main()
    uninterrupted = pd.read_parquet(tmp_path / "runs" / "id.parquet")
    assert len(FakeLLM.instances[0].received) == calls_per_dataset

    class DyingLLM(FakeLLM):
        def generate(self, prompts, sampling_params=None, *, use_tqdm=True):
            if len(self.received) == 2:
                raise RuntimeError("engine died")
            return super().generate(prompts, sampling_params, use_tqdm=use_tqdm)

    monkeypatch.setattr(sampling_vllm, "import_vllm", lambda: SimpleNamespace(**{**vars(FAKE_VLLM), "LLM": DyingLLM}))
    with pytest.raises(RuntimeError, match="engine died"):
        generate.main()
    assert len(list((tmp_path / CHECKPOINT_ROOT).glob("*/id-*.npz"))) == 2

    monkeypatch.setattr(sampling_vllm, "import_vllm", lambda: FAKE_VLLM)
    FakeLLM.instances.clear()
    generate.main()
    assert len(FakeLLM.instances[0].received) == calls_per_dataset - 2  # the two finished calls were read back
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "runs" / "id.parquet"), uninterrupted)


def test_a_checkpoint_from_before_the_top_k_means_is_sampled_again(tmp_path):
    checkpoints = GenerationCheckpoints("key", root=tmp_path)
    np.savez(checkpoints.directory / "id-000000.npz", lengths=np.array([2]), generated_ids=np.array([5, 6]),
             token_logprobs=np.array([-0.5, -0.25], np.float32), token_entropies=np.array([1.0, 0.5], np.float32),
             stop_entropy=np.array([0.1]), truncated=np.array([False]))
    assert checkpoints.load("id", 0) is None
    run = SampledRun(generated_ids=[5, 6], token_logprobs=np.array([-0.5, -0.25], np.float32),
                     token_entropies=np.array([1.0, 0.5], np.float32), stop_entropy=0.1, truncated=False,
                     token_topk_logprob_mean=np.array([-2.0, -1.5], np.float32))
    checkpoints.save("id", 0, [run])
    np.testing.assert_array_equal(checkpoints.load("id", 0)[0].token_topk_logprob_mean, [-2.0, -1.5])
