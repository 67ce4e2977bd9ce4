"""The viewer's data layer with plain pytest: loaders, the store's filters and derived frames, the
`dvc exp show` parser, and the views' plots rendered to Bokeh models (no browser; see test_viewer_browser.py).

tests/data/dvc_exp_show.json is real `dvc exp show --json` (DVC 3.67) output, captured from a throwaway repo with
a one-stage dvc.yaml writing evaluate.json from `sampling.temp`: two commits (temp 0.7, then 0.3) and three
`dvc exp run -S sampling.temp=...` experiments, workspace at temp 0.5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import pytest
import yaml
from bokeh.models import GlyphRenderer, ImageRGBA, Legend
from viewer_support import (
    PATHS,
    SCRIPT_ANSWER,
    synthetic_analysis,
    synthetic_cost_ratio,
    synthetic_early_warning,
    synthetic_metrics,
    write_viewer_project,
)

from stages.lib import registry
from stages.lib.schema.reports import COST_RATIO_FILE, EVALUATE_FILE, STABILITY_FILE, StabilityReport
from stages.lib.schema.tables import EARLY_WARNING, RELIABILITY, ROC, STABILITY_PLOT
from viewer import loaders, tables
from viewer.loaders import MissingArtifact, load_analysis, load_metrics, load_plot_table, run_files
from viewer.data import RunStore, points_in_polygon, stack_runs
from viewer.tables import calibration_table, cost_ratio_text, metrics_table, se_regression_table, stability_table
from viewer.experiments import headline_metric_columns, load_experiments, parse_exp_show, varying_params

EXP_SHOW_SAMPLE = Path(__file__).parent / "data" / "dvc_exp_show.json"
METRICS_FILE = "artifacts/metrics/evaluate.json"


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return synthetic_analysis(n_questions=30, runs_per_question=4, seed=1)


@pytest.fixture(scope="module")
def project(tmp_path_factory, table) -> Path:
    return write_viewer_project(tmp_path_factory.mktemp("viewer_project"), table)


@pytest.fixture
def store(project) -> RunStore:
    return RunStore(load_analysis(project))


# ---- loaders ---------------------------------------------------------------------------------------------------


def test_load_analysis_adds_outcome_and_keeps_every_run(project, table):
    loaded = load_analysis(project)
    assert len(loaded) == len(table) == 120
    assert (loaded["outcome"] == np.where(table["correct"], "correct", "incorrect")).all()
    assert list(loaded["question"]) == list(table["question"])


def test_missing_run_says_what_to_run(tmp_path):
    root = write_viewer_project(tmp_path, analysis=None, metrics=False)
    with pytest.raises(MissingArtifact, match=r"dvc repro.*dvc pull"):
        load_analysis(root)
    with pytest.raises(MissingArtifact, match="params.yaml"):
        load_analysis(tmp_path / "elsewhere")


def test_paths_outside_the_project_are_refused(tmp_path):
    root = write_viewer_project(tmp_path, analysis=None, metrics=False)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["paths"]["analysis"] = "../../etc"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(MissingArtifact, match="outside the project"):
        run_files(root)


def test_schema_mismatch_names_the_column(tmp_path, table):
    root = write_viewer_project(tmp_path, table.drop(columns=["umap_x"]), metrics=False)
    with pytest.raises(MissingArtifact, match="umap_x"):
        load_analysis(root)


def test_loader_rereads_a_rewritten_file(tmp_path, table):
    root = write_viewer_project(tmp_path, table, metrics=False)
    assert len(load_analysis(root)) == 120
    path = root / PATHS["analysis"] / "analysis.parquet"
    table.head(8).to_parquet(path, index=False)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert len(load_analysis(root)) == 8


def test_metrics_table_formats_value_and_ci(project):
    frame = metrics_table(loaders.load_metrics(project))
    first = frame.iloc[0]
    assert first["score"] == "accuracy_probe"
    assert first["test AUROC (CI)"] == "0.600 (0.550-0.650)"
    assert first["OOD AUROC (CI)"] == "0.550 (0.500-0.600)"
    assert first["test AUPRC chance"] == "0.400"
    # Selective prediction beside them (synthetic: AURAC 0.4 + AUROC / 4, AURC 0.6 - AUROC / 4, PRR 2 AUROC - 1).
    assert (first["test AURAC"], first["test AURC"], first["test PRR"]) == ("0.550", "0.450", "0.200")
    assert first["OOD PRR"] == "0.100"
    assert list(frame["score"]) == [score.name for score in registry.SCORES]  # evaluate.json's (registry) order
    assert frame.iloc[-1]["test AURAC"] == "n/a"  # the SE probe on its own label has no selective metrics
    assert frame.iloc[-1]["meaning"] == "score se_probe_high_se"  # described under settings' other labels


def test_ranked_scores_sort_compare_and_keep_other_labels_apart(project):
    metrics = loaders.load_metrics(project)
    ranked, other = tables.ranked_scores(metrics, "semantic_entropy")
    aurocs = [float(value.split()[0]) for value in ranked["test AUROC (CI)"]]
    assert aurocs == sorted(aurocs, reverse=True) and len(ranked) == len(registry.scores(label="incorrect"))
    assert list(other["score"]) == [score.name for score in registry.SCORES if score.label != "incorrect"]
    by_score = ranked.set_index("score")
    assert by_score.loc["semantic_entropy", "test ΔAUROC vs semantic_entropy"] == "reference"
    assert by_score.loc["accuracy_probe", "test ΔAUROC vs semantic_entropy"] == "+0.050 (+0.010 to +0.090)"  # paired
    paired = {pair for pair in registry.PAIRED_COMPARISONS if "semantic_entropy" in pair}
    unpaired = [score for score in by_score.index if score != "semantic_entropy"
                and (score, "semantic_entropy") not in paired and ("semantic_entropy", score) not in paired]
    assert unpaired, "the synthetic run needs a score without a paired difference against SE"
    score = unpaired[0]
    expected = metrics.splits["test"][score].auroc - metrics.splits["test"]["semantic_entropy"].auroc
    assert by_score.loc[score, "test ΔAUROC vs semantic_entropy"] == f"{expected:+.3f} (no CI)"
    assert list(ranked.columns)[-1] == "meaning"


def test_paired_differences_are_read_in_both_orders_and_undefined_ones_left_out():
    from types import SimpleNamespace

    from stages.lib.schema.reports import PairedDifferenceMetrics

    def entry(a, b, difference, low, high):
        return PairedDifferenceMetrics(a=a, b=b, label=f"{a} - {b}", split="test", difference=difference, ci_low=low,
                                       ci_high=high, p_value=0.2, bootstrap_resamples_used=100, note=None)
    report = SimpleNamespace(paired_differences=[entry("se_probe", "semantic_entropy", 0.05, 0.01, 0.09),
                                                 entry("accuracy_probe", "se_probe", None, None, None)])
    found = tables.paired_differences(report)
    assert found[("test", "se_probe", "semantic_entropy")] == (0.05, 0.01, 0.09)
    assert found[("test", "semantic_entropy", "se_probe")] == (-0.05, -0.09, -0.01)
    assert len(found) == 2


def test_identical_roc_curves_are_merged():
    from viewer.views.results import merge_identical_curves

    part = pd.DataFrame({"score": ["a", "a", "b", "b", "c", "c"], "fpr": [0, 1, 0, 1, 0, 1],
                         "tpr": [0, 1, 0, 1, 0.5, 1]})
    assert [label for label, _ in merge_identical_curves(part, "score", "fpr", "tpr")] == ["a = b", "c"]


def test_metrics_table_of_a_score_missing_from_a_split():
    metrics = synthetic_metrics()
    del metrics.splits["ood"]["naive_entropy"]
    row = metrics_table(metrics).set_index("score").loc["naive_entropy"]
    assert row["test AUROC (CI)"] != "n/a" and row["OOD AUROC (CI)"] == "n/a" and row["OOD AURAC"] == "n/a"


def test_calibration_and_se_regression_tables(project):
    metrics = load_metrics(project)
    calibration = calibration_table(metrics)
    assert list(calibration[["split", "probe"]].itertuples(index=False, name=None)) == [
        ("test", "accuracy_probe"), ("test", "accuracy_range_probe"), ("OOD", "accuracy_probe"),
        ("OOD", "accuracy_range_probe")]
    assert list(calibration["ECE"]) == ["0.050", "0.060"] * 2 and list(calibration["Brier"]) == ["0.150", "0.160"] * 2
    regression = se_regression_table(metrics)
    assert regression.to_dict("records")[1] == {"split": "OOD", "Spearman (runs)": "0.620",
                                                "Spearman (questions)": "0.710", "runs": 100, "questions": 10}


def test_stability_table_summarises_the_seeds(project):
    table = stability_table(load_metrics(project, STABILITY_FILE))
    assert list(table["score"]) == [score.name for score in registry.stable_scores()]
    seeds = load_plot_table(project, STABILITY_PLOT.file)  # the same run's per-seed values
    values = seeds.loc[(seeds["split"] == "ood") & (seeds["score"] == "naive_entropy"), "auroc"]
    row = table.set_index("score").loc["naive_entropy"]
    assert row["OOD AUROC"] == (f"{values.mean():.3f} ± {values.std(ddof=1):.3f} "
                                f"({values.min():.3f}-{values.max():.3f})")
    assert row["seeds"] == "4"
    by_hand = stability_table(StabilityReport.parse(
        {"test": {"x": {"mean": 0.5, "std": None, "min": 0.5, "max": 0.5, "n_seeds": 1, "values": [0.5]}},
         "ood": {"x": {"mean": None, "std": None, "min": None, "max": None, "n_seeds": 0, "values": [None]}},
         "skipped_seeds": [], "settings": {"seeds": [0], "c_grid": [1.0], "layer_ranges": "", "positive_class": ""}},
        "by hand"))
    assert by_hand.to_dict("records") == [{"score": "x", "test AUROC": "0.500 (0.500-0.500)", "OOD AUROC": "n/a",
                                           "seeds": "1/0"}]


def test_cost_ratio_sentence(project):
    assert cost_ratio_text(load_metrics(project, COST_RATIO_FILE)) == (
        "SE costs 125x a probe evaluation in seconds (2.5 s vs 0.02 s per question) and 6.0x in tokens "
        "(300 generated vs 50 in one pass), with K = 10 runs per question.")
    undefined = synthetic_cost_ratio().model_copy(update={"seconds_ratio": None, "tokens_ratio": 3.25})
    assert cost_ratio_text(undefined) == (
        "SE costs n/a a probe evaluation in seconds (2.5 s vs 0.02 s per question) and 3.2x in tokens "
        "(300 generated vs 50 in one pass), with K = 10 runs per question.")


def test_metrics_files_are_only_the_known_ones(project, tmp_path):
    assert load_metrics(project) == load_metrics(project, EVALUATE_FILE)
    with pytest.raises(KeyError, match="not one of the viewer's metrics files"):
        load_metrics(project, "../../params.yaml")
    root = write_viewer_project(tmp_path, analysis=None)
    (root / PATHS["metrics"] / STABILITY_FILE).unlink()
    with pytest.raises(MissingArtifact, match=r"No `stability.json` at .*dvc repro"):
        load_metrics(root, STABILITY_FILE)
    (root / PATHS["metrics"] / COST_RATIO_FILE).write_text("[1, 2]")
    with pytest.raises(MissingArtifact, match=r"cost_ratio.json: .*valid dictionary.*dvc repro cost_ratio"):
        load_metrics(root, COST_RATIO_FILE)
    (root / PATHS["metrics"] / COST_RATIO_FILE).write_text("{not json")
    with pytest.raises(MissingArtifact, match="Cannot read"):
        load_metrics(root, COST_RATIO_FILE)


def test_plot_tables_are_read_and_checked(project, tmp_path):
    roc = load_plot_table(project, "roc.csv")
    assert list(roc.columns[:4]) == ["score", "split", "fpr", "tpr"] and len(roc) > 0
    with pytest.raises(KeyError, match="not one of the viewer's plot tables"):
        load_plot_table(project, "../params.yaml")  # only the tables the viewer knows, never a given path
    root = write_viewer_project(tmp_path, analysis=None)
    (root / PATHS["plots"] / "roc.csv").write_text("score,split,fpr\nx,test,0.1\n")
    with pytest.raises(MissingArtifact, match="tpr"):
        load_plot_table(root, "roc.csv")


def _texts(viewable) -> list[str]:
    """The text of every pane under ``viewable`` (its ``object`` as a string), depth first."""
    found = [str(getattr(viewable, "object", ""))]
    for child in getattr(viewable, "objects", []):
        found += _texts(child)
    return found


def _panes(viewable, kind) -> list:
    found = [viewable] if isinstance(viewable, kind) else []
    for child in getattr(viewable, "objects", []):
        found += _panes(child, kind)
    return found


def test_results_draw_every_plot_table_and_say_what_is_missing(project, tmp_path):
    from viewer.views.results import RESULT_PLOTS, ResultsView

    assert {plot.table for plot in RESULT_PLOTS} == set(loaders.PLOT_TABLES)
    hv.extension("bokeh")
    for plot in RESULT_PLOTS:  # every registered plot draws its table to Bokeh
        hv.render(plot.draw(load_plot_table(project, plot.table), loaders.load_metrics(project).settings))
    complete = ResultsView(root=project)._content()
    assert len(_panes(complete, pn.GridBox)) == len(RESULT_PLOTS) and not _panes(complete, pn.pane.Alert)
    texts = " ".join(_texts(complete))
    assert "SE costs 125x a probe evaluation" in texts and "AURAC higher is better" in texts
    tables = {tuple(table.css_classes): table.object for table in _panes(complete, pn.pane.DataFrame)}
    assert len(tables[("calibration-table",)]) == 4
    assert len(tables[("stability-table",)]) == len(registry.stable_scores())

    # An incomplete run: no early warning, no stability or cost files, a missing roc.csv, and an evaluate.json
    # that does not match its schema (written before `calibration`). Each shows as a notice in its own section
    # naming what to rerun; everything else still draws (without evaluate.json's settings).
    root = write_viewer_project(tmp_path, analysis=None)
    for name in (ROC.file, EARLY_WARNING.file):
        (root / PATHS["plots"] / name).unlink()
    for name in (STABILITY_FILE, COST_RATIO_FILE):
        (root / PATHS["metrics"] / name).unlink()
    older = json.loads(synthetic_metrics().to_json())
    del older["calibration"]
    (root / PATHS["metrics"] / EVALUATE_FILE).write_text(json.dumps(older))
    sections = ResultsView(root=root)._content().objects
    texts = [" ".join(_texts(section)) for section in sections]
    for name in (ROC.file, EARLY_WARNING.file, STABILITY_FILE, COST_RATIO_FILE):
        holding = [text for text in texts if f"`{name}`" in text]
        assert len(holding) == 1 and "dvc repro" in holding[0], name  # the missing file, in its section only
    schema_notice = [text for text in texts if "evaluate.json: missing field `calibration`" in text]
    assert len(schema_notice) == 1 and "Rerun `dvc repro evaluate`" in schema_notice[0]
    assert len(_panes(pn.Column(*sections), pn.GridBox)) == len(RESULT_PLOTS) - 2


def test_early_warning_keeps_slt_apart_and_null_rows_become_a_notice(project, tmp_path):
    from viewer.views.results import AFTER_ANSWER_X, NothingToDraw, ResultsView, draw_early_warning

    frame = load_plot_table(project, EARLY_WARNING.file)
    test_panel = draw_early_warning(frame, {}).values()[0]
    lines = [element for element in test_panel.values() if type(element) is hv.Curve]
    assert {line.label for line in lines} == {"accuracy probe", "SE probe"}
    assert all(line.dframe()["x"].max() <= 1.01 for line in lines)  # the line ends at think_end
    diamonds = [element.dframe() for element in test_panel.values()
                if type(element) is hv.Scatter and (element.dframe()["position"] == "slt").all()]
    expected = frame[(frame["split"] == "test") & (frame["position"] == "slt")]
    assert len(diamonds) == 2 and all(abs(d["x"].iloc[0] - AFTER_ANSWER_X) < 0.01 for d in diamonds)
    assert sorted(d["auroc"].iloc[0] for d in diamonds) == sorted(expected["auroc"])

    with pytest.raises(NothingToDraw, match="no rows with values"):
        draw_early_warning(frame.assign(auroc=np.nan), {})
    root = write_viewer_project(tmp_path, analysis=None)
    synthetic_early_warning().assign(auroc=None, auroc_ci_low=None, auroc_ci_high=None).to_csv(
        root / PATHS["plots"] / EARLY_WARNING.file, index=False)
    texts = [" ".join(_texts(section)) for section in ResultsView(root=root)._content().objects]
    assert sum(f"`{EARLY_WARNING.file}` has no rows with values" in text for text in texts) == 1


def test_reliability_skips_empty_bins_and_stability_bars_span_the_seeds(project):
    from viewer.views.results import draw_reliability, draw_stability

    reliability = load_plot_table(project, RELIABILITY.file)
    assert (reliability["n"] == 0).any() and reliability["observed_frequency"].isna().any()
    panel = draw_reliability(reliability, {}).values()[0]
    curves = [element.dframe() for element in panel.values() if type(element) is hv.Curve and element.label]
    test_rows = reliability[(reliability["split"] == "test") & (reliability["n"] > 0)]
    assert [len(curve) for curve in curves] == [len(test_rows[test_rows["probe"] == probe])
                                               for probe in ("accuracy_probe", "accuracy_range_probe")]

    seeds = load_plot_table(project, STABILITY_PLOT.file)
    ood_panel = draw_stability(seeds, {}).values()[1]
    bars = next(element.dframe() for element in ood_panel.values() if isinstance(element, hv.ErrorBars))
    values = seeds[seeds["split"] == "ood"].groupby("score")["auroc"]
    bars = bars.set_index("score")
    assert np.allclose(bars["mean"] - bars["neg"], values.min()[bars.index])
    assert np.allclose(bars["mean"] + bars["pos"], values.max()[bars.index])


# ---- point geometry ---------------------------------------------------------------------------------------------


def test_stack_runs_merges_runs_on_one_spot():
    frame = pd.DataFrame({"x": [0.0, 1.0, 0.0, 0.0, 2.0], "y": [1.0, 1.0, 1.0, 1.0, 0.5],
                          "correct": [True, False, True, False, True]}, index=[10, 11, 12, 13, 14])
    stacks = stack_runs(frame, "x", "y")
    assert list(stacks.index) == [10, 11, 14]  # the first run of each stack, in order of appearance
    assert stacks["runs"].tolist() == [3, 1, 1] and stacks["runs_correct"].tolist() == [2, 0, 1]
    assert stacks["stack"].tolist() == ["×3", "", ""]
    assert stacks["runs"].sum() == len(frame)
    assert stack_runs(frame.iloc[:0], "x", "y").empty


def test_points_in_polygon_even_odd():
    square = np.array([[0, 0], [2, 0], [2, 2], [0, 2]])
    xs, ys = np.array([1.0, 3.0, 1.9, -0.1]), np.array([1.0, 1.0, 0.1, 1.0])
    assert points_in_polygon(xs, ys, square).tolist() == [True, False, True, False]
    notch = np.array([[0, 0], [4, 0], [4, 4], [3, 4], [3, 1], [1, 1], [1, 4], [0, 4]])  # a U shape
    assert points_in_polygon(np.array([2.0, 0.5, 3.5]), np.array([3.0, 3.0, 3.0]), notch).tolist() == [False, True,
                                                                                                      True]
    assert not points_in_polygon(xs, ys, square[:2]).any()  # fewer than 3 vertices: nothing


# ---- the store -------------------------------------------------------------------------------------------------


def test_store_starts_with_everything_in_view(store, table):
    assert len(store.filtered) == len(table)
    assert store.count_text() == "120 of 120 runs in view"
    assert store.param.se_range.bounds == (table["semantic_entropy"].min(), table["semantic_entropy"].max())
    assert store.param.n_clusters.bounds == (table["n_clusters"].min(), table["n_clusters"].max())
    assert store.selected.empty and store.question_runs.empty


def test_each_filter_matches_a_hand_written_mask(store, table):
    store.datasets = ["ood"]
    assert (store.filtered["dataset"] == "ood").all()
    assert len(store.filtered) == (table["dataset"] == "ood").sum()
    store.datasets = ["id", "ood"]
    store.splits = ["val", "test"]
    assert len(store.filtered) == table["split"].isin(["val", "test"]).sum()
    store.splits = list(store.param.splits.objects)
    store.correctness = "incorrect"
    assert len(store.filtered) == (~table["correct"]).sum() and not store.filtered["correct"].any()
    store.correctness = "all"
    low, high = 0.3, 0.8
    store.se_range = (low, high)
    expected = table["semantic_entropy"].between(low, high)
    assert len(store.filtered) == expected.sum()
    store.se_range = store.param.se_range.bounds
    store.n_clusters = (2, 2)
    assert len(store.filtered) == (table["n_clusters"] == 2).sum()


def test_filters_combine(store, table):
    store.param.update(datasets=["id"], correctness="correct", n_clusters=(1, 2))
    expected = (table["dataset"] == "id") & table["correct"] & (table["n_clusters"] <= 2)
    assert list(store.filtered.index) == list(table.index[expected])
    store.reset_filters()
    assert len(store.filtered) == len(table)


def test_search_is_literal_and_case_insensitive(store, table):
    store.search = "<SCRIPT>"
    assert len(store.filtered) == 4 and (store.filtered["question"].str.contains(SCRIPT_ANSWER, regex=False)).all()
    store.search = "+("  # regex metacharacters are plain text
    assert store.filtered.empty
    store.search = "ood-"
    assert len(store.filtered) == (table["dataset"] == "ood").sum()
    store.search = "  "
    assert len(store.filtered) == len(table)


def test_box_selection_is_inclusive_and_follows_filters(store, table):
    x, y = "umap_x", "umap_y"
    x0, x1 = table[x].quantile([0.2, 0.7])
    y0, y1 = table[y].min(), table[y].max()  # the bounds themselves are inside
    store.select_box(x, y, (x0, y0, x1, y1))
    inside = table[x].between(x0, x1) & table[y].between(y0, y1)
    assert sorted(store.selection) == list(table.index[inside])
    assert list(store.selected.index) == list(table.index[inside])
    store.correctness = "correct"  # a filter shrinks the selection to what is in view, and widening restores it
    assert list(store.selected.index) == list(table.index[inside & table["correct"]])
    store.correctness = "all"
    assert len(store.selected) == inside.sum()
    store.select_box(x, y, (x1, y1, x0, y0))  # a box dragged the other way selects the same runs
    assert len(store.selected) == inside.sum()
    store.clear_selection()
    assert store.selected.empty


def test_lasso_selects_the_runs_inside_the_polygon(store, table):
    x, y = "umap_x", "umap_y"
    centre_x, centre_y = table[x].median(), table[y].median()
    triangle = np.array([[centre_x - 50, centre_y - 50], [centre_x + 50, centre_y - 50], [centre_x, centre_y + 50]])
    store.select_lasso(x, y, triangle)
    inside = points_in_polygon(table[x].to_numpy(), table[y].to_numpy(), triangle)
    assert 0 < inside.sum() and list(store.selected.index) == list(table.index[inside])
    store.select_lasso(x, y, None)
    assert store.selected.empty


def test_selection_made_under_a_filter_selects_only_filtered_runs(store, table):
    store.datasets = ["ood"]
    store.select_box("umap_x", "umap_y", (-1e9, -1e9, 1e9, 1e9))
    assert len(store.selected) == (table["dataset"] == "ood").sum()
    store.datasets = ["id", "ood"]
    assert (store.selected["dataset"] == "ood").all()


def test_open_question_lists_all_its_runs_by_cluster(store, table):
    store.correctness = "correct"  # the question's runs ignore the filters
    store.open_question("id", "id-00000")
    runs = store.question_runs
    assert len(runs) == 4 and set(runs["question_id"]) == {"id-00000"}
    assert list(zip(runs["cluster_id"], runs["run_id"])) == sorted(zip(runs["cluster_id"], runs["run_id"]))
    assert SCRIPT_ANSWER in set(runs["answer"])
    store.question = None
    assert store.question_runs.empty


def test_everything_filtered_out_leaves_empty_frames(store):
    store.search = "no question has this text"
    assert store.filtered.empty and store.selected.empty
    assert store.count_text() == "0 of 120 runs in view"


# ---- views rendered to Bokeh (no browser) --------------------------------------------------------------------------


def _render(view):
    """The Bokeh figure of ``view``'s current frame (HoloViews' renderer, as the pane uses it)."""
    return hv.render(view.layers())


def _layer_rows(figure, column: str, ringed: bool) -> int:
    """Runs drawn as markers (the sum of `runs`) in the point layers, the selection's (`ring`) or the others."""
    return sum(int(np.sum(r.data_source.data["runs"])) for r in figure.select(GlyphRenderer)
               if "runs" in r.data_source.data and column in r.data_source.data
               and ("ring" in r.data_source.data) == ringed)


