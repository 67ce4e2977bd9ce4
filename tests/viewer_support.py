"""Helpers shared by the viewer tests and tests/benchmarks/bench_viewer.py (not a test module).

``write_viewer_project`` lays out a project directory the viewer can read (params.yaml with `paths:`, a synthetic
analysis.parquet matching ANALYSIS.columns, evaluate.json, stability.json, cost_ratio.json and every plots CSV,
each checked against its schema columns); ``ViewerServer`` serves
``viewer.app.create_app(root)`` for it in a subprocess on 127.0.0.1 and always stops it; ``launch_chromium``
starts Debian's headless Chromium through Playwright.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Self

import numpy as np
import pandas as pd
import yaml

from stages.lib import registry
from stages.lib.registry import ANALYSIS
from stages.lib.schema.tables import (
    AUROC_BY_LAYER,
    EARLY_WARNING,
    LOCATION_SCORES_FILE,
    LOCATION_SCORES_META_FILE,
    RELIABILITY,
    RISK_COVERAGE,
    ROC,
    STABILITY_PLOT,
    TOKENS,
    TOKENS_ROW_GROUP_RUNS,
    LocationScoresMeta,
    validate_location_scores,
)
from stages.lib.schema.reports import (
    COST_RATIO_FILE,
    EVALUATE_FILE,
    STABILITY_FILE,
    CostRatio,
    EvaluateReport,
    StabilityReport,
)
from stages.lib.schema.machinery import validate_frame

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCRIPT_ANSWER = "<script>alert(1)</script>"
# Would set window.__pwned if it ever reached the page as markup (an <img> runs onerror without being in view).
IMG_ANSWER = '<img src=x onerror="window.__pwned=1">'
POSITIONS = {"tbg": 0.0, "think_50": 0.5, "think_end": 1.0, "slt": None}  # traced position -> share of reasoning
# The registry's scores of incorrect runs (ROC, risk-coverage, stability rows) and its calibrated ones.
INCORRECT_SCORES = tuple(score.name for score in registry.scores(label="incorrect"))
CALIBRATED = tuple(score.name for score in registry.calibrated())
# The repository's own `paths:`, so a new output path cannot leave the synthetic project behind.
PATHS = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["paths"]


def synthetic_analysis(n_questions: int, runs_per_question: int = 10, seed: int = 0,
                       script_question: bool = True) -> pd.DataFrame:
    """An analysis table with ``n_questions * runs_per_question`` runs, shaped like the real one.

    A fifth of the questions are OOD; in-distribution questions are split 60/20/20. Answers cluster by value,
    correctness, SE and probe scores are consistent with each other. With ``script_question``, question 0's text,
    answers and think text contain ``<script>alert(1)</script>`` (and its cluster-0 answer is exactly that), and
    question 1's contain ``IMG_ANSWER`` (``<img src=x onerror=...>``) the same way.
    """
    rng = np.random.default_rng(seed)
    rows = []
    n_ood = max(1, n_questions // 5)
    for q in range(n_questions):
        dataset = "ood" if q >= n_questions - n_ood else "id"
        position = q / max(1, n_questions - n_ood)
        split = "ood" if dataset == "ood" else ("train" if position < 0.6 else "val" if position < 0.8 else "test")
        a, b, c = rng.integers(1, 20, size=3)
        question = f"{a}+{b}-{c}"
        gold = str(a + b - c)
        difficulty = rng.uniform(0.05, 0.9 if dataset == "id" else 1.0)
        wrong = rng.random(runs_per_question) < difficulty
        answers = [str(int(gold) + int(rng.choice([-2, -1, 1, 2]))) if w else gold for w in wrong]
        if script_question and q in (0, 1):
            payload = SCRIPT_ANSWER if q == 0 else IMG_ANSWER
            question = f"{question} {payload}"
            answers = [payload] * (runs_per_question // 2) + [gold] * (runs_per_question - runs_per_question // 2)
            wrong = np.array([answer != gold for answer in answers])
        values, cluster_ids, counts = np.unique(answers, return_inverse=True, return_counts=True)
        frequencies = counts / counts.sum()
        se = float(-(frequencies * np.log(frequencies)).sum())
        centre = rng.normal(0, 8, size=2)
        for run in range(runs_per_question):
            correct = not wrong[run]
            margin = rng.normal(1.5 if correct else -1.5, 2.0)
            se_margin = rng.normal(se * 2 - 1, 1.0)
            loglik = float(-rng.gamma(2.0, 0.5 if correct else 1.5))
            rows.append({
                "question_id": f"{dataset}-{q:05d}", "run_id": run, "dataset": dataset, "split": split,
                "question": question, "gold": gold,
                "text": f"<think>{question}={answers[run]}</think>\\boxed{{{answers[run]}}}",
                "answer": answers[run], "cluster_id": int(cluster_ids[run]), "n_clusters": len(values),
                "correct": bool(correct), "semantic_entropy": se,
                "semantic_entropy_weighted": max(0.0, se + rng.normal(0, 0.05)),
                "naive_entropy": float(abs(rng.normal(0.2 + se / 3, 0.05))),
                "mean_token_entropy": float(abs(rng.normal(0.1 + se / 5, 0.05))),
                "sequence_loglik": loglik,
                "accuracy_probe_prob": float(1 / (1 + np.exp(-margin))), "accuracy_probe_margin": float(margin),
                "se_probe_prob": float(1 / (1 + np.exp(-se_margin))), "se_probe_margin": float(se_margin),
                "high_se": se > 0.5,
                "umap_x": float(centre[0] + rng.normal(0, 0.6) + (3 if correct else -3)),
                "umap_y": float(centre[1] + rng.normal(0, 0.6)),
                "think_length": int(rng.integers(5, 40)), "truncated": False, "answer_source": "boxed",
            })
    frame = pd.DataFrame(rows)
    frame["think_length"] = frame["think_length"].astype("Int64")
    return validate_frame(frame, ANALYSIS.columns, "synthetic analysis")


TRACED_LAYERS = (0, 1, 2, 3)


def synthetic_location_scores(analysis: pd.DataFrame) -> tuple[np.ndarray, LocationScoresMeta]:
    """location_scores.npy and its axes for ``analysis``: each probe's score rising with the layer towards the run's
    own P column (accuracy and SE probes) or its SE (the SE regression probe), chosen at (think_end, 2) / (slt, 1)."""
    probes = registry.layer_probes()
    positions = list(POSITIONS)
    layers = np.asarray(TRACED_LAYERS, dtype=float)
    depth = (layers / layers.max())[None, None, :]  # (1, 1, layers)
    share = np.linspace(0.5, 1.0, len(positions))[None, :, None]  # (1, positions, 1)
    targets = {"accuracy": analysis["accuracy_probe_prob"], "se": analysis["se_probe_prob"],
               "se_regression": analysis["semantic_entropy"]}
    scores = np.stack([0.5 + (targets[probe.name].to_numpy(float)[:, None, None] - 0.5) * depth * share
                       if probe.name != "se_regression" else
                       targets[probe.name].to_numpy(float)[:, None, None] * depth * share
                       for probe in probes], axis=1).astype(np.float32)  # (runs, probes, positions, layers)
    outputs = {"accuracy": "P(correct)", "se": "P(high SE)", "se_regression": "predicted semantic entropy"}
    meta = LocationScoresMeta.model_validate({
        "n_runs": len(analysis), "probes": [probe.name for probe in probes],
        "outputs": [outputs[probe.name] for probe in probes],
        "chosen": [{"position": "think_end" if probe.target == "correct" else "slt",
                    "layer": 2 if probe.target == "correct" else 1} for probe in probes],
        "positions": positions, "layers": list(TRACED_LAYERS)})
    validate_location_scores(scores, meta, "synthetic location scores")
    return scores, meta


def synthetic_tokens(analysis: pd.DataFrame, long_run: int = 0) -> pd.DataFrame:
    """tokens.parquet rows for ``analysis``: each run's text split in pieces (a payload of the markup questions is
    one token, as a tokenizer could produce), entropies rising along the reasoning; the first run of question 2 has
    ``long_run`` extra reasoning tokens (a long think text)."""
    rng = np.random.default_rng(11)
    rows = []
    for run in analysis.sort_values(["dataset", "question_id", "run_id"]).itertuples():
        answer = run.answer
        pieces = ["<think>", *[ch for ch in run.question if ch not in "<>"][:12], "=", "</think>", "\\boxed{",
                  answer, "}"]
        if run.question_id.endswith("00002") and run.run_id == 0:
            pieces[1:1] = [f"step{i} " for i in range(long_run)]
        payload = next((p for p in (SCRIPT_ANSWER, IMG_ANSWER) if p in run.question), None)
        if payload is not None:
            pieces.insert(1, payload)
        end = pieces.index("</think>")
        entropies = np.abs(rng.normal(0.3, 0.2, size=len(pieces))) + np.linspace(0, 1.5, len(pieces))
        rows.append({"dataset": run.dataset, "question_id": run.question_id, "run_id": run.run_id, "tokens": pieces,
                     "token_entropies": entropies.astype(np.float32), "think_start_index": 0, "think_end_index": end})
    frame = pd.DataFrame(rows, columns=[column.name for column in TOKENS.columns])
    return validate_frame(frame, TOKENS.columns, TOKENS.file, TOKENS.key)


def synthetic_early_warning() -> pd.DataFrame:
    """early_warning.csv rows: AUROC rising with the share of the reasoning seen; slt has no fraction."""
    rows = []
    for probe in ("accuracy", "se"):
        for position, fraction in POSITIONS.items():
            for split in ("test", "ood"):
                auroc = 0.55 + 0.3 * (1.0 if fraction is None else fraction) - (0.05 if split == "ood" else 0.0)
                rows.append({"probe": probe, "position": position, "fraction": fraction, "layer": 2, "split": split,
                             "auroc": auroc, "auroc_ci_low": auroc - 0.08, "auroc_ci_high": min(1.0, auroc + 0.08)})
    frame = pd.DataFrame(rows, columns=[column.name for column in EARLY_WARNING.columns])
    return validate_frame(frame, EARLY_WARNING.columns, EARLY_WARNING.file)


def synthetic_metrics() -> EvaluateReport:
    """An evaluate.json (its schema model) with every registry score, in registry order, and plausible numbers:
    the i-th score has test AUROC 0.6 + 0.02 i (OOD 0.05 less); the SE probe on high SE 0.9; every paired
    difference 0.05 [0.01, 0.09], p 0.02."""
    def entry(auroc: float, label: str) -> dict:
        record = {"label": label, "n_runs": 100, "n_questions": 10, "n_positive": 40, "auroc": auroc,
                  "auroc_ci_low": auroc - 0.05, "auroc_ci_high": auroc + 0.05, "auroc_p_value": 0.001,
                  "auprc": auroc - 0.1, "auprc_ci_low": auroc - 0.15, "auprc_ci_high": auroc - 0.05,
                  "auprc_p_value": 0.001, "auprc_chance": 0.4, "bootstrap_resamples_used": 100, "note": None}
        if label == "incorrect":  # selective prediction only for the scores of incorrect runs
            record.update(aurac=0.4 + auroc / 4, aurc=0.6 - auroc / 4, prr=2 * auroc - 1)
        return record
    splits = {split: {score.name: entry(0.9 if score.label != "incorrect" else
                                        0.6 + 0.02 * i + (0.0 if split == "test" else -0.05), score.label)
                      for i, score in enumerate(registry.SCORES)} for split in ("test", "ood")}
    paired = [{"a": a, "b": b, "label": f"{registry.BY_NAME[a].display_name} - {registry.BY_NAME[b].display_name}",
               "split": split, "difference": 0.05, "ci_low": 0.01, "ci_high": 0.09, "p_value": 0.02,
               "bootstrap_resamples_used": 100, "note": None}
              for split in ("test", "ood") for a, b in registry.PAIRED_COMPARISONS]
    extraction = {split: {"n_runs": 100, "n_truncated": 6, "n_truncated_in_think": 5, "n_no_answer": 1,
                          "n_last_number_fallback": 2} for split in ("train", "val", "test", "ood")}
    by_difficulty = [{"split": split, "difficulty": "n_terms", "value": terms, "score": score.name, "n_runs": 30,
                      "n_questions": 3, "accuracy": 0.9 - 0.1 * terms, "auroc": 0.7, "auroc_ci_low": 0.6,
                      "auroc_ci_high": 0.8}
                     for split in ("test", "ood") for terms in (2, 3, 4) for score in registry.SCORES
                     if score.headline]
    return EvaluateReport.model_validate({
        "splits": splits, "paired_differences": paired, "answer_extraction": extraction,
        "by_difficulty": by_difficulty,
        "summary": {split: {"n_runs": 100, "n_questions": 10, "n_correct": 60, "n_incorrect": 40, "accuracy": 0.6,
                            "n_high_se_questions": 5, "mean_p_correct_on_correct": 0.7,
                            "mean_p_correct_on_incorrect": 0.4, "note": None} for split in ("test", "ood")},
        "calibration": {split: {probe: {"ece": 0.05 + 0.01 * i, "brier": 0.15 + 0.01 * i, "n_bins": 10,
                                        "n_runs": 100} for i, probe in enumerate(CALIBRATED)}
                        for split in ("test", "ood")},
        "se_regression": {split: {"spearman_runs": 0.62, "spearman_questions": 0.71, "n_runs": 100,
                                  "n_questions": 10} for split in ("test", "ood")},
        "settings": {"positive_class": "incorrect run",
                     "scores": {score: f"score {score}" for score in INCORRECT_SCORES},
                     "other_labels": {score.name: f"score {score.name}" for score in registry.SCORES
                                      if score.label != "incorrect"},
                     "bootstrap": 100, "permutations": 100, "confidence": 0.95, "high_se_threshold": 0.5,
                     "high_se_threshold_method": "best_split",
                     "probes": {f"{probe.name}_probe": {"position": "think_end" if probe.target == "correct" else "slt",
                                                        "layer": 2 if probe.target == "correct" else 1,
                                                        "layer_end": 3 if probe.range_of else None}
                                for probe in registry.located_probes()},
                     "calibration_bins": 10},
        "early_warning": synthetic_early_warning().replace({np.nan: None}).to_dict("records"),
    })


def synthetic_stability(seeds: int = 4) -> tuple[StabilityReport, pd.DataFrame]:
    """(stability.json, stability.csv): every stable score's AUROC per seed and split, and their summary."""
    rng = np.random.default_rng(5)
    frame = pd.DataFrame([{"seed": seed, "split": split, "score": score.name,
                           "auroc": 0.6 + 0.03 * i + rng.normal(0, 0.02)}
                          for seed in range(seeds) for split in ("test", "ood")
                          for i, score in enumerate(registry.stable_scores())],
                         columns=[column.name for column in STABILITY_PLOT.columns])
    splits: dict = {}
    for (split, score), group in frame.groupby(["split", "score"], sort=False):
        values = group["auroc"].to_numpy(float)
        splits.setdefault(split, {})[score] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)),
                                               "min": float(values.min()), "max": float(values.max()),
                                               "n_seeds": len(values), "values": [float(v) for v in values]}
    report = StabilityReport.model_validate({
        "splits": splits, "skipped_seeds": [],
        "settings": {"seeds": list(range(seeds)), "c_grid": [0.01], "layer_ranges": "not searched (single layers)",
                     "positive_class": "incorrect run"}})
    return report, validate_frame(frame, STABILITY_PLOT.columns, STABILITY_PLOT.file)


