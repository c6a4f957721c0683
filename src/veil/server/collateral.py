"""The server's collateral lifecycle: cache on disk, refresh before expiry, report on ``/healthz``.

Intel's PCK CRL, TCB info and QE identity live about 30 days; a server that fetched them once at
start would be refused by every client a month later. `CollateralKeeper`:

1. at start, serves a cached copy from ``<data dir>/collateral/`` when one exists for this
   platform (same FMSPC and PCK CA, or same chip and TCB) and is not yet due for refresh;
   otherwise fetches, and falls back to a cached copy still valid if the service is down. With
   neither, the server refuses to start (`EvidenceUnavailableError`);
2. refreshes on a schedule (`RefreshSettings.interval`) and whenever less than
   `RefreshSettings.margin` is left before the earliest ``nextUpdate`` or certificate expiry;
3. keeps serving the copy it has while the service is down, until that copy expires;
4. reports ``ok`` / ``degraded`` (a refresh failed or expiry is near, clients still accept) /
   ``failing`` (expired: clients refuse) with the times, for ``/healthz``.

Collateral is public data, but what is loaded back from disk is checked to be for this platform
and to parse before it is served. Times come from an injected clock. Log lines name times,
states and exception types only.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.x509.oid import NameOID

from veil.attestation.abi.dcap import parse_quote
from veil.attestation.abi.snp import parse_snp_report
from veil.attestation.claims import Platform
from veil.attestation.collateral_source import collateral_from_blindai_map
from veil.attestation.verifier import detect_platform
from veil.attestation.verify.snp import snp_collateral_from_map
from veil.attestation.verify.x509util import load_pem_chain, parse_pck_extensions
from veil.errors import CollateralError, EvidenceUnavailableError, VeilError
from veil.providers.base import CollateralFetcher

__all__ = [
    "CACHE_DIRNAME",
    "COLLATERAL_POLL_S",
    "CollateralKeeper",
    "CollateralStatus",
    "RefreshSettings",
    "collateral_expiry",
    "collateral_identity",
    "keep_collateral_fresh",
]

CACHE_DIRNAME = "collateral"
_CACHE_VERSION = 1
_MAX_CACHE_BYTES = 8 << 20

Clock = Callable[[], datetime]
_log = logging.getLogger("veil.server.collateral")


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class RefreshSettings:
    """When the server refreshes its collateral.

    Attributes:
        interval: refresh at least this often, even when far from expiry (Intel updates TCB
            info when advisories are published, not only at ``nextUpdate``).
        margin: refresh once less than this is left before the earliest expiry (at most half
            of what the copy had left when fetched); inside it the health is ``degraded`` (a
            refresh is overdue).
        retry: after a failed refresh, wait this long before the next try.
    """

    interval: timedelta = timedelta(hours=24)
    margin: timedelta = timedelta(days=7)
    retry: timedelta = timedelta(minutes=5)

    def __post_init__(self) -> None:
        for name in ("interval", "margin", "retry"):
            value = getattr(self, name)
            if value <= timedelta(0):
                raise ValueError(f"collateral refresh {name}: got {value}, expected more than 0")


@dataclass(frozen=True, slots=True)
class CollateralStatus:
    """The collateral's state, as ``/healthz`` reports it.

    Attributes:
        state: ``ok``, ``degraded`` (a refresh failed or is overdue; clients still accept) or
            ``failing`` (the served collateral has expired: clients refuse the server).
        expires: the earliest ``nextUpdate`` or certificate expiry of the served collateral.
        fetched_at: when the served copy was fetched (or came with the evidence).
        next_refresh: when the next refresh is due (None: this platform's collateral has no
            source to refresh from).
        last_error: the exception type of the last failed refresh, None after a success.
    """

    state: str
    expires: datetime | None
    fetched_at: datetime | None
    next_refresh: datetime | None
    last_error: str | None

    def as_map(self) -> dict[str, Any]:
        """CBOR-friendly: times as ISO 8601 text."""

        def iso(t: datetime | None) -> str | None:
            return None if t is None else t.isoformat()

        return {
            "state": self.state,
            "expires": iso(self.expires),
            "fetched_at": iso(self.fetched_at),
            "next_refresh": iso(self.next_refresh),
            "last_error": self.last_error,
        }


# --- what the collateral is for, and until when ---


def collateral_identity(evidence: bytes) -> str:
    """A name for the collateral `evidence` needs, stable across restarts and quotes.

    DCAP: TEE type, FMSPC and PCK CA (what PCS is asked for). SEV-SNP: a digest of the signing
    key kind, CHIP_ID and REPORTED_TCB (what selects the VCEK). Report data plays no part, so a
    restarted server with a fresh TLS key finds its cached copy.

    Raises:
        MalformedEvidenceError / CollateralError: the evidence does not say.
    """
    platform = detect_platform(evidence)
    if platform is Platform.SEV_SNP:
        report = parse_snp_report(evidence)
        digest = hashlib.sha256(
            bytes([report.signing_key]) + report.chip_id + report.reported_tcb.to_bytes(8, "little")
        ).hexdigest()
        return f"sev-snp-{digest[:32]}"
    quote = parse_quote(evidence)
    if quote.pck_chain_pem is None:
        raise CollateralError("quote certification data: got no PCK certificate chain")
    leaf = load_pem_chain(quote.pck_chain_pem, "quote PCK chain")[0]
    issuer = leaf.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    ca = hashlib.sha256(str(issuer[0].value if issuer else "").encode()).hexdigest()[:8]
    fmspc = parse_pck_extensions(leaf).fmspc.hex()
    return f"{platform.value}-{fmspc}-{ca}"


def _json_next_update(signed_json: str, what: str) -> datetime:
    try:
        value = json.loads(signed_json)["nextUpdate"]
        parsed = datetime.fromisoformat(value)
    except (ValueError, KeyError, TypeError):
        raise CollateralError(f"{what}: no readable nextUpdate") from None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _crl_next_update(data: bytes, what: str) -> datetime:
    try:
        crl = (
            x509.load_pem_x509_crl(data)
            if data.lstrip().startswith(b"-----")
            else x509.load_der_x509_crl(data)
        )
        next_update = crl.next_update_utc
    except ValueError:
        raise CollateralError(f"{what}: not a CRL") from None
    if next_update is None:
        raise CollateralError(f"{what}: no nextUpdate")
    return next_update


def _certs_expiry(pem: str | bytes | None, what: str) -> list[datetime]:
    if not pem:
        return []
    return [c.not_valid_after_utc for c in load_pem_chain(pem, what)]


def collateral_expiry(collateral: Mapping[str, Any], platform: Platform) -> datetime:
    """The earliest time any item of `collateral` stops being valid (no signature checked).

    DCAP: both CRLs' and the TCB info's and QE identity's ``nextUpdate``, and every issuer
    certificate's ``notAfter``. SEV-SNP: the VCEK/VLEK's and chain's ``notAfter`` and the CRL's
    ``nextUpdate`` when one is served.

    Raises:
        CollateralError / MalformedEvidenceError: the collateral does not parse.
    """
    ends: list[datetime] = []
    if platform is Platform.SEV_SNP:
        snp = snp_collateral_from_map(collateral)
        try:
            key = x509.load_der_x509_certificate(snp.endorsement_key)
            ends.append(key.not_valid_after_utc)
        except ValueError:
            raise CollateralError("SNP endorsement key: not a DER certificate") from None
        ends += _certs_expiry(snp.intermediates_pem, "SNP cert_chain")
        if snp.crl is not None:
            ends.append(_crl_next_update(snp.crl, "AMD CRL"))
        return min(ends)
    dcap = collateral_from_blindai_map(collateral)
    ends += [
        _crl_next_update(dcap.pck_crl, "PCK CRL"),
        _crl_next_update(dcap.root_ca_crl, "root CA CRL"),
        _json_next_update(dcap.tcb_info, "TCB info"),
        _json_next_update(dcap.qe_identity, "QE identity"),
    ]
    for chain, what in (
        (dcap.pck_crl_issuer_chain, "PCK CRL issuer chain"),
        (dcap.tcb_info_issuer_chain, "TCB info issuer chain"),
        (dcap.qe_identity_issuer_chain, "QE identity issuer chain"),
        (dcap.pck_certificate_chain, "PCK certificate chain"),
    ):
        ends += _certs_expiry(chain, what)
    return min(ends)


# --- the keeper ---


@dataclass(frozen=True, slots=True)
class _Copy:
    collateral: dict[str, Any]
    encoded: bytes
    expires: datetime
    fetched_at: datetime | None


class CollateralKeeper:
    """Holds the collateral the server serves and keeps it fresh (see the module docstring).

    Use:
        keeper = CollateralKeeper(data_dir, fetcher, clock=clock)
        provider = detect_provider(..., collateral_fetcher=keeper.fetcher)
        evidence = provider.evidence(report_data)     # start: cache, fetch, or fallback
        keeper.adopt(evidence.quote, evidence.collateral)
        ... keeper.encoded() on /collateral, keeper.status() on /healthz,
        ... keeper.refresh_if_due() from a background task.

    Args:
        data_dir: the server's data directory; the cache lives in ``collateral/`` under it.
        fetcher: the collateral service (PCS/PCCS/KDS); None when the platform has none.
        clock: the current time (timezone-aware); injected in tests.
        settings: refresh interval, margin and retry delay.
        source: overrides where refreshes come from (the simulated platform makes its own);
            takes the quote like a fetcher. Defaults to `fetcher`.
    """

    def __init__(
        self,
        data_dir: Path,
        fetcher: CollateralFetcher | None,
        *,
        clock: Clock = _utc_now,
        settings: RefreshSettings | None = None,
        source: CollateralFetcher | None = None,
    ) -> None:
        self._dir = data_dir / CACHE_DIRNAME
        self._fetcher = fetcher
        self._source = source if source is not None else fetcher
        self._clock = clock
        self._settings = settings or RefreshSettings()
        self._lock = threading.Lock()
        self._quote: bytes | None = None
        self._platform: Platform | None = None
        self._copy: _Copy | None = None
        self._last_error: str | None = None
        self._last_attempt: datetime | None = None

    # --- start ---

    def fetcher(self, quote: bytes) -> Mapping[str, Any]:
        """The `CollateralFetcher` to hand the provider: cache first, service, cache fallback.

        Raises:
            EvidenceUnavailableError: the service failed and no valid cached copy exists.
        """
        now = self._clock()
        platform = detect_platform(quote)
        identity = collateral_identity(quote)
        cached = self._load(identity, platform, now)
        if cached is not None and not self._due(cached, now):
            _log.info(
                "collateral: cached copy from %s, valid until %s",
                _iso(cached.fetched_at),
                _iso(cached.expires),
            )
            with self._lock:
                self._copy = cached
            return cached.collateral
        if self._fetcher is None:
            raise EvidenceUnavailableError("no collateral fetcher configured")
        try:
            fresh = self._fetch(self._fetcher, quote, platform, now)
        except (VeilError, OSError) as exc:
            if cached is None:
                raise EvidenceUnavailableError(
                    f"collateral not fetched ({exc}) and no cached copy valid at "
                    f"{_iso(now)} is in {self._dir.name}/ under the data directory"
                ) from exc
            self._failed(exc, now)
            _log.warning(
                "collateral: service failed (%s); serving the cached copy valid until %s",
                type(exc).__name__,
                _iso(cached.expires),
            )
            with self._lock:
                self._copy = cached
            return cached.collateral
        self._store(identity, fresh)
        with self._lock:
            self._copy = fresh
        return fresh.collateral

    def adopt(self, quote: bytes, collateral: Mapping[str, Any]) -> None:
        """Serve `collateral` for `quote` (what the provider returned with the evidence).

        When it is the cached copy (a start from the cache, or the fallback while the service
        is down), its fetch time is the cache's, so the refresh it is due for happens.
        """
        platform = detect_platform(quote)
        now = self._clock()
        served = dict(collateral)
        fetched_at = now
        try:
            cached = self._load(collateral_identity(quote), platform, now)
        except VeilError:
            cached = None  # evidence whose collateral has no identity (e.g. no PCK chain)
        if cached is not None and cached.collateral == served:
            fetched_at = cached.fetched_at or now
        try:
            expires = collateral_expiry(served, platform)
        except VeilError as exc:
            # The evidence came with collateral this module cannot date (e.g. a map without
            # nextUpdate): serve it as it is, reported as failing until a refresh succeeds.
            _log.warning("collateral: cannot tell when it expires (%s)", type(exc).__name__)
            expires = now
        with self._lock:
            self._quote, self._platform = quote, platform
            self._copy = _Copy(served, cbor2.dumps(served), expires, fetched_at)

    # --- serving ---

    def encoded(self) -> bytes:
        """The CBOR of the collateral served now."""
        with self._lock:
            if self._copy is None:
                raise EvidenceUnavailableError("collateral: none yet")
            return self._copy.encoded

    def current(self) -> dict[str, Any]:
        """The collateral map served now."""
        with self._lock:
            if self._copy is None:
                raise EvidenceUnavailableError("collateral: none yet")
            return self._copy.collateral

    def status(self) -> CollateralStatus:
        """ok / degraded / failing at the clock's time."""
        now = self._clock()
        with self._lock:
            copy, error = self._copy, self._last_error
        if copy is None:
            return CollateralStatus("failing", None, None, None, error)
        if now >= copy.expires:
            state = "failing"
        elif error is not None or now >= copy.expires - self._margin(copy):
            state = "degraded"
        else:
            state = "ok"
        next_refresh = self.next_refresh()
        return CollateralStatus(state, copy.expires, copy.fetched_at, next_refresh, error)

    # --- refreshing ---

    def next_refresh(self) -> datetime | None:
        """When `refresh_if_due` will next fetch; None without a source or a quote."""
        with self._lock:
            copy, attempt, error = self._copy, self._last_attempt, self._last_error
            if self._source is None or self._quote is None or copy is None:
                return None
        if error is not None and attempt is not None:
            return attempt + self._settings.retry
        return self._due_at(copy)

    def refresh_if_due(self) -> bool:
        """Refresh when due (blocking); True when a new copy is now served.

        A failure is logged and kept for `status`; the current copy stays served.
        """
        due = self.next_refresh()
        now = self._clock()
        if due is None or now < due:
            return False
        return self.refresh()

    def refresh(self) -> bool:
        """Fetch now; True when a new copy is served, False (logged) when the service failed."""
        with self._lock:
            quote, platform, source = self._quote, self._platform, self._source
        if quote is None or platform is None or source is None:
            return False
        now = self._clock()
        try:
            fresh = self._fetch(source, quote, platform, now)
        except (VeilError, OSError) as exc:
            self._failed(exc, now)
            with self._lock:
                copy = self._copy
            _log.warning(
                "collateral refresh failed (%s); serving the copy valid until %s",
                type(exc).__name__,
                _iso(copy.expires if copy else None),
            )
            return False
        if self._source is self._fetcher:
            self._store(collateral_identity(quote), fresh)
        with self._lock:
            self._copy, self._last_error, self._last_attempt = fresh, None, now
        _log.info("collateral refreshed: valid until %s", _iso(fresh.expires))
        return True

    # --- internals ---

    def _margin(self, copy: _Copy) -> timedelta:
        # Items that live less than twice the margin (AMD's CRLs: days) get half their life.
        if copy.fetched_at is None:
            return self._settings.margin
        return min(self._settings.margin, (copy.expires - copy.fetched_at) / 2)

    def _due_at(self, copy: _Copy) -> datetime:
        by_expiry = copy.expires - self._margin(copy)
        if copy.fetched_at is None:
            return by_expiry
        return min(by_expiry, copy.fetched_at + self._settings.interval)

    def _due(self, copy: _Copy, now: datetime) -> bool:
        return now >= self._due_at(copy)

    def _failed(self, exc: BaseException, now: datetime) -> None:
        with self._lock:
            self._last_error = type(exc).__name__
            self._last_attempt = now

    def _fetch(
        self, fetcher: CollateralFetcher, quote: bytes, platform: Platform, now: datetime
    ) -> _Copy:
        try:
            collateral = dict(fetcher(quote))
        except (VeilError, OSError):
            raise
        except Exception as exc:
            # The getter's own errors (httpx): named by type, the text may hold a URL.
            raise EvidenceUnavailableError(
                f"collateral fetcher failed with {type(exc).__name__}"
            ) from exc
        expires = collateral_expiry(collateral, platform)
        if now >= expires:
            raise CollateralError(
                f"collateral from the service: expires {_iso(expires)}, before now {_iso(now)}"
            )
        return _Copy(collateral, cbor2.dumps(collateral), expires, now)

    def _path(self, identity: str) -> Path:
        return self._dir / f"{identity}.cbor"

    def _load(self, identity: str, platform: Platform, now: datetime) -> _Copy | None:
        path = self._path(identity)
        try:
            if path.stat().st_size > _MAX_CACHE_BYTES:
                raise CollateralError(f"cached collateral: more than {_MAX_CACHE_BYTES} bytes")
            record = cbor2.loads(path.read_bytes())
            if not isinstance(record, dict) or record.get("version") != _CACHE_VERSION:
                raise CollateralError("cached collateral: not a version-1 cache record")
            if record.get("identity") != identity:
                raise CollateralError(
                    f"cached collateral: got identity {record.get('identity')!r}, "
                    f"expected {identity!r}"
                )
            collateral, fetched = record.get("collateral"), record.get("fetched_at")
            if not isinstance(collateral, dict) or not isinstance(fetched, str):
                raise CollateralError("cached collateral: fields missing")
            fetched_at = datetime.fromisoformat(fetched)
            expires = collateral_expiry(collateral, platform)
        except FileNotFoundError:
            return None
        except (VeilError, OSError, ValueError, cbor2.CBORDecodeError) as exc:
            _log.warning("collateral cache %s ignored: %s", path.name, type(exc).__name__)
            return None
        if now >= expires:
            _log.info("collateral cache %s expired at %s", path.name, _iso(expires))
            return None
        return _Copy(collateral, cbor2.dumps(collateral), expires, fetched_at)

    def _store(self, identity: str, copy: _Copy) -> None:
        record = {
            "version": _CACHE_VERSION,
            "identity": identity,
            "fetched_at": _iso(copy.fetched_at),
            "collateral": copy.collateral,
        }
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".collateral-", dir=self._dir)
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(cbor2.dumps(record))
                os.replace(tmp, self._path(identity))
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            # A read-only data dir costs the restart fallback, not the refresh.
            _log.warning("collateral cache not written: %s", type(exc).__name__)


COLLATERAL_POLL_S = 60.0


async def keep_collateral_fresh(
    keeper: CollateralKeeper, *, poll_s: float = COLLATERAL_POLL_S
) -> None:
    """Forever: every `poll_s` seconds, refresh the collateral if it is due (in a thread).

    Both `veil serve` and `veil broker` run it: whatever serves evidence serves it fresh.
    """
    while True:
        await asyncio.sleep(poll_s)
        try:
            await asyncio.to_thread(keeper.refresh_if_due)
        except Exception as exc:  # never let a refresh bug stop the server; the type says why
            _log.error("collateral refresh: unexpected %s", type(exc).__name__)


def _iso(t: datetime | None) -> str:
    return "never" if t is None else t.isoformat()
