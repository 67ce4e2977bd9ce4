"""Final-answer extraction and math-verify equivalence, shared by the generate and semantic_entropy stages.

Pure helpers, no I/O:

- ``extract_answer(text)``: the answer a reasoning model committed to after its reasoning (last ``\\boxed{...}``,
  else the last number) and how it was found (``ANSWER_SOURCES``); ``extract_final_answer`` is its answer alone.
- ``answers_equivalent(a, b)``: do two sampled answers mean the same mathematical object? (semantic clustering)
- ``is_correct(answer, gold)``: does a sampled answer match the reference answer? (the ``correct`` label)

Grades never depend on how busy the machine is. math-verify's own guards are ``signal.alarm`` timeouts (5 s a
parse or comparison by default) whose expiry silently means "not equal": under load a slow but correct comparison
(``\\sum_{n=1}^{\\infty} \\frac{1}{n^2}`` against ``\\frac{\\pi^2}{6}`` takes 4 s here idle) was graded wrong,
and an alarm that lands inside sympy (whose ``except Exception`` blocks do not catch math-verify's
``TimeoutException``, but whose caches it can leave half-written) made later answers of the same process compare
differently. So both timeouts are off, and what they guarded against is screened deterministically instead:

- an answer whose evaluation would build a number of more than ``MAX_DIGITS`` digits (``9^{9^{9}}``, a power tower;
  a huge factorial) is *undecided*: equal only to the identical string, with a warning naming it (``undecided``);
- an expression holding an infinity is evaluated first (``oo**(oo**oo)`` is ``oo``), since sympy's simplification of
  unevaluated infinite powers differs from one process to the next (``\\infty^{\\infty^{\\infty}}`` against ``7``
  was equal in some processes);
- a backstop alarm of ``BACKSTOP_SECONDS`` stops the stage with one line naming the pair (``GradingStuck``) rather than
  grading it: load can then fail a run, loudly, but never change a grade.

The backstop uses ``signal.alarm``, so these helpers must be called from the main thread: no thread pools (a
process pool is fine; each worker has its own main thread).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import re
import signal
from dataclasses import dataclass
from typing import Iterator

import sympy
from math_verify import parse, verify

from stages.lib.errors import UserError

log = logging.getLogger(__name__)

MAX_DIGITS = 1_000_000
"""An answer whose evaluation builds a number of more digits than this is undecided (10^{100000} verifies in 0.2 s;
9^{9^{9}}, 369 million digits, never finishes)."""
BACKSTOP_SECONDS = 600
"""A parse or comparison still running after this long stops the stage (``GradingStuck``); it is never a grade."""

THINK_START_TAG = "<think>"
THINK_END_TAG = "</think>"
BOXED_COMMAND = "\\boxed"

# A number: thousands-grouped (1,234,567.5), plain (1234, 3.5) or a bare decimal (.5), with an optional minus.
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
# A minus right after one of these is a binary minus ("5-3", "x-2", "(a)-1"), not a sign.
_OPERAND_END = re.compile(r"[\w)\]}.]")


BOXED = "boxed"
LAST_NUMBER_FALLBACK = "last_number_fallback"
NO_ANSWER_FOUND = "none"
TRUNCATED_IN_THINK = "truncated_in_think"
ANSWER_SOURCES = (BOXED, LAST_NUMBER_FALLBACK, NO_ANSWER_FOUND, TRUNCATED_IN_THINK)
"""How a run's answer was found; the pipeline counts them per dataset and split and flags all but ``boxed``."""


@dataclass(frozen=True)
class ExtractedAnswer:
    answer: str
    """The final answer, ``''`` when there is none."""
    source: str
    """One of ``ANSWER_SOURCES``."""


