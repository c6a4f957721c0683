"""Live key rotation: new TLS and receipt keys, and new evidence binding them, without a restart.

A generation of the server's keys (`ServerKeys`) is what the evidence vouches for: the TLS
certificate, the key map (`veil.keymap`: the receipt key and any key the server was given) and
the evidence whose report data binds both. `KeyRing` holds the current generation and rotates:

1. make a fresh TLS key and certificate and a fresh receipt key, inside the TEE, and evidence
   binding them (`veil.tls.binding_report_data`), off the event loop (`renew`);
2. then, with no await in between: serve the new certificate, evidence and key map on the
   unattested port, present the new certificate from the next TLS handshake on
   (`veil.tls.RotatingServerContext`), sign receipts asked for from now on with the new key,
   and ask every open TLS connection to close (`on_rotate` listeners): an idle one closes now,
   one with a request in progress closes after its response.

In-flight requests finish on the connection and under the keys their client attested: each
request takes its receipt issuer when it starts. A client's next request opens a connection,
meets a certificate it did not attest, attests the server again and sends it then (the client's
one re-attestation path, `veil.client.connection`). The receipt log continues: every
generation's issuer appends to the same log (`veil.server.receipts`).

Triggers: ``POST /admin/rotate-keys`` (an admin key), ``SIGHUP``, and
``veil serve --rotate-keys-every DURATION``. A server that joined a cluster (``--join``)
presents the TLS identity the broker released to every replica and cannot rotate it alone.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from veil.errors import api_error_for_status
from veil.keymap import EMPTY_KEY_MAP, KeyMap
from veil.server.receipts import ReceiptIssuer
from veil.tls import RotatingServerContext, TlsIdentity, certificate_digest, server_context

__all__ = ["KeyRing", "Renew", "ServerKeys"]

_log = logging.getLogger("veil.server")


@dataclass(frozen=True, slots=True)
class ServerKeys:
    """One generation of what the evidence vouches for.

    Attributes:
        certificate_der: the TLS certificate, served on the unattested port.
        quote: the evidence binding the certificate and `key_map`.
        key_map: the server's other public keys (`veil.keymap`).
        receipts: signs receipts with this generation's receipt key (None: no receipts).
        generation: 0 at start, one more at each rotation.
    """

    certificate_der: bytes
    quote: bytes
    key_map: KeyMap = EMPTY_KEY_MAP
    receipts: ReceiptIssuer | None = None
    generation: int = 0

    def __repr__(self) -> str:
        digest = certificate_digest(self.certificate_der).hex()
        return f"ServerKeys(generation={self.generation}, certificate_sha256={digest})"


Renew = Callable[[int], tuple[ServerKeys, TlsIdentity]]
"""Makes generation `n`'s keys and their evidence (blocking: evidence can take seconds)."""


class KeyRing:
    """The server's current keys, the TLS context its listeners hold, and their rotation.

    Args:
        keys: the generation made at start.
        identity: its TLS identity.
        renew: makes the next generation; None when the server cannot rotate (its identity
            came from a cluster's broker), which `rotate` then refuses.
    """

    def __init__(self, keys: ServerKeys, identity: TlsIdentity, renew: Renew | None) -> None:
        self._keys = keys
        self._tls = RotatingServerContext(identity)
        self._renew = renew
        self._listeners: list[Callable[[], None]] = []
        self._rotating: asyncio.Lock | None = None

    @property
    def current(self) -> ServerKeys:
        return self._keys

    @property
    def server_context(self) -> ssl.SSLContext:
        """What the attested and management listeners hold (TLS 1.2+)."""
        return self._tls.context

    def on_rotate(self, listener: Callable[[], None]) -> None:
        """Call `listener` on the event loop right after each rotation (closing connections)."""
        self._listeners.append(listener)

    async def rotate(self) -> ServerKeys:
        """Steps 1 and 2 above; one rotation at a time. Returns the new generation.

        Raises:
            ConflictError: (409) when this server cannot rotate its keys.
            EvidenceUnavailableError: the platform gave no evidence; the keys stay as they were.
        """
        if self._renew is None:
            raise api_error_for_status(
                409,
                "this server presents its cluster's TLS identity (--join): rotate it at the "
                "broker, not on one replica",
            )
        renew = self._renew
        if self._rotating is None:
            self._rotating = asyncio.Lock()
        async with self._rotating:
            # Step 1, in a worker thread: key generation and evidence are slow.
            keys, identity = await asyncio.to_thread(renew, self._keys.generation + 1)
            replacement = await asyncio.to_thread(server_context, identity)
            # Step 2: from here to the end, no await: nothing is served in between.
            self._keys = keys
            self._tls.use(replacement)
            for listener in self._listeners:
                listener()
        _log.info("keys rotated: %r", keys)
        return keys
