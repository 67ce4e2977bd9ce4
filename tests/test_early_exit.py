"""Early exit: the forced-answer construction token by token on the toy tokenizer and a tiny random Qwen3, the
stopping rules, Learn-then-Test's tau on hand-computed arrays, and its guarantee on simulated data."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_qwen3
from scipy.stats import binom

from stages.lib.questions.answers import is_correct
from stages.lib.early_exit.rules import (
    PrefixOutcomes,
    apply_rule,
    calibrate,
    calibration_draws,
    evaluate_rules,
    fixed_sequence_test,
    hoeffding_bentkus_p_value,
    hoeffding_bentkus_p_values,
    learn_then_test_choices,
    outcome_report,
    pareto_rows,
    question_losses,
    question_table,
    redraw_outcomes,
    rule_scores,
    stop_index,
    tau_candidates,
)
from stages.lib.errors import UserError
from stages.lib.early_exit.forced import cut, force_answers, forced_sequence, greedy_answers, require_traced_prefixes
from stages.lib.models.loading import prompt_ids, think_tokens
from stages.lib.sampling.runs import stop_and_pad_ids
from stages.lib.schema.tables import FORCED_ANSWERS
from stages.lib.schema.machinery import validate_frame
from stages.lib.models.toy import build_tokenizer
from stages.lib.hidden.tracing import token_positions


@pytest.fixture(scope="module")
def toy():
    tokenizer = build_tokenizer()
    model = tiny_qwen3(tokenizer)
    return model, tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def run_frame(tokenizer, question: str, completion: str, run_id: int = 0) -> dict:
    prompt = prompt_ids(tokenizer, question)
    generated = ids(tokenizer, completion)
    think = think_tokens(tokenizer)
    start = generated.index(think.start_id) if think.start_id in generated else None
    end = generated.index(think.end_id) if think.end_id in generated else None
    return {"question_id": question, "run_id": run_id, "dataset": "id", "prompt_ids": np.asarray(prompt),
            "generated_ids": np.asarray(generated), "think_start_index": start, "think_end_index": end,
            "n_generated": len(generated)}


# ---- the construction ----------------------------------------------------------------------------------------
def test_the_cut_keeps_exactly_the_reasoning_up_to_think_p_token_by_token(toy):
    _, tokenizer = toy
    think = think_tokens(tokenizer)
    question = "12+7-5"
    completion = "<think>12+7=19\n19-5=14</think>\\boxed{14}"
    run = run_frame(tokenizer, question, completion)
    prompt, generated = list(run["prompt_ids"]), list(run["generated_ids"])
    reasoning = "12+7=19\n19-5=14"
    assert run["think_end_index"] == 1 + len(reasoning)  # one token per character, <think> a single token
    for prefix, kept_text in ((25, reasoning[:4]), (50, reasoning[:round(0.5 * 15)]), (75, reasoning[:11])):
        generated_kept, reasoning_kept, reasoning_tokens = cut(len(prompt), len(generated), 0,
                                                               run["think_end_index"], prefix)
        assert reasoning_tokens == 15 and reasoning_kept == len(kept_text) == round(prefix / 100 * 15)
        assert generated_kept == 1 + reasoning_kept
        # the last kept token is exactly the traced think_<p> position
        (position,), _ = token_positions(len(prompt), len(generated), run["think_end_index"], (f"think_{prefix}",), 0)
        assert position == len(prompt) + generated_kept - 1
        sequence = forced_sequence(prompt, generated, generated_kept, think.end_id, ids(tokenizer, "\\boxed{"))
        expected = prompt + [think.start_id] + ids(tokenizer, kept_text) + [think.end_id] + ids(tokenizer, "\\boxed{")
        assert sequence == expected
        assert tokenizer.decode(sequence[len(prompt):]) == f"<think>{kept_text}</think>\\boxed{{"


def test_the_cut_of_a_run_without_think_tags_counts_every_generated_token_as_reasoning():
    assert cut(5, 20, None, None, 50) == (10, 10, 20)
    assert cut(5, 20, 0, None, 50) == (11, 10, 19)  # <think> at 0, no </think>: round(9.5) = 10 reasoning kept
    assert cut(5, 0, None, None, 50) == (0, 0, 0)  # nothing generated: nothing kept


def test_every_prefix_must_be_traced():
    require_traced_prefixes((25, 50), ("tbg", "think_25", "think_50"))
    with pytest.raises(UserError, match=r"early_exit.prefixes.*think_75.*trace.positions"):
        require_traced_prefixes((25, 75), ("tbg", "think_25"))


def unbatched_greedy(model, sequence: list[int], steps: int, eos: int) -> tuple[list[int], list[float]]:
    """Greedy decoding one token at a time without padding, with each chosen token's log-prob."""
    tokens, logprobs = list(sequence), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([tokens])).logits[0, -1].float()
            logprob = torch.log_softmax(logits, -1)
            chosen = int(logprob.argmax())
            if chosen == eos:
                break
            tokens.append(chosen)
            logprobs.append(float(logprob[chosen]))
    return tokens[len(sequence):], logprobs


