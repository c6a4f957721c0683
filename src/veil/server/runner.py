"""Start `veil serve`: identity, evidence, stored models, then three uvicorn servers in one loop.

Order at start (each step inside the TEE):
1. a fresh TLS key and self-signed certificate (`veil.tls`), and a fresh receipt signing key
   (`veil.server.receipts`);
2. evidence whose report data is SHA-256 of that certificate, then the digest of the key map
   (`veil.keymap`: the receipt key made in step 1, and other keys the server is given);
3. the receipt log and the stored models, checked, unsealed and loaded into ONNX Runtime;
4. the unattested, attested and management servers; when all three listen, one ready line.
SIGINT and SIGTERM stop all three cleanly; SIGHUP rotates the keys (`veil.server.rotation`).

Storage fails closed: the state (`veil.server.state`: a sealed, versioned manifest of the
models and the API key records) and the model blobs (`SealedModelStore`, under
``<data dir>/sealed``) are sealed with the platform's sealing key, and checked whole at start: a
tampered, missing or rolled-back file stops the start with a message naming it. A platform
that offers no sealing key (configfs-tsm: TDX, SEV-SNP) makes the server refuse to start, unless
``--unsealed-store`` says to keep plain files under ``<data dir>/models`` (readable and writable
by whoever reads the disk; the server warns at every start).

Authentication: API key records live in the sealed state (`veil.server.keys`). The server asks
for a key on every request when it binds beyond loopback, or as soon as the state holds a key
record or a restricted model; ``--no-auth`` turns this off and prints `NO_AUTH_BANNER`. The first
admin key of a server that asks for keys is made with ``veil keys create --role admin
--platform P --data-dir DIR`` (the same platform, so the same sealing key), before the server
starts or while it runs: the server sees each commit from the next request on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import uvicorn

from veil import __version__
from veil.attestation.claims import Platform
from veil.attestation.trust import TrustStore
from veil.attestation.verifier import detect_platform
from veil.cluster.exchange import ClusterSecrets
from veil.errors import ApiError, SealedStateError, VeilError
from veil.keymap import RECEIPT_KEY, KeyMap
from veil.providers import Evidence, EvidenceProvider, SimulatedSgxProvider, detect_provider
from veil.providers.devicefs import DeviceFilesystem
from veil.providers.pcs import collateral_fetcher, kds_collateral_fetcher
from veil.receipts.cose import Signer
from veil.server.allocator import limit_arenas, trim_after_unloads
from veil.server.app import ServerState, build_apps
from veil.server.collateral import CollateralKeeper, keep_collateral_fresh
from veil.server.config import ServerConfig
from veil.server.connections import (
    ConnectionGuard,
    GuardedServer,
    connection_caps,
    install_log_throttle,
    open_file_limit,
    run_event_loop,
    server_config,
)
from veil.server.keys import NO_AUTH_BANNER, AuthGate, KeyStore
from veil.server.models import ModelRegistry, cost_of
from veil.server.ready import ReadyLine
from veil.server.receipts import LOG_FILENAME, ReceiptIssuer, ReceiptLog
from veil.server.rotation import KeyRing, ServerKeys
from veil.server.sealing import SealedModelStore
from veil.server.state import StateBackend, open_state
from veil.server.store import ModelStore, ModelStoreProtocol, StoredModel
from veil.tls import TlsIdentity, binding_report_data, generate_identity

__all__ = [
    "UNSEALED_STORE_WARNING",
    "collateral_keeper",
    "make_provider",
    "open_store",
    "prepare_state",
    "serve",
]

_log = logging.getLogger("veil.server")

UNSEALED_STORE_WARNING = (
    "WARNING: --unsealed-store: models are stored UNENCRYPTED in the data directory; whoever "
    "can read the disk can read (and change) them."
)


def open_store(config: ServerConfig, state: StateBackend) -> ModelStoreProtocol:
    """The model store: blobs sealed and named by `state`'s manifest, or plain files only with
    ``unsealed_store``."""
    if config.unsealed_store:
        print(UNSEALED_STORE_WARNING, file=sys.stderr, flush=True)
        return ModelStore(config.data_dir / "models")
    plain = config.data_dir / "models"
    if plain.is_dir() and any(plain.glob("*.json")):
        _log.warning("plain models in %s are not served: the server now keeps models sealed", plain)
    return SealedModelStore(config.store_dir or config.data_dir / "sealed", state)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _collateral_keeper(config: ServerConfig, clock: Callable[[], datetime]) -> CollateralKeeper:
    services = collateral_fetcher(
        pccs_url=config.pccs_url, kds_url=config.kds_url, product=config.snp_product
    )
    return CollateralKeeper(
        config.data_dir, services, clock=clock, settings=config.collateral_refresh
    )


def _host_supplied_snp_key(quote: bytes, collateral: Mapping[str, Any]) -> bytes | None:
    """The VCEK/VLEK of an SEV-SNP report whose collateral came without AMD's CRL."""
    if detect_platform(quote) is not Platform.SEV_SNP or "crl" in collateral:
        return None
    key = collateral.get("vcek", collateral.get("vlek"))
    return bytes(key) if isinstance(key, bytes | bytearray) else None


