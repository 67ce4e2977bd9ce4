"""evaluate.json as the markdown headline table of README.md and docs/results.md, to paste after a rerun.

Run with ``python -m stages.lib.evaluation.report [path/to/evaluate.json] [--all]`` (default
``artifacts/metrics/evaluate.json``,
the headline scores only; ``--all`` every score of incorrect runs). It prints the table; nothing is recomputed:
every number is read from the file through its schema (``schema.EvaluateReport``).

One row per score: its AUROC for flagging incorrect runs with the question-bootstrap CI on test and OOD, and its
paired difference from semantic entropy (``paired_differences``: the CI and p from the same resamples) where
evaluate computed one; ``-`` where it did not (SE itself, or a pair not in ``registry.PAIRED_COMPARISONS``) and
``n/a`` where the metric is undefined (an empty or single-class split).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stages.lib import registry
from stages.lib.errors import UserError
from stages.lib.schema.reports import EVALUATE_FILE, EvaluateReport

REFERENCE_SCORE = "semantic_entropy"
"""The column of differences: each row's AUROC minus this score's, on the same runs."""
SPLITS = (("test", "test"), ("ood", "OOD"))


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _interval(value: float | None, low: float | None, high: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} [{_number(low)}, {_number(high)}]" if low is not None else f"{value:.3f}"


def _p_value(p: float | None) -> str:
    if p is None:
        return "n/a"
    return f"{p:.3f}" if p >= 0.001 else "< 0.001"


def headline_table(report: EvaluateReport, scores: tuple[str, ...] | None = None) -> str:
    """The markdown table (header, separator, one line per score; no trailing newline).

    Parameters
    ----------
    report : evaluate.json, read through its model
    scores : registry names of the rows, in this order; default: the headline scores of incorrect runs in registry
        order (those of the file only: a score the file lacks is skipped)
    """
    if scores is None:
        scores = tuple(entry.name for entry in registry.scores(label="incorrect") if entry.headline)
    differences = {(row.split, row.a, row.b): row for row in report.paired_differences}
    reference = registry.BY_NAME[REFERENCE_SCORE].display_name
    header = ["score"] + [f"{name} AUROC [95% CI]" for _, name in SPLITS] + \
        [f"{name} difference from {reference} [CI], p" for _, name in SPLITS]
    if report.settings.confidence != 0.95:
        header = [cell.replace("95%", f"{report.settings.confidence:.0%}") for cell in header]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in scores:
        if not all(name in report.splits.get(split, {}) for split, _ in SPLITS):
            continue
        cells = [registry.BY_NAME[name].display_name if name in registry.BY_NAME else name]
        for split, _ in SPLITS:
            metrics = report.splits[split][name]
            cells.append(_interval(metrics.auroc, metrics.auroc_ci_low, metrics.auroc_ci_high))
        for split, _ in SPLITS:
            row = differences.get((split, name, REFERENCE_SCORE))
            if row is None:
                cells.append("-")
            elif row.difference is None:
                cells.append("n/a")
            else:
                cells.append(f"{row.difference:+.3f} [{_number(row.ci_low)}, {_number(row.ci_high)}], "
                             f"p {_p_value(row.p_value)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """The command line: print the table; a missing or malformed file is one line on stderr and exit status 2."""
    parser = argparse.ArgumentParser(prog="python -m stages.lib.evaluation.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", default=str(Path("artifacts/metrics") / EVALUATE_FILE),
                        help="evaluate.json (default: %(default)s)")
    parser.add_argument("--all", action="store_true", help="every score of incorrect runs, not only the headline")
    args = parser.parse_args(argv)
    try:
        report = EvaluateReport.read(args.path, writer="evaluate")
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    scores = tuple(entry.name for entry in registry.scores(label="incorrect")) if args.all else None
    print(headline_table(report, scores))


if __name__ == "__main__":
    main()
