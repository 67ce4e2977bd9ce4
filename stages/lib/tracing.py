"""Tracing: replay each run teacher-forced and keep the hidden states at the informative positions.

Run: ``python -m stages.trace`` (reads ``{paths.runs}``; writes ``{paths.hidden}/{id,ood}.npy`` float16
memory-mapped arrays of shape (runs, positions, layers, hidden) with ``{id,ood}_index.parquet`` mapping
row -> (question_id, run_id) and ``{id,ood}_meta.json`` naming the positions and layers).

Positions (``trace.positions``):
- ``tbg``: the last prompt token, before anything is generated;
- ``think_end``: the ``</think>`` token; a run without one gets the ``slt`` vector and
  ``think_end_fallback = True`` in the index, so every row stays usable and the fallback is visible;
- ``slt``: the last generated token before EOS, i.e. the second-last token counting EOS, as in the SEP paper;
- ``think_<p>`` (p = 1..99, early warning): the last token of the first p% of the reasoning inside the think
  span (see ``token_positions``), so probes can be asked how early the uncertainty can be read.

Layers are hidden-state indices as transformers returns them: 0 is the embedding output, i the output of
block i; for most models (Qwen3 included) the last one is taken after the final norm.
Sequences are right-padded: with a causal mask, padding after a token cannot change that token's state,
and positions stay 0..n-1 exactly as in an unbatched pass.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from stages.lib.extras import require
from stages.lib.schema import prefix_fraction

log = logging.getLogger(__name__)

def token_positions(prompt_length: int, n_generated: int, think_end_index: int | None,
                    positions: tuple[str, ...], think_start_index: int | None = None) -> tuple[list[int], bool]:
    """Absolute positions in prompt + generated tokens for one run, and whether think_end fell back to slt.

    ``think_<p>`` (early warning) is the last token of the first p% of the reasoning: with the reasoning the
    R generated tokens strictly between ``<think>`` and ``</think>`` (from the first generated token when there
    is no ``<think>``; up to the last generated token when there is no ``</think>``, the fallback case), it is
    the token before the first reasoning token plus round(p/100 * R), so 0% is ``<think>`` itself (or the last
    prompt token) and 100% the token just before ``</think>``.
    """
    tbg = prompt_length - 1
    slt = prompt_length + n_generated - 1 if n_generated > 0 else tbg
    fallback = think_end_index is None
    think_end = slt if fallback else prompt_length + think_end_index
    reasoning_start = 0 if think_start_index is None else think_start_index + 1
    reasoning_end = n_generated if fallback else think_end_index
    reasoning_length = max(0, reasoning_end - reasoning_start)
    lookup = {"tbg": tbg, "think_end": think_end, "slt": slt}

    def position(name: str) -> int:
        if name in lookup:
            return lookup[name]
        seen = int(round(prefix_fraction(name) * reasoning_length))
        return prompt_length + reasoning_start + seen - 1

    return [position(name) for name in positions], fallback


def resolve_layers(layers: str | tuple[int, ...], n_hidden_states: int) -> list[int]:
    if layers == "all":
        return list(range(n_hidden_states))
    bad = [i for i in layers if i >= n_hidden_states]
    if bad:
        raise ValueError(f"params.yaml: `trace.layers` has {bad}; this model has hidden states "
                         f"0..{n_hidden_states - 1}")
    return list(layers)


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (batch, longest), every sequence at positions 0..n-1, padding after it."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(sequences):
        input_ids[row, :len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, :len(sequence)] = 1
    return input_ids, attention_mask


@torch.no_grad()
def hidden_at_positions(model, sequences: list[list[int]], positions: list[list[int]], layers: list[int],
                        pad_id: int) -> np.ndarray:
    """One batched, right-padded forward pass; returns float32 (batch, positions, layers, hidden)."""
    input_ids, attention_mask = right_pad(sequences, pad_id)
    output = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                   output_hidden_states=True, use_cache=False,
                   logits_to_keep=1)  # no (batch, tokens, vocab) logits: ~7.5 GB at 64 x 384 tokens for Qwen3
    index = torch.tensor(positions, dtype=torch.long, device=model.device)  # (batch, positions)
    rows = torch.arange(len(sequences), device=model.device)[:, None]
    # Under device_map="auto" the blocks, and so their hidden states, may sit on several GPUs: gather on each one's.
    states = [output.hidden_states[layer] for layer in layers]
    gathered = [state[rows.to(state.device), index.to(state.device)].to(model.device)
                for state in states]  # each (batch, positions, hidden)
    return torch.stack(gathered, dim=2).float().cpu().numpy()


def require_nnsight():
    """nnsight, imported only when the backend is chosen (a slow import), or a one-line error naming its extra."""
    return require("nnsight", "nnsight", "`trace.backend` = 'nnsight'")


def nnsight_model(model, tokenizer):
    """Wrap a loaded transformers causal LM for the ``nnsight`` backend: the same module and weights, offline."""
    TransformersModel = require_nnsight().TransformersModel

    # TransformersModel is nnsight 0.8's name for a model with a task (LanguageModel is its deprecated alias).
    return TransformersModel(model, tokenizer=tokenizer, task="text-generation")


@torch.no_grad()
def hidden_at_positions_nnsight(traced, sequences: list[list[int]], positions: list[list[int]], layers: list[int],
                                pad_id: int) -> np.ndarray:
    """``hidden_at_positions`` through nnsight: module outputs read inside one traced, right-padded forward.

    Hidden-state index -> module, as transformers' ``output_hidden_states`` numbers them (L blocks):
    0 is the input of block 0 (the embedding output), i in 1..L-1 the output of block i, and L the final
    norm's output (transformers puts ``last_hidden_state`` there, not block L's raw output).
    ``traced`` is an ``nnsight_model``; returns float32 (batch, positions, layers, hidden).
    """
    decoder = getattr(traced, "model", None)
    if not all(hasattr(decoder, name) for name in ("layers", "norm")):
        raise ValueError(f"params.yaml: `trace.backend` = 'nnsight' reads model.layers and model.norm (the "
                         f"Llama/Qwen layout); {type(traced._module).__name__} has no such modules: use `hf`")
    n_blocks = len(decoder.layers)
    device = next(traced._module.parameters()).device
    input_ids, attention_mask = right_pad(sequences, pad_id)
    index = torch.tensor(positions, dtype=torch.long, device=device)  # (batch, positions)
    rows = torch.arange(len(sequences), device=device)[:, None]
    by_layer: dict[int, torch.Tensor] = {}  # each (batch, positions, hidden)
    with traced.trace(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False,
                      logits_to_keep=1):
        for layer in sorted(set(layers)):  # nnsight serves module values in execution order
            if layer == 0:
                state = decoder.layers[0].input
            elif layer == n_blocks:
                state = decoder.norm.output
            else:
                state = decoder.layers[layer - 1].output
                state = state[0] if isinstance(state, tuple) else state  # older decoder layers return tuples
            by_layer[layer] = state[rows, index].save()
    return torch.stack([by_layer[layer] for layer in layers], dim=2).float().cpu().numpy()


HIDDEN_STATE_READERS = {"hf": hidden_at_positions, "nnsight": hidden_at_positions_nnsight}
"""``trace.backend`` -> the function reading one batch's hidden states (same arguments, same arrays)."""


