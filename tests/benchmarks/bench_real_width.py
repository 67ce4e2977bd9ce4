"""Benchmark: every stage end to end at a real model's width, offline, on CPU: a random-weight model shaped like
Qwen3-0.6B, long runs, per-stage wall time and peak memory; then the viewer's loader on the analysis table.

Run: ``nice python tests/benchmarks/bench_real_width.py --workdir /tmp/bench_real_width`` (default: 8 questions x
K = 2 runs x 1,024 new tokens; generation alone takes many minutes on 2 shared cores). A quick look:
``--questions 4 --runs-per-question 2 --new-tokens 64``. ``--skip-early-exit`` leaves out forced_answers and
early_exit (the forced answers re-read every run's prefix three times).

1. **The model** (no download): ``transformers.Qwen3Config`` with Qwen3-0.6B's shapes (``--hidden`` 1024,
   ``--layers`` 28, 16 query / 8 key-value heads of 128, MLP 3072, rope_theta 1e6, tied embeddings), random
   weights (``--seed``), saved with ``save_pretrained`` into the project's ``data/models/<name>/`` beside the toy
   model's character-level tokenizer (stages/lib/models/toy.py: ``<think>``/``</think>`` are single tokens). The
   vocabulary
   is that tokenizer's (about 100 tokens), not Qwen3's 151,936: the LM head of the real model is priced separately,
   as a measured estimate (``lm_head_estimate``: the (runs, 1024) x (1024, 151936) logits plus the log-softmax and
   entropy that generate's step recorder takes, timed for a few steps and scaled by the new tokens).
2. **Long runs.** The saved ``generation_config`` suppresses EOS, padding, the chat markers and both think markers
   (``suppress_tokens``), so every run writes ``--new-tokens`` tokens and the random model never opens or closes a
   think span itself. The generate stage runs unchanged; its time is the real one.
3. **Planted labels.** A random model never writes ``</think>`` or an answer, so every run would be wrong and
   train_probes would stop on a single-class label. After generate, this script rewrites each run in
   ``{paths.runs}/id.parquet``: its first token becomes ``<think>`` and its last tokens ``</think>\\boxed{answer}``,
   the length unchanged, the rows rebuilt with the pipeline's own ``build_run_records`` (text, think span, answer,
   correctness). The answers are planted per question so that each split (the pipeline's own ``split_questions``
   with the params' seed) holds questions of each kind: all runs right, one answer shared by all runs but wrong,
   half right, all wrong and different (semantic entropy 0 or > 0). ``token_logprobs`` and ``token_entropies`` keep
   the model's values of the steps that were overwritten (the planted tokens were not sampled). The labels are
   planted: no score measured here means anything. Every later stage runs on the full sequences: trace replays
   ``--new-tokens`` plus the prompt at every hidden state (``--layers`` + 1 of width ``--hidden``).
4. **The stages** run as ``python -m stages.<name>`` in a fresh process with ``cwd`` the project (bench_scale's
   ``run_stage``: peak RSS is the process's own ``VmHWM``, since ``ru_maxrss`` from ``os.wait4`` carries the
   parent's high-water mark across exec). One JSON line per stage: wall seconds, peak RSS, exit status, log file.
5. **The viewer**: the analysis table loaded by ``viewer.loaders.load_analysis`` (as the app does): its size on disk
   and in memory, each column's share, whether any column holds per-token lists, and the think texts' lengths.

Asserts nothing (machines are shared). Prints the machine's load average at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_scale import repo_params, run_stage  # noqa: E402
from stages.lib.questions.sources import load_questions  # noqa: E402

MODEL_NAME = "qwen3-0.6b-shaped-random"
REAL_VOCAB = 151_936  # Qwen3's tokenizer
STAGES = ("questions", "generate", "semantic_entropy", "trace", "train_probes", "forced_answers", "early_exit",
          "evaluate", "stability", "analysis")
EARLY_EXIT_STAGES = ("forced_answers", "early_exit")


# ---- 1. the model ------------------------------------------------------------------------------------------
def build_model(directory: str, hidden: int, layers: int, seed: int) -> dict:
    """Save a random-weight Qwen3-0.6B-shaped model and the toy tokenizer to ``directory`` (run in a spawned
    process, so this process never holds the weights)."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from stages.lib.models import toy
    from stages.lib.models.loading import THINK_END, THINK_START

    tokenizer = toy.build_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, intermediate_size=3 * hidden, rope_theta=1_000_000.0,
        tie_word_embeddings=True, max_position_embeddings=40_960, rms_norm_eps=1e-6,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    # Every run writes max_new_tokens tokens, and the model never writes a think marker itself (it is planted).
    suppressed = sorted(tokenizer.convert_tokens_to_ids(list(toy.SPECIAL_TOKENS) + [THINK_START, THINK_END]))
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
                                               suppress_tokens=suppressed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return {"vocab_size": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters()),
            "suppressed_token_ids": suppressed}


