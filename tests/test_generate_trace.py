"""Generation and trace mechanics on a tiny random Qwen3: batching, padding, per-step records, indexing."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from stages.lib.models.loading import ThinkTokens, load_model, prompt_ids, think_tokens
from stages.lib.params import SamplingParams, VllmParams
from stages.lib.sampling.runs import (
    TOP_LOGPROBS,
    SampledRun,
    build_run_records,
    mean_think_entropy,
    prompt_opens_think,
    think_span,
)
from stages.lib.sampling.hf import eos_and_pad, sample_runs
from stages.lib.schema.tables import RUNS, prefix_fraction
from stages.lib.schema.machinery import validate_frame
from stages.lib.hidden.tracing import hidden_at_positions, resolve_layers, token_positions, trace_runs

QUESTIONS = ["1+2", "12+7-5+3", "3-1", "20+20-7"]


def sampling(**overrides) -> SamplingParams:
    values = dict(backend="hf", runs=3, temp=1.0, top_p=1.0, top_k=None, prompt_template="{question}",
                  max_new_tokens=12, batch_size=12,
                  # read by the vllm backend only
                  vllm=VllmParams(gpu_memory_utilization=0.9, kv_cache_gib=None, max_num_seqs=256, enforce_eager=False,
                                  tensor_parallel_size=1, data_parallel_size=1, max_model_len=None, dtype="auto",
                                  checkpoint_questions=0, entropy_top_n=20))
    values.update(overrides)
    return SamplingParams(**values)


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    model, tokenizer = load_model(str(tiny_lm_dir), toy_model_dir="unused")
    return model, tokenizer


def unbatched_logprobs(model, prompt: list[int], generated: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teacher-forced log p(token) and entropy at each generated position, one sequence, no padding."""
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1]  # predictions for the generated tokens
    logprobs = torch.log_softmax(logits.float(), -1)
    chosen = logprobs.gather(1, torch.tensor(generated)[:, None]).squeeze(1)
    entropy = torch.special.entr(logprobs.exp()).sum(-1)
    topk_mean = logprobs.topk(min(TOP_LOGPROBS, logprobs.shape[-1]), dim=-1).values.mean(-1)
    return chosen.numpy(), entropy.numpy(), topk_mean.numpy()


def test_recorded_logprobs_match_an_unbatched_teacher_forced_pass(lm):
    """Left padding in a mixed-length batch must not change what is recorded for any run."""
    model, tokenizer = lm
    eos_ids, pad_id = eos_and_pad(model, tokenizer)
    prompts = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 1, "the test needs prompts of different lengths"
    runs = sample_runs(model, prompts, sampling(), eos_ids, pad_id, seed=0, progress=False)
    assert [len(r) for r in runs] == [3] * len(QUESTIONS)
    checked = 0
    for prompt, question_runs in zip(prompts, runs):
        for run in question_runs:
            if not run.generated_ids:
                continue
            chosen, entropy, topk_mean = unbatched_logprobs(model, prompt, run.generated_ids)
            np.testing.assert_allclose(run.token_logprobs, chosen, atol=2e-4)
            np.testing.assert_allclose(run.token_entropies, entropy, atol=2e-4)
            np.testing.assert_allclose(run.token_topk_logprob_mean, topk_mean, atol=2e-4)
            checked += 1
    assert checked >= 6


def test_generation_is_seeded_and_flags_truncation(lm):
    model, tokenizer = lm
    eos_ids, pad_id = eos_and_pad(model, tokenizer)
    prompts = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    first = sample_runs(model, prompts, sampling(max_new_tokens=4), eos_ids, pad_id, seed=7, progress=False)
    again = sample_runs(model, prompts, sampling(max_new_tokens=4), eos_ids, pad_id, seed=7, progress=False)
    assert [[r.generated_ids for r in q] for q in first] == [[r.generated_ids for r in q] for q in again]
    for question_runs in first:
        for run in question_runs:
            assert len(run.generated_ids) <= 4
            assert run.truncated == (len(run.generated_ids) == 4)
            assert len(run.token_logprobs) == len(run.token_entropies) == len(run.generated_ids)
            assert np.all(run.token_logprobs <= 0) and np.all(run.token_entropies >= 0)


