"""Benchmark: NLI classifier calls per question, ours (dedupe + cache + one forward pass per step) against the
reference greedy algorithm (jlko/semantic_uncertainty ``get_semantic_ids``: no dedupe, 2 calls per compared pair).

Run: ``python tests/benchmarks/bench_equivalence_calls.py [--runs data/runs] [--nli-model DIR]``

Counts depend on the decisions, so an oracle stands in for the NLI model: entailment both ways when math-verify
calls two answers equivalent, contradiction otherwise. Answer lists come from ``{runs}/{id,ood}.parquet`` (the
toy run) when present, plus synthetic K=10 lists with 1..10 distinct answers. Two of our settings:
``per question`` (the cache never outlives a question: what ``prepend_question: true`` gives) and ``shared cache``
(bare answers, cached across questions). With ``--nli-model`` (a local MNLI checkpoint) it also times the real
model, one pair per call (the reference) against ours; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_equivalence import reference_semantic_ids  # noqa: E402

from stages.lib.questions.answers import answers_equivalent  # noqa: E402
from stages.lib.semantic.equivalence import NliClassifier, NliJudge, greedy_reference_clusters, nli_equivalent  # noqa: E402


def oracle_classify(directed_pairs):
    return ["entailment" if answers_equivalent(premise, hypothesis) else "contradiction"
            for premise, hypothesis in directed_pairs]


def question_lists(runs_dir: Path) -> dict[str, list[list[str]]]:
    lists = {}
    for dataset in ("id", "ood"):
        path = runs_dir / f"{dataset}.parquet"
        if path.exists():
            runs = pd.read_parquet(path, columns=["question_id", "run_id", "answer"]).sort_values(
                ["question_id", "run_id"])
            if len(runs):
                lists[f"toy {dataset}"] = runs.groupby("question_id", sort=False)["answer"].apply(list).tolist()
    rng = random.Random(0)
    for distinct in (1, 2, 3, 5, 10):
        answer_lists = []
        for _ in range(50):
            values = [str(v) for v in rng.sample(range(1000), distinct)]
            answers = values + [rng.choice(values) for _ in range(10 - distinct)]
            rng.shuffle(answers)
            answer_lists.append(answers)
        lists[f"synthetic K=10, {distinct} distinct"] = answer_lists
    return lists


def summary(values: list[float]) -> str:
    return f"{statistics.mean(values):6.2f} ({min(values):g}-{max(values):g})"


def count_calls(answer_lists: list[list[str]]) -> dict[str, object]:
    reference = [reference_semantic_ids(answers, answers_equivalent)[1] for answers in answer_lists]
    passes, evaluations = [], []
    for answers in answer_lists:
        judge = NliJudge(oracle_classify, batch_size=64)
        greedy_reference_clusters(answers, judge)
        passes.append(judge.forward_passes)
        evaluations.append(judge.pair_evaluations)
    shared = NliJudge(oracle_classify, batch_size=64)
    for answers in answer_lists:
        greedy_reference_clusters(answers, shared)
    n = len(answer_lists)
    distinct = [len({a for a in answers if a}) for answers in answer_lists]
    return {"questions": n, "distinct answers": summary(distinct),
            "reference calls/q": summary(reference), "ours passes/q": summary(passes),
            "ours pair evals/q": summary(evaluations),
            "shared cache passes/q": f"{shared.forward_passes / n:6.2f}",
            "ratio ref/ours passes": f"{sum(reference) / sum(passes):6.1f}" if sum(passes) else "no pass"}


def time_model(model: str, answer_lists: list[list[str]]) -> None:
    classifier = NliClassifier(model)

    def reference_equivalent(first: str, second: str) -> bool:  # two forward passes of one pair each, no cache
        return nli_equivalent(classifier([(first, second)])[0], classifier([(second, first)])[0], True)

    start = time.perf_counter()
    reference_passes = sum(reference_semantic_ids(answers, reference_equivalent)[1] for answers in answer_lists)
    reference_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ours = NliJudge(classifier, batch_size=64)
    for answers in answer_lists:
        greedy_reference_clusters(answers, ours)
        ours.cache.clear()
    ours_seconds = time.perf_counter() - start
    print(f"\n{model}: reference-style {reference_seconds:.2f} s ({reference_passes} passes), ours "
          f"{ours_seconds:.2f} s ({ours.forward_passes} passes), speed-up {reference_seconds / ours_seconds:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "data/runs")
    parser.add_argument("--nli-model", help="a local MNLI checkpoint to time (optional)")
    parser.add_argument("--timed-questions", type=int, default=10)
    args = parser.parse_args()
    lists = question_lists(args.runs)
    rows = {name: count_calls(answer_lists) for name, answer_lists in lists.items()}
    print(pd.DataFrame(rows).T.to_string())
    if args.nli_model:
        first = next(iter(lists.values()))
        time_model(args.nli_model, first[:args.timed_questions])


if __name__ == "__main__":
    main()