def extract_answer(text: str, think_open_at_start: bool = False) -> ExtractedAnswer:
    """The final answer in a generated text and how it was found.

    Policy: nothing is ever taken from inside the reasoning. Numbers and boxes in a think span are partial
    results, and a run cut off while reasoning has not answered; judging it on an intermediate result would be
    label noise (a truncated ``<think>5+6=11 11*2=`` used to be "answered" 2).

    1. Thinking still open at the end (a ``<think>`` after the last ``</think>``, or ``think_open_at_start`` and no
       ``</think>``): no answer, source ``truncated_in_think``.
    2. The answer part is the text after the last ``</think>``, or the whole text when there is no think tag at all
       (a model that does not reason in tags).
    3. In the answer part, the content of the last complete ``\\boxed{...}`` (nested braces balanced, content
       stripped; an empty ``\\boxed{}`` or one cut off before its closing brace is skipped): source ``boxed``.
    4. Else the last number in the answer part (integer, decimal or negative; thousands commas removed): source
       ``last_number_fallback``. It can misread an answer that is not a number (``x^2 - 4`` gives ``4``), which
       is why it is flagged.
    5. Else no answer, source ``none`` (e.g. the model stopped right after ``</think>``).

    Parameters
    ----------
    text : the decoded generation, special tokens kept
    think_open_at_start : True when the PROMPT opened a think span the generation did not close yet (a chat template
        ending in ``<think>``, as DeepSeek-R1's does); then a generation without ``</think>`` is still reasoning
    """
    think_start, think_end = text.rfind(THINK_START_TAG), text.rfind(THINK_END_TAG)
    if think_start > think_end or (think_open_at_start and think_end < 0):
        return ExtractedAnswer("", TRUNCATED_IN_THINK)
    answer_part = text[think_end + len(THINK_END_TAG):] if think_end >= 0 else text
    boxed = last_boxed_content(answer_part)
    if boxed:
        return ExtractedAnswer(boxed, BOXED)
    number = last_number(answer_part)
    if number:
        return ExtractedAnswer(number, LAST_NUMBER_FALLBACK)
    return ExtractedAnswer("", NO_ANSWER_FOUND)


def extract_final_answer(text: str, think_open_at_start: bool = False) -> str:
    """The answer of ``extract_answer`` (``''`` if there is none), without its source."""
    return extract_answer(text, think_open_at_start).answer


def last_boxed_content(text: str) -> str:
    """Content of the last complete, non-empty ``\\boxed{...}`` in ``text`` (braces balanced), else ``''``."""
    start = text.rfind(BOXED_COMMAND)
    while start >= 0:
        content = _braced_content(text, start + len(BOXED_COMMAND))
        if content:
            return content
        start = text.rfind(BOXED_COMMAND, 0, start)
    return ""


def _braced_content(text: str, position: int) -> str | None:
    """The stripped content of the ``{...}`` group opening at ``position`` (after spaces); None if unbalanced."""
    while position < len(text) and text[position] == " ":
        position += 1
    if position >= len(text) or text[position] != "{":
        return None
    depth = 0
    for index in range(position, len(text)):
        char = text[index]
        # An escaped brace (\{ in a set like \boxed{\{1,2\}}) is content, not grouping.
        if char in "{}" and index > 0 and text[index - 1] == "\\":
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[position + 1:index].strip()
    return None


def last_number(text: str) -> str:
    """The last number in ``text`` with thousands commas removed (``'1,234'`` -> ``'1234'``), else ``''``."""
    match = None
    for match in _NUMBER.finditer(text):
        pass
    if match is None:
        return ""
    number = match.group()
    if number.startswith("-") and match.start() > 0 and _OPERAND_END.match(text[match.start() - 1]):
        number = number[1:]
    return number.replace(",", "")


@functools.lru_cache(maxsize=65536)
def parse_answer(answer: str) -> tuple:
    """math-verify's parse of one final answer (sympy objects plus the matched string), cached per string.

    The answer is wrapped in ``$...$`` so math-verify reads it as LaTeX: bare ``x+1``, ``\\pi``, ``3\\sqrt{2}``
    or ``\\dfrac{14}{3}`` parse only inside math delimiters, and numbers still parse (``17``, ``72.0``,
    ``0.5`` as 1/2, ``1,000`` as 1000, ``18\\%`` as 18). ``\\boxed{}`` is not used as the wrapper because it
    fails on ``18\\%``. Returns a tuple (immutable, so the cached value cannot be altered by a caller).
    """
    answer = answer.strip()
    if not answer:
        return ()
    with backstop(answer):
        parsed = parse(f"${answer}$", parsing_timeout=None)
    if any(isinstance(item, sympy.Basic) and _log10_size(item) > MAX_DIGITS for item in parsed):
        log.warning("math-verify: %r would evaluate to a number of more than %d digits; undecided (equal only to "
                    "the same string)", answer, MAX_DIGITS)
        return ()
    return tuple(_evaluate_infinities(item) for item in parsed)