def _painted_pixels(figure) -> list[int]:
    """Non-transparent pixels of each datashader image of the figure."""
    return [int((r.data_source.data["image"][0].view(np.uint8).reshape(-1, 4)[:, 3] > 0).sum())
            for r in figure.select(GlyphRenderer) if isinstance(r.glyph, ImageRGBA)]


@pytest.mark.parametrize("view_name", ["MarginEntropyScatter", "UmapExplorer"])
def test_plots_draw_points_then_datashader_above_the_threshold(store, view_name):
    from viewer.views import points as views

    view = getattr(views, view_name)(store=store)
    x, y = view.axes()
    figure = _render(view)
    assert _layer_rows(figure, x, ringed=False) == 120 and _layer_rows(figure, x, ringed=True) == 0
    legend = figure.select_one(Legend)  # one swatch (a glyph in the outcome's colour) per outcome
    assert [item.label.value for item in legend.items] == ["correct", "incorrect"]
    assert [item.renderers[0].glyph.fill_color for item in legend.items] == [views.OUTCOME_COLOURS[o]
                                                                          for o in ("correct", "incorrect")]
    store.select_box(x, y, (store.table[x].min(), store.table[y].min(), store.table[x].quantile(0.3),
                            store.table[y].max()))
    assert 0 < len(store.selected) < 50
    layers = view.layers()
    ringed = layers.get(3).dframe()
    assert ringed["runs"].sum() == len(store.selected)
    # selected runs keep their outcome's colour; every other marker is dimmed
    assert (ringed["fill"] == ringed["outcome"].map(views.OUTCOME_COLOURS)).all()
    assert set(layers.get(1).dframe()["alpha"]) | set(layers.get(2).dframe()["alpha"]) == {views.DIMMED_ALPHA}
    view.rasterize_above = 50  # 120 markers in view: datashader's image, the selection still as markers (< 50)
    figure = _render(view)
    assert _layer_rows(figure, x, ringed=False) == 0 and _layer_rows(figure, x, ringed=True) == len(store.selected)
    assert max(_painted_pixels(figure)) > 20  # runs drawn as pixels
    assert [item.label.value for item in figure.select_one(Legend).items] == ["correct", "incorrect"]
    store.search = "no question has this text"  # empty views still draw
    assert _layer_rows(_render(view), x, ringed=False) == 0


