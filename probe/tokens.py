"""Tokenisation with explicit BOS handling and left padding.

Sinks depend on whether a BOS token is prepended, so attnlab never lets the tokenizer decide:
texts are tokenised without special tokens and the model's BOS id is prepended when
`prepend_bos=True` (the choice is recorded in every capture and run). Batches are left-padded:
the "first token" of a row is its first non-pad token, and every statistic is NaN at pad positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attnlab.probe import validate
from attnlab.probe.errors import AttnlabError


@dataclass
class Tokens:
    """A tokenised batch.

    input_ids, attention_mask: [B, N] (left padding, mask True on real tokens).
    strings: [B][N] token strings ('' at pad positions).
    offsets: [B][N] (start, end) character offsets in the row's text; (-1, -1) for BOS and pads.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    strings: list[list[str]]
    offsets: list[list[tuple[int, int]]]
    texts: list[str] | None
    prepend_bos: bool

    @property
    def batch_size(self) -> int:
        """Number of rows B."""
        return self.input_ids.shape[0]

    @property
    def length(self) -> int:
        """Padded length N of the batch."""
        return self.input_ids.shape[1]

    @property
    def padded(self) -> bool:
        """True when some row has pad positions (rows differ in length)."""
        return not bool(self.attention_mask.all())

    def position_ids(self) -> torch.Tensor:
        """[B, N] positions counted from each row's first real token (0 at pads)."""
        return (self.attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)

    def first_real(self) -> torch.Tensor:
        """[B] index of the first non-pad token of each row."""
        return (~self.attention_mask).sum(dim=1)

    def lengths(self) -> list[int]:
        """Each row's real token count (BOS included when prepended)."""
        return [int(n) for n in self.attention_mask.sum(dim=1)]

    def take(self, rows: list[int], min_length: int = 1) -> Tokens:
        """The Tokens of these rows only (in this order), left-padded to the longest of them (or to
        min_length, at most this batch's length): the columns that are pads in every chosen row are
        dropped (a length bucket of a larger batch)."""
        mask = self.attention_mask[rows]
        drop = max(0, min(int((~mask).sum(dim=1).min()), self.length - min_length))
        return Tokens(self.input_ids[rows][:, drop:], mask[:, drop:], [self.strings[b][drop:] for b in rows],
                      [self.offsets[b][drop:] for b in rows],
                      [self.texts[b] for b in rows] if self.texts is not None else None, self.prepend_bos)


def tokenize(
    tokenizer,
    texts: str | list[str],
    *,
    prepend_bos: bool = True,
    context_length: int | None = None,
    model_name: str = "the model",
    arg: str = "texts",
) -> Tokens:
    """Texts -> Tokens. `arg` names the caller's argument in error messages."""
    prepend_bos = validate.flag(prepend_bos, "prepend_bos")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)):
        raise AttnlabError(f"{arg}: {texts!r:.60} is of type {type(texts).__name__}; pass a text, a list of texts, "
                           "token ids or Tokens")
    if not texts:
        raise AttnlabError(f"{arg}: no input; pass at least one text")
    texts = list(texts)
    for n, text in enumerate(texts):
        if not isinstance(text, str):
            raise AttnlabError(f"{arg}[{n}]: is of type {type(text).__name__}, not a string; pass texts or token ids")
        if not text.strip():
            raise AttnlabError(f"{arg}[{n}]: the text is empty; pass a text with at least one non-space character")
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is None:
        raise AttnlabError(f"prepend_bos: {model_name}'s tokenizer has no BOS token; use prepend_bos=False")
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    rows, offs = [], []
    for ids, off in zip(enc["input_ids"], enc["offset_mapping"]):
        ids, off = list(ids), [tuple(o) for o in off]
        if prepend_bos:
            ids, off = [bos] + ids, [(-1, -1)] + off
        rows.append(ids)
        offs.append(off)
    return _pad(tokenizer, rows, offs, texts, prepend_bos, context_length, model_name, arg)


def token_counts(tokenizer, texts: list[str], *, prepend_bos: bool = True) -> list[int]:
    """Each text's token count as `tokenize` makes it (BOS included when prepended), without building a
    padded batch: what length bucketing (`attnlab.probe.buckets`) plans with."""
    enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [len(ids) + int(bool(prepend_bos)) for ids in enc]


