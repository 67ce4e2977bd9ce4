"""The hidden-state store: one ``.npy`` shard per (dataset, position), read and written as one array.

Layout (``schema.hidden_files``)::

    {paths.hidden}/{dataset}/{position}.npy    (runs, layers, hidden) float16, one per trace.positions entry
    {paths.hidden}/{dataset}_index.parquet     row -> (question_id, run_id)   (HIDDEN_INDEX.columns)
    {paths.hidden}/{dataset}_meta.json         positions, layers, hidden size (HiddenMeta)

Why shards: DVC hashes, caches and pushes each file of a directory output on its own, so a changed shard is all
it re-hashes and transfers. The trace stage writes every shard the same way each time (the same runs, model and
params give byte-identical files), so adding a position to ``trace.positions`` adds one file and leaves the
others' content hashes, and their copies in the cache and the remote, as they were.

``HiddenStates`` shows the shards as the (runs, positions, layers, hidden) array the consumers index
(``hidden[rows, position_index, layer_index, :]``, ``hidden[rows, position_index, first:last + 1, :]``), each
shard memory-mapped: only the requested slice is read, and ``release_mapped_pages`` hands its pages back.
Writers go through ``create_hidden`` + ``finish_hidden`` (the trace stage, the tests and the benchmarks alike);
readers through ``open_hidden`` (``dataset.load_dataset``).
"""

from __future__ import annotations

import mmap
import operator
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from numpy.lib.format import open_memmap

from stages.lib.io.files import load_npy, read_parquet, write_model, write_table
from stages.lib.schema.tables import (
    HIDDEN_INDEX,
    HiddenMeta,
    hidden_files,
    hidden_shard,
    require_finite_hidden,
    validate_hidden,
    validate_hidden_shard,
)
from stages.lib.schema.machinery import SchemaError


class HiddenStates:
    """The (runs, positions, layers, hidden) hidden states of one dataset, one (runs, layers, hidden) shard per
    position, usually memory-mapped.

    Indexing with an integer position reads that position's shard only and follows numpy's rules exactly
    (``hidden[rows, 1, 2, :]`` is ``shard_1[rows, 2, :]``); a slice of positions stacks the positions it selects
    (layers and features then indexed by int or slice). ``hidden[rows] = values`` with values of shape
    (len(rows), positions, layers, hidden) writes each position's part into its shard.
    """

    def __init__(self, shards: Sequence[np.ndarray], paths: Sequence[Path] | None = None):
        if not shards:
            raise ValueError("HiddenStates: no shards")
        first = shards[0]
        if any(shard.shape != first.shape or shard.dtype != first.dtype for shard in shards):
            raise ValueError(f"HiddenStates: shards differ in shape or dtype: {[s.shape for s in shards]}")
        self.shards = list(shards)
        """One (runs, layers, hidden) array per position, in meta.positions order."""
        self.paths = list(paths) if paths is not None else [None] * len(shards)
        """The shard files (None for in-memory shards)."""
        self._read: set[int] = set()  # shards read since the last release_pages (madvise on the rest costs time)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        runs, layers, hidden = self.shards[0].shape
        return runs, len(self.shards), layers, hidden

    @property
    def dtype(self) -> np.dtype:
        return self.shards[0].dtype

    @property
    def ndim(self) -> int:
        return 4

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"HiddenStates(shape={self.shape}, dtype={self.dtype}, shards={len(self.shards)})"

    def __getitem__(self, key):
        rows, position, layers, features = _four(key)
        if isinstance(position, (int, np.integer)):
            shard = range(len(self.shards))[operator.index(position)]
            self._read.add(shard)
            if all(isinstance(k, (int, np.integer, slice)) for k in (layers, features)):
                return self.shards[shard][rows, layers, features]  # what the probes ask: numpy's result as it is
            # an index array after the position: a length-1 positions axis (a view, nothing read) makes the shard
            # index as the 4-d array would (numpy moves the broadcast axes first when they are not adjacent)
            return self.shards[shard][:, np.newaxis][rows, 0, layers, features]
        if not isinstance(position, slice) or not all(isinstance(k, (int, np.integer, slice))
                                                      for k in (layers, features)):
            raise IndexError("HiddenStates: index positions by int or slice (with a slice, layers and features by "
                             "int or slice)")
        selected = range(len(self.shards))[position]
        self._read.update(selected)
        parts = [self.shards[i][:, np.newaxis][rows, :, layers, features] for i in selected]
        if not parts:
            return self.shards[0][:, np.newaxis][rows, 0:0, layers, features]
        axis = 0 if isinstance(rows, (int, np.integer)) else 1 if isinstance(rows, slice) else np.ndim(rows)
        return np.concatenate(parts, axis=axis)

    def __setitem__(self, rows, values) -> None:
        if isinstance(rows, tuple):
            raise IndexError("HiddenStates: assign whole rows, hidden[rows] = values (rows, positions, layers, "
                             "hidden)")
        values = np.asarray(values)
        for i, shard in enumerate(self.shards):
            shard[rows] = values[..., i, :, :] if values.ndim >= 3 else values

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = np.stack(self.shards, axis=1)
        return array if dtype is None else array.astype(dtype)

    def flush(self) -> None:
        for shard in self.shards:
            if isinstance(shard, np.memmap):
                shard.flush()

    def release_pages(self) -> None:
        """Release the mapped pages of the shards read since the last call (``release_mapped_pages``)."""
        for shard in sorted(self._read):
            release_mapped_pages(self.shards[shard])
        self._read.clear()


