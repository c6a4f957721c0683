"""DER encoder for the Intel SGX PCK certificate extensions (OID 1.2.840.113741.1.13.1).

Source: Intel SGX PCK Certificate and CRL Profile Specification, section 1.3.5 "Intel SGX PCK
Certificate" → "Intel SGX Extensions" (table of OIDs). The extension value is::

    SGXExtensions ::= SEQUENCE {
      SEQUENCE { OID .1  (PPID),              OCTET STRING (16) }
      SEQUENCE { OID .2  (TCB),  SEQUENCE {
          SEQUENCE { OID .2.1 .. .2.16 (SGX TCB Comp01..16 SVN), INTEGER (0..255) } x16
          SEQUENCE { OID .2.17 (PCESVN),      INTEGER (0..65535) }
          SEQUENCE { OID .2.18 (CPUSVN),      OCTET STRING (16) } } }
      SEQUENCE { OID .3  (PCE-ID),            OCTET STRING (2) }
      SEQUENCE { OID .4  (FMSPC),             OCTET STRING (6) }
      SEQUENCE { OID .5  (SGX Type),          ENUMERATED (0 Standard, 1 Scalable, ...) }
      -- present only in certificates issued by the PCK *Platform* CA:
      SEQUENCE { OID .6  (PlatformInstanceID), OCTET STRING (16) }
      SEQUENCE { OID .7  (Configuration), SEQUENCE {
          SEQUENCE { OID .7.1 (Dynamic Platform), BOOLEAN }
          SEQUENCE { OID .7.2 (Cached Keys),      BOOLEAN }
          SEQUENCE { OID .7.3 (SMT Enabled),      BOOLEAN } } } }

This layout, including INTEGER minimal encoding (255 → 02 02 00 FF) and the Platform-CA-only
fields, was checked byte for byte against real Intel PCK certificates (the dcap-qvl SGX and the
Occlum vectors). It is hand-written because `cryptography` has no generic DER writer.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography.x509 import ObjectIdentifier

__all__ = ["SGX_EXTENSIONS_OID", "encode_sgx_extensions"]

_SGX = "1.2.840.113741.1.13.1"
SGX_EXTENSIONS_OID = ObjectIdentifier(_SGX)

# X.690 universal tags.
_BOOLEAN, _INTEGER, _OCTET_STRING, _OID, _ENUMERATED, _SEQUENCE = 0x01, 0x02, 0x04, 0x06, 0x0A, 0x30
_SGX_TYPE_STANDARD, _SGX_TYPE_SCALABLE = 0, 1


def _tlv(tag: int, content: bytes) -> bytes:
    # X.690 8.1.3: short form below 128 bytes, else long form with the minimal length octets.
    size = len(content)
    if size < 0x80:
        length = bytes([size])
    else:
        raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _oid(dotted: str) -> bytes:
    # X.690 8.19: first two arcs combined as 40*a + b, each arc base-128, high bit = "more".
    arcs = [int(arc) for arc in dotted.split(".")]
    values = [40 * arcs[0] + arcs[1], *arcs[2:]]
    out = bytearray()
    for value in values:
        chunk = [value & 0x7F]
        value >>= 7
        while value:
            chunk.append(0x80 | (value & 0x7F))
            value >>= 7
        out.extend(reversed(chunk))
    return _tlv(_OID, bytes(out))


def _integer(value: int, tag: int = _INTEGER) -> bytes:
    # X.690 8.3: two's complement, minimal; a non-negative value with its top bit set gains 00.
    if value < 0:
        raise ValueError(f"SGX extension integers are unsigned, got {value}")
    return _tlv(tag, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _field(suffix: str, value: bytes) -> bytes:
    return _tlv(_SEQUENCE, _oid(f"{_SGX}.{suffix}") + value)


def _octets(value: bytes, size: int, what: str) -> bytes:
    if len(value) != size:
        raise ValueError(f"{what}: got {len(value)} bytes, expected {size}")
    return _tlv(_OCTET_STRING, value)


def encode_sgx_extensions(
    *,
    ppid: bytes,
    component_svns: Sequence[int],
    pce_svn: int,
    cpu_svn: bytes,
    pce_id: bytes,
    fmspc: bytes,
    platform_instance_id: bytes | None,
    dynamic_platform: bool = False,
    cached_keys: bool = True,
    smt_enabled: bool = True,
) -> bytes:
    """The DER value of a PCK certificate's SGX extension.

    With a `platform_instance_id` the certificate is a PCK Platform CA one: SGX Type Scalable plus
    the PlatformInstanceID and Configuration fields. Without one it is a Processor CA one: SGX
    Type Standard and neither field.
    """
    if len(component_svns) != 16 or not all(0 <= svn <= 0xFF for svn in component_svns):
        raise ValueError("component_svns: expected sixteen values in 0..255")
    if not 0 <= pce_svn <= 0xFFFF:
        raise ValueError(f"pce_svn: got {pce_svn}, expected 0..65535")
    tcb = b"".join(_field(f"2.{i}", _integer(svn)) for i, svn in enumerate(component_svns, 1))
    tcb += _field("2.17", _integer(pce_svn))
    tcb += _field("2.18", _octets(cpu_svn, 16, "cpu_svn"))

    def boolean(flag: bool) -> bytes:
        return _tlv(_BOOLEAN, b"\xff" if flag else b"\x00")

    fields = (
        _field("1", _octets(ppid, 16, "ppid"))
        + _field("2", _tlv(_SEQUENCE, tcb))
        + _field("3", _octets(pce_id, 2, "pce_id"))
        + _field("4", _octets(fmspc, 6, "fmspc"))
    )
    if platform_instance_id is None:
        return _tlv(_SEQUENCE, fields + _field("5", _integer(_SGX_TYPE_STANDARD, _ENUMERATED)))
    configuration = (
        _field("7.1", boolean(dynamic_platform))
        + _field("7.2", boolean(cached_keys))
        + _field("7.3", boolean(smt_enabled))
    )
    return _tlv(
        _SEQUENCE,
        fields
        + _field("5", _integer(_SGX_TYPE_SCALABLE, _ENUMERATED))
        + _field("6", _octets(platform_instance_id, 16, "platform_instance_id"))
        + _field("7", _tlv(_SEQUENCE, configuration)),
    )
