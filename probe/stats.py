"""The statistics catalogue: what a capture can record, by name, with its parameters.

| name                | parameter (default)     | per head, shape after (batch, layer, head)      |
|---------------------|-------------------------|-------------------------------------------------|
| received            | -                       | [key]: alpha_k, mean attention key k receives   |
| sink_mass(k)        | k first tokens (1)      | [query]: attention on the first k real tokens   |
| entropy             | -                       | [query]: row entropy (nats) + entropy_norm      |
| top_key             | -                       | [query]: argmax key + top_prob                  |
| pooled(block)       | block size (64)         | [query_block, key_block]: block-mean of A       |
| segments(ids)       | ids per token (needed)  | [segment, segment]: mean of A over S_s x S_t    |
| distance(window)    | window (128)            | [query]: mean distance + local_mass in window   |
| rows(positions)     | query positions (-1)    | [row, key]: exact rows; negative = from the end |
| pattern             | -                       | [query, key]: full pattern, eager only, limited |

Each entry is written `name` or `name(args)` in the CLI and accepted as a string or a `Stat` in
Python (`Stat("segments", ids)` takes the per-token segment ids as a list or tensor).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from attnlab.kernels import StatRequest
from attnlab.probe.errors import AttnlabError

CATALOGUE = ["received", "sink_mass", "entropy", "top_key", "pooled", "segments", "distance", "rows", "pattern"]
DEFAULTS: dict[str, Any] = {"sink_mass": 1, "pooled": 64, "distance": 128, "rows": (-1,)}


@dataclass(frozen=True)
class Stat:
    name: str
    arg: Any = None

    def label(self) -> str:
        if self.arg is None or self.name == "segments":
            return self.name
        arg = ",".join(map(str, self.arg)) if isinstance(self.arg, tuple) else self.arg
        return f"{self.name}({arg})"


_SPEC = re.compile(r"^\s*([a-z_]+)\s*(?:\((.*)\))?\s*$")


def parse(entries) -> list[Stat]:
    """Catalogue entries (strings like 'sink_mass(4)', or Stat objects) -> validated Stats."""
    if isinstance(entries, (str, Stat)):
        entries = [entries]
    if isinstance(entries, str):
        entries = [entries]
    out: dict[str, Stat] = {}
    for entry in entries:
        stat = entry if isinstance(entry, Stat) else _parse_one(entry)
        if stat.name not in CATALOGUE:
            raise AttnlabError(f"unknown statistic '{stat.name}': choose from {', '.join(CATALOGUE)}")
        stat = _validate(stat)
        out[stat.name] = stat
    if not out:
        raise AttnlabError(f"no statistics requested: choose from {', '.join(CATALOGUE)}")
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
        raise AttnlabError(f"cannot read statistic '{text}': write e.g. received, sink_mass(4), pooled(64)")
    name, arg = m.group(1), m.group(2)
    if name not in CATALOGUE:
        raise AttnlabError(f"unknown statistic '{name}': choose from {', '.join(CATALOGUE)}")
    if arg is None or not arg.strip():
        return Stat(name)
    if name == "segments":
        raise AttnlabError("segments needs per-token segment ids: pass Stat('segments', ids) from Python")
    try:
        values = tuple(int(x) for x in arg.split(","))
    except ValueError:
        raise AttnlabError(f"statistic '{text}' takes integers, e.g. {name}(4)") from None
    if name != "rows" and len(values) > 1:
        raise AttnlabError(f"statistic '{text.strip()}' takes one integer, got {len(values)}: write e.g. {name}(4)")
    return Stat(name, values if name == "rows" else values[0])


def _validate(stat: Stat) -> Stat:
    name, arg = stat.name, stat.arg
    if arg is None and name in DEFAULTS:
        return Stat(name, DEFAULTS[name])
    if name in ("sink_mass", "pooled", "distance"):
        if not isinstance(arg, int) or arg < 1:
            raise AttnlabError(f"{name} takes a positive integer, got {arg!r}")
    if name == "rows":
        arg = (arg,) if isinstance(arg, int) else tuple(int(a) for a in arg)
        return Stat(name, arg)
    if name == "segments":
        if arg is None:
            raise AttnlabError("segments needs per-token segment ids: Stat('segments', ids)")
        ids = torch.as_tensor(arg, dtype=torch.long)
        return Stat(name, ids)
    if name in ("received", "entropy", "top_key", "pattern") and arg is not None:
        raise AttnlabError(f"{name} takes no parameter")
    return stat


def build_request(stats: list[Stat], n_queries: int, n_keys: int, batch: int, pad_left: torch.Tensor) -> StatRequest:
    """Resolve the catalogue entries into a kernel request for one call of Nq queries, Nk keys.

    pad_left: [B] number of left-pad tokens per row; segment ids are given per real token of the
    longest row ([N] for every row, or [B, N_row] padded on the left by the probe)."""
    kw: dict[str, Any] = {}
    for s in stats:
        if s.name == "received":
            kw["received"] = True
        elif s.name == "sink_mass":
            kw["sink_k"] = s.arg
        elif s.name == "entropy":
            kw["entropy"] = True
        elif s.name == "top_key":
            kw["top_key"] = True
        elif s.name == "pooled":
            kw["pooled_block"] = s.arg
        elif s.name == "distance":
            kw["distance_window"] = s.arg
        elif s.name == "pattern":
            kw["pattern"] = True
        elif s.name == "rows":
            pos = []
            for p in s.arg:
                q = p + n_queries if p < 0 else p
                if not 0 <= q < n_queries:
                    raise AttnlabError(f"rows({p}) is outside the {n_queries} query positions")
                pos.append(q)
            kw["row_positions"] = tuple(dict.fromkeys(pos))
        elif s.name == "segments":
            ids = s.arg
            if ids.ndim == 1:
                ids = ids[None].expand(batch, -1)
            if ids.shape[1] != n_keys:
                raise AttnlabError(
                    f"segments: {ids.shape[1]} segment ids for {n_keys} tokens: give one id per token "
                    "(BOS included when prepended; -1 for tokens in no segment)"
                )
            kw["segment_ids"] = ids.contiguous()
            kw["n_segments"] = int(ids.max().item()) + 1 if ids.numel() else 0
    return StatRequest(**kw)
