"""Classification tasks from the sae-probes data: fixed disjoint splits, prompts, label parsing."""

from __future__ import annotations

import pytest

from attnlab.probe.errors import AttnlabError
from attnlab.probe.tasks.classification import Example, from_examples, label_token_ids, load_task


@pytest.fixture(scope="module")
def sst2():
    return load_task("sst2", sizes={"calibration": 100, "dev": 100, "test": 300})


def test_splits_are_disjoint_and_cover_distinct_rows(sst2):
    ids = {s: [e.id for e in sst2.split(s)] for s in ("calibration", "dev", "test", "train")}
    assert [len(ids[s]) for s in ("calibration", "dev", "test")] == [100, 100, 300]
    for a in ids:
        assert len(set(ids[a])) == len(ids[a])
        for b in ids:
            if a < b:
                assert not set(ids[a]) & set(ids[b]), f"{a} and {b} share examples"
    assert sum(len(v) for v in ids.values()) == len(sst2.examples) == 5000


def test_splits_are_fixed_by_the_seed(sst2):
    again = load_task("sst2", sizes={"calibration": 100, "dev": 100, "test": 300})
    other = load_task("sst2", seed=1, sizes={"calibration": 100, "dev": 100, "test": 300})
    assert [e.id for e in again.split("test")] == [e.id for e in sst2.split("test")]
    assert [e.id for e in other.split("test")] != [e.id for e in sst2.split("test")]
    assert sst2.split("test", 10) == sst2.split("test")[:10]
    with pytest.raises(AttnlabError, match="has 300 examples"):
        sst2.split("test", 301)


def test_few_shot_demonstrations_come_from_the_train_split_only(sst2):
    ex = sst2.split("test", 1)[0]
    demos = sst2.demonstrations(ex, 4)
    train = {e.id for e in sst2.split("train")}
    assert len(demos) == 4 and all(d.id in train for d in demos)
    assert sorted(d.label for d in demos) == [0, 0, 1, 1]
    prompt = sst2.prompt(ex, shots=4)
    assert prompt.endswith(sst2.question(ex)) and prompt.count("Sentiment:") == 5
    assert sst2.prompt(ex).count("Sentiment:") == 1 and not sst2.prompt(ex).endswith(" ")


def test_parsing_a_generated_token():
    task = from_examples("t", [Example(i, "x", i % 2) for i in range(10)], [" negative", " positive"],
                         sizes={"calibration": 2, "dev": 2, "test": 2})
    assert task.parse(" positive") == 1 and task.parse("Pos") == 1 and task.parse(" negative.") == 0
    assert task.parse(" positives") == 1
    assert task.parse(" The") is None and task.parse("\n") is None and task.parse("") is None


def test_multiple_choice_tasks_use_option_letters():
    obqa = load_task("openbookqa", sizes={"calibration": 10, "dev": 10, "test": 10})
    assert obqa.kind == "choice" and obqa.labels == (" A", " B", " C", " D")
    piqa = load_task("piqa", sizes={"calibration": 10, "dev": 10, "test": 10})
    ex = piqa.split("test", 1)[0]
    assert "\nA. " in piqa.prompt(ex) and "\nB. " in piqa.prompt(ex)
    siqa = load_task("socialiqa", sizes={"calibration": 10, "dev": 10, "test": 10})
    assert "correct answer" not in siqa.prompt(siqa.split("test", 1)[0])


def test_label_words_must_start_with_different_tokens(smollm2):
    assert len(set(label_token_ids(smollm2.tokenizer, [" negative", " positive"]))) == 2
    with pytest.raises(AttnlabError, match="share a first token"):
        label_token_ids(smollm2.tokenizer, [" positive", " positive"])
