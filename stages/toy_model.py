"""Stage toy_model: train the embedded default LM (a tiny Qwen3 on arithmetic chains) and save it in HF format.

Run with ``python -m stages.toy_model``; writes ``{paths.toy_model}`` and its cost record
(training: stages/lib/models/toy.py). When ``model.name`` is not ``toy`` it trains nothing and writes a placeholder
directory at once (``save_skipped``): a real run does not pay for the toy's training. For a local model (under
data/models/, a dep of this stage) the placeholder holds the model's content hash, so that generate and trace, which
depend on it, rerun exactly when the named model changes."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from stages.lib.questions import arithmetic
from stages.lib.io.files import content_sha256, cost_record, run_stage, stage_outputs
from stages.lib.errors import UserError
from stages.lib.param_fields import MODELS_DIR, inside, is_local_model
from stages.lib.params import Params, load_params
from stages.lib.models.toy import (
    VALIDATION_QUESTIONS,
    build_model,
    build_tokenizer,
    check_round_trip,
    greedy_accuracy,
    save,
    save_skipped,
    train,
)

log = logging.getLogger(__name__)


def run(params: Params) -> dict:
    if params.model.name != "toy":
        if (is_local_model(params.model.name) or inside(params.model.name, MODELS_DIR)) \
                and not Path(params.model.name).exists():
            raise UserError(f"params.yaml: `model.name` = {params.model.name!r}: no such file or directory; copy the "
                            f"model there and `dvc add` it (the trained toy model in {params.paths.toy_model} is left "
                            f"as it is)")
        with stage_outputs() as outputs, cost_record(params.paths.metrics, "toy_model", outputs) as cost:
            cost["skipped"] = "model.name is not toy"
            local = is_local_model(params.model.name) and Path(params.model.name).exists()
            save_skipped(outputs.path(params.paths.toy_model),
                         content_sha256(params.model.name) if local else None)
        log.info("model.name=%r is not `toy`: nothing trained; wrote the placeholder %s", params.model.name,
                 params.paths.toy_model)
        return cost
    toy = params.toy
    torch.manual_seed(params.seed)
    rng = np.random.default_rng([params.seed, 0])  # stream 0: training chains; questions use other streams
    with stage_outputs() as outputs, cost_record(params.paths.metrics, "toy_model", outputs) as cost:
        tokenizer = build_tokenizer()
        model = build_model(toy, tokenizer)
        log.info("toy model: %d layers x %d wide, %d parameters, vocabulary %d",
                 toy.layers, toy.hidden_size, model.num_parameters(), len(tokenizer))
        cost.update(train(model, tokenizer, toy, rng))
        validation_rng = np.random.default_rng([params.seed, 99])
        questions = arithmetic.make_questions(VALIDATION_QUESTIONS, validation_rng, toy.min_terms, toy.max_terms,
                                              toy.max_operand)
        cost["greedy_accuracy_id"] = greedy_accuracy(model, tokenizer, questions)
        log.info("greedy accuracy on %d fresh in-distribution chains: %.2f", len(questions),
                 cost["greedy_accuracy_id"])
        directory = outputs.path(params.paths.toy_model)
        save(directory, model, tokenizer, toy, params.seed)
        check_round_trip(directory, model, tokenizer)
        log.info("wrote %s", params.paths.toy_model)
    return cost


def main() -> None:
    run(load_params())


if __name__ == "__main__":
    run_stage(main, __doc__)
