"""Stage analysis: what the viewer reads, one row per run (entropies, probe scores, UMAP coordinates), each probe's
score at every traced location, and every run's tokens with their entropies.

Run with ``python -m stages.analysis``; writes in ``{paths.analysis}/``: ``analysis.parquet`` (ANALYSIS.columns),
``location_scores.npy`` + ``location_scores.json`` (schema.LocationScoresMeta), ``tokens.parquet`` (TOKENS.columns),
and its cost record."""

from __future__ import annotations

import logging

import numpy as np

from stages.lib.evaluation.per_run import build
from stages.lib.io.files import cost_record, run_stage, stage_outputs
from stages.lib.params import Params, load_params
from stages.lib.registry import ANALYSIS
from stages.lib.schema.tables import (
    ANALYSIS_KEY,
    LOCATION_SCORES_FILE,
    LOCATION_SCORES_META_FILE,
    TOKENS,
    TOKENS_ROW_GROUP_RUNS,
    validate_location_scores,
)
from stages.lib.schema.machinery import validate_frame

log = logging.getLogger(__name__)


def run(params: Params) -> dict:
    with stage_outputs() as outputs, cost_record(params.paths.metrics, "analysis", outputs) as cost:
        built = build(params)
        validate_frame(built.table, ANALYSIS.columns, "analysis table", ANALYSIS_KEY)
        validate_location_scores(built.location_scores, built.location_meta, "location scores")
        validate_frame(built.tokens, TOKENS.columns, "tokens table", TOKENS.key)
        out_dir = outputs.path(params.paths.analysis)
        out_dir.mkdir()
        built.table.to_parquet(out_dir / ANALYSIS.file, index=False)
        np.save(out_dir / LOCATION_SCORES_FILE, built.location_scores)
        (out_dir / LOCATION_SCORES_META_FILE).write_text(built.location_meta.to_json())
        built.tokens.to_parquet(out_dir / TOKENS.file, index=False, row_group_size=TOKENS_ROW_GROUP_RUNS)
        log.info("wrote %s/%s: %d rows; %s: shape %s (runs, probes, positions, layers); %s: %d runs, %d tokens",
                 params.paths.analysis, ANALYSIS.file, len(built.table), LOCATION_SCORES_FILE,
                 built.location_scores.shape, TOKENS.file, len(built.tokens),
                 int(built.tokens["tokens"].map(len).sum()))
        cost["runs"] = len(built.table)
    return cost


def main() -> None:
    run(load_params())


if __name__ == "__main__":
    run_stage(main, __doc__)
