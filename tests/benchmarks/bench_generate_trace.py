"""Benchmark: batched generation and tracing against one-at-a-time loops, on the same model, in one process.

Run: ``python tests/benchmarks/bench_generate_trace.py [--model artifacts/toy_model] [--questions 32]``

Uses the trained toy model when it exists (real answer lengths), else a random Qwen3 of the toy's size.
Prints medians over ``--repeats`` and the speed-up ratios; asserts nothing about time (machines are shared).
Also prints the per-stage wall seconds the last ``dvc repro`` recorded in artifacts/metrics/cost/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from stages.lib.questions.arithmetic import make_questions  # noqa: E402
from stages.lib.models.loading import load_model, prompt_ids  # noqa: E402
from stages.lib.params import load_params  # noqa: E402
from stages.lib.sampling.hf import eos_and_pad, sample_runs  # noqa: E402
from stages.lib.hidden.tracing import resolve_layers, trace_runs  # noqa: E402


def median_time(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def load(model_dir: Path):
    if (model_dir / "config.json").exists():
        return load_model(str(model_dir), model_dir)
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_qwen3  # a random model of the toy's size

    from stages.lib.models.toy import build_tokenizer
    tokenizer = build_tokenizer()
    return tiny_qwen3(tokenizer, layers=4, hidden=128), tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "artifacts/toy_model")
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    params = load_params(ROOT / "params.yaml")
    model, tokenizer = load(args.model)
    eos_ids, pad_id = eos_and_pad(model, tokenizer)
    questions = make_questions(args.questions, np.random.default_rng(0), params.toy.min_terms,
                               params.toy.max_terms, params.toy.max_operand)
    prompts = [prompt_ids(tokenizer, q) for q, _ in questions]
    sampling = params.sampling
    one_question = type(sampling)(**{**sampling.__dict__, "batch_size": sampling.runs})

    rows = []
    for label, config in (("one question per call", one_question), ("batched across questions", sampling)):
        seconds, runs = median_time(lambda: sample_runs(model, prompts, config, eos_ids, pad_id, 0, False),
                                    args.repeats)
        tokens = sum(len(r.generated_ids) for q in runs for r in q)
        rows.append(("generate", label, seconds, tokens / seconds, "tokens/s"))

    traced = [{"question_id": str(q), "run_id": k, "prompt_ids": prompts[q], "generated_ids": r.generated_ids,
               "n_generated": len(r.generated_ids), "think_end_index": None}
              for q, question_runs in enumerate(runs) for k, r in enumerate(question_runs)]
    frame = pd.DataFrame(traced)
    layers = resolve_layers("all", model.config.num_hidden_layers + 1)
    positions = tuple(params.trace.positions)
    out = np.zeros((len(frame), len(positions), len(layers), model.config.hidden_size), np.float16)
    for label, batch in (("one run per pass", 1), ("batched", params.trace.batch_size)):
        seconds, _ = median_time(lambda: trace_runs(model, frame, positions, layers, batch, pad_id, out, False),
                                 args.repeats)
        rows.append(("trace", label, seconds, len(frame) / seconds, "sequences/s"))

    print(f"\nmodel: {args.model if (args.model / 'config.json').exists() else 'random toy-sized Qwen3'}; "
          f"{len(prompts)} questions x K={sampling.runs}; {torch.get_num_threads()} threads; "
          f"median of {args.repeats}")
    print(f"{'step':<9}{'mode':<27}{'seconds':>9}{'rate':>12}  unit")
    for step, label, seconds, rate, unit in rows:
        print(f"{step:<9}{label:<27}{seconds:>9.2f}{rate:>12.1f}  {unit}")
    print(f"speed-up: generation x{rows[1][3] / rows[0][3]:.1f}, trace x{rows[3][3] / rows[2][3]:.1f}")

    cost_dir = ROOT / params.paths.metrics / "cost"
    if cost_dir.is_dir():
        print("\nlast `dvc repro`, wall seconds per stage (artifacts/metrics/cost/):")
        total = 0.0
        for path in sorted(cost_dir.glob("*.json")):
            record = json.loads(path.read_text())
            total += record["wall_seconds"]
            print(f"  {record['stage']:<18}{record['wall_seconds']:>8.1f}")
        print(f"  {'total':<18}{total:>8.1f}")


if __name__ == "__main__":
    main()