def make_provider(
    config: ServerConfig,
    *,
    fs: DeviceFilesystem | None = None,
    clock: Callable[[], datetime] = _utc_now,
) -> EvidenceProvider:
    """The evidence provider for `config.platform`, with its collateral fetcher.

    The fetcher asks PCS/PCCS or KDS through the collateral cache in the data directory
    (`veil.server.collateral`): a cached copy not yet due is served, and one still valid is
    the fallback when the service is down.

    Args:
        fs: where the TEE device files are reached; only the emulated test bed
            (`veil.testing.emulated`) sets it.
        clock: the server's time (collateral freshness).
    """
    return detect_provider(
        config.platform,
        data_dir=config.data_dir,
        collateral_fetcher=_collateral_keeper(config, clock).fetcher,
        fs=fs,
    )


def collateral_keeper(
    config: ServerConfig,
    provider: EvidenceProvider,
    evidence: Evidence,
    *,
    clock: Callable[[], datetime] = _utc_now,
) -> CollateralKeeper:
    """The keeper that serves `evidence`'s collateral from now on and refreshes it.

    `veil serve` and `veil broker` both call it with the evidence they serve: the simulated
    platform refreshes from itself, an SEV-SNP host's VCEK/VLEK gets AMD's chain and CRL from
    KDS, every other platform refreshes from PCS/PCCS or KDS through the cache in the data
    directory.
    """
    if isinstance(provider, SimulatedSgxProvider):
        # The simulated platform issues its own collateral: refreshes come from it, not PCS.
        simulated = provider
        keeper = CollateralKeeper(
            config.data_dir,
            None,
            clock=clock,
            settings=config.collateral_refresh,
            source=lambda _quote: simulated.collateral_map(),
        )
    else:
        keeper = _collateral_keeper(config, clock)
    host_key = _host_supplied_snp_key(evidence.quote, evidence.collateral)
    if host_key is not None:
        # The host handed over the VCEK/VLEK but AMD's CRL comes only from KDS: fetch the chain
        # and CRL now and with every refresh. A KDS failure leaves the host's copy served
        # (clients that require the CRL refuse it) and /healthz degraded.
        keeper = CollateralKeeper(
            config.data_dir,
            None,
            clock=clock,
            settings=config.collateral_refresh,
            source=kds_collateral_fetcher(
                config.kds_url, product=config.snp_product, endorsement_key=host_key
            ),
        )
    keeper.adopt(evidence.quote, evidence.collateral)
    if host_key is not None:
        keeper.refresh()
    return keeper