def spawned(function, *args):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def lm_head_estimate(rows: int, hidden: int, new_tokens: int, steps: int = 8) -> dict:
    """Measured seconds per decoding step of the real vocabulary's head at ``rows`` sequences: the logits of the
    last position, then the log-softmax and entropy of generate's step recorder; scaled by ``new_tokens``."""
    import torch

    generator = torch.Generator().manual_seed(0)
    head = torch.randn(REAL_VOCAB, hidden, generator=generator) * 0.02
    states = torch.randn(rows, hidden, generator=generator)
    with torch.no_grad():
        for _ in range(2):
            torch.special.entr(torch.log_softmax(states @ head.T, -1).exp()).sum(-1)
        started = time.perf_counter()
        for _ in range(steps):
            torch.special.entr(torch.log_softmax(states @ head.T, -1).exp()).sum(-1)
    per_step = (time.perf_counter() - started) / steps
    return {"real_vocab": REAL_VOCAB, "rows": rows, "seconds_per_step": round(per_step, 4),
            "generate_extra_s_estimate": round(per_step * new_tokens, 1),
            "extra_weights_gb_float32": round(REAL_VOCAB * hidden * 4 / 2**30, 2),
            "note": "estimate: the head's matmul + log-softmax + entropy per step x new tokens; trace and forced "
                    "answers compute at most one position's logits, so they add the weights' memory only"}


# ---- 2. the project --------------------------------------------------------------------------------------
def write_project(workdir: Path, args) -> dict:
    runs = args.questions * args.runs_per_question
    overrides = {
        "model.name": f"data/models/{MODEL_NAME}", "model.dtype": "float32", "model.device": "cpu",
        "data.source": args.source, "data.n_questions": args.questions, "data.ood_source": "none",
        "data.n_ood_questions": 0,
        "sampling.backend": "hf", "sampling.runs": args.runs_per_question, "sampling.max_new_tokens": args.new_tokens,
        "sampling.batch_size": runs, "sampling.temp": 0.7,
        "semantic_entropy.method": "math",
        "trace.max_batch_tokens": args.max_batch_tokens, "trace.batch_size": runs,
        "probes.screen_locations": args.screen_locations, "probes.dtype": "float32", "probes.cv_folds": args.cv_folds,
        "analysis.umap_neighbors": min(15, runs - 1),
    }
    raw = repo_params(workdir, overrides)
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return raw


# ---- 3. planted labels -----------------------------------------------------------------------------------
KINDS = ("half_right", "all_right", "same_wrong", "different_wrong")


def wrong_answer(gold: str, k: int) -> str:
    try:
        return str(int(gold) + 1 + k)
    except ValueError:
        return f"{gold}+{1 + k}"