def from_ids(
    tokenizer,
    ids: torch.Tensor | list[list[int]],
    *,
    prepend_bos: bool = False,
    context_length: int | None = None,
    model_name: str = "the model",
    vocab_size: int | None = None,
    arg: str = "ids",
) -> Tokens:
    """Tokens from given ids (kept as they are; `prepend_bos` adds the BOS id in front).

    ids: a [N] or [B, N] integer tensor or numpy array, a list of ints, or a list of lists of ints
    (rows may differ in length: they are left-padded). With vocab_size, every id must be below it."""
    prepend_bos = validate.flag(prepend_bos, "prepend_bos")
    rows = id_rows(ids, arg)
    if vocab_size is not None:
        for b, r in enumerate(rows):
            bad = next((t for t in r if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise AttnlabError(f"{arg}: token id {bad} (row {b}) is outside the vocabulary; {model_name} takes ids "
                                   f"0-{vocab_size - 1}")
    if prepend_bos:
        if tokenizer.bos_token_id is None:
            raise AttnlabError(f"prepend_bos: {model_name}'s tokenizer has no BOS token; use prepend_bos=False")
        rows = [[tokenizer.bos_token_id] + r for r in rows]
    offs = [[(-1, -1)] * len(r) for r in rows]
    return _pad(tokenizer, rows, offs, None, prepend_bos, context_length, model_name, arg)


def id_rows(ids, arg: str = "ids") -> list[list[int]]:
    """Token ids as a tensor, numpy array, list or list of lists -> rows of Python ints, checked:
    integers only (a float id is a bug upstream, not a token), rank 1 or 2, no empty row."""
    if isinstance(ids, np.ndarray):
        if ids.dtype == object:
            ids = ids.tolist()
        else:
            ids = torch.from_numpy(ids)
    if isinstance(ids, torch.Tensor):
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise AttnlabError(f"{arg}: token ids are {str(ids.dtype).removeprefix('torch.')}; pass integer ids "
                               "(e.g. tensor.long())")
        if ids.ndim not in (1, 2):
            raise AttnlabError(f"{arg}: token ids have shape {tuple(ids.shape)}; pass [N] ids or [batch, N] rows")
        rows = ids.tolist() if ids.ndim == 2 else [ids.tolist()]
    elif isinstance(ids, (list, tuple)):
        sequence = (list, tuple, np.ndarray, torch.Tensor)
        if not any(isinstance(r, sequence) for r in ids):  # one row of (supposed) ids
            return id_rows([list(ids)], arg) if ids else id_rows([[]], arg)
        rows = []
        for b, r in enumerate(ids):
            if not isinstance(r, sequence):
                raise AttnlabError(f"{arg}[{b}]: {r!r:.60} is of type {type(r).__name__}; pass one list of token "
                                   "ids, or a list of such lists (one per row)")
            if isinstance(r, (np.ndarray, torch.Tensor)):
                inner = id_rows(r, f"{arg}[{b}]")
                if len(inner) != 1:
                    raise AttnlabError(f"{arg}[{b}]: a row has shape {tuple(r.shape)}; pass each row as [N] ids")
                rows.append(inner[0])
            else:
                rows.append([validate.integer(t, f"{arg}[{b}][{n}]", hint="token ids are integers")
                             for n, t in enumerate(r)])
    else:
        raise AttnlabError(f"{arg}: {ids!r:.60} is of type {type(ids).__name__}; pass token ids as a tensor or lists")
    if not rows or any(len(r) == 0 for r in rows):
        raise AttnlabError(f"{arg}: empty token ids; pass at least one token per row")
    return rows


def _pad(tokenizer, rows, offs, texts, prepend_bos, context_length, model_name, arg: str = "inputs") -> Tokens:
    longest = max(len(r) for r in rows)
    if context_length is not None and longest > context_length:
        raise AttnlabError(
            f"{arg}: the input is {longest} tokens but {model_name}'s context is {context_length} tokens; "
            "shorten the text (or split it into several inputs)"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        pad = 0
    B = len(rows)
    input_ids = torch.full((B, longest), pad, dtype=torch.long)
    mask = torch.zeros((B, longest), dtype=torch.bool)
    strings, offsets, memo = [], [], {}
    for b, (r, o) in enumerate(zip(rows, offs)):
        n_pad = longest - len(r)
        input_ids[b, n_pad:] = torch.tensor(r, dtype=torch.long)
        mask[b, n_pad:] = True
        strings.append([""] * n_pad + token_strings(tokenizer, r, memo))
        offsets.append([(-1, -1)] * n_pad + list(o))
    return Tokens(input_ids, mask, strings, offsets, texts, prepend_bos)


def token_strings(tokenizer, ids: list[int], memo: dict[int, str] | None = None) -> list[str]:
    """Each token as the text it stands for, through the tokenizer's own decoder
    (`convert_tokens_to_string`): byte-level BPE's 'Ġ'/'Ċ' become a space/newline and its bytes
    become characters ('Ã©' is 'é'), SentencePiece's '▁' a space. A token holding part of a
    character's bytes reads as U+FFFD. The leading space of a '▁' token is kept even where the
    decoder strips a text's first space (Llama's). memo: strings already made, by id (shared by
    the rows of a batch: each distinct token is decoded once)."""
    memo = {} if memo is None else memo
    new = list(dict.fromkeys(i for i in ids if i not in memo))
    for i, token in zip(new, tokenizer.convert_ids_to_tokens(new)):
        if token is None:  # an id past the tokenizer's vocabulary (an embedding row it never uses)
            memo[i] = ""
            continue
        text = tokenizer.convert_tokens_to_string([token])
        if token.startswith("▁") and not text.startswith(" "):
            text = " " + text
        memo[i] = text
    return [memo[i] for i in ids]
