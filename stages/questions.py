"""Stage questions: build the in-distribution and out-of-distribution question sets.

Run with ``python -m stages.questions`` (or ``dvc repro questions``). Reads ``seed``, ``data.*``, the chain ranges in
``toy.*`` and ``paths.questions``; writes ``{paths.questions}/id.jsonl`` and ``ood.jsonl`` (QUESTIONS.columns). The
sources are described in stages/lib/questions/sources.py."""

from __future__ import annotations

import logging

import pandas as pd

from stages.lib.io.files import run_stage, stage_outputs
from stages.lib.params import Params, load_params
from stages.lib.questions.sources import build_dataset, write_questions

log = logging.getLogger(__name__)


def run(params: Params) -> dict[str, pd.DataFrame]:
    frames = {
        "id": build_dataset("id", params.data.source, params.data.n_questions, params.seed, params.toy,
                            params.data.revision),
        "ood": build_dataset("ood", params.data.ood_source, params.data.n_ood_questions, params.seed, params.toy,
                             params.data.revision),
    }
    with stage_outputs() as outputs:
        directory = outputs.path(params.paths.questions)
        directory.mkdir()
        for dataset, frame in frames.items():
            write_questions(frame, directory / f"{dataset}.jsonl")
    log.info("wrote %s: %d in-distribution and %d out-of-distribution questions", params.paths.questions,
             len(frames["id"]), len(frames["ood"]))
    return frames


def main() -> None:
    run(load_params())


if __name__ == "__main__":
    run_stage(main, __doc__)
