"""Shared fixtures: a tiny random-weight Qwen3 LM with the toy tokenizer, built locally (nothing downloads), and
the tiny DVC project the end-to-end tests share (tests/dvc_project.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dvc_project import second_tiny_copy, tiny_project, tiny_run  # noqa: F401  (fixtures of the DVC end-to-end tests)
from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

from stages.lib.models.toy import build_tokenizer


def tiny_qwen3(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 32) -> Qwen3ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=hidden // 2, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model = Qwen3ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return model


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A saved tiny random LM directory, loadable with AutoModelForCausalLM / AutoTokenizer."""
    directory = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = build_tokenizer()
    tiny_qwen3(tokenizer).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def link_local_model(project: Path, model_dir: Path, name: str = "tiny_lm") -> str:
    """Link ``model_dir`` into ``project``'s data/models/ (where a local model must live: a DVC dep there) and
    return the relative ``model.name`` a stage running in ``project`` reads it by."""
    models = project / "data" / "models"
    models.mkdir(parents=True, exist_ok=True)
    (models / name).symlink_to(Path(model_dir).resolve(), target_is_directory=True)
    return f"data/models/{name}"
