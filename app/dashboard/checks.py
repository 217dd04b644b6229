"""The dashboard's request and input checks: one place for everything the browser sends. No Dash here.

Every value a callback receives was posted by a browser, or by anyone who can reach the server
with a crafted `/_dash-update-component` body, so none of it is trusted: each callback passes its
inputs through these helpers before using them (type, range, known option). A bad value raises
`Invalid` (an `AttnlabError`) whose message is written for the page; callbacks show it, or leave
their outputs alone. Nothing here expands a range before checking it (`index_spec` checks the
bounds of `0-5000000` first), and `user_message` keeps exception class names and absolute server
paths out of what the page shows.

The `Host` check (`HostCheck`) guards against DNS rebinding: a page on evil.example whose name is
re-pointed at 127.0.0.1 would otherwise read and drive the dashboard with the user's browser.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
from collections.abc import Iterable
from pathlib import Path

from attnlab.probe import AttnlabError

log = logging.getLogger("attnlab.dashboard")

MAX_INDEX = 100_000  # layers and heads: no model comes close; bounds crafted integers before any use
MAX_NAME = 255  # run names, file names, job ids, option values
MAX_TEXT = 4_000_000  # texts (the request itself is limited to 4 MB by the server)
MAX_SPEC = 1_000  # characters of a layer list such as "0-3,10"
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


class Invalid(AttnlabError):
    """A value from the browser that the dashboard refuses; the message is for the page."""


# ----- values -----
def short(value, limit: int = 40) -> str:
    """A value as the page may show it: repr, truncated, and never a path (which would echo server paths)."""
    if isinstance(value, str):
        if "/" in value or "\\" in value:
            return "that value"
        text = repr(value)
    elif value is None or isinstance(value, (bool, int, float)):
        text = repr(value)
    else:
        return f"a {_kind(value)}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _kind(value) -> str:
    return {list: "list", tuple: "list", dict: "mapping", str: "text", bool: "true/false", type(None): "nothing"}.get(
        type(value), "number" if isinstance(value, (int, float)) else "value of another type")


def text(value, what: str, *, optional: bool = True, max_len: int = MAX_TEXT) -> str | None:
    """A string (or None when optional), at most max_len characters."""
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise Invalid(f"{what}: expected text, got {short(value)}")
    if len(value) > max_len:
        raise Invalid(f"{what}: too long ({len(value):,} characters, at most {max_len:,})")
    return value


def one_of(value, options: Iterable, what: str):
    """value if it is one of options (compared as hashable scalars only)."""
    options = list(options)
    if isinstance(value, (str, int, float)) and not isinstance(value, bool) and value in options:
        return value
    shown = ", ".join(str(o) for o in options[:8]) + (", ..." if len(options) > 8 else "")
    raise Invalid(f"{what}: {short(value)} is not one of the choices ({shown})")


def colour_scale(value, default: str) -> str:
    """The colour-scale control's value (one of `figures.SCALES`), checked; None: `default`."""
    from attnlab.app.figures import SCALES

    return default if value is None else one_of(value, SCALES, "colour scale")


def integer(value, what: str, lo: int = 0, hi: int = MAX_INDEX) -> int:
    """A whole number in [lo, hi]: an int, or a float or numeric string holding a whole number (no bools)."""
    if isinstance(value, bool) or value is None:
        raise Invalid(f"{what}: expected a whole number, got {short(value)}")
    if isinstance(value, str):
        s = value.strip()
        if not re.fullmatch(r"[+-]?\d{1,12}", s):
            raise Invalid(f"{what}: expected a whole number, got {short(value)}")
        value = int(s)
    elif isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise Invalid(f"{what}: expected a whole number, got {short(value)}")
        value = int(value)
    elif not isinstance(value, int):
        raise Invalid(f"{what}: expected a whole number, got {short(value)}")
    if not lo <= value <= hi:
        raise Invalid(f"{what}: {value} is out of range ({lo}-{hi})")
    return value


def optional_integer(value, what: str, lo: int = 0, hi: int = MAX_INDEX) -> int | None:
    """None as it is, else `integer(value, what, lo, hi)`."""
    return None if value is None else integer(value, what, lo, hi)


