"""Stage analysis: one row per run for the viewer (entropies, probe scores, UMAP coordinates).

Run with ``python -m stages.analysis``; writes ``{paths.analysis}/analysis.parquet`` (ANALYSIS_COLUMNS) and its
cost record."""

from __future__ import annotations

import logging

from stages.lib.analysis import build_table
from stages.lib.common import cost_record, run_stage, setup_logging, stage_outputs
from stages.lib.params import load_params
from stages.lib.registry import ANALYSIS_COLUMNS
from stages.lib.schema import ANALYSIS_FILE, ANALYSIS_KEY, validate_frame

log = logging.getLogger(__name__)


def main() -> None:
    setup_logging()
    params = load_params()
    with stage_outputs() as outputs, cost_record(params.paths.metrics, "analysis", outputs) as cost:
        table = build_table(params)
        validate_frame(table, ANALYSIS_COLUMNS, "analysis table", ANALYSIS_KEY)
        out_dir = outputs.path(params.paths.analysis)
        out_dir.mkdir()
        table.to_parquet(out_dir / ANALYSIS_FILE, index=False)
        log.info("wrote %s/%s: %d rows", params.paths.analysis, ANALYSIS_FILE, len(table))
        cost["runs"] = len(table)


if __name__ == "__main__":
    run_stage(main, __doc__)
