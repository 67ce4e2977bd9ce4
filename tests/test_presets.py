"""Presets (stages/presets/*.yaml, applied by ``python -m stages.lib.presets``), the prompt template, top-k and
the pinned revisions, on a local tiny random-weight model (nothing downloads)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from dvc.utils.hydra import apply_overrides

from conftest import link_local_model
from stages import generate, trace
from stages.lib.models.loading import format_prompt, prompt_ids
from stages.lib.params import load_params, parse_params
from stages.lib.presets import PresetError, apply_preset, main, read_preset, set_flags
from stages.lib.questions.sources import write_questions, questions_frame
from stages.lib.schema.tables import HiddenMeta, hidden_files
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "stages" / "presets").glob("*.yaml"))


def test_there_is_a_qwen3_preset():
    assert ROOT / "stages" / "presets" / "qwen3-4b-math500.yaml" in PRESETS


@pytest.mark.parametrize("preset_path", PRESETS, ids=lambda p: p.name)
def test_each_preset_parses_and_dvc_applies_it_exactly(preset_path, tmp_path):
    """The preset through the params model equals params.yaml after DVC's own ``-S`` parser applied its flags."""
    preset = read_preset(preset_path)
    expected = apply_preset(yaml.safe_load((ROOT / "params.yaml").read_text()), preset, str(preset_path))
    params_copy = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params_copy)
    flags = set_flags(preset)
    assert flags[::2] == ["-S"] * (len(flags) // 2)
    apply_overrides(params_copy, flags[1::2])  # what `dvc exp run -S ...` does to params.yaml
    assert load_params(params_copy) == expected


def test_the_qwen3_preset_is_a_reasoning_run_on_the_gpu():
    preset = read_preset(ROOT / "stages" / "presets" / "qwen3-4b-math500.yaml")
    params = apply_preset(yaml.safe_load((ROOT / "params.yaml").read_text()), preset, "preset")
    assert (params.model.device, params.model.dtype, params.sampling.backend) == ("cuda", "bfloat16", "vllm")
    assert (params.sampling.temp, params.sampling.top_p, params.sampling.top_k) == (0.6, 0.95, 20)
    assert params.sampling.max_new_tokens >= 16384
    assert len(params.model.revision) == 40 and len(params.data.revision) == 40  # commits, not branches
    assert format_prompt(params.sampling.prompt_template, "What is 1+1?") == (
        "What is 1+1?\nPlease reason step by step, and put your final answer within \\boxed{}.")
    assert params.probes.screen_locations > 0


def test_a_bad_preset_names_the_file_and_key(tmp_path, capsys):
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    with pytest.raises(PresetError, match=r"bad.yaml: `sampling.topk`: not a key of params.yaml"):
        apply_preset(base, {"sampling": {"topk": 20}}, "bad.yaml")
    with pytest.raises(PresetError, match="no group `nonsense`"):
        apply_preset(base, {"nonsense": {"x": 1}}, "bad.yaml")
    with pytest.raises(Exception, match=r"bad.yaml.*sampling.top_k"):
        apply_preset(base, {"sampling": {"top_k": 0}}, "bad.yaml")
    preset = tmp_path / "typo.yaml"
    preset.write_text("sampling:\n  prompt_template: no placeholder\n")
    assert main([str(preset), "--print"]) == 2
    assert "prompt_template" in capsys.readouterr().err


def test_format_prompt_interprets_only_the_placeholder():
    assert format_prompt("{question}", "a {b} \\c") == "a {b} \\c"
    assert format_prompt("Q: {question}\n\\boxed{}", "1+1") == "Q: 1+1\n\\boxed{}"


def test_top_k_and_template_reach_the_samplers():
    from stages.lib.sampling.vllm import engine_kwargs, request_kwargs

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["sampling"]["top_k"] = 20
    params = parse_params(raw)
    assert request_kwargs(params.sampling, {0}, seed=0)["top_k"] == 20
    raw["sampling"]["top_k"] = None
    assert request_kwargs(parse_params(raw).sampling, {0}, seed=0)["top_k"] == -1  # vLLM's "off"
    pinned = engine_kwargs("org/model", params.sampling.vllm, 0, revision="abc")
    assert (pinned["revision"], pinned["tokenizer_revision"]) == ("abc", "abc")
    assert "revision" not in engine_kwargs("org/model", params.sampling.vllm, 0)


def test_revision_template_and_top_k_reach_generate_and_trace(tiny_lm_dir, tmp_path, monkeypatch):
    """generate and trace on a local tiny model: the prompt is the template's, top-k samples, and model.revision
    is recorded in the generate cost record and the hidden-state meta."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"] = {name: str(tmp_path / name) for name in raw["paths"]}
    model_name = link_local_model(tmp_path, tiny_lm_dir)
    raw["model"].update(name=model_name, revision="0123abcd")
    raw["sampling"].update(runs=2, max_new_tokens=6, top_k=3, prompt_template="Solve: {question} \\boxed{}")
    raw["trace"].update(positions=["tbg", "slt"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    questions = tmp_path / "questions"
    questions.mkdir()
    for dataset, rows in (("id", [("q1", "1+2", "3"), ("q2", "4+5", "9")]), ("ood", [])):
        write_questions(questions_frame(rows, dataset, "jsonl:x"), questions / f"{dataset}.jsonl")
    monkeypatch.chdir(tmp_path)
    generate.main()
    trace.main()

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    runs = pd.read_parquet(tmp_path / "runs" / "id.parquet")
    assert list(runs.query("question_id == 'q1'")["prompt_ids"].iloc[0]) == prompt_ids(
        tokenizer, "Solve: 1+2 \\boxed{}")
    cost = json.loads((tmp_path / "metrics" / "cost" / "generate.json").read_text())
    assert (cost["model"], cost["model_revision"]) == (model_name, "0123abcd")
    meta = HiddenMeta.read(hidden_files(tmp_path / "hidden", "id")[2], writer="trace")
    assert (meta.model, meta.model_revision) == (model_name, "0123abcd")


def test_hf_top_k_one_samples_the_greedy_runs(tiny_lm_dir):
    """top-k = 1 leaves one token to sample from: the sampled runs at T = 1 are the greedy runs; without top-k
    they are not (so the parameter reaches model.generate)."""
    from stages.lib.models.loading import load_model
    from stages.lib.sampling.hf import eos_and_pad, sample_runs

    model, tokenizer = load_model(str(tiny_lm_dir), toy_model_dir="unused")
    eos_ids, pad_id = eos_and_pad(model, tokenizer)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["sampling"].update(runs=4, max_new_tokens=12, temp=1.0, top_p=1.0)
    prompts = [prompt_ids(tokenizer, "1+2"), prompt_ids(tokenizer, "3+4")]

    def generated(**sampling):
        params = parse_params({**raw, "sampling": {**raw["sampling"], **sampling}})
        return [[list(run.generated_ids) for run in runs]
                for runs in sample_runs(model, prompts, params.sampling, eos_ids, pad_id, seed=0)]

    greedy = generated(temp=0.0)
    assert generated(top_k=1) == greedy
    assert generated(top_k=None) != greedy
