"""Upload progress: a caller's callback, or a bar on a terminal (tqdm)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["Progress", "upload_progress"]

# Called with (bytes sent so far, total bytes) after each piece of the model is handed over.
Progress = Callable[[int, int], None]


@contextmanager
def upload_progress(progress: bool | Progress, total: int, label: str) -> Iterator[Progress]:
    """The callback to report to: `progress` itself, a tqdm bar on stderr when `progress` is
    True and stderr is a terminal, or one that does nothing."""
    if callable(progress):
        yield progress
        return
    if not progress or not sys.stderr.isatty():
        yield lambda _sent, _total: None
        return
    from tqdm import tqdm  # type: ignore[import-untyped]

    with tqdm(
        total=total,
        desc=label,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
    ) as bar:

        def advance(sent: int, _total: int) -> None:
            bar.update(sent - bar.n)

        yield advance