def planted_answers(kind: str, gold: str, runs: int) -> list[str]:
    if kind == "all_right":
        return [gold] * runs
    if kind == "same_wrong":
        return [wrong_answer(gold, 0)] * runs
    if kind == "half_right":
        return [gold if k < -(-runs // 2) else wrong_answer(gold, 0) for k in range(runs)]
    return [wrong_answer(gold, k) for k in range(runs)]


def plant_labels(workdir: Path, raw: dict) -> dict:
    """Rewrite ``{paths.runs}/id.parquet`` so each run opens a think span, closes it and gives a planted answer."""
    from transformers import AutoTokenizer

    from stages.lib.io.files import write_table
    from stages.lib.probes.dataset import split_questions
    from stages.lib.models.loading import THINK_END, think_tokens
    from stages.lib.params import parse_params
    from stages.lib.sampling.runs import SampledRun, build_run_records
    from stages.lib.schema.tables import RUNS

    params = parse_params(raw)
    tokenizer = AutoTokenizer.from_pretrained(workdir / params.model.name)
    think = think_tokens(tokenizer)
    questions = load_questions(Path(params.paths.questions) / "id.jsonl")
    path = Path(params.paths.runs) / "id.parquet"
    runs = pd.read_parquet(path)
    splits = split_questions(questions["question_id"], [], params.probes.train_fraction,
                             params.probes.val_fraction, params.seed)
    # the kinds cycle within each split, so every split has right and wrong runs, and SE 0 and SE > 0 questions
    kind_of = {question_id: KINDS[i % len(KINDS)] for _, group in splits.groupby("split")
               for i, question_id in enumerate(group["question_id"])}
    prompts, sampled = [], []
    for _, question in questions.iterrows():
        rows = runs[runs["question_id"] == question["question_id"]].sort_values("run_id")
        answers = planted_answers(kind_of[question["question_id"]], str(question["gold"]), len(rows))
        prompts.append(list(rows["prompt_ids"].iloc[0]))
        question_runs = []
        for (_, row), answer in zip(rows.iterrows(), answers):
            generated = list(row["generated_ids"])
            tail = tokenizer(f"{THINK_END}\\boxed{{{answer}}}", add_special_tokens=False).input_ids
            if len(generated) < len(tail) + 4:
                raise SystemExit(f"--new-tokens must leave room for the planted tail ({len(tail) + 4} tokens)")
            planted = [think.start_id] + generated[1:len(generated) - len(tail)] + tail
            question_runs.append(SampledRun(
                generated_ids=planted, token_logprobs=np.asarray(row["token_logprobs"], np.float32),
                token_entropies=np.asarray(row["token_entropies"], np.float32), stop_entropy=float("nan"),
                truncated=False, token_topk_logprob_mean=np.asarray(row["token_topk_logprob_mean"], np.float32)))
        sampled.append(question_runs)
    frame = build_run_records(questions, prompts, sampled, tokenizer, think)
    write_table(frame, RUNS, path)
    return {"planted": "labels", "runs": len(frame), "accuracy": round(float(frame["correct"].mean()), 3),
            "kinds": pd.Series(kind_of).value_counts().to_dict(),
            "n_generated_min_max": [int(frame["n_generated"].min()), int(frame["n_generated"].max())],
            "think_length_mean": round(float((frame["think_end_index"] - frame["think_start_index"] - 1).mean()), 1),
            "sequence_tokens_max": int((frame["prompt_ids"].map(len) + frame["n_generated"]).max())}


# ---- 5. the viewer's loader ------------------------------------------------------------------------------
def viewer_load(workdir: Path) -> dict:
    from viewer.loaders import load_analysis, run_files

    path = run_files(workdir).analysis
    started = time.perf_counter()
    frame = load_analysis(workdir)
    seconds = time.perf_counter() - started
    per_column = frame.memory_usage(deep=True, index=False)
    sequence_columns = [column for column in frame.columns if frame[column].dtype == object
                        and frame[column].map(lambda v: isinstance(v, (list, tuple, np.ndarray))).any()]
    text_chars = frame["text"].str.len()
    return {"viewer": "load_analysis", "load_s": round(seconds, 2), "rows": len(frame),
            "columns": len(frame.columns), "file_mb": round(path.stat().st_size / 2**20, 3),
            "memory_mb": round(float(per_column.sum()) / 2**20, 3),
            "largest_columns_mb": {c: round(float(v) / 2**20, 3) for c, v in per_column.nlargest(4).items()},
            "per_token_list_columns": sequence_columns,
            "text_chars_min_median_max": [int(text_chars.min()), int(text_chars.median()), int(text_chars.max())],
            "think_length_tokens_min_max": [int(frame["think_length"].min()), int(frame["think_length"].max())]}


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--runs-per-question", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--source", default="arithmetic", help="data.source: `arithmetic` or `jsonl:<path>`")
    parser.add_argument("--max-batch-tokens", type=int, default=16384, help="trace.max_batch_tokens")
    parser.add_argument("--screen-locations", type=int, default=3, help="probes.screen_locations")
    parser.add_argument("--cv-folds", type=int, default=3,
                        help="probes.cv_folds: 2 leaves a fold with one high_se class at 5 train questions")
    parser.add_argument("--seed", type=int, default=0, help="the model's random weights")
    parser.add_argument("--skip-early-exit", action="store_true", help="leave out forced_answers and early_exit")
    parser.add_argument("--skip-lm-head-estimate", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory, removed after")
    parser.add_argument("--start-at", choices=STAGES, default=None,
                        help="rerun from this stage in an existing --workdir: its params.yaml, not the flags")
    args = parser.parse_args()
    if args.start_at and not (args.workdir and (args.workdir / "params.yaml").exists()):
        parser.error("--start-at needs the --workdir of an earlier run")
    stages = [s for s in STAGES if not (args.skip_early_exit and s in EARLY_EXIT_STAGES)]
    if args.start_at:
        stages = stages[stages.index(args.start_at):]
    print(json.dumps({"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                      "load_average": load_average(), "cpus": os.cpu_count()}), flush=True)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_real_width-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.start_at:
            raw = yaml.safe_load((workdir / "params.yaml").read_text())
        else:
            raw = write_project(workdir, args)
            model_dir = workdir / "data" / "models" / MODEL_NAME
            if args.source.startswith("jsonl:") and not (workdir / args.source[6:]).exists():
                raise SystemExit(f"--source {args.source}: copy the file to {workdir / args.source[6:]} first")
            started = time.perf_counter()
            model = spawned(build_model, str(model_dir), args.hidden, args.layers, args.seed)
            print(json.dumps({"stage": "build model", "wall_s": round(time.perf_counter() - started, 1), **model,
                              "note": "vocab_size is the toy tokenizer's; Qwen3's is 151936 (lm_head_estimate)",
                              "model_dir_mb": round(sum(p.stat().st_size for p in model_dir.iterdir()) / 2**20)}),
                  flush=True)
        for stage in stages:
            result = run_stage(workdir, stage)
            print(json.dumps(result), flush=True)
            if result["exit_status"] != 0:
                print((workdir / f"{stage}.log").read_text()[-3000:], file=sys.stderr)
                break
            if stage == "generate":
                started = time.perf_counter()
                planted = plant_labels(workdir, raw)
                print(json.dumps({"stage": "plant labels (not a pipeline stage)",
                                  "wall_s": round(time.perf_counter() - started, 1), **planted}), flush=True)
        else:
            print(json.dumps(viewer_load(workdir)), flush=True)
        if not args.skip_lm_head_estimate:
            print(json.dumps({"lm_head_estimate": lm_head_estimate(args.questions * args.runs_per_question,
                                                                   args.hidden, args.new_tokens)}), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps({"bench_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                      "load_average": load_average()}))


if __name__ == "__main__":
    main()
