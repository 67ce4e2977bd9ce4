"""Stage analysis: what the viewer reads, one row per run (entropies, probe scores, UMAP coordinates), each probe's
score at every traced location, and every run's tokens with their entropies.

Run with ``python -m stages.analysis``; writes in ``{paths.analysis}/``: ``analysis.parquet`` (ANALYSIS.columns),
``location_scores.npy`` + ``location_scores.json`` (schema.LocationScoresMeta), ``tokens.parquet`` (TOKENS.columns),
and its cost record."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from stages.lib.evaluation.per_run import RUN_TEXT_FIELDS, RUN_TOKEN_FIELDS, DatasetInputs, build, tokenizer_decoder
from stages.lib.io.files import cost_record, read_table, run_stage, stage_outputs
from stages.lib.params import Params, load_params
from stages.lib.probes.dataset import load_dataset
from stages.lib.probes.store import load_location_probes, load_probes
from stages.lib.questions.sources import load_questions
from stages.lib.registry import ANALYSIS
from stages.lib.schema.tables import (
    ANALYSIS_KEY,
    LOCATION_SCORES_FILE,
    LOCATION_SCORES_META_FILE,
    RUNS,
    SEMANTIC_ENTROPY,
    TOKENS,
    TOKENS_ROW_GROUP_RUNS,
    validate_location_scores,
)
from stages.lib.schema.machinery import DATASETS, validate_frame

log = logging.getLogger(__name__)


def read_inputs(params: Params) -> dict[str, DatasetInputs]:
    """Each dataset's runs (with their hidden states), text, tokens, SE clusters and questions; datasets without
    runs are left out."""
    inputs = {}
    for dataset in DATASETS:
        data = load_dataset(params, dataset)
        if not len(data.runs):
            continue
        runs_path = RUNS.path(params.paths.runs, dataset)
        inputs[dataset] = DatasetInputs(
            data=data, text=read_table(RUNS, runs_path, names=RUN_TEXT_FIELDS),
            token_runs=read_table(RUNS, runs_path, names=RUN_TOKEN_FIELDS),
            clusters=read_table(SEMANTIC_ENTROPY, SEMANTIC_ENTROPY.path(params.paths.semantic_entropy, dataset)),
            questions=load_questions(Path(params.paths.questions) / f"{dataset}.jsonl"))
    return inputs


def run(params: Params) -> dict:
    with stage_outputs() as outputs, cost_record(params.paths.metrics, "analysis", outputs) as cost:
        from stages.lib.models.loading import model_source  # torch and transformers: imported only when run

        probes, selection, splits = load_probes(params.paths.probes)
        decode = tokenizer_decoder(model_source(params.model.name, params.paths.toy_model, params.model.revision))
        built = build(read_inputs(params), probes, selection, splits, load_location_probes(params.paths.probes),
                      decode, params.analysis, params.seed)
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
