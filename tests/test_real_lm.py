"""Opt-in: the whole pipeline on a real small LM from a local GGUF file, e.g. SmolLM2-135M-Instruct.

Skipped unless ``SEP_REAL_LM=/path/to/file.gguf`` is set (README, "Real models offline: SmolLM2 from a wheel").
Runs ``dvc repro`` of this repository's dvc.yaml in a fresh git + DVC copy (tests/dvc_project.py) on easy
arithmetic chains asked in words (``What is 12+7-5? ...``, a ``jsonl:`` source: an instruct model asked a bare
``12+7-5`` mostly chats about something else), then prints accuracy, semantic entropy and the probe AUROCs and
writes them to ``$SEP_REAL_LM_REPORT`` (default: real_lm_report.json in the pytest temporary folder). SmolLM2 has no
think tags: every run is ``think_missing`` and the trace stage stores the ``slt`` vector at ``think_end``, which is
checked. The GGUF file is converted once into the user's cache (``$SEP_GGUF_CACHE``); later runs reuse it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from dvc_project import ENV, make_project

from stages.lib.questions import arithmetic
from stages.lib.hidden.store import open_hidden
from stages.lib.schema.reports import EVALUATE_FILE

REAL_LM = os.environ.get("SEP_REAL_LM", "")

N_QUESTIONS, N_OOD_QUESTIONS, RUNS = 40, 8, 5  # 40: fewer leave val/test splits of a single class
# Small K, short answers, few traced layers. The toy model is not used: one training step.
REAL = {
    "toy": dict(steps=1),
    "data": dict(n_questions=N_QUESTIONS, n_ood_questions=N_OOD_QUESTIONS),
    "sampling": dict(backend="hf", runs=RUNS, temp=0.7, max_new_tokens=128, batch_size=160),
    "trace": dict(layers=[10, 20, 30]),
    "probes": dict(cv_folds=2, c_grid=[0.1, 1.0]),
    "evaluate": dict(bootstrap=100, permutations=100),
    "stability": dict(seeds=3),  # a seed whose split leaves a one-class val split is skipped and listed
    "analysis": dict(umap_neighbors=5),
}


def write_worded_chains(project: Path, name: str, n: int, seed: int, min_terms: int, max_terms: int,
                        max_operand: int) -> str:
    """``n`` seeded chains as ``{id, question, answer}`` JSON lines in the project's data/sources/<name>, asked in
    words; the ``jsonl:`` source spec."""
    path = project / "data" / "sources" / name
    chains = arithmetic.make_questions(n, np.random.default_rng(seed), min_terms, max_terms, max_operand)
    path.write_text("".join(json.dumps({"id": f"{path.stem}-{i:04d}", "answer": gold,
                                        "question": f"What is {chain}? Give the number."}) + "\n"
                            for i, (chain, gold) in enumerate(chains)))
    return f"jsonl:{path.relative_to(project).as_posix()}"


@pytest.mark.slow
@pytest.mark.skipif(not REAL_LM, reason="set SEP_REAL_LM=/path/to/model.gguf to run the pipeline on a real LM")
def test_pipeline_on_a_real_gguf_model(tmp_path):
    gguf_file = Path(REAL_LM).expanduser().resolve()
    assert gguf_file.is_file(), f"SEP_REAL_LM={REAL_LM}: no such file"
    project = make_project(tmp_path / "project")
    params = yaml.safe_load((project / "params.yaml").read_text())
    shutil.copy(gguf_file, project / "data" / "models" / gguf_file.name)  # a local model is a dep under data/models/
    params["model"]["name"] = f"data/models/{gguf_file.name}"
    params["data"]["source"] = write_worded_chains(project, "id.jsonl", N_QUESTIONS, 1, 2, 3, 20)
    params["data"]["ood_source"] = write_worded_chains(project, "ood.jsonl", N_OOD_QUESTIONS, 2, 4, 5, 50)
    for group, values in REAL.items():
        if group in params:  # a group this checkout does not have yet is left out
            params[group].update(values)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    started = time.perf_counter()
    # Generation on a shared CPU takes tens of minutes: no 15-minute limit here, unlike the tiny project's `sh`.
    repro = subprocess.run(["dvc", "repro"], cwd=project, env=ENV, capture_output=True, text=True, timeout=4 * 3600)
    wall_seconds = time.perf_counter() - started
    assert repro.returncode == 0, f"dvc repro failed:\n{repro.stdout}\n{repro.stderr}"

    paths = params["paths"]
    runs = pd.read_parquet(Path(project, paths["runs"], "id.parquet"))
    entropy = pd.read_parquet(Path(project, paths["semantic_entropy"], "id.parquet"))
    metrics = json.loads(Path(project, paths["metrics"], EVALUATE_FILE).read_text())
    assert len(runs) == N_QUESTIONS * RUNS
    assert runs["think_missing"].all(), "SmolLM2 has no </think> token, so every run should be think_missing"

    hidden, index, meta = open_hidden(Path(project, paths["hidden"]), "id")
    positions = meta.positions
    assert index["think_end_fallback"].all()
    np.testing.assert_array_equal(hidden[:, positions.index("think_end")], hidden[:, positions.index("slt")])

    report = {
        "model": str(gguf_file), "wall_seconds": round(wall_seconds, 1),
        "questions": int(runs["question_id"].nunique()), "runs": len(runs),
        "accuracy": round(float(runs["correct"].mean()), 3),
        "answer_found": round(float((runs["answer"] != "").mean()), 3),
        "truncated": round(float(runs["truncated"].mean()), 3),
        "semantic_entropy_mean": round(float(entropy.groupby("question_id")["semantic_entropy"].first().mean()), 3),
        "auroc": {split: {score: values.get("auroc") for score, values in metrics[split].items()}
                  for split in ("test", "ood") if split in metrics},
    }
    destination = Path(os.environ.get("SEP_REAL_LM_REPORT", tmp_path / "real_lm_report.json"))
    destination.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    assert 0 <= report["accuracy"] <= 1 and report["auroc"]["test"]["accuracy_probe"] is not None
