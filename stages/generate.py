"""Stage generate: sample K answers per question with transformers, batched across questions.

Run: ``python -m stages.generate`` (reads params.yaml; writes ``{paths.runs}/{id,ood}.parquet``).

Each generate() call holds many questions x K runs, left-padded, never one question at a time. Per-token
entropy and the chosen token's log-prob are recorded step by step by a logits processor that sees the
model's raw logits (before temperature and top-p), so they describe the model, not the sampling knobs, and
no (batch, steps, vocab) score tensor is ever kept.

``sampling.backend: vllm`` (or ``auto`` on a CUDA host with vLLM installed) samples with vLLM instead
(stages/vllm_backend.py); both backends return SampledRun lists, so ``build_run_records`` writes the same schema.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from stages.answers import extract_final_answer, is_correct
from stages.common import atomic_path, cost_record, setup_logging, write_table
from stages.config import SamplingParams, load_params
from stages.models import ThinkTokens, load_model, prompt_ids, think_tokens
from stages.questions import load_questions
from stages.schema import DATASETS, RUN_COLUMNS, RUN_KEY, empty_frame

log = logging.getLogger(__name__)


class StepRecorder(LogitsProcessor):
    """Records per decoding step the entropy of the untempered next-token distribution and, one step
    later, the log-prob of the token that was chosen from it.

    Placed in the custom processor list, which transformers applies before its temperature/top-p warpers.
    Only the previous step's (batch, vocab) log-probs are kept.
    """

    def __init__(self) -> None:
        self.entropies: list[torch.Tensor] = []  # per step: (batch,)
        self.chosen_logprobs: list[torch.Tensor] = []  # per step: (batch,)
        self._previous_logprobs: torch.Tensor | None = None  # (batch, vocab)

    def _record_chosen(self, chosen: torch.Tensor) -> None:
        self.chosen_logprobs.append(self._previous_logprobs.gather(1, chosen[:, None]).squeeze(1))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._previous_logprobs is not None:
            self._record_chosen(input_ids[:, -1])
        logprobs = torch.log_softmax(scores.float(), dim=-1)
        self.entropies.append(torch.special.entr(logprobs.exp()).sum(-1))
        self._previous_logprobs = logprobs
        return scores

    def finish(self, last_tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Record the last step's choice; return (entropies, chosen_logprobs), each (batch, steps)."""
        self._record_chosen(last_tokens)
        entropies = torch.stack(self.entropies, 1).cpu().numpy()
        chosen = torch.stack(self.chosen_logprobs, 1).cpu().numpy()
        return entropies, chosen


@dataclass
class SampledRun:
    generated_ids: list[int]  # EOS excluded
    token_logprobs: np.ndarray  # (n_generated,)
    token_entropies: np.ndarray  # (n_generated,)
    stop_entropy: float  # entropy at the step that emitted EOS (nan when truncated)
    truncated: bool


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask


@torch.no_grad()
def sample_batch(model, prompts: list[list[int]], sampling: SamplingParams, eos_ids: set[int], pad_id: int,
                 seed: int) -> list[SampledRun]:
    """One generate() call over ``prompts`` (already repeated K times); returns one SampledRun per prompt."""
    input_ids, attention_mask = _left_pad(prompts, pad_id)
    torch.manual_seed(seed)
    recorder = StepRecorder()
    greedy = sampling.temp == 0
    sequences = model.generate(
        input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
        do_sample=not greedy, temperature=None if greedy else float(sampling.temp),
        top_p=None if greedy else float(sampling.top_p),
        # Explicit so a model's own generation_config (e.g. Qwen3's top_k=20) cannot change the sampler.
        top_k=0, repetition_penalty=1.0, max_new_tokens=sampling.max_new_tokens,
        eos_token_id=sorted(eos_ids), pad_token_id=pad_id, logits_processor=LogitsProcessorList([recorder]),
    ).cpu()
    generated = sequences[:, input_ids.shape[1]:]  # (batch, steps)
    entropies, chosen_logprobs = recorder.finish(generated[:, -1].to(model.device))
    runs = []
    for row in range(len(prompts)):
        tokens = generated[row].tolist()
        stop = next((i for i, t in enumerate(tokens) if t in eos_ids), None)
        n = len(tokens) if stop is None else stop
        runs.append(SampledRun(
            generated_ids=tokens[:n], token_logprobs=chosen_logprobs[row, :n].astype(np.float32),
            token_entropies=entropies[row, :n].astype(np.float32),
            stop_entropy=float("nan") if stop is None else float(entropies[row, stop]), truncated=stop is None,
        ))
    return runs


