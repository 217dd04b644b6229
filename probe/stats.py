"""The statistics catalogue: what a capture can record, by name, with its parameters.

| name                | parameter (default)     | per head, shape after (batch, layer, head)      |
|---------------------|-------------------------|-------------------------------------------------|
| received            | -                       | [key]: alpha_k, mean attention key k receives   |
| sink_mass(k)        | k first tokens (1)      | [query]: attention on the first k real tokens   |
| entropy             | -                       | [query]: row entropy (nats) + entropy_norm      |
| top_key             | -                       | [query]: argmax key (text position) + top_prob  |
| pooled(block)       | block size (64)         | [query_block, key_block]: block-mean of A       |
| segments(ids)       | ids per token (needed)  | [segment, segment]: mean of A over S_s x S_t    |
| distance(window)    | window (128)            | [query]: mean distance + local_mass in window   |
| rows(positions)     | query positions (-1)    | [row, key]: exact rows; negative = from the end |
| pattern             | -                       | [query, key]: full pattern, eager only, limited |

`entropy` also gives `entropy_norm` (entropy over ln of the keys each query sees; a derived
entry). The table is `attnlab.kernels.request.STATISTICS`, the one definition: names, parameters
and defaults, outputs and their dimensions all come from it; this module parses and checks what
users write, by the kind of each parameter.

Each entry is written `name` or `name(args)` in the CLI and accepted as a string or a `Stat` in
Python (`Stat("segments", ids)` takes the per-token segment ids as a list or tensor, one list for
every text, or one list per text — each as long as that text, BOS included — for a batch).

Padded batches: a text's statistics equal its statistics alone (`attnlab.kernels.request`). Row
positions and `top_key` are in each text's own positions (0 = its first real token); `pooled` is
cut on each text's own grid, aligned to its first token (NaN past its end); per-token statistics
keep the padded axis (NaN at pads), so compare a batch row's real part [first_real:] with alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from attnlab.kernels import STATISTICS, StatRequest
from attnlab.probe import validate
from attnlab.probe.errors import AttnlabError

# What users may name (derived entries such as entropy_norm come with their source), and defaults.
CATALOGUE = [name for name, s in STATISTICS.items() if s.user_facing]
DEFAULTS: dict[str, Any] = {name: s.param.default for name, s in STATISTICS.items()
                            if s.param is not None and s.param.default is not None}


# Most segments one `segments` statistic may have: its output is [batch, layer, head, S, S] and the
# torch twin holds a [batch, key, S] one-hot, so S must stay small (a sentence map of a long text
# has hundreds); S is also at most the number of ids given (one token per segment at least).
SEGMENT_LIMIT = 1024


def _kind(name: str) -> str | None:
    """The kind of statistic `name`'s parameter (`kernels.request.PARAM_KINDS`), None without one."""
    param = STATISTICS[name].param
    return None if param is None else param.kind


@dataclass(frozen=True)
class Stat:
    """One catalogue entry: `Stat("sink_mass", 4)`, `Stat("rows", [-1, 10])`, `Stat("segments", ids)`.

    The constructor checks the name and the parameter (an AttnlabError naming both); a missing
    parameter takes its default when the capture resolves it."""

    name: str
    arg: Any = None

    def __post_init__(self):
        if not isinstance(self.name, str) or self.name not in CATALOGUE:
            raise AttnlabError(f"stats: unknown statistic {self.name!r}; choose from {', '.join(CATALOGUE)}")
        object.__setattr__(self, "arg", _checked_arg(self.name, self.arg))

    def label(self) -> str:
        """The entry as written in a stats list, e.g. 'sink_mass(4)' or 'rows(-1,10)' (segments: the bare name)."""
        if self.arg is None or _kind(self.name) == "segment_ids":
            return self.name
        arg = ",".join(map(str, self.arg)) if isinstance(self.arg, tuple) else self.arg
        return f"{self.name}({arg})"

    def same_as(self, other: Stat) -> bool:
        """True when both entries have the same name and parameter (segment ids compared by value)."""
        if self.name != other.name:
            return False
        if _kind(self.name) == "segment_ids":
            mine, theirs = _as_rows(self.arg), _as_rows(other.arg)
            return len(mine) == len(theirs) and all(a.shape == b.shape and bool(torch.equal(a, b))
                                                    for a, b in zip(mine, theirs))
        return self.arg == other.arg


