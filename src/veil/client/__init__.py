"""The veil client: attest a server, then upload models and run them over the pinned channel."""

from __future__ import annotations

from veil.client.collateral import CollateralServices
from veil.client.connection import API_KEY_HEADER, Connection, connect
from veil.client.responses import (
    ModelInfo,
    PredictResponse,
    RunModelResponse,
    Tensor,
    UploadResponse,
)

__all__ = [
    "API_KEY_HEADER",
    "CollateralServices",
    "Connection",
    "ModelInfo",
    "PredictResponse",
    "RunModelResponse",
    "Tensor",
    "UploadResponse",
    "connect",
]
