"""GGUF checkpoints (stages/lib/models/loading.py) and the ``hf:`` question sources (stages/lib/questions/sources.py).

The GGUF file is written here with the ``gguf`` package from the tiny random Qwen3 of conftest.py, so nothing is
downloaded; the real ``datasets`` client is called against the Hub, which these machines cannot reach.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import gguf
import pytest
import torch
import yaml
from conftest import tiny_qwen3
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.lib.models import loading as models
from stages.lib.questions import sources as questions
from stages.lib.params import HUB_SOURCES, ParamsError, parse_params
from stages.lib.questions.sources import HubDataset, QuestionSourceError, hub_rows_questions, jsonl_questions
from stages.lib.models.toy import build_tokenizer

REPO = Path(__file__).resolve().parents[1]
GSM8K = Path("/work/shared/data/gsm8k_test.jsonl")
MATH500 = Path("/work/shared/data/math500_test.jsonl")


# ---- a tiny GGUF file ---------------------------------------------------------------------------------------
def write_gguf(model, tokenizer, path: Path) -> Path:
    """``model`` (a Qwen3ForCausalLM) and its tokenizer as an F32 GGUF file, the way llama.cpp lays one out.

    The character-level toy vocabulary is written as a byte-level (``gpt2``) one without merges, which tokenizes
    the same way; special tokens are marked CONTROL and the think markers USER_DEFINED, as llama.cpp does.
    """
    config = model.config
    writer = gguf.GGUFWriter(str(path), "qwen3")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens)
    added = {token.content for token in tokenizer.added_tokens_decoder.values()}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.USER_DEFINED if t in added
                            else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_scores([0.0] * len(tokens))  # no merges: transformers derives none from a character vocabulary
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path of a tiny GGUF file, the model it holds, the tokenizer it holds)."""
    tokenizer = build_tokenizer()
    # head_dim 128 (hidden 256, 2 heads): transformers reads no head width from a qwen3 GGUF and assumes Qwen3's 128.
    model = tiny_qwen3(tokenizer, hidden=256)
    return write_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.gguf"), model, tokenizer


@pytest.fixture
def conversions(monkeypatch) -> list[Path]:
    """Every GGUF file that stages.lib.models.loading converts during the test (the real conversion still runs)."""
    converted: list[Path] = []
    real_convert = models.convert_gguf

    def counting_convert(gguf_file, destination):
        converted.append(gguf_file)
        real_convert(gguf_file, destination)

    monkeypatch.setattr(models, "convert_gguf", counting_convert)
    return converted


SAMPLE = "<|user|>12+7-5<|assistant|><think>12+7=19 19-5=14</think> \\boxed{14}"


def logits(model, input_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([input_ids])).logits


# ---- GGUF ---------------------------------------------------------------------------------------------------
def test_a_gguf_file_is_converted_once_and_then_reused(tiny_gguf, tmp_path, conversions, caplog):
    path, _, _ = tiny_gguf
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="stages.lib.models.loading"):
        first = models.converted_gguf(path, cache)
    assert conversions == [path]
    assert first == cache / models.file_sha256(path)
    assert {"config.json", "model.safetensors", "tokenizer.json", models.GGUF_SOURCE_FILE} <= {
        p.name for p in first.iterdir()}
    assert json.loads((first / models.GGUF_SOURCE_FILE).read_text())["sha256"] == first.name
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temporary folder left behind
    assert "converting to safetensors" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stages.lib.models.loading"):
        again = models.converted_gguf(path, cache)
        renamed = models.converted_gguf(shutil.copy(path, tmp_path / "renamed.gguf"), cache)
    assert again == renamed == first
    assert conversions == [path], "the second load converted again"
    assert "reusing its converted copy" in caplog.text and "converting" not in caplog.text


def test_the_cached_copy_gives_the_same_logits_as_the_gguf_file(tiny_gguf, tmp_path, monkeypatch, conversions):
    path, original, toy_tokenizer = tiny_gguf
    monkeypatch.setenv(models.GGUF_CACHE_ENV, str(tmp_path / "cache"))
    assert models.gguf_cache_root() == tmp_path / "cache"

    model, tokenizer = models.load_model(str(path), toy_model_dir="unused")  # the pipeline's path: via the cache
    assert Path(models.resolve_model_path(str(path), "unused")).parent == tmp_path / "cache"
    direct_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    assert len(conversions) == 1

    input_ids = tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]
    assert input_ids == direct_tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]
    assert input_ids == toy_tokenizer(SAMPLE, add_special_tokens=False)["input_ids"]  # the fixture is faithful
    assert models.think_tokens(tokenizer) == models.think_tokens(toy_tokenizer)
    cached_logits = logits(model, input_ids)
    torch.testing.assert_close(cached_logits, logits(direct, input_ids), rtol=0, atol=0)
    torch.testing.assert_close(cached_logits, logits(original, input_ids), rtol=0, atol=1e-6)


