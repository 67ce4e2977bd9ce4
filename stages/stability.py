"""Stage stability: refit every probe on several question splits; the spread of test and OOD AUROC.

Run with ``python -m stages.stability``. Writes ``{paths.metrics}/stability.json`` (``schema.StabilityReport``),
``{paths.plots}/stability.csv`` and its cost record (stages/lib/evaluation/seed_spread.py does the refitting)."""

from __future__ import annotations

import logging
from pathlib import Path

from stages.lib.io.files import cost_record, run_stage, stage_outputs, write_table, write_model
from stages.lib.params import Params, load_params
from stages.lib.probes.dataset import load_dataset, require_same_locations
from stages.lib.schema.tables import STABILITY_PLOT
from stages.lib.schema.reports import STABILITY_FILE, StabilityReport, StabilitySettings
from stages.lib.evaluation.seed_spread import seed_aurocs, summarise

log = logging.getLogger(__name__)


def run(params: Params) -> StabilityReport:
    with stage_outputs() as outputs, cost_record(params.paths.metrics, "stability", outputs) as cost:
        id_data, ood_data = load_dataset(params, "id"), load_dataset(params, "ood")
        require_same_locations(id_data, ood_data)
        probe_params = params.probes.model_copy(update={"c_grid": params.stability.c_grid, "max_layer_range": 1})
        seeds = range(params.seed, params.seed + params.stability.seeds)
        table, skipped = seed_aurocs(id_data, ood_data, probe_params, seeds)
        report = StabilityReport(splits=summarise(table), skipped_seeds=skipped, settings=StabilitySettings(
            seeds=list(seeds),
            c_grid=list(params.stability.c_grid), layer_ranges="not searched (single layers)",
            positive_class="incorrect run"))
        write_model(report, outputs.path(Path(params.paths.metrics) / STABILITY_FILE))
        write_table(table, STABILITY_PLOT, outputs.path(STABILITY_PLOT.path(params.paths.plots)))
        cost.update({"seeds": params.stability.seeds, "rows": len(table)})
    return report


def main() -> None:
    run(load_params())


if __name__ == "__main__":
    run_stage(main, __doc__)
