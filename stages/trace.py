"""Stage trace: one teacher-forced pass per run; hidden states at the chosen positions and layers.

Run with ``python -m stages.trace``. Reads the runs and the model; writes ``{paths.hidden}/`` (the arrays, their
index and ``HiddenMeta``, see stages/lib/schema.py; each array is checked against its meta before the directory is
renamed into place) and its cost record. The tracing itself is stages/lib/tracing.py."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap

from stages.lib.common import cost_record, read_table, run_stage, setup_logging, stage_outputs, write_model, write_table
from stages.lib.models import load_config, load_model
from stages.lib.params import load_params
from stages.lib.schema import (
    DATASETS,
    HIDDEN_INDEX_COLUMNS,
    RUN_COLUMNS,
    RUN_KEY,
    HiddenMeta,
    hidden_files,
    require_finite_hidden,
    validate_hidden,
)
from stages.lib.tracing import nnsight_model, require_nnsight, resolve_layers, trace_runs

log = logging.getLogger(__name__)


def main() -> None:
    setup_logging()
    params = load_params()
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
            runs = read_table(Path(params.paths.runs) / f"{dataset}.parquet", RUN_COLUMNS, RUN_KEY)
            array_path, index_path, meta_path = hidden_files(out_dir, dataset)
            shape = (len(runs), len(positions), len(layers), model.config.hidden_size)
            out = open_memmap(array_path, mode="w+", dtype=np.float16, shape=shape)
            index, passes = trace_runs(traced, runs, positions, layers, params.trace.batch_size, pad_id, out,
                                       backend=params.trace.backend, max_batch_tokens=params.trace.max_batch_tokens)
            out.flush()
            del out
            meta = HiddenMeta(positions=list(positions), layers=layers, hidden_size=model.config.hidden_size,
                              dtype="float16", model=params.model.name, model_revision=params.model.revision)
            # the array as written, checked against its meta and index before the directory is renamed into place
            written = np.load(array_path, mmap_mode="r")
            validate_hidden(written, index, meta, array_path)
            require_finite_hidden(written, index, array_path)
            del written
            write_table(index, index_path, HIDDEN_INDEX_COLUMNS, RUN_KEY)
            write_model(meta, meta_path)
            log.info("%s: hidden states %s -> %s", dataset, shape, array_path)
            cost["sequences"] += len(runs)
            cost["tokens_processed"] += int(index["sequence_length"].sum())
            cost["forward_passes"] += passes


if __name__ == "__main__":
    run_stage(main, __doc__)
