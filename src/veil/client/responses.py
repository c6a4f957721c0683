"""What the client returns: output tensors, upload results, model listings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from veil.tensors import DatumType, WireTensor, decode_array, numpy_dtype

__all__ = ["ModelInfo", "PredictResponse", "RunModelResponse", "Tensor", "UploadResponse"]


@dataclass(frozen=True, slots=True)
class Tensor:
    """One output of a model.

    Attributes:
        name: the model output it is.
        shape: its dimensions.
        datum_type: its element type on the wire.
        data: the raw little-endian bytes.
    """

    name: str | None
    shape: tuple[int, ...]
    datum_type: DatumType
    data: bytes = field(repr=False)

    @classmethod
    def from_wire(cls, tensor: WireTensor) -> Tensor:
        return cls(tensor.name, tensor.shape, tensor.datum_type, tensor.data)

    @property
    def dtype(self) -> np.dtype[Any]:
        """The numpy dtype of the elements."""
        return numpy_dtype(self.datum_type)

    def as_numpy(self) -> npt.NDArray[Any]:
        """The tensor as a read-only numpy array (a view of the received bytes)."""
        return decode_array(self.data, self.datum_type, self.shape)

    def as_flat(self) -> list[Any]:
        """The elements as a flat Python list."""
        flat: list[Any] = self.as_numpy().reshape(-1).tolist()
        return flat

    def as_torch(self) -> Any:
        """The tensor as a torch.Tensor (needs torch: ``pip install veil[transformers]``)."""
        try:
            import torch
        except ImportError as exc:
            raise ImportError(
                "as_torch() needs torch; install it with: pip install 'veil[transformers]'"
            ) from exc
        return torch.from_numpy(np.array(self.as_numpy()))


@dataclass(frozen=True, slots=True)
class UploadResponse:
    """The result of an upload: the id to run the model by and SHA-256 of its bytes."""

    model_id: str
    hash: bytes


@dataclass(frozen=True, slots=True)
class PredictResponse:
    """The outputs of one inference, in the model's output order."""

    output: list[Tensor]


RunModelResponse = PredictResponse


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model the server holds (from `Connection.list_models`)."""

    model_id: str
    model_name: str
    hash: bytes
    size: int
    inputs: tuple[Mapping[str, Any], ...]
    outputs: tuple[Mapping[str, Any], ...]
    owner: str | None = None
    """Key id of the uploader (None: uploaded with authentication off)."""
    visibility: str = "public"
    """``public`` or ``restricted``."""