def test_runs_coloured_by_a_value_rasterise_on_the_colour_bar(store):
    """Above the threshold the UMAP coloured by SE is datashader's image, shaded linearly over the colour bar's range
    (eq_hist, the default, refuses a fixed range: this view raised before)."""
    from viewer.views import points as views

    view = views.UmapExplorer(store=store, colour_by="semantic_entropy", rasterize_above=10)
    figure = _render(view)
    assert _layer_rows(figure, "semantic_entropy", ringed=False) == 0 and max(_painted_pixels(figure)) > 20
    pixels = view.layers().get(0)
    colours = {tuple(int(pixels.dimension_values(channel, flat=False)[row, column]) for channel in "RGB")
               for row, column in np.argwhere(pixels.dimension_values("A", flat=False) > 0)}
    assert len(colours) > 3  # several SE values, several colours


def test_stacked_runs_are_one_marker_with_a_count(tmp_path):
    from viewer.views import points as views

    table = synthetic_analysis(6, 4, seed=1, script_question=False)
    table.loc[[1, 2, 3], ["umap_x", "umap_y"]] = table.loc[0, ["umap_x", "umap_y"]].to_numpy()  # 4 runs on a spot
    table.loc[[1, 2, 3], "correct"] = table.loc[0, "correct"]
    store = RunStore(load_analysis(write_viewer_project(tmp_path, table, metrics=False)))
    layers = views.UmapExplorer(store=store).layers()
    markers = pd.concat([layers.get(1).dframe(), layers.get(2).dframe()])
    assert len(markers) == len(table) - 3 and markers["runs"].sum() == len(table)
    assert layers.get(4).dframe()["stack"].tolist() == ["×4"]  # the label of the only stack


