"""Bigram-Backcopy (BB): the synthetic task of Guo et al., "Active-Dormant Attention Heads:
Mechanistically Demystifying Extreme-Token Phenomena in LLMs" (GuoTianYu2000/Active-Dormant-Attention).

Vocabulary = the characters of a text corpus + BOS. The `n_triggers` most frequent characters are
triggers. A sequence is BOS, x_1, ..., x_N with
    x_1 ~ unigram with triggers removed,
    x_i = x_{i-2}               if x_{i-1} is a trigger (back-copy),
    x_i ~ P_bigram(. | x_{i-1}) otherwise.
The oracle next-token distribution at position i is one-hot(x_{i-1}) after a trigger and
P_bigram(. | x_i) otherwise; the excess loss of a model is E[CE(oracle, model)] - E[H(oracle)]
(= the mean KL(oracle || model)), reported in total and split into back-copy (the input token is
a trigger) and bigram parts.

The corpus: the paper used TinyShakespeare. attnlab generates its own ~1 MB of English-like text
reproducibly from a small grammar (`generate_corpus`, seeded: the same bytes on every machine),
so nothing needs to ship or download; any other text can be passed instead.
"""

from __future__ import annotations

import functools
import random
from collections import Counter

import torch

from attnlab.probe.errors import AttnlabError

# ----- the corpus: a small English grammar, sampled with a seeded RNG -----
_WORDS = {
    "det": "the the the a a this that every each some no his her their our my".split(),
    "adj": ("old young small great quiet dark bright cold warm green grey gentle bitter sweet strange "
            "proud tired wild little long heavy empty silent golden broken").split(),
    "noun": ("king queen man woman child house river town road sea ship horse field tree door window "
             "letter book night morning winter garden stone fire friend brother sister father mother "
             "soldier farmer lord lady servant voice hand heart world city bridge hill wind bell").split(),
    "verb": ("saw found took gave loved kept left made heard called followed watched carried opened "
             "closed held knew met told asked answered crossed remembered built broke").split(),
    "iverb": "slept waited laughed wept spoke walked stood fell rose listened returned sang".split(),
    "adv": "slowly quickly softly again alone together never always still once".split(),
    "prep": "in on under over near behind beside through across into from with".split(),
    "conj": "and but so while when because".split(),
    "name": "Anne Thomas Mary John Henry Alice Robert Clara Edmund Lucy Hugh Margaret".split(),
    "say": "said cried whispered answered replied".split(),
}


def _noun_phrase(r: random.Random) -> str:
    if r.random() < 0.15:
        return r.choice(_WORDS["name"])
    parts = [r.choice(_WORDS["det"])]
    if r.random() < 0.45:
        parts.append(r.choice(_WORDS["adj"]))
    parts.append(r.choice(_WORDS["noun"]))
    if r.random() < 0.2:
        parts += [r.choice(_WORDS["prep"]), r.choice(_WORDS["det"]), r.choice(_WORDS["noun"])]
    return " ".join(parts)


def _clause(r: random.Random) -> str:
    subj = _noun_phrase(r)
    if r.random() < 0.6:
        s = f"{subj} {r.choice(_WORDS['verb'])} {_noun_phrase(r)}"
    else:
        s = f"{subj} {r.choice(_WORDS['iverb'])}"
    if r.random() < 0.3:
        s += f" {r.choice(_WORDS['adv'])}"
    if r.random() < 0.3:
        s += f" {r.choice(_WORDS['prep'])} {_noun_phrase(r)}"
    return s


def _sentence(r: random.Random) -> str:
    s = _clause(r)
    while r.random() < 0.35:
        s += ("," if r.random() < 0.5 else "") + f" {r.choice(_WORDS['conj'])} {_clause(r)}"
    if r.random() < 0.15:
        s = f"'{s[0].upper() + s[1:]}{r.choice(['!', '?', ','])}' {r.choice(_WORDS['say'])} {_noun_phrase(r)}"
    s = s[0].upper() + s[1:]
    return s + r.choice([".", ".", ".", ".", ";", "!", "?"])


@functools.lru_cache(maxsize=4)
def generate_corpus(n_chars: int = 1_000_000, seed: int = 0) -> str:
    """~n_chars of English-like text (sentences in paragraphs), the same for the same seed."""
    r = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        para = " ".join(_sentence(r) for _ in range(r.randint(2, 7))) + "\n"
        out.append(para)
        size += len(para)
    return "".join(out)[:n_chars]


