"""Tests for stages/lib/questions/arithmetic.py and stages/lib/models/toy.py: the task, the tokenizer, and a tiny
trained model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages import toy_model
from stages.lib.questions import arithmetic
from stages.lib.models import toy
from stages.lib.params import ToyParams

REPO = Path(__file__).resolve().parents[1]
TINY = ToyParams(layers=1, hidden_size=16, heads=2, intermediate_size=32, steps=4, batch_size=4,
                 learning_rate=0.003, min_terms=2, max_terms=3, max_operand=9, ood_max_terms=4, ood_max_operand=9,
                 ood_train_fraction=0.25, recheck_fraction=0.0)


# ---- the arithmetic task ------------------------------------------------------------------------------------
def test_solution_text_hand_checked():
    assert arithmetic.solution_text("12+7-5+3") == "<think>12+7=19\n19-5=14\n14+3=17</think>\\boxed{17}"
    assert arithmetic.solution_text("5-5+2") == "<think>5-5=0\n0+2=2</think>\\boxed{2}"
    assert arithmetic.solution_text("3+4") == "<think>3+4=7</think>\\boxed{7}"


def test_an_over_thinking_chain_re_checks_every_step_before_closing_the_reasoning():
    assert arithmetic.solution_text("12+7-5", recheck=True) == \
        "<think>12+7=19\n19-5=14\ncheck\n12+7=19\n19-5=14</think>\\boxed{14}"
    assert arithmetic.solution_text("3+4", recheck=False) == arithmetic.solution_text("3+4")


def test_parse_chain_rejects_anything_but_plus_and_minus_chains():
    assert arithmetic.parse_chain("12+7-5") == [12, 7, -5]
    for bad in ("12", "12*3", "1+", "-1+2", "", "x+1"):
        with pytest.raises(ValueError, match="not an arithmetic chain"):
            arithmetic.parse_chain(bad)


def test_make_questions_is_seeded_distinct_and_within_range():
    first = arithmetic.make_questions(200, np.random.default_rng(3), 2, 4, 20)
    assert first == arithmetic.make_questions(200, np.random.default_rng(3), 2, 4, 20)
    assert first != arithmetic.make_questions(200, np.random.default_rng(4), 2, 4, 20)
    assert len({q for q, _ in first}) == 200
    for question, gold in first:
        operands = arithmetic.parse_chain(question)
        assert 2 <= len(operands) <= 4 and all(1 <= abs(x) <= 20 for x in operands)
        assert all(np.cumsum(operands) >= 0)  # partial results never go negative
        assert gold == str(sum(operands))


def test_make_questions_refuses_an_impossible_request():
    with pytest.raises(ValueError, match="could not draw 50 distinct chains"):
        arithmetic.make_questions(50, np.random.default_rng(0), 2, 2, 2)


def test_ood_questions_are_the_longer_tail():
    for question, _ in arithmetic.make_ood_questions(50, np.random.default_rng(0), 4, 6, 30):
        operands = arithmetic.parse_chain(question)
        assert 5 <= len(operands) <= 6 and max(abs(x) for x in operands) <= 30


def test_training_chains_mix_in_the_requested_share_of_tail_chains():
    chains = arithmetic.training_chains(2000, np.random.default_rng(0), 2, 4, 20, 5, 20, ood_fraction=0.1)
    tail_share = np.mean([len(arithmetic.parse_chain(c)) == 5 for c in chains])
    assert 0.07 < tail_share < 0.13
    chains = arithmetic.training_chains(500, np.random.default_rng(0), 2, 4, 20, 5, 20, ood_fraction=0.0)
    assert max(len(arithmetic.parse_chain(c)) for c in chains) == 4


# ---- tokenizer ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return toy.build_tokenizer()


def test_think_markers_are_single_tokens_and_characters_are_one_token_each(tokenizer):
    text = "<think>12+7=19\n</think>\\boxed{19}"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False).input_ids)
    assert tokens == ["<think>", *"12+7=19\n", "</think>", *"\\boxed{19}"]
    assert tokenizer.decode(tokenizer(text).input_ids) == text  # no BOS added, no spaces inserted


def test_special_token_ids_and_unknown_characters(tokenizer):
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|pad|>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|endoftext|>", 1)
    assert tokenizer.bos_token is None
    assert tokenizer("é", add_special_tokens=False).input_ids == [tokenizer.unk_token_id]
    ids = tokenizer("<think>1</think><|endoftext|>", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>1</think>"  # like Qwen3, think stays


def test_chat_template_renders_the_prompt_and_full_transcripts(tokenizer):
    user = [{"role": "user", "content": "12+7"}]
    prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|user|>12+7<|assistant|>"
    transcript = user + [{"role": "assistant", "content": "<think>12+7=19</think>\\boxed{19}"}]
    assert tokenizer.apply_chat_template(transcript, tokenize=False) == \
        "<|user|>12+7<|assistant|><think>12+7=19</think>\\boxed{19}<|endoftext|>"
    with pytest.raises(Exception, match="only the user and assistant roles"):
        tokenizer.apply_chat_template([{"role": "system", "content": "hi"}] + user, tokenize=False)


def test_training_batch_puts_the_loss_on_the_completion_only(tokenizer):
    input_ids, labels = toy.training_batch(tokenizer, ["1+2", "10+20-3"])
    prompt_length = len(tokenizer("<|user|>1+2<|assistant|>", add_special_tokens=False).input_ids)
    completion = tokenizer("<think>1+2=3</think>\\boxed{3}<|endoftext|>", add_special_tokens=False).input_ids
    assert input_ids.shape == labels.shape and input_ids.shape[0] == 2
    assert (labels[0, :prompt_length] == -100).all()
    assert labels[0, prompt_length:prompt_length + len(completion)].tolist() == completion
    assert (labels[0, prompt_length + len(completion):] == -100).all()  # padding
    assert (input_ids[0, prompt_length + len(completion):] == tokenizer.pad_token_id).all()
    assert labels[1, -1] == tokenizer.eos_token_id  # the longest row ends with EOS, unpadded


def test_training_batch_re_checks_the_chains_asked_for(tokenizer):
    plain, _ = toy.training_batch(tokenizer, ["1+2", "3+4"])
    mixed, labels = toy.training_batch(tokenizer, ["1+2", "3+4"], recheck=[False, True])
    rows = tokenizer.batch_decode(mixed, skip_special_tokens=False)
    assert "check" not in rows[0] and "<think>3+4=7\ncheck\n3+4=7</think>" in rows[1]
    assert mixed.shape[1] > plain.shape[1]


def test_recheck_fraction_zero_draws_nothing_so_the_default_training_is_unchanged():
    def drawn(config):
        rng = np.random.default_rng(0)
        toy.train(toy.build_model(config, toy.build_tokenizer()), toy.build_tokenizer(), config, rng, progress=False)
        return rng.random()
    once = TINY.model_copy(update={"steps": 1})
    # one step draws the chains only; with re-checks it draws one more number per chain
    reference = np.random.default_rng(0)
    arithmetic.training_chains(once.batch_size, reference, once.min_terms, once.max_terms, once.max_operand,
                               once.ood_max_terms, once.ood_max_operand, once.ood_train_fraction)
    assert drawn(once) == reference.random()
    assert drawn(once.model_copy(update={"recheck_fraction": 0.5})) != reference.random()


def test_learning_rate_warms_up_then_decays_to_the_floor():
    rates = [toy.learning_rate_at(step, 100, 1.0) for step in range(100)]
    assert rates[0] < rates[4] == pytest.approx(1.0)
    assert rates[-1] == pytest.approx(toy.FINAL_LR_FRACTION, abs=0.01)
    assert all(a >= b for a, b in zip(rates[5:], rates[6:]))


# ---- a tiny model, trained a few steps ----------------------------------------------------------------------
def train_tiny(seed: int, config: ToyParams = TINY):
    torch.manual_seed(seed)
    tokenizer = toy.build_tokenizer()
    model = toy.build_model(config, tokenizer)
    counters = toy.train(model, tokenizer, config, np.random.default_rng(seed), progress=False)
    return model, tokenizer, counters


def test_training_is_deterministic_given_the_seed():
    first, _, counters = train_tiny(seed=5)
    second, _, _ = train_tiny(seed=5)
    other, _, _ = train_tiny(seed=6)
    for (name, a), (_, b), (_, c) in zip(first.state_dict().items(), second.state_dict().items(),
                                         other.state_dict().items()):
        assert torch.equal(a, b), name
    assert not all(torch.equal(a, c) for a, c in zip(first.state_dict().values(), other.state_dict().values()))
    assert counters["steps"] == TINY.steps and counters["train_completion_tokens"] > 0


def test_training_fixes_its_threads_and_deterministic_algorithms_whatever_the_caller_set():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread, _, _ = train_tiny(seed=5)
        assert torch.get_num_threads() == 1 and not torch.are_deterministic_algorithms_enabled()  # restored
        torch.set_num_threads(3)
        three_threads, _, _ = train_tiny(seed=5)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    for (name, a), b in zip(one_thread.state_dict().items(), three_threads.state_dict().values()):
        assert torch.equal(a, b), name


def test_saved_model_loads_through_the_auto_classes_and_generates(tmp_path):
    model, tokenizer, _ = train_tiny(seed=0)
    toy.save(tmp_path / "toy", model, tokenizer, TINY, seed=0)
    toy.check_round_trip(tmp_path / "toy", model, tokenizer)
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "toy")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "toy")
    assert loaded.config.model_type == "qwen3" and loaded.config.num_hidden_layers == 1
    assert loaded.generation_config.eos_token_id == loaded_tokenizer.eos_token_id == 1
    assert loaded.generation_config.pad_token_id == loaded_tokenizer.pad_token_id == 0
    assert len(loaded_tokenizer.tokenize("<think>")) == 1
    prompts = [loaded_tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                    tokenize=False) for q in ("1+2", "10+20-3")]
    batch = loaded_tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    assert batch.input_ids[0, 0] == loaded_tokenizer.pad_token_id  # left padding for batched generation
    output = loaded.generate(**batch, do_sample=True, temperature=0.7, top_p=0.95, max_new_tokens=8)
    assert output.shape[0] == 2 and output.shape[1] <= batch.input_ids.shape[1] + 8
    assert json.loads((tmp_path / "toy" / "toy_params.json").read_text())["layers"] == 1


def test_stage_main_writes_the_model_and_its_cost_record(tmp_path, monkeypatch):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["toy"] = TINY.model_copy(update={"steps": 2}).model_dump()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(toy_model, "VALIDATION_QUESTIONS", 4)
    toy_model.main()
    model_dir = tmp_path / raw["paths"]["toy_model"]
    assert AutoModelForCausalLM.from_pretrained(model_dir).config.hidden_size == TINY.hidden_size
    cost = json.loads((tmp_path / raw["paths"]["metrics"] / "cost" / "toy_model.json").read_text())
    assert cost["stage"] == "toy_model" and cost["steps"] == 2 and cost["train_tokens"] > 0
    assert 0.0 <= cost["greedy_accuracy_id"] <= 1.0
    assert not list(model_dir.parent.glob(".tmp-*"))


def test_stage_main_trains_nothing_for_a_real_model(tmp_path, monkeypatch):
    """model.name is a real model: a placeholder directory and a cost record, no training, no weights."""
    from stages.lib.models import loading as models

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["model"]["name"] = "Qwen/Qwen3-0.6B"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)

    def must_not_train(*args, **kwargs):
        raise AssertionError("the toy model was trained for a real model.name")

    monkeypatch.setattr(toy_model, "train", must_not_train)
    monkeypatch.setattr(toy_model, "build_model", must_not_train)
    toy_model.main()
    model_dir = tmp_path / raw["paths"]["toy_model"]
    assert [p.name for p in model_dir.iterdir()] == [toy.SKIPPED_FILE]
    assert json.loads((model_dir / toy.SKIPPED_FILE).read_text())["trained"] is False
    cost = json.loads((tmp_path / raw["paths"]["metrics"] / "cost" / "toy_model.json").read_text())
    assert cost["stage"] == "toy_model" and cost["skipped"] == "model.name is not toy" and "steps" not in cost
    first = (model_dir / toy.SKIPPED_FILE).read_bytes()
    raw["model"]["name"] = "org/another"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    toy_model.main()
    assert (model_dir / toy.SKIPPED_FILE).read_bytes() == first  # the same output for every real model
    with pytest.raises(models.ModelNotAvailableError, match="toy model has not been trained"):
        models.load_model("toy", model_dir)


def test_dvc_yaml_reruns_toy_model_when_model_name_changes():
    params = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["toy_model"]["params"]
    assert "model.name" in params and "model" not in params  # dtype / device do not concern the toy's training
