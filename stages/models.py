"""Loading a causal LM and its tokenizer, and turning questions into prompt token ids.

Shared by the generation and trace stages so both see exactly the same model, prompt and think tokens.
``model.name`` may be ``toy`` (the embedded default), a local directory, or a Hugging Face repo id; nothing
here assumes the Hub is reachable, and a failed load says which of these it tried.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

THINK_START = "<think>"
THINK_END = "</think>"


@dataclass(frozen=True)
class ThinkTokens:
    """Token ids of the think delimiters; None when the tokenizer has no such single token."""

    start_id: int | None
    end_id: int | None


def resolve_model_path(name: str, toy_model_dir: str | Path) -> str:
    """``toy`` means the model trained by the toy_model stage; anything else goes to from_pretrained."""
    return str(toy_model_dir) if name == "toy" else name


def load_model(name: str, toy_model_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer) in eval mode, with a clear error when the weights cannot be found."""
    path = resolve_model_path(name, toy_model_dir)
    if name == "toy" and not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: the toy model is missing; run `dvc repro toy_model` first")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as error:
        where = "a local directory" if Path(path).exists() else "a Hugging Face repo id (needs the Hub or its cache)"
        raise OSError(f"model.name={name!r}: could not load {path!r} as {where}: {error}") from error
    model.to(device).eval()
    log.info("loaded %s: %d parameters, %d layers", path, model.num_parameters(), model.config.num_hidden_layers)
    return model, tokenizer


def think_tokens(tokenizer: PreTrainedTokenizerBase) -> ThinkTokens:
    """Find <think> and </think> by token id (never by searching decoded text)."""

    def single_id(token: str) -> int | None:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            return None
        return int(token_id)

    return ThinkTokens(single_id(THINK_START), single_id(THINK_END))


def prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    """Token ids of the prompt for ``question``: the chat template (thinking enabled) when there is one."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False,
            enable_thinking=True,  # Qwen3's template reads it; others ignore unknown variables
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(question)["input_ids"]
