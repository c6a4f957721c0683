"""What the client returns: output tensors, upload results, model listings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from veil.receipts.proof import Receipt
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
    """The result of an upload: the id to run the model by and SHA-256 of its bytes, and the
    signed receipt when one was asked for.

    `optimization` (veil servers, when the upload was optimized): ``mode``, ``kept`` (whether
    the optimized graph is served), ``reason`` (why not), ``max_abs_diff`` of the outputs on a
    probe, ``speedup``, and for ``int8`` ``top1_agreement`` over the probe set.
    """

    model_id: str
    hash: bytes
    receipt: Receipt | None = None
    optimization: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class PredictResponse:
    """The outputs of one inference, in the model's output order, and the signed receipt
    (``receipt=True``; ``result.receipt.save(path)`` writes a proof file)."""

    output: list[Tensor]
    receipt: Receipt | None = None


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
    created_at: float | None = None
    """Upload time, seconds since the epoch (None: the server does not say)."""


@dataclass(frozen=True, slots=True)
class ApiKeyInfo:
    """One API key as the admin-key API lists it: never its secret.

    Attributes:
        key_id: public identifier (16 hex digits).
        role: ``admin``, ``owner`` or ``user``.
        name: the label given at creation (a portal puts its account name there), or None.
        created_at: seconds since the epoch.
        revoked_at: seconds since the epoch, or None while the key is valid.
        last_used_at: when it last authenticated a request since the server started, or None.
    """

    key_id: str
    role: str
    name: str | None
    created_at: float
    revoked_at: float | None
    last_used_at: float | None

    @classmethod
    def from_wire(cls, item: Mapping[str, Any]) -> ApiKeyInfo:
        def time_or_none(value: Any) -> float | None:
            return None if value is None else float(value)

        name = item.get("name")
        return cls(
            key_id=str(item["key_id"]),
            role=str(item["role"]),
            name=None if name is None else str(name),
            created_at=float(item["created_at"]),
            revoked_at=time_or_none(item.get("revoked_at")),
            last_used_at=time_or_none(item.get("last_used_at")),
        )
