"""Benchmark: the CPU stages (train_probes, evaluate, stability, analysis) at a real model's shapes, on synthetic
hidden states with a planted signal, and the probe fitting against the exhaustive search at a small size.

Run: ``nice python tests/benchmarks/bench_scale.py --runs 5000 --positions 6 --layers 37 --hidden 2560``
(Qwen3-4B on MATH-500 with K = 10: a 5.7 GB float16 id array plus ``--ood-runs``; about 20 minutes on 2 cores).
Any size works, e.g. ``--runs 1000 --positions 2 --layers 4 --hidden 2560`` for a quick look.

1. **Same-process ratio.** On a small array (``--baseline-runs`` x ``--baseline-positions`` x
   ``--baseline-layers`` x ``--hidden``, in memory) ``selection.train`` runs three times: with the exhaustive
   search (C cross-validated at every location, float64: the method before screening, ``probes.screen_locations:
   0``), with screening (``--screen-locations``, ``--screen-method``, float32) and with the other screen method.
   Prints the wall times, their ratios, and whether each found the planted locations; and extrapolates the
   exhaustive search to the full size by its measured seconds per location, times locations, times (train
   runs)^1 (lbfgs and ridge both grow about linearly in rows at a fixed width), labelled as an estimate.
2. **The stages at full size.** Writes a synthetic project into ``--workdir`` (params.yaml with paths there; runs,
   semantic entropy, questions, and the hidden states written chunk by chunk into one ``.npy`` shard per position,
   never whole in memory) and runs each stage as ``python -m stages.<name>`` in a fresh process, so each peak RSS
   is that stage's own (``os.wait4``'s ``ru_maxrss``). Prints one JSON line per stage: wall seconds, peak RSS;
   then whether train_probes chose the planted locations.

The synthetic states: every (position, layer) is noise N(0, 1) plus a per-question vector (0.5 N(0, 1)), so
runs of one question are alike, as with a real model. Correct runs are shifted by ``--strength`` along a random
unit direction at (think_end or the second-last position, layer 2/3 of the way up); semantic entropy (a question's
property) moves the states along another direction at (last position, middle layer). Everything else is noise.
Asserts nothing (machines are shared).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from stages.lib.probes import selection  # noqa: E402
from stages.lib.probes.dataset import attach_splits, split_questions  # noqa: E402
from stages.lib.params import parse_params  # noqa: E402
from stages.lib.hidden.store import create_hidden, finish_hidden  # noqa: E402
from stages.lib.schema.tables import HiddenMeta  # noqa: E402

RUNS_PER_QUESTION = 10
TRACE_POSITIONS = ["tbg", "think_25", "think_50", "think_75", "think_end", "slt"]
STAGES = ("train_probes", "evaluate", "stability", "analysis")


def position_names(n: int) -> list[str]:
    if n <= len(TRACE_POSITIONS):
        return TRACE_POSITIONS[:n - 2] + TRACE_POSITIONS[-2:] if n >= 2 else ["slt"]
    return ["tbg"] + [f"think_{p}" for p in range(1, n - 2)] + ["think_end", "slt"]


def planted_locations(positions: list[str], n_layers: int) -> dict[str, tuple[str, int]]:
    """label -> (position, layer) where the synthetic signal lives."""
    return {"correct": (positions[max(len(positions) - 2, 0)], (2 * n_layers) // 3),
            "high_se": (positions[-1], n_layers // 2)}


def synthetic_labels(n_runs: int, seed: int, dataset: str) -> tuple[pd.DataFrame, np.ndarray]:
    """(runs: question_id, run_id, correct, semantic_entropy, mean_token_entropy; per-question SE z-score)."""
    rng = np.random.default_rng(seed)
    n_questions = max(n_runs // RUNS_PER_QUESTION, 2)
    question_index = np.repeat(np.arange(n_questions), RUNS_PER_QUESTION)[:n_runs]
    difficulty = rng.uniform(0.1, 0.9, n_questions)
    entropy = np.round(rng.uniform(0, np.log(RUNS_PER_QUESTION), n_questions), 4)
    correct = rng.random(len(question_index)) < difficulty[question_index]
    runs = pd.DataFrame({
        "question_id": np.array([f"{dataset}-{i:05d}" for i in range(n_questions)], dtype=object)[question_index],
        "run_id": np.arange(len(question_index)) % RUNS_PER_QUESTION,
        "correct": correct,
        "semantic_entropy": entropy[question_index],
        "mean_token_entropy": rng.normal(1.0, 0.3, len(question_index)) - 0.2 * correct,
    })
    return runs, ((entropy - entropy.mean()) / entropy.std())[question_index]


def hidden_chunks(runs: pd.DataFrame, se_z: np.ndarray, positions: list[str], n_layers: int, hidden: int,
                  strength: float, seed: int, chunk_questions: int = 10):
    """Yield (first row, (rows, positions, layers, hidden) float16 block) over ``runs``, questions whole."""
    rng = np.random.default_rng(seed + 1000)
    directions = rng.standard_normal((2, hidden)).astype(np.float32)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    planted = planted_locations(positions, n_layers)
    where = {name: (positions.index(position), layer) for name, (position, layer) in planted.items()}
    correct = runs["correct"].to_numpy(float)
    correct_centred = correct - correct.mean()
    rows_per_chunk = chunk_questions * RUNS_PER_QUESTION
    for start in range(0, len(runs), rows_per_chunk):
        stop = min(start + rows_per_chunk, len(runs))
        n = stop - start
        block = rng.standard_normal((n, len(positions), n_layers, hidden), dtype=np.float32)
        n_q = -(-n // RUNS_PER_QUESTION)
        question = 0.5 * rng.standard_normal((n_q, len(positions), n_layers, hidden), dtype=np.float32)
        block += np.repeat(question, RUNS_PER_QUESTION, axis=0)[:n]
        p, layer = where["correct"]
        block[:, p, layer, :] += strength * correct_centred[start:stop, None] * directions[0]
        p, layer = where["high_se"]
        block[:, p, layer, :] += 0.5 * strength * se_z[start:stop, None] * directions[1]
        yield start, block.astype(np.float16)


def in_memory_hidden(runs, se_z, positions, n_layers, hidden, strength, seed) -> np.ndarray:
    array = np.empty((len(runs), len(positions), n_layers, hidden), dtype=np.float16)
    for start, block in hidden_chunks(runs, se_z, positions, n_layers, hidden, strength, seed):
        array[start:start + len(block)] = block
    return array


def found(trained, planted) -> bool:
    chosen = trained.selection.probes
    return ((chosen["accuracy_probe"].position, chosen["accuracy_probe"].layer) == planted["correct"]
            and (chosen["se_probe"].position, chosen["se_probe"].layer) == planted["high_se"])


def repo_params(workdir: Path, overrides: dict) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"] = {name: str(workdir / name) for name in raw["paths"]}
    for dotted, value in overrides.items():
        group, key = dotted.split(".")
        raw[group][key] = value
    return raw


# ---- 1. the same-process ratio --------------------------------------------------------------------------
def baseline_ratio(args, new_overrides: dict) -> dict:
    positions = position_names(args.baseline_positions)
    planted = planted_locations(positions, args.baseline_layers)
    runs, se_z = synthetic_labels(args.baseline_runs, args.seed, "id")
    hidden = in_memory_hidden(runs, se_z, positions, args.baseline_layers, args.hidden, args.strength, args.seed)
    runs = runs.assign(hidden_row=np.arange(len(runs)))
    splits = split_questions(runs["question_id"], [], 0.6, 0.2, args.seed)
    runs = attach_splits(runs, splits, "id")
    layers = list(range(args.baseline_layers))
    result = {"size": f"{args.baseline_runs} runs x {len(positions)} positions x {len(layers)} layers x "
                      f"{args.hidden}"}
    # the screen that is not the one asked for, timed beside it: logistic fits at screen_c against the
    # difference-in-means directions, same array, same process
    other = "logistic" if new_overrides["probes.screen_method"] == "mean_difference" else "mean_difference"
    for method, overrides in (("exhaustive", {"probes.screen_locations": 0, "probes.dtype": "float64"}),
                              ("screening", new_overrides),
                              (f"screening_{other}", {**new_overrides, "probes.screen_method": other})):
        params = parse_params(repo_params(Path("/nonexistent"), overrides))
        started = time.perf_counter()
        trained = selection.train(runs, hidden, positions, layers, params.probes, params.seed)
        result[f"{method}_s"] = round(time.perf_counter() - started, 2)
        result[f"{method}_found_planted"] = found(trained, planted)
    result["ratio_exhaustive_over_screening"] = round(result["exhaustive_s"] / result["screening_s"], 2)
    result[f"ratio_screening_{other}_over_screening"] = round(result[f"screening_{other}_s"] / result["screening_s"],
                                                             2)
    params = parse_params(repo_params(Path("/nonexistent"), new_overrides)).probes
    for size, locations in (("baseline_size", len(positions) * len(layers)),
                            ("full_size", args.positions * args.layers)):
        result[f"location_fits_{size}"] = location_fit_counts(locations, params)
    full_locations = args.positions * args.layers
    per_location = result["exhaustive_s"] / (len(positions) * len(layers))
    result["exhaustive_full_size_estimate_s"] = round(
        per_location * full_locations * args.runs / args.baseline_runs)
    return result


def location_fit_counts(locations: int, probes) -> dict[str, int]:
    """Fits of the 3 location probes, cross-validation fits included: exhaustive (C x folds + 1 refit at every
    location) against screening (1 per location, then C x folds + 1 at the N best); layer ranges not counted."""
    per_cv = len(probes.c_grid) * probes.cv_folds + 1
    screened = min(probes.screen_locations, locations)
    return {"exhaustive": 3 * locations * per_cv, "screening": 3 * locations + 3 * screened * per_cv}


# ---- 2. the stages at full size --------------------------------------------------------------------------
def write_project(workdir: Path, args, overrides: dict) -> dict[str, tuple[str, int]]:
    positions = position_names(args.positions)
    raw = repo_params(workdir, overrides)
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = parse_params(raw)
    for dataset, n_runs, seed in (("id", args.runs, args.seed), ("ood", args.ood_runs, args.seed + 1)):
        runs, se_z = synthetic_labels(n_runs, seed, dataset)
        n = len(runs)
        think_end = np.full(n, 30)
        run_table = pd.DataFrame({
            "question_id": runs["question_id"], "run_id": runs["run_id"], "dataset": dataset,
            "prompt_ids": [[1, 2, 3]] * n, "generated_ids": [[4] * 40] * n,
            "text": ["<think>step by step</think> \\boxed{1}"] * n,
            "think_start_index": pd.array(np.zeros(n, int), dtype="Int64"),
            "think_end_index": pd.array(think_end, dtype="Int64"), "think_missing": False, "truncated": False,
            "answer": "1", "answer_source": "boxed", "token_logprobs": [[-0.1] * 40] * n,
            "token_topk_logprob_mean": [[-2.0] * 40] * n,
            "token_entropies": [[0.5] * 40] * n,
            "sequence_loglik": -4.0, "mean_token_entropy": runs["mean_token_entropy"], "n_generated": 40,
            "correct": runs["correct"]})
        entropy = pd.DataFrame({
            "question_id": runs["question_id"], "run_id": runs["run_id"], "cluster_id": 0, "n_clusters": 1,
            "semantic_entropy": runs["semantic_entropy"], "semantic_entropy_weighted": runs["semantic_entropy"],
            "naive_entropy": 1.0, "num_semantic_sets": 1, "eigv": 0.0, "degree": 0.0, "eccentricity": 0.0,
            "kernel_language_entropy": 0.1})
        questions = runs.drop_duplicates("question_id")
        for directory, frame in ((params.paths.runs, run_table), (params.paths.semantic_entropy, entropy)):
            Path(directory).mkdir(parents=True, exist_ok=True)
            frame.to_parquet(Path(directory) / f"{dataset}.parquet", index=False)
        Path(params.paths.questions).mkdir(parents=True, exist_ok=True)
        with open(Path(params.paths.questions) / f"{dataset}.jsonl", "w") as out:
            for question_id in questions["question_id"]:
                out.write(json.dumps({"question_id": question_id, "dataset": dataset, "question": "1?",
                                      "gold": "1"}) + "\n")
        meta = HiddenMeta(positions=positions, layers=list(range(args.layers)), hidden_size=args.hidden,
                          dtype="float16", model="synthetic")
        array = create_hidden(params.paths.hidden, dataset, n, meta)  # one memory-mapped shard per position
        for start, block in hidden_chunks(runs, se_z, positions, args.layers, args.hidden, args.strength, seed):
            array[np.arange(start, start + len(block))] = block
        finish_hidden(array, params.paths.hidden, dataset,
                      pd.DataFrame({"row": np.arange(n), "question_id": runs["question_id"],
                                    "run_id": runs["run_id"], "sequence_length": 43, "think_end_fallback": False}),
                      meta)
        del array
    return planted_locations(positions, args.layers)


# Runs the stage module as ``python -m`` would, then writes the process's own peak RSS (VmHWM, KiB). A child's
# ru_maxrss would not do: Linux carries the forking parent's high-water mark into the child (this process wrote
# the 5.8 GB array through a memory map, so every stage would read 6 GB).
PEAK_WRAPPER = ("import atexit, runpy, sys\n"
                "out = sys.argv.pop()\n"
                "atexit.register(lambda: open(out, 'w').write(next(line.split()[1]"
                " for line in open('/proc/self/status') if line.startswith('VmHWM'))))\n"
                "sys.argv = sys.argv[1:]\n"
                "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")


def run_stage(workdir: Path, stage: str) -> dict:
    """Run ``python -m stages.<stage>`` in ``workdir``; its wall time and its own peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log_path, peak_path = workdir / f"{stage}.log", workdir / f"{stage}.peak_kib"
    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        status = subprocess.call([sys.executable, "-c", PEAK_WRAPPER, f"stages.{stage}", str(peak_path)],
                                 cwd=workdir, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    peak = int(peak_path.read_text()) / 2**20 if peak_path.exists() else None
    return {"stage": stage, "wall_s": round(wall, 1), "peak_rss_gb": None if peak is None else round(peak, 2),
            "exit_status": status, "log": str(log_path)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--ood-runs", type=int, default=None, help="default: runs / 10")
    parser.add_argument("--positions", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=2560)
    parser.add_argument("--strength", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--screen-locations", type=int, default=3)
    parser.add_argument("--screen-method", default="mean_difference", choices=["mean_difference", "logistic"])
    parser.add_argument("--baseline-runs", type=int, default=600)
    parser.add_argument("--baseline-positions", type=int, default=2)
    parser.add_argument("--baseline-layers", type=int, default=2)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--baseline-only", action="store_true", help="only the same-process ratio")
    parser.add_argument("--stages", nargs="*", default=list(STAGES), choices=STAGES)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory, removed after")
    args = parser.parse_args()
    args.ood_runs = args.runs // 10 if args.ood_runs is None else args.ood_runs
    overrides = {"probes.screen_locations": args.screen_locations, "probes.screen_method": args.screen_method,
                 "probes.dtype": "float32"}
    print(json.dumps({"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                      "probes": overrides}), flush=True)

    if not args.skip_baseline:
        print(json.dumps({"baseline": baseline_ratio(args, overrides)}), flush=True)
    if args.baseline_only:
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        planted = write_project(workdir, args, {**overrides, "toy.steps": 20})
        print(json.dumps({"stage": "write synthetic project", "wall_s": round(time.perf_counter() - started, 1),
                          "hidden_gb": round(sum(p.stat().st_size for p in (workdir / "hidden").glob("*/*.npy"))
                                             / 2**30, 2)}), flush=True)
        # the toy tokenizer (a barely trained toy model): analysis decodes the runs' tokens with the model's tokenizer
        print(json.dumps({"setup": run_stage(workdir, "toy_model")}), flush=True)
        for stage in args.stages:
            result = run_stage(workdir, stage)
            print(json.dumps(result), flush=True)
            if result["exit_status"] != 0:
                print((workdir / f"{stage}.log").read_text()[-3000:], file=sys.stderr)
                break
        selection_path = workdir / "probes" / "selection.json"
        if selection_path.exists():
            chosen = json.loads(selection_path.read_text())
            print(json.dumps({"planted": {k: list(v) for k, v in planted.items()},
                              "chosen": {name: [chosen[name]["position"], chosen[name]["layer"],
                                                round(chosen[name]["val_score"], 3)]
                                         for name in ("accuracy_probe", "se_probe", "se_regression_probe")},
                              "found_planted": (chosen["accuracy_probe"]["position"],
                                                chosen["accuracy_probe"]["layer"]) == planted["correct"]
                              and (chosen["se_probe"]["position"], chosen["se_probe"]["layer"])
                              == planted["high_se"],
                              "probes_dir_mb": round(sum(p.stat().st_size for p in (workdir / "probes").iterdir())
                                                     / 2**20, 1)}), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({"bench_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))


if __name__ == "__main__":
    main()
