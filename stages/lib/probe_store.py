"""The probes directory (``paths.probes``): the one writer and the one reader of its files."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from stages.lib import registry
from stages.lib.common import atomic_path, read_table
from stages.lib.probes import LinearProbe, load_probe, save_location_probes, save_probe
from stages.lib.schema import (
    LOCATION_PROBES_FILE,
    SELECTION_FILE,
    SPLIT_COLUMNS,
    SPLIT_KEY,
    SPLITS_FILE,
    Selection,
    validate_frame,
)
from stages.lib.selection import TrainedProbes

log = logging.getLogger(__name__)


def write_probes(directory: str | Path, splits: pd.DataFrame, trained: TrainedProbes) -> None:
    """Write the whole probes directory atomically: a killed stage leaves the previous one intact."""
    validate_frame(splits, SPLIT_COLUMNS, f"{directory}/{SPLITS_FILE}", SPLIT_KEY)
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        splits.to_parquet(tmp / SPLITS_FILE, index=False)
        for probe in registry.probes():
            save_probe(trained.probes[probe.name], tmp / probe.file)
        save_location_probes(trained.location_probes, tmp / LOCATION_PROBES_FILE)
        (tmp / SELECTION_FILE).write_text(trained.selection.to_json())
    log.info("wrote %s: %s, %s, %s, %s", directory, SPLITS_FILE, ", ".join(p.file for p in registry.probes()),
             SELECTION_FILE, LOCATION_PROBES_FILE)


def load_probes(directory: str | Path) -> tuple[dict[str, LinearProbe], Selection, pd.DataFrame]:
    """The saved probes of ``registry.probes()`` (by name), selection.json and splits.parquet of ``{paths.probes}``."""
    directory = Path(directory)
    probes = {probe.name: load_probe(directory / probe.file) for probe in registry.probes()}
    selection = Selection.read(directory / SELECTION_FILE, writer="train_probes")
    splits = read_table(directory / SPLITS_FILE, SPLIT_COLUMNS, SPLIT_KEY)
    return probes, selection, splits