def number(value, what: str, lo: float, hi: float) -> float:
    """A finite number in [lo, hi] (an int, float or numeric string; no bools)."""
    if isinstance(value, bool) or value is None or (isinstance(value, str) and len(value) > 64):
        raise Invalid(f"{what}: expected a number, got {short(value)}")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise Invalid(f"{what}: expected a number, got {short(value)}") from None
    if not isinstance(value, (int, float)):
        raise Invalid(f"{what}: expected a number, got {short(value)}")
    x = float(value)
    if not math.isfinite(x) or not lo <= x <= hi:
        raise Invalid(f"{what}: {short(value)} is out of range ({lo:g} to {hi:g})")
    return x


def subset(value, options: Iterable[str], what: str) -> list[str]:
    """A list of strings, each one of options (a checklist's value); None is the empty list."""
    if value is None:
        return []
    options = list(options)
    if not isinstance(value, list):
        raise Invalid(f"{what}: expected a list of choices, got {short(value)}")
    return sorted({one_of(v, options, what) for v in value})


def run_name(value, what: str = "run") -> str | None:
    """A run's name as the page knows it (a folder name inside the runs directory), or None.

    Only the shape is checked here; `work.run_path` resolves it inside the runs directory."""
    if value is None or value == "":
        return None
    if (not isinstance(value, str) or len(value) > MAX_NAME or value in (".", "..") or value.startswith(".")
            or any(c in value for c in "/\\\x00")):
        raise Invalid(f"{short(value)} is not a run name: pick a run from the list")
    return value


def model_and_text(model, typed, installed: Iterable[str]) -> tuple[str, str | None]:
    """(model, text) of a capture or analysis job, from the page's model selector and text box: the model
    must be one of `installed` (Invalid asking to choose one when none is selected)."""
    if not model:
        raise Invalid("choose a model first (none is installed: see the list)")
    return one_of(model, installed, "model"), text(typed, "the text")


def selected_head(run, layer, head, *, no_run: str = "", no_head: str = "") -> tuple[str, int, int]:
    """(run name, layer, head) of the head a view or an intervention acts on, from the page's values (the
    open run's name and the layer and head selectors). Raises Invalid with `no_run` when no run is open,
    `no_head` when no head is chosen (the callers' own sentences, "" for a view that stays empty), and
    the checks' message for a malformed value."""
    name = run_name(run)
    if not name:
        raise Invalid(no_run)
    if layer is None or head is None:
        raise Invalid(no_head)
    return name, integer(layer, "layer"), integer(head, "head")


def head_in(layer: int, head: int, heads: Iterable[tuple[int, int]] | None, where: str, fix: str) -> None:
    """Raise Invalid("L{layer} H{head} is not in this {where}: {fix}") unless (layer, head) is one of
    `heads` (None: a run that lists no heads accepts any)."""
    if heads is not None and (layer, head) not in set(heads):
        raise Invalid(f"L{layer} H{head} is not in this {where}: {fix}")


def capture_heads(cap) -> set[tuple[int, int]]:
    """The (layer, head) pairs a capture recorded (its layers x its heads)."""
    return {(layer, head) for layer in cap.layers for head in cap.heads}


def job_id(value) -> str | None:
    """The id of a background job (a short hex string), or None for anything else."""
    return value if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{1,32}", value) else None


def click_point(value) -> tuple[int, int] | None:
    """(layer, head) of a layer x head map's clickData ({"points": [{"x": head, "y": layer}]}), or None."""
    if not isinstance(value, dict):
        return None
    points = value.get("points")
    if not isinstance(points, list) or not points or not isinstance(points[0], dict):
        return None
    try:
        return integer(points[0].get("y"), "layer"), integer(points[0].get("x"), "head")
    except Invalid:
        return None