def test_rebuilding_a_plot_replaces_its_figure(store):
    """A new probe or colour swaps the pane's DynamicMap, and the replaced one stops following the store."""
    from viewer.views import points as views

    view = views.UmapExplorer(store=store)
    first = view._pane.object
    view.colour_by = "semantic_entropy"
    assert view._pane.object is not first
    (old,) = [stream for stream in first.streams if isinstance(stream, hv.streams.Params)]
    (new,) = [stream for stream in view._pane.object.streams if isinstance(stream, hv.streams.Params)]
    calls = []
    old.add_subscriber(lambda **_: calls.append("old"))
    new.add_subscriber(lambda **_: calls.append("new"))
    store.correctness = "incorrect"
    assert calls == ["new"]


def test_views_follow_probe_and_colour_choices(store):
    from viewer.views import points as views

    scatter, umap = views.MarginEntropyScatter(store=store), views.UmapExplorer(store=store)
    assert scatter.axes() == ("accuracy_probe_margin", "semantic_entropy")
    store.probe = "se"
    scatter.entropy = "naive_entropy"
    assert scatter.axes() == ("se_probe_margin", "naive_entropy")
    umap.colour_by = "probe"
    assert umap.colour() == "se_probe_prob"
    figure = _render(umap)
    assert _layer_rows(figure, "se_probe_prob", ringed=False) == 120  # one layer coloured by the probe's score
    assert _layer_rows(_render(scatter), "se_probe_margin", ringed=False) == 120


