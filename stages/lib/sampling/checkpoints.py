"""Generation checkpoints: each finished generate() call's runs on disk, so a killed generate stage resumes.

A 3-hour generation killed at hour 2 (SIGKILL, a lost node, a full disk) restarts from its last finished call,
not from zero. Each call of ``sampling_hf.sample_runs`` (and each chunk of questions of the vllm backend) is
seeded on its own (``seed + call``; vLLM: per question), so a call's runs do not depend on the calls before it
and a resumed stage writes exactly the records of an uninterrupted one.

Where: ``.dvc/tmp/generate-checkpoints/<key>/`` under the repository root (DVC's own scratch directory: ignored by
git, not a DVC output, never pushed). ``key`` hashes everything that decides the samples: the params that
generate declares in dvc.yaml (seed, model, the sampling keys), each dataset's question file, the model's
identity (for a local directory its config and the size and mtime of its weight files; for a Hub id its name
and revision) and the code: the bytes of every code dep dvc.yaml lists for the generate stage (its module and the
library it imports), so a run resumed after an edit of, say, the entropy computation never mixes the records of two
versions of the code. Any change gives a new key, and the directories of other keys are deleted at start, so a stale
checkpoint is never read. The stage deletes its checkpoints once its outputs are in place.

Files: ``<dataset>-<call>.npz``, one per finished call, written to a temporary name and renamed (a kill never
leaves half a checkpoint): the runs' token ids, log-probs and entropies concatenated, with their lengths, the stop
entropies and the truncation flags. Read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from stages.lib.params import Params
from stages.lib.sampling.runs import SampledRun

log = logging.getLogger(__name__)

CHECKPOINT_ROOT = Path(".dvc") / "tmp" / "generate-checkpoints"
CODE_ROOT = Path(__file__).resolve().parents[2]
"""The repository holding the ``stages`` package and dvc.yaml: where the code this process runs lives."""


def code_fingerprint(stage: str, root: str | Path = CODE_ROOT) -> dict[str, str]:
    """sha256 of each code dep (``stages/...``) dvc.yaml lists for ``stage`` under ``root``: the same files whose
    change makes DVC rerun the stage. Without a dvc.yaml entry (the package used outside its repository), every
    ``stages/**/*.py`` counts, which can only discard checkpoints too often, never keep a stale one."""
    root = Path(root)
    dvc_yaml = root / "dvc.yaml"
    stages = yaml.safe_load(dvc_yaml.read_text()).get("stages", {}) if dvc_yaml.is_file() else {}
    deps = [dep for dep in stages.get(stage, {}).get("deps", []) if isinstance(dep, str) and dep.startswith("stages/")]
    files = sorted(deps) or sorted(path.relative_to(root).as_posix() for path in (root / "stages").rglob("*.py"))
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() if (root / name).is_file() else "(missing)"
            for name in files}


def model_fingerprint(model_path: str, revision: str | None) -> dict[str, Any]:
    """What identifies the weights: a local directory's config.json text and its weight files' sizes and mtimes
    (hashing gigabytes of weights at every start would cost minutes); a Hub id's name and revision."""
    path = Path(model_path)
    if path.is_file():  # a .gguf file
        return {"file": path.name, "size": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns}
    if not path.is_dir():
        return {"name": model_path, "revision": revision}
    config = path / "config.json"
    return {"config": config.read_text() if config.is_file() else None,
            "weights": sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()
                              if p.suffix in (".safetensors", ".bin", ".gguf", ".pt"))}


def checkpoint_key(decisive_params: Mapping[str, Any], question_files: list[Path], model: Mapping[str, Any]) -> str:
    """A short hash of everything that decides the samples (see the module docstring)."""
    digest = hashlib.sha256(json.dumps({"params": decisive_params, "model": model}, sort_keys=True,
                                       default=str).encode())
    for path in question_files:
        content = path.read_bytes() if path.is_file() else b"(missing)"  # the stage then names the missing file
        digest.update(path.name.encode() + b"\0" + content + b"\0")
    return digest.hexdigest()[:16]


