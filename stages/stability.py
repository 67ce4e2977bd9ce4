"""Stage stability: refit every probe on several question splits; the spread of test and OOD AUROC.

Run with ``python -m stages.stability``. Writes ``{paths.metrics}/stability.json``, ``{paths.plots}/stability.csv``
and its cost record (stages/lib/stability.py does the refitting)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from stages.lib.common import cost_record, setup_logging, run_stage, write_csv, write_json
from stages.lib.params import Params, load_params
from stages.lib.schema import STABILITY_COLUMNS, STABILITY_FILE, STABILITY_PLOT_FILE
from stages.lib.stability import seed_aurocs, summarise

log = logging.getLogger(__name__)


def run(params: Params) -> dict[str, Any]:
    with cost_record(params.paths.metrics, "stability") as cost:
        table, skipped = seed_aurocs(params)
        report = {**summarise(table), "skipped_seeds": skipped, "settings": {
            "seeds": list(range(params.seed, params.seed + params.stability.seeds)),
            "c_grid": list(params.stability.c_grid), "layer_ranges": "not searched (single layers)",
            "positive_class": "incorrect run"}}
        write_json(report, Path(params.paths.metrics) / STABILITY_FILE)
        write_csv(table, Path(params.paths.plots) / STABILITY_PLOT_FILE, STABILITY_COLUMNS)
        cost.update({"seeds": params.stability.seeds, "rows": len(table)})
    return report


def main() -> None:
    setup_logging()
    run(load_params())


if __name__ == "__main__":
    run_stage(main, __doc__)
