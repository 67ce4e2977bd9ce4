"""The hook-based trace gives exactly the arrays of transformers' ``output_hidden_states``, batched by a token budget.

The reference below is the trace as it was before the hooks: one forward with ``output_hidden_states=True``,
every layer at every token kept, then gathered. It lives here, as the oracle, and nowhere in the library.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_qwen3
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from stages.lib.errors import UserError
from stages.lib.models.loading import think_tokens
from stages.lib.models.toy import build_tokenizer
from stages.lib.hidden.tracing import (
    UnsupportedArchitecture,
    decoder_modules,
    hidden_at_positions,
    plan_batches,
    resolve_layers,
    right_pad,
    token_positions,
    trace_runs,
)

POSITIONS = ("tbg", "think_25", "think_50", "think_75", "think_end", "slt")
BUDGET = 48  # padded tokens per pass in these tests: the 70-token run exceeds it and must go alone


@torch.no_grad()
def reference_hidden_at_positions(model, sequences: list[list[int]], positions: list[list[int]], layers: list[int],
                                  pad_id: int) -> np.ndarray:
    """The old path: every hidden state of the batch from ``output_hidden_states=True``, then the rows wanted."""
    input_ids, attention_mask = right_pad(sequences, pad_id)
    output = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False,
                   logits_to_keep=1)
    index = torch.tensor(positions, dtype=torch.long)  # (batch, positions)
    rows = torch.arange(len(sequences))[:, None]
    gathered = [output.hidden_states[layer][rows, index] for layer in layers]  # each (batch, positions, hidden)
    return torch.stack(gathered, dim=2).float().numpy()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def second_model(tokenizer):
    """Another width and depth, with grouped-query attention (4 query heads over 2 key/value heads)."""
    return tiny_qwen3_like(tokenizer, hidden=48, layers=5, heads=4, kv_heads=2)


def tiny_qwen3_like(tokenizer, hidden: int, layers: int, heads: int, kv_heads: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(7)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=hidden // heads, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return Qwen3ForCausalLM(config).eval()


MODELS = {
    "tiny_qwen3": lambda tokenizer: tiny_qwen3(tokenizer, seed=3),
    "qwen3_h48_l5": second_model,
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request, tokenizer):
    return MODELS[request.param](tokenizer)


def edge_case_runs(tokenizer) -> pd.DataFrame:
    """A run table as generate writes it: one generated token, no </think>, no <think>, a run longer than BUDGET,
    and mixed lengths (so several passes pad). No two runs have the same length, so the passes do not depend on
    the order of the table (a tie may put either run first)."""
    think = think_tokens(tokenizer)
    rng = np.random.default_rng(5)
    # (prompt length, generated length, think start index, think end index)
    shapes = [(4, 1, None, None),    # one generated token: slt is that token, every position is a real token
              (6, 9, 0, 6),          # a full think span
              (3, 13, None, None),   # no </think>: think_end falls back to slt, think_p over all generated tokens
              (5, 8, None, 4),       # </think> without <think>
              (8, 62, 0, 50),        # 70 tokens: longer than BUDGET, alone in its pass
              (2, 2, 0, 1),          # <think></think>: an empty reasoning
              (7, 15, 0, 11), (5, 20, 0, None), (4, 3, None, None)]
    rows = []
    for i, (prompt_length, n_generated, start, end) in enumerate(shapes):
        generated = rng.integers(10, len(tokenizer), size=n_generated).tolist()
        if start is not None:
            generated[start] = think.start_id
        if end is not None:
            generated[end] = think.end_id
        rows.append({"question_id": f"q{i // 3}", "run_id": i % 3,
                     "prompt_ids": rng.integers(10, len(tokenizer), size=prompt_length).tolist(),
                     "generated_ids": generated, "n_generated": n_generated,
                     "think_start_index": start, "think_end_index": end})
    runs = pd.DataFrame(rows)
    for column in ("think_start_index", "think_end_index"):
        runs[column] = runs[column].astype("Int64")
    return runs


def sequences_and_positions(runs: pd.DataFrame) -> tuple[list[list[int]], list[list[int]]]:
    sequences, positions = [], []
    for run in runs.itertuples(index=False):
        sequences.append(list(run.prompt_ids) + list(run.generated_ids))
        end = None if pd.isna(run.think_end_index) else int(run.think_end_index)
        start = None if pd.isna(run.think_start_index) else int(run.think_start_index)
        positions.append(token_positions(len(run.prompt_ids), run.n_generated, end, POSITIONS, start)[0])
    return sequences, positions


def traced(model, runs, batch_size: int, max_batch_tokens: int | None, layers=None) -> tuple[np.ndarray, int]:
    layers = layers or resolve_layers("all", model.config.num_hidden_layers + 1)
    out = np.full((len(runs), len(POSITIONS), len(layers), model.config.hidden_size), np.nan, np.float16)
    _, passes = trace_runs(model, runs, POSITIONS, layers, batch_size, pad_id=0, out=out, progress=False,
                           max_batch_tokens=max_batch_tokens)
    return out, passes


# --- plan_batches ----------------------------------------------------------------------------------------------


def test_plan_batches_by_hand():
    lengths = [5, 30, 12, 12, 3, 8]
    # longest first: 30 exceeds 24 and goes alone; 12 + 12 fill 24; 8, 5, 3 pad to 3 x 8 = 24
    assert plan_batches(lengths, batch_size=3, max_batch_tokens=24) == [[1], [2, 3], [5, 0, 4]]
    assert plan_batches(lengths, batch_size=3, max_batch_tokens=None) == [[1, 2, 3], [5, 0, 4]]
    assert plan_batches(lengths, batch_size=1, max_batch_tokens=None) == [[1], [2], [3], [5], [0], [4]]
    assert plan_batches(lengths, batch_size=10, max_batch_tokens=1) == [[1], [2], [3], [5], [0], [4]]
    assert plan_batches([], batch_size=4, max_batch_tokens=16) == []


@pytest.mark.parametrize("seed", range(5))
def test_plan_batches_is_a_partition_within_both_caps(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 200, size=50).tolist()
    batch_size, budget = int(rng.integers(1, 9)), int(rng.integers(50, 600))
    batches = plan_batches(lengths, batch_size, budget)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= batch_size
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= budget
    firsts = [lengths[batch[0]] for batch in batches]
    assert firsts == sorted(firsts, reverse=True)  # longest runs first


# --- equality with output_hidden_states --------------------------------------------------------------------------


def test_hooks_equal_output_hidden_states_for_every_layer_and_position(model, tokenizer):
    """Every layer, the six positions, the edge-case runs, batched by the token budget: the float16 array equals
    the old path's pass for pass, bit for bit."""
    runs = edge_case_runs(tokenizer)
    sequences, positions = sequences_and_positions(runs)
    layers = resolve_layers("all", model.config.num_hidden_layers + 1)
    batches = plan_batches([len(s) for s in sequences], 3, BUDGET)
    assert [4] in batches and any(len(batch) > 1 for batch in batches)  # the long run alone; others share
    got, passes = traced(model, runs, 3, BUDGET)
    assert passes == len(batches)
    expected = np.full_like(got, np.nan)
    for batch in batches:
        expected[batch] = reference_hidden_at_positions(model, [sequences[i] for i in batch],
                                                        [positions[i] for i in batch], layers, 0)
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("layers", [[0], [1], [2, 0], "last", "last_and_0", [1, 1, 0]])
def test_a_layer_subset_equals_the_same_layers_of_output_hidden_states(model, tokenizer, layers):
    """Any subset, in any order (duplicates too): index 0 is block 0's input, the last the final norm's output."""
    last = model.config.num_hidden_layers
    layers = {"last": [last], "last_and_0": [last, 0]}.get(layers, layers) if isinstance(layers, str) else layers
    sequences, positions = sequences_and_positions(edge_case_runs(tokenizer).iloc[:4])
    got = hidden_at_positions(model, sequences, positions, layers, 0)
    np.testing.assert_array_equal(got, reference_hidden_at_positions(model, sequences, positions, layers, 0))


