"""Progress reports for long work: a tqdm bar on a terminal, plain lines elsewhere.

Evaluation, model selection and pseudo-labelling inside ``dast train`` can take minutes
on Cityscapes. On a terminal they show a bar; when stderr is a file or a pipe (a job log,
CI) a bar would be unreadable, so they print one line every ``line_every`` items instead
(about every 10% of the work, and always at the end). ``dast train`` asks
:func:`is_terminal` too: off a terminal its steps are reported as a line every 30 s.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def is_terminal(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal (a bar can redraw itself there; elsewhere: plain lines)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False


def progress(
    items: Iterable[T],
    *,
    total: int | None,
    desc: str,
    unit: str = "img",
    enabled: bool = True,
    stream: TextIO | None = None,
    line_every: int | None = None,
) -> Iterator[T]:
    """Yield ``items`` while reporting progress on ``stream`` (default stderr).

    ``enabled=False`` reports nothing. On a terminal: a tqdm bar that disappears when done.
    Otherwise: lines ``<desc>: <done>/<total> <unit> (<seconds> s)`` every ``line_every``
    items (default: a tenth of ``total``) and at the end.
    """
    out = stream if stream is not None else sys.stderr
    if not enabled:
        yield from items
        return
    if is_terminal(out):
        yield from tqdm(items, total=total, desc=desc, unit=unit, file=out, leave=False, dynamic_ncols=True)
        return
    every = line_every or max(1, (total or 10) // 10)
    t0, done = time.time(), 0
    of = f"/{total}" if total is not None else ""
    for item in items:
        yield item
        done += 1
        if done % every == 0 or done == total:
            out.write(f"{desc}: {done}{of} {unit} ({time.time() - t0:.0f} s)\n")
            out.flush()
