"""The field types of params.yaml: constrained integers, numbers, text and lists, each carrying the phrase its
one-line error uses (``Expected``), and the path checks a params field needs (``stages.lib.params`` builds the
groups from them)."""

import dataclasses
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
