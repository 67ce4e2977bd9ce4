"""dvc.yaml's conventions: each stage explains itself (`desc`, shown by `dvc stage list`) and declares the params
that decide its outputs, and no params that only set one machine's speed and memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvc_project import STAGES as PIPELINE
from dvc_project import stages_a_param_reruns

REPO = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
VLLM_CAPACITY_KNOBS = {f"sampling.vllm.{key}" for key in
                       ("gpu_memory_utilization", "kv_cache_gib", "max_num_seqs", "enforce_eager",
                        "tensor_parallel_size", "data_parallel_size",
                        "checkpoint_questions")}  # questions per call: seeded per question, the samples do not move


def leaves(tree: dict, prefix: str = "") -> set[str]:
    """Dotted keys of every leaf value of a params mapping."""
    keys = set()
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        keys |= leaves(value, f"{dotted}.") if isinstance(value, dict) else {dotted}
    return keys


def covered(key: str, declared: list[str]) -> bool:
    """DVC reruns a stage when ``key`` changes iff it declares the key or a group above it."""
    return any(key == entry or key.startswith(f"{entry}.") for entry in declared)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_has_a_short_desc(stage):
    desc = STAGES[stage].get("desc", "")
    assert desc.strip(), f"dvc.yaml stage `{stage}` has no desc"
    assert len(desc) <= 70, f"dvc.yaml stage `{stage}`: keep desc within 70 characters so `dvc stage list` shows it"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_declared_param_exists(stage):
    all_keys = leaves(PARAMS)
    for entry in STAGES[stage].get("params", []):
        assert any(covered(key, [entry]) for key in all_keys), f"dvc.yaml stage `{stage}`: no param `{entry}`"


def test_generate_declares_what_is_sampled_and_not_the_machine_knobs():
    declared = STAGES["generate"]["params"]
    sampling = {key for key in leaves(PARAMS) if key.startswith("sampling.")}
    assert sampling > VLLM_CAPACITY_KNOBS  # the knobs still exist in params.yaml
    undeclared = {key for key in sampling if not covered(key, declared)}
    assert undeclared == VLLM_CAPACITY_KNOBS
    assert covered("seed", declared) and covered("model.name", declared)


# forced_answers decodes with the generation backend, so it reads which backend and what vLLM computes
# (not how to sample)
DECODING_KNOBS = ["sampling.backend", "sampling.vllm.max_model_len", "sampling.vllm.dtype",
                  "sampling.vllm.entropy_top_n"]


def test_only_generate_reads_sampling_knobs_beyond_k():
    for stage, spec in STAGES.items():
        if stage != "generate":
            extra = [entry for entry in spec.get("params", []) if covered(entry, ["sampling"])]
            allowed = ([], ["sampling.runs"]) + ((DECODING_KNOBS,) if stage == "forced_answers" else ())
            assert extra in allowed, f"dvc.yaml stage `{stage}` declares {extra}"


def test_a_sampling_change_reruns_generate_and_everything_after_it():
    """README's experiment, `dvc exp run -S sampling.temp=0.6`, reruns generate and every stage downstream of it and
    reuses toy_model and questions, by DVC's graph of dvc.yaml (tests/test_pipeline_dvc.py runs an experiment on the
    tiny pipeline and checks DVC reruns what this graph says)."""
    assert PIPELINE[:2] == ["toy_model", "questions"]
    assert stages_a_param_reruns("sampling.temp") == PIPELINE[2:]
    assert stages_a_param_reruns("evaluate.confidence") == ["evaluate", "early_exit"]  # declared as a group, a key


def test_dvc_stage_list_prints_the_descs():
    result = subprocess.run([sys.executable, "-m", "dvc", "stage", "list"], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env=os.environ | {"COLUMNS": "200", "DVC_NO_ANALYTICS": "1"})
    assert result.returncode == 0, result.stderr
    listed = dict(line.split(None, 1) for line in result.stdout.strip().splitlines())
    assert {stage: desc.strip() for stage, desc in listed.items()} == {s: STAGES[s]["desc"] for s in STAGES}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_output_persists_so_a_failed_run_deletes_nothing(stage):
    """DVC deletes a non-persistent output before running the command; the stages replace theirs all at once
    (common.stage_outputs), so every out, metric and plot must be `persist: true` (docs/design.md, "All or none")."""
    for kind in ("outs", "metrics", "plots"):
        for entry in STAGES[stage].get(kind, []):
            path, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, None)
            assert (options or {}).get("persist") is True, f"dvc.yaml stage `{stage}`: {kind} `{path}` lacks persist"


def test_the_committed_lock_was_made_by_the_committed_code():
    """README's numbers come from dvc.lock's run: every code dep (`.py`) and param each stage's lock entry records
    must be what the commit holds, so a fresh clone's `dvc status` shows no stage changed by code or params.
    Hashes only (DVC's own dependency check), no stage runs and no data read."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    stale = []
    with Repo(str(REPO)) as repo:
        for stage in repo.index.stages:
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency) or dep.def_path.endswith(".py"):
                    stale += [f"{stage.addressing}: {path} {change}" for path, change in dep.status().items()]
    assert stale == [], ("dvc.lock was not written by this code and params.yaml (rerun `dvc repro` and commit "
                         "dvc.lock with the outputs): " + "; ".join(stale))
