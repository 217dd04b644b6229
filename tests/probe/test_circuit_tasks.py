"""Circuit tasks: single-token answers, the IOI/greater-than/docstring/induction structures, negatives,
determinism, clear errors, and positives SmolLM2 actually solves."""

from __future__ import annotations

import pytest
import torch

from attnlab.probe import AttnlabError
from attnlab.probe.registry import byte_tokenizer
from attnlab.probe.tasks import circuits as C


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2.tokenizer


def _word(tok, ids) -> str:
    return tok.decode(list(ids)).strip()


def test_ioi_answers_are_one_token_after_the_prompt_and_pairs_have_equal_length(tok):
    pairs = C.candidates(tok, "ioi", 40)
    for p in pairs:
        assert len(p.positive) == len(p.negative) and len(p.correct) == 1 and len(p.wrong) == 1
        io = _word(tok, p.correct)
        # the prompt followed by " IO" tokenises as the prompt plus exactly the answer token
        assert tok(p.text + " " + io, add_special_tokens=False).input_ids == list(p.positive) + list(p.correct)
        assert p.correct != p.wrong


def test_ioi_baba_and_abba_put_the_names_in_the_right_order(tok):
    pairs = C.candidates(tok, "ioi", 60, seed=3)
    assert {p.kind for p in pairs} == {"BABA", "ABBA"}
    for p in pairs:
        io = [i for i, t in enumerate(p.positive) if t == p.correct[0]]
        s = [i for i, t in enumerate(p.positive) if t == p.wrong[0]]
        assert len(io) == 1 and len(s) == 2, "IO once, the subject twice"
        assert (s[0] < io[0]) if p.kind == "BABA" else (io[0] < s[0])
        assert io[0] < s[1], "the second subject mention comes after both first mentions"


def test_ioi_negative_renames_only_the_second_subject_mention(tok):
    for p in C.candidates(tok, "ioi", 30, seed=1):
        diff = [i for i, (a, b) in enumerate(zip(p.positive, p.negative)) if a != b]
        assert len(diff) == 1, "ABC: exactly one token differs"
        assert p.positive[diff[0]] == p.wrong[0] and diff[0] == max(i for i, t in enumerate(p.positive)
                                                                    if t == p.wrong[0])
        c = p.negative[diff[0]]
        assert c not in (p.correct[0], p.wrong[0]) and p.negative.count(c) == 1
        assert p.negative.count(p.wrong[0]) == 1 and p.negative.count(p.correct[0]) == 1


def test_greater_than_scores_the_decisive_digit_with_xx01_negatives(tok):
    assert C.greater_than_mode(tok) == "digit"
    digits = [tok("0123456789"[d], add_special_tokens=False).input_ids[0] for d in range(10)]
    for p in C.candidates(tok, "greater_than", 40):
        start = p.text.split("from the year ")[1][:4]
        tens = int(start[2])
        assert 1 <= tens <= 8
        assert list(p.correct) == digits[tens + 1:] and list(p.wrong) == digits[:tens]
        assert f"from the year {start[:2]}01 to the year {start[:2]}" in p.negative_text
        assert p.text.endswith(f"to the year {start[:2]}") and len(p.positive) == len(p.negative)


def test_docstring_answer_is_the_next_documented_argument_and_the_negative_hides_it(tok):
    for p in C.candidates(tok, "docstring", 20):
        answer = _word(tok, p.correct)
        args = p.text.split("(self, ")[1].split(")")[0].split(", ")
        assert len(args) == 6 and answer == args[4]
        assert p.text.endswith(":param") and f":param {args[2]}:" in p.text and f":param {args[3]}:" in p.text
        assert sorted(_word(tok, [w]) for w in p.wrong) == sorted(a for i, a in enumerate(args) if i != 4)
        neg_args = p.negative_text.split("(self, ")[1].split(")")[0].split(", ")
        assert answer not in neg_args and not set(neg_args) & set(args)
        assert p.negative_text.split("):\n")[1] == p.text.split("):\n")[1], "the docstring is unchanged"


def test_induction_pairs_repeat_a_segment_and_the_negative_never_saw_the_answer():
    tok = byte_tokenizer()
    vocab = [tok.convert_tokens_to_ids(ch) for ch in "abcdefghijklmnopqrstuvwxyz"]
    for p in C.candidates(tok, "induction", 20, vocab=vocab, length=8):
        m = len(p.positive) - 8
        s = p.positive[:8]
        assert p.positive[8:] == s[:m] and p.correct == (s[m],) and p.wrong == ()
        assert p.negative[8:] == s[:m] and not set(p.negative[:8]) & set(s)


def test_generators_are_deterministic_per_seed(tok):
    a, b, c = (C.candidates(tok, "ioi", 10, seed=s) for s in (7, 7, 8))
    assert a == b and a != c


def test_bad_ioi_template_names_the_fix(tok):
    with pytest.raises(AttnlabError, match="BABA form"):
        C.candidates(tok, "ioi", 1, templates=["Then, {A} went to the {PLACE}. {B} gave it to"])
    with pytest.raises(AttnlabError, match="no trailing space"):
        C.candidates(tok, "ioi", 1, templates=["Then, {B} and {A} went out. {B} gave it to "])


def test_answer_that_is_not_one_token_is_an_error_that_says_so():
    # a byte tokenizer spells every name as several tokens
    with pytest.raises(AttnlabError, match="one token"):
        C.candidates(byte_tokenizer(), "ioi", 1)
    with pytest.raises(AttnlabError, match="unknown circuit task"):
        C.candidates(byte_tokenizer(), "colours", 1)


def test_metric_is_logsumexp_of_correct_minus_wrong():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 0.0, 0.0, 0.0]])
    pairs = [C.CircuitPair((0,), (0,), (2, 3), (0,)), C.CircuitPair((0,), (0,), (0,), ())]
    got = C.metric(logits, pairs)
    assert got[0].item() == pytest.approx(torch.logsumexp(torch.tensor([2.0, 3.0]), 0).item() - 0.0)
    assert got[1].item() == pytest.approx(torch.log_softmax(logits[1], 0)[0].item())


@pytest.mark.parametrize("name", ["ioi", "greater_than"])
def test_smollm2_solves_at_least_50_positives(smollm2, name):
    task = C.make_task(smollm2, name, n=50, max_candidates=400)
    assert len(task) == 50, f"{name}: {task.solved}/{task.candidates} solved"
    assert 0 < task.solve_rate <= 1
    # every kept positive really is solved: the top-1 next token is an answer token
    top = C.last_logits(smollm2, [p.positive for p in task.pairs[:16]]).argmax(-1)
    assert all(int(t) in p.correct for t, p in zip(top, task.pairs[:16]))


def test_make_task_keeps_unsolved_candidates_only_when_asked(tiny_models):
    probe = tiny_models("tiny-llama")
    vocab = list(range(97, 123))
    task = C.make_task(probe, "induction", n=12, solved_only=False, vocab=vocab, length=6)
    assert len(task) == 12 and task.candidates == 12 and task.params["solved_only"] is False
    with pytest.raises(AttnlabError, match="solved_only=False"):
        C.make_task(probe, "induction", n=4, max_candidates=8, vocab=vocab, length=6)
