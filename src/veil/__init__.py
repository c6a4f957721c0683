"""veil: confidential inference for ONNX and Transformers models.

Example::

    import veil

    with veil.connect("127.0.0.1", simulation=True) as client:   # development only: no TEE
        client.upload_model("model.onnx", model_id="my-model")
        result = client.predict("my-model", x)
        print(result.output[0].as_numpy())
"""

from __future__ import annotations

__version__ = "0.1.0"

# After __version__: the modules below read it.
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
    MalformedEvidenceError,
    NotFoundError,
    PermissionDeniedError,
    PolicyError,
    RateLimitError,
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
from veil.tensors import DatumType

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
    "MalformedEvidenceError",
    "ModelInfo",
    "NotFoundError",
    "PermissionDeniedError",
    "Platform",
    "Policy",
    "PolicyError",
    "PredictResponse",
    "RateLimitError",
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
