"""The house rules, checked from the source: thin stages over one library, and dvc.yaml deps complete by construction.

- a stage module (``stages/<stage>.py``, one per dvc.yaml stage) never imports another stage; the library
  (``stages/lib/``) never imports a stage; project imports have no cycle;
- each dvc.yaml stage lists exactly its own module, every library module it can import (transitively) and the
  package ``__init__`` files, so editing any module reruns exactly the stages that import it.
"""

from __future__ import annotations

import json
import runpy
import sys

import pytest
import yaml

from code_deps import ROOT, closure, find_cycle, import_graph, required_code_deps, stage_modules

GRAPH = import_graph()
STAGES = stage_modules()


def test_every_stage_module_is_a_dvc_stage_and_named_like_it():
    on_disk = {p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__"}
    assert on_disk == set(STAGES), "stages/*.py must be exactly the dvc.yaml stages; library code goes in stages/lib/"
    assert all(module == f"stages.{name}" for name, module in STAGES.items())


def test_no_stage_imports_another_stage_and_the_library_imports_none():
    stage_set = set(STAGES.values())
    for module, imports in GRAPH.items():
        offending = sorted((imports & stage_set) - {module})
        assert not offending, f"{module} imports stage module(s) {offending}; move what they share to stages/lib/"


def test_no_import_cycle():
    assert find_cycle(GRAPH) is None, f"import cycle: {' -> '.join(find_cycle(GRAPH))}"


def test_find_cycle_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_closure_follows_function_level_imports():
    # generate imports the vLLM backend inside main(): still a dep
    assert "stages.lib.sampling.vllm" in closure("stages.generate", GRAPH)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_dvc_yaml_code_deps_are_exactly_the_import_closure(stage):
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage].get("deps", [])
    listed = sorted(d for d in deps if d.startswith("stages/"))
    required = required_code_deps(STAGES[stage], GRAPH)
    missing, extra = sorted(set(required) - set(listed)), sorted(set(listed) - set(required))
    assert not missing and not extra, (f"dvc.yaml stage `{stage}`: add deps {missing}, remove {extra} "
                                       "(python tests/code_deps.py prints every stage's list)")


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_help_exits_without_touching_outputs(stage, tmp_path, monkeypatch, capsys):
    """`python -m stages.<stage> --help` (run in-process: the imports are shared) prints the stage's docstring
    and exits 0 before reading params.yaml or writing anything."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"stages/{stage}.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(f"stages.{stage}", run_name="__main__")
    assert exit_info.value.code == 0
    assert f"stage {stage}" in capsys.readouterr().out.lower()
    assert list(tmp_path.iterdir()) == []  # no params.yaml read, nothing written


def library_modules() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "stages").rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.slow
def test_editing_any_module_makes_dvc_status_name_exactly_its_importers(tiny_project):
    """On the committed tiny run, a comment added to every module makes one `dvc status` report, for each module,
    a changed dep in exactly the stages that import it, directly or transitively (and in no other stage), and
    nothing else: DVC's status adds up per dep, so this is each module edited alone, in one DVC process."""
    from dvc_project import sh

    modules = library_modules()
    for relative in modules:
        path = tiny_project / relative
        path.write_text(path.read_text() + "# an edit that changes nothing but the file's hash\n")
    status = json.loads(sh("dvc", "status", "--json", cwd=tiny_project).stdout or "{}")
    reported: dict[str, set[str]] = {}  # stage -> the changed deps `dvc status` names for it
    for stage, entries in status.items():
        assert all(isinstance(entry, dict) and set(entry) == {"changed deps"} for entry in entries), \
            f"dvc status reports more than changed deps for `{stage}`: {entries}"
        changes = {path: change for entry in entries for path, change in entry["changed deps"].items()}
        assert set(changes.values()) == {"modified"} and set(changes) <= set(modules), f"`{stage}`: {changes}"
        reported[stage] = set(changes)
    for relative in modules:
        expected = {stage for stage, module in STAGES.items() if relative in required_code_deps(module, GRAPH)}
        changed = {stage for stage, paths in reported.items() if relative in paths}
        assert changed == expected, f"editing {relative}: dvc status names {sorted(changed)}, not {sorted(expected)}"


def test_no_library_module_is_named_like_a_stage():
    """``stages/analysis.py`` beside a ``stages/lib/.../analysis.py`` makes every reader ask which one runs."""
    twins = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "stages" / "lib").rglob("*.py") if p.stem in STAGES)
    assert not twins, f"library modules named like a stage: {twins}; name them by what they hold"


def test_design_md_layout_is_the_library_tree():
    """docs/design.md's Layout block lists every hub module and concept package of stages/lib/ with its docstring's
    first line, in the order `python tests/code_deps.py --layout` prints them (so the floor plan cannot go stale)."""
    from code_deps import library_layout

    text = (ROOT / "docs" / "design.md").read_text()
    block = text[text.index("## Layout"):].split("```")[1]
    documented = [line for line in block.splitlines() if line.startswith("stages/lib/")]
    assert documented == library_layout(), "docs/design.md Layout: paste `python tests/code_deps.py --layout`"
