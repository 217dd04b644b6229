"""Reasoning traces for thought anchors: sentence splitting, token spans, the shipped examples.

Bogdan, Macar et al., "Thought Anchors" (interp-reasoning/thought-anchors), sentence rules: the
text between `<think>` and `</think>` (or the whole trace), split at blank lines or at `.`, `?`,
`!` followed by whitespace; chunks under 10 characters merge into the next; character spans map
to token spans through the tokenizer's offsets.

    spans = split_sentences(text)                 # [(start, end), ...] character spans
    trace = prepare_trace(probe, text)            # + tokens, token spans, per-token segment ids

attnlab's choices are listed in `attnlab.analyses.thought_anchors`' docstring.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from attnlab.probe.errors import AttnlabError
from attnlab.probe.tokens import Tokens

TRACE_FOLDER = Path(__file__).resolve().parent / "data" / "traces"
_SENTENCE_END = re.compile(r"[.?!](?=\s)")
_BLANK_LINE = re.compile(r"\n[ \t\r]*\n")


# ----- sentences -----
def think_region(text: str) -> tuple[int, int]:
    """Character span [start, end) of the text between `<think>` and `</think>` (the whole text
    when neither is present; from the start / to the end when one is missing)."""
    start = text.find("<think>")
    start = 0 if start < 0 else start + len("<think>")
    end = text.find("</think>", start)
    return start, (len(text) if end < 0 else end)


def split_sentences(text: str, min_chars: int = 10, think: bool = True) -> list[tuple[int, int]]:
    """Character spans [start, end) of the sentences of a reasoning trace (rules in the module
    docstring). think=False splits the whole text, ignoring `<think>` tags."""
    if not isinstance(text, str) or not text.strip():
        raise AttnlabError("the trace is empty: pass the reasoning text (with or without <think> tags)")
    lo, hi = think_region(text) if think else (0, len(text))
    cuts = {lo, hi}
    region = text[lo:hi]
    cuts.update(lo + m.end() for m in _SENTENCE_END.finditer(region))
    cuts.update(lo + m.start() for m in _BLANK_LINE.finditer(region))
    spans = []
    bounds = sorted(cuts)
    for a, b in zip(bounds, bounds[1:]):
        piece = text[a:b]
        if piece.strip():
            a += len(piece) - len(piece.lstrip())
            b -= len(piece) - len(piece.rstrip())
            spans.append((a, b))
    if not spans:
        raise AttnlabError("the reasoning region of the trace (between <think> and </think>) is empty: "
                           "pass a trace with text to split")
    i = 0
    while i < len(spans):
        if spans[i][1] - spans[i][0] >= min_chars or len(spans) == 1:
            i += 1
        elif i < len(spans) - 1:  # merge into the next chunk and look at it again
            spans[i: i + 2] = [(spans[i][0], spans[i + 1][1])]
        else:  # a short last chunk joins the previous one
            spans[i - 1: i + 1] = [(spans[i - 1][0], spans[i][1])]
            break
    return spans


def locate_sentences(text: str, sentences: Sequence[str] | Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Given sentences (strings found in order in the text, or (start, end) character spans) ->
    validated, ordered, non-overlapping spans."""
    spans, pos = [], 0
    for n, s in enumerate(sentences):
        if isinstance(s, str):
            start = text.find(s.strip(), pos) if s.strip() else -1
            if start < 0:
                raise AttnlabError(f"sentence {n} ({s[:40]!r}) is not in the trace after character {pos}: "
                                   "pass sentences exactly as they appear in the text, in order")
            span = (start, start + len(s.strip()))
        else:
            span = tuple(int(x) for x in s)
            if len(span) != 2 or not 0 <= span[0] < span[1] <= len(text):
                raise AttnlabError(f"span {n} {tuple(s)} is not in the text (0-{len(text)}): give (start, end) "
                                   "character offsets with start < end <= len(text)")
            if span[0] < pos:
                raise AttnlabError(f"span {n} {span} overlaps or precedes span {n - 1}: give spans in text order")
        spans.append(span)
        pos = span[1]
    return spans


