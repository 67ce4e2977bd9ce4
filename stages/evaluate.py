"""Stage evaluate: how well each uncertainty score flags incorrect runs, on the test and OOD splits.

Run with ``python -m stages.evaluate``. Writes ``{paths.metrics}/evaluate.json`` (``schema.EvaluateReport``), the
plot CSVs of ``{paths.plots}`` and its cost record; the scores are the registry's (stages/lib/registry.py) and the
metrics are computed by stages/lib/evaluation/scoring.py."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from stages.lib.io.files import cost_record, run_stage, stage_outputs, write_model, write_table
from stages.lib.probes.dataset import DatasetRuns, attach_splits, load_dataset, require_same_locations
from stages.lib.evaluation.scoring import (
    auroc_by_layer,
    calibration,
    answer_extraction,
    concat_rows,
    difficulty_table,
    early_warning,
    evaluate_settings,
    question_difficulty,
    regression_metrics,
    risk_coverage_table,
    roc_table,
    score_runs,
    split_metrics,
)
from stages.lib.params import Params, load_params
from stages.lib.probes.store import load_location_probes, load_probes
from stages.lib.questions.sources import load_questions
from stages.lib.schema.tables import AUROC_BY_LAYER, DIFFICULTY, EARLY_WARNING, RELIABILITY, RISK_COVERAGE, ROC
from stages.lib.schema.reports import EVALUATE_FILE, DifficultyRow, EarlyWarningRow, EvaluateReport

log = logging.getLogger(__name__)


def run(params: Params) -> EvaluateReport:
    with stage_outputs() as outputs, cost_record(params.paths.metrics, "evaluate", outputs) as cost:
        probes, selection, splits = load_probes(params.paths.probes)
        id_data: DatasetRuns = load_dataset(params, "id")
        ood_data: DatasetRuns = load_dataset(params, "ood")
        require_same_locations(id_data, ood_data)
        id_runs = attach_splits(id_data.runs, splits, "id")
        ood_runs = attach_splits(ood_data.runs, splits, "ood")
        high_se_threshold = selection.high_se_threshold
        evaluated = {"test": (id_runs[id_runs["split"] == "test"], id_data.hidden), "ood": (ood_runs, ood_data.hidden)}

        difficulty = {dataset: question_difficulty(load_questions(Path(params.paths.questions) / f"{dataset}.jsonl"))
                      for dataset in ("id", "ood")}
        extraction = {split: answer_extraction(id_runs[id_runs["split"] == split]) for split in ("train", "val")}

        by_split, summaries, calibrations, regressions, paired = {}, {}, {}, {}, []
        roc_frames, risk_frames, reliability_frames, difficulty_frames = [], [], [], []
        for split, (runs, hidden) in evaluated.items():
            scores = score_runs(runs, hidden, id_data.positions, id_data.layers, probes)
            by_split[split], summaries[split], split_paired = split_metrics(runs, scores, high_se_threshold, split,
                                                                            params.evaluate, params.seed)
            paired += split_paired
            extraction[split] = answer_extraction(runs)
            difficulty_frames.append(difficulty_table(runs, scores, difficulty["ood" if split == "ood" else "id"],
                                                      split, params.evaluate, params.seed))
            correct = runs["correct"].to_numpy(bool)
            roc_frames.append(roc_table(~correct, scores, split))
            risk_frames.append(risk_coverage_table(correct, scores, split))
            calibrations[split], reliability = calibration(correct, scores, split, params.evaluate.calibration_bins)
            reliability_frames.append(reliability)
            regressions[split] = regression_metrics(runs, scores)

        location_probes = load_location_probes(params.paths.probes)
        by_layer = auroc_by_layer(location_probes, {"val": (id_runs[id_runs["split"] == "val"], id_data.hidden),
                                                    **evaluated}, id_data.positions, id_data.layers,
                                  high_se_threshold)
        roc = pd.concat(roc_frames, ignore_index=True)
        warning = early_warning(selection, location_probes, evaluated, id_data.positions, id_data.layers,
                                high_se_threshold, params.evaluate, params.seed)
        by_difficulty = concat_rows(difficulty_frames, DIFFICULTY.columns)
        report = EvaluateReport(
            splits=by_split, paired_differences=paired, answer_extraction=extraction,
            by_difficulty=[DifficultyRow(**row) for row in by_difficulty.replace({np.nan: None}).to_dict("records")],
            summary=summaries, calibration=calibrations, se_regression=regressions,
            settings=evaluate_settings(params.evaluate, selection, probes),
            early_warning=[EarlyWarningRow(**row) for row in warning.replace({np.nan: None}).to_dict("records")])

        plots = Path(params.paths.plots)
        write_model(report, outputs.path(Path(params.paths.metrics) / EVALUATE_FILE))
        write_table(by_layer, AUROC_BY_LAYER, outputs.path(AUROC_BY_LAYER.path(plots)))
        write_table(roc, ROC, outputs.path(ROC.path(plots)))
        write_table(warning, EARLY_WARNING, outputs.path(EARLY_WARNING.path(plots)))
        write_table(concat_rows(risk_frames, RISK_COVERAGE.columns), RISK_COVERAGE,
                    outputs.path(RISK_COVERAGE.path(plots)))
        write_table(by_difficulty, DIFFICULTY, outputs.path(DIFFICULTY.path(plots)))
        write_table(concat_rows(reliability_frames, RELIABILITY.columns), RELIABILITY,
                    outputs.path(RELIABILITY.path(plots)))
        cost.update({"location_probes_scored": len(location_probes),
                     "runs_scored": int(sum(len(runs) for runs, _ in evaluated.values())),
                     "bootstrap_resamples": params.evaluate.bootstrap, "permutations": params.evaluate.permutations})
    return report


def main() -> None:
    run(load_params())


if __name__ == "__main__":
    run_stage(main, __doc__)
