"""Stability: how much the probes' test AUROC moves when the split and the seed change.

Run from the repository root: ``python -m stages.stability`` (or ``dvc repro stability``).

One split is one draw: with a few hundred questions, which questions land in test moves AUROC by several
points. For each of ``stability.seeds`` seeds (``seed``, ``seed + 1``, ...; the first is the main run's split)
the in-distribution questions are split afresh, every probe is refitted on that split's train runs and its
location re-chosen on that split's val runs (``selection.train``, the same procedure), and every score of
``registry.stable_scores()`` is evaluated on that split's test runs and on the (fixed) OOD runs. A seed whose split
leaves a train or val label with one class (possible with few questions) is skipped and listed. To keep this cheap the
C of every probe is ``stability.c_grid`` (one value skips the cross-validation) and layer ranges are not
searched, so the range probes (which would equal the single-layer ones) are left out (``Score.stability``). With
``probes.screen_locations`` > 0 (a real model's shapes) each re-split screens the locations as train_probes does
(``probes.screen_method``) and fits only the N best per probe: seconds per seed instead of a fit per location.

Writes ``{paths.metrics}/stability.json`` (``schema.StabilityReport``: per split and score, mean, standard
deviation, min and max of AUROC over the seeds, and each seed's value) and ``{paths.plots}/stability.csv``
(STABILITY_PLOT.columns, one row per seed, split and score); cost in ``{paths.metrics}/cost/stability.json``.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from stages.lib import registry
from stages.lib.io.files import progress_bar
from stages.lib.probes.dataset import DatasetRuns, attach_splits, split_questions
from stages.lib.evaluation.scoring import score_runs
from stages.lib.evaluation.metrics import auroc
from stages.lib.params import ProbeParams
from stages.lib.probes.linear import SingleClassError
from stages.lib.schema.tables import STABILITY_PLOT
from stages.lib.schema.reports import SkippedSeed, StabilitySpread
from stages.lib.probes.selection import train

log = logging.getLogger(__name__)


def seed_aurocs(id_data: DatasetRuns, ood_data: DatasetRuns, probe_params: ProbeParams,
                seeds: range) -> tuple[pd.DataFrame, list[SkippedSeed]]:
    """STABILITY_PLOT rows: AUROC for flagging incorrect runs of every score, per seed and split, each seed's split
    drawn afresh and every probe refitted with ``probe_params``; and the seeds skipped because their split left a
    train or val label with one class (small question sets)."""
    rows, skipped = [], []
    for seed in progress_bar(seeds, desc="stability (re-splits)"):
        splits = split_questions(id_data.runs["question_id"], ood_data.runs["question_id"],
                                 probe_params.train_fraction, probe_params.val_fraction, seed)
        runs = attach_splits(id_data.runs, splits, "id")
        try:
            trained = train(runs, id_data.hidden, id_data.positions, id_data.layers, probe_params, seed)
        except SingleClassError as error:
            log.warning("seed %d skipped: %s", seed, error)
            skipped.append(SkippedSeed(seed=seed, reason=str(error)))
            continue
        evaluated = {"test": (runs[runs["split"] == "test"], id_data.hidden),
                     "ood": (attach_splits(ood_data.runs, splits, "ood"), ood_data.hidden)}
        for split, (split_runs, hidden) in evaluated.items():
            if len(split_runs) == 0:
                continue
            stable = registry.stable_scores()
            scores = score_runs(split_runs, hidden, id_data.positions, id_data.layers, trained.probes, stable)
            incorrect = ~split_runs["correct"].to_numpy(bool)
            seed_rows = [{"seed": seed, "split": split, "score": entry.name,
                          "auroc": auroc(incorrect, scores[entry.name].to_numpy(float))} for entry in stable]
            rows.extend(seed_rows)
            log.info("seed %d, %s: accuracy probe AUROC %s", seed, split, seed_rows[0]["auroc"])
    if not rows:
        raise SingleClassError(f"stability: every one of the {len(seeds)} seeds gave a split with a "
                               f"single-class label; first: {skipped[0].reason}")
    return pd.DataFrame.from_records(rows, columns=[c.name for c in STABILITY_PLOT.columns]), skipped


def summarise(table: pd.DataFrame) -> dict[str, dict[str, StabilitySpread]]:
    """Per split and score: mean, sample standard deviation (ddof 1), min and max of AUROC over the seeds
    where it is defined, the count of those seeds and every seed's value (null where undefined)."""
    summary: dict[str, dict[str, StabilitySpread]] = {}
    for (split, score), group in table.groupby(["split", "score"], sort=False):
        values = group["auroc"].to_numpy(float)
        defined = values[~np.isnan(values)]
        summary.setdefault(split, {})[score] = StabilitySpread(
            mean=float(defined.mean()) if len(defined) else None,
            std=float(defined.std(ddof=1)) if len(defined) > 1 else None,
            min=float(defined.min()) if len(defined) else None,
            max=float(defined.max()) if len(defined) else None,
            n_seeds=int(len(defined)),
            values=[None if np.isnan(v) else float(v) for v in values],
        )
    return summary
