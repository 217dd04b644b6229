"""Needle-in-a-haystack prompts, as in Wu et al.'s retrieval-head protocol.

A haystack of ordinary prose (shipped: `probe/data/haystack.txt`, written for attnlab; longer
haystacks repeat its paragraphs in a fixed shuffled order, which is said in `Needle.describe`) is
cut to the token budget, the needle sentence is inserted at depth d% (moved back to the end of
the previous sentence), and the question follows:

    {haystack with needle}\n\nBased on the content of the book, Question: {question}\nAnswer:

For an instruct model (a tokenizer with a chat template) the same text goes into one user turn of
the model's chat template by default (`chat=True`): SmolLM2-Instruct answers the raw template with
an immediate end-of-turn, and correctly inside its chat format. The choice is recorded.

The "real needle" is the answer span: its token span in the prompt is the first window whose
token set overlaps the answer's token set by more than 0.9. Success is ROUGE-1 recall of the
answer's words in the response above 0.5.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from importlib import resources

from attnlab.probe.errors import AttnlabError

TEMPLATE = "\n\nBased on the content of the book, Question: {question}\nAnswer:"


@dataclass(frozen=True)
class Needle:
    """A needle sentence planted in the haystack, the question it answers, and the answer (a substring of the
    sentence)."""

    sentence: str
    question: str
    answer: str


NEEDLES = [
    Needle("The secret ingredient in Grandma Rosa's soup is a spoonful of smoked paprika.",
           "What is the secret ingredient in Grandma Rosa's soup?", "a spoonful of smoked paprika"),
    Needle("The key to the old boathouse is hidden under the blue flower pot by the gate.",
           "Where is the key to the old boathouse hidden?", "under the blue flower pot by the gate"),
    Needle("The best thing to do in Millbrook is to eat cherry pie at the harbour cafe.",
           "What is the best thing to do in Millbrook?", "eat cherry pie at the harbour cafe"),
]


@dataclass
class NiahPrompt:
    """One needle-in-a-haystack prompt: its token ids, the needle, the requested length and depth, and where the
    needle and its answer lie."""

    input_ids: list[int]  # BOS (when prepended) + haystack with needle + question template
    needle: Needle
    length: int  # the requested length in tokens
    depth: float  # percent
    span: tuple[int, int]  # [start, end) token positions of the answer in input_ids
    needle_at: int  # token position where the needle sentence starts


def haystack_paragraphs() -> list[str]:
    """The paragraphs of the shipped haystack text (data/haystack.txt)."""
    text = resources.files("attnlab.probe").joinpath("data/haystack.txt").read_text()
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def haystack_ids(tokenizer, n_tokens: int, seed: int = 0) -> list[int]:
    """At least n_tokens of haystack: the shipped text, then its paragraphs in shuffled rounds."""
    paragraphs = haystack_paragraphs()
    rng = random.Random(seed)
    order = list(paragraphs)
    ids: list[int] = []
    first = True
    while len(ids) < n_tokens:
        text = ("" if first else " ") + " ".join(order)
        ids += tokenizer(text, add_special_tokens=False).input_ids
        rng.shuffle(order)
        first = False
    return ids[:n_tokens]


def chat_frame(tokenizer) -> tuple[str, str] | None:
    """The text before and after a user message in the tokenizer's chat template (None if none)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    mark = "\x00USER\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(mark)
    return before, after


def build(tokenizer, needle: Needle, length: int, depth: float, *, prepend_bos: bool = True, chat: bool = False,
          seed: int = 0) -> NiahPrompt:
    """One NIAH prompt of exactly `length` tokens with the needle at `depth` percent.

    chat: wrap the prompt in one user turn of the tokenizer's chat template (whose first token,
    for SmolLM2, is its BOS; `prepend_bos` then adds nothing)."""
    if not 0 <= depth <= 100:
        raise AttnlabError(f"depth {depth} must be a percentage between 0 and 100")
    needle_ids = tokenizer(" " + needle.sentence, add_special_tokens=False).input_ids
    question_ids = tokenizer(TEMPLATE.format(question=needle.question), add_special_tokens=False).input_ids
    bos = [tokenizer.bos_token_id] if prepend_bos and tokenizer.bos_token_id is not None else []  # none: Qwen2.5
    if chat:
        frame = chat_frame(tokenizer)
        if frame is None:
            raise AttnlabError("this tokenizer has no chat template: use chat=False")
        before = tokenizer(frame[0], add_special_tokens=False).input_ids
        bos = before if (before[:1] == bos or not prepend_bos) else bos + before
        question_ids = question_ids + tokenizer(frame[1], add_special_tokens=False).input_ids
    budget = length - len(bos) - len(needle_ids) - len(question_ids)
    if budget < 16:
        raise AttnlabError(f"length {length} leaves no room for a haystack: use at least "
                           f"{length - budget + 16} tokens")
    hay = haystack_ids(tokenizer, budget, seed)
    cut = int(round(budget * depth / 100))
    # Move back to the end of the previous sentence so the needle never splits one.
    while cut > 0 and not re.search(r"[.!?]\s*$", tokenizer.decode(hay[:cut][-1:])):
        cut -= 1
    ids = bos + hay[:cut] + needle_ids + hay[cut:] + question_ids
    span = answer_span(tokenizer, ids, needle.answer)
    return NiahPrompt(ids, needle, length, depth, span, len(bos) + cut)


def answer_span(tokenizer, ids: list[int], answer: str) -> tuple[int, int]:
    """First window of the answer's token count whose token set overlaps the answer's by > 0.9."""
    ans = tokenizer(" " + answer, add_special_tokens=False).input_ids
    target = set(ans)
    n = len(ans)
    for start in range(len(ids) - n + 1):
        if len(set(ids[start:start + n]) & target) / len(target) > 0.9:
            return start, start + n
    raise AttnlabError(f"answer '{answer}' is not in the prompt: the needle must contain the answer")


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words of `text` (for ROUGE-1)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge1_recall(reference: str, response: str) -> float:
    """Share of the reference's words (with multiplicity) that the response contains."""
    ref, got = Counter(words(reference)), Counter(words(response))
    total = sum(ref.values())
    return sum(min(c, got[w]) for w, c in ref.items()) / total if total else 0.0
