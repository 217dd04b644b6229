"""Circuit-discovery tasks: positive prompts the model solves, paired with minimal negatives it cannot.

O'Neill & Bui, "Sparse Autoencoders Enable Scalable and Reliable Circuit Identification in Language
Models" (charlieoneill11/sae-circuits; METHODS.md section 5) score heads on positive prompts (the model
predicts the answer) against negatives (a minimal corruption makes the answer impossible to infer).
Every `CircuitPair` holds both prompts as token ids of the same length (activation patching pairs them
position by position), the answer tokens `correct` and the competing tokens `wrong`; the metric is

    m = logsumexp(logits[correct]) - logsumexp(logits[wrong])      (log p(correct) when wrong is empty)

which is the papers' logit difference: IOI logit(IO) - logit(S) (Wang et al. 2022); greater-than
log P(end year > start) - log P(end year < start) on the decisive token (Hanna et al. 2023); docstring
the next parameter against the function's other arguments (Heimersheim & Janiak 2023); induction
log p(next token).

- `ioi`: Wang et al.'s 15 templates, "Then, {B} and {A} went to the {place}. {B} gave a {object} to"
  -> " {A}" (BABA: B is the subject S, A the indirect object IO); ABBA swaps the first two names.
  Negative (ABC): the second mention of the subject becomes a third name, so all three differ.
- `greater_than`: "The {noun} lasted from the year {XX}{YY} to the year {XX}"; negative: start year
  {XX}01. SmolLM2, Gemma and Qwen split numbers into single digits, so the decisive token is the tens
  digit of the end year: correct = digits above the start's tens digit, wrong = digits below it (an
  equal digit is undecided and left out), start years XX10-XX89. A tokenizer with two-digit year tokens
  (GPT-2) scores the YY token: correct > YY, wrong < YY.
- `docstring`: a Python `def` with six arguments (two, then three documented in order, then one) and a
  docstring whose third `:param` ends the prompt -> the third documented argument; wrong = the other
  arguments. Negative: the def's arguments replaced by other random words (the docstring is kept).
- `induction`: random tokens s (distinct) then s[:m] -> s[m]; negative: the first copy of s replaced by
  other random tokens, so the token before the answer occurred nowhere earlier.

Answers must be one token for the model at hand: a pair is kept only when the prompt followed by the
answer tokenises as the prompt's tokens plus exactly that token, and its negative has the same length;
a template or word list that can never satisfy this is an error naming the fix. `make_task` draws
candidates (seeded: the same pairs for the same tokenizer, seed and options) and keeps the first `n`
whose positive the model solves (its top-1 next token is in `correct`).

    task = make_task(probe, "ioi", n=64)
    task.pairs[0].text, task.solve_rate
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pandas as pd
import torch

from attnlab.probe.errors import AttnlabError
from attnlab.probe.progress import as_progress


@dataclass(frozen=True)
class CircuitPair:
    """One positive prompt and its negative, as token ids (no BOS; the probe adds it)."""

    positive: tuple[int, ...]
    negative: tuple[int, ...]
    correct: tuple[int, ...]  # tokens that answer the positive
    wrong: tuple[int, ...]  # competing tokens (empty: the metric is log p(correct))
    text: str = ""
    negative_text: str = ""
    kind: str = ""  # the variant: "BABA"/"ABBA", the digit mode, ...


@dataclass
class CircuitTask:
    """Pairs the model solves, and how many candidates it took to find them."""

    name: str
    pairs: list[CircuitPair]
    candidates: int  # candidates checked against the model
    solved: int  # of those, how many the model solved
    model: str = ""
    params: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def solve_rate(self) -> float:
        """solved / candidates in [0, 1] (NaN when nothing was checked)."""
        return self.solved / self.candidates if self.candidates else float("nan")

    def table(self) -> pd.DataFrame:
        """One row per pair: pair, kind, positive, negative, n_tokens (of the positive), correct, wrong."""
        return pd.DataFrame([{"pair": i, "kind": p.kind, "positive": p.text, "negative": p.negative_text,
                              "n_tokens": len(p.positive), "correct": list(p.correct), "wrong": list(p.wrong)}
                             for i, p in enumerate(self.pairs)])


# ----- word lists (Wang et al.'s IOI lists; Hanna et al.'s nouns) -----
NAMES = (
    "Michael Christopher Jessica Matthew Ashley Jennifer Joshua Amanda Daniel David James Robert John Joseph "
    "Andrew Ryan Brandon Jason Justin Sarah William Jonathan Stephanie Brian Nicole Nicholas Anthony Heather "
    "Eric Elizabeth Adam Megan Melissa Kevin Steven Thomas Timothy Christina Kyle Rachel Laura Lauren Amber "
    "Brittany Danielle Richard Kimberly Jeffrey Amy Crystal Michelle Tiffany Jeremy Benjamin Mark Emily Aaron "
    "Charles Rebecca Jacob Stephen Patrick Sean Erin Jamie Kelly Samantha Nathan Sara Dustin Paul Angela Tyler "
    "Scott Katherine Andrea Gregory Erica Mary Travis Lisa Kenneth Bryan Lindsey Kristen Jose Alexander Jesse "
    "Katie Lindsay Shannon Vanessa Courtney Christine Alicia Cody Allison Bradley Samuel"
).split()
PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station")
OBJECTS = ("ring", "kiss", "bone", "basketball", "computer", "necklace", "drink", "snack")
# BABA form: {B} is the subject (mentioned twice), {A} the indirect object; the answer " {A}" follows.
IOI_TEMPLATES = (
    "Then, {B} and {A} went to the {PLACE}. {B} gave a {OBJECT} to",
    "Then, {B} and {A} had a lot of fun at the {PLACE}. {B} gave a {OBJECT} to",
    "Then, {B} and {A} were working at the {PLACE}. {B} decided to give a {OBJECT} to",
    "Then, {B} and {A} were thinking about going to the {PLACE}. {B} wanted to give a {OBJECT} to",
    "Then, {B} and {A} had a long argument, and afterwards {B} said to",
    "After {B} and {A} went to the {PLACE}, {B} gave a {OBJECT} to",
    "When {B} and {A} got a {OBJECT} at the {PLACE}, {B} decided to give it to",
    "When {B} and {A} got a {OBJECT} at the {PLACE}, {B} decided to give the {OBJECT} to",
    "While {B} and {A} were working at the {PLACE}, {B} gave a {OBJECT} to",
    "While {B} and {A} were commuting to the {PLACE}, {B} gave a {OBJECT} to",
    "After the lunch, {B} and {A} went to the {PLACE}. {B} gave a {OBJECT} to",
    "Afterwards, {B} and {A} went to the {PLACE}. {B} gave a {OBJECT} to",
    "Then, {B} and {A} had a long argument. Afterwards {B} said to",
    "The {PLACE} {B} and {A} went to had a {OBJECT}. {B} gave it to",
    "Friends {B} and {A} found a {OBJECT} at the {PLACE}. {B} gave it to",
)
GT_NOUNS = (
    "abduction accord affair agreement appraisal assaults assessment attack attempts campaign captivity case "
    "challenge chaos clash collaboration coma competition confrontation consequence conspiracy construction "
    "consultation contact contract convention cooperation custody deal decline decrease demonstrations "
    "development disagreement disorder dispute domination dynasty effect effort employment endeavor engagement "
    "epidemic evaluation exchange existence expansion expedition experiments fall fame flights friendship "
    "growth hardship hostility illness impact imprisonment improvement incarceration increase insurgency "
    "invasion investigation journey"
).split()
GT_CENTURIES = tuple(range(12, 20))  # start years 1210-1989, as in the official data
# Short common words for argument names, descriptions and function names (docstring task).
DOC_WORDS = (
    "load size files last name data value count path mode user key item text line node time index port state "
    "file type code list page form color image model order level group field point score table event query "
    "token label shape width height depth speed range limit start end step rate test root host block frame "
    "layer scale input output source target result buffer number option config message record entry status "
    "price cost money store product client server request response title author content format length offset"
).split()


# ----- tokenizer checks -----
def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def single_tokens(tokenizer, words: Sequence[str], prefix: str = " ") -> dict[str, int]:
    """The words that are exactly one token with `prefix` in front, mapped to that token."""
    out = {}
    for w in words:
        ids = _ids(tokenizer, prefix + w)
        if len(ids) == 1:
            out[w] = ids[0]
    return out


def answer_follows(tokenizer, prompt_ids: list[int], prompt: str, answer: str) -> int | None:
    """The token `answer` adds after `prompt` when it is exactly one token, else None."""
    ids = _ids(tokenizer, prompt + answer)
    if len(ids) == len(prompt_ids) + 1 and ids[:-1] == prompt_ids:
        return ids[-1]
    return None


def _require(found: dict, need: int, what: str, hint: str) -> None:
    if len(found) < need:
        raise AttnlabError(f"{what}: only {len(found)} are one token for this tokenizer (need {need}); {hint}")


# ----- generators: infinite, seeded streams of candidate pairs -----
def _abba(template: str) -> str:
    """BABA -> ABBA: swap the first mentions of {B} and {A}."""
    return template.replace("{B}", "\0", 1).replace("{A}", "{B}", 1).replace("\0", "{A}", 1)


def _check_ioi_template(t: str) -> None:
    if t.count("{A}") != 1 or t.count("{B}") != 2 or t.rstrip() != t or t.endswith("{A}"):
        raise AttnlabError(
            f"IOI template {t!r}: write it in BABA form with {{B}} (the subject) twice and {{A}} (the indirect "
            "object) once, ending right before the answer with no trailing space, e.g. "
            "'Then, {B} and {A} went to the {PLACE}. {B} gave a {OBJECT} to'")


def ioi_pairs(tokenizer, seed: int = 0, *, templates: Sequence[str] = IOI_TEMPLATES, names: Sequence[str] = NAMES,
              places: Sequence[str] = PLACES, objects: Sequence[str] = OBJECTS,
              orders: Sequence[str] = ("BABA", "ABBA")) -> Iterator[CircuitPair]:
    """IOI pairs (Wang et al. 2022): positive ends before the indirect object; negative (ABC) renames the
    second mention of the subject. correct = (IO,), wrong = (S,)."""
    for t in templates:
        _check_ioi_template(t)
    bad = set(orders) - {"BABA", "ABBA"}
    if bad or not orders:
        raise AttnlabError(f"IOI orders {sorted(bad) or '[]'}: choose from 'BABA' and 'ABBA'")
    tok = single_tokens(tokenizer, names)
    _require(tok, 3, "IOI names", "pass names=[...] that are one token with a leading space")
    pool = sorted(tok)
    rng = random.Random(seed)

    def draw():
        t, order = rng.choice(list(templates)), rng.choice(list(orders))
        a, b, c = rng.sample(pool, 3)
        slots = {"PLACE": rng.choice(list(places)), "OBJECT": rng.choice(list(objects))}
        form = t if order == "BABA" else _abba(t)
        # ABC: the subject's second mention (the last {B}) becomes C
        head, _, tail = form.rpartition("{B}")
        return _pair(tokenizer, form.format(A=a, B=b, **slots), (head + "{C}" + tail).format(A=a, B=b, C=c, **slots),
                     " " + a, wrong=(tok[b],), kind=order, where=f"IOI template {t!r}")

    return _stream(draw)


def _stream(draw: Callable[[], CircuitPair | str], patience: int = 300) -> Iterator[CircuitPair]:
    """Yield the pairs `draw` makes; `draw` returns a reason string for a candidate it rejects. Fails
    with the last reason when `patience` candidates in a row are rejected."""
    misses = 0
    while True:
        got = draw()
        if isinstance(got, CircuitPair):
            misses = 0
            yield got
            continue
        misses += 1
        if misses >= patience:
            raise AttnlabError(f"{patience} candidates in a row were unusable; the last: {got}")


def _pair(tokenizer, text: str, neg_text: str, answer: str, wrong: tuple[int, ...], kind: str,
          correct: tuple[int, ...] | None = None, where: str = "") -> CircuitPair | str:
    """A pair when `answer` is one token after `text` and the negative has as many tokens; else the reason."""
    pos = _ids(tokenizer, text)
    neg = _ids(tokenizer, neg_text)
    if len(pos) != len(neg):
        return (f"{where}: the negative {neg_text!r} has {len(neg)} tokens, the positive {len(pos)}; "
                "use words that are one token each so both have the same length")
    if correct is None:
        token = answer_follows(tokenizer, pos, text, answer)
        if token is None:
            return (f"{where}: the answer {answer!r} is not one token after {text!r} for this tokenizer; end the "
                    "template right before the answer (no trailing space) and use one-token answers")
        if token in wrong:
            return f"{where}: the answer {answer!r} is also a competing token"
        correct = (token,)
    return CircuitPair(tuple(pos), tuple(neg), correct, tuple(wrong), text, neg_text, kind)


def greater_than_mode(tokenizer) -> str:
    """'digit' when end years continue digit by digit after the prompt, 'two_digit' when YY is one token."""
    prompt = "The war lasted from the year 1732 to the year 17"
    base = _ids(tokenizer, prompt)
    digits = [_ids(tokenizer, d) for d in "0123456789"]
    if all(len(d) == 1 for d in digits) and _ids(tokenizer, prompt + "45") == base + digits[4] + digits[5]:
        return "digit"
    two = [answer_follows(tokenizer, base, prompt, f"{y:02d}") for y in range(100)]
    if all(t is not None for t in two) and len(set(two)) == 100:
        return "two_digit"
    raise AttnlabError("greater-than: this tokenizer neither splits end years into single digits nor writes "
                       "the two-digit year YY as one token after 'to the year 17', so the answer is not one "
                       "token; use a model whose tokenizer does one of the two")


def greater_than_pairs(tokenizer, seed: int = 0, *, nouns: Sequence[str] = GT_NOUNS,
                       centuries: Sequence[int] = GT_CENTURIES) -> Iterator[CircuitPair]:
    """Greater-than pairs (Hanna et al. 2023) with XX01 negatives, scored on the decisive token."""
    if not nouns or not centuries or any(not 10 <= c <= 99 for c in centuries):
        raise AttnlabError("greater-than needs nouns and two-digit centuries (e.g. 12-19)")
    mode = greater_than_mode(tokenizer)
    digit = [_ids(tokenizer, d)[0] for d in "0123456789"]
    rng = random.Random(seed)

    def draw():
        noun, xx = rng.choice(list(nouns)), rng.choice(list(centuries))
        yy = rng.randrange(10, 90) if mode == "digit" else rng.randrange(2, 99)
        text = f"The {noun} lasted from the year {xx}{yy:02d} to the year {xx}"
        neg_text = f"The {noun} lasted from the year {xx}01 to the year {xx}"
        if mode == "digit":
            tens = yy // 10
            correct, wrong = tuple(digit[tens + 1:]), tuple(digit[:tens])
        else:
            pos_ids = _ids(tokenizer, text)
            two = [answer_follows(tokenizer, pos_ids, text, f"{y:02d}") for y in range(100)]
            if any(t is None for t in two):
                return f"greater-than: some two-digit end years are not one token after {text!r}"
            correct, wrong = tuple(two[yy + 1:]), tuple(two[:yy])
        return _pair(tokenizer, text, neg_text, "", wrong=wrong, kind=mode, correct=correct, where="greater-than")

    return _stream(draw)


def docstring_pairs(tokenizer, seed: int = 0, *, words: Sequence[str] = DOC_WORDS) -> Iterator[CircuitPair]:
    """Docstring pairs (Heimersheim & Janiak 2023): def f(self, p1, p2, m1, m2, m3, s1) documenting m1, m2,
    then ':param' -> ' m3'; negative: the def's six arguments replaced by six other words."""
    tok = single_tokens(tokenizer, words)
    _require(tok, 16, "docstring words", "pass words=[...] that are one token with a leading space")
    pool = sorted(tok)
    rng = random.Random(seed)

    def draw():
        picked = rng.sample(pool, 12)
        args, others = picked[:6], picked[6:]
        func, desc = rng.choice(pool), " ".join(rng.sample(pool, 3))
        d1, d2 = (" ".join(rng.sample(pool, 2)) for _ in range(2))
        body = f'    """{desc}\n\n    :param {args[2]}: {d1}\n    :param {args[3]}: {d2}\n    :param'
        wrong = tuple(tok[a] for i, a in enumerate(args) if i != 4)
        return _pair(tokenizer, f"def {func}(self, {', '.join(args)}):\n" + body,
                     f"def {func}(self, {', '.join(others)}):\n" + body, " " + args[4], wrong=wrong,
                     kind="docstring", where="docstring")

    return _stream(draw)


