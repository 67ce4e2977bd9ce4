"""Stage train_probes: split questions, fit the accuracy, SE and SE-regression probes and the entropy baseline.

Run with ``python -m stages.train_probes``. Reads the runs, semantic entropy and hidden states; writes
``{paths.probes}/`` atomically (splits, probes, location probes, selection.json) and its cost record. How probes are
fitted and their locations chosen on val (never test) is stages/lib/probes/selection.py."""

from __future__ import annotations

import logging

from stages.lib.io.files import cost_record, run_stage, stage_outputs
from stages.lib.probes.dataset import attach_splits, load_dataset, require_same_locations, split_questions
from stages.lib.params import Params, load_params
from stages.lib.probes.store import write_probes
from stages.lib.probes.selection import TrainedProbes, train

log = logging.getLogger(__name__)


def run(params: Params) -> TrainedProbes:
    with stage_outputs() as outputs, cost_record(params.paths.metrics, "train_probes", outputs) as cost:
        id_data = load_dataset(params, "id")
        ood_data = load_dataset(params, "ood")
        require_same_locations(id_data, ood_data)
        splits = split_questions(id_data.runs["question_id"], ood_data.runs["question_id"],
                                 params.probes.train_fraction, params.probes.val_fraction, params.seed)
        runs = attach_splits(id_data.runs, splits, "id")
        trained = train(runs, id_data.hidden, id_data.positions, id_data.layers, params.probes, params.seed)
        write_probes(outputs.path(params.paths.probes), splits, trained)
        cost.update({"probes_fitted": trained.n_fitted, "train_runs": int((runs["split"] == "train").sum()),
                     "locations": len(id_data.positions) * len(id_data.layers)})
    return trained


def main() -> None:
    run(load_params())


if __name__ == "__main__":
    run_stage(main, __doc__)