def test_greedy_runs_are_identical(lm):
    model, tokenizer = lm
    eos_ids, pad_id = eos_and_pad(model, tokenizer)
    runs = sample_runs(model, [prompt_ids(tokenizer, "4+4")], sampling(temp=0), eos_ids, pad_id, 0, False)[0]
    assert len({tuple(r.generated_ids) for r in runs}) == 1


def test_think_span_and_think_entropy_by_hand():
    think = ThinkTokens(start_id=5, end_id=6)
    assert think_span([5, 9, 9, 6, 8], think) == (0, 3)
    assert think_span([9, 9, 8], think) == (None, None)
    assert think_span([9, 6, 8], ThinkTokens(None, 6)) == (None, 1)
    entropies = np.array([1.0, 2.0, 4.0, 8.0, 16.0])
    assert mean_think_entropy(entropies, 0, 3, 0.5) == pytest.approx(3.0)  # inside: tokens 1 and 2
    assert mean_think_entropy(entropies, None, 2, 0.5) == pytest.approx(1.5)  # no <think>: tokens 0 and 1
    assert mean_think_entropy(entropies, None, None, 0.5) == pytest.approx(31 / 5)  # no span: all tokens
    assert mean_think_entropy(entropies, 0, 1, 0.5) == pytest.approx(31 / 5)  # empty span: all tokens
    assert mean_think_entropy(np.array([]), None, None, 0.5) == 0.5  # nothing generated: the EOS step


def test_prompt_opens_think_by_hand():
    think = ThinkTokens(start_id=5, end_id=6)
    assert prompt_opens_think([1, 2, 5], think)  # a template ending in <think> (DeepSeek-R1)
    assert prompt_opens_think([5, 6, 1, 5], think)  # an earlier span closed, a new one open
    assert not prompt_opens_think([1, 5, 6, 2], think) and not prompt_opens_think([1, 2], think)
    assert not prompt_opens_think([5], ThinkTokens(None, None))


def test_run_records_follow_the_schema_and_judge_answers(lm):
    _, tokenizer = lm
    think = think_tokens(tokenizer)
    assert think.start_id is not None and think.end_id is not None
    questions = pd.DataFrame({"question_id": ["q0"], "dataset": ["id"], "question": ["1+2"], "gold": ["3"]})
    right = tokenizer("<think>1+2=3</think>\\boxed{3}", add_special_tokens=False)["input_ids"]
    wrong = tokenizer("<think>1+2=4", add_special_tokens=False)["input_ids"]

    def run(ids, truncated):
        return SampledRun(ids, np.full(len(ids), -0.5, np.float32), np.full(len(ids), 0.25, np.float32),
                          float("nan") if truncated else 0.1, truncated, np.full(len(ids), -3.0, np.float32))

    frame = build_run_records(questions, [[1, 2]], [[run(right, False), run(wrong, True)]], tokenizer, think)
    validate_frame(frame, RUNS.columns, "records", RUNS.key)
    assert frame["correct"].tolist() == [True, False]
    assert frame["answer"].tolist() == ["3", ""]  # truncated while reasoning: no answer
    assert frame["answer_source"].tolist() == ["boxed", "truncated_in_think"]
    assert frame["think_missing"].tolist() == [False, True]
    assert frame["think_end_index"].iloc[0] == right.index(think.end_id)
    assert frame["sequence_loglik"].iloc[0] == pytest.approx(-0.5 * len(right))


def test_token_positions_by_hand():
    positions = ("tbg", "think_end", "slt")
    assert token_positions(5, 10, 3, positions) == ([4, 8, 14], False)
    assert token_positions(5, 10, None, positions) == ([4, 14, 14], True)
    assert token_positions(5, 0, None, ("slt", "tbg")) == ([4, 4], True)


