"""Stage forced_answers: every run's answer forced at prefixes of its reasoning (``early_exit.prefixes``).

Run with ``python -m stages.forced_answers``. Reads the runs, the questions (gold answers) and the model; writes
``{paths.forced_answers}/{id,ood}.parquet`` (``schema.FORCED_ANSWERS.columns``, one row per run and prefix) and
its cost record. The cut, the forced sequence and the greedy decoding are stages/lib/early_exit/forced.py; the
stopping rules that use them are the early_exit stage. Decoding uses the generation backend
(``sampling.backend``): transformers, or one vLLM engine.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from stages.lib.io.files import cost_record, read_table, run_stage, stage_outputs, write_table
from stages.lib.early_exit.forced import force_answers, greedy_answers, greedy_answers_vllm, require_traced_prefixes
from stages.lib.models.loading import load_model, think_tokens
from stages.lib.params import Params, load_params
from stages.lib.questions.sources import load_questions
from stages.lib.sampling.runs import stop_and_pad_ids
from stages.lib.schema.machinery import DATASETS
from stages.lib.schema.tables import FORCED_ANSWERS, RUNS

log = logging.getLogger(__name__)


def run(params: Params) -> dict:
    from stages.lib.sampling.vllm import VllmGenerator, resolve_backend  # vLLM itself is imported only when used

    settings = params.early_exit
    require_traced_prefixes(settings.prefixes, params.trace.positions)
    backend = resolve_backend(params.sampling.backend)
    if backend == "vllm":
        generator = VllmGenerator.open(params)
        tokenizer = generator.tokenizer
        decode = partial(greedy_answers_vllm, generator, max_new_tokens=settings.max_answer_tokens)
    else:
        model, tokenizer = load_model(params.model.name, params.paths.toy_model, params.model.device,
                                      params.model.dtype, params.model.revision)
        eos_ids, pad_id = stop_and_pad_ids(model.generation_config, tokenizer)
        decode = partial(greedy_answers, model, max_new_tokens=settings.max_answer_tokens, eos_ids=eos_ids,
                         pad_id=pad_id, batch_size=settings.batch_size)
    think = think_tokens(tokenizer)
    with stage_outputs() as outputs, cost_record(params.paths.metrics, "forced_answers", outputs) as cost:
        out_dir = outputs.path(params.paths.forced_answers)
        out_dir.mkdir()
        cost.update(backend=backend, sequences=0, tokens_generated=0, generate_calls=0)
        for dataset in DATASETS:
            runs = read_table(RUNS, RUNS.path(params.paths.runs, dataset))
            questions = load_questions(Path(params.paths.questions) / f"{dataset}.jsonl")
            gold = questions.set_index("question_id")["gold"]
            frame, calls = force_answers(tokenizer, runs, gold, settings.prefixes, settings.answer_prefix, decode,
                                         think)
            write_table(frame, FORCED_ANSWERS, FORCED_ANSWERS.path(out_dir, dataset))
            if len(frame):
                log.info("%s: forced-answer accuracy by prefix %s", dataset,
                         frame.groupby("prefix")["correct"].mean().round(3).to_dict())
            cost["sequences"] += len(frame)
            cost["tokens_generated"] += int(frame["answer_tokens"].sum())
            cost["generate_calls"] += calls
    return cost


def main() -> None:
    run(load_params())


if __name__ == "__main__":
    run_stage(main, __doc__)
