"""`veil serve --join URL`: a replica obtains the cluster secrets from the key broker.

The steps are `veil.cluster.exchange`'s; this module only carries them over HTTP and waits a
bounded time for a broker that is still starting.
"""

from __future__ import annotations

import logging
import time

import httpx

from veil.attestation.policy import Policy
from veil.cluster.exchange import (
    ClusterSecrets,
    JoinKey,
    Verify,
    join_request,
    open_release,
    verify_offer,
)
from veil.errors import JoinError
from veil.providers.base import EvidenceProvider

__all__ = ["MAX_ANSWER_BYTES", "join_cluster"]

_log = logging.getLogger("veil.join")

MAX_ANSWER_BYTES = 512 << 10
"""Largest offer or release read from a broker."""


def _get(client: httpx.Client, method: str, url: str, body: bytes | None = None) -> bytes:
    with client.stream(method, url, content=body) as response:
        data = bytearray()
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) > MAX_ANSWER_BYTES:
                raise JoinError(f"{url}: answer over {MAX_ANSWER_BYTES} bytes")
        if response.status_code != 200:
            text = bytes(data[:500]).decode("utf-8", "replace")
            raise JoinError(f"broker {url}: {response.status_code} {text}")
    return bytes(data)


def join_cluster(
    url: str,
    provider: EvidenceProvider,
    policy: Policy,
    verify: Verify,
    *,
    wait_s: float = 30.0,
    transport: httpx.BaseTransport | None = None,
) -> ClusterSecrets:
    """The cluster secrets from the broker at `url`, after each side attested the other.

    Args:
        url: the broker's base URL (``http://host:port``).
        provider: this replica's evidence provider.
        policy: what the broker's evidence must satisfy.
        verify: veil's verifier with this replica's trust store and clock.
        wait_s: how long to keep retrying while the broker cannot be reached.
        transport: for tests only.

    Raises:
        AttestationError: the broker's evidence fails `policy` or does not bind its key.
        JoinError: the broker refused this replica, or its answer did not open.
        TransportError: the broker stayed unreachable for `wait_s`.
    """
    from veil.errors import TransportError

    base = url.rstrip("/")
    deadline = time.monotonic() + wait_s
    with httpx.Client(timeout=30.0, transport=transport) as client:
        while True:
            try:
                offer = _get(client, "GET", f"{base}/v1/offer")
                break
            except httpx.TransportError as exc:
                if time.monotonic() >= deadline:
                    raise TransportError(
                        f"broker {base}: unreachable for {wait_s:g} s ({type(exc).__name__})"
                    ) from None
                time.sleep(0.5)
        # 1. The broker proves itself first: nothing of ours is sent to an unverified broker.
        broker_public = verify_offer(offer, policy, verify)
        # 2. A fresh key for this join only, bound by our evidence.
        join = JoinKey.generate()
        try:
            answer = _get(
                client, "POST", f"{base}/v1/join", join_request(provider, join, broker_public)
            )
        except httpx.TransportError as exc:
            raise TransportError(f"broker {base}: {type(exc).__name__} during join") from None
    # 4. Only the attested broker's key opens it.
    secrets = open_release(answer, join, broker_public)
    _log.info("joined the cluster at %s: generation %d", base, secrets.generation)
    return secrets