def prepare_state(
    config: ServerConfig,
    *,
    store: ModelStoreProtocol | None = None,
    provider: EvidenceProvider | None = None,
    clock: Callable[[], datetime] = _utc_now,
    bound_keys: Mapping[str, bytes] | None = None,
    cluster: ClusterSecrets | None = None,
) -> tuple[ServerState, TlsIdentity]:
    """Steps 1-3: the state the apps serve and the TLS identity (blocking).

    `provider` defaults to `make_provider(config)`; the test bed passes one on emulated devices.
    `clock` is the server's time for collateral freshness (tests advance it).
    `bound_keys`: public keys, by key-map name, that the evidence must vouch for besides the
    server's own (`veil.keymap`).
    `cluster`: the secrets a key broker released (``--join``): its TLS identity is presented and
    its store key seals the state in place of the platform's sealing key.

    Raises:
        EvidenceUnavailableError: no evidence, or no collateral (the service is down and no
            cached copy is valid).
    """
    provider = provider or make_provider(config, clock=clock)
    if RECEIPT_KEY in (bound_keys or {}):
        raise ValueError(f"bound_keys: {RECEIPT_KEY!r} is the server's own receipt key")
    given = dict(bound_keys or {})

    def attest(identity: TlsIdentity) -> tuple[Signer, KeyMap, Evidence]:
        # Steps 1-2 (and again at each rotation, `veil.server.rotation`): the receipt key is
        # made here so its private key never leaves this process, and the evidence binds
        # SHA-256(certificate DER) and the key map.
        signer = Signer()
        key_map = KeyMap.build({**given, RECEIPT_KEY: signer.public_key})
        evidence = provider.evidence(binding_report_data(identity.certificate_der, key_map))
        return signer, key_map, evidence

    # 1. TLS identity, made here so its private key never leaves this process (or the cluster's
    #    identity, which reached it sealed to a key of this TEE); 2. evidence binding it and the
    #    receipt key; its collateral is kept fresh from now on.
    identity = cluster.identity if cluster is not None else generate_identity()
    signer, key_map, evidence = attest(identity)
    keeper = collateral_keeper(config, provider, evidence, clock=clock)
    # 3. The sealed state (keys, and the manifest of the models), checked whole before anything
    #    is served: a tampered or rolled-back file stops the start (fail closed).
    sealing_key = provider.sealing_key if cluster is None else (lambda: cluster.store_key)
    sealed = open_state(
        config.data_dir,
        sealing_key,
        unsealed=config.unsealed_store,
        database_url=config.database_url,
        blob_dir=config.store_dir,
    )
    store = store or open_store(config, sealed)
    log = ReceiptLog(config.data_dir / LOG_FILENAME, sealed.receipt_log_key)
    receipts = ReceiptIssuer(signer, evidence.quote, log, clock=clock)

    def renew(generation: int) -> tuple[ServerKeys, TlsIdentity]:
        fresh = generate_identity()
        new_signer, new_map, new_evidence = attest(fresh)
        keeper.adopt(new_evidence.quote, new_evidence.collateral)
        if _host_supplied_snp_key(new_evidence.quote, new_evidence.collateral) is not None:
            keeper.refresh()  # as at start: AMD's CRL from KDS, not only the host's copy
        issuer = ReceiptIssuer(new_signer, new_evidence.quote, log, clock=clock)
        keys = ServerKeys(fresh.certificate_der, new_evidence.quote, new_map, issuer, generation)
        return keys, fresh

    ring = KeyRing(
        ServerKeys(identity.certificate_der, evidence.quote, key_map, receipts),
        identity,
        # A cluster's replicas share the broker's identity: one replica cannot rotate it.
        renew if cluster is None else None,
    )
    registry = ModelRegistry(limits=config.limits)
    registry.admitter.start()
    access: dict[str, StoredModel] = {}
    stored = list(store.load_all())
    manifest = sealed.open()  # done by the sealed store already; the plain store needs it
    if not manifest.auth_on and any(m.owner or m.visibility != "public" for m, _ in stored):
        # Only the plain store can get here: its files say keys were used, the state has none.
        raise SealedStateError(
            "stored models have owners or are restricted, but the state holds no API key: "
            "refusing to start with authentication off"
        )
    used = 0
    for meta, blob in stored:
        try:
            # Admitted again, as at upload: the limits may have changed, and a stored model is
            # checked and measured like an upload, within the same storage limit and memory
            # budget (past the budget, the least recently loaded are evicted: listed, and
            # loaded again on their next use).
            config.limits.check_storage(used, len(blob))
            admitted = registry.admitter.admit(blob)
            cost = cost_of(len(admitted.graph), admitted.loaded_bytes)
            config.limits.check_storage(used, cost)
            registry.make_room(cost, evict=isinstance(store, SealedModelStore))
            try:
                model = registry.load_admitted(
                    admitted,
                    model_id=meta.model_id,
                    model_name=meta.model_name,
                    threads=config.threads,
                    model_hash=meta.model_hash,
                    batching=config.batching,
                    owner=meta.owner,
                )
            except BaseException:
                registry.release_room(cost)
                raise
            used += cost
            registry.add(model, room=cost)
            access[meta.key] = meta
        except ApiError as exc:
            _log.warning("stored model %s not loaded: %s", meta.model_id, exc.message)
    state = ServerState(
        collateral=keeper,
        simulated=provider.simulated,
        registry=registry,
        store=store,
        config=config,
        auth=AuthGate(
            KeyStore(sealed),
            host=config.host,
            no_auth=config.no_auth,
            anonymous=not config.no_anonymous,
        ),
        access=access,
        keys=ring,
    )
    return state, identity


