"""Question sources: the in-distribution and out-of-distribution question sets.

Used by the stage ``python -m stages.questions`` (or ``dvc repro questions``). Reads ``seed``, ``data.*``, the chain
ranges in ``toy.*`` (``min_terms``, ``max_terms``, ``max_operand``, ``ood_max_terms``, ``ood_max_operand``) and
``paths.questions``; writes ``{paths.questions}/id.jsonl`` and ``{paths.questions}/ood.jsonl``, one JSON object
per line with the columns of ``stages.lib.schema.tables.QUESTIONS.columns`` (question_id, dataset, question, gold, and
``level`` only for questions whose source gives one: MATH's ``level``, 1-5 or ``"Level 3"``).

Sources (``data.source`` for in-distribution, ``data.ood_source`` for out-of-distribution):

- ``arithmetic``: seeded chains from stages/lib/questions/arithmetic.py, the toy model's task. In distribution: the
training
  ranges (``toy.min_terms..max_terms`` operands in ``1..max_operand``); out of distribution: the rarely trained
  tail (``max_terms+1..ood_max_terms`` operands in ``1..ood_max_operand``). Ids are ``id-0000``, ``ood-0000``...
  Training draws its chains from another random stream, so short in-distribution chains (there are only a few
  hundred two-term ones) also occur in training, as ``7+5`` occurs in any pretraining corpus.
- ``jsonl:<path>``: the first ``n_questions`` (or ``n_ood_questions``) records of a JSON-lines file, blank
  lines skipped, in one of these formats, detected per line:

  - ``{id, question, answer}``: gold = ``answer``;
  - GSM8K ``{question, answer}``: gold = the text after the last ``####`` of ``answer``, thousands commas removed;
  - MATH ``{problem, solution, answer?, unique_id?}``: gold = ``answer`` if present, else the content of the
    last ``\\boxed{}`` in ``solution`` (nested braces kept).

  The question id is the record's ``id`` (or ``unique_id``), else its 1-based line number.
- ``hf:gsm8k`` (openai/gsm8k, config main, split test) and ``hf:math500`` (HuggingFaceH4/MATH-500, split test):
  the first ``n`` rows loaded with ``datasets`` (from its cache under ``HF_HUB_OFFLINE=1``), parsed exactly as the
  JSONL formats above (row ``i`` counts as line ``i``), so a local copy read as ``jsonl:<path>`` gives the same
  questions. When the Hub cannot be reached the stage fails at once (one metadata request through huggingface_hub,
  stages/lib/hub.py, so ``HTTPS_PROXY`` applies), naming the dataset and suggesting a local copy, instead of
  waiting through the ``datasets`` client's retries.
- ``none`` (out of distribution only): an empty ood.jsonl.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stages.lib.questions import arithmetic
from stages.lib import hub
from stages.lib.questions.answers import last_boxed_content
from stages.lib.params import HUB_SOURCES
from stages.lib.schema.tables import QUESTIONS
from stages.lib.schema.machinery import SchemaError, validate_frame
from stages.lib.errors import UserError

log = logging.getLogger(__name__)

QUESTION_FIELDS = [c.name for c in QUESTIONS.columns]
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_JSON_TYPES = {list: "array", dict: "object", bool: "boolean"}
# Independent random streams under params.seed; stream 0 belongs to the toy model's training chains.
ID_STREAM, OOD_STREAM = 1, 2


class QuestionSourceError(UserError):
    """A question source is missing, malformed or lacks a field; the message names the file and line."""


@dataclass(frozen=True)
class HubDataset:
    """Where a ``hf:<name>`` source lives on the Hugging Face Hub."""

    repo_id: str
    config: str | None
    split: str


HUB_DATASETS = {
    "hf:gsm8k": HubDataset("openai/gsm8k", "main", "test"),
    "hf:math500": HubDataset("HuggingFaceH4/MATH-500", None, "test"),
}
assert set(HUB_DATASETS) == set(HUB_SOURCES), "stages/lib/params.py HUB_SOURCES and HUB_DATASETS disagree"


# ---- answers ------------------------------------------------------------------------------------------------
def gsm8k_gold(answer: str) -> str:
    """The final answer after the last ``####`` of a GSM8K solution, with thousands commas removed."""
    return _THOUSANDS_COMMA.sub("", answer.rsplit("####", 1)[1].strip())