def test_batched_left_padded_greedy_answers_match_unbatched_decoding(toy):
    model, tokenizer = toy
    eos_ids, pad_id = stop_and_pad_ids(model.generation_config, tokenizer)
    sequences = [ids(tokenizer, text) for text in ("<user>1+2<assistant><think>1+2=3</think>\\boxed{",
                                                   "<think>12+7-5</think>\\boxed{", "3</think>")]
    assert len({len(s) for s in sequences}) == 3
    answers, calls = greedy_answers(model, sequences, 6, eos_ids, pad_id, batch_size=2, progress=False)
    assert calls == 2
    for sequence, answer in zip(sequences, answers):
        tokens, logprobs = unbatched_greedy(model, sequence, 6, tokenizer.eos_token_id)
        assert answer.generated_ids == tokens
        np.testing.assert_allclose(answer.token_logprobs, logprobs, atol=2e-4)
        assert answer.truncated == (len(tokens) == 6)


def test_forced_answers_table_matches_the_schema_and_judges_against_gold(toy):
    model, tokenizer = toy
    eos_ids, pad_id = stop_and_pad_ids(model.generation_config, tokenizer)
    think = think_tokens(tokenizer)
    runs = pd.DataFrame([run_frame(tokenizer, "1+2", "<think>1+2=3</think>\\boxed{3}"),
                         run_frame(tokenizer, "12+7-5", "<think>12+7=19\n19-5=14</think>\\boxed{14}", 1)])
    for column in ("think_start_index", "think_end_index"):
        runs[column] = runs[column].astype("Int64")
    gold = pd.Series({"1+2": "3", "12+7-5": "14"})
    decode = partial(greedy_answers, model, max_new_tokens=5, eos_ids=eos_ids, pad_id=pad_id, batch_size=3,
                     progress=False)
    frame, calls = force_answers(tokenizer, runs, gold, (25, 75), "\\boxed{", decode, think)
    validate_frame(frame, FORCED_ANSWERS.columns, "forced", FORCED_ANSWERS.key)
    assert calls == 2 and len(frame) == 4 and list(frame["prefix"]) == [25, 75, 25, 75]
    for row in frame.itertuples():
        assert row.answer_text == "</think>\\boxed{" + tokenizer.decode(list(row.answer_ids))
        assert row.correct == (bool(row.answer) and is_correct(row.answer, gold[row.question_id]))
        assert row.tokens_used == row.generated_kept + 1 + len("\\boxed{") + row.answer_tokens
        assert row.answer_tokens == len(row.answer_ids) <= 5


