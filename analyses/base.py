"""The analysis contract and its registry: one shape for every analysis, one place every surface reads.

scikit-learn's habit of one shape for everything (ARCHITECTURE.md, "The contract"): each paper
module defines a parameters dataclass (the paper's names, CPU-sized defaults) and registers an
`Analysis` whose `run(probe, inputs, params, progress=None) -> Result` calls the module's own
functions (so the numbers are the module's), the statistics it needs, and its figure builders,
which work on a `Result` read back from disk. `ANALYSES` (name -> Analysis) feeds `attnlab
analyze`, the report's sections, the dashboard's launchers and the notebooks:

    from attnlab.analyses import ANALYSES
    sinks = ANALYSES["sinks"]
    res = sinks.run(probe)                                   # default inputs and parameters
    res = sinks.run(probe, ["a text", "another"], sinks.Params(eps=0.5))
    figs = sinks.figures(Result.load(RunStore("runs").load(path)))

Adding an analysis is one `register(Analysis(...))` in its module (and its test).

Progress is one protocol everywhere (`attnlab.probe.progress`, re-exported here): None/False
(silent), True (a tqdm bar) or a callable `progress(done, total)`. The terminal adapts it with
`tqdm_progress` (notebooks) or Rich (the CLI); the dashboard passes its job's `progress`, which also
raises to cancel. `as_progress` turns a value into a callable or None; `track` is the loop helper.

Parameter fields may declare, in `dataclasses.field(metadata=...)`: `range` (lo, hi) for numbers
(each element of a tuple), `choices` (a tuple, or a function returning one), `label` and `help`;
`batch: "texts"` marks a batch option, the texts run together, which changes memory, not the result
beyond the dtype's rounding (a sweep leaves it out of a cell's id unless the spec sets it, and halves
it on out of memory).
`parse_params(Params, {"name": "typed text"})` reads them from strings (CLI `--param`, the
dashboard's form) with errors that name the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from attnlab.analyses.result import Result
from attnlab.probe.errors import AttnlabError
# The progress protocol lives in the probe room (every room uses it); re-exported here.
from attnlab.probe.progress import Progress, as_progress, stage, tqdm_callback, tqdm_progress, track


def example_text() -> str:
    """The built-in example text (`attnlab capture --example`, the report's default)."""
    from importlib import resources

    return resources.files("attnlab.probe").joinpath("data/example.txt").read_text()


# ----- parameters -----
def _hints(params_type) -> dict:
    return typing.get_type_hints(params_type)


def _choices(f: dataclasses.Field) -> tuple[str, ...] | None:
    c = f.metadata.get("choices")
    return tuple(c()) if callable(c) else (tuple(c) if c is not None else None)


def _strip_optional(tp) -> tuple[object, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _number(name: str, text: str, kind, rng) -> int | float:
    try:
        value = kind(text.strip())
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise AttnlabError(f"{name}: write {what} (got {text!r})") from None
    if rng is not None and not rng[0] <= value <= rng[1]:
        raise AttnlabError(f"{name}: {_num(value)} is out of range ({_num(rng[0])}-{_num(rng[1])})")
    return value


def _num(x) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def parse_value(params_type, name: str, text) -> object:
    """One field's value from typed text (a value of the right type passes through, checked)."""
    fields = {f.name: f for f in dataclasses.fields(params_type)}
    if name not in fields:
        raise AttnlabError(f"unknown parameter {name!r}: choose from {', '.join(fields)}")
    f = fields[name]
    label = f.metadata.get("label", name)
    tp, optional = _strip_optional(_hints(params_type)[name])
    rng = f.metadata.get("range")
    text = str(text).strip() if not isinstance(text, str) else text.strip()
    if optional and text.lower() in ("", "none"):
        return None
    choices = _choices(f)
    if choices is not None:
        if text not in choices:
            raise AttnlabError(f"{label}: choose one of {', '.join(choices)} (got {text!r})")
        return text
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise AttnlabError(f"{label}: write yes or no (got {text!r})")
    if tp in (int, float):
        return _number(label, text, tp, rng)
    if typing.get_origin(tp) is tuple:
        kind = typing.get_args(tp)[0]
        parts = [p for p in text.split(",") if p.strip()]
        if not parts:
            raise AttnlabError(f"{label}: give at least one value, comma-separated (e.g. 0,50,100)")
        try:
            values = tuple(kind(p.strip()) for p in parts)
        except ValueError:
            raise AttnlabError(f"{label}: write numbers separated by commas (got {text!r})") from None
        bad = [v for v in values if rng is not None and not rng[0] <= v <= rng[1]]
        if bad:
            raise AttnlabError(f"{label}: {_num(bad[0])} is out of range ({_num(rng[0])}-{_num(rng[1])})")
        return values
    if tp is str:
        if not text:
            raise AttnlabError(f"{label}: give a value")
        return text
    raise AttnlabError(f"{label}: cannot be set from text")  # a field type this parser does not know


def parse_params(params_type, values: Mapping[str, object] | None = None):
    """Params from {field: typed text}; the fields not given keep their defaults."""
    values = dict(values or {})
    parsed = {k: parse_value(params_type, k, v) for k, v in values.items()}
    return params_type(**parsed)


def check_params(params) -> None:
    """Check a Params instance's values against the declared types, ranges and choices (values given
    as Python objects, not text); an AttnlabError names the field."""
    hints = _hints(type(params))
    for f in dataclasses.fields(params):
        value, label = getattr(params, f.name), f.metadata.get("label", f.name)
        tp, optional = _strip_optional(hints[f.name])
        if value is None:
            if not optional:
                raise AttnlabError(f"{label}: give a value (None is not allowed)")
            continue
        choices, rng = _choices(f), f.metadata.get("range")
        if typing.get_origin(tp) is tuple:
            kind = typing.get_args(tp)[0]
            if not isinstance(value, (tuple, list)) or not value:
                raise AttnlabError(f"{label}: give a non-empty sequence of {kind.__name__} (got {value!r})")
            items = list(value)
        else:
            kind, items = tp, [value]
        for v in items:
            numeric = kind in (int, float)
            ok = (isinstance(v, bool) if kind is bool else
                  isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
                  if numeric else isinstance(v, kind))
            if not ok:
                raise AttnlabError(f"{label}: expected {kind.__name__}, got {v!r}")
            if numeric and rng is not None and not rng[0] <= v <= rng[1]:
                raise AttnlabError(f"{label}: {_num(v)} is out of range ({_num(rng[0])}-{_num(rng[1])})")
            if choices is not None and v not in choices:
                raise AttnlabError(f"{label}: choose one of {', '.join(choices)} (got {v!r})")


def format_value(value) -> str:
    """A field's value as it is typed in a form (the inverse of `parse_value`)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (tuple, list)):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclass(frozen=True)
class Field:
    """One parameter as the surfaces show it (built from the Params dataclass)."""
    name: str
    label: str
    default: str  # as typed
    type: str  # int, float, bool, str, tuple[int], tuple[float]
    range: tuple | None = None
    choices: tuple[str, ...] | None = None
    help: str = ""


def fields_of(params_type) -> list[Field]:
    """The fields of a Params dataclass as the surfaces show them: name, label, default (as typed), type, range,
    choices (booleans: yes/no), help."""
    out, hints = [], _hints(params_type)
    for f in dataclasses.fields(params_type):
        tp, optional = _strip_optional(hints[f.name])
        if typing.get_origin(tp) is tuple:
            kind = f"tuple[{typing.get_args(tp)[0].__name__}]"
        else:
            kind = getattr(tp, "__name__", str(tp))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        choices = _choices(f)
        if tp is bool and choices is None:
            choices = ("yes", "no")
        out.append(Field(f.name, f.metadata.get("label", f.name), format_value(default),
                         kind + (" or none" if optional else ""), f.metadata.get("range"), choices,
                         f.metadata.get("help", "")))
    return out


# ----- the analysis -----
@dataclass(frozen=True)
class Analysis:
    """One analysis as every surface sees it (registered in `ANALYSES`): its name and texts, its Params
    dataclass, `compute(probe, inputs, params, progress) -> Result`, what it needs and which inputs it
    takes ("texts", "traces" or "none"), how to rebuild its figures, and which table ranks its heads.

        res = ANALYSES["sinks"].run(probe, texts, {"eps": 0.5})
        figs = ANALYSES["sinks"].figures(res)"""

    name: str  # the registry key, `attnlab analyze NAME`, the report's `--analyses NAME`
    title: str
    about: str  # two sentences and the citation (HTML: <i>Title</i>)
    params: type  # the parameters dataclass (the paper's names; CPU-sized defaults)
    compute: Callable[..., Result]  # (probe, inputs, params, progress) -> Result
    cpu_minutes: float  # the default's rough cost on the default model (2 idle CPU cores)
    needs: tuple[str, ...] = ()  # e.g. "statistics: received", "causal LM", "hooked path", "task: IOI"
    inputs: str = "none"  # "texts" (a list of texts), "traces" ({name: reasoning trace}) or "none"
    default_inputs: Callable[[str], object] | None = None  # (a text: the example, or the user's) -> inputs
    figures_of: Callable[[Result], dict] | None = None  # rebuilds the figures from tables and tensors
    top_table: str = "heads"  # the tidy (layer, head, score) table whose top rows surfaces list
    ascending: bool = False  # True: the smallest scores are the strongest (value drains)
    unit: str = "step"  # what progress counts
    default_suite: bool = False  # in `attnlab report`'s default suite (about a minute in all)
    check: Callable | None = None  # (inputs, params) -> None: fast checks before any work

    @property
    def Params(self) -> type:  # noqa: N802 - the dataclass, as a user spells it
        """The parameters dataclass (`analysis.Params(...)`, as a user spells it)."""
        return self.params

    def run(self, probe, inputs=None, params=None, progress: Progress | bool | None = None) -> Result:
        """Run on `inputs` (None: the default inputs) with `params` (a Params, a dict of values or of
        typed strings, or None: the defaults)."""
        params = self.make_params(params)
        check_params(params)
        if self.inputs == "none" and inputs is not None:
            raise AttnlabError(f"{self.name} builds its own inputs (its parameters size them): pass inputs=None")
        if inputs is None and self.default_inputs is not None:
            inputs = self.default_inputs(example_text())
        if self.check is not None:
            self.check(inputs, params)
        res = self.compute(probe, inputs, params, as_progress(progress, self.name))
        res.params.setdefault("section", self.name)
        return res

    def make_params(self, params=None):
        """A Params instance from None (the defaults), a Params, or a dict (string values parsed as typed,
        others used as they are); an AttnlabError naming an unknown parameter."""
        if params is None:
            return self.params()
        if isinstance(params, self.params):
            return params
        if isinstance(params, Mapping):
            names = [f.name for f in dataclasses.fields(self.params)]
            unknown = [k for k in params if k not in names]
            if unknown:
                raise AttnlabError(f"unknown parameter {unknown[0]!r} of {self.name}: choose from {', '.join(names)}")
            typed = {k: v for k, v in params.items() if isinstance(v, str)}
            p = parse_params(self.params, typed)
            rest = {k: v for k, v in params.items() if not isinstance(v, str)}
            return dataclasses.replace(p, **rest) if rest else p
        raise AttnlabError(f"{self.name}: params must be a {self.params.__name__}, a dict or None")

    def fields(self) -> list[Field]:
        """The parameters as the surfaces show them (`fields_of`)."""
        return fields_of(self.params)

    def figures(self, result: Result) -> dict:
        """The result's figures (rebuilt from its tables for a result read back from disk)."""
        if result.figures:
            return result.figures
        if self.figures_of is not None:
            return self.figures_of(result)
        return {}


ANALYSES: dict[str, Analysis] = {}


def register(analysis: Analysis) -> Analysis:
    """Add an analysis to `ANALYSES`; a name registered twice is refused."""
    if analysis.name in ANALYSES:
        raise ValueError(f"analysis {analysis.name!r} is registered twice")
    if not dataclasses.is_dataclass(analysis.params):
        raise TypeError(f"{analysis.name}: params must be a dataclass type")
    ANALYSES[analysis.name] = analysis
    return analysis


def load_all() -> dict[str, Analysis]:
    """Import every analysis module (each registers itself) and return `ANALYSES`."""
    import importlib

    for module in MODULES:
        importlib.import_module(f"attnlab.analyses.{module}")
    return ANALYSES


MODULES = ("sinks", "retrieval", "thought_anchors", "active_dormant", "bigram_backcopy", "sae_circuits",
           "kv_eviction")

__all__ = ["ANALYSES", "Analysis", "Field", "MODULES", "Progress", "as_progress", "check_params", "example_text", "fields_of", "format_value",
           "load_all", "parse_params", "parse_value", "register", "stage", "tqdm_callback", "tqdm_progress", "track"]
