"""Helpers every stage shares: logging, atomic writes, reading hand-off tables, and cost records."""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import logging
import os
import select
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd
from tqdm import tqdm

from stages.lib.cpu import machine_record
from stages.lib.errors import UserError
from stages.lib.schema.reports import COST_COUNTERS, COST_DIR, CostRecord
from stages.lib.schema.machinery import Contract, SchemaError, Table, validate_frame

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
        die_with_dvc()
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {error.filename}" if error.filename else ""
        print(f"error: {os.strerror(error.errno).lower()}{where}; free some space and rerun (the previous outputs "
              f"are left as they were)", file=sys.stderr)
        raise SystemExit(2) from None


class DvcGone(UserError):
    """The ``dvc`` process that started this stage has ended (killed, timed out, cancelled): the stage must not
    replace outputs that dvc.lock will never record."""


_dvc_process: tuple[int, str] | None = None  # (pid, start time) of the dvc process running this stage


def die_with_dvc() -> None:
    """When DVC runs this stage (it sets ``DVC_STAGE``), stop the stage as soon as that ``dvc`` process ends.

    ``kill <dvc pid>``, ``timeout`` and a CI cancel signal dvc alone; without this the stage ran on and replaced its
    outputs minutes later, with dvc.lock not updated. The dvc process is the nearest ancestor started without
    ``DVC_STAGE`` in its environment (DVC may run the command through ``$SHELL -c``, so it need not be the parent;
    the parent-death signal ``PR_SET_PDEATHSIG`` would watch the shell, so it is not used). A daemon thread waits
    on a pidfd of it (Linux >= 5.3; a 1 s ``kill(pid, 0)`` poll elsewhere) and sends this process SIGTERM; and
    ``stage_outputs`` checks it again just before its renames (``require_dvc_alive``), so even a stage that ignores
    SIGTERM leaves the previous outputs as they were. Outside DVC, or off Linux, this does nothing.
    """
    global _dvc_process
    stage = os.environ.get("DVC_STAGE")
    if stage is None or not Path("/proc/self/stat").exists():
        return
    pid = os.getppid()
    for _ in range(16):  # bounded: a shell or two lie between dvc and the stage at most
        environ = _proc_read(pid, "environ").split(b"\0")
        if f"DVC_STAGE={stage}".encode() not in environ or pid <= 1:
            break
        pid = int(_proc_stat(pid)[1])
    stat = _proc_stat(pid)
    _dvc_process = (pid, stat[19] if len(stat) > 19 else "")
    require_dvc_alive()
    threading.Thread(target=_terminate_when_gone, args=(pid,), name="die-with-dvc", daemon=True).start()


def require_dvc_alive() -> None:
    """Raise DvcGone when the dvc process that started this stage has ended (see ``die_with_dvc``)."""
    if _dvc_process is None:
        return
    pid, started = _dvc_process
    stat = _proc_stat(pid) if pid > 1 else []
    if not stat or stat[19] != started or stat[0] in ("Z", "X"):
        raise DvcGone(f"the dvc process ({pid}) that started this stage has ended; the previous outputs are left "
                      f"as they were (run `dvc repro` again)")


def _terminate_when_gone(pid: int) -> None:
    try:
        descriptor = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (an old kernel): poll
        while True:
            try:
                require_dvc_alive()
            except DvcGone:
                break
            time.sleep(1.0)
    else:
        select.select([descriptor], [], [])  # readable once the process has exited
    log.error("the dvc process (%d) that started this stage has ended: stopping the stage", pid)
    os.kill(os.getpid(), signal.SIGTERM)