def synthetic_cost_ratio() -> CostRatio:
    """A cost_ratio.json: SE 125x a probe in seconds (2.5 s vs 0.02 s), 6x in tokens (300 vs 50)."""
    return CostRatio(runs_per_question=10, questions=10, se_seconds_per_question=2.5,
                     probe_seconds_per_question=0.02, seconds_ratio=125.0, se_generated_tokens_per_question=300.0,
                     probe_tokens_per_question=50.0, tokens_ratio=6.0, equivalence_checks_per_question=4.0,
                     note="SE = K sampled runs + equivalence clustering; probe = one teacher-forced pass over one run")


def synthetic_plots(layers: int = 3) -> dict[str, pd.DataFrame]:
    """Every CSV evaluate and stability write in ``paths.plots`` (file name -> table), checked against its columns."""
    by_layer = pd.DataFrame([
        {"probe": probe, "position": position, "layer": layer, "split": split,
         "auroc": 0.5 + 0.1 * layer / layers + (0.05 if split == "val" else 0.0)}
        for probe in ("accuracy", "se") for position in POSITIONS
        for layer in range(layers + 1) for split in ("val", "test", "ood")])
    grid = np.linspace(0, 1, 11)
    roc = pd.DataFrame([{"score": score, "split": split, "fpr": x, "tpr": min(1.0, x ** 0.5)}
                        for score in INCORRECT_SCORES for split in ("test", "ood") for x in grid])
    coverage = np.arange(1, 21) / 20
    risk_coverage = pd.DataFrame([{"score": score, "split": split, "coverage": c, "risk": 0.4 * c ** (1 + i / 5)}
                                  for i, score in enumerate(INCORRECT_SCORES) for split in ("test", "ood")
                                  for c in coverage])
    edges = np.linspace(0, 1, 11)
    reliability = pd.DataFrame([
        {"probe": probe, "split": split, "bin": b, "lower": edges[b], "upper": edges[b + 1], "n": 0 if b == 4 else 10,
         "mean_predicted": np.nan if b == 4 else (edges[b] + edges[b + 1]) / 2,
         "observed_frequency": np.nan if b == 4 else min(1.0, (edges[b] + edges[b + 1]) / 2 * (1.1 - 0.1 * i))}
        for i, probe in enumerate(CALIBRATED) for split in ("test", "ood") for b in range(10)])
    tables = {AUROC_BY_LAYER.file: (by_layer, AUROC_BY_LAYER.columns), ROC.file: (roc, ROC.columns),
              EARLY_WARNING.file: (synthetic_early_warning(), EARLY_WARNING.columns),
              RISK_COVERAGE.file: (risk_coverage, RISK_COVERAGE.columns),
              RELIABILITY.file: (reliability, RELIABILITY.columns),
              STABILITY_PLOT.file: (synthetic_stability()[1], STABILITY_PLOT.columns)}
    return {name: validate_frame(frame, columns, name) for name, (frame, columns) in tables.items()}


