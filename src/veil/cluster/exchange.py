"""The attested key-release exchange between `veil broker` and a joining replica.

Both sides run in a TEE and each one's evidence binds an X25519 key (HPKE, RFC 9180: DHKEM
X25519-HKDF-SHA256, HKDF-SHA256, AES-256-GCM) in its report data's key map (`veil.keymap`)::

    broker offer   report data = SHA-256("veil broker v1")          || digest{"broker-hpke": pkB}
    join request   report data = SHA-256("veil join v1" || pkB)     || digest{"join-hpke": pkR}
    release        HPKE auth mode (RFC 9180 §5.1.3): sealed to pkR, authenticated by skB

1. The replica fetches the broker's offer and verifies it against its join policy (by default
   its own measurement: "the same veil build"); only then does it trust pkB.
2. The replica makes a fresh HPKE key pair and evidence binding pkR (and which broker it meant).
3. The broker verifies that evidence against its policy (by default its own measurement) and
   seals the cluster secrets to pkR in auth mode; a refusal releases nothing.
4. The replica opens the release with skR and pkB: only the attested broker could have sealed it,
   so nobody in between can hand a replica an identity of their own choosing.

The label in the first half keeps either message from passing as a server's evidence (which
binds a certificate digest there). Replaying a join request gains nothing: the release is
readable only with skR, which never leaves the replica's TEE.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import cbor2
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKeyPair

from veil.attestation.claims import Platform, VerifiedEvidence
from veil.attestation.policy import Policy, SgxPolicy, SnpPolicy, TdxPolicy
from veil.attestation.trust import TrustStore
from veil.attestation.verifier import unverified_claims, verify_evidence
from veil.errors import BadRequestError, BindingError, JoinError, MalformedEvidenceError
from veil.keymap import KeyMap
from veil.providers.base import Evidence, EvidenceProvider
from veil.tls import TlsIdentity

__all__ = [
    "BROKER_KEY",
    "JOIN_KEY",
    "BrokerKey",
    "ClusterSecrets",
    "JoinKey",
    "Verify",
    "broker_report_data",
    "encode_message",
    "join_report_data",
    "join_request",
    "open_release",
    "own_measurement_policy",
    "peer_trust",
    "release",
    "verifier",
    "verify_join",
    "verify_offer",
]

BROKER_KEY = "broker-hpke"
"""Key-map name of the broker's static HPKE (X25519) public key, 32 bytes."""
JOIN_KEY = "join-hpke"
"""Key-map name of a joining replica's fresh HPKE (X25519) public key, 32 bytes."""

_SUITE = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES256_GCM)
_INFO = b"veil cluster secrets v1"
_BROKER_LABEL = hashlib.sha256(b"veil broker v1").digest()
_STORE_KEY_SIZE = 32
_X25519_SIZE = 32