def index_spec(value, n: int | None, what: str = "layer", *, max_len: int = MAX_SPEC) -> list[int] | None:
    """'' or None -> None (all); '0,3,5', '0-3', '0-3,10' -> sorted indices, each in [0, n).

    Each range's bounds are checked against n before anything is expanded, so the result has at
    most n entries whatever was typed ('0-5000000' is an out-of-range message, not a huge list).
    n None (the model is not loaded yet): the form and a bound of MAX_INDEX are checked."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise Invalid(f"{what}s: write indices like '0,3,5' or '0-3' (got {short(value)})")
    if len(value) > max_len:
        raise Invalid(f"{what}s: the list is too long ({len(value):,} characters, at most {max_len:,})")
    ranges = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)  # at most max_len digits: int() is cheap
        if m is None:
            raise Invalid(f"{what}s: write indices like '0,3,5' or '0-3' (got {short(value)})")
        a = int(m[1])
        b = int(m[2]) if m[2] is not None else a
        if b < a:
            raise Invalid(f"{what}s: the range {a}-{b} runs backwards: write {b}-{a}")
        if n is None and b >= MAX_INDEX:
            raise Invalid(f"{what} {b} is out of range: no model has that many {what}s")
        if n is not None and b >= n:
            raise Invalid(f"{what} {b} is out of range: the model has {n} {what}s (0-{n - 1})")
        ranges.append((a, b))
    if not ranges:
        return None
    return sorted({i for a, b in ranges for i in range(a, b + 1)})


# ----- messages -----
_ABS_PATH = re.compile(r"(?<![\w.~])(?:/[^\s'\"`/:,;()\[\]{}<>]+)+/?|\b[A-Za-z]:\\[^\s'\"`]+")


def scrub(message: str, root: str | Path | None = None) -> str:
    """message with absolute paths removed: those inside `root` (the runs directory) become
    root-relative ('run-name/manifest.json'), any other becomes '<path>'."""
    if root is not None:
        for r in {str(Path(root).resolve()), str(Path(root).absolute()), str(root)}:
            if r not in (".", ""):
                message = message.replace(r.rstrip("/") + "/", "").replace(r, "the runs directory")
    return _ABS_PATH.sub("<path>", message)


def user_message(err: BaseException, root: str | Path | None = None, limit: int = 400) -> str:
    """What the page shows for an exception: an AttnlabError's own sentence (paths scrubbed), or a
    generic sentence for anything else (its class name and text stay in the server's log)."""
    if isinstance(err, AttnlabError):
        msg = scrub(str(err), root)
    elif isinstance(err, OSError):
        msg = "its files could not be read (missing, unreadable or incomplete)"
    else:
        msg = "the server could not do this (the details are in its log)"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# ----- the Host header -----
def _split_host(host: str) -> tuple[str, str | None] | None:
    """'name:port', '[v6]:port', 'name' -> (lower-case name, port or None); None when malformed."""
    m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+)(?::(\d{1,5}))?", host)
    if m is None:
        return None
    name = m[1].lower()
    if name.startswith("["):
        name = name[1:-1]
    return name.rstrip("."), m[2]


def _canonical(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


class HostCheck:
    """Which `Host` headers the server answers: localhost, 127.0.0.1, [::1], the address it is bound
    to (the WSGI SERVER_NAME), and `allowed` ('name' for any port, 'name:port' for one); a port, when
    the header has one, must be the port the server listens on (SERVER_PORT) unless allowed with it."""

    MESSAGE = ("refused: this dashboard answers only to localhost, 127.0.0.1 and [::1] on its own port "
               "(allow other names with --allowed-host)\n")

    def __init__(self, allowed: Iterable[str] = ()) -> None:
        self.names: set[str] = set()
        self.pairs: set[tuple[str, str]] = set()
        for entry in allowed:
            parts = _split_host(str(entry).strip())
            if parts is None:
                raise AttnlabError(f"allowed host {entry!r}: write a host name or address, optionally with :port")
            name, port = parts
            if port is None:
                self.names.add(_canonical(name))
            else:
                self.pairs.add((_canonical(name), port))

    def allows(self, host: str | None, server_name: str | None, server_port: str | None) -> bool:
        """True when the request's Host header names an allowed host (and, with a port, the server's own or an
        allowed one)."""
        if not host:
            return False
        parts = _split_host(host)
        if parts is None:
            return False
        name, port = _canonical(parts[0]), parts[1]
        if name in self.names or (port is not None and (name, port) in self.pairs):
            return True
        bound = _canonical(str(server_name or "").strip("[]").lower())
        if name not in LOCAL_HOSTS and name != bound:
            return False
        return port is None or server_port is None or port == str(server_port)


__all__ = ["HostCheck", "Invalid", "click_point", "index_spec", "integer", "job_id", "number", "one_of",
           "optional_integer", "run_name", "scrub", "short", "subset", "text", "user_message"]
