"""Benchmark on a GPU: batched generation and tracing against one-at-a-time loops, on a Qwen3-0.6B-shaped model.

Run (CUDA host): ``python tests/benchmarks/bench_cuda.py --out bench_cuda.json``
Smoke run (CPU, seconds): ``python tests/benchmarks/bench_cuda.py --small --device cpu --out /tmp/bench.json``

The model has RANDOM weights in the shape of Qwen3-0.6B (config below; nothing is downloaded, no tokenizer:
prompts are random token ids), in bfloat16 on CUDA by default. Random weights almost never emit EOS, so every
run generates ``--max-new-tokens`` tokens; the table reports the tokens actually generated.

- generation: the project's own ``stages.lib.sampling.hf.sample_runs``, all questions x K runs batched
  (``sampling.batch_size`` = questions x K, one generate() call), against one question (K runs) per call on
  ``--baseline-questions`` of them; tokens/s.
- trace: the project's ``stages.trace.trace_runs`` over ``--trace-sequences`` runs of ``--trace-length``
  tokens, every hidden-state index, 3 positions (tbg, think_end, slt), ``--trace-batch`` runs per forward
  against one run per forward, with the ``hf`` backend and, when nnsight imports, the ``nnsight`` backend;
  sequences/s. The two backends' arrays are compared (max absolute difference).

Prints medians over ``--repeats`` (after an untimed warm-up) and the speed-up ratios, and writes everything
as JSON to ``--out``. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import transformers
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from stages.lib.models.loading import TORCH_DTYPES, resolve_device  # noqa: E402
from stages.lib.params import load_params  # noqa: E402
from stages.lib.sampling.hf import sample_runs  # noqa: E402
from stages.lib.models.toy import build_tokenizer  # noqa: E402
from stages.lib.hidden.tracing import nnsight_model, resolve_layers, trace_runs  # noqa: E402

# Qwen3-0.6B's architecture (its config.json), with the ids its tokenizer gives <|endoftext|> and <|im_end|>.
QWEN3_0_6B = dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)
SMALL = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, tie_word_embeddings=True)
PAD_ID, EOS_ID = 151643, 151645
POSITIONS = ("tbg", "think_end", "slt")


def build_model(shape: dict, device: str, dtype: torch.dtype, seed: int) -> Qwen3ForCausalLM:
    """A random-weight Qwen3 built straight on ``device`` (no full-size CPU copy), in eval mode."""
    vocab = shape["vocab_size"]
    pad_id, eos_id = min(PAD_ID, vocab - 2), min(EOS_ID, vocab - 1)
    config = Qwen3Config(**shape, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(config)
    model = model.to(dtype).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id)
    return model


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(function, repeats: int, device: str) -> tuple[list[float], object, float]:
    """Run ``function`` once untimed (warm-up: kernels, allocator), then ``repeats`` timed runs.

    Returns (seconds per run, the last result, peak GPU memory in GiB over the timed runs; nan on CPU).
    """
    function()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, result = [], None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return times, result, peak


def random_prompts(n: int, vocab: int, low: int, high: int, rng: np.random.Generator) -> list[list[int]]:
    """Prompt token ids of lengths in [low, high] (chat-templated math questions are about 40-150 tokens)."""
    return [rng.integers(10, vocab - 10, size=int(rng.integers(low, high + 1))).tolist() for _ in range(n)]


def bench_generation(model, args, sampling, rng, device: str) -> list[dict]:
    prompts = random_prompts(args.questions, model.config.vocab_size, args.prompt_min, args.prompt_max, rng)
    eos_ids, pad_id = {model.generation_config.eos_token_id}, model.generation_config.pad_token_id
    modes = [
        ("one question per call", prompts[:args.baseline_questions], sampling.runs),
        ("batched across questions", prompts, args.questions * sampling.runs),
    ]
    rows = []
    for label, chosen, batch_size in modes:
        config = sampling.model_copy(update={"batch_size": batch_size})
        times, runs, peak = timed(lambda: sample_runs(model, chosen, config, eos_ids, pad_id, 0, False),  # noqa: B023
                                  args.repeats, device)
        flat = [run for question_runs in runs for run in question_runs]
        tokens = sum(len(run.generated_ids) for run in flat)
        rows.append({"step": "generate", "mode": label, "backend": "hf", "questions": len(chosen),
                     "runs_per_question": sampling.runs, "sequences_per_call": batch_size,
                     "tokens_generated": tokens, "runs_truncated": sum(run.truncated for run in flat),
                     "seconds": times, "median_seconds": statistics.median(times),
                     "rate": tokens / statistics.median(times), "unit": "tokens/s", "peak_gpu_gib": peak})
    return rows


def trace_frame(n: int, length: int, vocab: int, rng: np.random.Generator) -> pd.DataFrame:
    """``n`` runs of exactly ``length`` tokens as the generate stage writes them: a quarter prompt, a think span
    closed at two thirds of the generated tokens, so tbg, think_end and slt are three distinct positions."""
    prompt_length = length // 4
    generated = length - prompt_length
    think_end = (2 * generated) // 3
    runs = pd.DataFrame({
        "question_id": [f"q{i // 10}" for i in range(n)], "run_id": [i % 10 for i in range(n)],
        "prompt_ids": [rng.integers(10, vocab - 10, size=prompt_length).tolist() for _ in range(n)],
        "generated_ids": [rng.integers(10, vocab - 10, size=generated).tolist() for _ in range(n)],
        "n_generated": generated, "think_start_index": 0, "think_end_index": think_end,
    })
    for column in ("think_start_index", "think_end_index"):
        runs[column] = runs[column].astype("Int64")
    return runs


def nnsight_available() -> str | None:
    """None when nnsight imports, else why not."""
    try:
        import nnsight  # noqa: F401
    except ImportError as error:
        return f"{type(error).__name__}: {error}"
    return None


def bench_trace(model, args, rng, device: str) -> tuple[list[dict], dict]:
    runs = trace_frame(args.trace_sequences, args.trace_length, model.config.vocab_size, rng)
    layers = resolve_layers("all", model.config.num_hidden_layers + 1)
    shape = (len(runs), len(POSITIONS), len(layers), model.config.hidden_size)
    backends = {"hf": model}
    missing = nnsight_available()
    if missing is None:
        # nnsight's pipeline wants a tokenizer; ids go in directly, so the local toy tokenizer serves.
        backends["nnsight"] = nnsight_model(model, build_tokenizer())
    else:
        print(f"nnsight does not import here ({missing}): the nnsight trace backend is skipped")
    rows, outs = [], {}
    for backend, runner in backends.items():
        for label, batch_size in (("one run per pass", 1), ("batched", args.trace_batch)):
            out = np.zeros(shape, np.float16)
            times, (_, passes), peak = timed(
                lambda: trace_runs(runner, runs, POSITIONS, layers, batch_size, model.generation_config.pad_token_id,  # noqa: B023
                                   out, progress=False, backend=backend),  # noqa: B023
                args.repeats, device)
            outs[backend] = out
            rows.append({"step": "trace", "mode": label, "backend": backend, "sequences": len(runs),
                         "sequence_length": args.trace_length, "layers": len(layers), "positions": len(POSITIONS),
                         "sequences_per_pass": batch_size, "forward_passes": passes, "seconds": times,
                         "median_seconds": statistics.median(times), "rate": len(runs) / statistics.median(times),
                         "unit": "sequences/s", "peak_gpu_gib": peak})
    agreement = {"nnsight_skipped": missing}
    if "nnsight" in outs:
        difference = np.abs(outs["nnsight"].astype(np.float32) - outs["hf"].astype(np.float32))
        agreement["max_abs_difference_nnsight_vs_hf"] = float(difference.max())
    return rows, agreement


def ratios(rows: list[dict]) -> dict:
    """Batched over one-at-a-time for each (step, backend), and nnsight over hf when both were batched."""
    rate = {(r["step"], r["backend"], r["mode"]): r["rate"] for r in rows}
    result = {"generate_batched_over_one_question": rate[("generate", "hf", "batched across questions")]
              / rate[("generate", "hf", "one question per call")]}
    for backend in ("hf", "nnsight"):
        if ("trace", backend, "batched") in rate:
            result[f"trace_{backend}_batched_over_one_run"] = (rate[("trace", backend, "batched")]
                                                               / rate[("trace", backend, "one run per pass")])
    if ("trace", "nnsight", "batched") in rate:
        result["trace_nnsight_over_hf_batched"] = (rate[("trace", "nnsight", "batched")]
                                                   / rate[("trace", "hf", "batched")])
    return result


def environment(device: str, dtype: str, small: bool) -> dict:
    return {"device": device, "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else
            platform.processor() or platform.machine(), "dtype": dtype, "small": small,
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--small", action="store_true", help="tiny model and sizes: a CPU smoke run")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (as model.device)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(TORCH_DTYPES))
    parser.add_argument("--questions", type=int, help="questions in the batched run (default 64; small 4)")
    parser.add_argument("--baseline-questions", type=int, help="questions run one per call (default 8; small 2)")
    parser.add_argument("--runs", type=int, default=10, help="K samples per question")
    parser.add_argument("--max-new-tokens", type=int, help="tokens per run (default 128; small 12)")
    parser.add_argument("--prompt-min", type=int, default=40)
    parser.add_argument("--prompt-max", type=int, default=150)
    parser.add_argument("--trace-sequences", type=int, help="runs traced (default 256; small 12)")
    parser.add_argument("--trace-length", type=int, help="tokens per traced run (default 384; small 48)")
    parser.add_argument("--trace-batch", type=int, help="runs per batched forward (default: trace.batch_size)")
    parser.add_argument("--repeats", type=int, help="timed repeats after one warm-up (default 3; small 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    params = load_params(ROOT / "params.yaml")
    sizes = (dict(questions=4, baseline_questions=2, max_new_tokens=12, trace_sequences=12, trace_length=48,
                  trace_batch=4, repeats=1) if args.small else
             dict(questions=64, baseline_questions=8, max_new_tokens=128, trace_sequences=256, trace_length=384,
                  trace_batch=params.trace.batch_size, repeats=3))
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.small:
        args.prompt_min, args.prompt_max = min(args.prompt_min, 6), min(args.prompt_max, 20)
    args.baseline_questions = min(args.baseline_questions, args.questions)

    device = resolve_device(args.device)
    model = build_model(SMALL if args.small else QWEN3_0_6B, device, TORCH_DTYPES[args.dtype], args.seed)
    sampling = params.sampling.model_copy(update=dict(backend="hf", runs=args.runs,
                                                         max_new_tokens=args.max_new_tokens, temp=0.7, top_p=0.95))
    rng = np.random.default_rng(args.seed)
    env = environment(device, args.dtype, args.small)
    print(f"{'small random' if args.small else 'Qwen3-0.6B-shaped random'} model, "
          f"{model.num_parameters() / 1e6:.1f}M parameters, {args.dtype} on {env['device_name']} ({device}); "
          f"torch {env['torch']}, transformers {env['transformers']}; median of {args.repeats} after a warm-up")

    rows = bench_generation(model, args, sampling, rng, device)
    trace_rows, agreement = bench_trace(model, args, rng, device)
    rows += trace_rows
    summary = ratios(rows)

    print(f"\n{'step':<9}{'backend':<9}{'mode':<27}{'work':>18}{'seconds':>10}{'rate':>12}  unit        peak GiB")
    for r in rows:
        work = (f"{r['tokens_generated']} tokens" if r["step"] == "generate"
                else f"{r['sequences']}x{r['sequence_length']} tok")
        print(f"{r['step']:<9}{r['backend']:<9}{r['mode']:<27}{work:>18}{r['median_seconds']:>10.2f}"
              f"{r['rate']:>12.1f}  {r['unit']:<12}{r['peak_gpu_gib']:>8.2f}")
    for name, value in summary.items():
        print(f"{name}: x{value:.2f}")
    if agreement.get("max_abs_difference_nnsight_vs_hf") is not None:
        print(f"nnsight vs hf, max |difference| of the stored float16 arrays: "
              f"{agreement['max_abs_difference_nnsight_vs_hf']:.3g}")
    truncated = sum(r.get("runs_truncated", 0) for r in rows)
    print(f"runs cut at max_new_tokens={args.max_new_tokens}: {truncated} "
          f"(random weights rarely emit EOS; rates count the tokens actually generated)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": env, "settings": {k: str(v) if isinstance(v, Path) else v
                                                                      for k, v in vars(args).items()},
                                    "model_config": SMALL if args.small else QWEN3_0_6B, "rows": rows,
                                    "ratios": summary, "trace_agreement": agreement}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
