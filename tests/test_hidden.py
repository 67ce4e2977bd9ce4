"""The sharded hidden-state store (stages/lib/hidden/store.py): the reader indexes like the 4-d array it replaces, each
shard is checked with a one-line error, mapped pages are released, and the trace stage writes shards that stay
byte-identical when a position is added (so DVC stores and moves only the new one)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import link_local_model
from test_probes import resident_kib

from stages import generate, trace
from stages.lib.hidden.store import HiddenStates, create_hidden, finish_hidden, open_hidden, write_hidden
from stages.lib.probes.linear import LogisticProbe
from stages.lib.probes.fitting import location_features, probe_features, release_mapped_pages
from stages.lib.questions.sources import questions_frame, write_questions
from stages.lib.schema.tables import HiddenMeta, hidden_files, hidden_shard
from stages.lib.schema.machinery import SchemaError

ROOT = Path(__file__).resolve().parents[1]
POSITIONS = ["tbg", "think_end", "slt"]


def meta_for(shape) -> HiddenMeta:
    return HiddenMeta(positions=POSITIONS[:shape[1]], layers=list(range(shape[2])), hidden_size=shape[3],
                      dtype="float16", model="synthetic")


def index_for(runs: int) -> pd.DataFrame:
    return pd.DataFrame({"row": np.arange(runs), "question_id": [f"q{i // 2}" for i in range(runs)],
                         "run_id": np.arange(runs) % 2, "sequence_length": 9, "think_end_fallback": False})


def written(tmp_path, shape=(7, 3, 4, 5), seed=0):
    array = np.random.default_rng(seed).standard_normal(shape).astype(np.float16)
    write_hidden(tmp_path, "id", array, index_for(shape[0]), meta_for(shape))
    return array, open_hidden(tmp_path, "id")[0]


@pytest.mark.parametrize("key", [
    (np.array([4, 0, 2]), 1, 2, slice(None)),      # location_features
    (np.array([4, 0, 2]), 2, slice(1, 3), slice(None)),  # probe_features over a layer range
    (slice(None), 0), (3,), 5, (slice(1, 6, 2), -1, 0, 3), (np.array([1, 1]), 1, slice(None), 0),
    (slice(None), 1, slice(None), np.array([0, 4])),  # numpy moves the broadcast axes first here
    (slice(None), slice(None)), (np.array([6, 1]), slice(0, 2)), (2, slice(1, 3), 1),
    (slice(None), slice(2, 2)),
])
def test_the_shards_index_like_the_array_they_replace(tmp_path, key):
    array, hidden = written(tmp_path)
    assert (hidden.shape, hidden.dtype, len(hidden)) == (array.shape, np.float16, 7)
    np.testing.assert_array_equal(hidden[key], array[key])
    assert hidden[key].shape == array[key].shape


def test_probe_features_read_the_shards_as_the_array(tmp_path):
    array, hidden = written(tmp_path)
    rows = np.array([5, 1, 3])
    np.testing.assert_array_equal(location_features(hidden, rows, 2, 1), location_features(array, rows, 2, 1))
    np.testing.assert_array_equal(np.asarray(hidden), array)
    assert all(isinstance(shard, np.memmap) for shard in hidden.shards)


def test_one_file_per_position_with_the_layout_of_hidden_files(tmp_path):
    written(tmp_path)
    shard_dir, index_path, meta_path = hidden_files(tmp_path, "id")
    assert sorted(p.name for p in shard_dir.iterdir()) == ["slt.npy", "tbg.npy", "think_end.npy"]
    assert index_path.exists() and meta_path.exists()
    assert np.load(hidden_shard(shard_dir, "slt")).shape == (7, 4, 5)


def test_a_missing_shard_names_the_file_and_the_position(tmp_path):
    written(tmp_path)
    path = hidden_shard(hidden_files(tmp_path, "id")[0], "think_end")
    path.unlink()
    with pytest.raises(SchemaError) as error:
        open_hidden(tmp_path, "id")
    assert str(error.value).startswith(f"{path}: not found: the hidden states at position `think_end` that ")
    assert "\n" not in str(error.value)


def test_a_shard_of_the_wrong_shape_or_dtype_is_named(tmp_path):
    written(tmp_path)
    path = hidden_shard(hidden_files(tmp_path, "id")[0], "slt")
    np.save(path, np.zeros((7, 3, 5), dtype=np.float16))
    with pytest.raises(SchemaError, match=rf"^{path}: position `slt`: array shape \(7, 3, 5\); expected \(runs, "
                                          r"layers, hidden\) = \(7, 4, 5\)$"):
        open_hidden(tmp_path, "id")
    np.save(path, np.zeros((7, 4, 5), dtype=np.float32))
    with pytest.raises(SchemaError, match=rf"^{path}: position `slt`: array dtype float32; expected float16$"):
        open_hidden(tmp_path, "id")


def test_a_non_finite_shard_is_refused_before_its_index_is_written(tmp_path):
    meta = meta_for((4, 2, 2, 3))
    hidden = create_hidden(tmp_path, "id", 4, meta)
    values = np.ones((4, 2, 2, 3), dtype=np.float16)
    values[2, 1, 0, 1] = np.inf  # a float16 overflow
    hidden[np.arange(4)] = values
    path = hidden_shard(hidden_files(tmp_path, "id")[0], "think_end")
    with pytest.raises(SchemaError, match=rf"^{path}: non-finite hidden state in row 2 \(question_id='q1' run_id=0\)"):
        finish_hidden(hidden, tmp_path, "id", index_for(4), meta)
    assert not hidden_files(tmp_path, "id")[1].exists()


def test_writes_are_assigned_per_row_and_other_keys_refused(tmp_path):
    hidden = HiddenStates([np.zeros((3, 2, 2), np.float16), np.zeros((3, 2, 2), np.float16)])
    hidden[[2, 0]] = np.arange(16, dtype=np.float16).reshape(2, 2, 2, 2)
    np.testing.assert_array_equal(hidden[0, 1], [[12, 13], [14, 15]])
    with pytest.raises(IndexError):
        hidden[0, 1] = 3
    with pytest.raises(IndexError):
        hidden[np.array([0, 1]), [0, 1]]  # numpy would broadcast rows against positions: not offered


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_pages_of_every_shard_are_released_after_reading(tmp_path):
    """As test_probes' page-release test, across shards: reading every (position, layer) of 160 MB of shards
    through probe_features keeps resident memory at about one location's worth."""
    meta = HiddenMeta(positions=["tbg", "think_end", "slt", "think_50"], layers=list(range(10)), hidden_size=2048,
                      dtype="float16", model="synthetic")
    hidden = create_hidden(tmp_path, "id", 1000, meta)
    for shard in hidden.shards:
        shard[:] = 1
    finish_hidden(hidden, tmp_path, "id", index_for(1000), meta)
    del hidden
    hidden = open_hidden(tmp_path, "id")[0]
    rows = np.arange(1000)
    before = resident_kib()
    for position in range(4):
        for layer in range(10):
            features = location_features(hidden, rows, position, layer)
    assert features.shape == (1000, 2048) and features.dtype == np.float32
    assert resident_kib() - before < 40_000  # one location is 4 MB as float16 (8 MB as float32); all are 160 MB
    for position in range(4):
        hidden[:, position, :, 0].astype(np.float32).sum()  # touches every page of every shard; no release after it
    touched = resident_kib() - before
    assert touched > 100_000
    release_mapped_pages(hidden)
    assert resident_kib() - before < touched - 80_000
    probe = LogisticProbe(position="slt", layer=2, layer_end=4)
    assert probe_features(probe, hidden, rows[:10], meta.positions, meta.layers).shape == (10, 3 * 2048)


