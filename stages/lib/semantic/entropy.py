"""Semantic entropy: cluster each question's sampled answers by meaning and measure their spread.

Used by the stage ``python -m stages.semantic_entropy`` (or ``dvc repro semantic_entropy``).

Reads ``{paths.runs}/{id,ood}.parquet`` (schema.tables.RUNS; the ood table may be empty) and writes
``{paths.semantic_entropy}/{id,ood}.parquet`` (SEMANTIC_ENTROPY, one row per run; the question-level values
are repeated on each of its runs), plus ``{paths.metrics}/cost/semantic_entropy.json`` (wall seconds, the
number of equivalence checks and, for a model method, its forward passes).

``semantic_entropy.method`` decides when two runs share a meaning, always from their extracted final answers
(column ``answer``):

- ``math`` (default): equivalent by math-verify (``stages.lib.questions.answers.answers_equivalent``); the clusters are
the
  connected components of the equivalence graph over the distinct answers (``cluster_answers``), the same in any
  order of the runs. Loads no model.
- ``nli``: bidirectional entailment by an MNLI classifier (``semantic_entropy.nli_model``), optionally with the
  question prepended to each answer (then ``{paths.questions}/{id,ood}.jsonl`` are read);
- ``cosine``: cosine similarity of sentence embeddings >= ``semantic_entropy.cosine_threshold``;
- ``math+nli``: math-verify when both answers are math, NLI otherwise.

The model methods cluster with ``stages.lib.semantic.equivalence.greedy_reference_clusters``: the greedy algorithm of
Farquhar
et al., "Detecting hallucinations in large language models using semantic entropy", Nature 2024, exactly as their
reference code (an answer joins the last earlier representative it is equivalent to), batched and deduplicated. It
is the reference's rule, kept so the model methods compare with the paper, and like the reference it depends on the
order of the runs when the judge is not transitive (NLI and cosine are not); math's components do not.

Notation below: a question has K runs i = 1..K, run i has answer a_i, T_i generated tokens and sequence
log-likelihood log p(s_i) = sum_t log p(token_t | prefix); clusters c = 1..C with n_c runs each.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import pandas as pd
from scipy.special import logsumexp

from stages.lib.questions.answers import answers_equivalent
from stages.lib.io.files import progress_bar
from stages.lib.semantic.equivalence import (
    PairJudge,
    answer_adjacency,
    connected_clusters,
    greedy_reference_clusters,
    pairwise_judge,
)
from stages.lib.errors import UserError
from stages.lib.schema.machinery import SchemaError
from stages.lib.schema.tables import SEMANTIC_ENTROPY

log = logging.getLogger(__name__)

Equivalence = Callable[[str, str], bool]
# (question_id, the question's answers in run order) -> (cluster ids (K,), the equivalence graph (K, K) bool)
Clusterer = Callable[[str, list[str]], tuple[np.ndarray, np.ndarray]]


# ---- the math: pure functions on arrays -------------------------------------------------------------

def cluster_answers(answers: list[str], equivalent: Equivalence = answers_equivalent) -> np.ndarray:
    """Semantic clusters of one question's answers: connected components of the equivalence graph; ids 0..C-1 in
    order of first appearance.

    Every pair of distinct answers is judged by ``equivalent`` (``stages.lib.semantic.equivalence.answer_adjacency``)
    and two
    runs share a cluster iff a chain of equivalent answers joins them (``connected_clusters``). Why not the greedy
    rule of the model methods: math-verify is NOT transitive (``x=5`` ~ ``5`` and ``y=5`` ~ ``5``, but ``x=5`` !~
    ``y=5``), and a greedy pass then depends on the order of the runs (``[x=5, y=5, 5]`` gave two clusters,
    ``[5, x=5, y=5]`` one). The components are the same in every order and are a partition by construction; the
    cost is all D (D - 1) / 2 pairs of the D distinct answers (at most 45 for K = 10), which the graph measures
    need anyway. Chaining is the price: answers joined only through a third (``x=5`` and ``y=5`` through ``5``)
    share a cluster, which for math answers is the reading that they state the same value. For a transitive
    relation (integers, the toy's answers) the clusters are those of any greedy pass, ids included.
    Canonicalising answers first was the alternative; it would need its own notion of equality beside
    math-verify's (equations against values, intervals, sets, tolerances) and could disagree with ``is_correct``.

    Identical strings are deduplicated first, so ``equivalent`` is called only between distinct strings, once
    per unordered pair, as ``equivalent(earlier, later)``. Empty answers (no answer was extracted) form one
    shared "no answer" cluster and are never passed to ``equivalent``. Why shared, not one singleton per empty
    run: the empty string is one identical output, deduplicated like any other; a model that repeatedly fails to
    commit to an answer (typically truncated reasoning) is behaving consistently, and counting each failure as a
    distinct meaning would inflate SE with a length-truncation artefact that an SE probe would then learn. It also
    makes a question whose runs all gave no answer have SE 0, with one cluster. Truncation stays visible through
    the runs table's ``truncated`` and ``answer`` columns.

    Parameters
    ----------
    answers : list of str, shape (K,)
    equivalent : callable (str, str) -> bool, symmetric

    Returns
    -------
    cluster_ids : ndarray of int64, shape (K,)
    """
    return connected_clusters(answer_adjacency(answers, pairwise_judge(equivalent)))


def discrete_semantic_entropy(cluster_ids: np.ndarray) -> float:
    """Semantic entropy from cluster frequencies, in nats.

        SE_discrete = - sum_c (n_c / K) log(n_c / K)

    Bounds: 0 (all runs in one cluster) <= SE_discrete <= log K (every run its own cluster).
    """
    cluster_ids = np.asarray(cluster_ids)
    if cluster_ids.size == 0:
        raise ValueError("discrete_semantic_entropy: no runs (cluster_ids is empty)")
    _, counts = np.unique(cluster_ids, return_counts=True)
    probabilities = counts / cluster_ids.size
    return _clip_rounding(-float(np.sum(probabilities * np.log(probabilities))))


def length_normalised_loglik(sequence_loglik: np.ndarray, n_generated: np.ndarray) -> np.ndarray:
    """Mean token log-probability per run: log p(s_i) / T_i, with T_i = 0 counted as 1.

    A run with no generated tokens has log p(s_i) = 0 (an empty sum), so the guard makes its value 0 rather
    than 0/0. Shapes: (K,) -> (K,).
    """
    sequence_loglik = np.asarray(sequence_loglik, dtype=np.float64)
    n_generated = np.asarray(n_generated, dtype=np.float64)
    return sequence_loglik / np.maximum(n_generated, 1.0)


def weighted_semantic_entropy(cluster_ids: np.ndarray, log_likelihoods: np.ndarray) -> float:
    """Likelihood-weighted semantic entropy (Farquhar et al. 2024, "sum_normalized" variant), in nats.

    With l_i the LENGTH-NORMALISED log-likelihood of run i (l_i = log p(s_i) / T_i, the mean token log-prob;
    see ``length_normalised_loglik``), as the reference code (jlko/semantic_uncertainty) uses:

        log p_c = logsumexp_{i in c} l_i - logsumexp_{i=1..K} l_i     (cluster mass, normalised over runs)
        SE_weighted = - sum_c p_c log p_c

    Length normalisation keeps one long run from dominating the weights (a raw sequence probability shrinks
    geometrically with its length). The log-sum-exp form is stable for very negative l_i.
    Bounds: 0 <= SE_weighted <= log C <= log K.

    Parameters
    ----------
    cluster_ids : ndarray of int, shape (K,)
    log_likelihoods : ndarray of float, shape (K,), finite (length-normalised, see above)
    """
    cluster_ids = np.asarray(cluster_ids)
    log_likelihoods = np.asarray(log_likelihoods, dtype=np.float64)
    if cluster_ids.size == 0 or cluster_ids.shape != log_likelihoods.shape:
        raise ValueError(f"weighted_semantic_entropy: need K >= 1 runs with one log-likelihood each; got "
                         f"cluster_ids {cluster_ids.shape} and log_likelihoods {log_likelihoods.shape}")
    if not np.all(np.isfinite(log_likelihoods)):
        raise ValueError(f"weighted_semantic_entropy: non-finite log-likelihoods {log_likelihoods.tolist()}")
    log_total = logsumexp(log_likelihoods)
    cluster_log_probabilities = np.array([logsumexp(log_likelihoods[cluster_ids == cluster]) - log_total
                                          for cluster in np.unique(cluster_ids)])
    # Clip at 0: rounding can push the dominant cluster's log-probability a hair above 0.
    cluster_log_probabilities = np.minimum(cluster_log_probabilities, 0.0)
    cluster_probabilities = np.exp(cluster_log_probabilities)
    return _clip_rounding(-float(np.sum(cluster_probabilities * cluster_log_probabilities)))


def naive_entropy(log_likelihoods: np.ndarray) -> float:
    """Naive (predictive) entropy: the Monte Carlo estimate of -E[log p(s)] from the K runs, in nats.

        H_naive = - (1/K) sum_i l_i,   l_i = log p(s_i) / T_i   (length-normalised, as in the reference code)

    It ignores meaning: two phrasings of one answer count as different outcomes.
    """
    log_likelihoods = np.asarray(log_likelihoods, dtype=np.float64)
    if log_likelihoods.size == 0:
        raise ValueError("naive_entropy: no runs (log_likelihoods is empty)")
    return -float(np.mean(log_likelihoods))


# ---- graph measures of the K answers (Lin, Trivedi & Sun 2023, as IINemo/lm-polygraph computes them) ----------
#
# W is a question's (K, K) similarity over its runs. Here it is the 0/1 equivalence graph
# (``stages.lib.semantic.equivalence.
# answer_adjacency``: 1 for equivalent answers, identical ones included, so the diagonal is 1); lm-polygraph's
# estimators take the NLI entailment probabilities instead, and on a 0/1 graph they compute exactly what follows.
# D = diag(W 1) is the degree matrix and L = I - D^{-1/2} W D^{-1/2} the symmetric normalised Laplacian.
# lm-polygraph's measures are per QUESTION (one uncertainty for the K samples, repeated on each run as SE is); the
# paper's per-run confidences (C_Deg, C_Ecc) are ``degree_per_run`` and ``eccentricity_per_run``. Higher = less
# sure for every function here. For an equivalence relation (W a union of C cliques), NumSets = EigV = C,
# Deg = 1 - sum_c n_c^2 / K^2 and Ecc = sqrt(C - 1).

ECCENTRICITY_EIGENVALUE_THRESHOLD = 0.9
"""lm-polygraph's default ``thres``: the spectral embedding keeps the eigenvectors of L with eigenvalue below it."""


def _similarity(adjacency: np.ndarray) -> np.ndarray:
    similarity = np.asarray(adjacency, dtype=np.float64)
    if similarity.ndim != 2 or similarity.shape[0] != similarity.shape[1] or similarity.shape[0] == 0:
        raise ValueError(f"adjacency must be a non-empty square matrix; got shape {similarity.shape}")
    if not np.array_equal(similarity, similarity.T) or np.any(np.diag(similarity) <= 0):
        raise ValueError("adjacency must be symmetric with a positive diagonal (every run is equivalent to itself)")
    return similarity


def normalised_laplacian(adjacency: np.ndarray) -> np.ndarray:
    """L = I - D^{-1/2} W D^{-1/2}, shape (K, K), from W = ``adjacency`` (K, K), symmetric, diagonal > 0."""
    similarity = _similarity(adjacency)
    inverse_sqrt_degree = 1.0 / np.sqrt(similarity.sum(axis=1))
    return np.eye(len(similarity)) - inverse_sqrt_degree[:, None] * similarity * inverse_sqrt_degree[None, :]


def number_of_semantic_sets(adjacency: np.ndarray) -> int:
    """NumSemSets: the number of connected components of the equivalence graph (lm-polygraph ``NumSemSets``).

    For method ``math`` this is ``n_clusters`` (``cluster_answers`` takes the components); for the model methods,
    whose clusters follow the reference's greedy rule, the two can differ.
    """
    return int(connected_clusters(_similarity(adjacency) > 0).max()) + 1


def eigenvalue_sum_uncertainty(adjacency: np.ndarray) -> float:
    """EigV = sum_k max(0, 1 - lambda_k) over the eigenvalues lambda_k of L (lm-polygraph ``EigValLaplacian``).

    A continuous number of semantic sets: C for C disjoint cliques, fractional when equivalence is not transitive
    (the path 1 ~ 2 ~ 3, one component, gives 1.5).
    """
    eigenvalues = np.linalg.eigvalsh(normalised_laplacian(adjacency))
    return float(np.sum(np.maximum(0.0, 1.0 - eigenvalues)))


def degree_uncertainty(adjacency: np.ndarray) -> float:
    """Deg = trace(K I - D) / K^2 = 1 - sum_ij W_ij / K^2 (lm-polygraph ``DegMat``): 0 when all K runs agree."""
    similarity = _similarity(adjacency)
    return float(1.0 - similarity.sum() / len(similarity) ** 2)


def degree_per_run(adjacency: np.ndarray) -> np.ndarray:
    """Per run j, 1 - D_jj / K: one minus the paper's C_Deg(s_j), the share of the K runs run j agrees with. (K,)"""
    similarity = _similarity(adjacency)
    return 1.0 - similarity.sum(axis=1) / len(similarity)


def _centred_spectral_embedding(adjacency: np.ndarray, eigenvalue_threshold: float) -> np.ndarray:
    """Rows v_j - mean_j v_j of the embedding v_j = (u_1[j], ..., u_k[j]), u_m the eigenvectors of L with eigenvalue
    < threshold, shape (K, k). Norms of its rows (and its Frobenius norm) do not depend on the eigenvector basis."""
    eigenvalues, eigenvectors = np.linalg.eigh(normalised_laplacian(adjacency))
    embedding = eigenvectors[:, eigenvalues < eigenvalue_threshold]  # (K, k), k >= 1: lambda_min = 0
    return embedding - embedding.mean(axis=0, keepdims=True)


def eccentricity_uncertainty(adjacency: np.ndarray,
                             eigenvalue_threshold: float = ECCENTRICITY_EIGENVALUE_THRESHOLD) -> float:
    """Ecc = || [v_1 - v_bar, ..., v_K - v_bar] ||_F over the spectral embedding (lm-polygraph ``Eccentricity``).

    lm-polygraph centres each kept eigenvector over the K runs and takes the 2-norm of their norms, which is this
    Frobenius norm. 0 when all runs agree; sqrt(C - 1) for C disjoint cliques.
    """
    return float(np.linalg.norm(_centred_spectral_embedding(adjacency, eigenvalue_threshold)))


def eccentricity_per_run(adjacency: np.ndarray,
                         eigenvalue_threshold: float = ECCENTRICITY_EIGENVALUE_THRESHOLD) -> np.ndarray:
    """Per run j, ||v_j - v_bar||_2: minus the paper's C_Ecc(s_j), how far run j's answer sits from the centre. (K,)"""
    return np.linalg.norm(_centred_spectral_embedding(adjacency, eigenvalue_threshold), axis=1)


KLE_HEAT_TIME = 0.3
"""t of the heat kernel exp(-t L): the paper's default (lm-polygraph's ``KernelLanguageEntropy(t=0.3)``, "taken from
the paper"; the authors' code offers 0.1..0.7 and defaults its function to 0.4)."""


def kernel_language_entropy(adjacency: np.ndarray, heat_time: float = KLE_HEAT_TIME) -> float:
    """KLE (Nikitin, Kossen, Gal & Marttinen, NeurIPS 2024): the von Neumann entropy of the semantic graph's heat
    kernel, in nats.

        L = D - W (the combinatorial Laplacian, D = diag(W 1)),  K_t = exp(-t L),
        rho_ij = K_ij / sqrt(K_ii K_jj) / K  (unit trace, as the authors' ``vn_entropy``),
        KLE = -tr(rho log rho) = -sum_i mu_i log mu_i over the eigenvalues mu_i of rho.

    W may be weighted (symmetric, entries in [0, 1]: the NLI graph where a method gives probabilities); on the 0/1
    equivalence graph, K answers that all agree give rho the eigenvalue 1 / (1 + (K - 1) e^{-tK}) once and
    e^{-tK} / (1 + (K - 1) e^{-tK}) K - 1 times (so KLE > 0: the kernel keeps a little of each answer's own
    identity), and K answers that all differ give log K, SE's maximum: like SE it grows with the number of
    meanings, and it also weighs how large each meaning's clique is. The authors' optional
    rescaling by log K is left out (K is the same for every question of a run).
    """
    from scipy.linalg import expm
    from scipy.stats import entropy as shannon_entropy

    similarity = _similarity(adjacency)
    laplacian = np.diag(similarity.sum(axis=1)) - similarity
    kernel = expm(-heat_time * laplacian)
    inverse_sqrt_diagonal = 1.0 / np.sqrt(np.diag(kernel))
    density = inverse_sqrt_diagonal[:, None] * kernel * inverse_sqrt_diagonal[None, :] / len(kernel)
    eigenvalues = np.clip(np.linalg.eigvalsh(density), 0.0, None)  # PSD: negatives are rounding
    return float(shannon_entropy(eigenvalues))


def graph_measures(adjacency: np.ndarray) -> dict[str, float]:
    """The question-level measures of one (K, K) equivalence graph, by lm-polygraph's names: ``num_semantic_sets``,
    ``eigv``, ``degree``, ``eccentricity``, ``kernel_language_entropy`` (higher = less sure for all five)."""
    return {"num_semantic_sets": float(number_of_semantic_sets(adjacency)),
            "eigv": eigenvalue_sum_uncertainty(adjacency),
            "degree": degree_uncertainty(adjacency),
            "eccentricity": eccentricity_uncertainty(adjacency),
            "kernel_language_entropy": kernel_language_entropy(adjacency)}


def _clip_rounding(entropy: float) -> float:
    # Entropies are >= 0; -0.0 or -1e-17 only come from floating-point rounding.
    return max(entropy, 0.0)


# ---- one table: runs -> semantic entropy rows (no I/O) -----------------------------------------------

def semantic_entropy_table(runs: pd.DataFrame, cluster: Clusterer, source: str = "runs") -> pd.DataFrame:
    """One SEMANTIC_ENTROPY.columns row per run of ``runs`` (RUNS.columns), in the same row order.

    Each question's runs are taken in ``run_id`` order and ``cluster(question_id, answers)`` gives their cluster
    ids, so ids follow the order in which runs first gave each meaning, and their equivalence graph, whose
    ``graph_measures`` (lm-polygraph's NumSemSets, EigV, Deg, Ecc) are repeated on each of the question's runs as
    its SE is. A question needs at least 2 runs (SE of one sample is meaningless).
    """
    if runs.empty:
        return _empty_se_table()
    question_frames = []
    grouped = runs.groupby("question_id", sort=False)
    for question_id, question_runs in progress_bar(grouped, total=grouped.ngroups,
                                                   desc=f"semantic entropy {source}", enabled=grouped.ngroups >= 50):
        if len(question_runs) < 2:
            raise SchemaError(f"{source}: question {question_id!r} has {len(question_runs)} run; semantic "
                             "entropy needs >= 2 (sampling.runs)")
        question_runs = question_runs.sort_values("run_id")
        cluster_ids, adjacency = cluster(question_id, question_runs["answer"].tolist())
        graph = graph_measures(adjacency)
        log_likelihoods = length_normalised_loglik(question_runs["sequence_loglik"].to_numpy(),
                                                   question_runs["n_generated"].to_numpy())
        question_frames.append(pd.DataFrame({
            "question_id": question_runs["question_id"].to_numpy(),
            "run_id": question_runs["run_id"].to_numpy(dtype=np.int64),
            "cluster_id": cluster_ids,
            "n_clusters": np.int64(cluster_ids.max() + 1),
            "semantic_entropy": discrete_semantic_entropy(cluster_ids),
            "semantic_entropy_weighted": weighted_semantic_entropy(cluster_ids, log_likelihoods),
            "naive_entropy": naive_entropy(log_likelihoods),
            "num_semantic_sets": np.int64(graph["num_semantic_sets"]),
            "eigv": graph["eigv"],
            "degree": graph["degree"],
            "eccentricity": graph["eccentricity"],
            "kernel_language_entropy": graph["kernel_language_entropy"],
        }, index=question_runs.index))
    table = pd.concat(question_frames).loc[runs.index].reset_index(drop=True)
    return table[[column.name for column in SEMANTIC_ENTROPY.columns]]


def _empty_se_table() -> pd.DataFrame:
    dtypes = {"str": object, "int": np.int64, "float": np.float64, "bool": bool}
    return pd.DataFrame({column.name: pd.Series([], dtype=dtypes[column.kind]) for column in SEMANTIC_ENTROPY.columns})


class CountingEquivalence:
    """Wraps an equivalence relation and counts its calls (the stage's cost in math-verify checks)."""

    def __init__(self, equivalent: Equivalence):
        self.equivalent = equivalent
        self.calls = 0

    def __call__(self, first: str, second: str) -> bool:
        self.calls += 1
        return self.equivalent(first, second)


def math_clusterer(equivalent: Equivalence = answers_equivalent) -> Clusterer:
    """Method ``math``: the components of the equivalence graph (``cluster_answers``) with ``equivalent``, whatever
    the question, and the graph itself (the same pairs judged once)."""
    def cluster(_question_id: str, answers: list[str]) -> tuple[np.ndarray, np.ndarray]:
        adjacency = answer_adjacency(answers, pairwise_judge(equivalent))
        return connected_clusters(adjacency), adjacency

    return cluster


def judge_clusterer(judge: PairJudge, question_text: dict[str, str] | None = None) -> Clusterer:
    """A model method: ``greedy_reference_clusters`` with ``judge``, given each question's text when it uses it, and
    the full equivalence graph for the graph measures (every pair of distinct answers: the pairs the greedy pass
    did not compare cost extra judge calls, at most D (D - 1) / 2 pairs for D distinct answers; the NLI judge's
    cache serves the pairs it did).

    ``question_text`` maps question_id -> question; needed (and checked) only if ``judge.uses_question``.
    """
    def cluster(question_id: str, answers: list[str]) -> tuple[np.ndarray, np.ndarray]:
        question = ""
        if judge.uses_question:
            if question_text is None or question_id not in question_text:
                raise UserError(f"question {question_id!r}: its text is needed (semantic_entropy.prepend_question)"
                                 " but it is not in the questions files")
            question = question_text[question_id]
        def judge_pairs(pairs):
            return judge(pairs, question)

        return greedy_reference_clusters(answers, judge_pairs), answer_adjacency(answers, judge_pairs)

    return cluster


# ---- the stage ----------------------------------------------------------------------------------------
