"""The schema's machinery: a column, a table record (name, file, columns, key), frame validation, and ``Contract``,
the base of every JSON hand-off's model.

Writers call ``validate_frame`` before writing and readers call it after reading (``stages.lib.io.files.write_table``
and ``read_table`` do both for a ``Table``), so a mismatch fails loudly with the file and column named instead of
surfacing later as a KeyError or a silent NaN. JSON files are written from a ``Contract`` model (``to_json``) and read
back through it (``Contract.read``), so a malformed file fails with one line naming the file and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import pandas as pd
from pydantic import (
    BaseModel,
    ConfigDict,
    ValidationError,
    model_serializer,
    model_validator,
)

from stages.lib.errors import UserError

DATASETS = ("id", "ood")
SPLITS = ("train", "val", "test", "ood")


class SchemaError(UserError):
    """A table or array does not match its contract."""


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # one of: str, int, float, bool, list
    nullable: bool = False
    doc: str = ""


@dataclass(frozen=True)
class Table:
    """One table handed between stages: its name, its file inside a ``paths:`` directory (``{dataset}`` stands for
    ``id`` or ``ood`` where each dataset has its own), its columns and its key (the columns naming a row; () none).
    Read and write it with ``stages.lib.io.files.read_table`` / ``write_table``, which validate it."""

    name: str
    file: str
    columns: tuple[Column, ...]
    key: tuple[str, ...] = ()

    def path(self, directory: str | Path, dataset: str = "") -> Path:
        """The table's file in ``directory`` (for ``dataset``, where the file name holds one)."""
        return Path(directory) / self.file.format(dataset=dataset)


def _kind_ok(series: pd.Series, kind: str) -> bool:
    values = series.dropna()
    if kind == "str":
        return pd.api.types.is_string_dtype(series) or pd.api.types.is_object_dtype(series) and all(
            isinstance(v, str) for v in values)
    if kind == "int":
        return pd.api.types.is_integer_dtype(series) or (len(values) == 0) or (
            pd.api.types.is_float_dtype(series) and bool(np.all(np.mod(values, 1) == 0)))
    if kind == "float":
        return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)
    if kind == "bool":
        return pd.api.types.is_bool_dtype(series) or (len(values) == 0)
    if kind == "list":
        return all(isinstance(v, (list, tuple, np.ndarray)) for v in values)
    raise ValueError(f"unknown column kind {kind!r}")


_EMPTY_DTYPES = {"str": object, "int": "int64", "float": "float64", "bool": bool, "list": object}


def empty_frame(columns: tuple[Column, ...]) -> pd.DataFrame:
    """A frame with no rows and the columns' dtypes (so it validates and concatenates cleanly)."""
    return pd.DataFrame({col.name: pd.Series(dtype=_EMPTY_DTYPES[col.kind]) for col in columns})


def validate_frame(frame: pd.DataFrame, columns: tuple[Column, ...], source: str | Path,
                   key: tuple[str, ...] = ()) -> pd.DataFrame:
    """Check that ``frame`` has every column with the right kind, no unexpected nulls, and a unique key.

    ``source`` names the file (or stage output) in the error message.
    """
    for col in columns:
        if col.name not in frame.columns:
            raise SchemaError(f"{source}: missing column `{col.name}` ({col.kind}{': ' + col.doc if col.doc else ''})")
        series = frame[col.name]
        if not col.nullable and series.isna().any():
            row = int(np.flatnonzero(series.isna().to_numpy())[0])
            raise SchemaError(f"{source}: column `{col.name}` has a null at row {row}; expected {col.kind}")
        if not _kind_ok(series, col.kind):
            raise SchemaError(f"{source}: column `{col.name}` has dtype {series.dtype}; expected {col.kind}")
    if key and frame.duplicated(list(key)).any():
        row = int(np.flatnonzero(frame.duplicated(list(key)).to_numpy())[0])
        raise SchemaError(f"{source}: duplicate key {tuple(frame.iloc[row][list(key)])} for {key}")
    return frame


