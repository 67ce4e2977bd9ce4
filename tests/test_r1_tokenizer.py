"""A real reasoning model's tokenizer and chat template: DeepSeek-R1-Distill-Qwen-7B's (152,064 tokens, ``<think>``
151648, ``</think>`` 151649), from tests/data/r1-distill-qwen-7b/ (its README: origin, licence, how it was built),
with a tiny random-weight Qwen2 behind it. Runs written by hand in R1's format go through the prompt, think-span,
answer-extraction, trace-position and forced-answer code (hf backend here; the real vLLM engine in
tests/test_vllm_engine.py)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from stages.lib.early_exit.forced import force_answers, greedy_answers
from stages.lib.models.loading import ThinkTokens, load_model, prompt_ids, think_tokens
from stages.lib.sampling.runs import SampledRun, build_run_records, stop_and_pad_ids
from stages.lib.schema.tables import FORCED_ANSWERS, RUNS
from stages.lib.schema.machinery import validate_frame
from stages.lib.hidden.tracing import token_positions

R1_TOKENIZER = Path(__file__).resolve().parent / "data" / "r1-distill-qwen-7b" / "tokenizer"
BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK = 151646, 151643, 151654, 151644, 151645, 151648, 151649
# (question id, question, gold, the prompt ends in "<think>\n" as R1's later template writes, generated text)
R1_RUNS = [
    ("open", "What is 1+1?", "2", False, "<think>\nOkay, 1+1 is 2.\n</think>\n\nThe answer is \\boxed{2}."),
    ("prompt_think", "What is 2+2?", "4", True, "2+2 is 4, surely.\n</think>\n\n\\boxed{4}"),
    ("missing_end", "What is 3+3?", "6", True, "Let me add: 3+3 is 6, or is it"),
    ("several_ends", "What is 2+3?", "5", False, "<think>\n2+3=5</think>wait, check</think>\n\\boxed{5}"),
    ("nested_box", "Half of 1?", "\\frac{1}{2}", False, "<think>\nhalve it\n</think>\n\\boxed{\\frac{1}{2}}"),
]
EXPECTED = {  # question id -> (answer, answer_source, think_missing)
    "open": ("2", "boxed", False), "prompt_think": ("4", "boxed", False),
    "missing_end": ("", "truncated_in_think", True), "several_ends": ("5", "boxed", False),
    "nested_box": ("\\frac{1}{2}", "boxed", False),
}


def r1_tokenizer():
    return AutoTokenizer.from_pretrained(R1_TOKENIZER)


def tiny_r1_model(tokenizer, seed: int = 0, logit_scale: float = 0.3) -> Qwen2ForCausalLM:
    """A random-weight Qwen2 (2 layers, hidden 64, head_dim 32: a size vLLM's CPU attention supports) with R1's
    vocabulary; the tied embedding is drawn with std ``logit_scale`` so the next-token distributions are peaked
    (about 0.5 nats on average at 0.3, with a few per cent of the mass in the tail) instead of near-uniform over
    152k tokens (11.9 nats)."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, logit_scale)
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    return model


def save_tiny_r1(directory: Path) -> Path:
    tokenizer = r1_tokenizer()
    tiny_r1_model(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def r1_prompts_and_runs(tokenizer) -> tuple[pd.DataFrame, list[list[int]], list[list[SampledRun]]]:
    """The questions, prompts and (one) hand-written run each of R1_RUNS; log-probs and entropies are placeholders."""
    questions = pd.DataFrame([{"question_id": q, "dataset": "ood", "question": text, "gold": gold}
                              for q, text, gold, _, _ in R1_RUNS])
    prompts, runs = [], []
    for _, question, _, opens_think, generated in R1_RUNS:
        prompt = prompt_ids(tokenizer, question)
        prompts.append(prompt + (tokenizer("<think>\n", add_special_tokens=False)["input_ids"] if opens_think else []))
        ids = tokenizer(generated, add_special_tokens=False)["input_ids"]
        runs.append([SampledRun(generated_ids=ids, token_logprobs=np.full(len(ids), -1.0, np.float32),
                                token_entropies=np.ones(len(ids), np.float32), stop_entropy=0.5, truncated=False,
                                token_topk_logprob_mean=np.full(len(ids), -2.0, np.float32))])
    return questions, prompts, runs


def r1_run_records(tokenizer) -> pd.DataFrame:
    questions, prompts, runs = r1_prompts_and_runs(tokenizer)
    return build_run_records(questions, prompts, runs, tokenizer, think_tokens(tokenizer))


@pytest.fixture(scope="module")
def tokenizer():
    return r1_tokenizer()


@pytest.fixture(scope="module")
def r1_dir(tmp_path_factory):
    return save_tiny_r1(tmp_path_factory.mktemp("tiny_r1"))


def test_the_r1_tokenizer_has_its_own_special_ids_and_chat_template(tokenizer):
    assert len(tokenizer) == 152064  # the model's rows: nothing added past them
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS, EOS, PAD)
    assert think_tokens(tokenizer) == ThinkTokens(THINK, END_THINK)
    # DeepSeek's own ids for "<｜begin▁of▁sentence｜><｜User｜>What is 1+1?<｜Assistant｜>"
    assert prompt_ids(tokenizer, "What is 1+1?") == [BOS, USER, 3838, 374, 220, 16, 10, 16, 30, ASSISTANT]


def test_r1_runs_get_their_think_span_and_answer(tokenizer):
    frame = r1_run_records(tokenizer)
    validate_frame(frame, RUNS.columns, "R1 runs", RUNS.key)
    for row in frame.itertuples():
        ids = list(row.generated_ids)
        answer, source, missing = EXPECTED[row.question_id]
        assert (row.answer, row.answer_source, row.think_missing) == (answer, source, missing), row.question_id
        if not missing:  # the first </think>, found by id
            assert ids[row.think_end_index] == END_THINK and END_THINK not in ids[:row.think_end_index]
        starts_with_think = row.question_id in ("open", "several_ends", "nested_box")
        assert (row.think_start_index == 0) if starts_with_think else pd.isna(row.think_start_index)
    assert frame.set_index("question_id").loc["several_ends", "generated_ids"].tolist().count(END_THINK) == 2
    assert frame["correct"].tolist() == [True, True, False, True, True]


def test_trace_positions_on_r1_runs(tokenizer):
    frame = r1_run_records(tokenizer).set_index("question_id")
    names = ("tbg", "think_25", "think_75", "think_end", "slt")
    for question_id, row in frame.iterrows():
        full = [*row.prompt_ids, *row.generated_ids]
        end = None if pd.isna(row.think_end_index) else int(row.think_end_index)
        start = None if pd.isna(row.think_start_index) else int(row.think_start_index)
        (tbg, think_25, think_75, think_end, slt), fallback = token_positions(
            len(row.prompt_ids), int(row.n_generated), end, names, start)
        assert fallback == (question_id == "missing_end")
        opened = question_id in ("prompt_think", "missing_end")  # the prompt ends in "<think>\n" (198 is "\n")
        assert full[tbg] == (198 if opened else ASSISTANT) and tbg == len(row.prompt_ids) - 1
        first_reasoning = len(row.prompt_ids) + (0 if start is None else start + 1)
        assert first_reasoning - 1 <= think_25 < think_75 < think_end and slt == len(full) - 1
        assert THINK not in full[first_reasoning:think_75 + 1] and END_THINK not in full[:think_75 + 1]
        if end is not None:
            assert full[think_end] == END_THINK


def test_forced_answers_on_r1_runs_through_transformers(tokenizer, r1_dir):
    model, loaded = load_model(str(r1_dir), toy_model_dir="unused")
    assert loaded.bos_token_id == BOS
    eos_ids, pad_id = stop_and_pad_ids(model.generation_config, loaded)
    runs = r1_run_records(tokenizer)
    decode = partial(greedy_answers, model, max_new_tokens=3, eos_ids=eos_ids, pad_id=pad_id, batch_size=16,
                     progress=False)
    gold = pd.Series({question_id: gold for question_id, _, gold, _, _ in R1_RUNS})
    frame, calls = force_answers(tokenizer, runs, gold, (25, 50, 75), "\\boxed{",
                                 decode, think_tokens(tokenizer))
    validate_frame(frame, FORCED_ANSWERS.columns, "R1 forced answers")
    assert len(frame) == 3 * len(R1_RUNS) and calls == 1
    assert frame["answer_text"].str.startswith("</think>\\boxed{").all()
    several = frame[frame["question_id"] == "several_ends"]
    first_end = int(runs.set_index("question_id").loc["several_ends", "think_end_index"])
    assert several["reasoning_tokens"].tolist() == [first_end - 1] * 3  # up to the FIRST </think>, after <think>
    assert (frame["answer_tokens"] == frame["answer_ids"].map(len)).all()