def write_early_exit_outputs(root: Path, analysis: pd.DataFrame, prefixes: tuple[int, ...] = (25, 50, 75),
                             text_chars: int = 200) -> None:
    """What the Early exit tab reads, for the runs of ``analysis``: early_exit.json and its Pareto CSV (from
    stages.lib.early_exit.rules.evaluate_rules on forced answers that get right more often the more reasoning is kept),
    forced_answers/{id,ood}.parquet and runs/{id,ood}.parquet (each run's text ``text_chars`` long)."""
    from stages.lib.early_exit.rules import PrefixOutcomes, evaluate_rules
    from stages.lib.schema.reports import EARLY_EXIT_FILE, EarlyExitReport, EarlyExitSettings, StoppingProbeChoice
    from stages.lib.schema.tables import EARLY_EXIT_PARETO, FORCED_ANSWERS
    rng = np.random.default_rng(7)
    share = np.asarray(prefixes) / 100
    forced_correct = (rng.random((len(analysis), len(prefixes))) < share) & analysis["correct"].to_numpy()[:, None]
    reasoning = analysis["think_length"].to_numpy(int) * 10
    kept = np.round(np.outer(reasoning, share)).astype(int)
    outcomes, probe_p = {}, {}
    for split in ("train", "val", "test", "ood"):
        rows = (analysis["split"] == split).to_numpy()
        n = int(rows.sum())
        outcomes[split] = PrefixOutcomes(
            question_id=analysis["question_id"].to_numpy()[rows], run_id=analysis["run_id"].to_numpy()[rows],
            prefixes=prefixes, forced_correct=forced_correct[rows], forced_answer=np.full((n, len(prefixes)), "1",
                                                                                          dtype=object),
            forced_tokens=kept[rows] + 6, trial_tokens=np.full((n, len(prefixes)), 5), reasoning_kept=kept[rows],
            mean_logprob=np.full((n, len(prefixes)), -0.1), mean_entropy=np.full((n, len(prefixes)), 0.5),
            reasoning_tokens=reasoning[rows], full_correct=analysis["correct"].to_numpy()[rows],
            full_tokens=reasoning[rows] + 10)
        probe_p[split] = np.clip(forced_correct[rows] + rng.normal(0, 0.3, (n, len(prefixes))), 0, 1)
    rules, pareto, _ = evaluate_rules(outcomes, probe_p, 0.2, 0.2, 10, 20, 0.9, 0, n_draws=20)
    report = EarlyExitReport.model_validate({
        "settings": EarlyExitSettings(method="Learn-then-Test", loss="harm", epsilon=0.2, delta=0.2,
                                      prefixes=list(prefixes), answer_prefix="\\boxed{", calibration_split="val",
                                      n_calibration_questions=int((analysis["split"] == "val").sum()), bootstrap=20,
                                      confidence=0.9),
        "stopping_probes": {f"think_{p}": StoppingProbeChoice(position=f"think_{p}", layer=1, C=1.0,
                                                              train_cv_auroc=0.7, val_auroc=0.6, train_accuracy=0.3,
                                                              constant=False) for p in prefixes},
        "rules": rules})
    for key in ("metrics", "plots", "forced_answers", "runs"):
        (root / PATHS[key]).mkdir(parents=True, exist_ok=True)
    (root / PATHS["metrics"] / EARLY_EXIT_FILE).write_text(report.to_json())
    validate_frame(pareto, EARLY_EXIT_PARETO.columns, EARLY_EXIT_PARETO.file).to_csv(
        root / PATHS["plots"] / EARLY_EXIT_PARETO.file, index=False)
    for dataset, runs in analysis.groupby("dataset"):
        index = np.flatnonzero((analysis["dataset"] == dataset).to_numpy())
        forced = pd.DataFrame([
            {"question_id": run.question_id, "run_id": run.run_id, "dataset": dataset, "prefix": prefix,
             "position": f"think_{prefix}", "reasoning_tokens": reasoning[i], "reasoning_kept": kept[i, j],
             "generated_kept": kept[i, j] + 1, "answer_ids": np.array([5, 6], dtype=np.int32),
             "answer_text": f"</think>\\boxed{{{run.answer}}}", "answer": run.answer, "answer_source": "boxed",
             "correct": bool(forced_correct[i, j]), "mean_logprob": -0.5, "mean_entropy": 0.3, "answer_tokens": 2,
             "truncated": False, "tokens_used": kept[i, j] + 10}
            for i, run in zip(index, runs.itertuples()) for j, prefix in enumerate(prefixes)],
            columns=[column.name for column in FORCED_ANSWERS.columns])
        forced.to_parquet(root / PATHS["forced_answers"] / f"{dataset}.parquet", index=False)
        runs.assign(text=[(run.text * (text_chars // len(run.text) + 1))[:text_chars] for run in runs.itertuples()],
                    n_generated=reasoning[index] + 10)[
            ["question_id", "run_id", "dataset", "text", "answer", "correct", "n_generated"]].to_parquet(
            root / PATHS["runs"] / f"{dataset}.parquet", index=False)


def write_viewer_project(root: Path, analysis: pd.DataFrame | None = None, metrics: bool = True,
                         long_run: int = 0) -> Path:
    """A project directory at ``root`` with what the viewer reads; ``analysis=None`` leaves the run out (and its
    location scores and tokens), ``metrics=False`` the metrics JSONs and plot CSVs; ``long_run``: see
    ``synthetic_tokens``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump({"seed": 0, "paths": PATHS}))
    if analysis is not None:
        directory = root / PATHS["analysis"]
        directory.mkdir(parents=True, exist_ok=True)
        analysis.to_parquet(directory / "analysis.parquet", index=False)
        scores, meta = synthetic_location_scores(analysis)
        np.save(directory / LOCATION_SCORES_FILE, scores)
        (directory / LOCATION_SCORES_META_FILE).write_text(meta.to_json())
        synthetic_tokens(analysis, long_run).to_parquet(directory / TOKENS.file, index=False,
                                                        row_group_size=TOKENS_ROW_GROUP_RUNS)
    if metrics:
        metrics_dir, plots_dir = root / PATHS["metrics"], root / PATHS["plots"]
        metrics_dir.mkdir(parents=True, exist_ok=True)
        plots_dir.mkdir(parents=True, exist_ok=True)
        for name, content in ((EVALUATE_FILE, synthetic_metrics()), (STABILITY_FILE, synthetic_stability()[0]),
                              (COST_RATIO_FILE, synthetic_cost_ratio())):
            (metrics_dir / name).write_text(content.to_json())
        for name, frame in synthetic_plots().items():
            frame.to_csv(plots_dir / name, index=False)
    return root


# Results' plot tabs (the first shown at once; viewer.views.results.RESULT_PLOTS' order) and the title of the last
# figure each draws.
RESULT_TABS = {"ROC": "ROC, ood (positive: incorrect run)", "Risk-coverage": "Risk-coverage, ood",
               "Early warning": "Early warning, ood", "AUROC per layer": "SE probe @ slt",
               "Reliability": "Reliability, ood", "Seeds": "AUROC over seeds, ood"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The page the server subprocess serves: viewer.app.create_app for the project given by `--args`, through the
# same `panel serve` command as a deployment (only the root differs).
# Each step prints "viewer-phase <name> <epoch seconds>" for the benchmark's breakdown (the script runs once per
# session, so later sessions print create_app again, after cached imports).
_LAUNCHER = """
import sys
import time
print("viewer-phase script", time.time(), flush=True)
sys.path[:0] = [{code_root!r}, {repo_root!r}]
from pathlib import Path
from viewer.app import create_app, warm_up
print("viewer-phase imports", time.time(), flush=True)
root = Path(sys.argv[1])
warm_up(root)
print("viewer-phase warm_up", time.time(), flush=True)
create_app(root).servable()
print("viewer-phase create_app", time.time(), flush=True)
"""


class ViewerServer:
    """``with ViewerServer(root) as server:`` serves the viewer for ``root`` at ``server.url``; always stopped."""

    def __init__(self, root: Path, ready_timeout_s: float = 60.0, warm: bool = False, code_root: Path = REPO_ROOT):
        self.root = Path(root)
        self.code_root = Path(code_root)  # the checkout whose `viewer` package is served (the benchmark compares two)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/app"
        self.ready_timeout_s = ready_timeout_s
        # `panel serve --warm`: load the run and render one page before accepting sessions. README deploys without
        # it: the first page then pays the imports and the read, but the sum (server start to first render) is
        # ~0.7 s shorter, as the warm-up page is built for nobody (tests/benchmarks/bench_viewer.py).
        self.warm = warm
        self.process: subprocess.Popen | None = None
        self.log = ""
        self.ready_s: float | None = None  # seconds from spawn to the first successful HTTP response
        self.started_at: float | None = None  # time.time() just before the spawn

    def __enter__(self) -> Self:
        started = time.perf_counter()
        self._workdir = tempfile.TemporaryDirectory(prefix="viewer-server-")
        launcher = Path(self._workdir.name) / "app.py"
        launcher.write_text(_LAUNCHER.format(code_root=str(self.code_root), repo_root=str(REPO_ROOT)))
        # Output goes to a file, not a pipe: an unread pipe would fill and block the server.
        self._output = tempfile.TemporaryFile(mode="w+")
        command = [sys.executable, "-m", "panel", "serve", str(launcher), "--address", "127.0.0.1",
                   "--port", str(self.port), "--allow-websocket-origin", f"127.0.0.1:{self.port}",
                   *(["--warm"] if self.warm else []), "--liveness", "--args", str(self.root)]
        self.started_at = time.time()
        self.process = subprocess.Popen(command, cwd=self._workdir.name, stdout=self._output,
                                        stderr=subprocess.STDOUT, text=True)
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"viewer server exited:\n{self.stop()}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/liveness", timeout=1):
                        break
                except OSError:
                    if time.perf_counter() - started > self.ready_timeout_s:
                        raise TimeoutError(f"viewer server not ready after {self.ready_timeout_s} s") from None
                    time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.perf_counter() - started
        return self

    def phases(self) -> list[tuple[str, float]]:
        """The launcher's "viewer-phase" lines so far, as (name, seconds since the spawn), in order."""
        self._output.flush()
        self._output.seek(0)
        found = []
        for line in self._output.read().splitlines():
            if line.startswith("viewer-phase "):
                _, name, stamp = line.split()
                found.append((name, float(stamp) - self.started_at))
        return found

    def stop(self) -> str:
        """Terminate (then kill) the server; returns what it printed."""
        if self.process is None:
            return ""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        self._output.seek(0)
        output = self._output.read()
        self._output.close()
        self._workdir.cleanup()
        return output

    def __exit__(self, *exc) -> None:
        self.log = self.stop()


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
