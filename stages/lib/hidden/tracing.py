"""Tracing: replay each run teacher-forced and keep the hidden states at the informative positions.

Run: ``python -m stages.trace`` (reads ``{paths.runs}``; writes ``{paths.hidden}/{id,ood}/{position}.npy``
float16 memory-mapped shards of shape (runs, layers, hidden), seen together as (runs, positions, layers, hidden)
through stages/lib/hidden/store.py, with ``{id,ood}_index.parquet`` mapping row -> (question_id, run_id) and
``{id,ood}_meta.json`` naming the positions and layers).

Positions (``trace.positions``):
- ``tbg``: the last prompt token, before anything is generated;
- ``think_end``: the ``</think>`` token; a run without one gets the ``slt`` vector and
  ``think_end_fallback = True`` in the index, so every row stays usable and the fallback is visible;
- ``slt``: the last generated token before EOS, i.e. the second-last token counting EOS, as in the SEP paper;
- ``think_<p>`` (p = 1..99, early warning): the last token of the first p% of the reasoning inside the think
  span (see ``token_positions``), so probes can be asked how early the uncertainty can be read.

Layers are hidden-state indices as transformers returns them: 0 is the embedding output, i the output of
block i; for most models (Qwen3 included) the last one is taken after the final norm. They are read by forward
hooks while the pass runs, keeping only the requested rows, so memory does not grow with layers x tokens.
Sequences are right-padded: with a causal mask, padding after a token cannot change that token's state,
and positions stay 0..n-1 exactly as in an unbatched pass. Passes are planned by a padded-token budget
(``trace.max_batch_tokens``) and a run cap (``trace.batch_size``), longest runs first.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from stages.lib.io.files import progress_bar
from stages.lib.errors import UserError
from stages.lib.extras import require
from stages.lib.models.loading import pad_batch
from stages.lib.schema.tables import prefix_fraction

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
        raise UserError(f"params.yaml: `trace.layers` has {bad}; this model has hidden states "
                         f"0..{n_hidden_states - 1}")
    return list(layers)


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (batch, longest), every sequence at positions 0..n-1, padding after it."""
    return pad_batch(sequences, pad_id, "right")


def plan_batches(lengths: list[int], batch_size: int, max_batch_tokens: int | None) -> list[list[int]]:
    """Group run indices into forward passes, longest runs first, within a padded-token budget.

    A pass holds at most ``batch_size`` runs and, with right padding to its longest run, at most
    ``max_batch_tokens`` padded tokens (runs x longest); ``None`` means no token budget. A run longer than the
    budget still goes through, alone. Longest first, so that the pass most likely to run out of memory is the
    first one, and each pass pads its runs to a neighbour's length. Ties keep the order of ``lengths``.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        batch = batches[-1] if batches else None
        # the batch's first run is its longest, so adding run i makes it (len(batch) + 1) x that length
        if (batch is not None and len(batch) < batch_size
                and (max_batch_tokens is None or (len(batch) + 1) * lengths[batch[0]] <= max_batch_tokens)):
            batch.append(i)
        else:
            batches.append([i])
    return batches


class UnsupportedArchitecture(UserError):
    """The model lacks the decoder layout tracing hooks into (a base model with ``layers`` and ``norm``)."""


def decoder_modules(model: torch.nn.Module) -> tuple[str, torch.nn.Module, torch.nn.ModuleList, torch.nn.Module]:
    """(dotted name inside ``model``, the decoder, its blocks, its final norm) of a transformers causal LM.

    The decoder is ``model.get_decoder()`` (``model.model`` for Llama, Qwen, Mistral; the language model of a
    multimodal one). Tracing reads the input of block 0, each block's output and the final norm's output,
    so it needs the Llama/Qwen layout: ``decoder.layers`` (a ModuleList) and ``decoder.norm``.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    blocks, norm = getattr(decoder, "layers", None), getattr(decoder, "norm", None)
    if not isinstance(blocks, torch.nn.ModuleList) or not isinstance(norm, torch.nn.Module) or len(blocks) == 0:
        raise UnsupportedArchitecture(
            f"params.yaml: `model.name`: trace reads the decoder's `layers` and `norm` modules (the Llama/Qwen "
            f"layout); {type(model).__name__}'s decoder {type(decoder).__name__} has no such modules")
    name = next(name for name, module in model.named_modules() if module is decoder)
    n_blocks = getattr(getattr(model, "config", None), "num_hidden_layers", len(blocks))
    return name, decoder, blocks[:n_blocks], norm  # transformers runs the first num_hidden_layers blocks


class _StopForward(Exception):
    """Raised by the hook of the highest layer asked for, so the blocks above it are never computed."""


