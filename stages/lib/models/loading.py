"""Loading a causal LM and its tokenizer, and turning questions into prompt token ids.

Shared by the generation and trace stages so both see exactly the same model, prompt and think tokens.
``model.name`` may be ``toy`` (the embedded default), a local directory, a Hugging Face repo id, or a local
``.gguf`` file; nothing here assumes the Hub is reachable, and a failed load says which of these it tried.

A repo id is checked before anything loads (``model_source``): under ``HF_HUB_OFFLINE=1`` it must be in the
Hugging Face cache; otherwise the Hub is asked once (stages/lib/hub.py) and, when it does not answer, a cached
copy
is loaded without asking again, and no cached copy is a one-line error saying how to get one (``hf download``, or a
local directory) instead of transformers' ~50 s of retries.

The weights are placed by ``from_pretrained(device_map=...)`` (accelerate): ``model.device: auto`` spreads a model
larger than one GPU over every visible GPU (and the CPU past them); a named device holds the whole model.

A GGUF file is converted once (transformers dequantises it; needs the ``gguf`` and ``accelerate`` packages) into
a safetensors copy in ``$SEP_GGUF_CACHE`` (default ``~/.cache/sep-pipeline/gguf``), in a folder named by the sha256
of the file's bytes; every later load (generate, trace, the next experiment) reads that folder. The location is a
machine setting like ``HF_HOME``, not a param: moving the cache must not rerun the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants, is_offline_mode
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from stages.lib import hub
from stages.lib.errors import UserError

log = logging.getLogger(__name__)

THINK_START = "<think>"
THINK_END = "</think>"


@dataclass(frozen=True)
class ThinkTokens:
    """Token ids of the think delimiters; None when the tokenizer has no such single token."""

    start_id: int | None
    end_id: int | None


def resolve_model_path(name: str, toy_model_dir: str | Path) -> str:
    """What from_pretrained loads for ``model.name``.

    ``toy`` is the model trained by the toy_model stage; a name ending in ``.gguf`` is a local GGUF file, replaced
    by its converted copy (converted on first use, see ``converted_gguf``); anything else (a local directory or a
    Hub repo id) goes to from_pretrained as it is.
    """
    if name == "toy":
        return str(toy_model_dir)
    if name.endswith(".gguf"):
        return str(converted_gguf(name))
    return name


GGUF_CACHE_ENV = "SEP_GGUF_CACHE"
"""Environment variable naming the folder of converted GGUF checkpoints."""
GGUF_SOURCE_FILE = "gguf_source.json"
"""Written last into each converted copy: the file it came from and its sha256."""


def gguf_cache_root() -> Path:
    """``$SEP_GGUF_CACHE`` when set, else ``~/.cache/sep-pipeline/gguf``."""
    return Path(os.environ.get(GGUF_CACHE_ENV) or Path.home() / ".cache" / "sep-pipeline" / "gguf").expanduser()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (about 0.3 s for a 100 MB checkpoint)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def converted_gguf(gguf_file: str | Path, cache_root: str | Path | None = None) -> Path:
    """The safetensors copy of a local GGUF checkpoint, converting it on first use.

    The copy lives in ``cache_root / <sha256 of the file>`` (``cache_root`` defaults to ``gguf_cache_root()``), so
    a renamed file reuses it and a changed file gets a new one. It is written in a temporary folder beside it and
    renamed into place when complete: a killed conversion leaves no folder under the final name, only a hidden
    ``.<sha256>.*`` one that the next conversion does not read.
    """
    gguf_file = Path(gguf_file).expanduser()
    if not gguf_file.is_file():
        raise ModelNotAvailableError(f"model.name={str(gguf_file)!r}: GGUF file not found (a name ending in .gguf must "
                                     f"be a local file)")
    cache_root = Path(cache_root) if cache_root is not None else gguf_cache_root()
    digest = file_sha256(gguf_file)
    directory = cache_root / digest
    if directory.is_dir():
        log.info("%s: reusing its converted copy %s", gguf_file, directory)
        return directory
    log.info("%s: converting to safetensors in %s (once per file content)", gguf_file, directory)
    started = time.perf_counter()
    cache_root.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{digest}.", dir=cache_root))
    try:
        convert_gguf(gguf_file, temporary)
        (temporary / GGUF_SOURCE_FILE).write_text(json.dumps({"gguf_file": str(gguf_file.resolve()),
                                                              "sha256": digest}, indent=1))
        try:
            temporary.rename(directory)
        except OSError:
            if not directory.is_dir():
                raise
            log.info("%s: another process converted it first; using its copy", gguf_file)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    log.info("%s: converted in %.1f s", gguf_file, time.perf_counter() - started)
    return directory


def convert_gguf(gguf_file: Path, destination: Path) -> None:
    """Load a GGUF checkpoint with transformers, dequantised to a plain dense model, and save model and tokenizer
    to ``destination`` with save_pretrained (safetensors)."""
    from transformers import GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                 quantization_config=GgufConfig(dequantize=True))
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)


class ModelNotAvailableError(UserError):
    """``model.name`` names nothing that can be loaded here: a missing directory or file, or a Hub repo that is
    neither reachable nor cached. The message says how to get it."""


@dataclass(frozen=True)
class ModelSource:
    """What ``from_pretrained`` loads for ``model.name``, and how."""

    path: str
    """A local directory, or a Hub repo id."""
    revision: str | None = None
    """The Hub revision (branch, tag or commit) of a repo id; None for local directories (and the default branch)."""
    local_files_only: bool = False
    """Read the Hugging Face cache only: offline, or the Hub did not answer and a cached copy exists."""

    def from_pretrained_kwargs(self) -> dict:
        kwargs: dict = {"local_files_only": True} if self.local_files_only else {}
        return kwargs | ({"revision": self.revision} if self.revision is not None else {})


def model_source(name: str, toy_model_dir: str | Path, revision: str | None = None) -> ModelSource:
    """Check that ``model.name`` can be loaded, before any weights are read, and say how to load it.

    ``toy`` must have been trained (``dvc repro toy_model``), a ``.gguf`` file is converted (``converted_gguf``),
    an existing path is a local directory; anything else must be a Hub repo id, checked by ``hub_model_source``.
    """
    path = resolve_model_path(name, toy_model_dir)
    if name == "toy":
        if not (Path(path) / "config.json").is_file():
            raise ModelNotAvailableError(f"{path}: the toy model has not been trained here (the toy_model stage "
                                         f"trains it only when model.name is `toy`); run `dvc repro toy_model`")
        return ModelSource(path)
    if Path(path).expanduser().exists():
        return ModelSource(str(Path(path).expanduser()))
    try:
        validate_repo_id(path)
    except HFValidationError:
        raise ModelNotAvailableError(f"model.name={name!r}: no such local directory, and not a Hugging Face repo "
                                     f"id (`org/name`)") from None
    return hub_model_source(path, revision)


def hub_model_source(repo_id: str, revision: str | None = None) -> ModelSource:
    """Where a Hub model comes from: the Hub, or the local cache when offline or when the Hub does not answer.

    Fails at once, in one line naming the fix, when neither has it: under ``HF_HUB_OFFLINE=1`` (huggingface_hub's
    ``is_offline_mode``) without a cached copy, or when the Hub does not answer one metadata request
    (``HF_HUB_ETAG_TIMEOUT``, proxies honoured) and nothing is cached. A repo the Hub reports missing is an error too.
    """
    cached = hub.cached_file(repo_id, "config.json", revision=revision) is not None
    get_it = (f"download it where the Hub is reachable (`hf download {repo_id}`"
              f"{f' --revision {revision}' if revision else ''}, into {constants.HF_HUB_CACHE}) and set "
              f"HF_HUB_OFFLINE=1, or set model.name to a local directory")
    if is_offline_mode():
        if not cached:
            raise ModelNotAvailableError(f"model.name={repo_id!r}: HF_HUB_OFFLINE=1 and the model is not in the "
                                         f"Hugging Face cache; {get_it}")
        return ModelSource(repo_id, revision, local_files_only=True)
    try:
        reason = hub.unreachable_reason(repo_id, revision=revision)
    except hub.HubRepoError as error:
        raise ModelNotAvailableError(f"model.name: {error}") from None
    if reason is None:
        return ModelSource(repo_id, revision)
    if not cached:
        raise ModelNotAvailableError(f"model.name={repo_id!r}: the Hugging Face Hub ({constants.ENDPOINT}) did not "
                                     f"answer ({reason}) and the model is not in the cache; {get_it}")
    log.warning("%s: the Hub did not answer (%s); loading the cached copy (set HF_HUB_OFFLINE=1 to skip asking)",
                repo_id, reason)
    return ModelSource(repo_id, revision, local_files_only=True)


def load_config(name: str, toy_model_dir: str | Path, revision: str | None = None):
    """The model's config alone (its config.json; no weights are read), to check params against it first."""
    source = model_source(name, toy_model_dir, revision)
    try:
        return AutoConfig.from_pretrained(source.path, **source.from_pretrained_kwargs())
    except (OSError, ValueError) as error:
        raise ModelNotAvailableError(f"model.name={name!r}: no readable config in {source.path!r} "
                                     f"({' '.join(str(error).split())})") from None


