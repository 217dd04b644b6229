"""Span QA: questions whose answer is stated in one highlighted sentence of a distracting context.

A task where *where the model attends* decides the answer, for PASTA and VAR (METHODS.md section
6; PASTA's knowledge-conflict setting in small): the notes state two conflicting values for the
asked fact, from two sources, among distractor sentences with similar facts (the same person's
other objects, other people's same object). The user highlights one of the two conflicting
sentences; the gold answer is the value in the highlighted sentence. The highlight exists only as
a character span (it is never marked in the text), so without steering the model can only guess
between the two values, and accuracy measures how much steering makes it use the span.

    task = span_qa(n=700, seed=0)            # a ClassificationTask; labels are colour words
    e = task.split("test")[0]
    prompt = task.prompt(e)                  # instruction, notes, question, "Answer:"
    start, end = task.span(e)                # characters of the highlighted sentence in prompt
    e.conflict                               # label index of the other (non-highlighted) value

    Read the notes and answer the question with one colour word.

    Notes: Omar's kite is green. According to the shop receipt, Maria's boat is red. ...
    According to her neighbour, Maria's boat is blue. Tom's boat is white. ...
    Question: What colour is Maria's boat?
    Answer:

attnlab's choices: labels are 8 colour words with distinct single first tokens (scored by
label-word log-probs at the last position, like the classification tasks); the highlighted
sentence is the first or the second of the conflicting pair with equal probability, so a
position bias cannot reach more than about half; 4 distractor sentences by default; everything
is drawn from `random.Random(seed)`, so a seed fixes the examples and the splits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from attnlab.probe.errors import AttnlabError
from attnlab.probe.tasks.classification import ClassificationTask, Example, TaskSpec

COLOURS = (" red", " blue", " green", " yellow", " black", " white", " brown", " pink")
NAMES = ("Maria", "Tom", "Anna", "Peter", "Lucy", "Omar", "Sara", "Ivan", "Nina", "Paul", "Rosa", "Jack",
         "Emma", "Hugo", "Alice", "Ben", "Clara", "David", "Mei", "Leo")
OBJECTS = ("boat", "car", "house", "bicycle", "door", "kite", "scarf", "umbrella", "fence", "tent", "mug", "hat")
SOURCES = ("the shop receipt", "the harbour log", "a neighbour", "the insurance papers", "an old photo",
           "the town register", "a friend", "the repair bill", "the newspaper", "a letter")
INSTRUCTION = "Read the notes and answer the question with one colour word."
TEMPLATE = "{text}\nAnswer:"
DEFAULT_SPLITS = {"calibration": 100, "dev": 100, "test": 400}


@dataclass(frozen=True)
class SpanExample(Example):
    """An example whose `highlight` (a sentence of `text`) holds the answer; `conflict` is the label
    of the other value the notes state for the same fact."""

    highlight: str = ""
    conflict: int = -1


class SpanTask(ClassificationTask):
    """A ClassificationTask whose examples carry a highlighted span."""

    def span(self, example: SpanExample, shots: int = 0) -> tuple[int, int]:
        """[start, end) characters of the highlighted sentence in `prompt(example, shots)`."""
        prompt = self.prompt(example, shots=shots)
        at = prompt.rfind(example.highlight)  # demonstrations come first: the example's own notes are last
        if not example.highlight or at < 0:
            raise AttnlabError(f"example {example.id} has no highlighted sentence in its prompt")
        return at, at + len(example.highlight)

    def spans(self, examples, shots: int = 0) -> dict[str, tuple[int, int]]:
        """prompt text -> span, for edit functions that see only the tokenised prompts."""
        return {self.prompt(e, shots=shots): self.span(e, shots) for e in examples}


def _sentence(rng: random.Random, name: str, obj: str, colour: str, source: str | None = None) -> str:
    c = colour.strip()
    if source is not None:
        return f"According to {source}, {name}'s {obj} is {c}."
    return rng.choice([f"{name}'s {obj} is {c}.", f"The {obj} that {name} owns is {c}.",
                       f"{name} has a {c} {obj}."])


def make_example(rng: random.Random, i: int, n_distractors: int = 4) -> SpanExample:
    """Example `i`: notes stating two values for one person's object (the highlighted one is the answer),
    `n_distractors` similar facts around them, then the question."""
    name, *others = rng.sample(NAMES, 4)
    obj, *other_objs = rng.sample(OBJECTS, 4)
    gold, conflict, *rest = rng.sample(range(len(COLOURS)), 5)
    src_gold, src_conflict = rng.sample(SOURCES, 2)
    highlight = _sentence(rng, name, obj, COLOURS[gold], src_gold)
    other = _sentence(rng, name, obj, COLOURS[conflict], src_conflict)
    pair = [highlight, other] if rng.random() < 0.5 else [other, highlight]
    # Distractors: similar facts that must not be confused with the asked one.
    pool = [
        (name, other_objs[0], rng.choice(rest + [conflict])),     # same person, another object
        (others[0], obj, rng.choice(rest + [gold, conflict])),    # another person, the same object
        (others[1], other_objs[1], rng.choice(rest)),
        (others[2], obj, rng.choice(rest)),
        (others[1], other_objs[2], rng.choice(rest + [gold])),
        (name, other_objs[2], rng.choice(rest)),
    ]
    distractors = [_sentence(rng, n, o, COLOURS[c]) for n, o, c in pool[:n_distractors]]
    # The pair keeps its order; distractors go before, between and after it.
    slots = [rng.randrange(3) for _ in distractors]
    sentences = [d for d, s in zip(distractors, slots) if s == 0] + [pair[0]] + \
                [d for d, s in zip(distractors, slots) if s == 1] + [pair[1]] + \
                [d for d, s in zip(distractors, slots) if s == 2]
    text = "Notes: " + " ".join(sentences) + f"\nQuestion: What colour is {name}'s {obj}?"
    return SpanExample(id=i, text=text, label=gold, highlight=highlight, conflict=conflict)


def span_qa(n: int = 700, seed: int = 0, n_distractors: int = 4, sizes: dict[str, int] | None = None) -> SpanTask:
    """`n` generated examples (seeded) with fixed disjoint splits (default calibration 100, dev 100,
    test 400; the rest is the few-shot pool)."""
    if not 0 <= n_distractors <= 6:
        raise AttnlabError(f"n_distractors must be between 0 and 6, got {n_distractors}")
    sizes = {**DEFAULT_SPLITS, **(sizes or {})}
    need = sum(sizes[s] for s in ("calibration", "dev", "test"))
    if n <= need:
        raise AttnlabError(f"span_qa: n={n} examples leave no few-shot pool after splits of {need}: "
                           f"use n > {need} or smaller sizes")
    rng = random.Random(seed)
    examples = [make_example(rng, i, n_distractors) for i in range(n)]
    spec = TaskSpec("span_qa", "", COLOURS, tuple(range(len(COLOURS))), INSTRUCTION, TEMPLATE)
    return SpanTask(spec, examples, seed, sizes)
