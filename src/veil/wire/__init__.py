"""CBOR messages of the BlindAI 0.6 protocol (+ veil's extensions), read by one strict decoder.

- `veil.wire.cbor`: the strict, incremental CBOR decoder every request body goes through (no
  tags, bounded depth and items, nothing allocated from a declared size);
- `veil.wire.messages`: the requests and replies, their encoders and decoders, and
  `UploadStreamDecoder` for uploads decoded while they arrive.
"""

from veil.wire.cbor import DecodeLimits, StrictDecoder
from veil.wire.messages import (
    DeleteRequest,
    ModelListEntry,
    RunRequest,
    UploadRequest,
    UploadStreamDecoder,
    decode_delete_request,
    decode_error,
    decode_reply,
    decode_run_reply,
    decode_run_request,
    decode_upload_optimization,
    decode_upload_reply,
    decode_upload_request,
    encode_delete_request,
    encode_error,
    encode_run_reply,
    encode_run_request,
    encode_upload_head,
    encode_upload_reply,
    encode_upload_request,
)

__all__ = [
    "DecodeLimits",
    "DeleteRequest",
    "ModelListEntry",
    "RunRequest",
    "StrictDecoder",
    "UploadRequest",
    "UploadStreamDecoder",
    "decode_delete_request",
    "decode_error",
    "decode_reply",
    "decode_run_reply",
    "decode_run_request",
    "decode_upload_optimization",
    "decode_upload_reply",
    "decode_upload_request",
    "encode_delete_request",
    "encode_error",
    "encode_run_reply",
    "encode_run_request",
    "encode_upload_head",
    "encode_upload_reply",
    "encode_upload_request",
]
