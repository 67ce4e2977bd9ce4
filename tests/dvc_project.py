"""A fresh git + DVC copy of this repository on a tiny configuration, for the end-to-end tests.

`make_project` copies what a user clones (stages/, dvc.yaml, params.yaml, .dvc/config, the plot templates
in .dvc/plots/ and the README of data/sources/ and data/models/), shrinks params.yaml to TINY and commits. The
`tiny_run` fixture runs `dvc repro` on it once per session and commits the result (and reproduces a second fresh
copy at the same time for the reproducibility check, `second_tiny_copy`); `tiny_project` hands each test its own
copy (git history, DVC cache and workspace), so tests can change it freely without running the pipeline again.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["toy_model", "questions", "generate", "semantic_entropy", "trace", "train_probes", "evaluate", "analysis",
          "stability", "cost_ratio", "forced_answers", "early_exit"]

# Small enough to run in about a minute, large enough that every split holds both classes.
TINY = {
    "toy": dict(layers=2, hidden_size=64, heads=2, intermediate_size=128, steps=400, batch_size=64, min_terms=2,
                max_terms=3, max_operand=12, ood_max_terms=4, ood_max_operand=12, ood_train_fraction=0.1),
    "data": dict(n_questions=40, n_ood_questions=12),
    "sampling": dict(runs=4, temp=1.0, max_new_tokens=40),
    "probes": dict(cv_folds=2, c_grid=[0.1, 1.0]),
    "evaluate": dict(bootstrap=50, permutations=50),
    "stability": dict(seeds=2, c_grid=[1.0]),
    "analysis": dict(umap_neighbors=5),
}

# No AWS setting of this machine (variables, ~/.aws) reaches the tests: credentials reach DVC only where a test
# passes them, and botocore never asks the EC2 metadata service (a network call) for any.
_NO_FILE = "/nonexistent/aws-config"
ENV = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
ENV.update({"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test",
            "GIT_COMMITTER_EMAIL": "test@example.com", "DVC_NO_ANALYTICS": "1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": _NO_FILE, "AWS_SHARED_CREDENTIALS_FILE": _NO_FILE})


def sh(*args: str, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=900, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def make_project(directory: Path) -> Path:
    for folder in ("data/sources", "data/models"):  # the DVC deps for files named in params: their README only
        (directory / folder).mkdir(parents=True)
        shutil.copy(ROOT / folder / "README.md", directory / folder / "README.md")
    for name in ("stages", "dvc.yaml", "params.yaml"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, directory / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, directory / name)
    params = yaml.safe_load((directory / "params.yaml").read_text())
    for group, values in TINY.items():
        params[group].update(values)
    (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return init_repository(directory, "tiny pipeline")


def init_repository(directory: Path, message: str) -> Path:
    """git + DVC init ``directory`` with this repository's DVC settings, and commit what it holds."""
    sh("git", "init", "-q", cwd=directory)
    sh("dvc", "init", "-q", cwd=directory)
    # The repository's own DVC settings: default remote, core.autostage, offline plot templates.
    shutil.copy(ROOT / ".dvc/config", directory / ".dvc/config")
    shutil.copytree(ROOT / ".dvc/plots", directory / ".dvc/plots")
    sh("git", "add", "-A", cwd=directory)
    sh("git", "commit", "-qm", message, cwd=directory)
    return directory


def ran_stages(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def stages_a_param_reruns(key: str, project: Path = ROOT) -> list[str]:
    """The stages `dvc repro` reruns when param ``key`` changes, in STAGES order: those that declare it (or a group
    above it) and every stage downstream of them, in DVC's own graph of ``project``'s dvc.yaml."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        graph = repo.index.graph  # an edge runs from a stage to a stage it depends on
        declaring = [stage for stage in graph for dependency in stage.params for entry in dependency.params
                     if key == entry or key.startswith(f"{entry}.")]
        reruns = {s.name for stage in declaring for s in {stage} | nx.ancestors(graph, stage)}
    return [stage for stage in STAGES if stage in reruns]


def copy_project(source: Path, destination: Path) -> Path:
    """A copy of a project with its git history, DVC cache and workspace (DVC's lock and temp files left out)."""
    shutil.copytree(source, destination, symlinks=True,
                    ignore=lambda folder, names: ["tmp"] if Path(folder).name == ".dvc" else [])
    return destination


@dataclass(frozen=True)
class TinyRun:
    """The tiny pipeline after one `dvc repro`, committed as "default run"; and ``second``, a second fresh copy
    reproduced beside it when the session checks reproducibility (the ``second_tiny_copy`` fixture), with the
    output of its `dvc repro` when that failed."""

    project: Path
    repro_stdout: str
    second: Path | None = None
    second_failure: str | None = None


# Another machine, as far as one machine can play it: each library's CPU switch set below this CPU's instruction set
# (and below the stages' own pins), one thread and one core. The stages pin their own values (stages/lib/cpu.py),
# so none of this may change a byte; without the pins the toy model trains differently and every output moves.
OTHER_CPU = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41",
             "OPENBLAS_CORETYPE": "Sandybridge", "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",
             "NUMBA_CPU_NAME": "generic", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def one_core() -> None:
    """In the child before exec: run on one core only (what the stages' thread pools see as the machine)."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, request) -> TinyRun:
    """`dvc repro` of the tiny configuration, once per session. When a collected test asks for ``second_tiny_copy``
    (the reproducibility check), a second fresh copy is reproduced at the same time by a second `dvc repro`, as on
    another CPU (``OTHER_CPU``, one core): the pipeline runs one stage process at a time, so on two cores the second
    copy costs little more wall time."""
    project = make_project(tmp_path_factory.mktemp("tiny_run"))
    second, background, failure = None, None, None
    if any("second_tiny_copy" in item.fixturenames for item in request.session.items):
        second = make_project(tmp_path_factory.mktemp("tiny_run_second"))
        background = subprocess.Popen(["dvc", "repro"], cwd=second, env=ENV | OTHER_CPU, preexec_fn=one_core,
                                      stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        first = sh("dvc", "repro", cwd=project)
        if background is not None:
            output = background.communicate(timeout=900)[0]
            if background.returncode != 0:
                failure = f"dvc repro of the second copy failed ({background.returncode}):\n{output}"
    finally:
        if background is not None and background.poll() is None:  # the first failed: stop the second, stages too
            os.killpg(background.pid, signal.SIGKILL)
            background.communicate()
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-qm", "default run", cwd=project)
    return TinyRun(project, first.stdout, second, failure)


@pytest.fixture(scope="session")
def second_tiny_copy(tiny_run) -> Path:
    """A second fresh copy of the tiny configuration, reproduced (not committed) beside ``tiny_run``."""
    if tiny_run.second_failure:
        pytest.fail(tiny_run.second_failure)
    assert tiny_run.second is not None
    return tiny_run.second


@pytest.fixture
def tiny_project(tiny_run, tmp_path) -> Path:
    """This test's own copy of the committed tiny run."""
    return copy_project(tiny_run.project, tmp_path / "project")
