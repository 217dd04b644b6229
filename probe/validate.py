"""Argument checks for the public Python API: one small set of helpers, reused at every boundary.

Every check raises `AttnlabError` with a one-line message "<argument>: <problem>; <fix>", before
any model work. Choices written down here:
- numpy integers are integers; bools are not (True is not layer 1), nor are floats (2.0 is not a
  layer, 1.5 is certainly not a token position);
- numbers (edit strengths, sampling parameters) are real Python or numpy numbers, finite: a string
  "0.5" or an infinite strength would otherwise reach the kernels as a TypeError or NaN logits;
- flags (prepend_bos, decode_only, ...) are real bools: "no" is truthy and would silently mean yes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from attnlab.probe.errors import AttnlabError


def _shown(value: Any) -> str:
    if isinstance(value, np.generic):
        value = value.item()  # 0.0, not np.float64(0.0)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
    """'an int', 'a str': the type of a bad value, for the message."""
    name = type(value).__name__
    return ("an " if name[0] in "aeiou" else "a ") + name


def _scalar(value: Any) -> Any:
    """A 0-d torch tensor (an element of an index tensor) -> its Python number; anything else as is."""
    if isinstance(value, torch.Tensor) and value.ndim == 0:
        return value.item()
    return value


def is_integer(value: Any) -> bool:
    """True for Python, numpy and 0-d tensor integers; False for bools."""
    value = _scalar(value)
    return isinstance(value, (numbers.Integral, np.integer)) and not isinstance(value, (bool, np.bool_))


def integer(value: Any, arg: str, *, minimum: int | None = None, maximum: int | None = None,
            hint: str = "") -> int:
    """An int (Python or numpy), not a bool or a float, in [minimum, maximum] -> int."""
    value = _scalar(value)
    if not is_integer(value):
        raise AttnlabError(f"{arg}: {_shown(value)} is {_kind(value)}, not an integer; pass a whole number"
                           + (f" ({hint})" if hint else ""))
    value = int(value)
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        if maximum is None:
            rng = f">= {minimum}"
        elif minimum is None:
            rng = f"<= {maximum}"
        else:
            rng = f"in {minimum}..{maximum}"
        raise AttnlabError(f"{arg}: {value} is out of range; pass an integer {rng}" + (f" ({hint})" if hint else ""))
    return value


def number(value: Any, arg: str, *, minimum: float | None = None, maximum: float | None = None,
           above: float | None = None, hint: str = "") -> float:
    """A finite real number (int, float, numpy scalar; not a bool or a string) in range -> float.

    minimum/maximum are inclusive bounds, above an exclusive lower bound."""
    value = _scalar(value)
    if not isinstance(value, (numbers.Real, np.integer, np.floating)) or isinstance(value, (bool, np.bool_)):
        raise AttnlabError(f"{arg}: {_shown(value)} is {_kind(value)}, not a number; pass a real number"
                           + (f" ({hint})" if hint else ""))
    value = float(value)
    if not math.isfinite(value):
        raise AttnlabError(f"{arg}: {value} is not finite; pass a finite number" + (f" ({hint})" if hint else ""))
    low_ok = (minimum is None or value >= minimum) and (above is None or value > above)
    if not low_ok or (maximum is not None and value > maximum):
        low = f"> {above:g}" if above is not None else (f">= {minimum:g}" if minimum is not None else "")
        high = f"<= {maximum:g}" if maximum is not None else ""
        rng = " and ".join(x for x in (low, high) if x)
        raise AttnlabError(f"{arg}: {value:g} is out of range; pass a number {rng}" + (f" ({hint})" if hint else ""))
    return value


def flag(value: Any, arg: str) -> bool:
    """A real bool (Python or numpy): 'no', 0 or None would silently mean something."""
    if not isinstance(value, (bool, np.bool_)):
        raise AttnlabError(f"{arg}: {_shown(value)} is {_kind(value)}, not a bool; pass True or False")
    return bool(value)


def choice(value: Any, arg: str, options: Sequence[str], what: str | None = None) -> str:
    """`value` if it is one of the string `options`, else an AttnlabError listing them."""
    if not isinstance(value, str) or value not in options:
        raise AttnlabError(f"{arg}: unknown {what or arg} {_shown(value)}; choose from {', '.join(options)}")
    return value


def callable_or_none(value: Any, arg: str) -> Callable | None:
    """`value` if it is callable or None, else an AttnlabError naming `arg`."""
    if value is not None and not callable(value):
        raise AttnlabError(f"{arg}: {_shown(value)} is {_kind(value)}, not callable; pass a function or None")
    return value


def integers(values: Any, arg: str, *, allow_single: bool = True, noun: str = "integers",
             empty_fix: str = "pass at least one index, or None for all") -> list[int]:
    """A list of integers (or one integer) -> list[int]; the list must not be empty."""
    if allow_single and is_integer(values):
        return [int(values)]
    if isinstance(values, (str, bytes)) or not isinstance(values, (Iterable, np.ndarray)):
        raise AttnlabError(f"{arg}: {_shown(values)} is {_kind(values)}; pass a list of {noun}")
    out = [integer(v, f"{arg}[{n}]") for n, v in enumerate(values)]
    if not out:
        raise AttnlabError(f"{arg}: the list is empty; {empty_fix}")
    return out


def indices(values: Any, arg: str, size: int, what: str, owner: str) -> list[int]:
    """Layer or head indices: None -> all; an int or a list of ints in [0, size) -> sorted unique.

    what: the singular noun ('layer'); owner: the model's name, for the message."""
    if values is None:
        return list(range(size))
    chosen = integers(values, arg)
    for v in chosen:
        if not 0 <= v < size:
            raise AttnlabError(f"{arg}: {what} {v} is out of range: {owner} has {size} {what}s; pass 0-{size - 1}")
    return sorted(dict.fromkeys(chosen))