def shard_md5s(directory: Path) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*.npy"))}


def test_adding_a_position_leaves_the_other_shards_byte_identical(tiny_lm_dir, tmp_path, monkeypatch):
    """trace twice on the same runs, with positions [tbg, slt] then [slt, think_end, tbg]: the tbg and slt
    shards keep their bytes (so their DVC content hashes), and only think_end's file is new."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["paths"] = {name: str(tmp_path / name) for name in raw["paths"]}
    raw["model"].update(name=link_local_model(tmp_path, tiny_lm_dir), revision=None)
    raw["sampling"].update(runs=3, max_new_tokens=8)
    raw["trace"].update(positions=["tbg", "slt"], batch_size=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    questions = tmp_path / "questions"
    questions.mkdir()
    for dataset, rows in (("id", [("q1", "1+2", "3"), ("q2", "4+5", "9")]), ("ood", [("o1", "7+8", "15")])):
        write_questions(questions_frame(rows, dataset, "jsonl:x"), questions / f"{dataset}.jsonl")
    monkeypatch.chdir(tmp_path)
    generate.main()
    trace.main()
    first = shard_md5s(tmp_path / "hidden")
    assert sorted(first) == ["id/slt.npy", "id/tbg.npy", "ood/slt.npy", "ood/tbg.npy"]
    trace.main()
    assert shard_md5s(tmp_path / "hidden") == first  # the same runs, model and params: the same bytes

    raw["trace"]["positions"] = ["slt", "think_end", "tbg"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    trace.main()
    second = shard_md5s(tmp_path / "hidden")
    assert {name: md5 for name, md5 in second.items() if name in first} == first
    assert sorted(set(second) - set(first)) == ["id/think_end.npy", "ood/think_end.npy"]
    hidden, _, meta = open_hidden(tmp_path / "hidden", "id")
    assert meta.positions == ["slt", "think_end", "tbg"] and hidden.shape[:2] == (6, 3)