# uvicorn's start and stop lines, which each of the three servers in this process would repeat.
_LIFECYCLE_LINES = frozenset(
    {
        "Started server process [%d]",
        "Waiting for application startup.",
        "Application startup complete.",
        "Shutting down",
        "Waiting for application shutdown.",
        "Application shutdown complete.",
        "Finished server process [%d]",
    }
)


class _OncePerProcess(logging.Filter):
    """Pass each of uvicorn's lifecycle lines once, whichever of the servers says it first."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[object, object]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg not in _LIFECYCLE_LINES:
            return True
        key = (record.msg, record.args)
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


def _say_lifecycle_once() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _OncePerProcess) for f in logger.filters):
        logger.addFilter(_OncePerProcess())


class _Server(GuardedServer):
    """A guarded uvicorn server that leaves signal handling to `serve` (three share one loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen(host: str, port: int) -> socket.socket:
    """Bind here, so a taken port is a one-line error rather than a uvicorn traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on accepted sockets whose
    # proto says TCP, and without it every response body waits 40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def close_connections(servers: Iterable[uvicorn.Server]) -> None:
    """After a rotation: close every open connection of `servers` once it is idle (now, or
    after the response in progress), so that clients' next requests meet the new certificate.
    Connections still in their TLS handshake took the new identity already, or will fail."""
    for server in servers:
        for connection in list(server.server_state.connections):
            connection.shutdown()


async def rotate_keys(ring: KeyRing) -> None:
    """One rotation (SIGHUP, the schedule); a failure is logged and the keys stay as they were."""
    try:
        await ring.rotate()
    except VeilError as exc:
        _log.error("key rotation failed, keys unchanged: %s", exc)
    except Exception as exc:  # never let a rotation bug stop the server; the type says why
        _log.error("key rotation failed, keys unchanged: unexpected %s", type(exc).__name__)


async def rotate_keys_every(ring: KeyRing, period_s: float) -> None:
    """Forever: rotate the keys every `period_s` seconds (``--rotate-keys-every``)."""
    while True:
        await asyncio.sleep(period_s)
        await rotate_keys(ring)


async def _run(
    config: ServerConfig,
    state: ServerState,
    ready: Callable[[str], None],
) -> int:
    unattested, attested, management = build_apps(state)
    platform = f"platform={config.platform}" + (" (INSECURE: no TEE)" if state.simulated else "")
    server_header = f"veil/{__version__}" + (" mock" if state.simulated else "")
    sockets: list[socket.socket] = []
    try:
        for port in (config.unattested_port, config.attested_port, config.management_port):
            sockets.append(_listen(config.host, port))
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    limits = config.limits
    # Room for every connection the caps allow plus the server's own files, where the hard
    # limit lets us; the caps are then sized under whatever limit is in force.
    caps = connection_caps(limits, open_file_limit(limits.max_connections + 1024))
    if caps.total < limits.max_connections:
        _log.warning("max_connections lowered to %d to stay under the open-file limit", caps.total)
    guard = ConnectionGuard(caps)
    install_log_throttle(asyncio.get_running_loop())
    servers = []
    for app, port, tls in (
        (unattested, config.unattested_port, False),
        (attested, config.attested_port, True),
        (management, config.management_port, True),
    ):
        uv_config = server_config(
            app,
            host=config.host,
            port=port,
            log_level=config.log_level,
            server_header=server_header,
            limits=limits,
            backlog=caps.backlog,
        )
        if tls:
            # One context for both TLS ports; a rotation swaps the identity it presents.
            uv_config.ssl = state.keys.server_context
        servers.append(_Server(uv_config, guard=guard, limits=limits))
    state.keys.on_rotate(lambda: close_connections(servers[1:]))

    _say_lifecycle_once()
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    rotations: set[asyncio.Task[None]] = set()

    def rotate_now() -> None:
        task = asyncio.create_task(rotate_keys(state.keys))
        rotations.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(rotations.discard)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(signal.SIGHUP, rotate_now)
    tasks = [
        asyncio.create_task(server.serve(sockets=[sock]))
        for server, sock in zip(servers, sockets, strict=True)
    ]
    refresher = asyncio.create_task(keep_collateral_fresh(state.collateral))
    trimmer = asyncio.create_task(trim_after_unloads())
    if config.rotate_keys_every_s is not None:
        rotator = asyncio.create_task(rotate_keys_every(state.keys, config.rotate_keys_every_s))
    else:
        rotator = None
    try:
        while not all(server.started for server in servers):
            if any(task.done() for task in tasks):
                stop()
                await asyncio.gather(*tasks, return_exceptions=True)
                return 1
            await asyncio.sleep(0.02)
        a, b, c = (sock.getsockname()[1] for sock in sockets)
        restored = len(state.access)
        models = f"{restored} stored model{'' if restored == 1 else 's'} restored"
        ready(
            ReadyLine(config.host, a, b, c).format(f"{platform}, {state.auth.describe()}, {models}")
        )
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for background in (refresher, trimmer, rotator, *rotations):
            if background is not None:
                background.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await background
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for sock in sockets:
            sock.close()
    failed = [r for r in results if isinstance(r, BaseException)]
    return 1 if failed else 0


def _join(
    config: ServerConfig, provider: EvidenceProvider, trust: TrustStore | None
) -> ClusterSecrets:
    """The cluster secrets from ``--join``'s broker, both sides attested (`veil.cluster`).

    `trust` defaults to `peer_trust(provider)`; only the emulated test bed passes test roots.
    """
    from veil.attestation.policy import Policy
    from veil.cluster.exchange import own_measurement_policy, peer_trust, verifier
    from veil.cluster.join import join_cluster

    assert config.join is not None
    if config.join_policy is not None:
        policy = Policy.from_toml(config.join_policy)
    else:
        policy = own_measurement_policy(provider.evidence(b""))
    trust = trust or peer_trust(provider)
    return join_cluster(config.join, provider, policy, verifier(trust, _utc_now))


def serve(
    config: ServerConfig,
    *,
    ready: Callable[[str], None] | None = None,
    provider: EvidenceProvider | None = None,
    trust: TrustStore | None = None,
) -> int:
    """Run the server until SIGINT/SIGTERM; returns the exit status.

    `provider` defaults to `make_provider(config)`; only the emulated test bed passes one, and
    `trust` (the roots ``--join`` appraises the broker with; default: the vendors').

    Raises:
        EvidenceUnavailableError: the platform cannot produce evidence.
    """
    if config.no_auth:
        # Loud, before anything else: stderr and the log.
        print(NO_AUTH_BANNER, file=sys.stderr, flush=True)
    limit_arenas()  # before the threads that would each take an arena start
    cluster = None
    if config.join is not None:
        provider = provider or make_provider(config)
        cluster = _join(config, provider, trust)
    state, _ = prepare_state(config, provider=provider, cluster=cluster)

    def announce(line: str) -> None:
        print(line, flush=True)

    return run_event_loop(_run(config, state, ready or announce))