# ---- the rules -----------------------------------------------------------------------------------------------
def outcomes(forced_correct, full_correct, question_id=None, reasoning_tokens=None, **extra) -> PrefixOutcomes:
    forced_correct = np.asarray(forced_correct, dtype=bool)
    n, m = forced_correct.shape
    prefixes = tuple(int(p) for p in np.linspace(100 / (m + 1), 100 * m / (m + 1), m))
    reasoning_tokens = np.full(n, 100) if reasoning_tokens is None else np.asarray(reasoning_tokens)
    kept = np.round(np.outer(reasoning_tokens, np.asarray(prefixes) / 100)).astype(int)
    values = dict(question_id=np.arange(n).astype(str) if question_id is None else np.asarray(question_id),
                  run_id=np.zeros(n, int), prefixes=prefixes, forced_correct=forced_correct,
                  forced_answer=np.full((n, m), "1", dtype=object), forced_tokens=kept + 1 + 5,
                  trial_tokens=np.full((n, m), 5),
                  reasoning_kept=kept, mean_logprob=np.full((n, m), -0.1), mean_entropy=np.full((n, m), 0.5),
                  reasoning_tokens=reasoning_tokens, full_correct=np.asarray(full_correct, dtype=bool),
                  full_tokens=reasoning_tokens + 10)
    values.update(extra)
    return PrefixOutcomes(**values)


def test_stop_at_the_first_prefix_whose_score_reaches_tau():
    scores = np.array([[0.1, 0.9, 0.95], [0.2, 0.3, 0.4], [0.8, 0.1, 0.9]])
    np.testing.assert_array_equal(stop_index(scores, 0.85), [1, 3, 2])
    np.testing.assert_array_equal(stop_index(scores, 0.0), [0, 0, 0])
    np.testing.assert_array_equal(stop_index(scores, None), [3, 3, 3])


def test_apply_rule_counts_answers_tokens_savings_and_trial_answers_by_hand():
    data = outcomes([[False, True], [True, True]], [True, False], reasoning_tokens=[30, 60])
    # prefixes (33, 66): kept = round(30 * .33) = 10, 20 and round(60 * .33) = 20, 40
    scores = np.array([[0.1, 0.9], [0.7, 0.8]])
    run = apply_rule(data, scores, 0.85, pays_trial_answers=False)  # run 0 stops at prefix 1, run 1 never
    np.testing.assert_array_equal(run.stop, [1, 2])
    np.testing.assert_array_equal(run.correct, [True, False])
    np.testing.assert_array_equal(run.tokens, [20 + 6, 70])
    np.testing.assert_array_equal(run.think_saved, [10, 0])
    np.testing.assert_array_equal(run.loss, [0, 0])
    paid = apply_rule(data, scores, 0.85, pays_trial_answers=True)  # the trial at prefix 0 (5 tokens) was paid
    np.testing.assert_array_equal(paid.tokens, [26 + 5, 70 + 10])
    early = apply_rule(data, scores, 0.05, pays_trial_answers=False)  # both stop at prefix 0
    np.testing.assert_array_equal(early.correct, [False, True])
    np.testing.assert_array_equal(early.loss, [1, 0])  # run 0 was right with full reasoning


def test_rule_scores_of_the_baselines():
    data = outcomes([[True, True, True]] * 2, [True, True],
                    forced_answer=np.array([["1", "2", "2"], ["", "", "3"]], dtype=object),
                    mean_logprob=np.array([[np.log(0.5), np.nan, 0.0], [0, 0, 0]]),
                    mean_entropy=np.array([[0.2, np.nan, 0.0], [1, 1, 1]]))
    np.testing.assert_array_equal(rule_scores("consistency", data), [[0, 0, 1], [0, 0, 0]])
    np.testing.assert_allclose(rule_scores("trial_confidence", data)[0], [0.5, -np.inf, 1.0])
    np.testing.assert_allclose(rule_scores("answer_entropy", data)[0], [-0.2, -np.inf, 0.0])
    np.testing.assert_allclose(rule_scores("fixed_budget", data)[1], np.asarray(data.prefixes) / 100)
    with pytest.raises(ValueError, match="needs P"):
        rule_scores("probe", data)


