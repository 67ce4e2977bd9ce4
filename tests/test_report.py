"""The README headline table rendered from evaluate.json (stages/lib/evaluation/report.py), on a small synthetic
report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from stages.lib.evaluation.report import headline_table
from tests.viewer_support import synthetic_metrics

REPO = Path(__file__).resolve().parents[1]


def small_report():
    """synthetic_metrics with hand-set numbers on the rows the table reads."""
    report = synthetic_metrics()
    for split, auroc, low, high in (("test", 0.7274, 0.6591, 0.7812), ("ood", 0.6912, 0.6349, 0.7433)):
        metrics = report.splits[split]["accuracy_probe"]
        metrics.auroc, metrics.auroc_ci_low, metrics.auroc_ci_high = auroc, low, high
    for row in report.paired_differences:
        if (row.split, row.a, row.b) == ("test", "accuracy_probe", "semantic_entropy"):
            row.difference, row.ci_low, row.ci_high, row.p_value = -0.1006, -0.1583, -0.0412, 0.0004
        if (row.split, row.a, row.b) == ("ood", "accuracy_probe", "semantic_entropy"):
            row.difference, row.ci_low, row.ci_high, row.p_value = None, None, None, None
    return report


def test_headline_table_by_hand():
    lines = headline_table(small_report()).splitlines()
    assert lines[0] == ("| score | test AUROC [95% CI] | OOD AUROC [95% CI] | test difference from semantic entropy "
                        "[CI], p | OOD difference from semantic entropy [CI], p |")
    assert lines[1] == "|---|---|---|---|---|"
    assert lines[2] == ("| accuracy probe | 0.727 [0.659, 0.781] | 0.691 [0.635, 0.743] | "
                        "-0.101 [-0.158, -0.041], p < 0.001 | n/a |")
    # the SE probe's paired rows of synthetic_metrics: +0.05 [0.01, 0.09], p 0.02; SE itself has no difference
    assert lines[3].endswith("| +0.050 [0.010, 0.090], p 0.020 | +0.050 [0.010, 0.090], p 0.020 |")
    semantic_entropy = next(line for line in lines if line.startswith("| semantic entropy |"))
    assert semantic_entropy.endswith("| - | - |")
    # the headline rows in registry order, one per headline score
    assert len(lines) == 2 + 6


def test_headline_table_rows_on_request_and_missing_scores_skipped():
    report = small_report()
    del report.splits["ood"]["think_length"]
    table = headline_table(report, ("think_length", "eigv"))
    assert [line.split(" | ")[0] for line in table.splitlines()[2:]] == ["| EigV"]


def test_command_line_prints_the_table_and_names_a_missing_file(tmp_path):
    path = tmp_path / "evaluate.json"
    path.write_text(small_report().to_json())
    done = subprocess.run([sys.executable, "-m", "stages.lib.evaluation.report", str(path)], cwd=REPO,
                          capture_output=True, text=True, check=True)
    assert done.stdout == headline_table(small_report()) + "\n"
    missing = subprocess.run([sys.executable, "-m", "stages.lib.evaluation.report", str(tmp_path / "none.json")],
                             cwd=REPO, capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.strip().endswith("not found; run the evaluate stage "
                                                                       "(`dvc repro evaluate`)")
