"""Tests for stages/questions.py: answer extraction, the JSONL formats, error messages and the stage itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from stages import questions as questions_stage
from stages.lib.questions import arithmetic, sources as questions
from stages.lib.questions.sources import (
    QuestionSourceError,
    arithmetic_questions,
    gsm8k_gold,
    jsonl_questions,
    load_questions,
    parse_source,
    question_from_record,
)
from stages.lib.schema.machinery import SchemaError

REPO = Path(__file__).resolve().parents[1]
GSM8K = Path("/work/shared/data/gsm8k_test.jsonl")
MATH500 = Path("/work/shared/data/math500_test.jsonl")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---- answers ------------------------------------------------------------------------------------------------
def test_gsm8k_gold_takes_the_text_after_the_last_marker_without_thousands_commas():
    assert gsm8k_gold("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18") == "18"
    assert gsm8k_gold("a #### b\n#### 1,234,567") == "1234567"
    assert gsm8k_gold("#### -3.5") == "-3.5"


# ---- record formats ----------------------------------------------------------------------------------------
def test_plain_format_uses_id_and_answer():
    assert question_from_record({"id": "q7", "question": "1+2", "answer": 3}, "f", 1) == ("q7", "1+2", "3")


def test_gsm8k_format_numbers_questions_by_line():
    record = {"question": "How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}
    assert question_from_record(record, "f", 12) == ("12", "How many?", "7")


def test_math_format_prefers_answer_then_falls_back_to_the_last_box():
    record = {"problem": "Halve 1.", "solution": r"It is $\boxed{\frac{1}{2}}$.", "unique_id": "test/x/1.json"}
    assert question_from_record(record, "f", 1) == ("test/x/1.json", "Halve 1.", r"\frac{1}{2}")
    assert question_from_record({**record, "answer": "0.5"}, "f", 1)[2] == "0.5"


def test_math_format_without_answer_or_box_is_an_error():
    with pytest.raises(QuestionSourceError, match=r"line 4 has no field `answer` and no \\boxed"):
        question_from_record({"problem": "p", "solution": "no box"}, "f", 4)


@pytest.mark.parametrize("record, field", [
    ({"question": "1+2"}, "answer"),
    ({"answer": "3"}, "question"),
    ({"problem": "p"}, "solution"),
    ({"question": "", "answer": "3"}, "question"),
])
def test_missing_field_names_the_field_and_the_line(record, field):
    with pytest.raises(QuestionSourceError, match=rf"data.jsonl: line 9 is missing field `{field}`"):
        question_from_record(record, "data.jsonl", 9)


# ---- files --------------------------------------------------------------------------------------------------
def test_malformed_line_names_the_file_and_the_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ['{"question": "1+1", "answer": "2"}', "", '{"question": "2+2",'])
    with pytest.raises(QuestionSourceError, match=rf"{path}:3: malformed JSON"):
        jsonl_questions(path, 10)


def test_a_line_that_is_not_an_object_is_an_error(tmp_path):
    path = write_lines(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(QuestionSourceError, match=rf"{path}:1: expected a JSON object"):
        jsonl_questions(path, 10)


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(QuestionSourceError, match="nowhere.jsonl: question file not found"):
        jsonl_questions(tmp_path / "nowhere.jsonl", 5)


def test_jsonl_takes_the_first_n_records_skipping_blank_lines(tmp_path):
    path = write_lines(tmp_path / "q.jsonl", [
        '{"question": "a", "answer": "1"}', "",
        '{"question": "b", "answer": "2"}',
        '{"question": "c", "answer": "3"}',
        "this line is never read",
    ])
    assert jsonl_questions(path, 2) == [("1", "a", "1"), ("3", "b", "2")]


def test_parse_source():
    assert parse_source("arithmetic") == ("arithmetic", None)
    assert parse_source("jsonl:data/x.jsonl") == ("jsonl", Path("data/x.jsonl"))
    assert parse_source("hf:math500") == ("hf", questions.HubDataset("HuggingFaceH4/MATH-500", None, "test"))
    assert parse_source("hf:gsm8k") == ("hf", questions.HubDataset("openai/gsm8k", "main", "test"))
    with pytest.raises(QuestionSourceError, match="unknown question source 'hf:aime'.*`hf:gsm8k`, `hf:math500`"):
        parse_source("hf:aime")


# ---- arithmetic source --------------------------------------------------------------------------------------
def test_arithmetic_questions_are_seeded_and_the_ood_ones_are_longer():
    ranges = dict(min_terms=2, max_terms=4, max_operand=20, ood_max_terms=5, ood_max_operand=30)
    first = arithmetic_questions("id", 30, 0, **ranges)
    assert first == arithmetic_questions("id", 30, 0, **ranges)
    assert first != arithmetic_questions("id", 30, 1, **ranges)
    assert [qid for qid, _, _ in first[:2]] == ["id-0000", "id-0001"]
    for _, question, gold in first:
        assert 2 <= len(arithmetic.parse_chain(question)) <= 4
        assert gold == str(arithmetic.chain_value(question))
    for _, question, _ in arithmetic_questions("ood", 30, 0, **ranges):
        assert len(arithmetic.parse_chain(question)) == 5


# ---- the stage ----------------------------------------------------------------------------------------------
def run_stage(tmp_path: Path, monkeypatch, **data) -> Path:
    """Run questions.main() in ``tmp_path`` with the repository's params.yaml, ``data:`` overridden."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(data)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    questions_stage.main()
    return tmp_path / raw["paths"]["questions"]


