"""Per-run uncertainty baselines from the runs table alone (no probe, no clustering), for the score registry.

Each function takes RUNS.columns arrays for n runs and returns a (n,) float array, higher = less sure (more likely
incorrect), so the registry scores them with orientation +1 beside the probes. Pure: no I/O.

- ``length_normalised_negative_loglik``: -log p(s) / T, the mean token surprisal. The raw sum (the registry's
  ``negative_sequence_loglik``) grows with the length of the run, so it partly measures length.
- ``think_length``: the number of reasoning tokens, a strong baseline for reasoning models (longer traces are
  wrong more often).
- ``negative_min_answer_logprob``: -min log p over the answer's tokens, the lowest token probability in the answer.

Notation: a run has T = ``n_generated`` tokens t = 0..T-1 (EOS excluded), ``think_start_index`` s and
``think_end_index`` e (the first ``<think>`` and ``</think>`` tokens, missing when not generated).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd


def _indices(values, name: str, n_runs: int) -> np.ndarray:
    """A nullable integer column as float (NaN = missing), shape (n_runs,)."""
    array = pd.Series(values, dtype="Int64").to_numpy(dtype=np.float64, na_value=np.nan)
    if array.shape != (n_runs,):
        raise ValueError(f"{name} has shape {array.shape}; expected ({n_runs},), one value per run")
    return array


def length_normalised_negative_loglik(sequence_loglik, n_generated) -> np.ndarray:
    """-log p(s_i) / T_i per run, the mean token surprisal in nats (T_i = 0 counted as 1, giving 0). (n,) -> (n,)

    The same normalisation as ``stages.lib.semantic.entropy.length_normalised_loglik`` (which the weighted SE uses),
    negated.
    """
    sequence_loglik = np.asarray(sequence_loglik, dtype=np.float64)
    n_generated = np.asarray(n_generated, dtype=np.float64)
    if sequence_loglik.shape != n_generated.shape or sequence_loglik.ndim != 1:
        raise ValueError(f"sequence_loglik {sequence_loglik.shape} and n_generated {n_generated.shape} must be (n,)")
    return -sequence_loglik / np.maximum(n_generated, 1.0)


def think_length(think_start_index, think_end_index, n_generated) -> np.ndarray:
    """Tokens of reasoning per run: those strictly inside the think span. (n,) -> (n,) float

    - both tags: e - (s + 1); a ``</think>`` without a generated ``<think>`` (the prompt opened the span, as
      DeepSeek-R1's template does): e tokens;
    - no ``</think>``: the run was still reasoning when it stopped (truncated), so every token after ``<think>``,
      T - (s + 1), or all T tokens when no ``<think>`` was generated either (also what a model without think tags
      gets: its whole generation, as ``mean_token_entropy`` uses all tokens when there is no span).
    """
    n_generated = np.asarray(n_generated, dtype=np.float64)
    start = _indices(think_start_index, "think_start_index", len(n_generated))
    end = _indices(think_end_index, "think_end_index", len(n_generated))
    first_inside = np.where(np.isnan(start) | (start > np.nan_to_num(end, nan=np.inf)), 0.0, start + 1)
    last_exclusive = np.where(np.isnan(end), n_generated, end)
    return np.maximum(last_exclusive - first_inside, 0.0)


def negative_min_answer_logprob(token_logprobs: Sequence[np.ndarray], think_end_index) -> np.ndarray:
    """-min_t log p(token_t) over each run's ANSWER tokens: minus the log of the lowest token probability. (n,)

    The answer tokens are those after the (first) ``</think>``, t > e: the final answer and its wrapping
    (``\\boxed{...}``, whose fixed characters are near-certain, so the minimum falls on the answer itself). When
    there is none (no ``</think>``: truncated while reasoning or a model without think tags; or ``</think>`` was the
    last token) the whole generation stands in, so a run cut off mid-reasoning is scored by its least likely token
    (typically low: such runs rank as uncertain, and they have no answer). A run with no tokens at all gets 0
    (nothing was uncertain; its empty answer is wrong, which the metric then counts against this score).

    Parameters
    ----------
    token_logprobs : sequence of n arrays, array i of shape (T_i,), the ``token_logprobs`` column
    think_end_index : (n,) int or missing
    """
    end = _indices(think_end_index, "think_end_index", len(token_logprobs))
    scores = np.zeros(len(token_logprobs))
    for run, (logprobs, think_end) in enumerate(zip(token_logprobs, end)):
        logprobs = np.asarray(logprobs, dtype=np.float64)
        answer = logprobs[int(think_end) + 1:] if not np.isnan(think_end) else logprobs[:0]
        if len(answer) == 0:
            answer = logprobs
        if len(answer):
            scores[run] = -float(answer.min())
    return scores


# ---- DeepConf (Fu, Wang, Tian & Zhao 2025, "Deep Think with Confidence") --------------------------------------
#
# The token confidence of step t is C_t = -(1/k) sum_{j=1}^{k} log P_t(j), minus the mean of the k largest log-probs
# of the next-token distribution (the runs table records their mean, ``token_topk_logprob_mean``, k = TOP_LOGPROBS):
# high when the distribution is peaked. A group is a sliding window of w consecutive tokens (stride 1) and its
# confidence the mean C_t over it. The paper's defaults are w = 2048 and a tail of 2048 tokens on traces of some 16k
# tokens; here both are 2048 tokens or an eighth of the run, whichever is smaller (at least one token), so a toy
# run of 40 tokens reads windows of 5. These functions return CONFIDENCES (higher = more likely right), as the
# paper defines them; the registry scores them with orientation ``lower``. A run with no tokens has confidence 0,
# below any real one (k > 1 log-probs cannot all be 0).

DEEPCONF_WINDOW = 2048
"""The paper's group (sliding window) size in tokens."""
DEEPCONF_TAIL = 2048
"""The paper's tail size in tokens."""
DEEPCONF_RUN_FRACTION = 1 / 8
"""Short runs: window and tail are at most this share of the run (2048 of the paper's ~16k-token traces)."""
DEEPCONF_BOTTOM_FRACTION = 0.1
"""Bottom-10% group confidence: the mean of the lowest tenth of the group confidences."""


def deepconf_span(n_tokens: int, size: int) -> int:
    """The window (or tail) length for a run of ``n_tokens``: min(size, ceil(n_tokens / 8)), at least 1."""
    return int(max(1, min(size, math.ceil(n_tokens * DEEPCONF_RUN_FRACTION))))


def group_confidences(token_confidence: np.ndarray, window: int) -> np.ndarray:
    """(n - w + 1,) the mean token confidence over every window of ``window`` consecutive tokens (stride 1)."""
    cumulative = np.r_[0.0, np.cumsum(np.asarray(token_confidence, dtype=np.float64))]
    return (cumulative[window:] - cumulative[:-window]) / window


def _per_run(token_topk_logprob_mean: Sequence[np.ndarray], aggregate) -> np.ndarray:
    values = []
    for means in token_topk_logprob_mean:
        confidence = -np.asarray(means, dtype=np.float64)  # (T,) C_t
        values.append(aggregate(confidence) if len(confidence) else 0.0)
    return np.asarray(values, dtype=np.float64)


def lowest_group_confidence(token_topk_logprob_mean: Sequence[np.ndarray]) -> np.ndarray:
    """min over the run's sliding windows of the group confidence (DeepConf's C_least). n runs -> (n,)"""
    return _per_run(token_topk_logprob_mean,
                    lambda c: group_confidences(c, deepconf_span(len(c), DEEPCONF_WINDOW)).min())


def bottom_group_confidence(token_topk_logprob_mean: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of the lowest 10% of the run's group confidences (at least one group; DeepConf's C_bottom-10%).
    n runs -> (n,)"""
    def bottom(confidence: np.ndarray) -> float:
        groups = np.sort(group_confidences(confidence, deepconf_span(len(confidence), DEEPCONF_WINDOW)))
        return float(groups[:max(1, math.ceil(DEEPCONF_BOTTOM_FRACTION * len(groups)))].mean())
    return _per_run(token_topk_logprob_mean, bottom)


def tail_confidence(token_topk_logprob_mean: Sequence[np.ndarray]) -> np.ndarray:
    """Mean token confidence over the run's last tokens (DeepConf's C_tail). n runs -> (n,)"""
    return _per_run(token_topk_logprob_mean, lambda c: c[-deepconf_span(len(c), DEEPCONF_TAIL):].mean())
