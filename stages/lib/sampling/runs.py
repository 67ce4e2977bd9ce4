"""Run records shared by every sampling backend: the SampledRun each backend returns, the think span, and the
RUNS.columns rows built from them (decoded text, extracted answer and how it was found, correctness)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from stages.lib.questions.answers import extract_answer, is_correct
from stages.lib.models.loading import ThinkTokens
from stages.lib.schema.tables import RUNS
from stages.lib.schema.machinery import empty_frame

log = logging.getLogger(__name__)


@dataclass
class SampledRun:
    generated_ids: list[int]  # EOS excluded
    token_logprobs: np.ndarray  # (n_generated,)
    token_entropies: np.ndarray  # (n_generated,)
    stop_entropy: float  # entropy at the step that emitted EOS (nan when truncated)
    truncated: bool
    token_topk_logprob_mean: np.ndarray  # (n_generated,) mean of the TOP_LOGPROBS largest untempered log-probs


TOP_LOGPROBS = 20
"""k of the top-k log-probs recorded per generated token (DeepConf's token confidence, Fu et al. 2025, is minus
their mean; 20 is the most vLLM returns by default). The vllm backend takes them from the ``entropy_top_n`` it
already requests, so it records the mean of the top min(k, N)."""


def cut_at_eos(tokens: list[int], eos_ids: set[int]) -> tuple[int, int | None]:
    """Where a run ends, the one "cut at EOS" of every backend: (n kept tokens, index of the first EOS or None).

    The first token in ``eos_ids`` and everything after it (padding, a second EOS) are dropped; no EOS means the
    run hit ``max_new_tokens`` and all its tokens are kept.
    """
    stop = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
    return (len(tokens) if stop is None else stop), stop


def think_span(generated_ids: list[int], think: ThinkTokens) -> tuple[int | None, int | None]:
    """Indices of the first <think> and the first </think> in the generated ids (None when absent)."""
    def first(token_id):
        if token_id is None:
            return None
        return next((i for i, t in enumerate(generated_ids) if t == token_id), None)
    return first(think.start_id), first(think.end_id)


def prompt_opens_think(prompt_ids: list[int], think: ThinkTokens) -> bool:
    """True when the prompt ends inside a think span: its last <think> comes after its last </think> (or it has no
    </think>), as with chat templates that open the reasoning for the model (DeepSeek-R1's ends in ``<think>``)."""
    def last(token_id: int | None) -> int:
        return max((i for i, t in enumerate(prompt_ids) if token_id is not None and t == token_id), default=-1)
    return last(think.start_id) > last(think.end_id)


def mean_think_entropy(entropies: np.ndarray, start: int | None, end: int | None, stop_entropy: float) -> float:
    """Mean token entropy strictly inside the think span; all generated tokens when there is no span;
    the EOS step's entropy when nothing was generated."""
    if end is not None:
        inside = entropies[(start + 1 if start is not None and start < end else 0):end]
        if len(inside):
            return float(inside.mean())
    if len(entropies):
        return float(entropies.mean())
    return stop_entropy


def build_run_records(questions: pd.DataFrame, prompts: list[list[int]], runs: list[list[SampledRun]],
                      tokenizer, think: ThinkTokens) -> pd.DataFrame:
    """One RUNS.columns row per (question, run): decode, find the think span, extract and judge the answer.

    The answer follows ``stages.lib.questions.answers.extract_answer``: nothing from inside the reasoning, so a run that
    stopped while still thinking has answer '' (and is incorrect). Each row also carries ``answer_source`` (one of
    ``ANSWER_SOURCES``: how the answer was found), which evaluate counts per split and analysis flags.
    """
    rows = []
    for (_, question), prompt, question_runs in zip(questions.iterrows(), prompts, runs):
        think_open = prompt_opens_think(list(prompt), think)
        for run_id, run in enumerate(question_runs):
            start, end = think_span(run.generated_ids, think)
            text = tokenizer.decode(run.generated_ids, skip_special_tokens=False)
            extracted = extract_answer(text, think_open_at_start=think_open)
            answer = extracted.answer
            rows.append({
                "question_id": question["question_id"], "run_id": run_id, "dataset": question["dataset"],
                "prompt_ids": np.asarray(prompt, dtype=np.int32),
                "generated_ids": np.asarray(run.generated_ids, dtype=np.int32), "text": text,
                "think_start_index": start, "think_end_index": end, "think_missing": end is None,
                "truncated": run.truncated, "answer": answer, "answer_source": extracted.source,
                "token_logprobs": run.token_logprobs, "token_entropies": run.token_entropies,
                "token_topk_logprob_mean": np.asarray(run.token_topk_logprob_mean, dtype=np.float32),
                "sequence_loglik": float(run.token_logprobs.sum()),
                "mean_token_entropy": mean_think_entropy(run.token_entropies, start, end, run.stop_entropy),
                "n_generated": len(run.generated_ids),
                "correct": bool(answer) and is_correct(answer, question["gold"]),
            })
    if not rows:  # e.g. data.ood_source: none; typed, so it validates and writes like any other table
        return empty_frame(RUNS.columns)
    frame = pd.DataFrame(rows, columns=[c.name for c in RUNS.columns])  # only the schema's columns are kept
    for column in ("think_start_index", "think_end_index"):
        frame[column] = frame[column].astype("Int64")
    return frame


def stop_and_pad_ids(generation_config, tokenizer) -> tuple[set[int], int]:
    """As ``eos_and_pad``, from a GenerationConfig (the vllm backend has no transformers model to ask)."""
    eos = generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    if not eos_ids:
        raise ValueError("the model defines no EOS token: generation could never stop before max_new_tokens")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    return eos_ids, pad_id
