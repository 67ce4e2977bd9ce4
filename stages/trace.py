"""Stage trace: one teacher-forced pass per run; hidden states at the chosen positions and layers.

Run with ``python -m stages.trace``. Reads the runs and the model; writes ``{paths.hidden}/`` (one shard per dataset
and position, their index and ``HiddenMeta``, see stages/lib/hidden/store.py; each shard is checked against the meta
before the directory is renamed into place) and its cost record. The tracing itself is stages/lib/hidden/tracing.py."""

from __future__ import annotations

import logging

from stages.lib.io.files import cost_record, read_table, run_stage, stage_outputs
from stages.lib.hidden.store import create_hidden, finish_hidden
from stages.lib.models.loading import load_config, load_model
from stages.lib.params import Params, load_params
from stages.lib.schema.machinery import DATASETS
from stages.lib.schema.tables import RUNS, HiddenMeta
from stages.lib.hidden.tracing import nnsight_model, require_nnsight, resolve_layers, trace_runs

log = logging.getLogger(__name__)


def run(params: Params) -> dict:
    if params.trace.backend == "nnsight":
        require_nnsight()  # before the model loads: a missing extra fails in a second, not after minutes
    # trace.layers checked before the weights load
    config = load_config(params.model.name, params.paths.toy_model, params.model.revision)
    layers = resolve_layers(params.trace.layers, config.num_hidden_layers + 1)
    model, tokenizer = load_model(params.model.name, params.paths.toy_model, params.model.device, params.model.dtype,
                                  params.model.revision)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    traced = nnsight_model(model, tokenizer) if params.trace.backend == "nnsight" else model
    log.info("trace backend: %s", params.trace.backend)
    positions = tuple(params.trace.positions)
    with stage_outputs() as outputs, cost_record(params.paths.metrics, "trace", outputs) as cost:
        out_dir = outputs.path(params.paths.hidden)
        out_dir.mkdir()
        cost.update(sequences=0, tokens_processed=0, forward_passes=0)
        for dataset in DATASETS:
            runs = read_table(RUNS, RUNS.path(params.paths.runs, dataset))
            meta = HiddenMeta(positions=list(positions), layers=layers, hidden_size=model.config.hidden_size,
                              dtype="float16", model=params.model.name, model_revision=params.model.revision)
            out = create_hidden(out_dir, dataset, len(runs), meta)  # (runs, positions, layers, hidden), sharded
            index, passes = trace_runs(traced, runs, positions, layers, params.trace.batch_size, pad_id, out,
                                       backend=params.trace.backend, max_batch_tokens=params.trace.max_batch_tokens)
            # each shard as written, checked against the meta and index before the directory is renamed into place
            finish_hidden(out, out_dir, dataset, index, meta)
            del out
            log.info("%s: hidden states %s -> %s/%s/ (one shard per position)", dataset,
                     (len(runs), len(positions), len(layers), meta.hidden_size), out_dir, dataset)
            cost["sequences"] += len(runs)
            cost["tokens_processed"] += int(index["sequence_length"].sum())
            cost["forward_passes"] += passes
    return cost


def main() -> None:
    run(load_params())


if __name__ == "__main__":
    run_stage(main, __doc__)