def test_early_warning_positions_by_hand():
    # prompt of 5 tokens; generated: <think> r r r r r r r r </think> answer (11 tokens): <think> at index 0,
    # </think> at 9, 8 reasoning tokens at generated indices 1..8 (absolute 6..13)
    positions = ("think_25", "think_50", "think_75", "think_99", "think_end")
    # 25% of 8 = 2 tokens seen -> the second reasoning token, absolute 5 + 1 + 2 - 1 = 7
    assert token_positions(5, 11, 9, positions, think_start_index=0) == ([7, 9, 11, 13, 14], False)
    # no <think>: reasoning starts at the first generated token; no </think>: it runs to the last generated token
    assert token_positions(5, 8, None, ("think_50",), think_start_index=None) == ([8], True)
    # an empty think span: every prefix is the <think> token itself
    assert token_positions(5, 3, 1, ("think_25", "think_75"), think_start_index=0) == ([5, 5], False)
    assert prefix_fraction("think_25") == 0.25 and prefix_fraction("tbg") == 0.0
    assert prefix_fraction("think_end") == 1.0 and prefix_fraction("slt") is None


def test_resolve_layers_names_the_key_on_a_bad_index():
    assert resolve_layers("all", 3) == [0, 1, 2]
    assert resolve_layers((0, 2), 3) == [0, 2]
    with pytest.raises(ValueError, match="trace.layers"):
        resolve_layers((0, 5), 3)


def test_batched_trace_equals_unbatched_forward_at_each_position(lm):
    """The stored vector of a run is the one an unbatched pass of that run alone gives, whatever the padding."""
    model, tokenizer = lm
    rng = np.random.default_rng(0)
    think = think_tokens(tokenizer)
    rows = []
    for i, length in enumerate([3, 11, 6, 1, 9, 4, 14]):
        generated = rng.integers(10, len(tokenizer), size=length).tolist()
        think_start, think_end = None, None
        if length > 3 and i % 2 == 0:
            think_start, think_end = 0, length // 2
            generated[0], generated[think_end] = think.start_id, think.end_id
        rows.append({"question_id": f"q{i // 2}", "run_id": i % 2, "prompt_ids": rng.integers(10, 30, 2 + i).tolist(),
                     "generated_ids": generated, "n_generated": length, "think_start_index": think_start,
                     "think_end_index": think_end})
    runs = pd.DataFrame(rows)
    for column in ("think_start_index", "think_end_index"):
        runs[column] = runs[column].astype("Int64")
    positions = ("tbg", "think_50", "think_end", "slt")
    layers = resolve_layers("all", model.config.num_hidden_layers + 1)
    out = np.zeros((len(runs), len(positions), len(layers), model.config.hidden_size), np.float16)
    index, passes = trace_runs(model, runs, positions, layers, batch_size=3, pad_id=tokenizer.pad_token_id,
                               out=out, progress=False)
    assert passes == 3
    assert index["think_end_fallback"].tolist() == [r["think_end_index"] is None for r in rows]
    for row, run in enumerate(rows):
        sequence = run["prompt_ids"] + run["generated_ids"]
        wanted, _ = token_positions(len(run["prompt_ids"]), run["n_generated"], run["think_end_index"], positions,
                                    run["think_start_index"])
        alone = hidden_at_positions(model, [sequence], [wanted], layers, tokenizer.pad_token_id)[0]
        np.testing.assert_allclose(out[row].astype(np.float32), alone, rtol=2e-3, atol=2e-3)
        with torch.no_grad():
            states = model(torch.tensor([sequence]), output_hidden_states=True).hidden_states
        direct = states[-1][0, wanted[2]].numpy()  # last layer at think_end, straight from the model
        np.testing.assert_allclose(out[row, 2, -1].astype(np.float32), direct, rtol=2e-3, atol=2e-3)


def test_an_empty_question_set_writes_an_empty_valid_runs_table(tmp_path):
    from stages.lib.io.files import read_table, write_table
    from stages.lib.models.loading import ThinkTokens
    from stages.lib.sampling.runs import build_run_records
    from stages.lib.schema.tables import RUNS

    questions = pd.DataFrame(columns=["question_id", "dataset", "question", "gold"])
    frame = build_run_records(questions, [], [], tokenizer=None, think=ThinkTokens(None, None))
    write_table(frame, RUNS, tmp_path / "ood.parquet")
    assert len(read_table(RUNS, tmp_path / "ood.parquet")) == 0
