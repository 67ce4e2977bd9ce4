"""Stage semantic_entropy: cluster each question's K answers by meaning; discrete and weighted SE, naive entropy.

Run with ``python -m stages.semantic_entropy``. Reads ``{paths.runs}/{id,ood}.parquet`` (and the questions when the
NLI judge reads them); writes ``{paths.semantic_entropy}/{id,ood}.parquet`` (SEMANTIC_ENTROPY) and its cost
record. The math lives in stages/lib/semantic/entropy.py, the equivalence methods in
stages/lib/semantic/equivalence.py."""

from __future__ import annotations

import logging
from pathlib import Path

from stages.lib.questions.answers import answers_equivalent
from stages.lib.io.files import cost_record, read_table, run_stage, stage_outputs, write_table
from stages.lib.semantic.entropy import CountingEquivalence, judge_clusterer, math_clusterer, semantic_entropy_table
from stages.lib.semantic.equivalence import NO_ANSWER, build_judge
from stages.lib.params import Params, load_params
from stages.lib.questions.sources import load_questions
from stages.lib.schema.machinery import DATASETS, SchemaError, validate_frame
from stages.lib.schema.tables import RUNS, SEMANTIC_ENTROPY

log = logging.getLogger(__name__)


def run(params: Params) -> dict:
    """Load runs -> cluster and compute entropies -> validate -> write the output directory atomically."""
    runs_dir, output_dir = Path(params.paths.runs), Path(params.paths.semantic_entropy)
    with stage_outputs() as outputs, cost_record(params.paths.metrics, "semantic_entropy", outputs) as cost:
        runs_by_dataset = {dataset: read_table(RUNS, RUNS.path(runs_dir, dataset))
                           for dataset in DATASETS}
        if runs_by_dataset["id"].empty:
            raise SchemaError(f"{RUNS.path(runs_dir, 'id')}: no rows; the in-distribution runs must not be empty")

        method = params.semantic_entropy.method
        equivalent, judge = None, None
        if method == "math":
            equivalent = CountingEquivalence(answers_equivalent)
        else:
            judge = build_judge(params.semantic_entropy)
        tables = {}
        for dataset, runs in runs_by_dataset.items():
            source = runs_dir / f"{dataset}.parquet"
            if judge is None:
                cluster = math_clusterer(equivalent)
            else:
                question_text = None
                if judge.uses_question and not runs.empty:
                    questions = load_questions(Path(params.paths.questions) / f"{dataset}.jsonl")
                    question_text = dict(zip(questions["question_id"], questions["question"]))
                cluster = judge_clusterer(judge, question_text)
            tables[dataset] = validate_frame(semantic_entropy_table(runs, cluster, str(source)),
                                             SEMANTIC_ENTROPY.columns, f"semantic_entropy output for {source}",
                                             SEMANTIC_ENTROPY.key)
            if not runs.empty:
                per_question = tables[dataset].drop_duplicates("question_id")
                log.info("%s: %d questions, mean clusters %.2f, mean SE %.3f nats, %d runs with no answer",
                         dataset, len(per_question), per_question["n_clusters"].mean(),
                         per_question["semantic_entropy"].mean(), int((runs["answer"] == NO_ANSWER).sum()))

        tmp_dir = outputs.path(output_dir)
        tmp_dir.mkdir()
        for dataset, table in tables.items():
            write_table(table, SEMANTIC_ENTROPY, SEMANTIC_ENTROPY.path(tmp_dir, dataset))
        log.info("wrote %s: %s", output_dir, {dataset: len(table) for dataset, table in tables.items()})

        cost["method"] = method
        if judge is None:
            cost["equivalence_checks"] = equivalent.calls
        else:
            counts = judge.counts()
            cost["equivalence_checks"] = counts.pop("pairs_judged")
            cost.update(counts)
            log.info("%s: %s", method, {"equivalence_checks": cost["equivalence_checks"], **counts})
        cost["questions"] = int(sum(runs["question_id"].nunique() for runs in runs_by_dataset.values()))
        cost["runs"] = int(sum(len(runs) for runs in runs_by_dataset.values()))
    return cost


def main() -> None:
    run(load_params())


if __name__ == "__main__":
    run_stage(main, __doc__)
