"""The field types of params.yaml and the checks of its paths (``stages.lib.params`` builds the groups from them).

Constrained integers, numbers, text and lists, each carrying the phrase its one-line error uses (``Expected``);
where local models and question files live; and what a ``paths.*`` output directory may be."""

import dataclasses
import os
import subprocess
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field
from pydantic_core import PydanticCustomError


# Each constrained type carries the phrase an error message uses for it (``Expected``), so the message says
# "an integer >= 1" rather than pydantic's "Input should be a valid integer".

@dataclasses.dataclass(frozen=True)
class Expected:
    """``Annotated`` metadata: what a valid value of the field looks like, in the words of the error message."""

    text: str


def integer(minimum: int, note: str = "") -> Any:
    """An int >= ``minimum``; floats, bools and strings are refused (the models are strict)."""
    return Annotated[int, Field(ge=minimum), Expected(f"an integer >= {minimum}{note}")]


def number(*, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, note: str = "") -> Any:
    """A finite float within the given bounds; a YAML int (``temp: 1``) is taken as a float, a bool is refused."""
    low, high = (ge if ge is not None else gt), (le if le is not None else lt)
    if low is not None and high is not None:  # an interval: "a fraction in (0, 1]"
        kind = "fraction" if 0 <= low and high <= 1 else "number"
        text = f"a {kind} in {'[' if ge is not None else '('}{low:g}, {high:g}{']' if le is not None else ')'}"
    else:  # one bound: "a number >= 0"
        text = " ".join(["a number", *(f"{op} {bound:g}" for op, bound in ((">=", ge), (">", gt), ("<=", le), ("<", lt))
                                       if bound is not None)])
    return Annotated[float, Field(ge=ge, gt=gt, le=le, lt=lt, allow_inf_nan=False), Expected(text + note)]


def text(pattern: str, expected: str) -> Any:
    """A string matching the regular expression ``pattern`` (anchor it for a full match)."""
    return Annotated[str, Field(pattern=pattern), Expected(expected)]


def _tuple_from_list(value: Any) -> Any:
    """YAML has lists; the frozen models hold tuples. Anything else goes on to the strict tuple check."""
    return tuple(value) if isinstance(value, list) else value


def sequence(item: Any, expected: str) -> Any:
    """A non-empty YAML list of ``item``, held as a tuple."""
    return Annotated[tuple[item, ...], BeforeValidator(_tuple_from_list), Field(min_length=1), Expected(expected)]


def _distinct(values: tuple) -> tuple:
    if len(set(values)) != len(values):
        raise ValueError("repeated entries")
    return values


def inside(path: str, folder: str) -> bool:
    """``path`` is a relative path to something strictly inside ``folder`` (no ``..``, not absolute)."""
    parts, folder_parts = Path(path).parts, Path(folder).parts
    return not Path(path).is_absolute() and ".." not in parts and parts[:len(folder_parts)] == folder_parts \
        and len(parts) > len(folder_parts)


def is_local_model(name: str) -> bool:
    """``model.name`` names a local directory or file rather than ``toy`` or a Hub repo id (``org/name``, which
    starts with a letter or digit and is no path here)."""
    return name != "toy" and (name.endswith(".gguf") or name.startswith(("/", ".", "~")) or Path(name).exists())


def invalid(key: str, expected: str) -> PydanticCustomError:
    """The error a cross-field check raises for ``key`` of its group (the message names the dotted key)."""
    return PydanticCustomError("params_invalid", "`{key}`: expected {expected}", {"key": key, "expected": expected})


SOURCES_DIR = "data/sources"
"""Where a ``jsonl:<path>`` question file lives: a dep of the questions stage in dvc.yaml."""
MODELS_DIR = "data/models"
"""Where a local ``model.name`` (a directory or a .gguf file) lives: a dep of the toy_model stage, which records
the named model's content hash in its output, so generate and trace rerun exactly when that model changes."""

FILE_OUTPUT_DIRS = ("metrics", "plots")
"""``paths.*`` keys whose directory several stages write single files into; every other one is replaced whole."""
USER_DIRS = (SOURCES_DIR, MODELS_DIR, ".git", ".dvc")
"""What no output may be, lie in or contain: the user's question files and models, git's and DVC's own state."""


def check_output_path(key: str, path: Path, root: Path, whole: bool) -> None:
    """Refuse ``paths.<key>`` = ``path`` unless it is a new or stage-owned directory inside the project ``root``.

    Inside: relative to ``root`` (or absolute within it) once ``..`` is resolved, and not ``root`` itself (a link
    the user placed inside, ``data/runs -> /big/disk/runs``, is theirs to make: the stage replaces the link, never
    what it points to).
    Apart: not one of ``USER_DIRS``, inside one or containing one. For a directory the stage replaces ``whole``:
    holding no file that git tracks or sees as a user's (untracked and not ignored), so ``docs`` or a folder of
    notes is refused, while an output (listed in DVC's .gitignore files) or a new directory passes. Outside a git
    work tree that last check is skipped.
    """
    resolved_root = root.resolve()
    candidate = Path(os.path.normpath(root.absolute() / path))
    inside_roots = [base for base in dict.fromkeys((root.absolute(), resolved_root))
                    if candidate != base and candidate.is_relative_to(base)]
    if not inside_roots:
        raise invalid(key, f"a directory inside the project {resolved_root} (a relative path such as data/<name> or "
                           f"artifacts/<name>)")
    relative = candidate.relative_to(inside_roots[0])
    resolved = resolved_root / relative
    for user_dir in map(Path, USER_DIRS):
        if relative.is_relative_to(user_dir) or user_dir.is_relative_to(relative):
            raise invalid(key, f"a path apart from {user_dir}/ (the project's own or the user's files, which a stage "
                               f"would delete)")
    if whole and resolved.exists():
        seen = git_visible_files(resolved_root, relative)
        if seen:
            raise invalid(key, f"a new directory or a stage's own output, but {relative} holds {len(seen)} file(s) "
                               f"git tracks or does not ignore (e.g. {seen[0]}), which the stage would delete")


def git_visible_files(root: Path, relative: Path) -> list[str]:
    """Files under ``root/relative`` that git tracks or lists as untracked and not ignored; [] outside a git work tree
    (or without git)."""
    try:
        listed = subprocess.run(["git", "-C", str(root), "ls-files", "--cached", "--others", "--exclude-standard",
                                 "-z", "--", str(relative)], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if listed.returncode != 0:  # not a git work tree
        return []
    return sorted(name for name in listed.stdout.decode(errors="replace").split("\0") if name)
