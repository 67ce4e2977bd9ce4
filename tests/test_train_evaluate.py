"""train_probes and evaluate on synthetic fixtures in tmp_path.

The hidden array is noise except at (think_end, layer 2), where dimension 0 is shifted for correct runs,
and (slt, layer 1), where dimension 1 follows the question's semantic entropy. Hidden rows are stored in a
shuffled order, so a wrong row mapping would erase the signal.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from stages import cost_ratio, evaluate, stability, train_probes
from stages.lib.errors import UserError
from stages.lib.probes import dataset as dataset_lib
from stages.lib import registry
from stages.lib.probes import selection
from stages.lib.hidden.store import write_hidden
from stages.lib.params import parse_params
from stages.lib.probes.store import load_location_probes, load_probes
from stages.lib.probes.linear import SingleClassError
from stages.lib.questions.sources import write_questions
from stages.lib.schema.tables import (
    AUROC_BY_LAYER,
    DIFFICULTY,
    EARLY_WARNING,
    RELIABILITY,
    RISK_COVERAGE,
    ROC,
    QUESTION_SPLITS,
    STABILITY_PLOT,
    HiddenMeta,
)
from stages.lib.schema.reports import CostRecord
from stages.lib.schema.machinery import SchemaError, validate_frame

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
POSITIONS = ["tbg", "think_end", "slt"]
LAYERS = [0, 1, 2]
HIDDEN_SIZE = 6
RUNS_PER_QUESTION = 4


def make_params(root: Path, **probe_overrides):
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    raw["paths"] = {name: str(root / name) for name in raw["paths"]}
    raw["probes"].update({"c_grid": [0.1, 1.0], "cv_folds": 3, "max_iter": 500, **probe_overrides})
    raw["evaluate"].update({"bootstrap": 50, "permutations": 50})
    return parse_params(raw)


def make_dataset(n_questions: int, dataset: str, seed: int):
    """(runs, semantic entropy, hidden array, hidden index) for one dataset, one row per run."""
    rng = np.random.default_rng(seed)
    question_ids = [f"{dataset}-{i:03d}" for i in range(n_questions)]
    difficulty = rng.uniform(0.1, 0.9, n_questions)  # P(correct) of each question
    semantic_entropy_per_question = np.round(rng.uniform(0, 1.4, n_questions), 3)
    question_id = np.repeat(np.array(question_ids, dtype=object), RUNS_PER_QUESTION)
    question_index = np.repeat(np.arange(n_questions), RUNS_PER_QUESTION)
    n_runs = len(question_id)
    correct = rng.random(n_runs) < difficulty[question_index]
    semantic_entropy = semantic_entropy_per_question[question_index]
    runs = pd.DataFrame({
        "question_id": question_id, "run_id": np.tile(np.arange(RUNS_PER_QUESTION), n_questions),
        "dataset": dataset, "correct": correct,
        "mean_token_entropy": rng.normal(1.0, 0.3, n_runs) - 0.3 * correct,
        "sequence_loglik": rng.normal(-20, 3, n_runs) + 3 * correct,
        "n_generated": rng.integers(10, 40, n_runs),
        "think_start_index": pd.array([0] * n_runs, dtype="Int64"),
        "think_end_index": pd.array(np.where(correct, 6, 7), dtype="Int64"),
        "truncated": False, "answer_source": "boxed",
    })
    runs["token_logprobs"] = [rng.normal(-0.5, 0.2, length) - 1.0 * (not is_correct) * (np.arange(length) > 7)
                              for length, is_correct in zip(runs["n_generated"], correct)]
    runs["token_topk_logprob_mean"] = [logprobs - 2.0 for logprobs in runs["token_logprobs"]]
    entropy = pd.DataFrame({
        "question_id": question_id, "run_id": runs["run_id"], "cluster_id": rng.integers(0, 2, n_runs),
        "n_clusters": 2, "semantic_entropy": semantic_entropy,
        "semantic_entropy_weighted": semantic_entropy + rng.normal(0, 0.05, n_runs),
        "naive_entropy": rng.normal(1, 0.2, n_runs),
        "num_semantic_sets": 2, "eigv": 2.0 + rng.normal(0, 0.1, n_runs), "degree": 0.5, "eccentricity": 1.0,
        "kernel_language_entropy": 0.6 + 0.2 * semantic_entropy,
    })
    hidden = rng.normal(0, 1, (n_runs, len(POSITIONS), len(LAYERS), HIDDEN_SIZE))
    hidden[:, 1, 2, 0] += 3.0 * correct        # (think_end, layer 2) knows correctness
    hidden[:, 2, 1, 1] += 4.0 * semantic_entropy  # (slt, layer 1) knows semantic entropy
    order = rng.permutation(n_runs)  # hidden row of run i is position of i in `order`
    index = pd.DataFrame({"row": np.arange(n_runs), "question_id": question_id[order],
                          "run_id": runs["run_id"].to_numpy()[order], "sequence_length": 50,
                          "think_end_fallback": False})
    return runs, entropy, hidden[order].astype(np.float16), index


def write_fixture(params, n_id=60, n_ood=20, edit_id=None):
    """Write runs, SE and hidden files for id and ood; ``edit_id(runs, entropy)`` may change the id tables."""
    for dataset, n_questions, seed in (("id", n_id, 0), ("ood", n_ood, 1)):
        runs, entropy, hidden, index = make_dataset(n_questions, dataset, seed)
        if dataset == "id" and edit_id is not None:
            edit_id(runs, entropy)
        # arithmetic chains of 2, 3 or 4 terms by question index: the difficulty breakdown's n_terms
        question_ids = runs["question_id"].unique()
        Path(params.paths.questions).mkdir(parents=True, exist_ok=True)
        write_questions(pd.DataFrame({"question_id": question_ids, "dataset": dataset,
                                      "question": ["+".join(["1"] * (2 + i % 3)) for i in range(len(question_ids))],
                                      "gold": [str(2 + i % 3) for i in range(len(question_ids))], "level": None}),
                        Path(params.paths.questions) / f"{dataset}.jsonl")
        for directory, frame in ((params.paths.runs, runs), (params.paths.semantic_entropy, entropy)):
            Path(directory).mkdir(parents=True, exist_ok=True)
            frame.to_parquet(Path(directory) / f"{dataset}.parquet", index=False)
        write_hidden(params.paths.hidden, dataset, hidden, index,
                     HiddenMeta(positions=POSITIONS, layers=LAYERS, hidden_size=HIDDEN_SIZE, dtype="float16",
                                model="synthetic"))


def test_questions_are_split_not_runs():
    splits = dataset_lib.split_questions([f"q{i}" for i in range(50)] * 3, ["o1", "o2"], 0.6, 0.2, seed=0)
    validate_frame(splits, QUESTION_SPLITS.columns, "splits")
    assert splits["question_id"].is_unique
    assert splits["split"].value_counts().to_dict() == {"train": 30, "val": 10, "test": 10, "ood": 2}
    again = dataset_lib.split_questions([f"q{i}" for i in reversed(range(50))], ["o2", "o1"], 0.6, 0.2, seed=0)
    pd.testing.assert_frame_equal(splits, again)  # depends on the set of questions and the seed only
    other_seed = dataset_lib.split_questions([f"q{i}" for i in range(50)], [], 0.6, 0.2, seed=1)
    assert set(other_seed.query("split == 'train'").question_id) != set(splits.query("split == 'train'").question_id)
    with pytest.raises(UserError, match="empty `val` split"):
        dataset_lib.split_questions(["a", "b", "c"], [], 0.6, 0.1, seed=0)


def test_train_probes_selects_the_signal_location_on_val(tmp_path):
    params = make_params(tmp_path)
    write_fixture(params)
    train_probes.run(params)
    probes_dir = Path(params.paths.probes)
    selection = json.loads((probes_dir / "selection.json").read_text())
    assert (selection["accuracy_probe"]["position"], selection["accuracy_probe"]["layer"]) == ("think_end", 2)
    assert (selection["se_probe"]["position"], selection["se_probe"]["layer"]) == ("slt", 1)
    assert len(selection["val_scores"]) == 3 * len(POSITIONS) * len(LAYERS)
    assert selection["high_se_threshold_method"] == "best_split"
    regression = selection["se_regression_probe"]  # ridge on SE itself, chosen by val Spearman
    assert (regression["position"], regression["layer"], regression["metric"]) == ("slt", 1, "spearman")
    assert regression["val_score"] > 0.5
    # early warning: the best layer at every position, per probe; the signal's layer where there is one
    by_position = {(row["probe"], row["position"]): row for row in selection["by_position"]}
    assert len(by_position) == 3 * len(POSITIONS)
    assert by_position[("accuracy", "think_end")]["layer"] == 2 and by_position[("se", "slt")]["layer"] == 1
    # layer ranges at the single-layer probe's position: every contiguous range of the 3 layers was a candidate
    accuracy_range = selection["accuracy_range_probe"]
    assert accuracy_range["position"] == "think_end" and accuracy_range["layer"] <= 2 <= accuracy_range["layer_end"]
    assert {(c["layer"], c["layer_end"]) for c in accuracy_range["candidates"]} == {
        (0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2)}
    assert accuracy_range["val_score"] == max(c["val_score"] for c in accuracy_range["candidates"])

    splits = pd.read_parquet(probes_dir / "splits.parquet")
    assert splits.groupby("question_id")["split"].nunique().max() == 1  # no question in two splits
    assert set(splits.query("dataset == 'ood'")["split"]) == {"ood"}
    assert splits.query("dataset == 'id'")["split"].value_counts().to_dict() == {"train": 36, "val": 12, "test": 12}

    probes = load_probes(probes_dir)[0]
    accuracy_probe = probes["accuracy"]
    assert (accuracy_probe.label_name, accuracy_probe.position, accuracy_probe.layer) == ("correct", "think_end", 2)
    baseline = probes["entropy_baseline"]
    assert baseline.feature == "mean_token_entropy" and baseline.n_features_in_ == 1
    assert baseline.coef_[0] < 0  # higher token entropy, less likely correct (as built)
    cost = json.loads((Path(params.paths.metrics) / "cost" / "train_probes.json").read_text())
    n_ranges = 2 * 3  # accuracy and SE range probes, each over (0,1), (1,2), (0,2); single layers are reused
    assert cost["probes_fitted"] == 3 * len(POSITIONS) * len(LAYERS) + n_ranges + 1 and cost["wall_seconds"] >= 0
    ranged = probes["accuracy_range"]
    assert ranged.n_features_in_ == HIDDEN_SIZE * (ranged.layer_end - ranged.layer + 1)
    # every probe is a JSON + npz pair; the location probes share one pair
    stems = ["accuracy_probe", "accuracy_range_probe", "entropy_baseline", "location_probes", "se_probe",
             "se_range_probe", "se_regression_probe"]
    assert sorted(p.name for p in probes_dir.iterdir()) == sorted(
        [f"{stem}{suffix}" for stem in stems for suffix in (".json", ".npz")] + ["selection.json", "splits.parquet"])
    location = load_location_probes(probes_dir)
    assert len(location) == 3 * len(POSITIONS) * len(LAYERS)
    assert location[("correct", "think_end", 2)].C_ == accuracy_probe.C_


def test_high_se_threshold_uses_train_questions_only(tmp_path):
    params = make_params(tmp_path)
    write_fixture(params)
    data = dataset_lib.load_dataset(params, "id")
    splits = dataset_lib.split_questions(data.runs["question_id"], [], 0.6, 0.2, params.seed)
    runs = dataset_lib.attach_splits(data.runs, splits, "id")
    kwargs = dict(hidden=data.hidden, positions=data.positions, layers=data.layers,
                  probe_params=params.probes, seed=params.seed)
    baseline = selection.train(runs, **kwargs).selection.high_se_threshold

    is_test = runs["split"] == "test"
    shifted = runs.assign(semantic_entropy=np.where(is_test, runs["semantic_entropy"] * 3 + 5,
                                                    runs["semantic_entropy"]))
    assert selection.train(shifted, **kwargs).selection.high_se_threshold == baseline
    train_only = runs.assign(semantic_entropy=np.where(runs["split"] == "train", runs["semantic_entropy"] + 1,
                                                       runs["semantic_entropy"]))
    assert selection.fit_high_se_threshold(train_only.query("split == 'train'")["question_id"],
                                              train_only.query("split == 'train'")["semantic_entropy"],
                                              "best_split") == pytest.approx(baseline + 1)


def test_evaluate_writes_metrics_and_plots(tmp_path):
    params = make_params(tmp_path)
    write_fixture(params)
    train_probes.run(params)
    report = evaluate.run(params)
    text = (Path(params.paths.metrics) / "evaluate.json").read_text()
    assert text == report.to_json()
    written = json.loads(text)
    assert list(written) == ["test", "ood", "paired_differences", "answer_extraction", "by_difficulty", "summary",
                             "calibration", "se_regression", "settings", "early_warning"]
    # paired differences: every pair on test then ood, the difference of the two AUROCs reported above, its CI
    # around it and a p-value of the two-sided bootstrap test (floor 2 / 51 with 50 resamples)
    paired = written["paired_differences"]
    assert [(row["split"], row["a"], row["b"]) for row in paired] == [
        (split, a, b) for split in ("test", "ood") for a, b in registry.PAIRED_COMPARISONS]
    for row in paired:
        assert row["difference"] == pytest.approx(written[row["split"]][row["a"]]["auroc"]
                                                  - written[row["split"]][row["b"]]["auroc"])
        assert row["ci_low"] <= row["difference"] <= row["ci_high"] and 2 / 51 <= row["p_value"] <= 1
        assert row["bootstrap_resamples_used"] == 50 and row["label"].count(" - ") == 1
    # the accuracy probe reads the built-in signal, the entropies are noise: a clear, significant difference
    accuracy_vs_se = next(row for row in paired if row["split"] == "test" and (row["a"], row["b"]) ==
                          ("accuracy_probe", "semantic_entropy"))
    assert accuracy_vs_se["ci_low"] > 0 and accuracy_vs_se["p_value"] < 0.05
    assert {split: counts["n_runs"] for split, counts in written["answer_extraction"].items()} == {
        "train": 36 * RUNS_PER_QUESTION, "val": 12 * RUNS_PER_QUESTION, "test": 12 * RUNS_PER_QUESTION,
        "ood": 20 * RUNS_PER_QUESTION}
    assert written["answer_extraction"]["test"]["n_truncated_in_think"] == 0
    by_difficulty = pd.read_csv(Path(params.paths.plots) / "auroc_by_difficulty.csv")
    validate_frame(by_difficulty, DIFFICULTY.columns, "auroc_by_difficulty.csv")
    assert len(by_difficulty) == len(written["by_difficulty"]) and set(by_difficulty["value"]) == {2, 3, 4}
    assert set(by_difficulty["difficulty"]) == {"n_terms"}
    assert set(by_difficulty["score"]) == {score.name for score in registry.SCORES if score.headline}
    runs_per_split = by_difficulty.groupby(["split", "score"])["n_runs"].sum()
    assert (runs_per_split.loc["test"] == 12 * RUNS_PER_QUESTION).all()
    for split in ("test", "ood"):
        assert list(written[split]) == [score.name for score in registry.SCORES]  # registry order
        for score, record in written[split].items():
            assert 0 <= record["auroc"] <= 1 and 0 < record["auprc"] <= 1
            assert record["auroc_ci_low"] <= record["auroc"] <= record["auroc_ci_high"]
            assert record["auprc_ci_low"] <= record["auprc"] <= record["auprc_ci_high"]
            assert 1 / 51 <= record["auroc_p_value"] <= 1
            assert record["label"] == registry.BY_NAME[score].label
            if record["label"] == "incorrect":
                # aurac is the paper's 20-level sum (at most 18/19); the all-n area is 1 - aurc
                assert 0 <= record["aurac"] <= 18 / 19 + 1e-12 and record["prr"] <= 1
        assert written["calibration"][split]["accuracy_probe"]["n_runs"] == written[split]["accuracy_probe"]["n_runs"]
        assert 0 <= written["calibration"][split]["accuracy_probe"]["ece"] <= 1
    # the built-in signal: the probe ranks incorrect runs first, so it beats random rejection
    assert written["test"]["accuracy_probe"]["prr"] > 0.3
    assert written["test"]["se_regression_probe"]["aurac"] is not None
    assert written["se_regression"]["test"]["spearman_questions"] > 0.5
    assert written["test"]["accuracy_probe"]["auroc"] > 0.8  # the built-in signal flags incorrect runs
    assert written["test"]["accuracy_probe"]["auroc_p_value"] < 0.05
    assert written["test"]["accuracy_probe"]["n_runs"] == 12 * RUNS_PER_QUESTION
    summary = written["summary"]["test"]
    assert summary["n_correct"] + summary["n_incorrect"] == summary["n_runs"]
    assert summary["mean_p_correct_on_correct"] > summary["mean_p_correct_on_incorrect"]
    assert written["settings"]["accuracy_probe"] == {"position": "think_end", "layer": 2, "layer_end": None}

    by_layer = pd.read_csv(Path(params.paths.plots) / "auroc_by_layer.csv")
    validate_frame(by_layer, AUROC_BY_LAYER.columns, "auroc_by_layer.csv")
    assert len(by_layer) == 2 * len(POSITIONS) * len(LAYERS) * 3
    assert set(by_layer["split"]) == {"val", "test", "ood"} and set(by_layer["probe"]) == {"accuracy", "se"}
    # the per-layer probes are the ones train_probes selected from: same val AUROC
    selection = json.loads((Path(params.paths.probes) / "selection.json").read_text())
    chosen = by_layer.query("probe == 'accuracy' and split == 'val' and position == 'think_end' and layer == 2")
    assert chosen["auroc"].item() == pytest.approx(selection["accuracy_probe"]["val_score"])

    warning = pd.read_csv(Path(params.paths.plots) / "early_warning.csv")
    validate_frame(warning, EARLY_WARNING.columns, "early_warning.csv")
    assert len(warning) == 2 * len(POSITIONS) * 2  # accuracy and SE probes x positions x (test, ood)
    think_end = warning.query("probe == 'accuracy' and position == 'think_end' and split == 'test'").iloc[0]
    assert think_end["fraction"] == 1.0 and think_end["layer"] == 2 and think_end["auroc"] > 0.8
    assert warning.query("position == 'slt'")["fraction"].isna().all()
    risk = pd.read_csv(Path(params.paths.plots) / "risk_coverage.csv")
    validate_frame(risk, RISK_COVERAGE.columns, "risk_coverage.csv")
    incorrect_scores = {score.name for score in registry.scores(label="incorrect")}
    assert set(risk["score"]) == incorrect_scores and risk["coverage"].max() == 1.0
    reliability = pd.read_csv(Path(params.paths.plots) / "reliability.csv")
    validate_frame(reliability, RELIABILITY.columns, "reliability.csv")
    assert len(reliability) == 2 * 2 * params.evaluate.calibration_bins  # 2 probes x (test, ood) x bins

    roc = pd.read_csv(Path(params.paths.plots) / "roc.csv")
    validate_frame(roc, ROC.columns, "roc.csv")
    assert set(roc["score"]) == incorrect_scores and set(roc["split"]) == {"test", "ood"}
    assert (Path(params.paths.metrics) / "cost" / "evaluate.json").exists()


def test_single_class_test_split_and_missing_ood_give_null_metrics_with_notes(tmp_path):
    params = make_params(tmp_path)
    ids = [f"id-{i:03d}" for i in range(60)]
    splits = dataset_lib.split_questions(ids, [], params.probes.train_fraction, params.probes.val_fraction,
                                          params.seed)
    test_questions = set(splits.query("split == 'test'")["question_id"])

    def all_test_runs_correct(runs, entropy):
        runs.loc[runs["question_id"].isin(test_questions), "correct"] = True

    write_fixture(params, n_ood=0, edit_id=all_test_runs_correct)
    train_probes.run(params)
    report = evaluate.run(params)

    test_record = report.splits["test"]["accuracy_probe"]
    assert test_record.auroc is None and test_record.auroc_p_value is None and test_record.auprc is None
    assert "`incorrect` = False" in test_record.note
    assert report.summary["test"].accuracy == 1.0
    assert report.splits["test"]["se_probe_high_se"].auroc is not None  # high-SE labels still vary

    for record in report.splits["ood"].values():
        assert record.auroc is None and "no runs in split `ood`" in record.note
    assert report.summary["ood"].n_runs == 0 and report.summary["ood"].accuracy is None
    assert report.calibration["ood"]["accuracy_probe"].ece is None
    assert report.se_regression["ood"].spearman_runs is None
    # a paired difference is null, with its scores' note, where one of them is undefined
    for row in report.paired_differences:
        assert row.difference is None and row.ci_low is None and row.p_value is None and row.note
    assert report.answer_extraction["ood"].n_runs == 0 and report.by_difficulty[0].split == "test"
    assert test_record.aurac == pytest.approx(18 / 19) and test_record.prr is None  # all correct: the maximum
    by_layer = pd.read_csv(Path(params.paths.plots) / "auroc_by_layer.csv")
    assert "ood" not in set(by_layer["split"])
    # the test split is single-class for the accuracy probe only: null there, defined for the SE probe
    test_rows = by_layer.query("split == 'test'")
    assert test_rows.query("probe == 'accuracy'")["auroc"].isna().all()
    assert test_rows.query("probe == 'se'")["auroc"].notna().all()


def test_single_class_val_labels_fail_naming_split_and_label(tmp_path):
    params = make_params(tmp_path)
    ids = [f"id-{i:03d}" for i in range(60)]
    splits = dataset_lib.split_questions(ids, [], params.probes.train_fraction, params.probes.val_fraction,
                                          params.seed)
    val_questions = set(splits.query("split == 'val'")["question_id"])

    def all_val_runs_correct(runs, entropy):
        runs.loc[runs["question_id"].isin(val_questions), "correct"] = True

    write_fixture(params, edit_id=all_val_runs_correct)
    with pytest.raises(SingleClassError, match=r"label `correct` in split `val`"):
        train_probes.run(params)
    assert not Path(params.paths.probes).exists()


def test_mismatched_inputs_fail_naming_the_files(tmp_path):
    params = make_params(tmp_path)

    def drop_a_run(runs, entropy):
        entropy.drop(index=entropy.index[0], inplace=True)

    write_fixture(params, edit_id=drop_a_run)
    with pytest.raises(SchemaError, match=r"runs/id.parquet: 1 runs absent from .*semantic_entropy/id.parquet"):
        train_probes.run(params)


def test_stability_refits_on_each_seed_and_reports_the_spread(tmp_path):
    params = make_params(tmp_path)
    params = params.model_copy(update={"stability": params.stability.model_copy(update={"seeds": 3, "c_grid": (1.0,)})})
    write_fixture(params)
    report = stability.run(params)
    table = pd.read_csv(Path(params.paths.plots) / "stability.csv")
    validate_frame(table, STABILITY_PLOT.columns, "stability.csv")
    assert sorted(set(table["seed"])) == [params.seed, params.seed + 1, params.seed + 2]
    assert len(table) == 3 * 2 * len(registry.stable_scores())  # seeds x (test, ood) x scores
    assert "accuracy_range_probe" not in set(table["score"]) and "se_probe_high_se" not in set(table["score"])
    record = report.splits["test"]["accuracy_probe"]
    values = table.query("split == 'test' and score == 'accuracy_probe'")["auroc"].to_numpy()
    assert record.values == pytest.approx(list(values)) and record.n_seeds == 3
    assert record.mean == pytest.approx(values.mean()) and record.std == pytest.approx(values.std(ddof=1))
    assert record.min <= record.mean <= record.max and record.mean > 0.8  # the built-in signal
    # different splits give different test sets: the spread is real, not one number repeated
    assert record.std > 0
    # OOD runs are the same for every seed, so a fixed score's OOD AUROC does not move
    assert report.splits["ood"]["semantic_entropy"].std == pytest.approx(0.0, abs=1e-12)
    text = (Path(params.paths.metrics) / "stability.json").read_text()
    assert text == report.to_json() and list(json.loads(text))[:2] == ["test", "ood"]
    assert report.skipped_seeds == []


def test_stability_skips_a_seed_whose_split_has_a_single_class_val(tmp_path):
    params = make_params(tmp_path)
    params = params.model_copy(update={"stability": params.stability.model_copy(update={"seeds": 2, "c_grid": (1.0,)})})
    ids = [f"id-{i:03d}" for i in range(60)]
    second = dataset_lib.split_questions(ids, [], params.probes.train_fraction, params.probes.val_fraction,
                                          params.seed + 1)
    second_val = set(second.query("split == 'val'")["question_id"])

    def all_second_val_runs_correct(runs, entropy):
        runs.loc[runs["question_id"].isin(second_val), "correct"] = True

    write_fixture(params, edit_id=all_second_val_runs_correct)
    report = stability.run(params)
    assert [s.seed for s in report.skipped_seeds] == [params.seed + 1]
    assert "label `correct` in split `val`" in report.skipped_seeds[0].reason
    assert report.splits["test"]["accuracy_probe"].n_seeds == 1


def test_cost_ratio_by_hand(tmp_path):
    params = make_params(tmp_path)
    cost_dir = Path(params.paths.metrics) / "cost"
    cost_dir.mkdir(parents=True)
    records = {"generate": (20.0, {"backend": "hf", "sequences": 100, "tokens_generated": 3000}),
               "semantic_entropy": (5.0, {"method": "math", "questions": 10, "equivalence_checks": 40}),
               "trace": (2.0, {"sequences": 100, "tokens_processed": 5000})}
    for stage, (seconds, counters) in records.items():
        (cost_dir / f"{stage}.json").write_text(CostRecord(stage=stage, wall_seconds=seconds,
                                                           counters=counters).to_json())
    report = cost_ratio.run(params)
    # SE: (20 + 5) s / 10 questions = 2.5 s; probe: 2 s / 100 runs = 0.02 s -> 125x; tokens 300 vs 50 -> 6x
    assert report.se_seconds_per_question == pytest.approx(2.5)
    assert report.probe_seconds_per_question == pytest.approx(0.02)
    assert report.seconds_ratio == pytest.approx(125.0) and report.tokens_ratio == pytest.approx(6.0)
    assert report.equivalence_checks_per_question == pytest.approx(4.0)
    assert (Path(params.paths.metrics) / "cost_ratio.json").read_text() == report.to_json()
    (cost_dir / "trace.json").write_text(json.dumps({"stage": "trace", "wall_seconds": 1.0}))
    with pytest.raises(SchemaError, match=r"cost/trace.json: missing field `sequences`"):
        cost_ratio.run(params)
    (cost_dir / "trace.json").write_text(json.dumps({"stage": "trace", "wall_seconds": "1.0", "sequences": 1,
                                                     "tokens_processed": 5}))
    with pytest.raises(SchemaError, match=r"cost/trace.json: field `wall_seconds`: Input should be a valid number"):
        cost_ratio.run(params)
    (cost_dir / "generate.json").unlink()
    with pytest.raises(SchemaError, match=r"cost/generate.json: not found; run the generate stage"):
        cost_ratio.run(params)


def test_a_new_score_is_one_registry_entry_and_one_function(tmp_path, monkeypatch):
    """Appending a Score to the registry is all it takes for evaluate (every table and plot) and stability."""
    def answer_length(inputs):  # longer answers: more likely wrong, in this fixture no more than chance
        return inputs.column("n_generated")

    entry = registry.Score("answer_length", "incorrect", "baseline", "answer length", "tokens the run generated",
                           answer_length)
    monkeypatch.setattr(registry, "SCORES", (*registry.SCORES, entry))
    params = make_params(tmp_path)
    params = params.model_copy(update={"stability": params.stability.model_copy(update={"seeds": 2, "c_grid": (1.0,)})})
    write_fixture(params)
    train_probes.run(params)
    report = evaluate.run(params)
    for split in ("test", "ood"):
        assert list(report.splits[split])[-1] == "answer_length"
        assert 0 <= report.splits[split]["answer_length"].auroc <= 1
    assert report.settings.scores["answer_length"] == "tokens the run generated"
    for name in ("roc.csv", "risk_coverage.csv"):
        assert "answer_length" in set(pd.read_csv(Path(params.paths.plots) / name)["score"])
    assert "answer_length" in stability.run(params).splits["test"]


def test_question_difficulty_and_answer_counts_by_hand():
    from stages.lib.evaluation.scoring import answer_extraction, question_difficulty

    chains = pd.DataFrame({"question_id": ["a", "b"], "question": ["1+2", "3-1+4"], "level": pd.array([None, None],
                                                                                                    dtype="Int64")})
    kind, terms = question_difficulty(chains)
    assert kind == "n_terms" and terms.to_dict() == {"a": 2, "b": 3}
    # a level wins; questions without one are left out
    math = pd.DataFrame({"question_id": ["p", "q", "r"], "question": ["Solve x.", "1+2", "Find y."],
                         "level": pd.array([3, None, 5], dtype="Int64")})
    kind, levels = question_difficulty(math)
    assert kind == "level" and levels.to_dict() == {"p": 3, "r": 5}
    assert question_difficulty(pd.DataFrame({"question_id": ["g"], "question": ["How many apples?"],
                                             "level": pd.array([None], dtype="Int64")})) is None
    runs = pd.DataFrame({"truncated": [True, True, False, False, False],
                         "answer_source": ["truncated_in_think", "boxed", "none", "last_number_fallback", "boxed"]})
    assert answer_extraction(runs).model_dump() == {"n_runs": 5, "n_truncated": 2, "n_truncated_in_think": 1,
                                                    "n_no_answer": 1, "n_last_number_fallback": 1}


@pytest.mark.parametrize("screen_method", ["logistic", "mean_difference"])
def test_screening_cross_validates_only_the_best_locations_and_still_finds_the_signal(tmp_path, screen_method):
    """probes.screen_locations: every location screened once (a fit at screen_c, or the difference-in-means
    direction), C cross-validated at the N best on val only, the chosen probe the best of those; layer ranges only
    through the chosen layer; float32 fits."""
    params = make_params(tmp_path, screen_locations=2, screen_c=0.5, dtype="float32", c_grid=[0.01, 0.1, 1.0],
                         screen_method=screen_method)
    write_fixture(params)
    trained = train_probes.run(params)
    chosen = trained.selection.probes
    assert (chosen["accuracy_probe"].position, chosen["accuracy_probe"].layer) == ("think_end", 2)
    assert (chosen["se_probe"].position, chosen["se_probe"].layer) == ("slt", 1)
    location = load_location_probes(params.paths.probes)
    assert {probe.C_ for probe in location.values()} == {0.5}  # the screening fits, one C
    expected = {"logistic", "ridge"} if screen_method == "logistic" else {"mean_difference"}
    assert {probe.kind for probe in location.values()} == expected
    accuracy = load_probes(params.paths.probes)[0]["accuracy"]
    assert accuracy.kind == "logistic"  # the refit at the best locations is a real fit either way
    assert set(accuracy.cv_scores_) == {0.01, 0.1, 1.0} and accuracy.dtype == "float32"  # cross-validated
    assert chosen["accuracy_probe"].C == accuracy.C_
    for name in ("accuracy_range_probe", "se_range_probe"):
        layer = chosen[name.replace("_range", "")].layer
        assert all(c.layer <= layer <= c.layer_end for c in chosen[name].candidates)
    # 3 labels x 9 screening fits, 3 labels x 2 cross-validated refits, the ranges through the chosen layers
    n_ranges = sum(len(chosen[name].candidates) - 1 for name in ("accuracy_range_probe", "se_range_probe"))
    assert trained.n_fitted == 3 * len(POSITIONS) * len(LAYERS) + 3 * 2 + n_ranges + 1