def test_a_low_layer_subset_stops_the_pass_before_the_blocks_above_it_and_the_lm_head(model, tokenizer):
    _, _, blocks, _ = decoder_modules(model)
    calls = [0] * len(blocks)
    head_calls = []
    handles = [block.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, block in enumerate(blocks)]
    handles.append(model.lm_head.register_forward_hook(lambda m, a, o: head_calls.append(1)))
    try:
        sequences, positions = sequences_and_positions(edge_case_runs(tokenizer).iloc[:3])
        hidden_at_positions(model, sequences, positions, [1, 0], 0)
        assert calls == [1] + [0] * (len(blocks) - 1) and head_calls == []  # layer 1 = block 0's output
        hidden_at_positions(model, sequences, positions, [model.config.num_hidden_layers], 0)
        assert calls == [2] + [1] * (len(blocks) - 1) and head_calls == []  # the final norm: every block, no LM head
        with torch.no_grad():  # no hook is left behind: a plain forward runs to the logits
            model(torch.tensor([sequences[0]]))
        assert calls == [3] + [2] * (len(blocks) - 1) and head_calls == [1]
    finally:
        for handle in handles:
            handle.remove()


# --- batching ---------------------------------------------------------------------------------------------------


def test_the_order_of_the_runs_does_not_change_any_row(model, tokenizer):
    """Shuffled, the table gives the same passes (longest first), and each row is bit for bit the same."""
    runs = edge_case_runs(tokenizer)
    got, _ = traced(model, runs, 3, BUDGET)
    order = np.random.default_rng(0).permutation(len(runs))
    shuffled, _ = traced(model, runs.iloc[order].reset_index(drop=True), 3, BUDGET)
    np.testing.assert_array_equal(shuffled, got[order])