def test_a_killed_conversion_leaves_no_cache_entry(tiny_gguf, tmp_path, monkeypatch):
    path, _, _ = tiny_gguf
    cache = tmp_path / "cache"

    def dies_half_way(gguf_file, destination):
        (destination / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "convert_gguf", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        models.converted_gguf(path, cache)
    assert list(cache.iterdir()) == []
    monkeypatch.undo()
    directory = models.converted_gguf(path, cache)
    assert AutoModelForCausalLM.from_pretrained(directory).config.model_type == "qwen3"


def test_a_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(models.ModelNotAvailableError, match=r"model.name='.*nowhere.gguf': GGUF file not found"):
        models.load_model(str(tmp_path / "nowhere.gguf"), toy_model_dir="unused")


def test_model_name_and_sources_validate_in_params():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["model"]["name"] = "data/models/x.gguf"
    raw["data"].update(source="hf:gsm8k", ood_source="hf:math500")
    params = parse_params(raw)
    assert (params.data.source, params.data.ood_source) == ("hf:gsm8k", "hf:math500")
    raw["model"]["name"] = "/models/x.gguf"  # a local file must be a DVC dep: under data/models/
    with pytest.raises(ParamsError, match=r"^params.yaml: `model.name` = '/models/x.gguf' is invalid; expected a "
                                          r"local model under data/models/"):
        parse_params(raw)
    raw["model"]["name"] = "toy"
    raw["data"]["source"] = "hf:aime"
    with pytest.raises(ParamsError, match=r"`data.source` = 'hf:aime' is invalid; expected .*`hf:math500`"):
        parse_params(raw)


# ---- hf: sources --------------------------------------------------------------------------------------------
# Rows as `datasets` returns them (the real datasets' columns and value types).
GSM8K_ROWS = [
    {"question": "Janet's ducks lay 16 eggs per day. ...", "answer": "16 - 3 - 4 = <<16-3-4=9>>9\n#### 18"},
    {"question": "A robe takes 2 bolts ...", "answer": "2/2=<<2/2=1>>1\n#### 3"},
    {"question": "Josh flips a house ...", "answer": "... profit\n#### 70,000"},
]
MATH500_ROWS = [
    {"problem": "Convert the point $(0,3)$ ...", "solution": r"... $\boxed{\left( 3, \frac{\pi}{2} \right)}.$",
     "answer": r"\left( 3, \frac{\pi}{2} \right)", "subject": "Precalculus", "level": 2,
     "unique_id": "test/precalculus/807.json"},
    {"problem": "If $f(x) = \\frac{3x-2}{x-2}$ ...", "solution": r"... $\boxed{\frac{14}{3}}$", "answer": "",
     "subject": "Algebra", "level": 3, "unique_id": "test/algebra/2584.json"},
]


def test_hub_rows_are_parsed_like_the_jsonl_formats(caplog):
    assert hub_rows_questions(GSM8K_ROWS, "hf:gsm8k", 2) == [
        ("1", GSM8K_ROWS[0]["question"], "18"), ("2", GSM8K_ROWS[1]["question"], "3")]
    assert hub_rows_questions(GSM8K_ROWS, "hf:gsm8k", 3)[2][2] == "70000"
    assert hub_rows_questions(MATH500_ROWS, "hf:math500", 5) == [
        ("test/precalculus/807.json", MATH500_ROWS[0]["problem"], r"\left( 3, \frac{\pi}{2} \right)"),
        ("test/algebra/2584.json", MATH500_ROWS[1]["problem"], r"\frac{14}{3}")]  # empty answer: the last box
    assert "asked for 5 questions, the dataset holds 2" in caplog.text
    with pytest.raises(QuestionSourceError, match="hf:gsm8k: line 2 is missing field `answer`"):
        hub_rows_questions([GSM8K_ROWS[0], {"question": "q"}], "hf:gsm8k", 2)


@pytest.mark.parametrize("source, path", [("hf:gsm8k", GSM8K), ("hf:math500", MATH500)])
def test_hub_rows_and_a_local_jsonl_copy_give_the_same_questions(source, path):
    if not path.exists():
        pytest.skip(f"{path} not present")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:60]]
    assert hub_rows_questions(rows, source, 50) == jsonl_questions(path, 50)


def test_every_hub_source_names_a_dataset():
    assert set(questions.HUB_DATASETS) == set(HUB_SOURCES)
    assert questions.HUB_DATASETS["hf:gsm8k"] == HubDataset("openai/gsm8k", "main", "test")


def test_an_unreachable_hub_fails_at_once_with_a_clear_message():
    if questions.hub_unreachable_reason(questions.HUB_DATASETS["hf:gsm8k"]) is None:
        pytest.skip("the Hugging Face Hub is reachable from here")
    started = time.perf_counter()
    with pytest.raises(QuestionSourceError) as error:
        questions.build_dataset("id", "hf:gsm8k", 5, 0, None)
    assert time.perf_counter() - started < 15  # the Hub client alone retries for ~25 s
    message = str(error.value)
    assert "openai/gsm8k" in message and "unreachable or offline" in message and "jsonl:<path>" in message


def test_offline_mode_error_from_datasets_is_translated(tmp_path):
    """With HF_HUB_OFFLINE=1 and an empty cache the real ``datasets`` call fails, and the stage says why."""
    script = ("from stages.lib.questions import sources as questions\n"
              "try:\n"
              "    questions.build_dataset('ood', 'hf:math500', 5, 0, None)\n"
              "except questions.QuestionSourceError as error:\n"
              "    print(error)\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120, check=True)
    assert time.perf_counter() - started < 60
    assert "HuggingFaceH4/MATH-500" in result.stdout and "unreachable or offline" in result.stdout
    assert "Couldn't reach 'HuggingFaceH4/MATH-500' on the Hub (OfflineModeIsEnabled)" in result.stdout
