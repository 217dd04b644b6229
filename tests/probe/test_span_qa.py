"""span_qa: seeded questions whose answer is stated in one highlighted sentence of a conflicting,
distracting context."""

from __future__ import annotations

import re

import pytest

from attnlab.probe import AttnlabError, Positions
from attnlab.probe.tasks import span_qa
from attnlab.probe.tasks.classification import label_token_ids
from attnlab.probe.tasks.span_qa import COLOURS


@pytest.fixture(scope="module")
def task():
    return span_qa()


def asked(example):
    return re.search(r"What colour is (\w+)'s (\w+)\?", example.text).groups()


def test_the_same_seed_gives_the_same_examples_and_another_seed_others(task):
    again = span_qa()
    assert [e.text for e in task.split("test")] == [e.text for e in again.split("test")]
    other = span_qa(seed=1)
    assert [e.text for e in task.split("test")[:20]] != [e.text for e in other.split("test")[:20]]
    assert len(task.split("test")) >= 200 and len(task.examples) == 700


def test_the_answer_is_the_value_in_the_highlighted_sentence_and_the_other_sentence_conflicts(task):
    for e in task.examples:
        name, obj = asked(e)
        facts = [s for s in re.split(r"(?<=\.) ", e.text.split("\n")[0].removeprefix("Notes: "))
                 if re.search(rf"\b{name}'s {obj} is (\w+)\.$", s)]
        assert len(facts) == 2, "exactly two sentences state the asked fact"
        assert e.highlight in facts and e.text.count(e.highlight) == 1
        other = next(s for s in facts if s != e.highlight)
        assert e.highlight.endswith(f"{COLOURS[e.label].strip()}.")
        assert other.endswith(f"{COLOURS[e.conflict].strip()}.")
        assert e.label != e.conflict


def test_distractors_state_similar_facts_and_the_highlight_sits_first_or_second_evenly(task):
    first = 0
    for e in task.examples:
        name, obj = asked(e)
        notes = e.text.split("\n")[0]
        assert notes.count(name) >= 3 or notes.count(f" {obj}") >= 3, "another fact about the person or object"
        other = notes.replace(e.highlight, "")
        first += notes.index(e.highlight) < other.index(f"{name}'s {obj} is")
    assert 0.4 < first / len(task.examples) < 0.6


def test_spans_locate_the_highlight_in_the_prompt_and_the_tokens(task, smollm2):
    e = task.split("dev")[0]
    prompt = task.prompt(e)
    start, end = task.span(e)
    assert prompt[start:end] == e.highlight
    assert task.spans(task.split("dev", 3))[prompt] == (start, end)
    tokens = smollm2.tokenize(prompt)
    pos = Positions.span(tokens, 0, start, end).positions
    assert smollm2.tokenizer.decode(tokens.input_ids[0, list(pos)]).strip() == e.highlight
    label_token_ids(smollm2.tokenizer, task.labels)  # distinct first tokens: label-word scoring works


def test_splits_are_disjoint_and_bad_sizes_are_clear_errors(task):
    ids = {s: {e.id for e in task.split(s)} for s in ("calibration", "dev", "test", "train")}
    assert not ids["test"] & (ids["dev"] | ids["calibration"]) and not ids["dev"] & ids["calibration"]
    with pytest.raises(AttnlabError, match="leave no few-shot pool"):
        span_qa(n=300)
    with pytest.raises(AttnlabError, match="n_distractors"):
        span_qa(n_distractors=9)