# ---- JSON hand-offs: the base of every model ---------------------------------------------------------------
class Contract(BaseModel):
    """A JSON hand-off: strict types (no "1" for 1, no bool for an int), no unknown keys.

    ``to_json`` writes it as every stage always has (``json.dumps(indent=2)`` plus a newline, keys in field
    order, Python's float repr), so the files stay byte-identical for the same values. A dict field named in
    ``_flattened`` is written as the model's own keys, in the field's place (evaluate.json's splits, the probes
    of selection.json, a cost record's counters); reading gathers the keys that are not fields back into it
    (``_route`` says into which).
    """

    model_config = ConfigDict(extra="forbid", strict=True)
    _flattened: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def _route(cls, key: str, value: Any) -> str:
        """The flattened field an undeclared key belongs to (the only one, unless a model says otherwise)."""
        return cls._flattened[0]

    @model_validator(mode="before")
    @classmethod
    def _gather(cls, data: Any) -> Any:
        if not cls._flattened or not isinstance(data, dict) or any(name in data for name in cls._flattened):
            return data  # built in code with the fields themselves
        gathered: dict[str, Any] = {name: {} for name in cls._flattened}
        for key, value in data.items():
            if key in cls.model_fields:
                gathered[key] = value
            else:
                gathered[cls._route(key, value)][key] = value
        return gathered

    @model_serializer(mode="wrap")
    def _flatten(self, handler) -> dict[str, Any]:
        data = handler(self)
        if not self._flattened:
            return data
        flat: dict[str, Any] = {}
        for key, value in data.items():
            if key in self._flattened:
                flat.update(value)
            else:
                flat[key] = value
        return flat

    def to_json(self) -> str:
        """The file's text (write it atomically: ``stages.lib.io.files.write_model``)."""
        return json.dumps(self.model_dump(), indent=2) + "\n"

    @classmethod
    def parse(cls, data: Any, source: str | Path) -> Self:
        """Validate ``data`` (parsed JSON); a mismatch raises SchemaError naming ``source`` and the field."""
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise SchemaError(describe_error(error, data, source)) from None

    @classmethod
    def read(cls, path: str | Path, writer: str | None = None) -> Self:
        """Read and validate the JSON file at ``path``; SchemaError (one line) when absent or malformed.
        ``writer`` names the stage that writes it, for the message."""
        path = Path(path)
        if not path.exists():
            rerun = f"run the {writer} stage (`dvc repro {writer}`)" if writer else "run the stage that writes it"
            raise SchemaError(f"{path}: not found; {rerun}")
        try:
            data = json.loads(path.read_text())
        except ValueError as error:
            raise SchemaError(f"{path}: not valid JSON ({error})") from None
        return cls.parse(data, path)


def describe_error(error: ValidationError, data: Any, source: str | Path) -> str:
    """One line for the first problem pydantic found: the file, the field's path as it is in the file (union tags
    and flattened fields left out) and what was expected."""
    first = error.errors()[0]
    path, node = [], data
    for item in first["loc"]:
        if isinstance(node, dict) and item in node:
            node = node[item]
        elif isinstance(node, list) and isinstance(item, int) and 0 <= item < len(node):
            node = node[item]
        elif item != first["loc"][-1] or first["type"] not in ("missing", "extra_forbidden"):
            continue  # a union tag or a flattened field: not a key of the file
        path.append(f"[{item}]" if isinstance(item, int) else str(item))
    field = ".".join(path).replace(".[", "[") or "(top level)"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    if first["type"] == "missing":
        return f"{source}: missing field `{field}`{more}"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown field `{field}`{more}"
    if first["type"] == "value_error":
        where = "" if field == "(top level)" else f"field `{field}`: "
        return f"{source}: {where}{first['msg'].removeprefix('Value error, ')}{more}"
    shown = repr(first["input"])
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"{source}: field `{field}`: {first['msg']}, got {shown}{more}"
