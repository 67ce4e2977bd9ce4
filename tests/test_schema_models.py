"""The JSON hand-offs' models (stages/lib/schema/) and the registry (stages/lib/registry.py).

The committed metrics files are read through their models and written back: the bytes must not move, since
evaluate.json, stability.json, cost_ratio.json and the cost records are DVC outputs whose hashes dvc.lock holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stages.lib import registry
from stages.lib.io.files import cost_record
from stages.lib.schema.tables import ANALYSIS_KEY, HIDDEN_INDEX, HiddenMeta, require_finite_hidden, validate_hidden
from stages.lib.schema.reports import (
    CostRatio,
    CostRecord,
    EvaluateReport,
    IncorrectMetrics,
    LabelMetrics,
    RangeChoice,
    Selection,
    StabilityReport,
)
from stages.lib.schema.machinery import SchemaError

METRICS = Path(__file__).resolve().parents[1] / "artifacts" / "metrics"
COMMITTED = [(METRICS / "evaluate.json", EvaluateReport), (METRICS / "stability.json", StabilityReport),
             (METRICS / "cost_ratio.json", CostRatio),
             *[(path, CostRecord) for path in sorted((METRICS / "cost").glob("*.json"))]]


@pytest.mark.parametrize("path, model", COMMITTED, ids=[path.name if path.parent == METRICS else f"cost/{path.name}"
                                                        for path, _ in COMMITTED])
def test_committed_files_round_trip_byte_for_byte(path, model):
    assert model.read(path).to_json() == path.read_text()


def test_committed_evaluate_json_is_every_registry_score_in_registry_order():
    report = EvaluateReport.read(METRICS / "evaluate.json")
    names = [score.name for score in registry.SCORES]
    assert all(list(by_score) == names for by_score in report.splits.values())
    assert list(report.settings.scores) == [score.name for score in registry.scores(label="incorrect")]
    assert list(report.settings.probes) == [f"{probe.name}_probe" for probe in registry.located_probes()]
    assert list(report.calibration["test"]) == [score.name for score in registry.calibrated()]
    # the selective-prediction areas belong to the scores of incorrect runs only
    for name, metrics in report.splits["test"].items():
        assert isinstance(metrics, IncorrectMetrics) == (registry.BY_NAME[name].label == "incorrect")
    stability = StabilityReport.read(METRICS / "stability.json")
    assert list(stability.splits["test"]) == [score.name for score in registry.stable_scores()]


def _evaluate() -> dict:
    return json.loads((METRICS / "evaluate.json").read_text())


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["test"]["accuracy_probe"].update(auroc="0.78"),
     "field `test.accuracy_probe.auroc`: Input should be a valid number, got '0.78'"),
    (lambda d: d["ood"]["se_probe"].pop("prr"), "missing field `ood.se_probe.prr`"),
    (lambda d: d["test"]["se_probe_high_se"].update(aurac=0.5), "unknown field `test.se_probe_high_se.aurac`"),
    (lambda d: d["settings"]["accuracy_probe"].update(layer=True),
     "field `settings.accuracy_probe.layer`: Input should be a valid integer, got True"),
    (lambda d: d["summary"]["test"].update(n_runs=1000.0), "field `summary.test.n_runs`"),
    (lambda d: d["early_warning"][2].pop("auroc"), "missing field `early_warning[2].auroc`"),
    (lambda d: d.update(tset={}), "unknown key `tset`"),
    (lambda d: d.pop("settings"), "missing field `settings`"),
])
def test_a_malformed_evaluate_json_names_the_file_and_the_field(tmp_path, edit, message):
    data = _evaluate()
    edit(data)
    path = tmp_path / "evaluate.json"
    path.write_text(json.dumps(data, indent=2))
    with pytest.raises(SchemaError) as raised:
        EvaluateReport.read(path)
    text = str(raised.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(SchemaError, match=r"stability.json: not found; run the stability stage"):
        StabilityReport.read(tmp_path / "stability.json", writer="stability")
    (tmp_path / "cost_ratio.json").write_text("{oops")
    with pytest.raises(SchemaError, match=r"cost_ratio.json: not valid JSON"):
        CostRatio.read(tmp_path / "cost_ratio.json")


def test_flattened_fields_are_written_in_their_place_and_gathered_back():
    record = CostRecord(stage="generate", wall_seconds=1.5, counters={"backend": "hf", "sequences": 3, "ok": True})
    assert list(json.loads(record.to_json())) == ["stage", "wall_seconds", "backend", "sequences", "ok"]
    again = CostRecord.parse(json.loads(record.to_json()), "record")
    assert again == record and again.counters["ok"] is True and again.counters["sequences"] == 3
    # evaluate.json's settings: other labels' descriptions after `scores`, probe locations before calibration_bins
    keys = list(_evaluate()["settings"])
    assert keys.index("se_probe_high_se") == keys.index("scores") + 1
    assert keys[-1] == "calibration_bins" and keys[-2] == "se_range_probe"


def test_selection_round_trip():
    selection = Selection.model_validate({
        "probes": {"accuracy_probe": {"label": "correct", "position": "slt", "layer": 2, "metric": "auroc",
                                      "val_score": 0.8, "C": 0.1},
                   "accuracy_range_probe": {"label": "correct", "position": "slt", "layer": 1, "layer_end": 2,
                                            "metric": "auroc", "val_score": 0.81, "C": 0.1,
                                            "candidates": [{"layer": 1, "layer_end": 2, "val_score": 0.81},
                                                           {"layer": 0, "layer_end": 0, "val_score": None}]}},
        "high_se_threshold": 0.5, "high_se_threshold_method": "median", "n_questions": {"test": 2, "train": 6},
        "n_runs": {"train": 24, "test": 8},
        "by_position": [{"probe": "accuracy", "position": "slt", "layer": 2, "metric": "auroc", "val_score": 0.8}],
        "val_scores": [{"probe": "accuracy", "position": "slt", "layer": 2, "metric": "auroc", "score": None}]})
    text = selection.to_json()
    assert list(json.loads(text))[:3] == ["accuracy_probe", "accuracy_range_probe", "high_se_threshold"]
    again = Selection.parse(json.loads(text), "selection.json")
    assert again == selection and again.to_json() == text
    assert isinstance(again.probes["accuracy_range_probe"], RangeChoice)
    broken = json.loads(text)
    broken["accuracy_range_probe"]["candidates"][1]["layer_end"] = "0"
    with pytest.raises(SchemaError, match=r"selection.json: field `accuracy_range_probe.candidates\[1\].layer_end`"):
        Selection.parse(broken, "selection.json")


def test_hidden_meta_and_the_array_it_describes():
    meta = HiddenMeta(positions=["tbg", "slt"], layers=[0, 2], hidden_size=3, dtype="float16", model="toy")
    assert list(json.loads(meta.to_json())) == ["positions", "layers", "hidden_size", "dtype", "model",
                                                "model_revision", "layer_0", "layer_i"]
    with pytest.raises(SchemaError, match=r"meta.json: field `positions`: .*repeated entry"):
        HiddenMeta.parse({**meta.model_dump(), "positions": ["slt", "slt"]}, "meta.json")
    with pytest.raises(SchemaError, match=r"meta.json: field `dtype`"):
        HiddenMeta.parse({**meta.model_dump(), "dtype": "float32"}, "meta.json")
    index = pd.DataFrame({"row": [0, 1], "question_id": ["a", "a"], "run_id": [0, 1], "sequence_length": [5, 6],
                          "think_end_fallback": [False, True]})
    assert [c.name for c in HIDDEN_INDEX.columns] == list(index.columns)
    array = np.zeros((2, 2, 2, 3), dtype=np.float16)
    validate_hidden(array, index, meta, "id.npy")
    with pytest.raises(SchemaError, match=r"id.npy: array shape \(2, 2, 3, 3\); expected .* \(2, 2, 2, 3\)"):
        validate_hidden(np.zeros((2, 2, 3, 3), dtype=np.float16), index, meta, "id.npy")
    with pytest.raises(SchemaError, match=r"id.npy: array dtype float32; expected float16"):
        validate_hidden(array.astype(np.float32), index, meta, "id.npy")
    require_finite_hidden(array, index, "id.npy", chunk_rows=1)
    array[1, 0, 1, 2] = np.inf  # what a float16 overflow leaves
    with pytest.raises(SchemaError, match=r"id.npy: non-finite hidden state in row 1 \(question_id='a' run_id=1\)"):
        require_finite_hidden(array, index, "id.npy", chunk_rows=1)


def test_cost_record_writes_python_numbers_and_checks_the_counters_cost_ratio_needs(tmp_path):
    with cost_record(tmp_path, "trace") as cost:
        cost.update(sequences=np.int64(4), tokens_processed=10, forward_passes=1, loss=np.float32(0.5))
    record = CostRecord.read(tmp_path / "cost" / "trace.json")
    assert record.counters == {"sequences": 4, "tokens_processed": 10, "forward_passes": 1, "loss": 0.5}
    assert type(record.counters["sequences"]) is int and record.wall_seconds >= 0
    with pytest.raises(SchemaError, match=r"generate.json \(as written by the generate stage\): missing field "
                                          r"`tokens_generated`"):
        with cost_record(tmp_path, "generate") as cost:
            cost.update(sequences=3)
    assert not (tmp_path / "cost" / "generate.json").exists()


# ---- the registry --------------------------------------------------------------------------------------------
def test_registry_entries_are_consistent():
    names = [score.name for score in registry.SCORES]
    assert len(set(names)) == len(names)
    for score in registry.SCORES:
        assert score.label in registry.LABELS and score.orientation in ("higher", "lower")
        assert (score.probe is not None) == (score.kind in ("hidden_state_probe", "range_probe")
                                             or score.name == "entropy_baseline")
        assert (score.kind == "range_probe") == (score.probe is not None and score.probe.range_of is not None)
        if score.calibrated:
            assert score.probe is not None and score.probe.target == "correct"
        if score.per_run:
            assert score.kind == "hidden_state_probe" and registry.TARGETS[score.probe.target].binary
    for probe in registry.probes():
        assert probe.target in registry.TARGETS
        if probe.range_of is not None:  # a range is searched at its single-layer probe's position, same target
            assert registry.probe(probe.range_of) in registry.layer_probes()
            assert registry.probe(probe.range_of).target == probe.target
    assert len({probe.file for probe in registry.probes()}) == len(registry.probes())
    entropy_columns = {column.name for column in registry.ANALYSIS.columns}
    assert all(score.name in entropy_columns for score in registry.scores(kind="entropy"))  # the viewer's y axes


def test_registry_keeps_the_outputs_names_and_order():
    """evaluate.json's keys, the probe files and the analysis columns as the committed run has them."""
    assert [score.name for score in registry.SCORES] == [
        "accuracy_probe", "se_probe", "semantic_entropy", "semantic_entropy_weighted", "naive_entropy",
        "mean_token_entropy", "entropy_baseline", "negative_sequence_loglik", "length_normalised_negative_loglik",
        "think_length", "negative_min_answer_logprob", "num_semantic_sets", "eigv", "degree", "eccentricity",
        "kernel_language_entropy", "deepconf_lowest_group", "deepconf_bottom_10", "deepconf_tail",
        "se_regression_probe", "accuracy_range_probe", "se_range_probe", "se_probe_high_se"]
    assert [probe.file for probe in registry.probes()] == [
        "accuracy_probe", "se_probe", "entropy_baseline", "se_regression_probe",
        "accuracy_range_probe", "se_range_probe"]
    assert [(probe.name, probe.target) for probe in registry.layer_probes()] == [
        ("accuracy", "correct"), ("se", "high_se"), ("se_regression", "semantic_entropy")]
    assert [column.name for column in registry.ANALYSIS.columns] == [
        "question_id", "run_id", "dataset", "split", "question", "gold", "text", "answer", "cluster_id", "n_clusters",
        "correct", "semantic_entropy", "semantic_entropy_weighted", "naive_entropy", "mean_token_entropy",
        "sequence_loglik", "accuracy_probe_prob", "accuracy_probe_margin", "se_probe_prob", "se_probe_margin",
        "high_se", "umap_x", "umap_y", "think_length", "truncated", "answer_source"]
    assert set(ANALYSIS_KEY) <= {column.name for column in registry.ANALYSIS.columns}