def _proc_read(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def _proc_stat(pid: int) -> list[str]:
    """/proc/<pid>/stat's fields after the command name: [state, ppid, ...]; index 19 is the start time."""
    return _proc_read(pid, "stat").decode().rpartition(")")[2].split()


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


class StageOutputs:
    """The outputs of one stage run, written as one set (``stage_outputs``): each ``path(final)`` is a temporary
    path next to ``final``; nothing replaces a previous output until the stage has written every one."""

    def __init__(self) -> None:
        self._pending: dict[Path, Path] = {}  # final path -> its temporary path

    def path(self, final: str | Path) -> Path:
        """Where to write ``final`` (a file, or a directory the stage creates): a fresh ``.tmp-*`` sibling of it."""
        final = Path(final)
        if final in self._pending:
            return self._pending[final]
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-{os.getpid()}-", dir=final.parent)) / final.name
        self._pending[final] = tmp
        return tmp

    def _commit(self) -> None:
        require_dvc_alive()  # no output replaced for a dvc that can no longer record it in dvc.lock
        missing = [str(final) for final, tmp in self._pending.items() if not (tmp.exists() or tmp.is_symlink())]
        if missing:
            raise RuntimeError(f"stage_outputs: the stage asked for but never wrote {', '.join(missing)}")
        for final, tmp in self._pending.items():
            _replace(tmp, final)
            log.info("in place: %s", final)

    def _discard(self) -> None:
        for tmp in self._pending.values():
            shutil.rmtree(tmp.parent, ignore_errors=True)


@contextlib.contextmanager
def stage_outputs() -> Iterator[StageOutputs]:
    """All of a stage's outputs or none: write each to ``outputs.path(final)``; on a clean exit every temporary is
    renamed onto its final path (a directory is replaced whole, so no stale file of the old one survives); on an
    exception (or a kill) none is, and the previous outputs stay as they were.

    The renames happen only after the stage has computed and written everything, one ``rename`` per output, so
    the window in which a kill leaves a mixed set is a few system calls long. With ``persist: true`` on every
    output in dvc.yaml, DVC itself deletes nothing before the command runs (docs/design.md, "All or none").
    """
    outputs = StageOutputs()
    try:
        yield outputs
        outputs._commit()
    finally:
        outputs._discard()


def _replace(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` onto ``final``; a directory (or a file in the way of one) is moved aside first, then removed."""
    if final.exists() and (final.is_dir() or tmp.is_dir()) and not final.is_symlink():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        os.replace(tmp, final)


def _remove_stale_temporaries(final: Path) -> None:
    """Remove the ``.tmp-<name>-<pid>-*`` / ``.old-<name>-<pid>`` siblings a killed stage run left behind (their
    process is gone); those of a live process are left alone."""
    for leftover in list(final.parent.glob(f".tmp-{final.name}-*")) + list(final.parent.glob(f".old-{final.name}-*")):
        pid = leftover.name[len(f".tmp-{final.name}-"):].split("-")[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def content_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, or of a directory's files (their relative paths and bytes, in sorted order):
    the same for a copy anywhere, different after any edit."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" if path.is_dir() else b"")
        with file.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


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


def write_table(frame: pd.DataFrame, table: Table, path: str | Path) -> None:
    """Validate ``frame`` against ``table`` (columns and key), then write it atomically at ``path`` (usually
    ``table.path(directory, dataset)``): parquet, or CSV where the file name ends in ``.csv``."""
    validate_frame(frame, table.columns, path, table.key)
    with atomic_path(path) as tmp:
        if Path(path).suffix == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            frame.to_parquet(tmp, index=False)
    log.info("wrote %s: %d rows x %d columns", path, len(frame), frame.shape[1])


def read_table(table: Table, path: str | Path, names: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Read a parquet hand-off and validate it against ``table``; name the file and the stage that writes it when
    absent.

    ``names`` reads (and validates) only those columns: runs carry token lists most readers do not need.
    """
    path = Path(path)
    if not path.exists():
        raise SchemaError(f"{path}: not found; run the stage that writes it (`dvc repro`)")
    columns = table.columns if names is None else tuple(c for c in table.columns if c.name in names)
    frame = read_parquet(path, columns=None if names is None else list(names))
    validate_frame(frame, columns, path, table.key)
    log.info("read %s: %d rows", path, len(frame))
    return frame


def corrupt_file_error(path: str | Path, kind: str, error: Exception) -> SchemaError:
    """The one-line error for a truncated or damaged output file, with the command that restores it."""
    reason = " ".join(str(error).split())
    return SchemaError(f"{path}: truncated or corrupt {kind} ({reason}); restore it with `dvc checkout --force {path}` "
                       f"(or rerun the stage that writes it)")


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """``pd.read_parquet``; a truncated or damaged file is a one-line SchemaError naming it (``dvc checkout``)."""
    try:
        return pd.read_parquet(path, columns=columns)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise corrupt_file_error(path, "parquet file", error) from None


def load_npy(path: str | Path, mmap_mode: str | None = "r") -> np.ndarray:
    """``np.load`` of one ``.npy`` array (memory-mapped by default, never unpickled); a truncated file (numpy's
    ``mmap length is greater than file size``) is a one-line SchemaError naming it (``dvc checkout``)."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise corrupt_file_error(path, ".npy array", error) from None


@contextlib.contextmanager
def cost_record(metrics_dir: str | Path, stage: str, outputs: StageOutputs | None = None) -> Iterator[dict]:
    """Time a stage and write ``<metrics_dir>/cost/<stage>.json`` (CostRecord) with wall seconds, the counters
    it adds and the machine it ran on (CPU, pinned kernel switches, library versions); with ``outputs``
    (``stage_outputs``) the record is one of the stage's set of outputs, written with them.

    The stage fills the yielded dict (tokens generated, forward passes, equivalence checks ...) with numbers and
    strings (numpy scalars are stored as Python ones); a stage listed in COST_COUNTERS must fill those counters.
    """
    counters: dict[str, Any] = {}
    start = time.perf_counter()
    yield counters
    path = Path(metrics_dir) / COST_DIR / f"{stage}.json"
    record = CostRecord(stage=stage, wall_seconds=round(time.perf_counter() - start, 3),
                        counters={name: _python_scalar(value) for name, value in counters.items()},
                        machine=machine_record())
    if stage in COST_COUNTERS:
        COST_COUNTERS[stage].parse(record.counters, f"{path} (as written by the {stage} stage)")
    write_model(record, path if outputs is None else outputs.path(path))
    log.info("cost of %s: %s", stage, record.model_dump())


def _python_scalar(value: Any) -> Any:
    """numpy scalars as Python ones (a NaN as None), as the cost records have always been written."""
    if isinstance(value, np.generic):
        value = value.item()
        return None if isinstance(value, float) and np.isnan(value) else value
    return value

