"""The nnsight trace backend gives the hf backend's arrays; model.dtype / model.device are validated and applied."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import tiny_qwen3
from test_trace_hooks import BUDGET, MODELS, POSITIONS, edge_case_runs, reference_hidden_at_positions

from stages.lib.errors import UserError
from stages.lib.models.loading import TORCH_DTYPES, load_model, resolve_device
from stages.lib.params import ParamsError, parse_params
from stages.lib.models.toy import build_tokenizer
from stages.lib.hidden.tracing import (
    decoder_modules,
    hidden_at_positions,
    hidden_at_positions_nnsight,
    nnsight_model,
    resolve_layers,
    trace_runs,
)

pytest.importorskip("nnsight")

ROOT = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((ROOT / "params.yaml").read_text())
LENGTHS = [5, 17, 9, 2, 13]  # one batch of different lengths: every row but the longest is padded


@pytest.fixture(scope="module")
def lm():
    tokenizer = build_tokenizer()
    return tiny_qwen3(tokenizer, seed=1, layers=3), tokenizer


@pytest.fixture(scope="module")
def traced(lm):
    model, tokenizer = lm
    return nnsight_model(model, tokenizer)


def random_batch(vocab: int, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Sequences of LENGTHS and, per sequence, positions covering its first, a middle and its last token."""
    rng = np.random.default_rng(seed)
    sequences = [rng.integers(10, vocab, size=n).tolist() for n in LENGTHS]
    positions = [[0, n // 2, n - 1] for n in LENGTHS]
    return sequences, positions


def test_nnsight_gives_the_hf_hidden_states_for_every_layer_and_position(lm, traced):
    model, tokenizer = lm
    sequences, positions = random_batch(len(tokenizer))
    layers = resolve_layers("all", model.config.num_hidden_layers + 1)
    expected = hidden_at_positions(model, sequences, positions, layers, tokenizer.pad_token_id)
    got = hidden_at_positions_nnsight(traced, sequences, positions, layers, tokenizer.pad_token_id)
    assert got.dtype == np.float32 and got.shape == (len(LENGTHS), 3, len(layers), model.config.hidden_size)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, reference_hidden_at_positions(model, sequences, positions, layers,
                                                                     tokenizer.pad_token_id))


def test_nnsight_keeps_the_requested_layer_order_and_reads_the_final_norm_last(lm, traced):
    """Layers asked out of order come back in that order; the last index is after the final norm, which
    differs from the last block's raw output (so a wrong module mapping would fail here)."""
    model, tokenizer = lm
    sequences, positions = random_batch(len(tokenizer), seed=1)
    last = model.config.num_hidden_layers
    layers = [last, 0, 2]
    expected = hidden_at_positions(model, sequences, positions, layers, tokenizer.pad_token_id)
    got = hidden_at_positions_nnsight(traced, sequences, positions, layers, tokenizer.pad_token_id)
    np.testing.assert_array_equal(got, expected)
    captured = []
    hook = model.model.layers[-1].register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with torch.no_grad():
            states = model(torch.tensor([sequences[0]]), output_hidden_states=True).hidden_states
    finally:
        hook.remove()
    last_block = captured[0][0] if isinstance(captured[0], tuple) else captured[0]
    assert not torch.allclose(last_block, states[last], atol=1e-3)


def stage_runs(tokenizer, think_end_id: int) -> pd.DataFrame:
    """A run table as the generate stage writes it (the columns trace_runs reads), mixed lengths, some without
    a </think> (the fallback)."""
    rng = np.random.default_rng(2)
    rows = []
    for i, length in enumerate([4, 12, 7, 1, 10, 3]):
        generated = rng.integers(10, len(tokenizer), size=length).tolist()
        think_end = length // 2 if length > 3 and i % 2 == 0 else None
        if think_end is not None:
            generated[think_end] = think_end_id
        rows.append({"question_id": f"q{i // 2}", "run_id": i % 2, "prompt_ids": rng.integers(10, 30, 2 + i).tolist(),
                     "generated_ids": generated, "n_generated": length, "think_start_index": None,
                     "think_end_index": think_end})
    runs = pd.DataFrame(rows)
    for column in ("think_start_index", "think_end_index"):
        runs[column] = runs[column].astype("Int64")
    return runs


def test_trace_runs_writes_the_same_array_with_both_backends(lm, traced):
    model, tokenizer = lm
    runs = stage_runs(tokenizer, tokenizer.convert_tokens_to_ids("</think>"))
    positions = ("tbg", "think_end", "slt")
    layers = resolve_layers("all", model.config.num_hidden_layers + 1)
    outs, indexes = {}, {}
    for backend, runner in (("hf", model), ("nnsight", traced)):
        out = np.full((len(runs), len(positions), len(layers), model.config.hidden_size), np.nan, np.float16)
        indexes[backend], passes = trace_runs(runner, runs, positions, layers, batch_size=4,
                                              pad_id=tokenizer.pad_token_id, out=out, progress=False,
                                              backend=backend)
        assert passes == 2
        outs[backend] = out
    assert np.isfinite(outs["hf"]).all()
    np.testing.assert_array_equal(outs["nnsight"], outs["hf"])
    pd.testing.assert_frame_equal(indexes["nnsight"], indexes["hf"])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_both_backends_write_the_same_array_on_the_edge_cases_within_a_token_budget(name):
    """Every layer, the six positions, one-token / no-</think> / longer-than-the-budget runs: bit for bit."""
    tokenizer = build_tokenizer()
    model = MODELS[name](tokenizer)
    runs = edge_case_runs(tokenizer)
    layers = resolve_layers("all", model.config.num_hidden_layers + 1)
    outs = {}
    for backend, runner in (("hf", model), ("nnsight", nnsight_model(model, tokenizer))):
        out = np.full((len(runs), len(POSITIONS), len(layers), model.config.hidden_size), np.nan, np.float16)
        trace_runs(runner, runs, POSITIONS, layers, batch_size=3, pad_id=0, out=out, progress=False,
                   backend=backend, max_batch_tokens=BUDGET)
        outs[backend] = out
    assert np.isfinite(outs["hf"]).all()
    np.testing.assert_array_equal(outs["nnsight"], outs["hf"])


def test_nnsight_stops_after_the_highest_layer_asked_for(lm, traced):
    """Layers [1, 0] need block 0 only: the blocks above it and the LM head never run; the last index needs
    every block and the final norm, still not the LM head. (Counted on each block's MLP: nnsight's stop fires
    in the block's own output hook, before any hook registered after it.)"""
    model, tokenizer = lm
    _, _, blocks, _ = decoder_modules(model)
    calls = []
    modules = [*((f"block {i}", block.mlp) for i, block in enumerate(blocks)), ("lm_head", model.lm_head)]
    handles = [module.register_forward_hook(lambda m, a, o, name=name: calls.append(name)) for name, module in modules]
    sequences, positions = random_batch(len(tokenizer), seed=4)
    last = model.config.num_hidden_layers
    try:
        got = hidden_at_positions_nnsight(traced, sequences, positions, [1, 0], tokenizer.pad_token_id)
        assert calls == ["block 0"]
        calls.clear()
        got_last = hidden_at_positions_nnsight(traced, sequences, positions, [last], tokenizer.pad_token_id)
        assert calls == [f"block {i}" for i in range(len(blocks))]
    finally:
        for handle in handles:
            handle.remove()
    for layers, array in (([1, 0], got), ([last], got_last)):
        np.testing.assert_array_equal(array, reference_hidden_at_positions(model, sequences, positions, layers,
                                                                           tokenizer.pad_token_id))


# --- model.dtype / model.device ------------------------------------------------------------------------------


def with_model(**values) -> dict:
    raw = copy.deepcopy(RAW)
    raw["model"].update(values)
    return raw


def test_the_repository_defaults_are_cpu_float32():
    params = parse_params(RAW)
    assert (params.model.dtype, params.model.device) == ("float32", "cpu")


@pytest.mark.parametrize("dotted, value", [
    ("dtype", "float64"), ("dtype", "bf16"), ("dtype", None), ("device", "gpu"), ("device", "cuda:"),
    ("device", "cuda:x"), ("device", "CPU"), ("device", 0),
])
def test_a_bad_dtype_or_device_names_its_key(dotted, value):
    with pytest.raises(ParamsError, match=f"`model.{dotted}` = "):
        parse_params(with_model(**{dotted: value}))


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "auto"])
def test_good_devices_pass_validation(device):
    assert parse_params(with_model(device=device, dtype="bfloat16")).model.device == device