def induction_pairs(tokenizer, seed: int = 0, *, vocab: Sequence[int] | None = None, length: int = 10,
                    ) -> Iterator[CircuitPair]:
    """Induction pairs: s (`length` distinct random tokens) + s[:m] -> s[m], m in [2, length - 1];
    negative: the first copy of s replaced by tokens outside s. Token ids are drawn from `vocab`
    (default: every non-special id below 32000)."""
    if length < 3:
        raise AttnlabError(f"induction length must be at least 3, got {length}")
    if vocab is None:
        special = set(tokenizer.all_special_ids)
        vocab = [i for i in range(min(len(tokenizer), 32000)) if i not in special]
    vocab = list(vocab)
    if len(vocab) < 2 * length:
        raise AttnlabError(f"induction needs at least {2 * length} distinct tokens in vocab, got {len(vocab)}")
    rng = random.Random(seed)

    def draw():
        drawn = rng.sample(vocab, 2 * length)
        s, fresh = drawn[:length], drawn[length:]
        m = rng.randrange(2, length)
        pos, neg = s + s[:m], fresh + s[:m]
        return CircuitPair(tuple(pos), tuple(neg), (s[m],), (), _decode(tokenizer, pos), _decode(tokenizer, neg),
                           f"m={m}")

    return _stream(draw)


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids))


