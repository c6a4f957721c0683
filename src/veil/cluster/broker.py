"""`veil broker`: the key broker, a veil process in a TEE that holds the cluster's secrets.

Where its secrets come from (one of three, chosen by the operator, `veil.commands.broker`):

- sealed (the default, SGX and the simulated platform): the cluster's TLS identity, the
  model-store key and its own HPKE key sealed to its platform (``broker.sealed`` in its data
  directory), so a restart serves the same identity;
- from a peer (``--peer URL``, every platform): a live broker releases the cluster secrets to it
  through the exchange replicas use (`from_peers`); its own HPKE key is fresh, nothing is at rest;
- new (``--new-cluster``): fresh secrets held in memory only (`new_cluster`); the cluster lives
  as long as one of its brokers does.

TDX and SEV-SNP guests have no sealing key, so a broker there runs from a peer or new.

It answers two requests on one plain-HTTP port; everything that matters is protected by the
exchange itself (`veil.cluster.exchange`), not by the channel:

- ``GET /v1/offer``: its evidence, binding its HPKE key, with collateral kept fresh (`Offer`);
- ``POST /v1/join``: a replica's evidence binding a fresh HPKE key; answered 200 with the secrets
  sealed to that key when the evidence passes the broker policy, else 403 (logged, nothing
  released).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cbor2
import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from veil.attestation.policy import Policy
from veil.cluster.exchange import (
    BrokerKey,
    ClusterSecrets,
    Verify,
    encode_message,
    release,
    verify_join,
)
from veil.errors import AttestationError, SealedStateError, TransportError
from veil.providers.base import Evidence, EvidenceProvider
from veil.server.collateral import CollateralKeeper, keep_collateral_fresh
from veil.server.connections import run_event_loop
from veil.server.sealed_file import SealedFileError, derive_key, read_sealed, write_sealed
from veil.tls import certificate_digest, generate_identity

__all__ = [
    "MAX_JOIN_BYTES",
    "BrokerState",
    "Offer",
    "broker_app",
    "from_peers",
    "load_or_create",
    "new_cluster",
    "rotate",
]

_log = logging.getLogger("veil.broker")

MAX_JOIN_BYTES = 256 << 10
"""Largest join request read (evidence plus collateral is a few dozen KiB)."""
_FILENAME = "broker.sealed"
_CONTEXT = b"veil broker secrets v1"
_CBOR = "application/cbor"


@dataclass(frozen=True, slots=True)
class BrokerState:
    """The broker's secrets: the cluster's and its own HPKE key."""

    secrets: ClusterSecrets
    key: BrokerKey

    def __repr__(self) -> str:
        return f"BrokerState({self.secrets!r}, {self.key!r})"


def _seal_key(sealing_key: bytes) -> bytes:
    return derive_key(sealing_key, b"broker secrets")


def _write(data_dir: Path, sealing_key: bytes, state: BrokerState) -> None:
    body = cbor2.dumps({"cluster": state.secrets.encode(), "broker_seed": state.key.seed})
    write_sealed(data_dir / _FILENAME, _seal_key(sealing_key), _CONTEXT, (body,))


def _fresh(generation: int, store_key: bytes | None = None) -> ClusterSecrets:
    return ClusterSecrets(generation, generate_identity(), store_key or os.urandom(32))


def load_or_create(data_dir: Path, sealing_key: bytes) -> BrokerState:
    """The broker's sealed secrets in `data_dir`, made (and sealed) on the first start.

    Raises:
        SealedStateError: the file exists but is not intact under this platform's key.
    """
    path = data_dir / _FILENAME
    try:
        body = read_sealed(path, _seal_key(sealing_key), _CONTEXT)
    except FileNotFoundError:
        state = BrokerState(_fresh(1), BrokerKey.generate())
        _write(data_dir, sealing_key, state)
        return state
    except SealedFileError as exc:
        raise SealedStateError(f"{_FILENAME}: {exc}") from None
    try:
        value = cbor2.loads(body)
        return BrokerState(
            ClusterSecrets.decode(value["cluster"]), BrokerKey(bytes(value["broker_seed"]))
        )
    except (KeyError, TypeError, ValueError, cbor2.CBORDecodeError):
        raise SealedStateError(f"{_FILENAME}: not the broker's secrets") from None


def rotate(data_dir: Path, sealing_key: bytes) -> BrokerState:
    """A new cluster TLS identity (generation + 1), sealed in place of the old one.

    The model-store key and the broker's own key stay: models sealed before remain readable.
    Replicas get the new certificate when they next join; clients re-attest when they see it.
    """
    old = load_or_create(data_dir, sealing_key)
    state = BrokerState(_fresh(old.secrets.generation + 1, old.secrets.store_key), old.key)
    _write(data_dir, sealing_key, state)
    return state


def new_cluster() -> BrokerState:
    """Fresh cluster secrets and broker key, held in memory only (``--new-cluster``).

    Nothing is written: a restart of the last broker holding them makes another identity, and
    models sealed with the old store key can no longer be read.
    """
    return BrokerState(_fresh(1), BrokerKey.generate())


def from_peers(
    urls: Sequence[str],
    provider: EvidenceProvider,
    policy: Policy,
    verify: Verify,
    *,
    wait_s: float,
    transport: httpx.BaseTransport | None = None,
) -> BrokerState | None:
    """The cluster secrets from the first live broker of `urls`, or None when none answers.

    A peer releases them as it does to a replica (`veil.cluster.exchange`): each side attests
    the other against its policy. The broker key is fresh: replicas verify each offer anew.
    `transport` is for tests only.

    Raises:
        AttestationError / JoinError: a peer answered but did not pass `policy`, or refused us.
            Never a reason to start a new cluster instead: that would fork the identity.
    """
    from veil.cluster.join import join_cluster

    for url in urls:
        try:
            secrets = join_cluster(
                url, provider, policy, verify, wait_s=wait_s, transport=transport
            )
        except TransportError as exc:
            _log.warning("peer broker %s: %s", url, exc)
            continue
        _log.info("cluster secrets (generation %d) from peer broker %s", secrets.generation, url)
        return BrokerState(secrets, BrokerKey.generate())
    return None


class Offer:
    """The broker's offer: one quote binding its key, with the collateral served now.

    The quote never changes; the collateral comes from `collateral` on each request (the
    keeper's current copy), so a broker running for months stays verifiable.
    """

    def __init__(
        self, quote: bytes, key: BrokerKey, collateral: Callable[[], Mapping[str, Any]]
    ) -> None:
        self._quote = quote
        self._key_map = key.key_map
        self._collateral = collateral
        self._encoded: tuple[Mapping[str, Any], bytes] | None = None

    @classmethod
    def of(cls, key: BrokerKey, evidence: Evidence, keeper: CollateralKeeper) -> Offer:
        """`evidence` (which binds `key`, `broker_report_data`), its collateral from `keeper`."""
        return cls(evidence.quote, key, keeper.current)

    def encoded(self) -> bytes:
        current = self._collateral()
        cached = self._encoded
        if cached is None or cached[0] is not current:
            cached = (current, encode_message(Evidence(self._quote, current), self._key_map))
            self._encoded = cached
        return cached[1]


def broker_app(state: BrokerState, offer: Offer, policy: Policy, verify: Verify) -> Starlette:
    """The broker's HTTP app: ``GET /v1/offer`` and ``POST /v1/join``."""

    async def get_offer(request: Request) -> Response:
        return Response(offer.encoded(), media_type=_CBOR)

    async def post_join(request: Request) -> Response:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_JOIN_BYTES:
                return Response(f"join request over {MAX_JOIN_BYTES} bytes", status_code=413)
        peer = request.client.host if request.client else "?"
        try:
            join_public, verified = await asyncio.to_thread(
                verify_join, bytes(body), state.key, policy, verify
            )
        except AttestationError as exc:
            # Measurements and reasons are not secrets: the operator needs them to see why.
            _log.warning("join from %s refused, nothing released: %s", peer, exc)
            return Response(f"refused: {exc}", status_code=403)
        _log.info(
            "join from %s accepted (%s, %s): released generation %d",
            peer,
            verified.platform.value,
            ", ".join(f"{k}={v.hex()}" for k, v in sorted(verified.measurements.items())),
            state.secrets.generation,
        )
        return Response(release(state.key, join_public, state.secrets), media_type=_CBOR)

    return Starlette(
        routes=[
            Route("/v1/offer", get_offer, methods=["GET"]),
            Route("/v1/join", post_join, methods=["POST"]),
        ]
    )


def serve_broker(
    app: Starlette,
    state: BrokerState,
    *,
    host: str,
    port: int,
    log_level: str,
    ready: Callable[[str], None],
    keeper: CollateralKeeper | None = None,
) -> int:
    """Serve `app` until SIGINT/SIGTERM; `ready` gets the line launchers wait for.

    `keeper`: the offer's collateral, refreshed in the background while the broker serves.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    config = uvicorn.Config(
        app, log_level=log_level, access_log=False, lifespan="off", server_header=False
    )
    server = uvicorn.Server(config)

    async def run() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        refresher = asyncio.create_task(keep_collateral_fresh(keeper)) if keeper else None
        try:
            while not server.started and not task.done():
                await asyncio.sleep(0.02)
            if server.started:
                digest = certificate_digest(state.secrets.identity.certificate_der).hex()
                ready(
                    f"veil broker: serving on http://{host}:{sock.getsockname()[1]} "
                    f"(generation {state.secrets.generation}, certificate sha256 {digest}, "
                    f"at {datetime.now(UTC).isoformat(timespec='seconds')})"
                )
            await task
        finally:
            if refresher is not None:
                refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresher

    run_event_loop(run())
    return 0 if server.started else 1