def load_model(name: str, toy_model_dir: str | Path, device: str = "cpu", dtype: str = "float32",
               revision: str | None = None):
    """Load (model, tokenizer) in eval mode, with a clear error when the weights cannot be found.

    ``device`` and ``dtype`` are the ``model.device`` / ``model.dtype`` params; the weights are placed by
    ``device_map`` (``device_map_for``). ``revision`` pins a Hub repo id's branch, tag or commit.
    """
    device_map, torch_dtype = device_map_for(device), TORCH_DTYPES[dtype]
    source = model_source(name, toy_model_dir, revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **source.from_pretrained_kwargs())
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype, device_map=device_map,
                                                     **source.from_pretrained_kwargs())
    except OSError as error:
        where = "a local directory" if Path(source.path).exists() else "a Hugging Face repo id"
        raise ModelNotAvailableError(f"model.name={name!r}: could not load {source.path!r} as {where}: "
                                     f"{' '.join(str(error).split())}") from None
    model.eval()
    placement = sorted(set(map(str, getattr(model, "hf_device_map", {}).values()))) or [str(model.device)]
    log.info("loaded %s: %d parameters, %d layers, %s on %s", source.path, model.num_parameters(),
             model.config.num_hidden_layers, dtype, ", ".join(placement))
    return model, tokenizer


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""``model.dtype`` names -> the dtype the weights (and so the hidden states) are computed in."""


def device_map_for(device: str) -> str:
    """``model.device`` -> the ``device_map`` of ``from_pretrained``.

    ``auto`` is accelerate's ``"auto"`` when CUDA is available (every visible GPU, filled in order, then the CPU:
    a model larger than one GPU still loads) and ``cpu`` otherwise; ``cpu``, ``cuda`` and ``cuda:N`` put the whole
    model on that device, as ``.to(device)`` did (checked by ``resolve_device``).
    """
    if device == "auto":
        resolved = "auto" if torch.cuda.is_available() else "cpu"
        log.info("model.device=auto: device_map=%r (%d CUDA device(s))", resolved, torch.cuda.device_count())
        return resolved
    return resolve_device(device)


def resolve_device(device: str) -> str:
    """``model.device`` -> a torch device string: ``auto`` is ``cuda`` when CUDA is available, else ``cpu``.

    A CUDA device on a machine without one fails here, before any weights are read, naming the param.
    """
    if device == "auto":
        resolved = "cuda" if torch.cuda.is_available() else "cpu"
        log.info("model.device=auto resolved to %s", resolved)
        return resolved
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"params.yaml: `model.device` = {device!r}, but CUDA is not available to torch "
                               f"{torch.__version__} here; use `cpu` or `auto`")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"params.yaml: `model.device` = {device!r}, but this machine has "
                               f"{torch.cuda.device_count()} CUDA device(s)")
    return device


def think_tokens(tokenizer: PreTrainedTokenizerBase) -> ThinkTokens:
    """Find <think> and </think> by token id (never by searching decoded text)."""

    def single_id(token: str) -> int | None:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            return None
        return int(token_id)

    return ThinkTokens(single_id(THINK_START), single_id(THINK_END))


def format_prompt(template: str, question: str) -> str:
    """The user message of ``sampling.prompt_template``: its ``{question}`` replaced by ``question``, nothing else
    interpreted (so ``\\boxed{}`` and other braces stay as written)."""
    return template.replace("{question}", question)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    """Token ids of the prompt for ``question``: the chat template (thinking enabled) when there is one."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False,
            enable_thinking=True,  # Qwen3's template reads it; others ignore unknown variables
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(question)["input_ids"]


