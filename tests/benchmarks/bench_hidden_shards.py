"""Reading probe features from the sharded hidden states (one .npy per position, stages/lib/hidden/store.py) against the
single (runs, positions, layers, hidden) .npy they replaced, in one process on the same values.

``python tests/benchmarks/bench_hidden_shards.py [--runs 2000 --positions 6 --layers 8 --hidden 1024]`` writes
both layouts into a temporary directory, then reads every (position, layer) with ``location_features`` (the page
cache warm, pages released after each read, as train_probes does) and a 3-layer range with ``probe_features``,
``--repeats`` times each, alternating which layout goes first. Prints the medians, the ratio sharded / single
and the resident memory added by a full sweep. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from stages.lib.hidden.store import open_hidden, write_hidden  # noqa: E402
from stages.lib.probes.linear import LogisticProbe  # noqa: E402
from stages.lib.probes.fitting import location_features, probe_features
from stages.lib.schema.tables import HiddenMeta  # noqa: E402


def resident_mb() -> float:
    status = Path("/proc/self/status")
    if not status.exists():
        return float("nan")
    return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmRSS:")) / 1024


def sweep(hidden, rows, positions, layers) -> float:
    start = time.perf_counter()
    for p in range(len(positions)):
        for layer in range(len(layers)):
            location_features(hidden, rows, p, layer)
    probe = LogisticProbe(position=positions[-1], layer=layers[0], layer_end=layers[min(2, len(layers) - 1)])
    probe_features(probe, hidden, rows, positions, layers)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--positions", type=int, default=6)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    positions = ["tbg", "think_25", "think_50", "think_75", "think_end", "slt"][:args.positions]
    layers = list(range(args.layers))
    shape = (args.runs, len(positions), args.layers, args.hidden)
    meta = HiddenMeta(positions=positions, layers=layers, hidden_size=args.hidden, dtype="float16", model="synthetic")
    index = pd.DataFrame({"row": np.arange(args.runs), "question_id": [f"q{i // 10}" for i in range(args.runs)],
                          "run_id": np.arange(args.runs) % 10, "sequence_length": 40, "think_end_fallback": False})
    values = np.random.default_rng(0).standard_normal(shape, dtype=np.float32).astype(np.float16)
    with tempfile.TemporaryDirectory() as directory:
        single_path = Path(directory) / "single.npy"
        single = np.lib.format.open_memmap(single_path, mode="w+", dtype=np.float16, shape=shape)
        single[:] = values  # through a memory map, as the trace stage writes (and as write_hidden writes the shards)
        single.flush()
        del single
        write_hidden(directory, "id", values, index, meta)
        del values
        layouts = {"single .npy": np.load(single_path, mmap_mode="r"), "shards": open_hidden(directory, "id")[0]}
        rows = np.sort(np.random.default_rng(1).choice(args.runs, size=int(0.7 * args.runs), replace=False))
        for hidden in layouts.values():
            sweep(hidden, rows, positions, layers)  # warm the page cache
        times = {name: [] for name in layouts}
        added = {}
        for repeat in range(args.repeats):
            for name in (list(layouts) if repeat % 2 == 0 else list(layouts)[::-1]):  # alternating order
                hidden = layouts[name]
                before = resident_mb()
                times[name].append(sweep(hidden, rows, positions, layers))
                added[name] = resident_mb() - before
        gb = np.prod(shape) * 2 / 1e9
        print(f"hidden states {shape} float16 ({gb:.2f} GB), {len(rows)} rows read, every (position, layer) "
              f"+ one 3-layer range, {args.repeats} repeats")
        print(f"{'layout':<12} {'median s':>9} {'ratio':>6} {'RSS added MB':>13}")
        base = statistics.median(times["single .npy"])
        for name in layouts:
            median = statistics.median(times[name])
            print(f"{name:<12} {median:>9.3f} {median / base:>6.2f} {added[name]:>13.1f}")


if __name__ == "__main__":
    main()