@dataclass
class Trace:
    """One tokenised reasoning trace.

    spans: sentence character spans [start, end); token_spans: [start, end) token positions in
    `tokens` (BOS included); segment_ids: [N] sentence index of every token (-1: none)."""

    name: str
    text: str
    spans: list[tuple[int, int]]
    token_spans: list[tuple[int, int]]
    tokens: Tokens
    segment_ids: torch.Tensor

    @property
    def n_sentences(self) -> int:
        """Number of sentences."""
        return len(self.spans)

    @property
    def sentences(self) -> list[str]:
        """The text of every sentence, in order."""
        return [self.text[a:b] for a, b in self.spans]

    def table(self) -> pd.DataFrame:
        """One row per sentence: trace, sentence, text, char_start/char_end, token_start/token_end, n_tokens."""
        return pd.DataFrame({
            "trace": self.name, "sentence": range(self.n_sentences), "text": self.sentences,
            "char_start": [a for a, _ in self.spans], "char_end": [b for _, b in self.spans],
            "token_start": [a for a, _ in self.token_spans], "token_end": [b for _, b in self.token_spans],
            "n_tokens": [b - a for a, b in self.token_spans],
        })


def token_segments(offsets: Sequence[tuple[int, int]], text: str, spans: Sequence[tuple[int, int]]) -> list[int]:
    """Per-token sentence index from tokenizer character offsets ((-1, -1) = BOS/pad -> -1)."""
    starts = [a for a, _ in spans]
    ids = []
    for a, e in offsets:
        piece = text[a:e] if a >= 0 else ""
        if a < 0 or not piece:
            ids.append(-1)
            continue
        anchor = a + len(piece) - len(piece.lstrip()) if piece.strip() else a
        k = bisect.bisect_right(starts, anchor) - 1
        if k < 0 or anchor >= spans[k][1] or (not piece.strip() and e > spans[k][1]):
            ids.append(-1)  # outside every sentence, or whitespace reaching past the sentence's end
        else:
            ids.append(k)
    return ids


def prepare_trace(probe, text: str, sentences=None, *, name: str = "trace", min_chars: int = 10,
                  prepend_bos: bool = True) -> Trace:
    """Split (or locate the given sentences), tokenise and map sentences to token spans."""
    spans = split_sentences(text, min_chars) if sentences is None else locate_sentences(text, sentences)
    if len(spans) < 2:
        raise AttnlabError(f"trace {name!r} has {len(spans)} sentence(s): thought anchors need at least 2 "
                           "(pass a longer trace, or sentences=[...])")
    tokens = probe.tokenize(text, prepend_bos=prepend_bos)
    ids = token_segments(tokens.offsets[0], text, spans)
    token_spans = []
    for k, (a, b) in enumerate(spans):
        pos = [i for i, s in enumerate(ids) if s == k]
        if not pos:
            raise AttnlabError(f"sentence {k} ({text[a:b][:40]!r}) of trace {name!r} has no token of its own "
                               "(a token spans it and its neighbour): merge it with a neighbour")
        token_spans.append((pos[0], pos[-1] + 1))
    return Trace(name, text, spans, token_spans, tokens, torch.tensor(ids, dtype=torch.long))


def load_traces(names: Sequence[str] | None = None) -> dict[str, str]:
    """The example traces shipped in `analyses/data/traces/` (name -> text)."""
    files = {p.stem: p for p in sorted(TRACE_FOLDER.glob("*.txt"))}
    names = list(files) if names is None else list(names)
    for n in names:
        if n not in files:
            raise AttnlabError(f"unknown trace {n!r}: choose from {', '.join(files)}")
    return {n: files[n].read_text(encoding="utf-8") for n in names}


__all__ = ["TRACE_FOLDER", "Trace", "load_traces", "locate_sentences", "prepare_trace", "split_sentences",
           "think_region", "token_segments"]
