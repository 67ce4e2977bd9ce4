"""The transformers sampling backend: K runs per question, batched across questions.

Each generate() call holds many questions x K runs, left-padded, never one question at a time. Per-token entropy,
the mean of the top-k log-probs (``runs.TOP_LOGPROBS``) and the chosen token's log-prob are recorded step by step
by a logits processor that sees the model's raw logits (before temperature and top-p), so they describe the model,
not the sampling knobs, and no (batch, steps, vocab) score tensor is ever kept."""

from __future__ import annotations

import logging

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from stages.lib.sampling.checkpoints import GenerationCheckpoints
from stages.lib.io.files import progress_bar
from stages.lib.models.loading import pad_batch
from stages.lib.params import SamplingParams
from stages.lib.sampling.runs import TOP_LOGPROBS, SampledRun, cut_at_eos, stop_and_pad_ids

log = logging.getLogger(__name__)


class StepRecorder(LogitsProcessor):
    """Records per decoding step the entropy of the untempered next-token distribution and, one step
    later, the log-prob of the token that was chosen from it.

    Placed in the custom processor list, which transformers applies before its temperature/top-p warpers.
    Only the previous step's (batch, vocab) log-probs are kept.
    """

    def __init__(self) -> None:
        self.entropies: list[torch.Tensor] = []  # per step: (batch,)
        self.topk_means: list[torch.Tensor] = []  # per step: (batch,) mean of the top-k log-probs
        self.chosen_logprobs: list[torch.Tensor] = []  # per step: (batch,)
        self._previous_logprobs: torch.Tensor | None = None  # (batch, vocab)

    def _record_chosen(self, chosen: torch.Tensor) -> None:
        previous = self._previous_logprobs  # under device_map="auto" on the last GPU; the token ids on the first
        self.chosen_logprobs.append(previous.gather(1, chosen[:, None].to(previous.device)).squeeze(1))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._previous_logprobs is not None:
            self._record_chosen(input_ids[:, -1])
        logprobs = torch.log_softmax(scores.float(), dim=-1)
        self.entropies.append(torch.special.entr(logprobs.exp()).sum(-1))
        self.topk_means.append(logprobs.topk(min(TOP_LOGPROBS, logprobs.shape[-1]), dim=-1).values.mean(-1))
        self._previous_logprobs = logprobs
        return scores

    def finish(self, last_tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Record the last step's choice; return (entropies, chosen_logprobs, top-k means), each (batch, steps)."""
        self._record_chosen(last_tokens)
        entropies = torch.stack(self.entropies, 1).cpu().numpy()
        chosen = torch.stack(self.chosen_logprobs, 1).cpu().numpy()
        topk_means = torch.stack(self.topk_means, 1).cpu().numpy()
        return entropies, chosen, topk_means


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], eos_ids: set[int], pad_id: int, max_new_tokens: int,
                   temp: float = 0.0, top_p: float = 1.0, top_k: int | None = None) -> list[SampledRun]:
    """One left-padded generate() call over ``prompts``, greedy at ``temp`` 0; one SampledRun per prompt (EOS
    cut, each step's log-prob and entropy recorded by ``StepRecorder`` as it decodes). Seed the torch RNG first
    when sampling."""
    input_ids, attention_mask = pad_batch(prompts, pad_id, "left")
    recorder = StepRecorder()
    greedy = temp == 0
    sequences = model.generate(
        input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
        do_sample=not greedy, temperature=None if greedy else float(temp), top_p=None if greedy else float(top_p),
        # Explicit so a model's own generation_config (e.g. Qwen3's top_k=20) cannot change the sampler.
        top_k=0 if greedy or top_k is None else top_k, repetition_penalty=1.0, max_new_tokens=max_new_tokens,
        eos_token_id=sorted(eos_ids), pad_token_id=pad_id, logits_processor=LogitsProcessorList([recorder]),
    ).cpu()
    generated = sequences[:, input_ids.shape[1]:]  # (batch, steps)
    entropies, chosen_logprobs, topk_means = recorder.finish(generated[:, -1].to(model.device))
    runs = []
    for row in range(len(prompts)):
        tokens = generated[row].tolist()
        n, stop = cut_at_eos(tokens, eos_ids)
        runs.append(SampledRun(
            generated_ids=tokens[:n], token_logprobs=chosen_logprobs[row, :n].astype(np.float32),
            token_entropies=entropies[row, :n].astype(np.float32),
            stop_entropy=float("nan") if stop is None else float(entropies[row, stop]), truncated=stop is None,
            token_topk_logprob_mean=topk_means[row, :n].astype(np.float32),
        ))
    return runs


def sample_batch(model, prompts: list[list[int]], sampling: SamplingParams, eos_ids: set[int], pad_id: int,
                 seed: int) -> list[SampledRun]:
    """One seeded generate() call over ``prompts`` (already repeated K times) with ``sampling``'s settings."""
    torch.manual_seed(seed)
    return generate_batch(model, prompts, eos_ids, pad_id, sampling.max_new_tokens, sampling.temp, sampling.top_p,
                          sampling.top_k)


def questions_per_call(sampling: SamplingParams) -> int:
    return max(1, sampling.batch_size // sampling.runs)


def sample_runs(model, prompts: list[list[int]], sampling: SamplingParams, eos_ids: set[int], pad_id: int,
                seed: int, progress: bool = True, checkpoints: GenerationCheckpoints | None = None,
                dataset: str = "id") -> list[list[SampledRun]]:
    """K runs for every prompt, ``sampling.batch_size`` sequences per generate() call.

    Questions are sorted by prompt length so each call pads little; call ``b`` is seeded with ``seed + b``,
    so a batch's samples do not depend on how many tokens earlier batches drew.
    Returns runs[question][k] in the order of ``prompts``. With ``checkpoints``, a call already finished by a
    killed run of the same stage (same params, questions and model) is read back instead of sampled, and every
    new call is saved as it finishes (stages/lib/sampling/checkpoints.py); the seeding above makes the result the same.
    """
    per_call = questions_per_call(sampling)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[SampledRun] | None] = [None] * len(prompts)
    chunks = [order[i:i + per_call] for i in range(0, len(order), per_call)]
    for call, chunk in enumerate(progress_bar(chunks, desc="generate", enabled=progress)):
        sampled = checkpoints.load(dataset, call) if checkpoints is not None else None
        if sampled is None:
            repeated = [prompts[q] for q in chunk for _ in range(sampling.runs)]
            sampled = sample_batch(model, repeated, sampling, eos_ids, pad_id, seed + call)
            if checkpoints is not None:
                checkpoints.save(dataset, call, sampled)
        for position, q in enumerate(chunk):
            results[q] = sampled[position * sampling.runs:(position + 1) * sampling.runs]
    return results  # type: ignore[return-value]


def eos_and_pad(model, tokenizer) -> tuple[set[int], int]:
    """Every id that ends a run (the tokenizer's and the generation config's), and the padding id."""
    return stop_and_pad_ids(model.generation_config, tokenizer)
