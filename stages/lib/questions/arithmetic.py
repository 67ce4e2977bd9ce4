"""The synthetic task of the embedded toy model: arithmetic chains solved step by step.

A question is a chain of ``+`` and ``-`` over positive integers, such as ``12+7-5+3``; its completion is written
in the format of a reasoning model (Qwen3, DeepSeek-R1): the partial results inside a think span, then the boxed
final answer::

    <think>12+7=19
    19-5=14
    14+3=17</think>\\boxed{17}

(the tokenizer appends its EOS token after it). Every partial result is kept non-negative, so the model never
needs a minus sign in a result and a chain is always solvable left to right.

Two distributions are used (see ``toy:`` in params.yaml):

- in distribution: ``min_terms..max_terms`` operands, each in ``1..max_operand``;
- out of distribution (the *tail*): ``max_terms+1..ood_max_terms`` operands, each in ``1..ood_max_operand``.
  The toy model sees only a small fraction (``ood_train_fraction``) of tail chains in training, so tail
  questions are harder but reachable; a model that never saw a longer chain gets almost none right.

Pure functions only, no I/O; the generators take a ``numpy.random.Generator`` so callers control the seed.
"""

from __future__ import annotations

import re

import numpy as np

THINK_START = "<think>"
THINK_END = "</think>"

_CHAIN = re.compile(r"\d+(?:[+-]\d+)+")
_TERM = re.compile(r"([+-]?)(\d+)")


def random_chain(rng: np.random.Generator, min_terms: int, max_terms: int, max_operand: int) -> str:
    """One chain with ``min_terms..max_terms`` operands in ``1..max_operand`` and non-negative partial results.

    A subtrahend is drawn from ``1..min(max_operand, current)`` so the running value never drops below zero;
    at zero the next operator is ``+``.
    """
    if not 2 <= min_terms <= max_terms:
        raise ValueError(f"need 2 <= min_terms <= max_terms, got {min_terms}..{max_terms}")
    if max_operand < 1:
        raise ValueError(f"need max_operand >= 1, got {max_operand}")
    n_terms = int(rng.integers(min_terms, max_terms + 1))
    current = int(rng.integers(1, max_operand + 1))
    text = str(current)
    for _ in range(n_terms - 1):
        subtract = current > 0 and bool(rng.integers(0, 2))
        if subtract:
            operand = int(rng.integers(1, min(max_operand, current) + 1))
            current -= operand
            text += f"-{operand}"
        else:
            operand = int(rng.integers(1, max_operand + 1))
            current += operand
            text += f"+{operand}"
    return text


def make_questions(n: int, rng: np.random.Generator, min_terms: int, max_terms: int,
                   max_operand: int) -> list[tuple[str, str]]:
    """``n`` distinct chains as ``(question, gold)`` pairs, gold being the final value as a string.

    Raises ValueError when the range holds fewer than ``n`` distinct chains (in practice: far too small).
    """
    questions: dict[str, str] = {}
    attempts = 0
    while len(questions) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"could not draw {n} distinct chains with {min_terms}..{max_terms} terms and "
                             f"operands 1..{max_operand}; widen the range or ask for fewer questions")
        chain = random_chain(rng, min_terms, max_terms, max_operand)
        questions.setdefault(chain, str(chain_value(chain)))
    return list(questions.items())


def make_ood_questions(n: int, rng: np.random.Generator, max_terms: int, ood_max_terms: int,
                       ood_max_operand: int) -> list[tuple[str, str]]:
    """``n`` distinct tail chains: ``max_terms+1..ood_max_terms`` operands in ``1..ood_max_operand``."""
    return make_questions(n, rng, max_terms + 1, ood_max_terms, ood_max_operand)


def parse_chain(question: str) -> list[int]:
    """Signed operands of a chain: ``"12+7-5"`` -> ``[12, 7, -5]``. Raises ValueError on anything else."""
    compact = question.replace(" ", "")
    if not _CHAIN.fullmatch(compact):
        raise ValueError(f"not an arithmetic chain of + and - over integers: {question!r}")
    return [int(number) * (-1 if sign == "-" else 1) for sign, number in _TERM.findall(compact)]


def chain_value(question: str) -> int:
    return sum(parse_chain(question))


def solution_steps(question: str) -> list[str]:
    """The partial results, one equation per operator: ``"12+7-5"`` -> ``["12+7=19", "19-5=14"]``."""
    operands = parse_chain(question)
    current = operands[0]
    steps = []
    for operand in operands[1:]:
        result = current + operand
        steps.append(f"{current}{'+' if operand >= 0 else '-'}{abs(operand)}={result}")
        current = result
    return steps


RECHECK_MARKER = "check"
"""Starts the re-check pass of an over-thinking chain (``solution_text(..., recheck=True)``)."""


def solution_text(question: str, recheck: bool = False) -> str:
    """The target completion (without EOS): the steps inside ``<think>...</think>``, then ``\\boxed{answer}``.

    ``recheck``: the chain over-thinks, as real reasoning models do: once the answer is reached it re-checks every
    step (a ``check`` line, then the steps again) before closing the reasoning, so the answer is already known
    half-way through the think span.
    """
    steps = chr(10).join(solution_steps(question))
    reasoning = f"{steps}{chr(10)}{RECHECK_MARKER}{chr(10)}{steps}" if recheck else steps
    return f"{THINK_START}{reasoning}{THINK_END}\\boxed{{{chain_value(question)}}}"


def training_chains(n: int, rng: np.random.Generator, min_terms: int, max_terms: int, max_operand: int,
                    ood_max_terms: int, ood_max_operand: int, ood_fraction: float) -> list[str]:
    """``n`` training chains (repeats allowed): in-distribution ones, plus a fraction ``ood_fraction`` of tail ones.

    The tail share is what makes out-of-distribution questions hard but not impossible.
    """
    is_tail = rng.random(n) < ood_fraction
    return [random_chain(rng, max_terms + 1, ood_max_terms, ood_max_operand) if tail
            else random_chain(rng, min_terms, max_terms, max_operand) for tail in is_tail]


# ---- reading answers back ----------------------------------------------------------------------------------