def test_escaped_html_never_passes_markup():
    from viewer.views.common import escaped_html

    assert escaped_html(SCRIPT_ANSWER, "pre", "x") == '<pre class="x">&lt;script&gt;alert(1)&lt;/script&gt;</pre>'


def test_app_without_a_run_says_what_to_run(tmp_path):
    from viewer.app import create_app

    page = create_app(write_viewer_project(tmp_path, analysis=None, metrics=False))
    text = " ".join(str(getattr(obj, "object", "")) for column in page.main for obj in column)
    assert "dvc repro" in text and "dvc pull" in text


# ---- experiments -------------------------------------------------------------------------------------------------


def test_parse_exp_show_sample():
    frame = parse_exp_show(json.loads(EXP_SHOW_SAMPLE.read_text()), METRICS_FILE)
    assert list(frame["kind"]) == ["workspace", "commit", "experiment", "experiment", "commit", "experiment"]
    assert list(frame["name"]) == ["workspace", "master", "terse-farl", "eight-wins", "708e939", "risen-mush"]
    assert list(frame["baseline"].iloc[2:4]) == ["master", "master"] and frame["baseline"].iloc[5] == "708e939"
    assert list(frame["param:sampling.temp"]) == [0.5, 0.3, 0.5, 1.0, 0.7, 0.3]
    # the sample's stage wrote auroc = 0.7 + temp / 10
    assert np.allclose(frame["metric:test.accuracy_probe.auroc"], 0.7 + frame["param:sampling.temp"] / 10)
    assert varying_params(frame) == ["param:sampling.temp"]
    assert headline_metric_columns(frame) == ["metric:test.accuracy_probe.auroc", "metric:test.semantic_entropy.auroc",
                                              "metric:ood.accuracy_probe.auroc", "metric:summary.test.accuracy"]
    assert frame["error"].isna().all()


