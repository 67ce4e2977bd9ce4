"""The cost ratio: what semantic entropy costs per question against one probe evaluation, measured.

Used by the stage ``python -m stages.cost_ratio`` (or ``dvc repro cost_ratio``).

Reads the stages' own cost records (``{paths.metrics}/cost/{generate,semantic_entropy,trace}.json``) and writes
``{paths.metrics}/cost_ratio.json``:

- SE per question = (generate wall seconds + semantic_entropy wall seconds) / questions: K sampled runs and the
  equivalence checks between their answers;
- a probe per question = trace wall seconds / traced sequences: one teacher-forced forward pass over one run,
  which yields the hidden states a probe reads (an upper bound: a deployed probe reads them from the pass that
  generates the answer, and the dot product itself is negligible);
- the ratio of the two, in seconds and in tokens (tokens generated for K runs against tokens in one pass).

Wall seconds are whole-stage times (model loading included) on whatever machine ran the stage, so the ratio is
specific to that machine and backend; the token ratio is not.
"""

from __future__ import annotations

import logging
from pathlib import Path

from stages.lib.schema.reports import (
    COST_COUNTERS,
    COST_DIR,
    CostRatio,
    CostRecord,
    GenerateCounters,
    SemanticEntropyCounters,
    TraceCounters,
)

log = logging.getLogger(__name__)


def read_costs(metrics_dir: str | Path) -> dict[str, CostRecord]:
    """The cost records of the stages in COST_COUNTERS (generate, semantic_entropy, trace), each checked for the
    counters it must hold; a missing file or field is a SchemaError naming it."""
    costs = {}
    for stage, counters in COST_COUNTERS.items():
        path = Path(metrics_dir) / COST_DIR / f"{stage}.json"
        record = CostRecord.read(path, writer=stage)
        counters.parse(record.counters, path)
        costs[stage] = record
    return costs


def cost_ratio(costs: dict[str, CostRecord], runs_per_question: int) -> CostRatio:
    """Per-question cost of SE and of one probe evaluation, and their ratios (see the module docstring)."""
    generate, entropy, trace = costs["generate"], costs["semantic_entropy"], costs["trace"]
    generated = GenerateCounters.parse(generate.counters, "cost/generate.json")
    clustered = SemanticEntropyCounters.parse(entropy.counters, "cost/semantic_entropy.json")
    traced = TraceCounters.parse(trace.counters, "cost/trace.json")
    questions = clustered.questions
    if questions <= 0:
        raise ValueError(f"cost/semantic_entropy.json: `questions` = {questions}; expected > 0 (nothing to compare)")
    if traced.sequences <= 0:
        raise ValueError(f"cost/trace.json: `sequences` = {traced.sequences}; expected > 0 (nothing to compare)")
    se_seconds = (generate.wall_seconds + entropy.wall_seconds) / questions
    probe_seconds = trace.wall_seconds / traced.sequences
    se_tokens = generated.tokens_generated / questions
    probe_tokens = traced.tokens_processed / traced.sequences
    return CostRatio(
        runs_per_question=runs_per_question,
        questions=questions,
        se_seconds_per_question=se_seconds,
        probe_seconds_per_question=probe_seconds,
        seconds_ratio=se_seconds / probe_seconds if probe_seconds > 0 else None,
        se_generated_tokens_per_question=se_tokens,
        probe_tokens_per_question=probe_tokens,
        tokens_ratio=se_tokens / probe_tokens if probe_tokens > 0 else None,
        equivalence_checks_per_question=clustered.equivalence_checks / questions,
        note="SE = K sampled runs + equivalence clustering; probe = one teacher-forced pass over one run "
             "(wall seconds of whole stages on this machine, model loading included)",
    )
