"""Stage cost_ratio: SE's measured cost per question against one probe evaluation, from the stages' cost records.

Run with ``python -m stages.cost_ratio``; writes ``{paths.metrics}/cost_ratio.json`` (``schema.CostRatio``)."""

from __future__ import annotations

import logging
from pathlib import Path

from stages.lib.io.files import run_stage, stage_outputs, write_model
from stages.lib.evaluation.costs import cost_ratio, read_costs
from stages.lib.params import Params, load_params
from stages.lib.schema.reports import COST_RATIO_FILE, CostRatio

log = logging.getLogger(__name__)


def run(params: Params) -> CostRatio:
    report = cost_ratio(read_costs(params.paths.metrics), params.sampling.runs)
    with stage_outputs() as outputs:
        write_model(report, outputs.path(Path(params.paths.metrics) / COST_RATIO_FILE))
    log.info("SE costs %.1fx a probe evaluation in seconds, %.1fx in tokens", report.seconds_ratio or 0,
             report.tokens_ratio or 0)
    return report


def main() -> None:
    run(load_params())


if __name__ == "__main__":
    run_stage(main, __doc__)
