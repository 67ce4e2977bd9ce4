"""Stage generate: sample K answers per question with transformers, batched across questions.

Run: ``python -m stages.generate`` (reads params.yaml; writes ``{paths.runs}/{id,ood}.parquet``).

Each generate() call holds many questions x K runs, left-padded, never one question at a time. Per-token
entropy and the chosen token's log-prob are recorded step by step by a logits processor that sees the
model's raw logits (before temperature and top-p), so they describe the model, not the sampling knobs, and
no (batch, steps, vocab) score tensor is ever kept.

``sampling.backend: vllm`` (or ``auto`` on a CUDA host with vLLM installed) samples with vLLM instead
(stages/lib/sampling/vllm.py); both backends return SampledRun lists, so ``build_run_records`` writes the same schema.

A killed run resumes: the hf backend saves each finished generate() call under ``.dvc/tmp/generate-checkpoints/``
and a rerun with the same params, questions and model reads them back (stages/lib/sampling/checkpoints.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

from stages.lib.sampling.checkpoints import GenerationCheckpoints, generation_key
from stages.lib.io.files import cost_record, run_stage, stage_outputs, write_table
from stages.lib.models.loading import format_prompt, load_model, prompt_ids, require_prompts_fit, think_tokens
from stages.lib.params import Params, load_params
from stages.lib.questions.sources import load_questions
from stages.lib.sampling.runs import build_run_records
from stages.lib.sampling.hf import eos_and_pad, questions_per_call, sample_runs
from stages.lib.schema.machinery import DATASETS
from stages.lib.schema.tables import RUNS

log = logging.getLogger(__name__)


def run(params: Params) -> dict:
    from stages.lib.sampling.vllm import VllmGenerator, resolve_backend  # vLLM itself is imported only when used

    backend = resolve_backend(params.sampling.backend)
    if backend == "vllm":
        vllm = VllmGenerator.open(params)
        tokenizer, eos_ids = vllm.tokenizer, vllm.eos_ids
    else:
        model, tokenizer = load_model(params.model.name, params.paths.toy_model, params.model.device,
                                      params.model.dtype, params.model.revision)
        eos_ids, pad_id = eos_and_pad(model, tokenizer)
    think = think_tokens(tokenizer)
    if think.end_id is None:
        log.warning("tokenizer has no single </think> token: every run is flagged think_missing")
    question_files = [Path(params.paths.questions) / f"{dataset}.jsonl" for dataset in DATASETS]
    position_limit = None if backend == "vllm" else getattr(model.config, "max_position_embeddings", None)
    for path in question_files:  # every prompt fits the model before anything is generated
        questions = load_questions(path)
        require_prompts_fit([len(prompt_ids(tokenizer, format_prompt(params.sampling.prompt_template, q)))
                             for q in questions["question"]],
                            questions["question_id"], params.sampling.max_new_tokens, position_limit, path)
    checkpoints = GenerationCheckpoints(generation_key(params, question_files))
    with stage_outputs() as outputs, cost_record(params.paths.metrics, "generate", outputs) as cost:
        out_dir = outputs.path(params.paths.runs)
        out_dir.mkdir()
        cost.update(backend=backend, model=params.model.name, model_revision=params.model.revision, sequences=0,
                    tokens_generated=0, generate_calls=0)
        for offset, dataset in enumerate(DATASETS):
            questions = load_questions(Path(params.paths.questions) / f"{dataset}.jsonl")
            prompts = [prompt_ids(tokenizer, format_prompt(params.sampling.prompt_template, q))
                       for q in questions["question"]]
            seed = params.seed + 1_000_003 * offset
            if backend == "vllm":
                runs = vllm.sample(prompts, seed, checkpoints, dataset)
            else:
                runs = sample_runs(model, prompts, params.sampling, eos_ids, pad_id, seed, checkpoints=checkpoints,
                                   dataset=dataset)
            frame = build_run_records(questions, prompts, runs, tokenizer, think)
            write_table(frame, RUNS, out_dir / f"{dataset}.parquet")
            if len(frame):
                log.info("%s: %d runs, accuracy %.3f, think missing %.3f, truncated %.3f", dataset, len(frame),
                         frame["correct"].mean(), frame["think_missing"].mean(), frame["truncated"].mean())
            cost["sequences"] += len(frame)
            cost["tokens_generated"] += int(frame["n_generated"].sum())
            cost["generate_calls"] += (-(-len(prompts) // vllm.questions_per_call(len(prompts))) if backend == "vllm"
                                       else -(-len(prompts) // questions_per_call(params.sampling)))
        cost["calls_resumed"] = checkpoints.resumed
    checkpoints.remove()  # the outputs are in place: nothing left to resume
    return cost


def main() -> None:
    run(load_params())


if __name__ == "__main__":
    run_stage(main, __doc__)
