"""Rebuild ``tokenizer/`` (tokenizer.json + tokenizer_config.json) from ``r1-distill-qwen-7b-tokenizer.gguf``.

Run from the repository root: ``python tests/data/r1-distill-qwen-7b/build_tokenizer.py`` (minutes: transformers
reads the GGUF's 152k tokens and 151k merges in Python). The tests load the saved folder, which takes a second.

transformers (5.24) reads this file's vocabulary and merges correctly but drops its CONTROL tokens
(``<｜begin▁of▁sentence｜>``, ``<｜User｜>``, ``<｜Assistant｜>``, ``<｜end▁of▁sentence｜>``, ...): their spelling is
outside the byte-level alphabet, which it takes for a llama.cpp mislabel. The chat template's ``<｜User｜>`` is then
cut into byte pieces and BOS / EOS are added as NEW ids (152065 / 152066, past the model's 152,064 rows). Here
each control token gets its own id back (GGUF ``tokenizer.ggml.token_type`` 3), as a special token, exactly as in
DeepSeek's tokenizer.json; BOS, EOS and pad are the GGUF's ``tokenizer.ggml.{bos,eos,padding}_token_id``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.integrations.gguf.gguf_tokenizer_mapping import get_gguf_tokenizer

HERE = Path(__file__).resolve().parent
GGUF = "r1-distill-qwen-7b-tokenizer.gguf"


def main() -> None:
    _, gguf_tokenizer, gguf_config = get_gguf_tokenizer(str(HERE / GGUF))
    tokens, types = gguf_tokenizer["tokens"], gguf_tokenizer["token_type"]
    loaded = AutoTokenizer.from_pretrained(HERE, gguf_file=GGUF)
    spec = json.loads(loaded.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    by_id = {index: token for token, index in vocab.items()}
    control = [index for index, kind in enumerate(types) if kind == 3]
    for index in control:  # the literal spelling back at its own id
        del vocab[by_id[index]]
        vocab[tokens[index]] = index
    kept = [entry for entry in spec["added_tokens"] if entry["id"] < len(tokens) and entry["id"] not in control]
    spec["added_tokens"] = sorted(kept + [
        {"id": index, "content": tokens[index], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True} for index in control], key=lambda entry: entry["id"])
    metadata = {key: gguf_tokenizer.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    print("GGUF special ids:", metadata, "| transformers' BOS/EOS ids:", loaded.bos_token_id, loaded.eos_token_id)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=tokens[metadata["bos_token_id"]],
        eos_token=tokens[metadata["eos_token_id"]], pad_token=tokens[metadata["pad_token_id"]],
        chat_template=loaded.chat_template, add_bos_token=bool(gguf_config.get("add_bos_token")),
        model_max_length=131072)
    tokenizer.save_pretrained(HERE / "tokenizer")


if __name__ == "__main__":
    main()
