"""Benchmark: peak memory of one trace pass, forward hooks (``hidden_at_positions``) against the old
``output_hidden_states`` path, by sequence length and by the number of layers traced, on CPU.

Run: ``python tests/benchmarks/bench_trace_memory.py`` (default: 512, 1024, 2048 tokens at 4 blocks, and 4, 12, 28
blocks at 512 tokens; a few minutes on 2 busy cores). Bigger: ``--lengths 512 1024 2048 4096 8192 --layers 4 12 28
--grid`` (every combination). ``--early-stop`` adds the hook path tracing only the lower half of the layers.

The model is a random-weight Qwen3 shaped like Qwen3-0.6B (hidden 1024, MLP 3072, 16 query / 8 key-value heads of
128), built locally with ``--layers`` blocks and a small vocabulary (``--vocab``: the embedding is weights, not
activations, and neither path computes more than one token's logits). Every hidden state is traced (blocks + 1),
at 6 positions. Each (path, length, blocks) runs in a fresh process (forked before any model or tensor exists): it
builds the model, warms up on 16 tokens, returns freed heap to the system (``malloc_trim``; allocations of 128 KiB
or more are their own mappings, see ``fix_mmap_threshold``), resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``) and reads it back after one pass (``VmHWM``), so the figure is the pass's own peak
above the loaded model; tracemalloc would not see torch's allocations. Prints a table with the ratio new / old;
asserts nothing (machines are shared).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import multiprocessing
import sys
import time
from pathlib import Path


def fix_mmap_threshold() -> None:
    """Serve every allocation of 128 KiB or more by its own mmap, unmapped when freed (glibc ``mallopt``).

    By default glibc raises that threshold as large blocks are freed and then keeps freed blocks resident in its
    heap, so peak RSS would measure heap fragmentation (it grows with the number of blocks run, tensors alive or
    not). With the threshold fixed, RSS follows the tensors alive. ``--glibc-default`` leaves it as it is.
    """
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD; setting it also stops its adaptation


if "--glibc-default" not in sys.argv:
    fix_mmap_threshold()  # before torch allocates anything

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import Qwen3Config, Qwen3ForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from stages.lib.hidden.tracing import hidden_at_positions  # noqa: E402
from test_trace_hooks import reference_hidden_at_positions  # noqa: E402  (the old path, kept as the test oracle)

POSITIONS = 6


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where /proc/self/clear_refs cannot be written."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(path: str, length: int, layers: int, args: argparse.Namespace) -> dict:
    """One pass of one path in this (freshly forked) process: build, warm up, reset the peak mark, pass, read it."""
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=max(40960, length), tie_word_embeddings=True)
    model = Qwen3ForCausalLM(config).to(getattr(torch, args.dtype)).eval()
    read = reference_hidden_at_positions if path == "old" else hidden_at_positions
    rng = np.random.default_rng(0)
    # --runs runs, the first of `length` tokens, the others 3/4 as long (padded), 6 positions spread over each
    lengths = [length] + [3 * length // 4] * (args.runs - 1)
    sequences = [rng.integers(0, args.vocab, size=n).tolist() for n in lengths]
    positions = [np.linspace(0, n - 1, POSITIONS).astype(int).tolist() for n in lengths]
    n_states = layers + 1
    traced = list(range(n_states // 2 + 1)) if path == "new_half" else list(range(n_states))
    read(model, [s[:16] for s in sequences], [[0] * POSITIONS] * len(sequences), traced, 0)  # warm-up
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the pass cannot hide in resident free pages
    baseline = status_kib("VmRSS")
    reset = reset_peak_rss()
    start = time.perf_counter()
    states = read(model, sequences, positions, traced, 0)
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM")  # without a reset: the peak of the whole process, model building included
    assert states.shape == (len(sequences), POSITIONS, len(traced), args.hidden)
    return {"path": path, "length": length, "layers": layers, "states": len(traced), "runs": args.runs,
            "baseline_mib": baseline / 1024, "peak_mib": peak / 1024, "pass_mib": (peak - baseline) / 1024,
            "seconds": seconds, "peak_reset": reset, "threads": torch.get_num_threads()}


def in_fresh_process(path: str, length: int, layers: int, args: argparse.Namespace) -> dict:
    """``measure`` in a forked child: torch is imported once here, but no model or tensor exists yet, so the child's
    memory is its own model and pass."""
    receive, send = multiprocessing.get_context("fork").Pipe(duplex=False)

    def target() -> None:
        try:
            send.send(measure(path, length, layers, args))
        except BaseException as error:  # noqa: BLE001  (reported by the parent)
            send.send({"error": repr(error)})

    process = multiprocessing.get_context("fork").Process(target=target)
    process.start()
    process.join()
    if not receive.poll():
        raise RuntimeError(f"{path} at {length} tokens x {layers} blocks died (exit {process.exitcode}; memory?)")
    result = receive.recv()
    if "error" in result:
        raise RuntimeError(f"{path} at {length} tokens x {layers} blocks: {result['error']}")
    return result


def configurations(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(length, blocks) pairs: the grid, or the length sweep at the fewest blocks plus the block sweep at the
    shortest length."""
    if args.grid:
        return [(length, layers) for layers in args.layers for length in args.lengths]
    pairs = [(length, min(args.layers)) for length in args.lengths]
    return pairs + [(min(args.lengths), layers) for layers in args.layers if (min(args.lengths), layers) not in pairs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048], help="tokens per run")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 12, 28], help="decoder blocks of the model")
    parser.add_argument("--grid", action="store_true", help="every (length, blocks) pair, not the two sweeps")
    parser.add_argument("--early-stop", action="store_true", help="also the hook path tracing the lower half only")
    parser.add_argument("--runs", type=int, default=1, help="runs in the batch (the others 3/4 as long, padded)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=3072)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--glibc-default", action="store_true",
                        help="keep glibc's adaptive mmap threshold (RSS then includes heap fragmentation)")
    parser.add_argument("--json", type=Path, help="also write the measurements here, one JSON object per line")
    args = parser.parse_args()

    bytes_per = 4 if args.dtype == "float32" else 2
    paths = ["old", "new"] + (["new_half"] if args.early_stop else [])
    records = []
    print(f"Qwen3-0.6B-shaped random model (hidden {args.hidden}, MLP {args.intermediate}, vocab {args.vocab}), "
          f"{args.dtype}, {args.runs} run(s) per batch, {POSITIONS} positions, every hidden state traced, glibc mmap "
          f"threshold {'adaptive' if args.glibc_default else 'fixed at 128 KiB'}; "
          f"'pass' = peak RSS of the pass above the loaded model (MiB)", flush=True)
    header = (f"{'tokens':>7}{'blocks':>7}{'states':>7}{'1 state':>9}{'old pass':>10}{'new pass':>10}{'new/old':>9}"
              f"{'old s':>8}{'new s':>8}" + (f"{'half pass':>11}{'half s':>8}" if args.early_stop else ""))
    print(header + "\n" + "-" * len(header), flush=True)
    for length, layers in configurations(args):
        measured = {path: in_fresh_process(path, length, layers, args) for path in paths}
        records.extend(measured.values())
        old, new = measured["old"], measured["new"]
        one_state = length * args.runs * args.hidden * bytes_per / 2**20  # the padded batch's width is `length`
        line = (f"{length:>7}{layers:>7}{layers + 1:>7}{one_state:>9.1f}{old['pass_mib']:>10.1f}"
                f"{new['pass_mib']:>10.1f}{new['pass_mib'] / old['pass_mib']:>9.2f}"
                f"{old['seconds']:>8.1f}{new['seconds']:>8.1f}")
        if args.early_stop:
            half = measured["new_half"]
            line += f"{half['pass_mib']:>11.1f}{half['seconds']:>8.1f}"
        print(line, flush=True)
    if not all(r["peak_reset"] for r in records):
        print("note: /proc/self/clear_refs was not writable; 'pass' then includes building the model")
    print(f"'1 state' = one hidden state of the padded batch (tokens x runs x hidden x {bytes_per} bytes); "
          f"the old path holds 'states' of them; {records[0]['threads']} torch threads")
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    main()
