"""Stage early_exit: stopping probes on the forced answers, and every stopping rule calibrated on val.

Run with ``python -m stages.early_exit``. Reads the runs, hidden states and question splits (train_probes'
splits.parquet) and the forced answers; writes ``{paths.metrics}/early_exit.json`` (``schema.EarlyExitReport``),
``{paths.plots}/early_exit_pareto.csv`` (accuracy against tokens over tau, per rule and split),
``{paths.plots}/early_exit_guarantee.csv`` (realised loss against epsilon over redraws of the calibration questions)
and its cost record. The method (Learn-then-Test, named in docs/early_exit.md) is stages/lib/early_exit/rules.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from stages.lib.io.files import (cost_record, read_table, run_stage, stage_outputs, write_model,
                                 write_table)
from stages.lib.probes.dataset import attach_splits, load_dataset, require_same_locations
from stages.lib.early_exit.rules import (
    CALIBRATION_SPLIT,
    LOSS,
    METHOD,
    evaluate_rules,
    fit_stopping_probe,
    prefix_outcomes,
    stopping_probe_choices,
)
from stages.lib.early_exit.forced import require_traced_prefixes
from stages.lib.params import Params, load_params
from stages.lib.schema.reports import EARLY_EXIT_FILE, EarlyExitReport, EarlyExitSettings
from stages.lib.schema.tables import EARLY_EXIT_GUARANTEE, EARLY_EXIT_PARETO, FORCED_ANSWERS, QUESTION_SPLITS

log = logging.getLogger(__name__)


def run(params: Params) -> EarlyExitReport:
    settings, prefixes = params.early_exit, params.early_exit.prefixes
    require_traced_prefixes(prefixes, params.trace.positions)
    with stage_outputs() as outputs, cost_record(params.paths.metrics, "early_exit", outputs) as cost:
        splits = read_table(QUESTION_SPLITS, QUESTION_SPLITS.path(params.paths.probes))
        data = {dataset: load_dataset(params, dataset) for dataset in ("id", "ood")}
        require_same_locations(data["id"], data["ood"])
        positions, layers = data["id"].positions, data["id"].layers
        runs, hidden, outcomes = {}, {}, {}
        for dataset, loaded in data.items():
            path = Path(params.paths.forced_answers) / f"{dataset}.parquet"
            forced = read_table(FORCED_ANSWERS, path)
            with_splits = attach_splits(loaded.runs, splits, dataset)
            for split in (("train", "val", "test") if dataset == "id" else ("ood",)):
                runs[split] = with_splits[with_splits["split"] == split].sort_values(["question_id", "run_id"])
                hidden[split] = loaded.hidden
                outcomes[split] = prefix_outcomes(runs[split], forced, prefixes, str(path))

        train = runs["train"]
        probes = [fit_stopping_probe(hidden["train"], positions, layers, prefix, train["hidden_row"].to_numpy(),
                                     outcomes["train"].forced_correct[:, j], train["question_id"].to_numpy(),
                                     params.probes, params.seed) for j, prefix in enumerate(prefixes)]
        p_correct = {split: np.column_stack([probe.p_correct(hidden[split], runs[split]["hidden_row"].to_numpy(),
                                                             positions, layers) for probe in probes])
                     for split in runs}
        choices = stopping_probe_choices(probes, outcomes, p_correct)
        rules, pareto, guarantee = evaluate_rules(
            outcomes, p_correct, settings.epsilon, settings.delta, settings.tau_grid, params.evaluate.bootstrap,
            params.evaluate.confidence, params.seed, n_draws=settings.redraws,
            epsilon_grid=tuple(settings.epsilon_grid))
        report = EarlyExitReport.model_validate({
            "settings": EarlyExitSettings(
                method=METHOD, loss=LOSS, epsilon=settings.epsilon, delta=settings.delta, prefixes=list(prefixes),
                answer_prefix=settings.answer_prefix, calibration_split=CALIBRATION_SPLIT,
                n_calibration_questions=int(runs[CALIBRATION_SPLIT]["question_id"].nunique()),
                bootstrap=params.evaluate.bootstrap, confidence=params.evaluate.confidence,
                redraws=settings.redraws, epsilon_grid=list(settings.epsilon_grid)),
            "stopping_probes": choices, "rules": rules})
        write_model(report, outputs.path(Path(params.paths.metrics) / EARLY_EXIT_FILE))
        write_table(pareto, EARLY_EXIT_PARETO, outputs.path(EARLY_EXIT_PARETO.path(params.paths.plots)))
        write_table(guarantee, EARLY_EXIT_GUARANTEE, outputs.path(EARLY_EXIT_GUARANTEE.path(params.paths.plots)))
        cost.update(runs=int(sum(len(r) for r in runs.values())), stopping_probes=len(probes),
                    pareto_rows=len(pareto), redraws=settings.redraws)
    return report


def main() -> None:
    run(load_params())


if __name__ == "__main__":
    run_stage(main, __doc__)