@torch.no_grad()
def hidden_at_positions(model, sequences: list[list[int]], positions: list[list[int]], layers: list[int],
                        pad_id: int) -> np.ndarray:
    """One batched, right-padded forward pass; returns float32 (batch, positions, layers, hidden).

    Hidden-state index -> module, numbered as transformers' ``output_hidden_states`` (L blocks): 0 is the input
    of block 0 (the embedding output), i in 1..L-1 the output of block i (the block at index i - 1), and L the
    final norm's output (transformers puts ``last_hidden_state`` there, not block L's raw output). Forward hooks
    on those modules gather the (batch, positions, hidden) rows as each one runs, so no layer's full sequence
    outlives its block: memory is the weights, one block's activations and the gathered rows, whatever the
    number of layers traced. The decoder is called without the LM head, and the pass stops after the highest
    layer asked for.
    """
    _, decoder, blocks, norm = decoder_modules(model)
    n_blocks = len(blocks)
    device = model.get_input_embeddings().weight.device  # where the ids go (the first device under a device_map)
    input_ids, attention_mask = right_pad(sequences, pad_id)
    index = torch.tensor(positions, dtype=torch.long)  # (batch, positions)
    rows = torch.arange(len(sequences))[:, None]
    highest = max(layers)
    gathered: dict[int, torch.Tensor] = {}  # each (batch, positions, hidden), on the device of its block

    def keep(layer: int, state: torch.Tensor) -> None:
        # advanced indexing copies the rows out: the full sequence is not kept
        gathered[layer] = state[rows.to(state.device), index.to(state.device)]
        if layer == highest and layer < n_blocks:
            raise _StopForward

    handles = []
    try:
        for layer in sorted(set(layers)):
            if layer == 0:  # transformers records block 0's first argument (Gemma scales the embeddings first)
                handles.append(blocks[0].register_forward_pre_hook(
                    lambda module, args, kwargs: keep(0, args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True))
            elif layer == n_blocks:
                handles.append(norm.register_forward_hook(
                    lambda module, args, output: keep(n_blocks, output)))
            else:  # older decoder layers return tuples whose first item is the hidden state
                handles.append(blocks[layer - 1].register_forward_hook(
                    lambda module, args, output, layer=layer: keep(layer, output[0] if isinstance(output, tuple)
                                                                   else output)))
        try:
            decoder(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
        except _StopForward:
            pass
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([gathered[layer].float().cpu() for layer in layers], dim=2).numpy()


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
    """``hidden_at_positions`` through nnsight: the same modules, read inside one traced, right-padded forward.

    Only the gathered (batch, positions, hidden) rows of each layer are saved, and the run stops after the
    highest layer asked for (``tracer.stop()``), so the LM head never runs.
    ``traced`` is an ``nnsight_model``; returns float32 (batch, positions, layers, hidden).
    """
    module = traced._module  # the wrapped transformers model (nnsight keeps it here)
    name, _, blocks, _ = decoder_modules(module)
    decoder = traced
    for part in filter(None, name.split(".")):  # the decoder's envoy, at the decoder module's path
        decoder = getattr(decoder, part)
    n_blocks = len(blocks)
    device = next(module.parameters()).device
    input_ids, attention_mask = right_pad(sequences, pad_id)
    index = torch.tensor(positions, dtype=torch.long, device=device)  # (batch, positions)
    rows = torch.arange(len(sequences), device=device)[:, None]
    by_layer: dict[int, torch.Tensor] = {}  # each (batch, positions, hidden)
    with traced.trace(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False,
                      logits_to_keep=1) as tracer:
        for layer in sorted(set(layers)):  # nnsight serves module values in execution order
            if layer == 0:
                state = decoder.layers[0].input
            elif layer == n_blocks:
                state = decoder.norm.output
            else:
                state = decoder.layers[layer - 1].output
                state = state[0] if isinstance(state, tuple) else state  # older decoder layers return tuples
            by_layer[layer] = state[rows, index].save()
        tracer.stop()
    return torch.stack([by_layer[layer] for layer in layers], dim=2).float().cpu().numpy()


HIDDEN_STATE_READERS = {"hf": hidden_at_positions, "nnsight": hidden_at_positions_nnsight}
"""``trace.backend`` -> the function reading one batch's hidden states (same arguments, same arrays)."""


def trace_runs(model, runs: pd.DataFrame, positions: tuple[str, ...], layers: list[int], batch_size: int,
               pad_id: int, out, progress: bool = True, backend: str = "hf",
               max_batch_tokens: int | None = None) -> tuple[pd.DataFrame, int]:
    """Fill ``out`` (runs, positions, layers, hidden; an array or ``hidden.HiddenStates``) row by row in the order
    of ``runs``.

    Returns the index frame and the number of forward passes. Runs are batched longest first, at most
    ``batch_size`` runs and ``max_batch_tokens`` padded tokens per pass (``plan_batches``).
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
    batches = plan_batches([len(s) for s in sequences], batch_size, max_batch_tokens)
    for batch in progress_bar(batches, desc="trace", enabled=progress):
        states = read_hidden(model, [sequences[i] for i in batch], [all_positions[i] for i in batch],
                             layers, pad_id)
        out[batch] = states.astype(np.float16)
    index = pd.DataFrame({
        "row": np.arange(len(runs)), "question_id": runs["question_id"].to_numpy(),
        "run_id": runs["run_id"].to_numpy(), "sequence_length": [len(s) for s in sequences],
        "think_end_fallback": np.asarray(fallbacks, dtype=bool),
    })
    return index, len(batches)
