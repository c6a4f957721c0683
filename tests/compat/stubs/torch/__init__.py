"""Import-time stand-in for torch in the BlindAI compatibility venv.

`blindai.utils` and `blindai.audio` import torch at module level, and `blindai.audio` names
`torch.Tensor` in an annotation; the connect / upload / run / delete path never calls torch.
Anything else fails loudly, so a code path that really needs torch cannot pass silently.
"""

from typing import Any, NoReturn


class Tensor:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("torch stand-in (compat test): no tensors")


def __getattr__(name: str) -> NoReturn:
    raise AttributeError(f"torch stand-in (compat test): torch.{name} is not available")
