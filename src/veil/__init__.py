"""veil: confidential inference for ONNX and Transformers models.

Example::

    import veil

    with veil.connect("127.0.0.1", simulation=True) as client:   # development only: no TEE
        client.upload_model("model.onnx", model_id="my-model")
        result = client.predict("my-model", x)
        print(result.output[0].as_numpy())
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Errors are light and always needed; the rest is imported on first use, so that `veil --help`
# and `import veil.errors` do not pay for httpx, numpy and cryptography.
from veil.errors import (
    ApiError,
    AttestationError,
    AuthenticationError,
    BadRequestError,
    BindingError,
    ChainError,
    CollateralError,
    ConflictError,
    EvidenceUnavailableError,
    ExpiredError,
    LogError,
    MalformedEvidenceError,
    NotFoundError,
    PermissionDeniedError,
    PolicyError,
    RateLimitError,
    ReceiptError,
    RevokedError,
    ServiceUnavailableError,
    SignatureError,
    SimulationModeWarning,
    TcbError,
    TensorError,
    TransportError,
    UnsafePolicyWarning,
    VeilError,
)

if TYPE_CHECKING:
    from veil.attestation.claims import Platform, VerifiedEvidence
    from veil.attestation.policy import Policy, SgxPolicy, SnpPolicy, TdxPolicy
    from veil.client import (
        CollateralServices,
        Connection,
        ModelInfo,
        PredictResponse,
        RunModelResponse,
        Tensor,
        UploadResponse,
        connect,
    )
    from veil.receipts import Receipt
    from veil.tensors import DatumType

_LAZY = {
    "CollateralServices": "veil.client",
    "Connection": "veil.client",
    "DatumType": "veil.tensors",
    "ModelInfo": "veil.client",
    "Platform": "veil.attestation.claims",
    "Policy": "veil.attestation.policy",
    "PredictResponse": "veil.client",
    "Receipt": "veil.receipts",
    "RunModelResponse": "veil.client",
    "SgxPolicy": "veil.attestation.policy",
    "SnpPolicy": "veil.attestation.policy",
    "TdxPolicy": "veil.attestation.policy",
    "Tensor": "veil.client",
    "UploadResponse": "veil.client",
    "VerifiedEvidence": "veil.attestation.claims",
    "connect": "veil.client",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'veil' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ApiError",
    "AttestationError",
    "AuthenticationError",
    "BadRequestError",
    "BindingError",
    "ChainError",
    "CollateralError",
    "CollateralServices",
    "ConflictError",
    "Connection",
    "DatumType",
    "EvidenceUnavailableError",
    "ExpiredError",
    "LogError",
    "MalformedEvidenceError",
    "ModelInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "Platform",
    "Policy",
    "PolicyError",
    "PredictResponse",
    "RateLimitError",
    "Receipt",
    "ReceiptError",
    "RevokedError",
    "RunModelResponse",
    "ServiceUnavailableError",
    "SgxPolicy",
    "SignatureError",
    "SimulationModeWarning",
    "SnpPolicy",
    "TcbError",
    "TdxPolicy",
    "Tensor",
    "TensorError",
    "TransportError",
    "UnsafePolicyWarning",
    "UploadResponse",
    "VeilError",
    "VerifiedEvidence",
    "__version__",
    "connect",
]