def _checked_arg(name: str, arg: Any) -> Any:
    """The parameter of statistic `name`, checked and normalised (numpy ints -> int, rows -> tuple,
    segment ids -> a long tensor)."""
    if arg is None:
        return None
    kind = _kind(name)
    if kind == "count":
        if not validate.is_integer(arg) or int(arg) < 1:
            raise AttnlabError(f"{name}: {arg!r} is not a positive integer; pass e.g. {name}({DEFAULTS[name]})")
        return int(arg)
    if kind == "positions":
        if isinstance(arg, torch.Tensor):
            arg = arg.tolist()
        positions = validate.integers(arg, name, noun="query positions (e.g. [-1] for the last)",
                                      empty_fix="pass at least one query position, e.g. [-1]")
        return tuple(positions)
    if kind == "segment_ids":
        return _segment_ids(arg)
    raise AttnlabError(f"{name}: takes no parameter (got {arg!r}); write {name!r} alone")


def _segment_ids(arg: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Segment ids as one long tensor ([N] for every text, or [B, N]), or, for texts of different
    lengths, one 1-d tensor per text (each as long as its text; the probe maps them onto the
    padded grid)."""
    if isinstance(arg, (list, tuple)) and len(arg) > 1 and all(_is_sequence(r) for r in arg) \
            and len({len(r) for r in arg}) > 1:
        rows = tuple(_segment_ids(r) for r in arg)
        if any(r.ndim != 1 for r in rows):
            raise AttnlabError("segments: give one list of ids per text (or one list for every text)")
        return rows
    try:
        ids = torch.as_tensor(arg)
    except (TypeError, ValueError, RuntimeError):
        raise AttnlabError("segments: ids must be a list (or [batch, N] rows of equal length) of integers; "
                           "pass one segment id per token, -1 for tokens in no segment") from None
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise AttnlabError(f"segments: ids are {str(ids.dtype).removeprefix('torch.')}; pass integer segment ids "
                           "(0, 1, ... per token, -1 for tokens in no segment)")
    if ids.ndim not in (1, 2) or ids.shape[-1] == 0:
        raise AttnlabError(f"segments: ids have shape {tuple(ids.shape)}; pass one id per token, as a list "
                           "(every row) or [batch, N] rows")
    ids = ids.to(torch.long)
    if int(ids.min()) < -1:
        raise AttnlabError(f"segments: id {int(ids.min())} is negative; use 0, 1, ... and -1 for tokens in no segment")
    n_segments = int(ids.max()) + 1
    limit = min(ids.shape[-1], SEGMENT_LIMIT)
    if n_segments > limit:
        raise AttnlabError(f"segments: id {n_segments - 1} makes {n_segments} segments, above the limit of {limit} "
                           f"(at most one per token, {ids.shape[-1]} ids here, and at most {SEGMENT_LIMIT}); "
                           "number the segments 0, 1, ... without gaps")
    return ids


_SPEC = re.compile(r"^\s*([a-z_]+)\s*(?:\((.*)\))?\s*$")


def parse(entries, arg: str = "stats") -> list[Stat]:
    """Catalogue entries (strings like 'sink_mass(4)', or Stat objects) -> validated Stats.

    A statistic asked twice with the same parameter counts once; with two parameters it is refused,
    since one capture holds one parameterisation per statistic."""
    if isinstance(entries, (str, Stat)):
        entries = [entries]
    if not isinstance(entries, (list, tuple)):
        raise AttnlabError(f"{arg}: {entries!r:.60} is of type {type(entries).__name__}; pass a list of catalogue entries, "
                           "e.g. ['received', 'sink_mass(4)']")
    out: dict[str, Stat] = {}
    for n, entry in enumerate(entries):
        if not isinstance(entry, (str, Stat)):
            raise AttnlabError(f"{arg}[{n}]: {entry!r:.60} is of type {type(entry).__name__}; pass a name like 'entropy', "
                               "'sink_mass(4)', or a Stat")
        stat = _validate(entry if isinstance(entry, Stat) else _parse_one(entry))
        if stat.name in out and not out[stat.name].same_as(stat):
            raise AttnlabError(f"{arg}: {out[stat.name].label()} and {stat.label()} both asked; one capture holds one "
                               f"{stat.name} per statistic, so keep one (or capture twice)")
        out[stat.name] = stat
    if not out:
        raise AttnlabError(f"{arg}: no statistics requested; choose from {', '.join(CATALOGUE)}")
    return list(out.values())


def parse_list(text: str) -> list[Stat]:
    """A comma-separated CLI list; commas inside parentheses belong to the entry."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parse([p for p in parts if p.strip()])


def _parse_one(text: str) -> Stat:
    m = _SPEC.match(str(text))
    if not m:
        raise AttnlabError(f"stats: cannot read statistic '{text}'; write e.g. received, sink_mass(4), pooled(64)")
    name, arg = m.group(1), m.group(2)
    if name not in CATALOGUE:
        raise AttnlabError(f"stats: unknown statistic '{name}'; choose from {', '.join(CATALOGUE)}")
    if arg is None or not arg.strip():
        return Stat(name)
    if _kind(name) == "segment_ids":
        raise AttnlabError(f"{name}: needs per-token segment ids; pass Stat({name!r}, ids) from Python")
    try:
        values = tuple(int(x) for x in arg.split(","))
    except ValueError:
        raise AttnlabError(f"stats: statistic '{text}' takes integers; write e.g. {name}(4)") from None
    if _kind(name) != "positions" and len(values) != 1:
        raise AttnlabError(f"stats: statistic '{text.strip()}' takes one integer, got {len(values)}; "
                          f"write e.g. {name}({DEFAULTS.get(name, 4)})")
    return Stat(name, values if _kind(name) == "positions" else values[0])


def _validate(stat: Stat) -> Stat:
    """A constructed Stat is already checked: fill in the default parameter, require segment ids."""
    if stat.arg is None and stat.name in DEFAULTS:
        return Stat(stat.name, DEFAULTS[stat.name])
    if stat.arg is None and _kind(stat.name) is not None:  # a parameter without default: required
        noun = STATISTICS[stat.name].param.doc
        raise AttnlabError(f"{stat.name}: needs {noun}; pass Stat({stat.name!r}, "
                           f"{'ids' if _kind(stat.name) == 'segment_ids' else '...'})")
    return stat


def _as_rows(ids) -> tuple:
    return ids if isinstance(ids, tuple) else (ids,)


def _is_sequence(x) -> bool:
    return isinstance(x, (list, tuple)) or (hasattr(x, "ndim") and getattr(x, "ndim") == 1)


def build_request(stats: list[Stat], n_queries: int, n_keys: int, batch: int, pad_left: torch.Tensor) -> StatRequest:
    """Resolve the catalogue entries into a kernel request for one call of Nq queries, Nk keys.

    pad_left: [B] number of left-pad tokens per row (unused: the kernels read each row's padding
    from the key mask); segment ids are one per position of the padded grid ([Nk] for every row,
    or [B, Nk], mapped from per-text ids and left-padded with -1 by the probe). Row positions are
    passed as given (each text's own coordinates, negative from the end; `kernels.request`)."""
    kw: dict[str, Any] = {}
    for s in stats:
        entry = STATISTICS[s.name]
        if entry.param is None:
            kw[entry.flag] = True
        else:
            kw.update(_resolve(entry.param.kind, entry.param.field, s, n_queries, n_keys, batch))
    return StatRequest(**kw)


def _resolve(kind: str, field: str, s: Stat, n_queries: int, n_keys: int, batch: int) -> dict[str, Any]:
    """The request fields of one parameter, resolved for a call of Nq queries and Nk keys."""
    if kind == "count":
        return {field: s.arg}
    if kind == "positions":
        for p in s.arg:
            if not -n_queries <= p < n_queries:
                raise AttnlabError(f"{s.name}: {s.name}({p}) is outside the {n_queries} query positions; pass "
                                   f"{-n_queries}..{n_queries - 1} (negative counts from the end)")
        return {field: tuple(dict.fromkeys(s.arg))}
    if kind == "segment_ids":
        ids = s.arg
        if ids.ndim == 1:
            ids = ids[None].expand(batch, -1)
        if ids.shape[1] != n_keys:
            raise AttnlabError(
                f"{s.name}: {ids.shape[1]} segment ids for {n_keys} tokens; give one id per token "
                "(BOS included when prepended; -1 for tokens in no segment)"
            )
        return {field: ids.contiguous(), "n_segments": int(ids.max().item()) + 1 if ids.numel() else 0}
    raise TypeError(f"{s.name}: no resolution for parameter kind {kind!r}")
