"""One progress protocol for every attnlab function that takes `progress`.

`progress` is one of
- None or False: silent;
- True: a tqdm bar (notebooks, scripts), labelled by the function (its `desc`);
- a callable `progress(done, total)`: called with monotone counts ending at done == total. It may
  raise to cancel: the dashboard's jobs do (`Jobs.progress` raises `Cancelled`), and the work stops
  there, since every call happens between two units of work in the caller's thread.

A string is not a progress value (it used to be a bar's label in some modules; the label is now the
function's own `desc`). The CLI adapts the protocol to Rich; notebooks pass True or `tqdm_progress`.

- `as_progress(progress, desc)`: the protocol as a callable or None (True becomes a tqdm bar).
- `track(iterable, progress, total, desc)`: a loop's items, reporting (0, total) first and
  (done, total) after each item is processed.
- `stage(progress, index, count)`: the progress of stage `index` of a job of `count` stages, so that
  a function running several progress-taking steps reports one monotone sequence.

It lives in the probe room so that every room (probe, analyses, interventions, app) can use it;
`attnlab.analyses.base` re-exports it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from attnlab.probe.errors import AttnlabError

Progress = Callable[[int, int], None]  # progress(done, total); may raise to cancel
Item = TypeVar("Item")
STAGE_STEPS = 100  # a stage's resolution when stages are combined (`stage`): percent of the stage


class TqdmProgress:
    """A `progress(done, total)` drawing a tqdm bar (created at the first call, closed when done or by
    `close()`)."""

    def __init__(self, desc: str = "", unit: str = "step"):
        self.desc, self.unit, self.bar = desc, unit, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit=self.unit, leave=False)
        self.bar.total = total
        self.bar.n = done
        self.bar.refresh()
        if total and done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def tqdm_callback(desc: str = "", unit: str = "step") -> TqdmProgress:
    """A `progress(done, total)` drawing a tqdm bar labelled `desc`."""
    return TqdmProgress(desc, unit)


@contextmanager
def tqdm_progress(desc: str = "", unit: str = "step"):
    """with tqdm_progress("retrieval") as p: analysis.run(probe, progress=p) (the bar closes on exit)."""
    bar = TqdmProgress(desc, unit)
    try:
        yield bar
    finally:
        bar.close()


def as_progress(progress, desc: str = "", unit: str = "step") -> Progress | None:
    """The protocol as a callable: None/False -> None (silent); True -> a tqdm bar labelled `desc`; a
    callable stays. Anything else (a string, a number) is refused."""
    if progress is None or progress is False:
        return None
    if progress is True:
        return TqdmProgress(desc, unit)
    if callable(progress):
        return progress
    label = " (a string is no longer a bar's label: each function labels its own)" if isinstance(progress, str) else ""
    raise AttnlabError(f"progress: {progress!r} is not a progress value{label}; pass None, True (a tqdm bar) or a "
                       "function progress(done, total)")


def track(iterable: Iterable[Item], progress, total: int | None = None, desc: str = "",
          unit: str = "step") -> Iterator[Item]:
    """The items of `iterable`, reporting progress(0, total) before the first and progress(done, total)
    after each one is processed (when the loop asks for the next). total defaults to len(iterable).
    An exception raised by `progress` stops the loop there; a True bar is closed when the loop ends."""
    report = as_progress(progress, desc, unit)
    if report is None:
        yield from iterable
        return
    if total is None:
        total = len(iterable)  # type: ignore[arg-type]
    try:
        report(0, total)
        for done, item in enumerate(iterable, 1):
            yield item
            report(min(done, total), total)
    finally:
        if isinstance(report, TqdmProgress) and report is not progress:
            report.close()


def stage(progress, index: int, count: int):
    """The progress value to pass to stage `index` (0-based) of `count` stages of one job.

    None/False stay silent; True stays True (each stage draws its own bar, labelled by its function);
    a callable sees the stage's (done, total) as (index * 100 + percent of the stage, count * 100), so
    the whole job reports one monotone sequence ending at done == total even when the stages count
    different things. A job of one stage passes the callable through (its counts keep their unit)."""
    if progress is True:
        return True
    report = as_progress(progress)
    if report is None or count == 1:
        return report

    def staged(done: int, total: int) -> None:
        part = STAGE_STEPS if total <= 0 or done >= total else (STAGE_STEPS * done) // total
        report(index * STAGE_STEPS + part, count * STAGE_STEPS)

    return staged


__all__ = ["Progress", "STAGE_STEPS", "TqdmProgress", "as_progress", "stage", "tqdm_callback", "tqdm_progress", "track"]