# ---- Learn-then-Test -----------------------------------------------------------------------------------------
def test_hoeffding_bentkus_p_value_by_hand():
    # risk 0 over 100 questions at alpha 0.1: Hoeffding exp(-100 log(1/0.9)) = 0.9^100; Bentkus e * 0.9^100
    assert hoeffding_bentkus_p_value(0.0, 100, 0.1) == pytest.approx(0.9 ** 100)
    # risk 0.04: Bentkus e * P(Bin(100, .1) <= 4) = 0.0645 beats Hoeffding exp(-100 h(.04, .1)) = 0.0796
    h = 0.04 * math.log(0.4) + 0.96 * math.log(0.96 / 0.9)
    assert math.exp(-100 * h) == pytest.approx(0.0796, abs=1e-4)
    assert hoeffding_bentkus_p_value(0.04, 100, 0.1) == pytest.approx(math.e * binom.cdf(4, 100, 0.1))
    assert hoeffding_bentkus_p_value(0.2, 100, 0.1) == 1.0  # risk above alpha: nothing to reject
    assert hoeffding_bentkus_p_value(0.0, 0, 0.1) == 1.0


def test_fixed_sequence_stops_at_the_first_non_rejection():
    # n = 100, epsilon = 0.1: risks 0, 0.02 and 0.04 are rejected at delta 0.1, 0.08 is not; 0.0 after it is
    # never tested (the order is fixed: a later small risk cannot be reached)
    rejected, p_values = fixed_sequence_test(np.array([0.0, 0.02, 0.04, 0.08, 0.0]), 100, 0.1, 0.1)
    assert rejected == 3 and len(p_values) == 4
    assert p_values[3] > 0.1 >= p_values[2]


def test_calibrate_picks_the_last_certified_tau_hand_computed():
    # 100 questions, one run each, all right with full reasoning. Score = 1 for 60 runs whose forced answer is
    # right, 0.5 for 40 runs: 36 right, 4 wrong. tau 1 stops the 60 (risk 0); tau 0.5 stops all (risk 0.04,
    # p = e P(Bin(100,.1) <= 4) = 0.064 <= 0.1): certified; tau 0.5 is chosen. With 6 wrong (risk 0.06,
    # p = e P(Bin <= 6) = 0.32) only tau 1 is.
    for wrong, expected in ((4, 0.5), (6, 1.0)):
        forced = np.ones((100, 1), dtype=bool)
        forced[60:60 + wrong] = False
        data = outcomes(forced, np.ones(100, dtype=bool))
        scores = np.r_[np.ones(60), np.full(40, 0.5)][:, None]
        calibration = calibrate(data, scores, np.array([1.0, 0.5]), False, epsilon=0.1, delta=0.1)
        assert calibration.tau == expected
        assert calibration.n_questions == 100
    # nothing certifiable (all early answers wrong): the rule never stops
    data = outcomes(np.zeros((100, 1), dtype=bool), np.ones(100, dtype=bool))
    calibration = calibrate(data, np.ones((100, 1)), np.array([1.0]), False, epsilon=0.1, delta=0.1)
    assert calibration.tau is None and calibration.rejected == 0


def test_the_calibration_unit_is_the_question():
    np.testing.assert_allclose(question_losses(np.array([1, 0, 0, 0, 1, 1.0]), np.array(list("aabbcc"))),
                               [0.5, 0.0, 1.0])


def test_tau_candidates_come_in_descending_order_from_finite_train_scores():
    candidates = tau_candidates(np.array([[0.1, 0.5], [np.inf * -1, 0.9]]), 3)
    np.testing.assert_allclose(candidates, [0.9, 0.5, 0.1])
    assert len(tau_candidates(np.full((2, 2), -np.inf), 5)) == 0


def test_tau_never_sees_test():
    """Calibration reads only the val outcomes: changing every test outcome leaves tau unchanged."""
    rng = np.random.default_rng(0)
    val = outcomes(rng.random((200, 3)) < 0.9, np.ones(200, dtype=bool))
    scores = rng.random((200, 3))
    before = calibrate(val, scores, tau_candidates(scores, 20), False, 0.1, 0.1)
    test = outcomes(rng.random((50, 3)) < 0.1, np.ones(50, dtype=bool))
    report = outcome_report(test, apply_rule(test, rng.random((50, 3)), before.tau, False), 0.1, 20, 0.9,
                            np.random.default_rng(1))
    after = calibrate(val, scores, tau_candidates(scores, 20), False, 0.1, 0.1)
    assert before == after and report["n_runs"] == 50


