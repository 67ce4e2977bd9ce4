"""viewer/views/early_exit.py on a small project written through the schema: loading, the Pareto plot with its
operating points, a run's forced answers in prefix order, and the assembled view."""

from __future__ import annotations

import shutil
from pathlib import Path

import holoviews as hv
import numpy as np
import pandas as pd
import pytest
from test_early_exit import outcomes

from stages.lib.early_exit.rules import evaluate_rules
from stages.lib.schema.tables import EARLY_EXIT_PARETO, FORCED_ANSWERS
from stages.lib.schema.reports import EarlyExitReport, EarlyExitSettings, StoppingProbeChoice
from stages.lib.schema.machinery import SchemaError, validate_frame
from viewer.views.early_exit import early_exit_view, forced_answer_table, load_early_exit, operating_points, pareto_plot

ROOT = Path(__file__).resolve().parents[1]


def forced_rows(dataset: str, question_id: str, run_id: int, prefixes=(25, 50, 75)) -> list[dict]:
    return [{"question_id": question_id, "run_id": run_id, "dataset": dataset, "prefix": p, "position": f"think_{p}",
             "reasoning_tokens": 20, "reasoning_kept": round(p / 5), "generated_kept": round(p / 5) + 1,
             "answer_ids": np.array([5, 6], dtype=np.int32), "answer_text": f"</think>\\boxed{{{p}}}", "answer": str(p),
             "answer_source": "boxed", "correct": p == 75, "mean_logprob": -0.5, "mean_entropy": 0.3,
             "answer_tokens": 2, "truncated": False, "tokens_used": round(p / 5) + 10} for p in prefixes[::-1]]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("early_exit_project")
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    rng = np.random.default_rng(0)
    splits = {split: outcomes(rng.random((60, 3)) < [0.3, 0.6, 0.95], np.ones(60, dtype=bool),
                              question_id=np.repeat(np.arange(20), 3).astype(str))
              for split in ("train", "val", "test", "ood")}
    probe_p = {split: np.clip(data.forced_correct + rng.normal(0, 0.3, (60, 3)), 0, 1)
               for split, data in splits.items()}
    rules, pareto, _ = evaluate_rules(splits, probe_p, 0.2, 0.2, 10, 20, 0.9, 0, n_draws=50)
    report = EarlyExitReport.model_validate({
        "settings": EarlyExitSettings(method="Learn-then-Test", loss="harm", epsilon=0.2, delta=0.2,
                                      prefixes=[25, 50, 75], answer_prefix="\\boxed{", calibration_split="val",
                                      n_calibration_questions=20, bootstrap=20, confidence=0.9),
        "stopping_probes": {"think_25": StoppingProbeChoice(position="think_25", layer=1, C=1.0, train_cv_auroc=0.7,
                                                            val_auroc=0.6, train_accuracy=0.3, constant=False)},
        "rules": rules})
    (root / "artifacts/metrics").mkdir(parents=True)
    (root / "artifacts/plots").mkdir(parents=True)
    (root / "artifacts/metrics/early_exit.json").write_text(report.to_json())
    validate_frame(pareto, EARLY_EXIT_PARETO.columns, "pareto")
    pareto.to_csv(root / "artifacts/plots/early_exit_pareto.csv", index=False)
    for directory in ("data/forced_answers", "data/runs"):
        (root / directory).mkdir(parents=True)
    for dataset in ("id", "ood"):
        forced = pd.DataFrame(forced_rows(dataset, "q1", 0) + forced_rows(dataset, "q1", 1),
                              columns=[c.name for c in FORCED_ANSWERS.columns])
        forced.to_parquet(root / f"data/forced_answers/{dataset}.parquet", index=False)
        pd.DataFrame({"question_id": ["q1", "q1"], "run_id": [0, 1], "dataset": [dataset] * 2, "text": ["a", "b"],
                      "answer": ["75", "3"], "correct": [True, False], "n_generated": [30, 31]}).to_parquet(
            root / f"data/runs/{dataset}.parquet", index=False)
    return root


def test_load_and_draw_the_pareto_curve_with_operating_points(project):
    data = load_early_exit(project)
    assert set(data.report.rules) == set(data.pareto["rule"])
    overlay = pareto_plot(data.pareto, "test")
    assert isinstance(overlay, hv.Overlay)
    chosen = data.pareto[(data.pareto["split"] == "test") & data.pareto["chosen"]]
    diamonds = [layer for layer in overlay if isinstance(layer, hv.Scatter) and layer.opts.get().kwargs.get(
        "marker") == "diamond"]
    assert len(diamonds) == chosen["rule"].nunique()
    only = pareto_plot(data.pareto, "ood", ["fixed_budget"])
    assert {layer.label for layer in only if isinstance(layer, hv.Curve)} == {"fixed_budget"}
    with pytest.raises(ValueError, match="no Pareto rows"):
        pareto_plot(data.pareto, "nonsense")
    points = operating_points(data.report, "test")
    assert list(points["rule"]) == list(data.report.rules)


def test_a_runs_forced_answers_come_in_prefix_order(project):
    data = load_early_exit(project)
    table = forced_answer_table(data.forced, "q1", 1, "ood")
    assert list(table["prefix"]) == [25, 50, 75] and list(table["answer"]) == ["25", "50", "75"]
    assert list(table["correct"]) == [False, False, True]
    with pytest.raises(KeyError, match="no forced answers"):
        forced_answer_table(data.forced, "q9", 0)


def test_the_view_assembles(project):
    view = early_exit_view(project)
    assert len(view.objects) == 6


def test_a_missing_output_names_the_stage(project, tmp_path):
    shutil.copy(project / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(SchemaError, match="early_exit"):
        load_early_exit(tmp_path)


def test_the_app_tab_says_what_to_run_when_the_stages_have_not_run(tmp_path):
    from viewer.app import early_exit_section
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    section = early_exit_section(tmp_path)
    assert "No early-exit results" in section.object and "dvc repro" in section.object


def test_the_run_summary_escapes_model_text(project):
    import html as html_module

    from viewer.views.early_exit import run_summary
    runs = load_early_exit(project).runs.copy()
    runs.loc[0, "answer"] = '<img src=x onerror="alert(1)">'
    summary = run_summary(runs, runs.loc[0, "dataset"], runs.loc[0, "question_id"], int(runs.loc[0, "run_id"]))
    assert "<img" not in summary and html_module.escape('<img src=x onerror="alert(1)">') in summary
    assert run_summary(runs, "id", "no such question", 0) == ""