def trace_runs(model, runs: pd.DataFrame, positions: tuple[str, ...], layers: list[int], batch_size: int,
               pad_id: int, out: np.ndarray, progress: bool = True, backend: str = "hf") -> tuple[pd.DataFrame, int]:
    """Fill ``out`` (runs, positions, layers, hidden) row by row in the order of ``runs``.

    Returns the index frame and the number of forward passes. Runs are batched by similar length.
    ``model`` is a transformers model for the ``hf`` backend and its ``nnsight_model`` wrapper for ``nnsight``.
    """
    read_hidden = HIDDEN_STATE_READERS[backend]
    sequences, all_positions, fallbacks = [], [], []
    for run in runs.itertuples(index=False):
        prompt = list(run.prompt_ids)
        sequences.append(prompt + list(run.generated_ids))
        think_end = None if pd.isna(run.think_end_index) else int(run.think_end_index)
        think_start = None if pd.isna(run.think_start_index) else int(run.think_start_index)
        run_positions, fallback = token_positions(len(prompt), int(run.n_generated), think_end, positions,
                                                  think_start)
        all_positions.append(run_positions)
        fallbacks.append(fallback)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="trace", disable=not progress):
        states = read_hidden(model, [sequences[i] for i in batch], [all_positions[i] for i in batch],
                             layers, pad_id)
        out[batch] = states.astype(np.float16)
    index = pd.DataFrame({
        "row": np.arange(len(runs)), "question_id": runs["question_id"].to_numpy(),
        "run_id": runs["run_id"].to_numpy(), "sequence_length": [len(s) for s in sequences],
        "think_end_fallback": np.asarray(fallbacks, dtype=bool),
    })
    return index, len(batches)