def test_the_guarantee_holds_on_simulated_data_at_the_stated_rate():
    """Simulate many calibration sets from one population; the test risk of the chosen tau exceeds epsilon in at
    most a delta share of them (plus binomial slack over the trials)."""
    epsilon, delta, trials, n_val, runs_per_question, m = 0.1, 0.2, 300, 60, 3, 3
    rng = np.random.default_rng(42)

    def population(n_questions):
        # a question's difficulty drives all its runs (dependence within a question); the score is informative
        difficulty = np.repeat(rng.random(n_questions), runs_per_question)
        score = np.clip(1 - difficulty[:, None] + rng.normal(0, 0.25, (len(difficulty), m))
                        + np.linspace(0, 0.3, m), 0, 1)
        forced = rng.random((len(difficulty), m)) < score
        data = outcomes(forced, np.ones(len(difficulty), dtype=bool),
                        question_id=np.repeat(np.arange(n_questions), runs_per_question).astype(str))
        return data, score

    big, big_scores = population(20000)
    candidates = np.linspace(1, 0, 41)
    true_risk = {tau: apply_rule(big, big_scores, tau, False).loss.mean() for tau in candidates}
    assert max(true_risk.values()) > 2 * epsilon, "the simulation must make over-eager stopping risky"
    violations, stopped = 0, 0
    for _ in range(trials):
        val, scores = population(n_val)
        tau = calibrate(val, scores, candidates, False, epsilon, delta).tau
        stopped += tau is not None
        violations += tau is not None and true_risk[tau] > epsilon
    assert stopped > trials / 4, "the test needs calibrations that do stop"
    assert violations / trials <= delta + 3 * math.sqrt(delta * (1 - delta) / trials)


# ---- the guarantee observed over redraws ---------------------------------------------------------------------------
def test_vectorised_p_values_equal_the_scalar_ones():
    risks = np.array([[0.0, 0.02, 0.04], [0.08, 0.1, 0.3]])
    expected = [[hoeffding_bentkus_p_value(r, 100, 0.1) for r in row] for row in risks]
    np.testing.assert_allclose(hoeffding_bentkus_p_values(risks, 100, 0.1), expected, rtol=1e-12)
    assert np.all(hoeffding_bentkus_p_values(risks, 0, 0.1) == 1.0)
    # the fixed-sequence walk of test_fixed_sequence_stops_at_the_first_non_rejection, and one that rejects nothing
    # (column c = never stop) and one that rejects all (the least conservative candidate)
    choices = learn_then_test_choices(np.array([[0.0, 0.02, 0.04, 0.08, 0.0], [0.2, 0.0, 0.0, 0.0, 0.0],
                                                [0.0, 0.0, 0.0, 0.0, 0.0]]), 100, 0.1, 0.1)
    np.testing.assert_array_equal(choices, [2, 5, 4])


def test_each_redraw_recalibrates_exactly_as_calibrate_does():
    """The vectorised redraws: for every draw, the tau ``calibrate`` picks on that draw's calibration questions, and
    the question-level loss and savings of its test questions, by the slow path."""
    rng = np.random.default_rng(5)
    n_questions, runs_per_question, m = 40, 2, 3
    question_id = np.repeat([f"q{i:02d}" for i in range(n_questions)], runs_per_question)
    data = outcomes(rng.random((len(question_id), m)) < 0.85, rng.random(len(question_id)) < 0.9,
                    question_id=question_id, reasoning_tokens=rng.integers(50, 150, len(question_id)))
    scores = rng.random((len(question_id), m))
    candidates = tau_candidates(scores, 15)
    table = question_table(data, scores, candidates, False)
    draws = calibration_draws(n_questions, 25, 30, np.random.default_rng(0))
    assert np.all(draws.sum(axis=1) == 25)
    observed = redraw_outcomes(table, None, draws, epsilon=0.2, delta=0.2)
    questions = np.unique(question_id)
    for draw in range(len(draws)):
        calibration_runs = np.isin(question_id, questions[draws[draw]])
        expected = calibrate(data.subset(calibration_runs), scores[calibration_runs], candidates, False, 0.2, 0.2)
        chosen = observed["chosen"][draw]
        assert (None if chosen == len(candidates) else candidates[chosen]) == expected.tau
        test = data.subset(~calibration_runs)
        run = apply_rule(test, scores[~calibration_runs], expected.tau, False)
        assert observed["test_loss"][draw] == pytest.approx(question_losses(run.loss, test.question_id).mean())
        assert observed["test_saved"][draw] == pytest.approx(run.think_saved.sum() / test.reasoning_tokens.sum())


