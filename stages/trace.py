"""Stage trace: replay each run teacher-forced and keep the hidden states at the informative positions.

Run: ``python -m stages.trace`` (reads ``{paths.runs}``; writes ``{paths.hidden}/{id,ood}.npy`` float16
memory-mapped arrays of shape (runs, positions, layers, hidden) with ``{id,ood}_index.parquet`` mapping
row -> (question_id, run_id) and ``{id,ood}_meta.json`` naming the positions and layers).

Positions (``trace.positions``):
- ``tbg``: the last prompt token, before anything is generated;
- ``think_end``: the ``</think>`` token; a run without one gets the ``slt`` vector and
  ``think_end_fallback = True`` in the index, so every row stays usable and the fallback is visible;
- ``slt``: the last generated token before EOS, i.e. the second-last token counting EOS, as in the SEP paper.

Layers are hidden-state indices as transformers returns them: 0 is the embedding output, i the output of
block i; for most models (Qwen3 included) the last one is taken after the final norm.
Sequences are right-padded: with a causal mask, padding after a token cannot change that token's state,
and positions stay 0..n-1 exactly as in an unbatched pass.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from numpy.lib.format import open_memmap
from tqdm import tqdm

from stages.common import atomic_path, cost_record, read_table, setup_logging, write_json, write_table
from stages.config import load_params
from stages.models import load_model
from stages.schema import DATASETS, HIDDEN_INDEX_COLUMNS, RUN_COLUMNS, RUN_KEY, hidden_files

log = logging.getLogger(__name__)


def token_positions(prompt_length: int, n_generated: int, think_end_index: int | None,
                    positions: tuple[str, ...]) -> tuple[list[int], bool]:
    """Absolute positions in prompt + generated tokens for one run, and whether think_end fell back to slt."""
    tbg = prompt_length - 1
    slt = prompt_length + n_generated - 1 if n_generated > 0 else tbg
    fallback = think_end_index is None
    think_end = slt if fallback else prompt_length + think_end_index
    lookup = {"tbg": tbg, "think_end": think_end, "slt": slt}
    return [lookup[name] for name in positions], fallback


def resolve_layers(layers: str | tuple[int, ...], n_hidden_states: int) -> list[int]:
    if layers == "all":
        return list(range(n_hidden_states))
    bad = [i for i in layers if i >= n_hidden_states]
    if bad:
        raise ValueError(f"params.yaml: `trace.layers` has {bad}; this model has hidden states 0..{n_hidden_states - 1}")
    return list(layers)


@torch.no_grad()
def hidden_at_positions(model, sequences: list[list[int]], positions: list[list[int]], layers: list[int],
                        pad_id: int) -> np.ndarray:
    """One batched, right-padded forward pass; returns float32 (batch, positions, layers, hidden)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(sequences):
        input_ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, :len(sequence)] = 1
    output = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                   output_hidden_states=True, use_cache=False)
    index = torch.tensor(positions, dtype=torch.long, device=model.device)  # (batch, positions)
    rows = torch.arange(len(sequences), device=model.device)[:, None]
    gathered = [output.hidden_states[layer][rows, index] for layer in layers]  # each (batch, positions, hidden)
    return torch.stack(gathered, dim=2).float().cpu().numpy()


def trace_runs(model, runs: pd.DataFrame, positions: tuple[str, ...], layers: list[int], batch_size: int,
               pad_id: int, out: np.ndarray, progress: bool = True) -> tuple[pd.DataFrame, int]:
    """Fill ``out`` (runs, positions, layers, hidden) row by row in the order of ``runs``.

    Returns the index frame and the number of forward passes. Runs are batched by similar length.
    """
    sequences, all_positions, fallbacks = [], [], []
    for run in runs.itertuples(index=False):
        prompt = list(run.prompt_ids)
        sequences.append(prompt + list(run.generated_ids))
        think_end = None if pd.isna(run.think_end_index) else int(run.think_end_index)
        run_positions, fallback = token_positions(len(prompt), int(run.n_generated), think_end, positions)
        all_positions.append(run_positions)
        fallbacks.append(fallback)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="trace", disable=not progress):
        states = hidden_at_positions(model, [sequences[i] for i in batch], [all_positions[i] for i in batch],
                                     layers, pad_id)
        out[batch] = states.astype(np.float16)
    index = pd.DataFrame({
        "row": np.arange(len(runs)), "question_id": runs["question_id"].to_numpy(),
        "run_id": runs["run_id"].to_numpy(), "sequence_length": [len(s) for s in sequences],
        "think_end_fallback": np.asarray(fallbacks, dtype=bool),
    })
    return index, len(batches)


def main() -> None:
    setup_logging()
    params = load_params()
    model, tokenizer = load_model(params.model.name, params.paths.toy_model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    layers = resolve_layers(params.trace.layers, model.config.num_hidden_layers + 1)
    positions = tuple(params.trace.positions)
    with cost_record(params.paths.metrics, "trace") as cost, atomic_path(params.paths.hidden) as out_dir:
        out_dir.mkdir()
        cost.update(sequences=0, tokens_processed=0, forward_passes=0)
        for dataset in DATASETS:
            runs = read_table(Path(params.paths.runs) / f"{dataset}.parquet", RUN_COLUMNS, RUN_KEY)
            array_path, index_path, meta_path = hidden_files(out_dir, dataset)
            shape = (len(runs), len(positions), len(layers), model.config.hidden_size)
            out = open_memmap(array_path, mode="w+", dtype=np.float16, shape=shape)
            index, passes = trace_runs(model, runs, positions, layers, params.trace.batch_size, pad_id, out)
            out.flush()
            del out
            write_table(index, index_path, HIDDEN_INDEX_COLUMNS, RUN_KEY)
            write_json({"positions": list(positions), "layers": layers, "hidden_size": model.config.hidden_size,
                        "dtype": "float16", "model": params.model.name,
                        "layer_0": "embedding output", "layer_i": "output of block i (last: after final norm)"},
                       meta_path)
            log.info("%s: hidden states %s -> %s", dataset, shape, array_path)
            cost["sequences"] += len(runs)
            cost["tokens_processed"] += int(index["sequence_length"].sum())
            cost["forward_passes"] += passes


if __name__ == "__main__":
    main()
