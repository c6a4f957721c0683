"""Import-time stand-in for transformers in the BlindAI compatibility venv.

`blindai.audio` does `from transformers import WhisperProcessor` at module level; the class
exists so that import succeeds, and refuses to be used.
"""

from typing import Any, NoReturn


class WhisperProcessor:
    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError("transformers stand-in (compat test): no WhisperProcessor")