def test_auto_resolves_to_cuda_only_when_cuda_is_there():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_it_says_so():
    with pytest.raises(UserError, match=r"`model.device` = 'cuda:0', but CUDA is not available"):
        resolve_device("cuda:0")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_precision_load_on_cpu_computes_in_that_dtype(tiny_lm_dir, dtype):
    reference, tokenizer = load_model(str(tiny_lm_dir), "unused", "cpu", "float32")
    model, _ = load_model(str(tiny_lm_dir), "unused", "cpu", dtype)
    assert model.dtype == TORCH_DTYPES[dtype] and model.device.type == "cpu"
    sequences, positions = random_batch(len(tokenizer), seed=3)
    with torch.no_grad():
        states = model(torch.tensor([sequences[0]]), output_hidden_states=True).hidden_states
    assert {s.dtype for s in states} == {TORCH_DTYPES[dtype]}
    layers = resolve_layers("all", model.config.num_hidden_layers + 1)
    half = hidden_at_positions(model, sequences, positions, layers, tokenizer.pad_token_id)
    full = hidden_at_positions(reference, sequences, positions, layers, tokenizer.pad_token_id)
    assert half.dtype == np.float32 and np.isfinite(half).all()
    np.testing.assert_allclose(half, full, rtol=0.05, atol=0.05)  # the same model, rounded