GENERATORS: dict[str, Callable[..., Iterator[CircuitPair]]] = {
    "ioi": ioi_pairs, "greater_than": greater_than_pairs, "docstring": docstring_pairs, "induction": induction_pairs,
}


def candidates(tokenizer, name: str, n: int, seed: int = 0, **options) -> list[CircuitPair]:
    """The first n candidate pairs of a task (no model check)."""
    return list(itertools.islice(_generator(name)(tokenizer, seed, **options), n))


def _generator(name: str):
    if name not in GENERATORS:
        raise AttnlabError(f"unknown circuit task '{name}': choose from {', '.join(GENERATORS)}")
    return GENERATORS[name]


# ----- the model check -----
def metric(logits: torch.Tensor, pairs: Sequence[CircuitPair]) -> torch.Tensor:
    """logits [B, V] at the answer position -> [B] logsumexp(correct) - logsumexp(wrong) (log p(correct)
    when a pair has no wrong tokens)."""
    logits = logits.float()
    out = torch.empty(len(pairs))
    for b, p in enumerate(pairs):
        good = torch.logsumexp(logits[b, list(p.correct)], 0)
        bad = torch.logsumexp(logits[b, list(p.wrong)] if p.wrong else logits[b], 0)
        out[b] = good - bad
    return out