# ----- the task -----
class BigramBackcopy:
    """The BB distribution over one corpus.

    chars: the vocabulary (ids 0..V-2); bos_id = V-1. bigram: [V, V] transition matrix (row BOS =
    the unigram without triggers). triggers: ids of the n_triggers most frequent characters."""

    def __init__(self, corpus: str | None = None, n_triggers: int = 3, seq_len: int = 256):
        corpus = generate_corpus() if corpus is None else corpus
        if len(set(corpus)) <= n_triggers + 1:
            raise AttnlabError(f"the corpus has {len(set(corpus))} distinct characters: it needs more than "
                               f"n_triggers + 1 = {n_triggers + 1}")
        if seq_len < 2:
            raise AttnlabError(f"seq_len must be at least 2, got {seq_len}")
        self.n_triggers, self.seq_len = n_triggers, seq_len
        counts = Counter(corpus)
        self.chars = sorted(counts)
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        V = len(self.chars) + 1
        self.vocab_size, self.bos_id = V, V - 1
        freq = torch.tensor([counts[c] for c in self.chars], dtype=torch.float64)
        self.triggers = sorted(int(i) for i in freq.argsort(descending=True)[:n_triggers])
        self.is_trigger = torch.zeros(V, dtype=torch.bool)
        self.is_trigger[self.triggers] = True
        ids = torch.tensor([self.stoi[c] for c in corpus])
        big = torch.zeros(V, V, dtype=torch.float64)
        big.index_put_((ids[:-1], ids[1:]), torch.ones(len(ids) - 1, dtype=torch.float64), accumulate=True)
        unigram = torch.cat([freq, torch.zeros(1, dtype=torch.float64)])
        unigram_nt = unigram.clone()
        unigram_nt[self.triggers] = 0
        empty = big.sum(dim=1) == 0
        big[empty] = unigram[None].expand(int(empty.sum()), -1)  # chars never followed: unigram
        big[self.bos_id] = unigram_nt
        self.bigram = (big / big.sum(dim=1, keepdim=True)).float()

    def __repr__(self) -> str:
        trig = ", ".join(repr(self.chars[t]) for t in self.triggers)
        return f"BigramBackcopy(vocab {self.vocab_size} incl. BOS, triggers {trig}, seq_len {self.seq_len})"

    def decode(self, ids) -> str:
        """Token ids -> their characters as one string ('^' for BOS)."""
        return "".join("^" if int(i) == self.bos_id else self.chars[int(i)] for i in ids)

    def sample(self, batch: int, generator: torch.Generator | None = None, seq_len: int | None = None) -> torch.Tensor:
        """[batch, 1 + seq_len] token ids: BOS, then the BB sequence."""
        n = seq_len or self.seq_len
        x = torch.empty(batch, n + 1, dtype=torch.long)
        x[:, 0] = self.bos_id
        x[:, 1] = torch.multinomial(self.bigram[self.bos_id], batch, replacement=True, generator=generator)
        for i in range(2, n + 1):
            nxt = torch.multinomial(self.bigram[x[:, i - 1]], 1, generator=generator)[:, 0]
            x[:, i] = torch.where(self.is_trigger[x[:, i - 1]], x[:, i - 2], nxt)
        return x

    def oracle(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N] -> [B, N, V]: the true distribution of the token after each position."""
        p = self.bigram[x].clone()
        trig = self.is_trigger[x]
        trig[:, 0] = False
        b, i = trig.nonzero(as_tuple=True)
        p[b, i] = 0
        p[b, i, x[b, i - 1]] = 1
        return p

    def excess_loss(self, logits: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
        """Mean KL(oracle || model) over positions 0..N-2 of x [B, N] (the next token is known
        there); logits [B, N, V]. Returns total, backcopy (input token is a trigger) and bigram
        parts, and the model's cross-entropy against the sampled next tokens."""
        p = self.oracle(x)[:, :-1]
        logq = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        kl = (p * (torch.log(p.clamp_min(1e-30)) - logq)).sum(-1)  # [B, N-1]
        trig = self.is_trigger[x[:, :-1]]
        ce = -logq.gather(-1, x[:, 1:, None])[..., 0]
        return {
            "excess": float(kl.mean()),
            "backcopy": float(kl[trig].mean()) if trig.any() else float("nan"),
            "bigram": float(kl[~trig].mean()),
            "loss": float(ce.mean()),
        }