def test_parse_exp_show_survives_errors_and_junk():
    records = json.loads(EXP_SHOW_SAMPLE.read_text())
    records[1]["experiments"][0]["revs"][0]["error"] = {"type": "ReproductionError", "msg": "stage failed"}
    records[2]["data"]["metrics"][METRICS_FILE] = {"error": {"type": "FileNotFoundError", "msg": "gone"}}
    records.append("junk")
    records.append({"rev": "abc", "data": None, "experiments": [None, {"revs": [None]}]})
    frame = parse_exp_show(records, METRICS_FILE)
    assert frame.loc[frame["name"] == "terse-farl", "error"].item() == "ReproductionError: stage failed"
    assert "not at this revision" in frame.loc[frame["name"] == "708e939", "error"].item()
    assert np.isnan(frame.loc[frame["name"] == "708e939", "metric:test.accuracy_probe.auroc"].item())
    assert parse_exp_show({"not": "a list"}, METRICS_FILE).empty


def test_experiments_fall_back_to_the_workspace_metrics(project, monkeypatch):
    result = load_experiments(project)  # a temporary directory is no DVC repository
    assert not result.from_dvc and "dvc exp show" in result.message and "workspace" in result.message
    assert result.table["metric:test.accuracy_probe.auroc"].item() == pytest.approx(0.6)

    def missing_dvc(*args, **kwargs):
        raise FileNotFoundError("dvc")

    monkeypatch.setattr(subprocess, "run", missing_dvc)
    assert "not installed" in load_experiments(project).message

    def slow_dvc(*args, **kwargs):
        raise subprocess.TimeoutExpired("dvc", 1)

    monkeypatch.setattr(subprocess, "run", slow_dvc)
    assert "longer than" in load_experiments(project, timeout_s=1).message