def last_logits(probe, ids: Sequence[Sequence[int]], prepend_bos: bool = True) -> torch.Tensor:
    """[B, V] next-token logits after each prompt (left-padded batch, fast path)."""
    tokens = probe.to_tokens([list(r) for r in ids], prepend_bos=prepend_bos)
    return probe.forward(tokens, logits_to_keep=1).logits[:, -1].float().cpu()


def solved(probe, pairs: Sequence[CircuitPair], batch_size: int = 64, prepend_bos: bool = True) -> torch.Tensor:
    """[len(pairs)] bool: the model's top-1 next token after the positive is one of `correct`."""
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        top = last_logits(probe, [p.positive for p in chunk], prepend_bos).argmax(-1)
        out += [int(t) in p.correct for t, p in zip(top, chunk)]
    return torch.tensor(out, dtype=torch.bool)


def make_task(probe, name: str, n: int = 64, seed: int = 0, *, solved_only: bool = True,
              max_candidates: int | None = None, batch_size: int = 64, prepend_bos: bool = True,
              progress=False, **options) -> CircuitTask:
    """Up to n pairs of task `name` whose positive `probe`'s model solves (the first n candidates, solved
    or not, when solved_only=False, e.g. for random-init models; the solve count is recorded either way).
    Candidates are checked `batch_size` at a time until n are found or `max_candidates` (default 8 n)
    were tried; fewer than n is not an error (the task records how many it found), none is.
    progress (`attnlab.probe.progress`): pairs kept of n, then (n, n) when the search ends."""
    if n < 1:
        raise AttnlabError(f"n must be at least 1, got {n}")
    stream = _generator(name)(probe.tokenizer, seed, **options)
    limit = max_candidates or 8 * n
    kept, checked, n_solved = [], 0, 0
    report = as_progress(progress, f"{name}: solved pairs", unit="pair")
    if report is not None:
        report(0, n)
    while len(kept) < n and checked < limit:
        want = batch_size if solved_only else n - len(kept)
        chunk = list(itertools.islice(stream, min(want, limit - checked)))
        if not chunk:
            break
        checked += len(chunk)
        ok = solved(probe, chunk, batch_size, prepend_bos)
        n_solved += int(ok.sum())
        new = [p for p, good in zip(chunk, ok) if good] if solved_only else chunk
        kept += new[:n - len(kept)]
        if report is not None:
            report(len(kept), n)
    if report is not None and len(kept) < n:
        report(n, n)  # the search ended (candidates exhausted or the limit reached)
    if not kept:
        raise AttnlabError(f"{probe.name} solved none of {checked} '{name}' candidates: pass solved_only=False "
                           "to study it anyway, or use a model that can do the task")
    return CircuitTask(name, kept, checked, n_solved, probe.name,
                       {"n": n, "seed": seed, "solved_only": solved_only, "prepend_bos": prepend_bos,
                        **{k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in options.items()}})


__all__ = ["CircuitPair", "CircuitTask", "GENERATORS", "candidates", "docstring_pairs", "greater_than_mode",
           "greater_than_pairs", "induction_pairs", "ioi_pairs", "make_task", "metric", "single_tokens", "solved"]
