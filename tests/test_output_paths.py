"""No `paths.*` value can reach outside its place (issue 23, item 4): a stage replaces its output directory whole,
so a path naming a source directory, the user's data, an ancestor of another output, a second output or anything
outside the project is refused at start, in one line naming the key, and nothing is deleted.

Each case runs the real questions stage (``stages.questions.main``, which reads params.yaml like every stage) in a
git project holding tracked docs, the user's question files, previous outputs and a directory outside it.
"""

from __future__ import annotations

import importlib
import subprocess
from pathlib import Path

import pytest
import yaml

from stages import questions
from stages.lib.params import ParamsError

REPO = Path(__file__).resolve().parents[1]
STAGES = sorted(path.stem for path in (REPO / "stages").glob("*.py") if path.stem != "__init__")

# Files that must survive every case: tracked sources, the user's files, previous outputs, a directory outside.
KEPT = ("docs/guide.md", "data/sources/mine.jsonl", "notes/todo.txt", "data/runs/id.parquet",
        "artifacts/probes/selection.json", "../outside/keep.txt")


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = tmp_path / "project"
    for name in KEPT:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"{name}\n")
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (root / "data/.gitignore").write_text((REPO / "data/.gitignore").read_text())
    (root / "artifacts/.gitignore").write_text((REPO / "artifacts/.gitignore").read_text())
    git = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "params.yaml", "docs", "data/.gitignore", "artifacts/.gitignore"], check=True)
    subprocess.run([*git, "commit", "-qm", "sources"], check=True)
    monkeypatch.chdir(root)
    return root


def set_path(root: Path, key: str, value: str) -> None:
    raw = yaml.safe_load((root / "params.yaml").read_text())
    raw["paths"][key] = value
    (root / "params.yaml").write_text(yaml.safe_dump(raw))


def assert_kept(root: Path) -> None:
    for name in KEPT:
        assert (root / name).read_text() == f"{name}\n", f"{name} was deleted"


@pytest.mark.parametrize("key, value, expected", [
    ("questions", "docs", "docs holds 1 file(s) git tracks or does not ignore (e.g. docs/guide.md)"),
    ("questions", "notes", "notes holds 1 file(s) git tracks or does not ignore (e.g. notes/todo.txt)"),
    ("questions", "data/sources", "a path apart from data/sources/"),
    ("questions", "data/sources/new", "a path apart from data/sources/"),
    ("questions", "data", "a path apart from data/sources/"),
    ("questions", "artifacts", "artifacts holds 1 file(s) git tracks or does not ignore (e.g. artifacts/.gitignore)"),
    ("questions", "data/runs", "a path different from `paths.runs`"),
    ("questions", "..", "a directory inside the project"),
    ("questions", "../outside", "a directory inside the project"),
    ("questions", "data/questions/../../../outside", "a directory inside the project"),
    ("questions", "ABSOLUTE_OUTSIDE", "a directory inside the project"),
    ("questions", ".", "a directory inside the project"),
    ("questions", ".dvc/tmp", "a path apart from .dvc/"),
    ("metrics", "artifacts", "a path that does not contain `paths.toy_model` (artifacts/toy_model)"),
    ("metrics", "/etc", "a directory inside the project"),
])
def test_a_bad_output_path_is_refused_at_start_and_nothing_is_deleted(project, key, value, expected):
    value = str(project.parent / "outside") if value == "ABSOLUTE_OUTSIDE" else value
    set_path(project, key, value)
    with pytest.raises(ParamsError) as error:
        questions.main()
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"params.yaml: `paths.{key}` = {value!r} is invalid; expected ")
    assert expected in message
    assert_kept(project)
    assert not (project / "data/questions").exists()


def test_a_new_directory_and_a_stage_owned_one_pass(project):
    set_path(project, "questions", "data/questions_v2")  # new
    questions.main()
    assert sorted(p.name for p in (project / "data/questions_v2").iterdir()) == ["id.jsonl", "ood.jsonl"]
    set_path(project, "questions", "data/questions")  # listed in data/.gitignore: a stage's own output
    questions.main()
    questions.main()  # and again, over its own previous output
    assert (project / "data/questions/id.jsonl").is_file()
    assert_kept(project)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_refuses_a_bad_path_before_any_work(project, stage):
    set_path(project, "probes", "docs")
    with pytest.raises(ParamsError, match=r"^params.yaml: `paths.probes` = 'docs' is invalid; expected a new "):
        importlib.import_module(f"stages.{stage}").main()
    assert_kept(project)

