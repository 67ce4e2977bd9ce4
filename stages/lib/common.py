"""Helpers every stage shares: logging, atomic writes, reading hand-off tables, and cost records."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd
from tqdm import tqdm

from stages.lib.errors import UserError
from stages.lib.schema import COST_COUNTERS, COST_DIR, Column, Contract, CostRecord, SchemaError, validate_frame

log = logging.getLogger(__name__)


def stage_cli(doc: str | None) -> None:
    """The command line of a stage: ``--help`` prints the stage's docstring and exits; no other arguments
    (every setting comes from params.yaml)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()


def run_stage(main: Callable[[], Any], doc: str | None) -> None:
    """Run a stage from the command line: ``--help`` prints ``doc``; a UserError (bad params, a malformed
    input) prints its one-line message and exits with status 2, with no traceback."""
    stage_cli(doc)
    try:
        setup_logging()
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


LOG_LEVEL_VARIABLE = "SEP_LOG_LEVEL"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def log_level() -> int:
    """The stages' one verbosity setting: ``SEP_LOG_LEVEL`` (DEBUG, INFO, WARNING or ERROR; INFO when unset).

    An environment variable, not a param: verbosity must not make DVC rerun a stage. Progress bars show at
    INFO and DEBUG only (``progress_bar``)."""
    name = os.environ.get(LOG_LEVEL_VARIABLE, "INFO").strip().upper()
    if name not in LOG_LEVELS:
        raise UserError(f"{LOG_LEVEL_VARIABLE}={os.environ[LOG_LEVEL_VARIABLE]!r}: expected one of "
                        f"{', '.join(LOG_LEVELS)}")
    return getattr(logging, name)


def setup_logging() -> None:
    """Configure the root logger once for a stage process, at ``log_level()``."""
    level = log_level()
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger().setLevel(level)


def progress_bar(iterable: Iterable, desc: str, enabled: bool = True, **kwargs: Any) -> tqdm:
    """``tqdm(iterable)`` that shows only when ``enabled`` and the stages' log level is INFO or lower
    (``SEP_LOG_LEVEL=WARNING`` hides every bar); on stderr, so DVC's output stays readable."""
    shown = enabled and logging.getLogger().isEnabledFor(logging.INFO)
    return tqdm(iterable, desc=desc, disable=not shown, **kwargs)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it onto ``path`` (file or directory).

    A failure or a kill leaves the previous ``path`` untouched and only a ``.tmp-*`` sibling behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent)) / path.name
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".old-{path.name}-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_json(data: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_model(model: Contract, path: str | Path) -> None:
    """Write a JSON hand-off from its schema model, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(model.to_json())


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def write_table(frame: pd.DataFrame, path: str | Path, columns: tuple[Column, ...], key: tuple[str, ...] = ()) -> None:
    """Validate ``frame`` against its schema, then write it as parquet atomically."""
    validate_frame(frame, columns, path, key)
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    log.info("wrote %s: %d rows x %d columns", path, len(frame), frame.shape[1])


def read_table(path: str | Path, columns: tuple[Column, ...], key: tuple[str, ...] = (),
               names: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Read a parquet hand-off and validate it; name the file and the stage that writes it when absent.

    ``names`` reads (and validates) only those columns: runs carry token lists most readers do not need.
    """
    path = Path(path)
    if not path.exists():
        raise SchemaError(f"{path}: not found; run the stage that writes it (`dvc repro`)")
    if names is not None:
        columns = tuple(c for c in columns if c.name in names)
    frame = pd.read_parquet(path, columns=None if names is None else list(names))
    validate_frame(frame, columns, path, key)
    log.info("read %s: %d rows", path, len(frame))
    return frame


@contextlib.contextmanager
def cost_record(metrics_dir: str | Path, stage: str) -> Iterator[dict]:
    """Time a stage and write ``<metrics_dir>/cost/<stage>.json`` (CostRecord) with wall seconds and the counters
    it adds.

    The stage fills the yielded dict (tokens generated, forward passes, equivalence checks ...) with numbers and
    strings (numpy scalars are stored as Python ones); a stage listed in COST_COUNTERS must fill those counters.
    """
    counters: dict[str, Any] = {}
    start = time.perf_counter()
    yield counters
    path = Path(metrics_dir) / COST_DIR / f"{stage}.json"
    record = CostRecord(stage=stage, wall_seconds=round(time.perf_counter() - start, 3),
                        counters={name: _python_scalar(value) for name, value in counters.items()})
    if stage in COST_COUNTERS:
        COST_COUNTERS[stage].parse(record.counters, f"{path} (as written by the {stage} stage)")
    write_model(record, path)
    log.info("cost of %s: %s", stage, record.model_dump())


def _python_scalar(value: Any) -> Any:
    """numpy scalars as Python ones (a NaN as None), as the cost records have always been written."""
    if isinstance(value, np.generic):
        value = value.item()
        return None if isinstance(value, float) and np.isnan(value) else value
    return value


def write_csv(frame: pd.DataFrame, path: Path, columns) -> None:
    validate_frame(frame, columns, path)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    log.info("wrote %s: %d rows", path, len(frame))
