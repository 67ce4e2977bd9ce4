"""`dvc repro` keeps what it has: a killed or failing run leaves every previous output in place, files named in
params are deps, and the tiny configuration reproduces bit for bit in a second copy of the repository.

The kill, bad-param and data-file tests each get a copy of one small project over a tiny random LM, run up to trace
once per module (seconds of compute); the reproducibility check compares the session's `tiny_run` (the tiny
configuration of tests/dvc_project.py, shared with the other end-to-end tests) with a second fresh copy that the
same fixture reproduces at the same time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import yaml
from dvc_project import ENV, copy_project, make_project, ran_stages, sh

OUTPUT_ROOTS = ("data", "artifacts")
# Measured wall seconds differ from run to run: the cost records, and the ratio computed from them.
TIMED = ("artifacts/metrics/cost/", "artifacts/metrics/cost_ratio.json")


def file_hashes(project: Path) -> dict[str, str]:
    """md5 of every file under data/ and artifacts/ (temporaries of a killed run left out)."""
    hashes = {}
    for root in OUTPUT_ROOTS:
        for path in sorted((project / root).rglob("*")):
            relative = path.relative_to(project)
            if path.is_file() and not any(part.startswith((".tmp-", ".old-")) for part in relative.parts):
                hashes[relative.as_posix()] = hashlib.md5(path.read_bytes()).hexdigest()
    return hashes


def locked_outputs(project: Path) -> dict[str, str]:
    """Every output's md5 as dvc.lock records it, by path."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def set_params(project: Path, **changes) -> None:
    """Set dotted keys of the project's params.yaml (``set_params(p, **{"trace.batch_size": 3})``)."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    for dotted, value in changes.items():
        *groups, key = dotted.split(".")
        node = params
        for group in groups:
            node = node[group]
        node[key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def leftovers(project: Path) -> list[str]:
    return sorted(str(p.relative_to(project)) for root in OUTPUT_ROOTS for p in (project / root).rglob(".tmp-*"))


def write_questions(path: Path, questions: list[str]) -> None:
    path.write_text("".join(json.dumps({"id": f"{path.stem}{i}", "question": question, "answer": "2"}) + "\n"
                            for i, question in enumerate(questions)))


def small_project(directory: Path, tiny_lm_dir: Path) -> Path:
    """A fresh project on a tiny random LM under data/models/ and question files under data/sources/, run up to
    trace in seconds: the stages that read files named in params, and the stage that reads the model twice."""
    project = make_project(directory)
    sources = project / "data/sources"
    write_questions(sources / "mine.jsonl", ["1+1", "3-1", "4-2"])
    write_questions(sources / "ood.jsonl", ["1+1+0", "5-3"])
    write_questions(sources / "unused.jsonl", ["2+0"])
    shutil.copytree(tiny_lm_dir, project / "data/models/tiny")
    set_params(project, **{"model.name": "data/models/tiny", "data.source": "jsonl:data/sources/mine.jsonl",
                           "data.n_questions": 3, "data.ood_source": "jsonl:data/sources/ood.jsonl",
                           "data.n_ood_questions": 2, "sampling.runs": 2, "sampling.max_new_tokens": 8})
    return project


def repro_trace(project: Path) -> list[str]:
    return ran_stages(sh("dvc", "repro", "trace", cwd=project).stdout)


@dataclass(frozen=True)
class Traced:
    """``small_project`` after one `dvc repro trace` (not committed), and the stages that run ran."""

    project: Path
    ran: list[str]


@pytest.fixture(scope="module")
def traced(tmp_path_factory, tiny_lm_dir) -> Traced:
    """One small project run up to trace for this module; each test works on its own copy (``copy_project``)."""
    project = small_project(tmp_path_factory.mktemp("small") / "project", tiny_lm_dir)
    return Traced(project, repro_trace(project))


@pytest.mark.slow
def test_sigkill_mid_stage_keeps_every_previous_output_and_a_rerun_recovers(traced, tmp_path):
    project = copy_project(traced.project, tmp_path / "project")
    before, lock_before = file_hashes(project), (project / "dvc.lock").read_text()
    set_params(project, **{"trace.batch_size": 1})  # reruns trace
    repro = subprocess.Popen(["dvc", "repro", "trace"], cwd=project, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)  # its own process group
    deadline = time.monotonic() + 600
    while not list((project / "artifacts").glob(".tmp-hidden-*")):  # the trace stage is running, mid-write
        assert repro.poll() is None, f"dvc repro ended before the trace stage wrote anything:\n{repro.stdout.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(repro.pid, signal.SIGKILL)
    repro.wait()
    repro.stdout.close()

    assert leftovers(project), "killed before trace started writing"
    assert file_hashes(project) == before  # every previous output in place, byte for byte, cost records included
    assert (project / "dvc.lock").read_text() == lock_before

    assert repro_trace(project) == ["trace"]
    assert "up to date" in sh("dvc", "status", "trace", cwd=project).stdout
    assert leftovers(project) == []  # the killed run's temporaries are gone
    upstream = ("artifacts/toy_model/", "data/")  # what trace reads is untouched
    after = file_hashes(project)
    assert {k: v for k, v in after.items() if k.startswith(upstream)} == \
        {k: v for k, v in before.items() if k.startswith(upstream)}


@pytest.mark.slow
def test_a_bad_param_through_dvc_repro_single_stage_leaves_the_outputs(traced, tmp_path):
    project = copy_project(traced.project, tmp_path / "project")
    before = file_hashes(project)
    set_params(project, **{"data.n_questions": "500"})
    failed = sh("dvc", "repro", "-s", "questions", cwd=project, check=False)
    assert failed.returncode != 0
    assert "params.yaml: `data.n_questions` = '500' is invalid; expected an integer >= 1" in failed.stderr
    assert file_hashes(project) == before and leftovers(project) == []
    # the next stage still finds its inputs: nothing to do for generate, whose deps did not change
    assert ran_stages(sh("dvc", "repro", "-s", "generate", cwd=project).stdout) == []


@pytest.mark.slow
def test_an_edited_question_file_or_local_model_reruns_exactly_what_reads_it(traced, tmp_path):
    """Each edit reruns exactly the stages that read the edited file (up to trace: the rest only follows them)."""
    project = copy_project(traced.project, tmp_path / "project")
    sources, model = project / "data/sources", project / "data/models/tiny"
    repro = partial(repro_trace, project)
    assert traced.ran == ["toy_model", "questions", "generate", "trace"]
    assert repro() == []  # a copy (git history, DVC cache, workspace) is up to date
    write_questions(sources / "mine.jsonl", ["1+1", "3-1", "9-7"])  # a question edited in place
    assert repro() == ["questions", "generate", "trace"]
    assert json.loads((project / "data/questions/id.jsonl").read_text().splitlines()[2])["question"] == "9-7"
    write_questions(sources / "unused.jsonl", ["7-5"])  # a file no param names: questions reruns, nothing changes
    assert repro() == ["questions"]
    (project / "data/models/other.gguf").write_bytes(b"a model nobody names")
    assert repro() == ["toy_model"]  # the placeholder holds the named model's hash only: unchanged
    config = model / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"rms_norm_eps": 1e-5}, indent=2))
    assert repro() == ["toy_model", "generate", "trace"]


@pytest.mark.slow
def test_a_second_copy_on_another_cpu_reproduces_every_output_hash(tiny_run, second_tiny_copy):
    """CI's reproducibility check: the tiny pipeline in a second fresh copy, reproduced beside the session's
    `tiny_run` as on another CPU (lower instruction set, one thread, one core: `OTHER_CPU` in dvc_project), gives
    the same outputs bit for bit (the cost records, which hold measured seconds and the machine, left out)."""
    first, again = locked_outputs(tiny_run.project), locked_outputs(second_tiny_copy)
    assert set(first) == set(again)
    differ = sorted(path for path in first if first[path] != again[path] and not path.startswith(TIMED))
    assert differ == [], f"outputs that did not reproduce: {differ}"
    assert any(path.startswith(TIMED) for path in first)  # the timed files are outputs too, only not compared
    for project in (tiny_run.project, second_tiny_copy):
        machine = json.loads((project / "artifacts/metrics/cost/toy_model.json").read_text())["machine"]
        assert (machine["aten_capability"], machine["torch_threads"]) == ("AVX2", 2)
        assert "MKL_CBWR=AVX2 " in machine["pinned"] and machine["torch"] and machine["cpu_model"]