def test_labels_and_targets_by_hand():
    runs = pd.DataFrame({"correct": [True, False, True], "semantic_entropy": [0.1, 0.9, 0.5]})
    assert registry.LABELS["incorrect"](runs, 0.5).tolist() == [False, True, False]
    assert registry.LABELS["high_se"](runs, 0.5).tolist() == [False, True, False]  # strictly above the threshold
    assert registry.TARGETS["semantic_entropy"].values(runs, 0.5).tolist() == [0.1, 0.9, 0.5]
    assert registry.binary_targets() == ("correct", "high_se")


def test_a_lower_oriented_score_is_negated_so_higher_always_flags_the_label():
    from stages.lib.evaluation.scoring import score_runs

    runs = pd.DataFrame({"hidden_row": [0, 1, 2], "sequence_loglik": [-3.0, -1.0, -2.0]})
    loglik = registry.Score("sequence_loglik", "incorrect", "baseline", "sequence log-likelihood",
                            "sequence_loglik of the run (higher = more confident)",
                            lambda inputs: inputs.column("sequence_loglik"), orientation="lower")
    negated = registry.BY_NAME["negative_sequence_loglik"]
    scores = score_runs(runs, None, (), (), {}, entries=(loglik, negated))
    assert scores["sequence_loglik"].tolist() == scores["negative_sequence_loglik"].tolist() == [3.0, 1.0, 2.0]


def test_metric_models_tell_the_labels_apart():
    record = {"label": "high_se", "n_runs": 0, "n_questions": 0, "n_positive": 0, "auroc": None, "auroc_ci_low": None,
              "auroc_ci_high": None, "auroc_p_value": None, "auprc": None, "auprc_ci_low": None, "auprc_ci_high": None,
              "auprc_p_value": None, "auprc_chance": None, "bootstrap_resamples_used": 0, "note": "empty"}
    assert LabelMetrics(**record).label == "high_se"
    with pytest.raises(ValueError):
        IncorrectMetrics(**record, aurac=None, aurc=None, prr=None)  # an IncorrectMetrics is for `incorrect` only
