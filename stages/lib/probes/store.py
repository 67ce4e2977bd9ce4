"""The probes directory (``paths.probes``): the one writer and the one reader of its files.

Each probe is two files: ``<stem>.json``, its metadata (kind, ``get_params()`` with its location, chosen C, CV
scores; ``LinearProbe.to_arrays``), and ``<stem>.npz``, its float64 weights. The location probes (every
(label, position, layer) probe fitted on train) share one pair: ``location_probes.json`` lists their metadata in
order and ``location_probes.npz`` stacks their weights along a first axis in that order, so the weights of
thousands of probes stay binary instead of megabytes of JSON text. Nothing here unpickles: ``.npz`` files are read
with ``allow_pickle=False`` (an object array is refused), so a probes directory is safe to load from a shared
remote. numpy writes ``.npz`` members with a fixed timestamp, so equal probes give byte-identical files.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from stages.lib import registry
from stages.lib.io.files import atomic_path, read_table
from stages.lib.probes.linear import WEIGHT_NAMES, LinearProbe
from stages.lib.schema.tables import LOCATION_PROBES_FILE, PROBE_METADATA_SUFFIX, PROBE_WEIGHTS_SUFFIX, QUESTION_SPLITS
from stages.lib.schema.reports import SELECTION_FILE, Selection
from stages.lib.schema.machinery import SchemaError, validate_frame
from stages.lib.probes.selection import TrainedProbes

log = logging.getLogger(__name__)

LOCATION_FORMAT = "sep-location-probes"
LOCATION_FORMAT_VERSION = 1


# ---- the directory ---------------------------------------------------------------------------------------
def write_probes(directory: str | Path, splits: pd.DataFrame, trained: TrainedProbes) -> None:
    """Write the whole probes directory atomically: a killed stage leaves the previous one intact."""
    validate_frame(splits, QUESTION_SPLITS.columns, f"{directory}/{QUESTION_SPLITS.file}", QUESTION_SPLITS.key)
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        splits.to_parquet(tmp / QUESTION_SPLITS.file, index=False)
        for probe in registry.probes():
            save_probe(trained.probes[probe.name], tmp, probe.file)
        save_location_probes(trained.location_probes, tmp)
        (tmp / SELECTION_FILE).write_text(trained.selection.to_json())
    log.info("wrote %s: %s, %d probes (%s), %d location probes (%s), %s", directory, QUESTION_SPLITS.file,
             len(registry.probes()), ", ".join(p.file for p in registry.probes()), len(trained.location_probes),
             LOCATION_PROBES_FILE, SELECTION_FILE)


def load_probes(directory: str | Path) -> tuple[dict[str, LinearProbe], Selection, pd.DataFrame]:
    """The saved probes of ``registry.probes()`` (by name), selection.json and splits.parquet of ``{paths.probes}``."""
    directory = Path(directory)
    probes = {probe.name: load_probe(directory, probe.file) for probe in registry.probes()}
    selection = Selection.read(directory / SELECTION_FILE, writer="train_probes")
    splits = read_table(QUESTION_SPLITS, QUESTION_SPLITS.path(directory))
    return probes, selection, splits


# ---- one probe -------------------------------------------------------------------------------------------
def save_probe(probe: LinearProbe, directory: str | Path, stem: str) -> None:
    """Write ``<stem>.json`` and ``<stem>.npz`` in ``directory`` (not atomic alone: write inside an atomic
    directory, as ``write_probes`` does)."""
    metadata, weights = probe.to_arrays()
    json_path, npz_path = _paths(directory, stem)
    json_path.write_text(json.dumps(metadata, indent=1) + "\n")
    np.savez(npz_path, **weights)


def load_probe(directory: str | Path, stem: str) -> LinearProbe:
    """Read the probe ``save_probe`` wrote; names the file when it is missing or malformed."""
    json_path, npz_path = _paths(directory, stem)
    metadata = _read_json(json_path)
    weights = _read_npz(npz_path, shapes={name: () if name == "intercept" else None for name in WEIGHT_NAMES})
    try:
        return LinearProbe.from_arrays(metadata, weights)
    except (ValueError, KeyError, TypeError) as error:
        raise SchemaError(f"{json_path} / {npz_path.name}: {error}") from error


# ---- every location probe in one pair of files -------------------------------------------------------
def save_location_probes(probes: Mapping[tuple[str, str, int], LinearProbe], directory: str | Path) -> None:
    """Write every (label, position, layer) probe as ``location_probes.json`` (a list of their metadata) and
    ``location_probes.npz`` (each weight stacked: (n_probes, n_features), intercept (n_probes,)).

    They must share n_features (one location's hidden size), which every probe of ``fit_location_probes`` does.
    """
    if not probes:
        raise ValueError("save_location_probes: no probes")
    records, weights = zip(*(probe.to_arrays() for probe in probes.values()))
    widths = sorted({record["n_features"] for record in records})
    if len(widths) != 1:
        raise ValueError(f"save_location_probes: the probes have different feature counts {widths}; one location "
                         "is one hidden size")
    json_path, npz_path = _paths(directory, LOCATION_PROBES_FILE)
    index = {"format": LOCATION_FORMAT, "format_version": LOCATION_FORMAT_VERSION, "n_probes": len(records),
             "n_features": widths[0], "probes": list(records)}
    json_path.write_text(json.dumps(index) + "\n")
    np.savez(npz_path, **{name: np.stack([w[name] for w in weights]) for name in WEIGHT_NAMES})


def load_location_probes(directory: str | Path) -> dict[tuple[str, str, int], LinearProbe]:
    """Read ``save_location_probes`` output, keyed (label name, position, layer) like ``fit_location_probes``."""
    json_path, npz_path = _paths(directory, LOCATION_PROBES_FILE)
    index = _read_json(json_path)
    if index.get("format") != LOCATION_FORMAT or index.get("format_version") != LOCATION_FORMAT_VERSION:
        raise SchemaError(f"{json_path}: not a {LOCATION_FORMAT} v{LOCATION_FORMAT_VERSION} index (format="
                          f"{index.get('format')!r}, version={index.get('format_version')!r}); rerun train_probes")
    try:
        n_probes, n_features = int(index["n_probes"]), int(index["n_features"])
        if len(index["probes"]) != n_probes:
            raise ValueError(f"{len(index['probes'])} probe records but n_probes = {n_probes}")
    except (KeyError, TypeError, ValueError) as error:
        raise SchemaError(f"{json_path}: {error}") from error
    stacked = _read_npz(npz_path, shapes={name: (n_probes,) if name == "intercept" else (n_probes, n_features)
                                          for name in WEIGHT_NAMES})
    probes: dict[tuple[str, str, int], LinearProbe] = {}
    for row, record in enumerate(index["probes"]):
        try:
            probe = LinearProbe.from_arrays(record, {name: stacked[name][row] for name in WEIGHT_NAMES})
        except (ValueError, KeyError, TypeError) as error:
            raise SchemaError(f"{json_path}: probe {row}: {error}") from error
        key = (probe.label_name, probe.position, int(probe.layer))
        if key in probes:
            raise SchemaError(f"{json_path}: probe {row} repeats (label, position, layer) {key}")
        probes[key] = probe
    log.info("read %s: %d location probes of %d features", json_path, len(probes), n_features)
    return probes


# ---- files -----------------------------------------------------------------------------------------------
def _paths(directory: str | Path, stem: str) -> tuple[Path, Path]:
    directory = Path(directory)
    return directory / f"{stem}{PROBE_METADATA_SUFFIX}", directory / f"{stem}{PROBE_WEIGHTS_SUFFIX}"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise SchemaError(f"{path}: not found; run the train_probes stage (`dvc repro train_probes`)")
    try:
        data = json.loads(path.read_text())
    except ValueError as error:
        raise SchemaError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise SchemaError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_npz(path: Path, shapes: Mapping[str, tuple[int, ...] | None]) -> dict[str, np.ndarray]:
    """The arrays of ``shapes`` from an ``.npz``, each float64 of its shape (None: 1-D, any length).

    Never unpickles: ``allow_pickle=False`` makes numpy refuse an object array, and a pickle is not an ``.npz``.
    """
    if not path.exists():
        raise SchemaError(f"{path}: not found; run the train_probes stage (`dvc repro train_probes`)")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        with archive:
            missing = sorted(set(shapes) - set(archive.files))
            if missing:
                raise ValueError(f"arrays {missing} missing (has {sorted(archive.files)})")
            arrays = {name: archive[name] for name in shapes}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise SchemaError(f"{path}: not a probe weights .npz ({error})") from error
    for name, array in arrays.items():
        expected = shapes[name]
        if array.dtype != np.float64 or (array.ndim != 1 if expected is None else array.shape != expected):
            raise SchemaError(f"{path}: array `{name}` is {array.dtype} of shape {array.shape}; expected float64 "
                              f"of shape {'(n_features,)' if expected is None else expected}")
    return arrays