def test_the_redraws_observe_the_guarantee_and_its_absence():
    """Calibration and test drawn from one population: the test loss exceeds epsilon in at most about a delta
    share of the redraws. The same tau on a harder (OOD) population exceeds it far more often, and the report says
    so rather than hiding it."""
    rng = np.random.default_rng(1)
    runs_per_question, m = 3, 3

    def population(n_questions, shift, prefix):
        difficulty = np.repeat(rng.random(n_questions), runs_per_question)
        score = np.clip(1 - difficulty[:, None] + rng.normal(0, 0.25, (len(difficulty), m))
                        + np.linspace(0, 0.3, m), 0, 1)
        forced = rng.random((len(difficulty), m)) < score - shift  # OOD: the same scores, more wrong answers
        ids = np.repeat([f"{prefix}{i:04d}" for i in range(n_questions)], runs_per_question)
        return outcomes(forced, np.ones(len(difficulty), dtype=bool), question_id=ids), score

    splits, p_correct = {}, {}
    for split, n_questions, shift in (("train", 200, 0.0), ("val", 150, 0.0), ("test", 150, 0.0),
                                      ("ood", 200, 0.4)):
        splits[split], p_correct[split] = population(n_questions, shift, split)
    rules, _, guarantee = evaluate_rules(splits, p_correct, 0.1, 0.2, 30, 20, 0.95, 0, n_draws=400,
                                         epsilon_grid=(0.05, 0.2))
    redraws = rules["probe"]["redraws"]
    assert redraws["n_draws"] == 400 and redraws["n_calibration_questions"] == 150
    assert redraws["n_test_questions"] == 150 and redraws["never_stops"] < 0.5
    test, ood = redraws["splits"]["test"], redraws["splits"]["ood"]
    assert test["exceedance_ci_low"] <= test["exceedance"] <= test["exceedance_ci_high"]
    assert test["exceedance"] <= 0.2 and redraws["within_delta"]
    assert ood["exceedance"] > 0.9 and ood["loss_mean"] > 2 * test["loss_mean"]
    assert 0 < test["think_tokens_saved_mean"] < 1
    assert set(rules) >= {"probe", "probe_give_up"} and rules["probe_give_up"]["redraws"] is not None
    probe_rows = guarantee[(guarantee["rule"] == "probe") & (guarantee["split"] == "test")]
    assert probe_rows["epsilon"].tolist() == [0.05, 0.1, 0.2]
    assert np.all(probe_rows["loss_mean"].to_numpy() <= probe_rows["epsilon"].to_numpy())


def test_the_give_up_rule_stops_where_success_looks_unlikely():
    data = outcomes([[False, False, True], [True, True, True]], [True, True])
    p_correct = np.array([[0.1, 0.05, 0.9], [0.8, 0.9, 0.95]])
    scores = rule_scores("probe_give_up", data, p_correct)
    np.testing.assert_allclose(scores, -p_correct)
    np.testing.assert_array_equal(stop_index(scores, -0.2), [0, 3])  # P <= 0.2: the first run gives up at once


