"""The line `veil serve` prints once it serves, and its parser for launchers (demo, tests, bench).

Kept apart from the runner so that reading it imports nothing of the server.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

__all__ = ["ReadyLine"]


@dataclass(frozen=True, slots=True)
class ReadyLine:
    """The one line `veil serve` prints when it serves; launchers parse it to learn the ports."""

    host: str
    unattested_port: int
    attested_port: int
    management_port: int

    _PATTERN: ClassVar[re.Pattern[str]] = re.compile(
        r"veil: serving on (?P<host>\S+) \(unattested http :(?P<u>\d+), "
        r"attested https :(?P<a>\d+), management https :(?P<m>\d+)\)"
    )

    def format(self, details: str) -> str:
        return (
            f"veil: serving on {self.host} (unattested http :{self.unattested_port}, "
            f"attested https :{self.attested_port}, management https :{self.management_port}), "
            f"{details}"
        )

    @classmethod
    def find(cls, text: str) -> ReadyLine | None:
        """The ready line in `text` (a line or a whole log), or None if it is not there yet."""
        found = cls._PATTERN.search(text)
        if found is None:
            return None
        return cls(found["host"], int(found["u"]), int(found["a"]), int(found["m"]))
