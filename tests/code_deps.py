"""The project modules each DVC stage can import, computed from the source (AST), for the dvc.yaml deps check.

``python tests/code_deps.py`` prints, per stage of dvc.yaml, the code deps it must list (its own module, every
library module it imports directly or transitively, and the package ``__init__`` files that run on import);
``python tests/code_deps.py --write`` rewrites those entries of dvc.yaml in place (data deps and comments kept);
``python tests/code_deps.py --layout`` prints the library's lines of docs/design.md's Layout section.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "stages"
LIBRARY = "stages.lib"


def module_file(module: str) -> Path | None:
    """The file of a project module (``stages.lib.questions.answers`` -> stages/lib/questions/answers.py), None if not
    ours."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Project modules ``path`` imports anywhere in its body (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found |= {name for name in names if name.split(".")[0] == PACKAGE and module_file(name) is not None}
    return found


def parents(module: str) -> list[str]:
    """The packages whose ``__init__`` runs when ``module`` is imported: stages.lib.x -> [stages, stages.lib]."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (each package's __init__ counted as its own module)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[module] = imported_modules(path)
    return graph


def closure(module: str, graph: dict[str, set[str]]) -> set[str]:
    """``module`` and everything it imports, directly or transitively, with the packages on the way."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(graph.get(current, ()))
        todo.extend(parents(current))
    return seen


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the project modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module], _ = 1, stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if state.get(target) is None and (cycle := visit(target)):
                return cycle
        state[module] = 2
        stack.pop()
        return None

    for module in sorted(graph):
        if state.get(module) is None and (cycle := visit(module)):
            return cycle
    return None


def stage_modules(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, str]:
    """dvc.yaml stage -> the module its command runs (``python -m stages.<name>``)."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    return {name: stage["cmd"].split("-m", 1)[1].split()[0] for name, stage in stages.items()}


def required_code_deps(module: str, graph: dict[str, set[str]]) -> list[str]:
    """The repository-relative files a stage running ``module`` must list as deps, sorted."""
    return sorted(str(module_file(m).relative_to(ROOT)) for m in closure(module, graph))


def rewrite_code_deps(dvc_yaml: Path = ROOT / "dvc.yaml") -> str:
    """dvc.yaml's text with each stage's ``stages/...`` deps replaced by ``required_code_deps``."""
    graph, modules = import_graph(), stage_modules(dvc_yaml)
    out, stage, in_deps = [], None, False
    for line in dvc_yaml.read_text().splitlines(keepends=True):
        if match := re.match(r"^  ([a-z_]+):\s*$", line):
            stage, in_deps = match.group(1), False
        if re.match(r"^    deps:\s*$", line):
            in_deps = True
            out.append(line)
            out.extend(f"      - {path}\n" for path in required_code_deps(modules[stage], graph))
            continue
        if in_deps and re.match(r"^      - stages/", line):
            continue
        if in_deps and not re.match(r"^      - ", line):
            in_deps = False
        out.append(line)
    return "".join(out)


def library_layout() -> list[str]:
    """docs/design.md's Layout lines for the library: each hub module at the root of stages/lib/, then each concept
    package, with the first line of its docstring (a package's is its ``__init__.py``)."""
    library = ROOT / "stages" / "lib"
    entries = [(path.name, path) for path in sorted(library.glob("*.py")) if path.name != "__init__.py"]
    entries += [(f"{path.parent.name}/", path) for path in sorted(library.glob("*/__init__.py"))]
    return [f"stages/lib/{name:<13} {ast.get_docstring(ast.parse(path.read_text())).splitlines()[0]}"
            for name, path in entries]


if __name__ == "__main__":
    if "--layout" in sys.argv[1:]:
        print("\n".join(library_layout()))
        sys.exit()
    if "--write" in sys.argv[1:]:
        (ROOT / "dvc.yaml").write_text(rewrite_code_deps())
    graph = import_graph()
    for stage, module in stage_modules().items():
        print(f"{stage}:")
        for path in required_code_deps(module, graph):
            print(f"  - {path}")