def questions_per_call(sampling: SamplingParams) -> int:
    return max(1, sampling.batch_size // sampling.runs)


def sample_runs(model, prompts: list[list[int]], sampling: SamplingParams, eos_ids: set[int], pad_id: int,
                seed: int, progress: bool = True) -> list[list[SampledRun]]:
    """K runs for every prompt, ``sampling.batch_size`` sequences per generate() call.

    Questions are sorted by prompt length so each call pads little; call ``b`` is seeded with ``seed + b``,
    so a batch's samples do not depend on how many tokens earlier batches drew.
    Returns runs[question][k] in the order of ``prompts``.
    """
    per_call = questions_per_call(sampling)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[SampledRun] | None] = [None] * len(prompts)
    chunks = [order[i:i + per_call] for i in range(0, len(order), per_call)]
    for call, chunk in enumerate(tqdm(chunks, desc="generate", disable=not progress)):
        repeated = [prompts[q] for q in chunk for _ in range(sampling.runs)]
        sampled = sample_batch(model, repeated, sampling, eos_ids, pad_id, seed + call)
        for position, q in enumerate(chunk):
            results[q] = sampled[position * sampling.runs:(position + 1) * sampling.runs]
    return results  # type: ignore[return-value]


def think_span(generated_ids: list[int], think: ThinkTokens) -> tuple[int | None, int | None]:
    """Indices of the first <think> and the first </think> in the generated ids (None when absent)."""
    def first(token_id):
        if token_id is None:
            return None
        return next((i for i, t in enumerate(generated_ids) if t == token_id), None)
    return first(think.start_id), first(think.end_id)


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
    """One RUN_COLUMNS row per (question, run): decode, find the think span, extract and judge the answer."""
    rows = []
    for (_, question), prompt, question_runs in zip(questions.iterrows(), prompts, runs):
        for run_id, run in enumerate(question_runs):
            start, end = think_span(run.generated_ids, think)
            text = tokenizer.decode(run.generated_ids, skip_special_tokens=False)
            answer = extract_final_answer(text)
            rows.append({
                "question_id": question["question_id"], "run_id": run_id, "dataset": question["dataset"],
                "prompt_ids": np.asarray(prompt, dtype=np.int32),
                "generated_ids": np.asarray(run.generated_ids, dtype=np.int32), "text": text,
                "think_start_index": start, "think_end_index": end, "think_missing": end is None,
                "truncated": run.truncated, "answer": answer,
                "token_logprobs": run.token_logprobs, "token_entropies": run.token_entropies,
                "sequence_loglik": float(run.token_logprobs.sum()),
                "mean_token_entropy": mean_think_entropy(run.token_entropies, start, end, run.stop_entropy),
                "n_generated": len(run.generated_ids),
                "correct": bool(answer) and is_correct(answer, question["gold"]),
            })
    if not rows:  # e.g. data.ood_source: none; typed, so it validates and writes like any other table
        return empty_frame(RUN_COLUMNS)
    frame = pd.DataFrame(rows, columns=[c.name for c in RUN_COLUMNS])
    for column in ("think_start_index", "think_end_index"):
        frame[column] = frame[column].astype("Int64")
    return frame


def eos_and_pad(model, tokenizer) -> tuple[set[int], int]:
    """Every id that ends a run (the tokenizer's and the generation config's), and the padding id."""
    return stop_and_pad_ids(model.generation_config, tokenizer)


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


def main() -> None:
    from stages.vllm_backend import VllmGenerator, resolve_backend  # vLLM itself is imported only when used

    setup_logging()
    params = load_params()
    backend = resolve_backend(params.sampling.backend)
    if backend == "vllm":
        vllm = VllmGenerator.open(params)
        tokenizer, eos_ids = vllm.tokenizer, vllm.eos_ids
    else:
        model, tokenizer = load_model(params.model.name, params.paths.toy_model, params.model.device,
                                      params.model.dtype)
        eos_ids, pad_id = eos_and_pad(model, tokenizer)
    think = think_tokens(tokenizer)
    if think.end_id is None:
        log.warning("tokenizer has no single </think> token: every run is flagged think_missing")
    with cost_record(params.paths.metrics, "generate") as cost, atomic_path(params.paths.runs) as out_dir:
        out_dir.mkdir()
        cost.update(backend=backend, sequences=0, tokens_generated=0, generate_calls=0)
        for offset, dataset in enumerate(DATASETS):
            questions = load_questions(Path(params.paths.questions) / f"{dataset}.jsonl")
            prompts = [prompt_ids(tokenizer, q) for q in questions["question"]]
            seed = params.seed + 1_000_003 * offset
            if backend == "vllm":
                runs = vllm.sample(prompts, seed)
            else:
                runs = sample_runs(model, prompts, params.sampling, eos_ids, pad_id, seed)
            frame = build_run_records(questions, prompts, runs, tokenizer, think)
            write_table(frame, out_dir / f"{dataset}.parquet", RUN_COLUMNS, RUN_KEY)
            if len(frame):
                log.info("%s: %d runs, accuracy %.3f, think missing %.3f, truncated %.3f", dataset, len(frame),
                         frame["correct"].mean(), frame["think_missing"].mean(), frame["truncated"].mean())
            cost["sequences"] += len(frame)
            cost["tokens_generated"] += int(frame["n_generated"].sum())
            cost["generate_calls"] += (int(len(prompts) > 0) if backend == "vllm"
                                       else -(-len(prompts) // questions_per_call(params.sampling)))


if __name__ == "__main__":
    main()