# ---- sources ------------------------------------------------------------------------------------------------
def parse_source(spec: str) -> tuple[str, Path | HubDataset | None]:
    """``"arithmetic"`` -> ("arithmetic", None); ``"jsonl:data/x.jsonl"`` -> ("jsonl", Path);
    ``"hf:gsm8k"`` -> ("hf", HubDataset); ``"none"`` -> ("none", None)."""
    if spec in ("arithmetic", "none"):
        return spec, None
    if spec.startswith("jsonl:") and len(spec) > len("jsonl:"):
        return "jsonl", Path(spec[len("jsonl:"):])
    if spec in HUB_DATASETS:
        return "hf", HUB_DATASETS[spec]
    raise QuestionSourceError(f"unknown question source {spec!r}; expected `arithmetic`, `jsonl:<path>`, "
                              f"{', '.join(f'`{s}`' for s in HUB_DATASETS)} or `none`")


def read_jsonl_records(path: Path, limit: int | None = None) -> list[tuple[int, dict]]:
    """``(line_number, record)`` for the first ``limit`` non-blank lines of ``path`` (1-based line numbers)."""
    if not path.is_file():
        raise QuestionSourceError(f"{path}: question file not found")
    records: list[tuple[int, dict]] = []
    with path.open("rb") as lines:  # decoded line by line, so a bad byte is reported with its line
        for line_number, raw in enumerate(lines, start=1):
            if limit is not None and len(records) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise QuestionSourceError(f"{path}:{line_number}: not UTF-8 (byte {raw[error.start]:#04x} at column "
                                          f"{error.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise QuestionSourceError(f"{path}:{line_number}: malformed JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise QuestionSourceError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            records.append((line_number, record))
    return records


def question_from_record(record: dict, where: str, line_number: int) -> tuple[str, str, str]:
    """``(question_id, question, gold)`` from one record in any supported format; ``where`` prefixes errors."""
    def field(name: str) -> str:
        value = record.get(name)
        if isinstance(value, (list, dict, bool)):  # str() would turn it into its Python repr
            raise QuestionSourceError(f"{where}: line {line_number}: field `{name}` is a JSON "
                                      f"{_JSON_TYPES[type(value)]}; expected a string (or a number)")
        if value is None or str(value).strip() == "":
            raise QuestionSourceError(f"{where}: line {line_number} is missing field `{name}`")
        return str(value)

    if "problem" in record:  # MATH
        question = field("problem")
        if record.get("answer") not in (None, ""):
            gold = field("answer")
        else:
            gold = last_boxed_content(field("solution"))
            if not gold:
                raise QuestionSourceError(f"{where}: line {line_number} has no field `answer` and no "
                                          f"\\boxed{{}} in field `solution`")
    else:  # {id, question, answer} or GSM8K
        question = field("question")
        answer = field("answer")
        gold = gsm8k_gold(answer) if "####" in answer else answer.strip()
    identifier = record.get("id", record.get("unique_id"))
    question_id = str(identifier) if identifier not in (None, "") else str(line_number)
    return question_id, question, gold


def record_level(record: dict) -> int | None:
    """MATH's difficulty level of a record: ``level`` as ``3`` or ``"Level 3"``; None when absent or not a level."""
    value = record.get("level")
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(?:level\s*)?([0-9]+)\s*", str(value), flags=re.IGNORECASE)
    return int(match.group(1)) if match else None


def jsonl_levels(path: Path, n: int) -> list[int | None]:
    """``record_level`` of the first ``n`` records of a JSONL file, in the order of ``jsonl_questions``."""
    return [record_level(record) for _, record in read_jsonl_records(path, limit=n)]


def jsonl_questions(path: Path, n: int) -> list[tuple[str, str, str]]:
    """The first ``n`` records of a JSONL file as ``(question_id, question, gold)``."""
    records = read_jsonl_records(path, limit=n)
    if len(records) < n:
        log.warning("%s: asked for %d questions, the file holds %d", path, n, len(records))
    return [question_from_record(record, str(path), line_number) for line_number, record in records]


def hub_rows_questions(rows, spec: str, n: int) -> list[tuple[str, str, str]]:
    """The first ``n`` dataset rows (mappings in the GSM8K or MATH format) as ``(question_id, question, gold)``.

    Row ``i`` (1-based) is parsed as line ``i`` of a JSONL copy would be, so ids and golds agree with ``jsonl:``.
    """
    parsed = []
    for row_number, row in enumerate(rows, start=1):
        if row_number > n:
            break
        parsed.append(question_from_record(dict(row), spec, row_number))
    if len(parsed) < n:
        log.warning("%s: asked for %d questions, the dataset holds %d", spec, n, len(parsed))
    return parsed


def hub_unreachable_error(spec: str, dataset: HubDataset, reason: str) -> QuestionSourceError:
    return QuestionSourceError(
        f"data source `{spec}`: cannot load {dataset.repo_id} (split {dataset.split}) because the Hugging Face Hub "
        f"is unreachable or offline ({reason}). Use a local copy instead: save its rows as JSON lines and set "
        f"`jsonl:<path>` (the GSM8K and MATH formats are understood), or set HF_HUB_OFFLINE=1 to read a copy "
        f"already in the datasets cache.")


def hub_unreachable_reason(dataset: HubDataset, endpoint: str | None = None,
                           revision: str | None = None) -> str | None:
    """Why the Hub did not answer a metadata request for ``dataset`` (huggingface_hub's session and timeout, so
    ``HF_ENDPOINT`` and the proxy variables apply); None when it did. See stages/lib/hub.py."""
    return hub.unreachable_reason(dataset.repo_id, repo_type="dataset", revision=revision, endpoint=endpoint)


def hub_questions(spec: str, dataset: HubDataset, n: int,
                  revision: str | None = None) -> tuple[list[tuple[str, str, str]], list[int | None]]:
    """The first ``n`` questions of a ``hf:`` source (at ``revision``), loaded with ``datasets``, and their
    ``record_level``.

    The ``datasets`` client retries a failed connection for about 25 s; one metadata request first makes an
    unreachable Hub fail at once (and a dataset the Hub does not have fail with its name). Under
    ``HF_HUB_OFFLINE=1`` (or ``HF_DATASETS_OFFLINE=1``) nothing is asked and ``datasets`` reads only its cache.
    ``revision`` (``data.revision``) pins the dataset's branch, tag or commit.
    """
    import datasets  # imported here: a second of start-up that the arithmetic and jsonl sources do not need

    if not datasets.config.HF_HUB_OFFLINE:
        try:
            reason = hub_unreachable_reason(dataset, revision=revision)
        except hub.HubRepoError as error:
            raise QuestionSourceError(f"data source `{spec}`: {error}") from None
        if reason is not None:
            raise hub_unreachable_error(spec, dataset, reason)
    try:
        rows = datasets.load_dataset(dataset.repo_id, dataset.config, split=dataset.split, revision=revision)
    except ConnectionError as error:  # what datasets raises offline: "Couldn't reach '<repo>' on the Hub (...)"
        raise hub_unreachable_error(spec, dataset, str(error)) from error
    log.info("%s: loaded %s (split %s): %d rows", spec, dataset.repo_id, dataset.split, len(rows))
    parsed = hub_rows_questions(rows, spec, n)
    return parsed, [record_level(dict(rows[index])) for index in range(len(parsed))]


def arithmetic_questions(dataset: str, n: int, seed: int, min_terms: int, max_terms: int, max_operand: int,
                         ood_max_terms: int, ood_max_operand: int) -> list[tuple[str, str, str]]:
    """``n`` seeded chains as ``(question_id, question, gold)``: training-range ones for ``id``, tail ones for
    ``ood``."""
    if dataset == "id":
        pairs = arithmetic.make_questions(n, np.random.default_rng([seed, ID_STREAM]), min_terms, max_terms,
                                          max_operand)
    else:
        pairs = arithmetic.make_ood_questions(n, np.random.default_rng([seed, OOD_STREAM]), max_terms,
                                              ood_max_terms, ood_max_operand)
    return [(f"{dataset}-{i:04d}", question, gold) for i, (question, gold) in enumerate(pairs)]


def questions_frame(rows: list[tuple[str, str, str]], dataset: str, source: str,
                    levels: list[int | None] | None = None) -> pd.DataFrame:
    """A QUESTIONS.columns frame for one dataset, validated (unique question ids) against the schema; ``levels``
    (one per row, None = none) fills ``level``."""
    frame = pd.DataFrame(
        {"question_id": [r[0] for r in rows], "dataset": [dataset] * len(rows),
         "question": [r[1] for r in rows], "gold": [r[2] for r in rows]},
        columns=QUESTION_FIELDS, dtype=object)
    frame["level"] = _levels(levels if levels is not None else [None] * len(rows))
    return validate_frame(frame, QUESTIONS.columns, source, key=QUESTIONS.key)


def _levels(values) -> pd.arrays.IntegerArray:
    return pd.array([None if value is None or pd.isna(value) else int(value) for value in values], dtype="Int64")


# ---- files --------------------------------------------------------------------------------------------------
def write_questions(frame: pd.DataFrame, path: Path) -> None:
    with path.open("w", encoding="utf-8") as out:
        for record in frame[QUESTION_FIELDS].to_dict(orient="records"):
            # no level, no key: the files of sources without levels stay as they were
            record = {key: int(value) if key == "level" else value for key, value in record.items()
                      if not (key == "level" and pd.isna(value))}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    log.info("wrote %s: %d questions", path, len(frame))


def load_questions(path: str | Path) -> pd.DataFrame:
    """Read one ``{id,ood}.jsonl`` written by this stage and validate it against QUESTIONS.columns."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: not found; run the questions stage (`dvc repro questions`)")
    records = [record for _, record in read_jsonl_records(path)]
    frame = pd.DataFrame(records, columns=QUESTION_FIELDS, dtype=object)
    frame["level"] = _levels(frame["level"])
    validate_frame(frame, QUESTIONS.columns, path, key=QUESTIONS.key)
    log.info("read %s: %d questions", path, len(frame))
    return frame


def build_dataset(dataset: str, spec: str, n: int, seed: int, toy, revision: str | None = None) -> pd.DataFrame:
    """Questions of one dataset (``id`` or ``ood``) from source ``spec``; ``revision`` pins a ``hf:`` source."""
    kind, where = parse_source(spec)  # where: the JSONL file, or the HubDataset of a `hf:` source
    if kind == "none":
        if dataset == "id":
            raise QuestionSourceError("data.source cannot be `none`: the in-distribution set is required")
        rows: list[tuple[str, str, str]] = []
    levels = None
    if kind == "arithmetic":
        rows = arithmetic_questions(dataset, n, seed, toy.min_terms, toy.max_terms, toy.max_operand,
                                    toy.ood_max_terms, toy.ood_max_operand)
    elif kind == "hf":
        rows, levels = hub_questions(spec, where, n, revision)
    elif kind == "jsonl":
        rows, levels = jsonl_questions(where, n), jsonl_levels(where, n)
    if dataset == "id" and not rows:
        raise QuestionSourceError(f"{spec}: no in-distribution questions")
    return questions_frame(rows, dataset, spec, levels)