def require_prompts_fit(prompt_lengths, question_ids, max_new_tokens: int, position_limit: int | None,
                        source: str | Path) -> None:
    """Fail before anything is generated when a prompt plus ``sampling.max_new_tokens`` exceeds the model's
    position limit (``config.max_position_embeddings``; None: no limit known), naming the longest such question of
    ``source`` (the questions file) and both ways out."""
    if position_limit is None:
        return
    over = [(length, question_id) for length, question_id in zip(prompt_lengths, question_ids)
            if length + max_new_tokens > position_limit]
    if over:
        length, question_id = max(over, key=lambda item: item[0])
        raise UserError(f"{source}: question {question_id!r} is {length} prompt tokens, + sampling.max_new_tokens "
                        f"{max_new_tokens} = {length + max_new_tokens} > the model's {position_limit} positions "
                        f"({len(over)} question(s) too long); shorten or drop them, or lower sampling.max_new_tokens")


def pad_batch(sequences: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (batch, longest), the one padding helper of the pipeline.

    ``side="left"`` (generation: every prompt ends at the last column, so new tokens follow it) or ``"right"``
    (teacher-forced tracing: every sequence at positions 0..n-1, exactly as in an unbatched pass; with a causal
    mask, padding after a token cannot change that token's state).
    """
    if side not in ("left", "right"):
        raise ValueError(f"pad_batch: side {side!r}; expected 'left' or 'right'")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, sequence in enumerate(sequences):
        columns = slice(width - len(sequence), width) if side == "left" else slice(0, len(sequence))
        input_ids[row, columns] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, columns] = 1
    return input_ids, attention_mask