def generation_key(params: Params, question_files: list[Path], code_root: str | Path = CODE_ROOT) -> str:
    """The checkpoint key of a generate run with ``params`` over ``question_files``, by the code under
    ``code_root``."""
    name = params.model.name
    model_path = str(params.paths.toy_model) if name == "toy" else name
    decisive = {"seed": params.seed, "model": params.model.model_dump(mode="json"),
                "sampling": params.sampling.model_dump(mode="json"), "code": code_fingerprint("generate", code_root)}
    return checkpoint_key(decisive, question_files, model_fingerprint(model_path, params.model.revision))


class GenerationCheckpoints:
    """The finished calls of one generate run, keyed by (dataset, call index)."""

    def __init__(self, key: str, root: str | Path = CHECKPOINT_ROOT):
        self.root = Path(root)
        self.directory = self.root / key
        self.resumed = 0
        if self.root.is_dir():
            for stale in self.root.iterdir():
                if stale != self.directory:
                    shutil.rmtree(stale, ignore_errors=True)
                    log.info("removed stale generation checkpoints %s (params, questions, model or code changed)",
                             stale)
        self.directory.mkdir(parents=True, exist_ok=True)
        finished = sorted(self.directory.glob("*.npz"))
        if finished:
            log.info("resuming generation: %d finished calls in %s", len(finished), self.directory)

    def _path(self, dataset: str, call: int) -> Path:
        return self.directory / f"{dataset}-{call:06d}.npz"

    def load(self, dataset: str, call: int) -> list[SampledRun] | None:
        """The runs of a finished call, or None when it has not finished."""
        path = self._path(dataset, call)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as saved:
                lengths = saved["lengths"]
                bounds = np.r_[0, np.cumsum(lengths)]
                runs = [SampledRun(generated_ids=saved["generated_ids"][a:b].tolist(),
                                   token_logprobs=saved["token_logprobs"][a:b],
                                   token_entropies=saved["token_entropies"][a:b],
                                   token_topk_logprob_mean=saved["token_topk_logprob_mean"][a:b],
                                   stop_entropy=float(saved["stop_entropy"][i]),
                                   truncated=bool(saved["truncated"][i]))
                        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
        except Exception as error:  # zipfile, numpy and key errors alike: a checkpoint is scratch, never trusted
            log.warning("%s: corrupt generation checkpoint (%s); removed, and its call is sampled again", path,
                        " ".join(str(error).split())[:200])
            path.unlink(missing_ok=True)
            return None
        self.resumed += 1
        return runs

    def save(self, dataset: str, call: int, runs: list[SampledRun]) -> None:
        """Write one finished call atomically."""
        path = self._path(dataset, call)
        tmp = path.with_name(f".tmp-{path.name}")
        with open(tmp, "wb") as out:
            np.savez(out,
                     lengths=np.array([len(run.generated_ids) for run in runs], dtype=np.int64),
                     generated_ids=np.array([t for run in runs for t in run.generated_ids], dtype=np.int64),
                     token_logprobs=np.concatenate([np.asarray(run.token_logprobs) for run in runs] or [[]]),
                     token_entropies=np.concatenate([np.asarray(run.token_entropies) for run in runs] or [[]]),
                     token_topk_logprob_mean=np.concatenate([np.asarray(run.token_topk_logprob_mean, np.float32)
                                                             for run in runs] or [[]]),
                     stop_entropy=np.array([run.stop_entropy for run in runs], dtype=np.float64),
                     truncated=np.array([run.truncated for run in runs], dtype=bool))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)

    def remove(self) -> None:
        """Delete this run's checkpoints (after the stage's outputs are written)."""
        shutil.rmtree(self.directory, ignore_errors=True)