@dataclass(frozen=True, slots=True)
class ClusterSecrets:
    """What the broker holds and releases: one TLS identity and one model-store key per cluster.

    Attributes:
        generation: counts rotations; a replica serving another generation has another certificate.
        identity: the cluster's TLS key and certificate, presented by every replica.
        store_key: 32-byte key that seals each replica's models and state in place of a platform
            sealing key.
    """

    generation: int
    identity: TlsIdentity
    store_key: bytes

    def encode(self) -> bytes:
        return cbor2.dumps(
            {
                "generation": self.generation,
                "certificate": self.identity.certificate_der,
                "private_key": self.identity.private_key.private_bytes(
                    serialization.Encoding.DER,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
                "store_key": self.store_key,
            }
        )

    @classmethod
    def decode(cls, encoded: bytes) -> ClusterSecrets:
        """Read what `encode` wrote (from a sealed file or an opened release).

        Raises:
            JoinError: not a secrets map.
        """
        try:
            value = cbor2.loads(encoded)
            key = serialization.load_der_private_key(value["private_key"], password=None)
            generation, certificate = value["generation"], value["certificate"]
            store_key = value["store_key"]
        except (ValueError, TypeError, KeyError, cbor2.CBORDecodeError):
            raise JoinError("cluster secrets: not a secrets map") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(generation, int):
            raise JoinError("cluster secrets: got another key type, expected ECDSA P-256")
        if not isinstance(store_key, bytes) or len(store_key) != _STORE_KEY_SIZE:
            raise JoinError(f"cluster secrets: store key is not {_STORE_KEY_SIZE} bytes")
        return cls(generation, TlsIdentity(bytes(certificate), key), store_key)

    def __repr__(self) -> str:
        return f"ClusterSecrets(generation={self.generation}, {self.identity!r})"


def _key_pair() -> KEMKeyPair:
    return _SUITE.kem.derive_key_pair(os.urandom(32))


def _public(pair: KEMKeyPair) -> bytes:
    return bytes(pair.public_key.to_public_bytes())


@dataclass(frozen=True, slots=True)
class BrokerKey:
    """The broker's static HPKE key pair, derived from a 32-byte seed (RFC 9180 §7.1.3
    DeriveKeyPair) that is kept sealed with the cluster secrets."""

    seed: bytes

    @classmethod
    def generate(cls) -> BrokerKey:
        return cls(os.urandom(32))

    @property
    def pair(self) -> KEMKeyPair:
        return _SUITE.kem.derive_key_pair(self.seed)

    @property
    def public(self) -> bytes:
        return _public(self.pair)

    @property
    def key_map(self) -> KeyMap:
        return KeyMap.build({BROKER_KEY: self.public})

    def __repr__(self) -> str:
        return f"BrokerKey(public={self.public.hex()})"


@dataclass(frozen=True, slots=True)
class JoinKey:
    """A replica's fresh HPKE key pair for one join; the private half never leaves the TEE."""

    pair: KEMKeyPair

    @classmethod
    def generate(cls) -> JoinKey:
        return cls(_key_pair())

    @property
    def key_map(self) -> KeyMap:
        return KeyMap.build({JOIN_KEY: _public(self.pair)})

    def open(self, broker_public: bytes, enc: bytes, ciphertext: bytes) -> ClusterSecrets:
        """Step 4: the secrets sealed to this key by the broker whose key is `broker_public`.

        Raises:
            JoinError: not sealed by that broker to this key, or not a secrets map.
        """
        try:
            context = _SUITE.create_recipient_context(
                enc,
                self.pair.private_key,
                info=_INFO,
                pks=_SUITE.kem.deserialize_public_key(broker_public),
            )
            plain = context.open(ciphertext)
        except Exception:  # pyhpke raises its own OpenError, DecodeError, ...: all one answer
            raise JoinError(
                "release: does not open with this join key and the attested broker's key"
            ) from None
        return ClusterSecrets.decode(plain)

    def __repr__(self) -> str:
        return f"JoinKey(public={_public(self.pair).hex()})"


def broker_report_data(broker: BrokerKey) -> bytes:
    """The report data of the broker's offer: its label, then its key map's digest."""
    return _BROKER_LABEL + broker.key_map.digest


def join_report_data(join: JoinKey, broker_public: bytes) -> bytes:
    """The report data of a join request: which broker it is meant for, then the join key."""
    return hashlib.sha256(b"veil join v1" + broker_public).digest() + join.key_map.digest


def own_measurement_policy(evidence: Evidence) -> Policy:
    """The default broker and join policy: this process's own measurement, nothing else.

    Read from our own evidence unverified: it comes from the TEE we run in, not from a peer.
    """
    claims = unverified_claims(evidence.quote)
    m = claims.measurements
    if claims.platform is Platform.SGX:
        return Policy(sgx=SgxPolicy(mr_enclave=(m["mr_enclave"],)))
    if claims.platform is Platform.TDX:
        return Policy(tdx=TdxPolicy(mr_td=(m["mr_td"],)))
    return Policy(sev_snp=SnpPolicy(measurement=(m["measurement"],)))


Verify = Callable[[bytes, Mapping[str, Any], Policy], VerifiedEvidence]


def peer_trust(provider: EvidenceProvider) -> TrustStore:
    """The roots a broker or replica appraises its peer with: the production vendor roots, or,
    on the simulated platform only, veil's public simulated root (which proves nothing)."""
    return TrustStore.simulated_only() if provider.simulated else TrustStore.production()


def verifier(trust: TrustStore, now: Callable[[], datetime]) -> Verify:
    """veil's verifier with `trust` at `now()`: what both sides appraise each other with."""

    def verify(quote: bytes, collateral: Mapping[str, Any], policy: Policy) -> VerifiedEvidence:
        return verify_evidence(quote, collateral, policy=policy, trust=trust, now=now())

    return verify


def _message(body: bytes, what: str) -> tuple[bytes, Mapping[str, Any], KeyMap]:
    """quote, collateral and key map of an offer or a join request (untrusted bytes)."""
    from veil.wire import cbor

    try:
        value = cbor.decode(body, what)
    except BadRequestError as exc:
        raise MalformedEvidenceError(exc.message) from None
    if not isinstance(value, dict):
        raise MalformedEvidenceError(f"{what}: got {type(value).__name__}, expected a map")
    quote, collateral, keys = value.get("quote"), value.get("collateral"), value.get("keys")
    if not isinstance(quote, bytes | bytearray) or not isinstance(keys, bytes | bytearray):
        raise MalformedEvidenceError(f"{what}: expected quote and keys as bytes")
    if not isinstance(collateral, dict):
        raise MalformedEvidenceError(f"{what}: expected collateral as a map")
    return bytes(quote), collateral, KeyMap.decode(bytes(keys))


def encode_message(evidence: Evidence, key_map: KeyMap) -> bytes:
    """An offer or a join request: evidence, its collateral and the key map it binds."""
    return cbor2.dumps(
        {"quote": evidence.quote, "collateral": dict(evidence.collateral), "keys": key_map.encoded}
    )


def _bound_key(verified: VerifiedEvidence, label: bytes, key_map: KeyMap, name: str) -> bytes:
    if verified.report_data[:32] != label:
        raise BindingError(
            f"report data [0:32]: got {verified.report_data[:32].hex()}, expected {label.hex()}"
        )
    if verified.report_data[32:64] != key_map.digest:
        raise BindingError(
            f"key map binding: report data [32:64] is {verified.report_data[32:64].hex()}, "
            f"expected {key_map.digest.hex()} (the digest of the key map sent)"
        )
    key = key_map.get(name)
    if key is None or len(key) != _X25519_SIZE:
        raise BindingError(f"key map: expected a {_X25519_SIZE}-byte {name!r} key")
    return key


def verify_offer(body: bytes, policy: Policy, verify: Verify) -> bytes:
    """Step 1 (replica): the broker's HPKE public key, once its evidence passed `policy`.

    Raises:
        AttestationError: the evidence fails verification or `policy`, or does not bind the key.
    """
    quote, collateral, key_map = _message(body, "broker offer")
    verified = verify(quote, collateral, policy)
    return _bound_key(verified, _BROKER_LABEL, key_map, BROKER_KEY)


def join_request(provider: EvidenceProvider, join: JoinKey, broker_public: bytes) -> bytes:
    """Step 2 (replica): evidence binding the join key, for the broker whose key was verified."""
    evidence = provider.evidence(join_report_data(join, broker_public))
    return encode_message(evidence, join.key_map)


def verify_join(
    body: bytes, broker: BrokerKey, policy: Policy, verify: Verify
) -> tuple[bytes, VerifiedEvidence]:
    """Step 3a (broker): the replica's join key and verified evidence, or raise.

    Raises:
        AttestationError: the evidence fails verification or `policy` (a `PolicyError` lists
            each measurement that differs), or does not bind the join key for this broker.
    """
    quote, collateral, key_map = _message(body, "join request")
    verified = verify(quote, collateral, policy)
    label = hashlib.sha256(b"veil join v1" + broker.public).digest()
    return _bound_key(verified, label, key_map, JOIN_KEY), verified


def release(broker: BrokerKey, join_public: bytes, secrets: ClusterSecrets) -> bytes:
    """Step 3b (broker): the secrets sealed to `join_public`, authenticated by the broker key."""
    enc, context = _SUITE.create_sender_context(
        _SUITE.kem.deserialize_public_key(join_public), info=_INFO, sks=broker.pair.private_key
    )
    ciphertext = context.seal(secrets.encode())
    return cbor2.dumps({"enc": enc, "ciphertext": ciphertext})


def open_release(body: bytes, join: JoinKey, broker_public: bytes) -> ClusterSecrets:
    """Step 4 (replica): the cluster secrets in the broker's answer.

    Raises:
        JoinError: malformed, or not sealed by the attested broker to `join`.
    """
    from veil.wire import cbor

    try:
        value = cbor.decode(body, "release")
    except BadRequestError as exc:
        raise JoinError(exc.message) from None
    enc = value.get("enc") if isinstance(value, dict) else None
    ciphertext = value.get("ciphertext") if isinstance(value, dict) else None
    if not isinstance(enc, bytes | bytearray) or not isinstance(ciphertext, bytes | bytearray):
        raise JoinError("release: expected enc and ciphertext as bytes")
    return join.open(broker_public, bytes(enc), bytes(ciphertext))