def test_stage_writes_both_sets_and_load_questions_reads_them_back(tmp_path, monkeypatch):
    out = run_stage(tmp_path, monkeypatch, source="arithmetic", n_questions=12, ood_source="arithmetic",
                    n_ood_questions=5)
    in_distribution, out_of_distribution = load_questions(out / "id.jsonl"), load_questions(out / "ood.jsonl")
    assert (len(in_distribution), len(out_of_distribution)) == (12, 5)
    assert set(in_distribution.dataset) == {"id"} and set(out_of_distribution.dataset) == {"ood"}
    assert not list(tmp_path.glob("**/.tmp-*"))  # the atomic write left nothing behind


def test_stage_with_a_jsonl_source_and_no_ood_set(tmp_path, monkeypatch):
    (tmp_path / "data/sources").mkdir(parents=True)
    write_lines(tmp_path / "data/sources/mine.jsonl", [json.dumps({"id": f"q{i}", "question": f"{i}+1",
                                                                   "answer": str(i + 1)}) for i in range(4)])
    out = run_stage(tmp_path, monkeypatch, source="jsonl:data/sources/mine.jsonl", n_questions=3, ood_source="none",
                    n_ood_questions=0)
    assert load_questions(out / "id.jsonl").question_id.tolist() == ["q0", "q1", "q2"]
    assert (out / "ood.jsonl").read_text() == ""
    assert len(load_questions(out / "ood.jsonl")) == 0


def test_load_questions_fails_loudly(tmp_path):
    with pytest.raises(SchemaError, match="not found; run the questions stage"):
        load_questions(tmp_path / "id.jsonl")
    path = write_lines(tmp_path / "dup.jsonl", [json.dumps({"question_id": "a", "dataset": "id", "question": "q",
                                                            "gold": "1"})] * 2)
    with pytest.raises(SchemaError, match="duplicate key"):
        load_questions(path)
    path = write_lines(tmp_path / "short.jsonl", [json.dumps({"question_id": "a", "question": "q", "gold": "1"})])
    with pytest.raises(SchemaError, match="column `dataset` has a null"):
        load_questions(path)


# ---- the real files, read where they are --------------------------------------------------------------------
@pytest.mark.skipif(not GSM8K.exists(), reason=f"{GSM8K} not present")
def test_real_gsm8k_file():
    rows = jsonl_questions(GSM8K, 2000)
    assert len(rows) == 1319
    assert rows[0][0] == "1" and rows[0][1].startswith("Janet") and rows[0][2] == "18"
    assert all("," not in gold and "####" not in gold for _, _, gold in rows)
    assert len({qid for qid, _, _ in rows}) == len(rows)


@pytest.mark.skipif(not MATH500.exists(), reason=f"{MATH500} not present")
def test_real_math500_file():
    rows = jsonl_questions(MATH500, 500)
    assert len(rows) == 500 and len({qid for qid, _, _ in rows}) == 500
    assert rows[0] == ("test/precalculus/807.json", rows[0][1], r"\left( 3, \frac{\pi}{2} \right)")
    # Without the `answer` field the gold comes from the solution's last box, which agrees for most records.
    records = [record for _, record in questions.read_jsonl_records(MATH500)]
    from_boxes = [question_from_record({k: v for k, v in r.items() if k != "answer"}, "m", i)[2]
                  for i, r in enumerate(records, 1)]
    agree = sum(box == record["answer"] for box, record in zip(from_boxes, records))
    assert agree >= 0.8 * len(records)
