"""The probes directory (``paths.probes``): the one writer and the one reader of its files."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from stages.lib.common import atomic_path, read_table
from stages.lib.probes import LinearProbe, load_probe, save_location_probes, save_probe
from stages.lib.schema import (
    LOCATION_PROBES_FILE,
    PROBE_FILES,
    SELECTION_FILE,
    SPLIT_COLUMNS,
    SPLIT_KEY,
    SPLITS_FILE,
    SchemaError,
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
        for name, file_name in PROBE_FILES.items():
            save_probe(trained.probes[name], tmp / file_name)
        save_location_probes(trained.location_probes, tmp / LOCATION_PROBES_FILE)
        (tmp / SELECTION_FILE).write_text(json.dumps(trained.selection, indent=2) + "\n")
    log.info("wrote %s: %s, %s, %s, %s", directory, SPLITS_FILE, ", ".join(PROBE_FILES.values()), SELECTION_FILE,
             LOCATION_PROBES_FILE)


def load_probes(directory: str | Path) -> tuple[dict[str, LinearProbe], dict[str, Any], pd.DataFrame]:
    """The saved probes, selection.json and splits.parquet of ``{paths.probes}``."""
    directory = Path(directory)
    probes = {name: load_probe(directory / file_name) for name, file_name in PROBE_FILES.items()}
    selection_path = directory / SELECTION_FILE
    if not selection_path.exists():
        raise SchemaError(f"{selection_path}: not found; run the train_probes stage")
    selection = json.loads(selection_path.read_text())
    splits = read_table(directory / SPLITS_FILE, SPLIT_COLUMNS, SPLIT_KEY)
    return probes, selection, splits
