"""Semantic clustering and entropy math (hand values and properties), and the semantic_entropy stage on a tiny table."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import given, settings

from stages import semantic_entropy as stage
from stages.lib.errors import UserError
from stages.lib.questions.answers import answers_equivalent
from stages.lib.io.files import read_table, write_table
from stages.lib.semantic.entropy import math_clusterer
from stages.lib.semantic.entropy import (
    cluster_answers,
    discrete_semantic_entropy,
    length_normalised_loglik,
    naive_entropy,
    semantic_entropy_table,
    weighted_semantic_entropy,
)
from stages.lib.semantic.equivalence import (
    answer_adjacency,
    connected_clusters,
    greedy_reference_clusters,
    pairwise_judge,
)
from stages.lib.schema.tables import RUNS, SEMANTIC_ENTROPY
from stages.lib.schema.machinery import SchemaError

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def same_residue_mod_3(first: str, second: str) -> bool:
    """A true equivalence relation on digit strings; refuses the calls cluster_answers must never make."""
    assert first and second, "empty answers must not reach the equivalence relation"
    assert first != second, "identical strings must be deduplicated before the equivalence relation"
    return int(first) % 3 == int(second) % 3


# ---- hand-computed values ---------------------------------------------------------------------------

def test_discrete_se_hand_value():
    # cluster sizes [2, 1, 1] of K = 4: -(0.5 ln 0.5 + 2 * 0.25 ln 0.25) = 1.0397...
    expected = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert discrete_semantic_entropy(np.array([0, 0, 1, 2])) == pytest.approx(expected)
    assert expected == pytest.approx(1.0397207708)


def test_weighted_se_hand_value():
    # run probabilities 0.5, 0.3, 0.2 (they already sum to 1); clusters {0, 1} and {2}: p = 0.8, 0.2
    log_likelihoods = np.log([0.5, 0.3, 0.2])
    expected = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert weighted_semantic_entropy(np.array([0, 0, 1]), log_likelihoods) == pytest.approx(expected)
    assert expected == pytest.approx(0.5004024235)


def test_weighted_se_normalises_over_runs():
    # unnormalised masses 2, 1, 1 with clusters {0} and {1, 2}: p = 2/4, 2/4 -> ln 2
    log_likelihoods = np.log([2.0, 1.0, 1.0])
    assert weighted_semantic_entropy(np.array([0, 1, 1]), log_likelihoods) == pytest.approx(math.log(2))
    # shifting every log-likelihood by a constant changes nothing (and very negative values stay stable)
    assert weighted_semantic_entropy(np.array([0, 1, 1]), log_likelihoods - 1000.0) == pytest.approx(math.log(2))


def test_length_normalisation_and_naive_entropy():
    # sequence log-likelihoods -6 over 3 tokens and -1 over 2 tokens; an empty run (0 tokens) counts as 0
    normalised = length_normalised_loglik(np.array([-6.0, -1.0, 0.0]), np.array([3, 2, 0]))
    np.testing.assert_allclose(normalised, [-2.0, -0.5, 0.0])
    assert naive_entropy(normalised) == pytest.approx((2.0 + 0.5 + 0.0) / 3)


def test_cluster_answers_hand_case():
    answers = ["14", "14.0", "15", "", "15", "", "\\frac{28}{2}"]
    assert cluster_answers(answers).tolist() == [0, 0, 1, 2, 1, 2, 0]


def test_all_empty_answers_form_one_cluster_with_zero_entropy():
    cluster_ids = cluster_answers(["", "", "", ""], equivalent=same_residue_mod_3)
    assert cluster_ids.tolist() == [0, 0, 0, 0]
    assert discrete_semantic_entropy(cluster_ids) == 0.0
    assert weighted_semantic_entropy(cluster_ids, np.array([-1.0, -2.0, -3.0, -0.5])) == 0.0


def test_invalid_inputs_raise():
    with pytest.raises(ValueError):
        discrete_semantic_entropy(np.array([], dtype=int))
    with pytest.raises(ValueError):
        weighted_semantic_entropy(np.array([0, 1]), np.array([-1.0]))
    with pytest.raises(ValueError, match="non-finite"):
        weighted_semantic_entropy(np.array([0, 1]), np.array([-1.0, np.nan]))
    with pytest.raises(ValueError):
        naive_entropy(np.array([]))


# ---- properties -------------------------------------------------------------------------------------

digit_answers = st.lists(st.sampled_from(["", "0", "1", "2", "3", "4", "5", "6"]), min_size=1, max_size=12)


@st.composite
def runs_with_logliks(draw):
    answers = draw(digit_answers)
    log_likelihoods = draw(st.lists(st.floats(-30.0, 0.0), min_size=len(answers), max_size=len(answers)))
    return answers, np.array(log_likelihoods)


@given(digit_answers)
def test_clustering_is_the_partition_of_an_equivalence_oracle(answers):
    cluster_ids = cluster_answers(answers, equivalent=same_residue_mod_3)
    # same cluster <=> same meaning ('' is its own meaning, "no answer")
    meaning = ["none" if answer == "" else int(answer) % 3 for answer in answers]
    for i in range(len(answers)):
        for j in range(len(answers)):
            assert (cluster_ids[i] == cluster_ids[j]) == (meaning[i] == meaning[j])
    # ids are 0..C-1, numbered in order of first appearance
    first_appearance = list(dict.fromkeys(cluster_ids.tolist()))
    assert first_appearance == list(range(len(first_appearance)))


@given(runs_with_logliks())
def test_entropies_are_bounded(runs):
    answers, log_likelihoods = runs
    cluster_ids = cluster_answers(answers, equivalent=same_residue_mod_3)
    n_runs, n_clusters = len(answers), int(cluster_ids.max()) + 1
    discrete = discrete_semantic_entropy(cluster_ids)
    weighted = weighted_semantic_entropy(cluster_ids, log_likelihoods)
    assert 0.0 <= discrete <= math.log(n_clusters) + 1e-12 <= math.log(n_runs) + 1e-12
    assert 0.0 <= weighted <= math.log(n_clusters) + 1e-9
    assert naive_entropy(log_likelihoods) >= 0.0  # log-likelihoods <= 0


@given(runs_with_logliks(), st.randoms(use_true_random=False))
def test_entropies_are_invariant_to_permuting_runs(runs, random):
    answers, log_likelihoods = runs
    order = list(range(len(answers)))
    random.shuffle(order)
    cluster_ids = cluster_answers(answers, equivalent=same_residue_mod_3)
    permuted_ids = cluster_answers([answers[i] for i in order], equivalent=same_residue_mod_3)
    assert discrete_semantic_entropy(permuted_ids) == pytest.approx(discrete_semantic_entropy(cluster_ids))
    assert weighted_semantic_entropy(permuted_ids, log_likelihoods[order]) == pytest.approx(
        weighted_semantic_entropy(cluster_ids, log_likelihoods), abs=1e-9)
    assert naive_entropy(log_likelihoods[order]) == pytest.approx(naive_entropy(log_likelihoods))


@given(st.sampled_from(["", "3", "x"]), st.integers(1, 12), st.floats(-20.0, 0.0))
def test_identical_answers_have_zero_entropy(answer, n_runs, log_likelihood):
    cluster_ids = cluster_answers([answer] * n_runs, equivalent=same_residue_mod_3)
    assert cluster_ids.tolist() == [0] * n_runs
    assert discrete_semantic_entropy(cluster_ids) == 0.0
    assert weighted_semantic_entropy(cluster_ids, np.full(n_runs, log_likelihood)) == 0.0


@given(digit_answers, st.floats(-20.0, 0.0))
def test_equal_likelihoods_make_weighted_equal_discrete(answers, log_likelihood):
    cluster_ids = cluster_answers(answers, equivalent=same_residue_mod_3)
    assert weighted_semantic_entropy(cluster_ids, np.full(len(answers), log_likelihood)) == pytest.approx(
        discrete_semantic_entropy(cluster_ids), abs=1e-9)


# ---- math clustering: connected components, the same in any order -----------------------------------------

def test_math_clustering_does_not_depend_on_the_order_of_the_runs():
    # math-verify is not transitive: x=5 ~ 5 and y=5 ~ 5 but x=5 !~ y=5; a greedy pass gave [0, 1, 0] for the first
    # order and [0, 0, 0] for the second; the components join all three through 5 in both
    assert answers_equivalent("x=5", "5") and answers_equivalent("y=5", "5") and not answers_equivalent("x=5", "y=5")
    assert cluster_answers(["x=5", "y=5", "5"]).tolist() == [0, 0, 0]
    assert cluster_answers(["5", "x=5", "y=5"]).tolist() == [0, 0, 0]
    # without the bridge they stay apart
    assert cluster_answers(["x=5", "y=5", "6"]).tolist() == [0, 1, 2]


def test_answer_adjacency_by_hand():
    calls = []

    def judge(pairs):
        calls.append(list(pairs))
        return [same_residue_mod_3(first, second) for first, second in pairs]

    adjacency = answer_adjacency(["1", "4", "", "1", "2", ""], judge)
    # distinct non-empty answers 1, 4, 2: one call with their 3 pairs; '' never reaches the judge
    assert calls == [[("1", "4"), ("1", "2"), ("4", "2")]]
    expected = np.array([[1, 1, 0, 1, 0, 0],
                         [1, 1, 0, 1, 0, 0],
                         [0, 0, 1, 0, 0, 1],
                         [1, 1, 0, 1, 0, 0],
                         [0, 0, 0, 0, 1, 0],
                         [0, 0, 1, 0, 0, 1]], dtype=bool)
    np.testing.assert_array_equal(adjacency, expected)
    assert connected_clusters(adjacency).tolist() == [0, 0, 1, 0, 2, 1]
    with pytest.raises(ValueError, match="2 decisions for 3 pairs"):
        answer_adjacency(["1", "2", "3"], lambda pairs: [True, True])


# A pool where math-verify's relation has transitivity failures (x=5 ~ 5 ~ y=5, x=1/2 ~ 0.5 ~ y=0.5), equal values
# written differently, text it cannot parse, and empty answers.
MATH_POOL = ["5", "x=5", "y=5", "5.0", "\\frac{10}{2}", "0.5", "\\frac{1}{2}", "x=\\frac{1}{2}", "y=0.5", "6", "-5",
             "x+1", "1+x", "", "Paris"]


def _same_partition(first: np.ndarray, second: np.ndarray) -> bool:
    return all((first[i] == first[j]) == (second[i] == second[j])
               for i in range(len(first)) for j in range(len(first)))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(MATH_POOL), min_size=1, max_size=10), st.randoms(use_true_random=False))
def test_math_clustering_is_an_order_invariant_partition(answers, random):
    cluster_ids = cluster_answers(answers)
    order = list(range(len(answers)))
    random.shuffle(order)
    permuted_ids = cluster_answers([answers[i] for i in order])
    # permuting the runs permutes the partition and nothing else
    assert _same_partition(permuted_ids, cluster_ids[order])
    # a partition: ids 0..C-1 in order of first appearance; identical answers together; '' only with ''
    assert list(dict.fromkeys(cluster_ids.tolist())) == list(range(int(cluster_ids.max()) + 1))
    for i, j in itertools.combinations(range(len(answers)), 2):
        if answers[i] == answers[j]:
            assert cluster_ids[i] == cluster_ids[j]
        if (answers[i] == "") != (answers[j] == ""):
            assert cluster_ids[i] != cluster_ids[j]
        # equivalent answers always share a cluster (the partition is at least as coarse as the relation)
        if answers[i] and answers[j] and answers_equivalent(answers[i], answers[j]):
            assert cluster_ids[i] == cluster_ids[j]
    # discrete SE follows: the same in every order
    assert discrete_semantic_entropy(permuted_ids) == pytest.approx(discrete_semantic_entropy(cluster_ids))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.integers(-20, 20).map(str), st.integers(0, 20).map(lambda n: f"{n}.0"), st.just("")),
                min_size=1, max_size=10))
def test_on_integer_answers_the_clusters_are_the_greedy_ones(answers):
    # math-verify is transitive on numbers: the components are what the reference's greedy rule gives, ids included
    judge = pairwise_judge(answers_equivalent)
    assert cluster_answers(answers).tolist() == greedy_reference_clusters(answers, judge).tolist()


# ---- the stage on a tiny runs table -----------------------------------------------------------------

def make_runs(dataset: str, answers_by_question: dict[str, list[str]]) -> pd.DataFrame:
    """A RUNS.columns table with the given answers; token-level columns are small but consistent."""
    rows = []
    for question_id, answers in answers_by_question.items():
        for run_id, answer in enumerate(answers):
            token_logprobs = [-0.1 * (run_id + 1)] * (run_id + 2)
            rows.append({
                "question_id": question_id, "run_id": run_id, "dataset": dataset,
                "prompt_ids": [1, 2, 3], "generated_ids": list(range(len(token_logprobs))),
                "text": f"<think>...</think>\\boxed{{{answer}}}", "think_start_index": 0, "think_end_index": 1,
                "think_missing": False, "truncated": answer == "", "answer": answer,
                "answer_source": "boxed" if answer else "truncated_in_think",
                "token_logprobs": token_logprobs, "token_entropies": [0.5] * len(token_logprobs),
                "token_topk_logprob_mean": [-2.0] * len(token_logprobs),
                "sequence_loglik": float(sum(token_logprobs)), "mean_token_entropy": 0.5,
                "n_generated": len(token_logprobs), "correct": answer == "14",
            })
    frame = pd.DataFrame(rows)
    return frame.astype({"think_start_index": "Int64", "think_end_index": "Int64"})


ID_ANSWERS = {"q0": ["14", "14.0", "15", ""], "q1": ["", "", "", ""]}


def test_semantic_entropy_table_values_and_row_order():
    runs = make_runs("id", ID_ANSWERS).sample(frac=1.0, random_state=0)  # rows out of order
    table = semantic_entropy_table(runs, math_clusterer())
    assert table[["question_id", "run_id"]].values.tolist() == runs[["question_id", "run_id"]].values.tolist()
    by_run = table.set_index(["question_id", "run_id"]).sort_index()
    assert by_run.loc["q0", "cluster_id"].tolist() == [0, 0, 1, 2]
    assert by_run.loc["q0", "n_clusters"].tolist() == [3] * 4
    assert by_run.loc["q0", "semantic_entropy"].tolist() == pytest.approx([1.0397207708] * 4)
    assert by_run.loc["q1", "cluster_id"].tolist() == [0] * 4
    assert by_run.loc["q1", "semantic_entropy"].tolist() == [0.0] * 4
    assert by_run.loc["q1", "semantic_entropy_weighted"].tolist() == [0.0] * 4
    # run r has mean token log-prob -0.1 (r + 1); naive entropy is minus their mean
    assert by_run.loc["q0", "naive_entropy"].iloc[0] == pytest.approx(0.25)
    # q0's graph: 14 ~ 14.0, 15 alone, '' alone: three cliques of sizes 2, 1, 1 (test_baselines' hand case)
    assert by_run.loc["q0", "num_semantic_sets"].tolist() == [3] * 4
    assert by_run.loc["q0", ["eigv", "degree", "eccentricity"]].iloc[0].tolist() == pytest.approx(
        [3, 0.625, 2 ** 0.5])
    # q1: every run gave no answer, one clique: no uncertainty on any graph measure
    assert by_run.loc["q1", ["num_semantic_sets", "eigv", "degree", "eccentricity"]].iloc[0].tolist() == \
        pytest.approx([1, 1, 0, 0], abs=1e-12)


def test_semantic_entropy_table_rejects_a_single_run_question():
    with pytest.raises(UserError, match="q0"):
        semantic_entropy_table(make_runs("id", {"q0": ["1"]}), math_clusterer())


@pytest.fixture
def stage_dir(tmp_path, monkeypatch):
    """A tmp working directory with the repository's params.yaml, every path pointed inside it."""
    params = yaml.safe_load(REPO_PARAMS.read_text())
    params["paths"] = {name: f"out/{name}" for name in params["paths"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_stage_writes_schema_valid_tables_and_cost(stage_dir):
    id_runs = make_runs("id", ID_ANSWERS)
    write_table(id_runs, RUNS, "out/runs/id.parquet")
    write_table(id_runs.iloc[0:0], RUNS, "out/runs/ood.parquet")  # no OOD questions

    stage.main()

    id_table = read_table(SEMANTIC_ENTROPY, "out/semantic_entropy/id.parquet")
    ood_table = read_table(SEMANTIC_ENTROPY, "out/semantic_entropy/ood.parquet")
    assert len(id_table) == len(id_runs) and len(ood_table) == 0
    assert list(id_table.columns) == [column.name for column in SEMANTIC_ENTROPY.columns]
    assert sorted(path.name for path in (stage_dir / "out").iterdir()) == ["metrics", "runs", "semantic_entropy"]

    cost = json.loads((stage_dir / "out/metrics/cost/semantic_entropy.json").read_text())
    # q0's distinct non-empty answers '14', '14.0', '15': all 3 pairs are judged; q1 is all empty
    assert cost["equivalence_checks"] == 3
    assert cost["runs"] == 8 and cost["questions"] == 2 and cost["wall_seconds"] >= 0


def test_stage_names_a_missing_runs_file(stage_dir):
    with pytest.raises(SchemaError, match="runs/id.parquet"):
        stage.main()
    assert not (stage_dir / "out/semantic_entropy").exists()


# ---- the stage with model-based equivalence (stages/lib/semantic/equivalence.py) ----------------------------------

def write_stage_inputs(answers_by_question: dict[str, list[str]], questions: dict[str, str] | None = None) -> None:
    id_runs = make_runs("id", answers_by_question)
    write_table(id_runs, RUNS, "out/runs/id.parquet")
    write_table(id_runs.iloc[0:0], RUNS, "out/runs/ood.parquet")
    if questions is not None:
        Path("out/questions").mkdir(parents=True)
        Path("out/questions/id.jsonl").write_text("".join(
            json.dumps({"question_id": qid, "dataset": "id", "question": text, "gold": "14"}) + "\n"
            for qid, text in questions.items()))
        Path("out/questions/ood.jsonl").write_text("")


def set_semantic_entropy(stage_dir: Path, **values) -> None:
    params = yaml.safe_load((stage_dir / "params.yaml").read_text())
    params["semantic_entropy"].update(values)
    (stage_dir / "params.yaml").write_text(yaml.safe_dump(params))


def stage_outputs(stage_dir: Path) -> tuple[pd.DataFrame, dict]:
    table = read_table(SEMANTIC_ENTROPY, "out/semantic_entropy/id.parquet")
    cost = json.loads((stage_dir / "out/metrics/cost/semantic_entropy.json").read_text())
    return table.set_index(["question_id", "run_id"]).sort_index(), cost


def test_math_method_loads_no_model(stage_dir):
    # model keys pointing nowhere: the default method must not touch them (it runs offline, model-free)
    set_semantic_entropy(stage_dir, nli_model="no/such-nli-model", cosine_model=str(stage_dir / "missing"))
    write_stage_inputs(ID_ANSWERS)
    stage.main()
    table, cost = stage_outputs(stage_dir)
    assert table.loc["q0", "cluster_id"].tolist() == [0, 0, 1, 2]
    # all 3 pairs of '14', '14.0', '15'
    assert cost["method"] == "math" and cost["equivalence_checks"] == 3 and "forward_passes" not in cost


@pytest.fixture(scope="module")
def tiny_nli_dir(tmp_path_factory):
    from test_equivalence import save_tiny_nli_model
    return save_tiny_nli_model(tmp_path_factory.mktemp("tiny_nli"))


def test_nli_method_with_the_question_prepended(stage_dir, tiny_nli_dir):
    from stages.lib.semantic.entropy import graph_measures
    from stages.lib.semantic.equivalence import NliClassifier, NliJudge, answer_adjacency, greedy_reference_clusters

    answers = {"q0": ["42", "forty two", "42", "24", ""], "q1": ["paris", "the capital of france", "paris"]}
    questions = {"q0": "x + 1", "q1": "the capital of france"}
    set_semantic_entropy(stage_dir, method="nli", nli_model=str(tiny_nli_dir), strict_entailment=False,
                         prepend_question=True, batch_size=4)
    write_stage_inputs(answers, questions)
    stage.main()
    table, cost = stage_outputs(stage_dir)

    judge = NliJudge(NliClassifier(str(tiny_nli_dir)), strict_entailment=False, prepend_question=True, batch_size=4)
    for question_id, question_answers in answers.items():
        def judge_pairs(pairs):
            return judge(pairs, questions[question_id])

        expected = greedy_reference_clusters(question_answers, judge_pairs)
        assert table.loc[question_id, "cluster_id"].tolist() == expected.tolist()
        assert table.loc[question_id, "n_clusters"].iloc[0] == expected.max() + 1
        # the graph measures judge every pair of distinct answers; the greedy pass's pairs come from the cache
        graph = graph_measures(answer_adjacency(question_answers, judge_pairs))
        assert table.loc[question_id, "eigv"].iloc[0] == pytest.approx(graph["eigv"])
    assert {key: cost[key] for key in ("equivalence_checks", "forward_passes", "nli_pair_evaluations")} == {
        "equivalence_checks": judge.pairs_judged, "forward_passes": judge.forward_passes,
        "nli_pair_evaluations": judge.pair_evaluations}
    # q0 has 3 distinct non-empty answers ('42', 'forty two', '24'): 3 pairs; q1 has 2: 1 pair
    assert cost["method"] == "nli" and cost["nli_cache_hits"] > 0
    assert cost["nli_pair_evaluations"] == 2 * (3 + 1)  # each distinct pair classified once, both directions

    # a question missing from the questions file is named
    Path("out/questions/id.jsonl").write_text(json.dumps(
        {"question_id": "q0", "dataset": "id", "question": "x + 1", "gold": "14"}) + "\n")
    with pytest.raises(UserError, match="'q1'.*prepend_question"):
        stage.main()


def test_math_plus_nli_keeps_math_answers_on_math_verify(stage_dir, tiny_nli_dir):
    set_semantic_entropy(stage_dir, method="math+nli", nli_model=str(tiny_nli_dir), prepend_question=False)
    write_stage_inputs(ID_ANSWERS)  # math answers only: no NLI forward pass, the math clusters
    stage.main()
    table, cost = stage_outputs(stage_dir)
    assert table.loc["q0", "cluster_id"].tolist() == [0, 0, 1, 2]
    # greedy: 14 ~ 14.0, 14 !~ 15 (2 checks); the graph: every pair of 14, 14.0, 15 (3 more, math-verify is not cached)
    assert cost["forward_passes"] == 0 and cost["math_checks"] == cost["equivalence_checks"] == 2 + 3


def test_cosine_method_with_the_packaged_model(stage_dir):
    set_semantic_entropy(stage_dir, method="cosine", cosine_threshold=0.5)
    write_stage_inputs({"q0": ["42", "forty-two", "the capital of France", "42"], "q1": ["", "", "7", "7"]})
    stage.main()
    table, cost = stage_outputs(stage_dir)
    assert table.loc["q0", "cluster_id"].tolist() == [0, 0, 1, 0]
    assert table.loc["q1", "cluster_id"].tolist() == [0, 0, 1, 1]
    # greedy: 42 ~ forty-two, 42 !~ the capital (2 pairs); the graph: all 3 pairs of the 3 distinct texts (3 more)
    assert cost["method"] == "cosine" and cost["texts_embedded"] == 3 and cost["equivalence_checks"] == 2 + 3
    assert table.loc["q0", "num_semantic_sets"].iloc[0] == 2