@pytest.mark.parametrize("batch_size, max_batch_tokens", [(1, None), (100, None), (2, 24), (100, 10_000)])
def test_other_batchings_give_the_same_rows(model, tokenizer, batch_size, max_batch_tokens):
    """Alone or padded into any pass, a run's rows are the same up to float16 rounding: the padding width only
    changes the length of the attention's masked reductions (float32 differences near 1e-6)."""
    runs = edge_case_runs(tokenizer)
    reference, _ = traced(model, runs, 3, BUDGET)
    got, passes = traced(model, runs, batch_size, max_batch_tokens)
    assert passes == len(plan_batches([len(s) for s in sequences_and_positions(runs)[0]], batch_size,
                                      max_batch_tokens))
    np.testing.assert_allclose(got.astype(np.float32), reference.astype(np.float32), rtol=2e-3, atol=1e-3)


# --- architectures ----------------------------------------------------------------------------------------------


def test_another_llama_layout_model_equals_its_output_hidden_states(tokenizer):
    """Found through ``get_decoder()``, not by Qwen3's class: a tiny Llama traces the same way."""
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=24, intermediate_size=40,
                                         num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=256, pad_token_id=0, bos_token_id=None,
                                         eos_token_id=None)).eval()
    sequences, positions = sequences_and_positions(edge_case_runs(tokenizer).iloc[:5])
    layers = resolve_layers("all", 4)
    np.testing.assert_array_equal(hidden_at_positions(model, sequences, positions, layers, 0),
                                  reference_hidden_at_positions(model, sequences, positions, layers, 0))


def test_an_architecture_without_layers_and_norm_is_refused_in_one_line(tokenizer):
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=2, n_positions=64))
    expected = r"^params.yaml: `model.name`: trace reads the decoder's `layers` and `norm` modules .*GPT2LMHeadModel"
    with pytest.raises(UnsupportedArchitecture, match=expected) as error:
        hidden_at_positions(model, [[1, 2, 3]], [[2]], [0], 0)
    assert isinstance(error.value, UserError) and "\n" not in str(error.value)