def test_experiments_find_dvc_through_the_servers_python_not_path(project, tmp_path, monkeypatch):
    """`<venv>/bin/panel serve` without an activated venv: no `dvc` on PATH, and the tab still reads DVC."""
    import shutil

    root = tmp_path / "repo"
    shutil.copytree(project, root)
    (root / "dvc.yaml").write_text(f"metrics:\n  - {PATHS['metrics']}/{EVALUATE_FILE}\n")
    environment = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                   "GIT_COMMITTER_EMAIL": "t@t"}
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"],
                    ["git", "commit", "-qm", "run"]):
        subprocess.run(command, cwd=root, check=True, env=environment, capture_output=True)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    result = load_experiments(root, timeout_s=120)
    assert result.from_dvc, result.message
    assert result.table.loc[result.table["kind"] == "workspace", "metric:test.accuracy_probe.auroc"].item() == \
        pytest.approx(0.6)


def test_experiments_from_dvc_output(project, monkeypatch):
    sample = EXP_SHOW_SAMPLE.read_text()
    monkeypatch.setattr(subprocess, "run",
                        lambda *args, **kwargs: subprocess.CompletedProcess(args, 0, stdout=sample, stderr=""))
    result = load_experiments(project)
    assert result.from_dvc and len(result.table) == 6
    assert result.message.startswith("2 commit(s) and 3 experiment(s)")


def test_question_link_accepts_only_ids_of_the_run(table):
    from viewer.data import question_from_link

    assert question_from_link(table, [b"id-00000"]) == ("id", "id-00000")
    ood = table.loc[table["dataset"] == "ood", "question_id"].iloc[0]
    assert question_from_link(table, ood) == ("ood", ood)
    for value in (None, [], [b""], "id-0000", "../../etc/passwd", "<script>alert(1)</script>", [b"\xff\xfe"],
                  "x" * 1000, "id-00000' OR 1=1"):
        assert question_from_link(table, value) is None, value


def test_question_summary_is_one_row_per_question(store, table):
    from viewer.data import question_summary
    from viewer.views.questions import QuestionScatter

    summary = question_summary(store.filtered)
    assert len(summary) == table.groupby(["dataset", "question_id"]).ngroups and summary["n_runs"].sum() == len(table)
    first = summary.set_index("question_id").loc["id-00000"]
    expected = table.loc[table["question_id"] == "id-00000", "correct"].mean()
    assert first["accuracy"] == pytest.approx(expected)
    store.correctness = "correct"  # follows the filters
    assert question_summary(store.filtered)["accuracy"].eq(1.0).all()
    assert len(QuestionScatter(store=store).points()) == question_summary(store.filtered).shape[0]


def test_roc_legend_shows_each_curve_auroc():
    from viewer.views.results import _area

    assert _area(pd.DataFrame({"fpr": [0, 0, 1], "tpr": [0, 1, 1]})) == pytest.approx(1.0)
    assert _area(pd.DataFrame({"fpr": [0, 1], "tpr": [0, 1]})) == pytest.approx(0.5)


def test_answer_extraction_counts_are_a_table_per_split(project):
    from viewer.tables import answer_extraction_table

    table = answer_extraction_table(loaders.load_metrics(project))
    assert list(table["split"]) == ["train", "val", "test", "OOD"]
    assert table.set_index("split").loc["test", "last-number fallback"] == 2  # tests/viewer_support.py's counts
    assert table.set_index("split").loc["OOD", "stopped inside the think span (no answer, wrong)"] == 5


def test_experiments_change_against_their_own_baseline():
    """Real `dvc exp show` output (two commits, each with experiments): each experiment's metric minus its own
    baseline commit's (the sample's stage wrote auroc = 0.7 + temp / 10)."""
    from viewer.experiments import change_against_baseline

    frame = parse_exp_show(json.loads(EXP_SHOW_SAMPLE.read_text()), METRICS_FILE)
    metric = "metric:test.accuracy_probe.auroc"
    changes = change_against_baseline(frame, [metric])["Δ test.accuracy_probe.auroc"]
    by_name = dict(zip(frame["name"], changes))
    assert by_name["terse-farl"] == pytest.approx(0.02) and by_name["eight-wins"] == pytest.approx(0.07)
    assert by_name["risen-mush"] == pytest.approx(-0.04)  # against 708e939 (temp 0.7), not master (temp 0.3)
    assert all(np.isnan(by_name[name]) for name in ("workspace", "master", "708e939"))


