"""Stage generate: sample K answers per question with transformers, batched across questions.

Run: ``python -m stages.generate`` (reads params.yaml; writes ``{paths.runs}/{id,ood}.parquet``).

Each generate() call holds many questions x K runs, left-padded, never one question at a time. Per-token
entropy and the chosen token's log-prob are recorded step by step by a logits processor that sees the
model's raw logits (before temperature and top-p), so they describe the model, not the sampling knobs, and
no (batch, steps, vocab) score tensor is ever kept.

``sampling.backend: vllm`` (or ``auto`` on a CUDA host with vLLM installed) samples with vLLM instead
(stages/lib/sampling_vllm.py); both backends return SampledRun lists, so ``build_run_records`` writes the same schema.
"""

from __future__ import annotations

import logging
from pathlib import Path

from stages.lib.common import cost_record, run_stage, setup_logging, stage_outputs, write_table
from stages.lib.models import load_model, prompt_ids, require_prompts_fit, think_tokens
from stages.lib.params import load_params
from stages.lib.questions import load_questions
from stages.lib.runs import build_run_records
from stages.lib.sampling_hf import eos_and_pad, questions_per_call, sample_runs
from stages.lib.schema import DATASETS, RUN_COLUMNS, RUN_KEY

log = logging.getLogger(__name__)


def main() -> None:
    from stages.lib.sampling_vllm import VllmGenerator, resolve_backend  # vLLM itself is imported only when used

    setup_logging()
    params = load_params()
    backend = resolve_backend(params.sampling.backend)
    if backend == "vllm":
        vllm = VllmGenerator.open(params)
        tokenizer, eos_ids = vllm.tokenizer, vllm.eos_ids
    else:
        model, tokenizer = load_model(params.model.name, params.paths.toy_model, params.model.device,
                                      params.model.dtype)
        eos_ids, pad_id = eos_and_pad(model, tokenizer)
    think = think_tokens(tokenizer)
    if think.end_id is None:
        log.warning("tokenizer has no single </think> token: every run is flagged think_missing")
    position_limit = None if backend == "vllm" else getattr(model.config, "max_position_embeddings", None)
    for dataset in DATASETS:  # every prompt fits the model before anything is generated
        path = Path(params.paths.questions) / f"{dataset}.jsonl"
        questions = load_questions(path)
        require_prompts_fit([len(prompt_ids(tokenizer, q)) for q in questions["question"]],
                            questions["question_id"], params.sampling.max_new_tokens, position_limit, path)
    with stage_outputs() as outputs, cost_record(params.paths.metrics, "generate", outputs) as cost:
        out_dir = outputs.path(params.paths.runs)
        out_dir.mkdir()
        cost.update(backend=backend, sequences=0, tokens_generated=0, generate_calls=0)
        for offset, dataset in enumerate(DATASETS):
            questions = load_questions(Path(params.paths.questions) / f"{dataset}.jsonl")
            prompts = [prompt_ids(tokenizer, q) for q in questions["question"]]
            seed = params.seed + 1_000_003 * offset
            if backend == "vllm":
                runs = vllm.sample(prompts, seed)
            else:
                runs = sample_runs(model, prompts, params.sampling, eos_ids, pad_id, seed)
            frame = build_run_records(questions, prompts, runs, tokenizer, think)
            write_table(frame, out_dir / f"{dataset}.parquet", RUN_COLUMNS, RUN_KEY)
            if len(frame):
                log.info("%s: %d runs, accuracy %.3f, think missing %.3f, truncated %.3f", dataset, len(frame),
                         frame["correct"].mean(), frame["think_missing"].mean(), frame["truncated"].mean())
            cost["sequences"] += len(frame)
            cost["tokens_generated"] += int(frame["n_generated"].sum())
            cost["generate_calls"] += (int(len(prompts) > 0) if backend == "vllm"
                                       else -(-len(prompts) // questions_per_call(params.sampling)))


if __name__ == "__main__":
    run_stage(main, __doc__)