def _four(key) -> tuple:
    key = key if isinstance(key, tuple) else (key,)
    if len(key) > 4 or any(k is Ellipsis or k is None for k in key):
        raise IndexError(f"HiddenStates: at most 4 indices (rows, position, layers, hidden), no ... or None: {key}")
    return key + (slice(None),) * (4 - len(key))


def release_mapped_pages(hidden) -> None:
    """Drop the pages of a memory-mapped ``hidden`` array (or of the shards a ``HiddenStates`` has read since its
    last release) from this process's resident set.

    Reading every (position, layer) of a memory-mapped array touches all of it, and touched file pages count in
    the process's memory until unmapped: 5.7 GB at Qwen3-4B shapes. ``madvise(MADV_DONTNEED)`` on the read-only
    mapping returns them; the data stays in the OS page cache, so the next read is a cheap page fault, not a
    disk read. A no-op for an in-memory array (or where the OS has no madvise).
    """
    if isinstance(hidden, HiddenStates):
        hidden.release_pages()
        return
    mapping = getattr(hidden, "base", None)
    if isinstance(mapping, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


# ---- write ---------------------------------------------------------------------------------------------------
def create_hidden(directory: str | Path, dataset: str, runs: int, meta: HiddenMeta) -> HiddenStates:
    """Writable memory-mapped shards for ``runs`` rows of ``dataset`` under ``directory`` (created), zero-filled;
    fill them (``hidden[rows] = ...``), then ``finish_hidden``."""
    shard_dir = hidden_files(directory, dataset)[0]
    shard_dir.mkdir(parents=True, exist_ok=True)
    paths = [hidden_shard(shard_dir, position) for position in meta.positions]
    shape = (runs, len(meta.layers), meta.hidden_size)
    return HiddenStates([open_memmap(path, mode="w+", dtype=np.dtype(meta.dtype), shape=shape) for path in paths],
                        paths)


def finish_hidden(hidden: HiddenStates, directory: str | Path, dataset: str, index: pd.DataFrame,
                  meta: HiddenMeta) -> None:
    """Flush ``hidden`` (from ``create_hidden``), check each shard as written against ``meta`` and ``index``
    (shape, dtype, every value finite), then write the index and the meta beside them."""
    hidden.flush()
    shard_dir, index_path, meta_path = hidden_files(directory, dataset)
    validate_hidden(hidden, index, meta, shard_dir)  # the index's columns and key, the shards' 4-d shape
    for position in meta.positions:
        path = hidden_shard(shard_dir, position)
        written = load_npy(path)
        validate_hidden_shard(written, index, meta, path, position)
        require_finite_hidden(written, index, path)
        del written
    write_table(index, HIDDEN_INDEX, index_path)
    write_model(meta, meta_path)


def write_hidden(directory: str | Path, dataset: str, array, index: pd.DataFrame, meta: HiddenMeta) -> None:
    """Write an in-memory (runs, positions, layers, hidden) ``array`` with its index and meta (tests, fixtures)."""
    hidden = create_hidden(directory, dataset, len(index), meta)
    hidden[np.arange(len(index))] = np.asarray(array, dtype=np.dtype(meta.dtype))
    finish_hidden(hidden, directory, dataset, index, meta)


# ---- read ----------------------------------------------------------------------------------------------------
def open_hidden(directory: str | Path, dataset: str) -> tuple[HiddenStates, pd.DataFrame, HiddenMeta]:
    """The memory-mapped shards of ``dataset``, its index and meta, each shard checked against both.

    Raises SchemaError naming the file: a missing index, meta or shard (with its position), a truncated shard,
    or a shard whose shape or dtype disagrees with the meta and the index.
    """
    shard_dir, index_path, meta_path = hidden_files(directory, dataset)
    for path in (index_path, meta_path):
        if not path.exists():
            raise SchemaError(f"{path}: not found; run the trace stage (`dvc repro trace`)")
    index = read_parquet(index_path)
    meta = HiddenMeta.read(meta_path, writer="trace")
    shards, paths = [], []
    for position in meta.positions:
        path = hidden_shard(shard_dir, position)
        if not path.exists():
            raise SchemaError(f"{path}: not found: the hidden states at position `{position}` that {meta_path} "
                              f"lists; restore them with `dvc checkout --force {Path(directory)}` or rerun "
                              f"`dvc repro trace`")
        shard = load_npy(path)
        validate_hidden_shard(shard, index, meta, path, position)
        require_finite_hidden(shard, index, path)  # a damaged file: one line naming it, not a NaN inside a fit
        release_mapped_pages(shard)  # that read touched every page: return them (memory stays one location's)
        shards.append(shard)
        paths.append(path)
    hidden = HiddenStates(shards, paths)
    validate_hidden(hidden, index, meta, shard_dir)
    return hidden, index, meta
