"""Import-time stand-in for openai-whisper in the BlindAI compatibility venv.

Only `blindai.audio` imports it, at module level; the compatibility test never transcribes.
"""

from typing import NoReturn


def __getattr__(name: str) -> NoReturn:
    raise AttributeError(f"whisper stand-in (compat test): whisper.{name} is not available")
