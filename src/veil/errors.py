"""Every error veil raises, in one small hierarchy.

::

    VeilError
    ├── AttestationError                 the server could not prove what it runs; nothing was sent
    │   ├── EvidenceUnavailableError     no evidence (no TEE device, server gave none)
    │   ├── MalformedEvidenceError       bytes that do not parse as the format they claim
    │   ├── SignatureError               a signature over evidence or collateral does not verify
    │   ├── ChainError                   a certificate chain does not lead to a pinned root
    │   │   └── RevokedError             a certificate in the chain is on a CRL
    │   ├── CollateralError              collateral missing, inconsistent or for another platform
    │   │   └── ExpiredError             collateral or certificate outside its validity window at `now`
    │   ├── TcbError                     no TCB level matches, or the TCB status is not accepted
    │   ├── PolicyError                  measurements / debug / attributes differ from the policy
    │   └── BindingError                 the TLS certificate is not the one the evidence binds
    ├── TensorError (also ValueError)    an input cannot be encoded as a tensor (dtype, shape, size)
    ├── TransportError                   the network failed: refused, reset, timed out
    ├── ExportError                      a model did not export to ONNX, or ONNX Runtime disagrees with PyTorch
    ├── SealedStateError                 the server's sealed state is tampered with, rolled back or incomplete
    ├── ReceiptError                     a receipt or proof file does not prove what it claims
    │   └── LogError                     the transparency log does not include it, or was rewritten
    ├── JoinError                        the key broker refused a replica, or its release did not open
    └── ApiError                         the server answered with an error status
        ├── BadRequestError              400 / 413 / 422: malformed request, limits, wrong inputs
        ├── AuthenticationError          401: missing or unknown API key
        ├── PermissionDeniedError        403: the key may not do this
        ├── NotFoundError                404: unknown model
        ├── ConflictError                409: model id already taken, or ambiguous
        ├── RateLimitError               429: too many requests
        └── ServiceUnavailableError      503: queue full (retry after `retry_after`) or state broken

Messages say what was found and what was expected ("mr_td: got 01…, expected 02…").
No message ever holds a secret, an API key, a tensor or a model byte.
"""

from __future__ import annotations

__all__ = [
    "ApiError",
    "AttestationError",
    "AuthenticationError",
    "BadRequestError",
    "BindingError",
    "ChainError",
    "CollateralError",
    "ConflictError",
    "EvidenceUnavailableError",
    "ExpiredError",
    "ExportError",
    "HazmatWarning",
    "JoinError",
    "LogError",
    "MalformedEvidenceError",
    "NotFoundError",
    "PermissionDeniedError",
    "PolicyError",
    "RateLimitError",
    "ReceiptError",
    "RevokedError",
    "SealedStateError",
    "ServiceUnavailableError",
    "SignatureError",
    "SimulationModeWarning",
    "TcbError",
    "TensorError",
    "TransportError",
    "UnsafePolicyWarning",
    "VeilError",
    "api_error_for_status",
]


class VeilError(Exception):
    """Base of every error raised by veil."""


class AttestationError(VeilError):
    """The server's evidence was not accepted; no data was sent to it."""


class EvidenceUnavailableError(AttestationError):
    """No evidence could be obtained (no TEE interface, or the server returned none)."""


class MalformedEvidenceError(AttestationError):
    """Evidence or collateral bytes do not parse as the format they claim to be."""


class SignatureError(AttestationError):
    """A signature over evidence or collateral does not verify."""


class ChainError(AttestationError):
    """A certificate chain does not lead to a pinned trust root."""


class RevokedError(ChainError):
    """A certificate of the chain is listed on a certificate revocation list."""


class CollateralError(AttestationError):
    """Collateral is missing, inconsistent with the evidence, or for another platform."""


class ExpiredError(CollateralError):
    """Collateral or a certificate is outside its validity window at the verification time."""


class TcbError(AttestationError):
    """No TCB level matches the platform, or its TCB status is not accepted by the policy."""


class PolicyError(AttestationError):
    """Verified claims (measurements, debug, attributes) differ from what the policy requires."""


class BindingError(AttestationError):
    """The TLS certificate presented is not the one whose hash the evidence carries."""


class TensorError(VeilError, ValueError):
    """An input cannot be encoded or decoded as a tensor (dtype, shape, byte length)."""


class TransportError(VeilError):
    """The network failed: connection refused or reset, TLS failure, time-out."""


class ExportError(VeilError):
    """A model did not export to ONNX, or ONNX Runtime's outputs differ from PyTorch's."""


class SealedStateError(VeilError):
    """The server's state at rest (manifest, model blobs, key records) is inconsistent: refused."""


class ReceiptError(VeilError):
    """A receipt or proof file does not verify: malformed, a bad signature, a key the evidence
    does not bind, or a field that differs from what was sent or received."""


class LogError(ReceiptError):
    """An inclusion proof does not lead to the tree head, or two tree heads are inconsistent
    (the transparency log was rewritten)."""


class JoinError(VeilError):
    """The key broker refused to release the cluster secrets, or its answer did not open."""


class ApiError(VeilError):
    """The server answered with an error status.

    Attributes:
        status: the HTTP status code.
        message: the server's explanation.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class BadRequestError(ApiError):
    """400, 413 or 422: the request was malformed, too large, or did not fit the model."""


class AuthenticationError(ApiError):
    """401: the API key is missing or unknown."""


class PermissionDeniedError(ApiError):
    """403: the API key may not perform this operation."""


class NotFoundError(ApiError):
    """404: the model does not exist (or is not visible to this key)."""


class ConflictError(ApiError):
    """409: the model id is already taken (by the caller's own model), names several models
    the caller may use (name one as ``<owner key id>/<id>``, or by its hash), or the server
    cannot do this in its setup."""


class RateLimitError(ApiError):
    """429: too many requests for this key."""


class ServiceUnavailableError(ApiError):
    """503: the server cannot take the request now (its request queue is full, or its state
    needs an operator).

    Attributes:
        retry_after: seconds the server asked the client to wait before trying again (its
            ``Retry-After`` header); None when it did not ask: then retrying will not help.
    """

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(status, message)
        self.retry_after = retry_after


_API_ERRORS: dict[int, type[ApiError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: BadRequestError,
    422: BadRequestError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def api_error_for_status(status: int, message: str) -> ApiError:
    """Build the `ApiError` subclass that matches an HTTP status."""
    return _API_ERRORS.get(status, ApiError)(status, message)


class SimulationModeWarning(UserWarning):
    """The peer is a simulated TEE: its evidence proves nothing about confidentiality."""


class HazmatWarning(UserWarning):
    """A ``hazmat_`` entry point was used: it weakens or skips a check (e.g. test trust roots)."""


class UnsafePolicyWarning(UserWarning):
    """A policy that pins no measurement was used: any code on a genuine TEE is accepted."""