class GradingStuck(UserError):
    """A parse or comparison of math-verify ran past ``BACKSTOP_SECONDS``."""


class _Backstop(BaseException):  # not an Exception: sympy's and math-verify's ``except Exception`` let it through
    pass


@contextlib.contextmanager
def backstop(*what: str) -> Iterator[None]:
    """Stop the stage (GradingStuck) if the block runs past BACKSTOP_SECONDS; never turn that into a grade."""
    def expire(signum, frame):
        raise _Backstop()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(BACKSTOP_SECONDS)
    try:
        yield
    except _Backstop:
        raise GradingStuck(f"math-verify ran over {BACKSTOP_SECONDS} s on {' against '.join(map(repr, what))}; "
                           f"grades never depend on a timeout, so the stage stops (remove or fix that answer)"
                           ) from None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _log10_size(expr: sympy.Basic) -> float:
    """An upper bound on log10 of the largest number evaluating ``expr`` builds (powers and factorials of numbers
    only; 0 for anything else), without evaluating it."""
    def size(node: sympy.Basic) -> float:
        if isinstance(node, sympy.Rational):
            return math.log10(max(abs(int(node.p)), abs(int(node.q)), 1))
        if isinstance(node, sympy.Float):
            return 0.0 if node.is_zero else abs(float(sympy.log(abs(node), 10)))  # Float 0.0 != Integer 0
        if isinstance(node, sympy.Pow):
            base, exponent = size(node.base), size(node.exp)
            return math.inf if exponent > 15 else base * 10 ** exponent
        if isinstance(node, (sympy.factorial, sympy.factorial2)):
            n = size(node.args[0])
            return math.inf if n > 15 else 10 ** n * n
        return max((size(arg) for arg in node.args), default=0.0)

    return size(expr)


def _evaluate_infinities(item):
    """``item`` with its infinities evaluated (``oo**(oo**oo)`` -> ``oo``); sets, intervals, relations as given."""
    infinities = (sympy.S.Infinity, sympy.S.NegativeInfinity, sympy.S.ComplexInfinity)
    if isinstance(item, sympy.Expr) and item.has(*infinities):
        with contextlib.suppress(Exception):
            return item.doit()
    return item


@functools.lru_cache(maxsize=65536)
def answers_equivalent(first: str, second: str) -> bool:
    """True if two final answers denote the same mathematical object, by math-verify in both directions.

    - Identical strings (after stripping whitespace) are equivalent without calling math-verify, so the
      relation is reflexive, ``''`` included; an empty answer is never equivalent to a non-empty one.
    - ``verify`` is not symmetric (gold and prediction play different roles for equations and intervals);
      clustering needs a symmetric relation, so both directions must agree, as bidirectional entailment does
      for text in Farquhar et al. (2024).
    - Answers math-verify cannot parse are equivalent only to identical strings.
    """
    first, second = first.strip(), second.strip()
    if first == second:
        return True
    if not first or not second:
        return False
    parsed_first, parsed_second = parse_answer(first), parse_answer(second)
    if not parsed_first or not parsed_second:
        return False
    return _verify(parsed_first, parsed_second) and _verify(parsed_second, parsed_first)


def is_correct(answer: str, gold: str) -> bool:
    """True if ``answer`` matches the reference ``gold`` by math-verify (gold in the gold role).

    An empty answer is never correct. An empty gold is a data error and raises ``ValueError``.
    """
    if not gold.strip():
        raise ValueError(f"is_correct: empty gold answer (answer was {answer!r}); every question needs a gold")
    answer = answer.strip()
    if not answer:
        return False
    if answer == gold.strip():
        return True
    parsed_gold, parsed_answer = parse_answer(gold), parse_answer(answer)
    if not parsed_gold or not parsed_answer:
        return False
    return _verify(parsed_gold, parsed_answer)


def _verify(gold: tuple, prediction: tuple) -> bool:
    with backstop(str(gold[-1]), str(prediction[-1])):
        return bool(verify(list(gold), list(prediction), timeout_seconds=None))
