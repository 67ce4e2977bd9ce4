"""Forced answers at prefixes of the reasoning: cut a run's think span at p%, close it, and decode the answer.

For a run and a prefix p (``early_exit.prefixes``), the cut keeps exactly the generated tokens up to the
``think_<p>`` trace position (``stages.lib.hidden.tracing.token_positions``: the ``<think>`` token and the first
round(p/100 * R) of the R reasoning tokens), so the stopping probe that reads the hidden state at ``think_<p>``
sees the very prefix the answer is forced from. The forced sequence is

    prompt + generated[:generated_kept] + [</think>] + tokens(early_exit.answer_prefix)

and the answer is decoded greedily from it, at most ``early_exit.max_answer_tokens`` tokens, batched across runs
and left-padded, by generation's own ``sampling_hf.generate_batch``, which records per-token log-probs and
entropies (untempered logits, step by step). With ``sampling.backend`` vllm the same sequences go to one vLLM
engine instead (``greedy_answers_vllm``).

Run by the forced_answers stage; pure functions over frames and token lists, plus one model call.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import pandas as pd

from stages.lib.questions.answers import extract_answer, is_correct
from stages.lib.io.files import progress_bar
from stages.lib.errors import UserError
from stages.lib.models.loading import ThinkTokens
from stages.lib.params import SamplingParams
from stages.lib.sampling.runs import SampledRun
from stages.lib.sampling.hf import generate_batch
from stages.lib.schema.tables import FORCED_ANSWERS
from stages.lib.schema.machinery import empty_frame
from stages.lib.hidden.tracing import token_positions

log = logging.getLogger(__name__)


def prefix_position(prefix: int) -> str:
    """The trace position of a prefix: 25 -> ``think_25``."""
    return f"think_{prefix}"


def require_traced_prefixes(prefixes, trace_positions) -> None:
    """Every ``early_exit.prefixes`` entry must be a traced ``think_<p>``: the stopping probe reads its state."""
    missing = [prefix_position(p) for p in prefixes if prefix_position(p) not in tuple(trace_positions)]
    if missing:
        raise UserError(f"params.yaml: `early_exit.prefixes` needs {missing} in `trace.positions` "
                        f"(now {list(trace_positions)}): the stopping probe reads the hidden state there")


def cut(prompt_length: int, n_generated: int, think_start_index: int | None, think_end_index: int | None,
        prefix: int) -> tuple[int, int, int]:
    """Where a run's reasoning is cut at ``prefix`` percent: (generated_kept, reasoning_kept, reasoning_tokens).

    ``generated_kept`` generated tokens are kept: through the ``think_<prefix>`` position of ``token_positions``
    (the one definition shared with tracing). The reasoning is the tokens strictly between ``<think>`` and
    ``</think>`` (from the first generated token without ``<think>``; to the last without ``</think>``).
    """
    (position,), _ = token_positions(prompt_length, n_generated, think_end_index, (prefix_position(prefix),),
                                     think_start_index)
    generated_kept = position - prompt_length + 1
    reasoning_start = 0 if think_start_index is None else think_start_index + 1
    reasoning_end = n_generated if think_end_index is None else think_end_index
    return generated_kept, generated_kept - reasoning_start, max(0, reasoning_end - reasoning_start)


def forced_sequence(prompt_ids, generated_ids, generated_kept: int, think_end_id: int,
                    answer_prefix_ids: list[int]) -> list[int]:
    """prompt + the kept generated tokens + ``</think>`` + the answer prefix: what the forced answer continues."""
    return [*map(int, prompt_ids), *map(int, generated_ids[:generated_kept]), int(think_end_id),
            *map(int, answer_prefix_ids)]


def greedy_answers(model, sequences: list[list[int]], max_new_tokens: int, eos_ids: set[int], pad_id: int,
                   batch_size: int, progress: bool = True) -> tuple[list[SampledRun], int]:
    """Greedy answers for every sequence, ``batch_size`` per call, sorted by length so calls pad little.

    Returns the answers in the order of ``sequences`` and the number of generate() calls.
    """
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    answers: list[SampledRun | None] = [None] * len(sequences)
    for chunk in progress_bar(chunks, desc="forced answers", enabled=progress):
        for i, run in zip(chunk, generate_batch(model, [sequences[i] for i in chunk], eos_ids, pad_id,
                                                max_new_tokens)):
            answers[i] = run
    return answers, len(chunks)  # type: ignore[return-value]


def plan_forced(runs: pd.DataFrame, prefixes, think: ThinkTokens, answer_prefix_ids: list[int]) -> pd.DataFrame:
    """One row per (run, prefix): the cut and the forced sequence (column ``sequence``), in (run, prefix) order.

    ``runs`` has RUNS.columns. Needs a single ``</think>`` token to close the reasoning with.
    """
    if think.end_id is None:
        raise UserError("forced answers: the tokenizer has no single </think> token to close the reasoning with")
    rows = []
    for run in runs.itertuples(index=False):
        think_start = None if pd.isna(run.think_start_index) else int(run.think_start_index)
        think_end = None if pd.isna(run.think_end_index) else int(run.think_end_index)
        for prefix in prefixes:
            generated_kept, reasoning_kept, reasoning_tokens = cut(len(run.prompt_ids), int(run.n_generated),
                                                                   think_start, think_end, prefix)
            rows.append({"question_id": run.question_id, "run_id": int(run.run_id), "dataset": run.dataset,
                         "prefix": int(prefix), "position": prefix_position(prefix),
                         "reasoning_tokens": reasoning_tokens, "reasoning_kept": reasoning_kept,
                         "generated_kept": generated_kept,
                         "sequence": forced_sequence(run.prompt_ids, run.generated_ids, generated_kept, think.end_id,
                                                     answer_prefix_ids)})
    return pd.DataFrame(rows)


def forced_records(plan: pd.DataFrame, answers: list[SampledRun], gold: pd.Series, tokenizer, think: ThinkTokens,
                   answer_prefix_ids: list[int]) -> pd.DataFrame:
    """FORCED_ANSWERS.columns rows from ``plan_forced``'s plan and its greedy answers (same order).

    The answer is extracted (``extract_answer``) from ``</think>`` + answer prefix + decoded answer and judged
    against ``gold`` (question_id -> gold) with ``is_correct``, as generation judges a run.
    """
    if not len(plan):
        return empty_frame(FORCED_ANSWERS.columns)
    rows = []
    for planned, answer in zip(plan.itertuples(index=False), answers):
        text = tokenizer.decode([think.end_id, *answer_prefix_ids, *answer.generated_ids], skip_special_tokens=False)
        extracted = extract_answer(text)
        n = len(answer.generated_ids)
        rows.append({
            "question_id": planned.question_id, "run_id": planned.run_id, "dataset": planned.dataset,
            "prefix": planned.prefix, "position": planned.position, "reasoning_tokens": planned.reasoning_tokens,
            "reasoning_kept": planned.reasoning_kept, "generated_kept": planned.generated_kept,
            "answer_ids": np.asarray(answer.generated_ids, dtype=np.int32), "answer_text": text,
            "answer": extracted.answer, "answer_source": extracted.source,
            "correct": bool(extracted.answer) and is_correct(extracted.answer, gold[planned.question_id]),
            "mean_logprob": float(answer.token_logprobs.mean()) if n else np.nan,
            "mean_entropy": float(answer.token_entropies.mean()) if n else np.nan,
            "answer_tokens": n, "truncated": answer.truncated,
            "tokens_used": planned.generated_kept + 1 + len(answer_prefix_ids) + n,
        })
    return pd.DataFrame(rows, columns=[c.name for c in FORCED_ANSWERS.columns])


def greedy_answers_vllm(generator, sequences: list[list[int]], max_new_tokens: int,
                        progress: bool = True) -> tuple[list[SampledRun], int]:
    """Greedy answers for every sequence from one vLLM engine (``sampling_vllm.VllmGenerator``), one
    ``llm.generate`` call; the per-token entropies are vLLM's top-N lower bound, as in generation."""
    greedy = SamplingParams.model_validate({**generator.sampling.model_dump(), "temp": 0.0, "runs": 2,
                                            "max_new_tokens": max_new_tokens})
    # one engine, or the pool's engines (sampling.vllm.data_parallel_size > 1)
    runs = generator.sample_calls(sequences, greedy, seed=0, progress=progress)
    return [question_runs[0] for question_runs in runs], int(len(sequences) > 0)  # greedy: the 2 runs are one


Decoder = Callable[[list[list[int]]], tuple[list[SampledRun], int]]
"""Forced sequences -> (their greedy answers in order, generate calls): ``greedy_answers`` (transformers) or
``greedy_answers_vllm`` with the model and settings bound."""


def force_answers(tokenizer, runs: pd.DataFrame, gold: pd.Series, prefixes, answer_prefix: str, decode: Decoder,
                  think: ThinkTokens) -> tuple[pd.DataFrame, int]:
    """Every run's forced answer at every prefix: (FORCED_ANSWERS.columns frame, generate() calls)."""
    answer_prefix_ids = tokenizer(answer_prefix, add_special_tokens=False)["input_ids"] if answer_prefix else []
    plan = plan_forced(runs, prefixes, think, answer_prefix_ids)
    if not len(plan):
        return empty_frame(FORCED_ANSWERS.columns), 0
    answers, calls = decode(list(plan["sequence"]))
    return forced_records(plan, answers, gold, tokenizer, think, answer_prefix_ids), calls
