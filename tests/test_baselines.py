"""Baseline scores beside the probes: per-run token baselines (stages/lib/evaluation/baselines.py) and the graph
measures of
the K answers (stages/lib/semantic/entropy.py), on hand-computed cases and against lm-polygraph's estimators,
transcribed."""

from __future__ import annotations

import math

import hypothesis.strategies as st
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from scipy.linalg import eigh

from stages.lib.questions.answers import answers_equivalent
from stages.lib.evaluation.baselines import (
    bottom_group_confidence,
    deepconf_span,
    length_normalised_negative_loglik,
    lowest_group_confidence,
    negative_min_answer_logprob,
    tail_confidence,
    think_length,
)
from stages.lib.semantic.entropy import (
    cluster_answers,
    degree_per_run,
    degree_uncertainty,
    eccentricity_per_run,
    eccentricity_uncertainty,
    eigenvalue_sum_uncertainty,
    graph_measures,
    kernel_language_entropy,
    normalised_laplacian,
    number_of_semantic_sets,
)
from stages.lib.semantic.equivalence import answer_adjacency, pairwise_judge

# ---- per-run token baselines -------------------------------------------------------------------------------


def test_length_normalised_negative_loglik_by_hand():
    # -6 over 3 tokens, -1 over 2, an empty run: 2, 0.5, 0
    np.testing.assert_allclose(length_normalised_negative_loglik([-6.0, -1.0, 0.0], [3, 2, 0]), [2.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="must be"):
        length_normalised_negative_loglik([-1.0], [1, 2])


def test_think_length_by_hand():
    # ids:  <think> a b c </think> \boxed{7}   -> s=0, e=4: 3 tokens inside
    #       </think> only at 5 (prompt opened the span)                      -> 5
    #       <think> at 0, no </think>, 9 tokens (truncated while reasoning)  -> 8
    #       no tags, 6 tokens                                                -> 6
    #       <think> after </think> (s=3 > e=2)                               -> 2
    start = pd.array([0, None, 0, None, 3], dtype="Int64")
    end = pd.array([4, 5, None, None, 2], dtype="Int64")
    np.testing.assert_array_equal(think_length(start, end, [8, 9, 9, 6, 7]), [3, 5, 8, 6, 2])


def test_negative_min_answer_logprob_by_hand():
    logprobs = [
        np.log([0.9, 0.8, 0.99, 0.5, 0.7]),  # </think> at 2: answer tokens 3, 4 -> min p = 0.5
        np.log([0.9, 0.1, 0.6]),             # no </think>: the whole run -> 0.1
        np.log([0.9, 0.2]),                  # </think> is the last token: the whole run -> 0.2
        np.array([]),                        # nothing generated -> 0
    ]
    scores = negative_min_answer_logprob(logprobs, [2, None, 1, None])
    np.testing.assert_allclose(scores, [-math.log(0.5), -math.log(0.1), -math.log(0.2), 0.0])
    with pytest.raises(ValueError, match="think_end_index"):
        negative_min_answer_logprob(logprobs, [2, None])


# ---- graph measures ----------------------------------------------------------------------------------------

def cliques(sizes: list[int]) -> np.ndarray:
    """The equivalence graph of runs in clusters of the given sizes (block diagonal, all ones within a block)."""
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return labels[:, None] == labels[None, :]


PATH = np.array([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=bool)  # 1 ~ 2 ~ 3, 1 !~ 3


def test_graph_measures_of_cliques_by_hand():
    # clusters of sizes 2, 1, 1 (K = 4): 3 sets; EigV = C = 3; Deg = 1 - (4 + 1 + 1) / 16; Ecc = sqrt(C - 1)
    measures = graph_measures(cliques([2, 1, 1]))
    assert measures.pop("kernel_language_entropy") == pytest.approx(kernel_language_entropy(cliques([2, 1, 1])))
    assert measures == pytest.approx({"num_semantic_sets": 3, "eigv": 3, "degree": 0.625,
                                      "eccentricity": math.sqrt(2)})
    # per run: 1 - D_jj / K = 1 - 2/4, 1 - 1/4; embedding rows v = (1/sqrt2, 0, 0) x2, (0, 1, 0), (0, 0, 1) with mean
    # (sqrt2/4, 1/4, 1/4): ||v_1 - mean||^2 = 1/8 + 1/16 + 1/16 = 1/4, ||v_3 - mean||^2 = 1/8 + 9/16 + 1/16 = 3/4
    np.testing.assert_allclose(degree_per_run(cliques([2, 1, 1])), [0.5, 0.5, 0.75, 0.75])
    np.testing.assert_allclose(eccentricity_per_run(cliques([2, 1, 1])), [0.5, 0.5, math.sqrt(3) / 2,
                                                                          math.sqrt(3) / 2])
    # agreement and its opposite
    agree = graph_measures(cliques([5]))
    assert agree.pop("kernel_language_entropy") > 0  # the heat kernel keeps some of each answer's identity
    assert agree == pytest.approx({"num_semantic_sets": 1, "eigv": 1, "degree": 0, "eccentricity": 0}, abs=1e-12)
    assert graph_measures(cliques([1] * 4)) == pytest.approx({"num_semantic_sets": 4, "eigv": 4, "degree": 0.75,
                                                              "eccentricity": math.sqrt(3),
                                                              "kernel_language_entropy": math.log(4)})


def test_graph_measures_of_a_non_transitive_path_by_hand():
    # degrees 2, 3, 2; D^-1/2 W D^-1/2 has eigenvalues 1, 1/2 (vector (1, 0, -1)) and 4/3 - 3/2 = -1/6 (the trace),
    # so L has 0, 1/2, 7/6 and EigV = 1 + 1/2 + 0 = 1.5 while the graph has one component
    np.testing.assert_allclose(np.linalg.eigvalsh(normalised_laplacian(PATH)), [0, 0.5, 7 / 6], atol=1e-12)
    assert number_of_semantic_sets(PATH) == 1
    assert eigenvalue_sum_uncertainty(PATH) == pytest.approx(1.5)
    assert degree_uncertainty(PATH) == pytest.approx(1 - 7 / 9)
    # kept eigenvectors (< 0.9): (sqrt2, sqrt3, sqrt2) / sqrt7 and (1, 0, -1) / sqrt2; centred, the second keeps its
    # norm 1 and the first has 1 - (2 sqrt2 + sqrt3)^2 / 21 = (10 - 4 sqrt6) / 21
    assert eccentricity_uncertainty(PATH) == pytest.approx(math.sqrt(1 + (10 - 4 * math.sqrt(6)) / 21))


def test_graph_measures_reject_a_graph_that_is_not_one():
    with pytest.raises(ValueError, match="symmetric"):
        degree_uncertainty(np.array([[1, 1], [0, 1]]))
    with pytest.raises(ValueError, match="square"):
        eigenvalue_sum_uncertainty(np.ones((2, 3)))


# lm-polygraph (IINemo/lm-polygraph, src/lm_polygraph/estimators/{deg_mat,eig_val_laplacian,eccentricity}.py) on a
# similarity matrix W, transcribed: the tests check the functions above compute what those estimators compute.

def polygraph_laplacian(W):
    D = np.diag(W.sum(axis=1))
    D_inverse_sqrt = np.linalg.inv(np.sqrt(D))
    return np.eye(D.shape[0]) - D_inverse_sqrt @ W @ D_inverse_sqrt


def polygraph_eigv(W):
    return sum(max(0, 1 - lambda_k) for lambda_k in eigh(polygraph_laplacian(W), eigvals_only=True))


def polygraph_degmat(W):
    D = np.diag(W.sum(axis=1))
    return np.trace(len(W) - D) / (len(W) ** 2)


def polygraph_eccentricity(W, thres=0.9):
    eigenvalues, eigenvectors = eigh(polygraph_laplacian(W))
    smallest_eigenvectors = eigenvectors[:, eigenvalues < thres].T
    return np.linalg.norm([-np.linalg.norm(x - x.mean(0), 2) for x in smallest_eigenvectors], 2)


@st.composite
def symmetric_graphs(draw):
    n = draw(st.integers(1, 8))
    upper = draw(st.lists(st.booleans(), min_size=n * (n - 1) // 2, max_size=n * (n - 1) // 2))
    graph = np.eye(n, dtype=bool)
    graph[np.triu_indices(n, 1)] = upper
    return graph | graph.T


@settings(max_examples=80, deadline=None)
@given(symmetric_graphs())
def test_graph_measures_match_lm_polygraph(graph):
    W = graph.astype(float)
    assert eigenvalue_sum_uncertainty(graph) == pytest.approx(polygraph_eigv(W), abs=1e-9)
    assert degree_uncertainty(graph) == pytest.approx(polygraph_degmat(W), abs=1e-12)
    assert eccentricity_uncertainty(graph) == pytest.approx(polygraph_eccentricity(W), abs=1e-9)
    # the per-run embedding norms make up the question's eccentricity
    assert np.sum(eccentricity_per_run(graph) ** 2) == pytest.approx(eccentricity_uncertainty(graph) ** 2, abs=1e-9)
    # permuting the runs permutes the per-run measures and leaves the question's unchanged
    order = np.random.default_rng(len(graph)).permutation(len(graph))
    permuted = graph[np.ix_(order, order)]
    assert graph_measures(permuted) == pytest.approx(graph_measures(graph), abs=1e-9)
    np.testing.assert_allclose(eccentricity_per_run(permuted), eccentricity_per_run(graph)[order], atol=1e-9)
    np.testing.assert_allclose(degree_per_run(permuted), degree_per_run(graph)[order])


def test_graph_from_math_answers():
    # the adjacency the semantic_entropy stage would build for method math: x=5 ~ 5 ~ y=5 (not x=5 ~ y=5), 6 alone
    answers = ["x=5", "5", "y=5", "6", "5"]
    graph = answer_adjacency(answers, pairwise_judge(answers_equivalent))
    assert graph[0].tolist() == [True, True, False, False, True]
    assert number_of_semantic_sets(graph) == int(cluster_answers(answers).max()) + 1 == 2
    assert 2 < eigenvalue_sum_uncertainty(graph) < 3  # the missing edge x=5 - y=5 counts, unlike in NumSets


# ---- the registry entries read them -------------------------------------------------------------------------

def test_registry_scores_the_new_baselines_from_the_runs_columns_by_hand():
    from stages.lib import registry
    from stages.lib.evaluation.scoring import score_runs

    runs = pd.DataFrame({
        "hidden_row": [0, 1],
        "sequence_loglik": [-6.0, -1.0], "n_generated": [3, 4],
        "think_start_index": pd.array([0, 0], dtype="Int64"), "think_end_index": pd.array([1, None], dtype="Int64"),
        "token_logprobs": [np.log([0.9, 0.8, 0.25]), np.log([0.5, 0.4, 0.3, 0.6])],
        "num_semantic_sets": [3, 1], "eigv": [2.5, 1.0], "degree": [0.6, 0.0], "eccentricity": [1.4, 0.0],
    })
    names = ["length_normalised_negative_loglik", "think_length", "negative_min_answer_logprob",
             "num_semantic_sets", "eigv", "degree", "eccentricity"]
    scores = score_runs(runs, None, (), (), {}, entries=[registry.BY_NAME[name] for name in names])
    # -6 / 3 and -1 / 4; think span (0, 1) holds no token, an unclosed one all 3 after <think>; the answer after
    # </think> is the single token 0.25, the unfinished run's lowest is 0.3; graph columns as they are
    assert scores.to_dict("list") == pytest.approx({
        "length_normalised_negative_loglik": [2.0, 0.25], "think_length": [0.0, 3.0],
        "negative_min_answer_logprob": [-math.log(0.25), -math.log(0.3)], "num_semantic_sets": [3, 1],
        "eigv": [2.5, 1.0], "degree": [0.6, 0.0], "eccentricity": [1.4, 0.0]})
    assert all(registry.BY_NAME[name].label == "incorrect" for name in names)


# ---- exact ties: measures equal up to rounding rank as ties (stages.lib.evaluation.metrics.exact_ties) -------------


def test_union_of_cliques_ranks_eigv_eccentricity_and_num_semantic_sets_alike():
    # EigV = C and Ecc = sqrt(C - 1) exactly for C cliques, but the eigen-solver's rounding depends on the cluster
    # sizes and the row order; once stored as scores, all three must give the same AUROC whatever those are.
    from stages.lib.evaluation.scoring import score_runs
    from stages.lib.evaluation.metrics import auroc
    from stages.lib.registry import BY_NAME

    rng = np.random.default_rng(3)
    rows = []
    for question in range(300):
        n_clusters = int(rng.integers(1, 5))
        sizes = rng.multinomial(10 - n_clusters, np.ones(n_clusters) / n_clusters) + 1  # K = 10, every size >= 1
        adjacency = cliques(sizes.tolist())
        order = rng.permutation(10)
        measures = graph_measures(adjacency[np.ix_(order, order)])
        for run in range(2):
            rows.append({"question_id": f"q{question}", "correct": bool(rng.random() < 0.7 - 0.15 * n_clusters),
                         **measures})
    runs = pd.DataFrame(rows)
    raw_eigv = runs["eigv"].to_numpy()
    assert np.any(raw_eigv != np.round(raw_eigv)), "the solver should leave rounding noise for this test to bite"
    entries = [BY_NAME[name] for name in ("num_semantic_sets", "eigv", "eccentricity")]
    scores = score_runs(runs, None, None, None, {}, entries)
    incorrect = ~runs["correct"].to_numpy(bool)
    values = [auroc(incorrect, scores[entry.name].to_numpy()) for entry in entries]
    assert values[1] == pytest.approx(values[0], abs=1e-12)
    assert values[2] == pytest.approx(values[0], abs=1e-12)


# ---- kernel language entropy (Nikitin et al. 2024) -------------------------------------------------------------


def binary_entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def test_kernel_language_entropy_by_hand():
    # two answers that agree: L = [[1, -1], [-1, 1]], exp(-0.3 L) has eigenvalues 1 and e^-0.6 with equal diagonals,
    # so rho's eigenvalues are (1, e^-0.6) / (1 + e^-0.6)
    assert kernel_language_entropy(cliques([2])) == pytest.approx(binary_entropy(1 / (1 + math.exp(-0.6))))
    # all answers differ: L = 0, rho = I / K, log K (SE's maximum)
    assert kernel_language_entropy(cliques([1, 1, 1])) == pytest.approx(math.log(3))
    # one clique of 5: eigenvalue 1 / (1 + 4 e^-1.5) once and e^-1.5 / (1 + 4 e^-1.5) four times
    small = math.exp(-1.5) / (1 + 4 * math.exp(-1.5))
    expected = -(1 - 4 * small) * math.log(1 - 4 * small) - 4 * small * math.log(small)
    assert kernel_language_entropy(cliques([5])) == pytest.approx(expected)
    # sizes (2, 1, 1): the pair's normalised block [[1, a], [a, 1]] / 4 with a = tanh(0.3), singletons 1 / 4 each
    a = math.tanh(0.3)
    eigenvalues = [(1 + a) / 4, (1 - a) / 4, 0.25, 0.25]
    assert kernel_language_entropy(cliques([2, 1, 1])) == pytest.approx(-sum(x * math.log(x) for x in eigenvalues))
    # a soft (NLI-probability) edge of 0.5: L has eigenvalues 0 and 1, so rho's are (1, e^-0.3) / (1 + e^-0.3)
    assert kernel_language_entropy(np.array([[1.0, 0.5], [0.5, 1.0]])) == pytest.approx(
        binary_entropy(1 / (1 + math.exp(-0.3))))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_kernel_language_entropy_is_permutation_invariant_and_bounded(sizes, random):
    adjacency = cliques(sizes)
    order = list(range(len(adjacency)))
    random.shuffle(order)
    value = kernel_language_entropy(adjacency)
    assert kernel_language_entropy(adjacency[np.ix_(order, order)]) == pytest.approx(value, abs=1e-12)
    assert 0 <= value <= math.log(len(adjacency)) + 1e-12
    assert (value > 0) == (len(adjacency) > 1)


# ---- DeepConf token confidence (Fu et al. 2025) ------------------------------------------------------------------


def test_deepconf_confidences_by_hand():
    # 16 tokens whose top-k log-prob mean is -1, ..., -16: confidences 1..16; window = tail = 16 / 8 = 2 tokens;
    # groups are 1.5, 2.5, ..., 15.5 (15 of them): lowest 1.5, bottom 10% = mean of the lowest ceil(1.5) = 2 groups
    # = 2.0, tail = mean(15, 16) = 15.5. A run with no tokens has confidence 0.
    runs = [-np.arange(1.0, 17.0), np.array([-3.0, -1.0]), np.array([])]
    np.testing.assert_allclose(lowest_group_confidence(runs), [1.5, 1.0, 0.0])
    np.testing.assert_allclose(bottom_group_confidence(runs), [2.0, 1.0, 0.0])
    np.testing.assert_allclose(tail_confidence(runs), [15.5, 1.0, 0.0])
    assert deepconf_span(100_000, 2048) == 2048 and deepconf_span(3, 2048) == 1


def test_deepconf_scores_flag_the_less_confident_run():
    from stages.lib.evaluation.scoring import score_runs
    from stages.lib.registry import BY_NAME

    runs = pd.DataFrame({"token_topk_logprob_mean": [np.full(8, -6.0), np.full(8, -2.0)]})  # confident, unsure
    entries = [BY_NAME[name] for name in ("deepconf_lowest_group", "deepconf_bottom_10", "deepconf_tail")]
    scores = score_runs(runs, None, None, None, {}, entries)
    for entry in entries:
        assert entry.orientation == "lower"
        assert scores[entry.name].tolist() == [-6.0, -2.0]  # higher = more likely incorrect
