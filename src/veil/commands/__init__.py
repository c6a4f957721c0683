"""The `veil` subcommands (see `veil.cli`), and what they share."""

from __future__ import annotations

__all__ = ["error_line"]


def error_line(exc: BaseException) -> str:
    """`exc` as the one line a command prints: ``PATH: reason`` for file errors."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)
