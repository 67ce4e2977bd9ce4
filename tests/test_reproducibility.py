"""`dvc repro` keeps what it has: a killed or failing run leaves every previous output in place, files named in
params are deps, and the tiny configuration reproduces bit for bit in a second copy of the repository.

All of these run DVC on the tiny project of tests/dvc_project.py (the `tiny_run` fixture is shared with the other
end-to-end tests, so the pipeline runs once per session here, plus once more for the second copy).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from dvc_project import ENV, make_project, ran_stages, sh

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


@pytest.mark.slow
def test_sigkill_mid_stage_keeps_every_previous_output_and_a_rerun_recovers(tiny_project):
    project = tiny_project
    before, lock_before = file_hashes(project), (project / "dvc.lock").read_text()
    set_params(project, **{"trace.batch_size": 3})  # reruns trace, and what follows if its arrays change
    repro = subprocess.Popen(["dvc", "repro"], cwd=project, env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)  # its own process group
    deadline = time.monotonic() + 600
    while not list((project / "artifacts").glob(".tmp-hidden-*")):  # the trace stage is running, mid-write
        assert repro.poll() is None, f"dvc repro ended before the trace stage wrote anything:\n{repro.stdout.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(repro.pid, signal.SIGKILL)
    repro.wait()
    repro.stdout.close()

    assert leftovers(project), "killed before trace started writing"
    assert file_hashes(project) == before  # every previous output in place, byte for byte, metrics included
    assert (project / "dvc.lock").read_text() == lock_before

    rerun = sh("dvc", "repro", cwd=project)
    assert ran_stages(rerun.stdout)[0] == "trace"
    assert "up to date" in sh("dvc", "status", cwd=project).stdout
    assert leftovers(project) == []  # the killed run's temporaries are gone
    upstream = ("artifacts/toy_model/", "data/")  # what trace reads is untouched
    after = file_hashes(project)
    assert {k: v for k, v in after.items() if k.startswith(upstream)} == \
        {k: v for k, v in before.items() if k.startswith(upstream)}


@pytest.mark.slow
def test_a_bad_param_through_dvc_repro_single_stage_leaves_the_outputs(tiny_project):
    project = tiny_project
    before = file_hashes(project)
    set_params(project, **{"data.n_questions": "500"})
    failed = sh("dvc", "repro", "-s", "questions", cwd=project, check=False)
    assert failed.returncode != 0
    assert "params.yaml: `data.n_questions` = '500' is invalid; expected an integer >= 1" in failed.stderr
    assert file_hashes(project) == before and leftovers(project) == []
    # the next stage still finds its inputs: nothing to do for generate, whose deps did not change
    assert ran_stages(sh("dvc", "repro", "-s", "generate", cwd=project).stdout) == []


def changed_stages(project: Path, *stages: str) -> set[str]:
    return set(json.loads(sh("dvc", "status", "--json", *stages, cwd=project).stdout or "{}"))


@pytest.mark.slow
def test_an_edited_question_file_or_local_model_reruns_exactly_what_reads_it(tiny_project, tiny_lm_dir):
    project = tiny_project
    source = project / "data/sources/mine.jsonl"
    source.write_text("".join(json.dumps({"id": f"q{i}", "question": f"{i}+1", "answer": str(i + 1)}) + "\n"
                              for i in range(3)))
    set_params(project, **{"data.source": "jsonl:data/sources/mine.jsonl", "data.n_questions": 3})
    sh("dvc", "repro", "-s", "questions", cwd=project)
    assert changed_stages(project, "questions") == set()

    source.write_text(source.read_text().replace('"answer": "3"', '"answer": "three"'))
    assert changed_stages(project, "questions") == {"questions"}
    sh("dvc", "repro", "-s", "questions", cwd=project)
    golds = [json.loads(line)["gold"] for line in (project / "data/questions/id.jsonl").read_text().splitlines()]
    assert golds == ["1", "2", "three"]

    # a local model: its content hash in toy_model's output is what generate and trace depend on
    shutil.copytree(tiny_lm_dir, project / "data/models/tiny")
    set_params(project, **{"model.name": "data/models/tiny"})
    sh("dvc", "repro", "-s", "toy_model", cwd=project)
    sh("dvc", "commit", "-f", "generate", "trace", cwd=project)  # record them as up to date without running
    stamp = locked_outputs(project)["artifacts/toy_model"]

    (project / "data/models/other.gguf").write_bytes(b"another model nobody names")
    sh("dvc", "repro", "-s", "toy_model", cwd=project)  # data/models changed: the stage reruns, its output does not
    assert locked_outputs(project)["artifacts/toy_model"] == stamp
    assert changed_stages(project, "generate", "trace") == set()

    config = project / "data/models/tiny/config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"rms_norm_eps": 1e-5}, indent=2))
    sh("dvc", "repro", "-s", "toy_model", cwd=project)
    assert locked_outputs(project)["artifacts/toy_model"] != stamp
    assert changed_stages(project, "generate", "trace") == {"generate", "trace"}


@pytest.mark.slow
def test_a_second_copy_reproduces_every_output_hash(tiny_run, tmp_path):
    """CI's reproducibility check: the tiny pipeline in a fresh copy gives the committed run's outputs, bit for bit
    (the cost records, which hold measured seconds, left out)."""
    second = make_project(tmp_path / "second")
    sh("dvc", "repro", cwd=second)
    first, again = locked_outputs(tiny_run.project), locked_outputs(second)
    assert set(first) == set(again)
    differ = sorted(path for path in first if first[path] != again[path] and not path.startswith(TIMED))
    assert differ == [], f"outputs that did not reproduce: {differ}"
    assert any(path.startswith(TIMED) for path in first)  # the timed files are outputs too, only not compared