def test_outcome_report_and_pareto_rows():
    data = outcomes([[True], [False], [True], [True]], [True, True, False, True],
                    question_id=np.array(["a", "a", "b", "b"]))
    run = apply_rule(data, np.ones((4, 1)), 0.5, False)
    report = outcome_report(data, run, 0.1, 200, 0.9, np.random.default_rng(0))
    assert report["accuracy_full"] == 0.75 and report["accuracy_early_exit"] == 0.75
    assert report["loss"] == 0.25 and report["loss_within_epsilon"] is False
    assert report["stop_rate"] == 1.0 and report["think_tokens_saved"] == pytest.approx(0.5)
    assert report["loss_ci_low"] <= 0.25 <= report["loss_ci_high"]
    rows = pareto_rows("probe", "test", data, np.ones((4, 1)), np.array([0.5]), 0.5, False)
    assert list(rows["chosen"]) == [False, True] and rows["tau"].isna().iloc[0]
    assert list(rows["accuracy"]) == [0.75, 0.75] and rows["think_tokens_saved"].iloc[0] == 0.0


def test_prefix_outcomes_join_runs_and_forced_answers_and_name_a_missing_prefix():
    runs = pd.DataFrame({"question_id": ["b", "a"], "run_id": [0, 0], "correct": [True, False],
                         "n_generated": [30, 40]})
    forced = pd.DataFrame([{"question_id": q, "run_id": 0, "prefix": p, "correct": q == "a" and p == 50,
                            "answer": f"{q}{p}", "tokens_used": p, "generated_kept": p - 10, "reasoning_kept": p - 11,
                            "mean_logprob": -1.0, "mean_entropy": 0.5, "reasoning_tokens": 99}
                           for q in "ab" for p in (25, 50)])
    from stages.lib.early_exit.rules import prefix_outcomes
    from stages.lib.schema.machinery import SchemaError
    data = prefix_outcomes(runs, forced, (25, 50))
    assert list(data.question_id) == ["a", "b"] and list(data.full_correct) == [False, True]
    np.testing.assert_array_equal(data.forced_correct, [[False, True], [False, False]])
    np.testing.assert_array_equal(data.trial_tokens, [[10, 10], [10, 10]])
    assert data.forced_answer[1, 0] == "b25"
    with pytest.raises(SchemaError, match="prefix 75"):
        prefix_outcomes(runs, forced, (25, 75))
    empty = prefix_outcomes(runs.iloc[:0], forced.iloc[:0], (25, 50))
    assert empty.forced_correct.shape == (0, 2)
    assert outcome_report(empty, apply_rule(empty, np.zeros((0, 2)), 0.5, True), 0.1, 10, 0.9,
                          np.random.default_rng(0))["accuracy_full"] is None


def test_the_vllm_path_gives_the_same_forced_answers_as_transformers(tiny_lm_dir):
    """Through the vLLM stand-in of tests/test_vllm_backend.py (the real tiny model behind vLLM's interface)."""
    from test_vllm_backend import FakeLLM, FakeSamplingParams, sampling

    from stages.lib.sampling import vllm as sampling_vllm
    from stages.lib.early_exit.forced import greedy_answers_vllm
    from stages.lib.models.loading import load_model

    model, tokenizer = load_model(str(tiny_lm_dir), toy_model_dir="unused")
    eos_ids, pad_id = stop_and_pad_ids(model.generation_config, tokenizer)
    settings = sampling(vllm=dict(entropy_top_n=len(tokenizer)))
    llm = FakeLLM(**sampling_vllm.engine_kwargs(str(tiny_lm_dir), settings.vllm, seed=0) | {"max_logprobs": 200})
    generator = sampling_vllm.VllmGenerator(llm, FakeSamplingParams, settings, tokenizer, eos_ids, progress=False)
    sequences = [ids(tokenizer, "<think>1+2=3</think>\\boxed{"), ids(tokenizer, "<think>12+7</think>\\boxed{")]
    from_vllm, calls = greedy_answers_vllm(generator, sequences, 5, progress=False)
    from_hf, _ = greedy_answers(model, sequences, 5, eos_ids, pad_id, batch_size=2, progress=False)
    assert calls == 1 and len(llm.received) == 1
    for a, b in zip(from_vllm, from_hf):
        assert a.generated_ids == b.generated_ids and a.truncated == b.truncated
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=2e-4)
        np.testing.assert_allclose(a.token_entropies, b.token_entropies, atol=2e-4)