def test_sweeps_never_join_points_of_different_commits():
    """One sweep per baseline commit, over the parameter its experiments change, sorted by it; the plot's curves
    of one sweep hold only that baseline's points."""
    from viewer.experiments import sweeps
    from viewer.views.experiments import ExperimentsView

    frame = parse_exp_show(json.loads(EXP_SHOW_SAMPLE.read_text()), METRICS_FILE)
    found = {sweep.baseline: sweep for sweep in sweeps(frame)}
    assert set(found) == {"master", "708e939"}
    assert found["master"].parameter == "param:sampling.temp"
    assert list(found["master"].rows["name"]) == ["master", "terse-farl", "eight-wins"]
    assert list(found["master"].rows["x"]) == [0.3, 0.5, 1.0]
    assert list(found["708e939"].rows["name"]) == ["risen-mush", "708e939"]
    column = ExperimentsView(root=Path("."))._sweep(list(found.values()), headline_metric_columns(frame))
    overlay = column[1].object  # the plot of the first sweep (master)
    curves = [element for element in overlay.traverse(lambda element: element, [hv.Curve])]
    assert curves and all(list(curve.dimension_values(0)) == [0.3, 0.5, 1.0] for curve in curves)


def test_redraws_leave_no_old_models_in_the_document(tmp_path):
    """The Runs tab in one Bokeh document: after many filter, probe and question changes the document holds as many
    models and figures as after the first round (each redraw replaces its figure's contents or the figure), and
    the plots show the current filter's runs."""
    from bokeh.document import Document
    from bokeh.plotting import figure as Figure

    from viewer.views.points import MarginEntropyScatter, UmapExplorer
    from viewer.views.questions import QuestionDetails, QuestionScatter
    from viewer.views.runs import RunDrillDown

    root = write_viewer_project(tmp_path / "project", synthetic_analysis(30, 5, seed=1))
    store = RunStore(load_analysis(root))
    page = pn.Column(MarginEntropyScatter(store=store), UmapExplorer(store=store), QuestionScatter(store=store),
                     QuestionDetails(store=store), RunDrillDown(store=store, root=root))
    doc = Document()
    with pn.io.server.set_curdoc(doc):
        doc.add_root(page.get_root(doc))
        rounds = []
        for round_ in range(3):
            for correctness, probe, question in (("incorrect", "se", 1), ("correct", "accuracy", 2), ("all", "se", 3)):
                store.param.update(correctness=correctness, probe=probe)
                store.open_question("id", f"id-0000{question + round_ % 2}")
            rounds.append((len(doc.models), len(list(doc.select({"type": Figure})))))
        store.correctness = "incorrect"
        drawn = sum(int(np.sum(renderer.data_source.data["runs"])) for renderer in doc.select({"type": GlyphRenderer})
                    if "runs" in renderer.data_source.data and "umap_x" in renderer.data_source.data
                    and "ring" not in renderer.data_source.data)
    assert len(set(rounds)) == 1, rounds  # bounded: nothing accumulates
    assert rounds[0][1] == 3 + 3  # the two run plots, the questions' scatter, a heatmap per single-layer probe
    assert drawn == int((~store.table["correct"]).sum())


def test_store_drills_into_a_run_and_finds_the_run_nearest_a_click(store, project):
    """Opening a question drills into its first run; open_run opens another run's question too; nearest_run picks
    the filtered run within the tolerance of a click, else none; the loaders read that run's row and question."""
    from viewer.loaders import load_location_scores, load_question_tokens

    store.open_question("id", "id-00003")
    assert store.run == int(store.question_runs.index[0])
    other = int(store.table.index[(store.table["question_id"] == "ood-00029").to_numpy()][2])
    store.open_run(other)
    assert store.question == ("ood", "ood-00029") and store.run == other
    run = store.table.loc[other]
    x, y = "accuracy_probe_margin", "semantic_entropy"
    assert store.nearest_run(x, y, (run[x] + 0.001, run[y]), (0.01, 0.01)) == other
    assert store.nearest_run(x, y, (store.table[x].max() + 10, 0.0), (0.01, 0.01)) is None
    store.correctness = "correct" if not run["correct"] else "incorrect"  # filtered out: never picked
    assert store.nearest_run(x, y, (run[x], run[y]), (1e-9, 1e-9)) is None
    located = load_location_scores(project, other, len(store.table))
    assert located.scores.shape == (len(located.meta.probes), len(located.meta.positions), len(located.meta.layers))
    chosen = located.meta.chosen[0]
    assert located.scores[0, located.meta.positions.index(chosen.position), located.meta.layers.index(chosen.layer)] \
        == pytest.approx(0.5 + (run["accuracy_probe_prob"] - 0.5) * (2 / 3) * 0.8333, abs=1e-3)  # viewer_support
    tokens = load_question_tokens(project, "ood", "ood-00029")
    assert set(tokens["question_id"]) == {"ood-00029"} and len(tokens) == 4
    with pytest.raises(loaders.MissingArtifact, match="120 runs but analysis.parquet has 4"):
        load_location_scores(project, 0, 4)
