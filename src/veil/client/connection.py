"""A verified connection to a veil (or BlindAI 0.6) server.

`Connection` attests the server before anything leaves this machine:

1. fetch the server's TLS certificate, its evidence and collateral from the unattested port
   (or take the collateral from the vendors' services or an offline bundle: `collateral=`);
2. refuse a simulated ("mock") server unless ``simulation=True``;
3. verify the evidence (signatures, chains, collateral, TCB status) and check it against the
   policy (`veil.attestation.verifier.verify_evidence`);
4. check the evidence binds the certificate and the key map: report data is SHA-256(certificate
   DER), then the digest of the key map the server served (`veil.keymap`; zero for servers with
   none, BlindAI's included);
5. open HTTPS channels that trust that one certificate and nothing else.

Inputs, models and outputs travel only on step 5's channels; they are verified once per
connection and kept alive for every request.

Receipts (``receipt=True``): the server signs what it did with the receipt key the evidence
binds; before returning, the client checks the signature, that the receipt names the evidence
verified in step 3, the digests of the inputs it sent and the outputs it received, and the
receipt's inclusion in the server's signed log head (`veil.receipts`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import random
import ssl
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from veil import __version__, wire
from veil.attestation.claims import VerifiedEvidence
from veil.attestation.policy import Policy, SgxPolicy
from veil.attestation.trust import TrustStore
from veil.attestation.verifier import verify_evidence
from veil.client.collateral import (
    SERVER,
    CollateralChoice,
    check_choice,
    own_collateral,
    wants_server_collateral,
)
from veil.client.defaults import default_server
from veil.client.progress import Progress, upload_progress
from veil.client.responses import (
    ApiKeyInfo,
    ModelInfo,
    PredictResponse,
    Tensor,
    UploadResponse,
)
from veil.client.transport import Headers, HttpClient, ResponseError
from veil.errors import (
    ApiError,
    AttestationError,
    BindingError,
    EvidenceUnavailableError,
    LogError,
    PolicyError,
    ReceiptError,
    ServiceUnavailableError,
    SimulationModeWarning,
    TransportError,
    VeilError,
    api_error_for_status,
)
from veil.keymap import EMPTY_KEY_MAP, RECEIPT_KEY, KeyMap, check_binding
from veil.receipts.merkle import verify_consistency
from veil.receipts.payload import TreeHead, tensors_digest
from veil.receipts.proof import Receipt, SignedTreeHead, check_receipt, decode_bundle
from veil.tensors import encode_inputs
from veil.tls import SERVER_NAME, pinned_client_context
from veil.wire import admin as admin_wire

__all__ = ["API_KEY_HEADER", "MAX_EVIDENCE_RESPONSE_BYTES", "Connection", "connect"]

API_KEY_HEADER = "X-Veil-Api-Key"
_RECEIPT_HEADER = "X-Veil-Receipt"
# The receipt key this connection attested: the server refuses (421) to sign with another.
_RECEIPT_KEY_HEADER = "X-Veil-Receipt-Key"
_UPLOAD_CHUNK = 1 << 20
# Certificate, evidence and collateral each fit in a few dozen KiB; this leaves room for long
# certificate chains and CRLs, not for a plain-HTTP peer to fill the client's memory.
MAX_EVIDENCE_RESPONSE_BYTES = 512 << 10
_CLIENT_INFO = {"user_agent": "veil_python", "user_agent_version": __version__}
Body = bytes | Iterator[bytes] | Callable[[], Iterator[bytes]] | None
"""A request body: bytes, pieces sent once, or what makes the pieces (sent again if refused)."""


def _simulated_policy() -> Policy:
    # Imported late: the measurement hashes veil's own code, which costs a few milliseconds.
    from veil.providers.measurement import simulated_measurement

    return Policy(sgx=SgxPolicy(mr_enclave=(simulated_measurement(),)))


def _simulated_mismatch(message: str, server: str) -> str:
    return (
        f"{message}. A simulated server's mr_enclave is a hash of its veil source files, and "
        f"this client (veil/{__version__}) pins its own: the server ({server or 'unknown'}) runs "
        "different veil sources (another version, or any file edited). Run client and server "
        "from the same veil installation, or pin the server's value with "
        "policy=veil.Policy(sgx=veil.SgxPolicy(mr_enclave=[...])) and simulation=True"
    )


def _retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` in seconds; None if absent, a date, or nonsense (then no retry)."""
    if value is None or not value.strip().isdigit() or len(value) > 6:
        return None
    return float(value)


def busy_retry_delay(
    attempt: int, retry_after: float | None, retries: int, max_delay: float
) -> float | None:
    """Seconds to wait before retry number ``attempt + 1`` of a busy refusal, or None to give up.

    Only a refusal that says when to come back (``Retry-After``) is retried: the server's
    delay, doubled at each attempt, capped at `max_delay`, and jittered down by up to half so
    that clients refused together do not all come back together.
    """
    if retry_after is None or attempt >= retries:
        return None
    delay = min(max_delay, retry_after * 2.0**attempt)
    jitter: float = random.uniform(0.5, 1.0)  # noqa: S311 - spreading retries, not a secret
    return delay * jitter


LOST_UPLOAD_LOOKUP_S = 60.0
"""How long, at most, an upload whose answer was lost is looked for on the server."""


def failover_delay(attempt: int, *, first: float = 0.1, cap: float = 2.0) -> float:
    """Seconds to wait before failover attempt `attempt` (0-based): doubling, capped, jittered."""
    jitter: float = random.uniform(0.5, 1.0)  # noqa: S311 - spreading retries, not a secret
    return min(cap, first * 2.0**attempt) * jitter


def _shown(value: object) -> str:
    return value.hex() if isinstance(value, bytes) else repr(value)


def _opt_time(value: Any) -> float | None:
    return None if value is None else float(value)


def _host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr


class Connection:
    """An attested connection to one server; use it as a context manager.

    Example::

        import veil

        with veil.Connection("10.0.0.5", policy=veil.Policy.from_toml(policy_text)) as client:
            client.upload_model("model.onnx", model_id="my-model")
            result = client.predict("my-model", inputs)
            result.output[0].as_numpy()

    Args:
        addr: the server's host name or IP address; None: the configured default server
            (``VEIL_SERVER`` and ``VEIL_POLICY``, or the client configuration file; see
            `veil.client.defaults`), its ports, policy and simulation opt-in.
        api_key: sent as ``X-Veil-Api-Key`` with every request on the attested channels
            (never to the unattested port), if given.
        simulation: accept a simulated server (no TEE: NO SECURITY). Warns on every connection.
            Without a policy it pins the measurement of this veil version's simulated server.
        policy: what the TEE must prove (measurements, TCB status); required unless
            `simulation` is set.
        trust: the roots evidence must chain to (default: Intel's and AMD's, pinned). Only
            for tests against emulated TEEs: `TrustStore.hazmat_test_roots(...)`. A simulated
            server is never accepted this way (that takes ``simulation=True``).
        unattested_port, attested_port, management_port: the server's three ports (default
            9923, 9924, 9925, or those of the configured address).
        timeout: seconds allowed for each call, all of it (connecting, sending, every byte of
            the answer): a peer that drips its answer cannot stretch it.
        upload_timeout: seconds allowed for an upload, all of it.
        max_response_bytes: the largest answer accepted from the attested ports (predictions);
            a larger one is refused with `TransportError` as soon as it passes the limit.
            Evidence answers from the plain-HTTP port are limited to
            ``MAX_EVIDENCE_RESPONSE_BYTES``.
        now: the time to verify the evidence at (default: now).
        collateral: where the collateral comes from: ``"server"`` (default, BlindAI's way),
            `veil.CollateralServices` (the client fetches it from Intel PCS/PCCS or AMD KDS),
            or the `pathlib.Path` of a bundle written by ``veil collateral fetch``.
        busy_retries: how many times a request the server refused as busy (503 with
            ``Retry-After``: its queue was full) is sent again; ``0`` never retries. Uploads
            streamed from a file are not retried.
        busy_retry_max_delay: the longest wait, in seconds, before one retry: the server's
            ``Retry-After``, doubled at each retry, jittered, and capped by this.
        failover_retries: how many times a prediction or a model list whose connection was
            lost (a replica died, the certificate rotated) is sent again, each time after
            attesting whichever server now answers (backoff from 0.1 s doubling to 2 s,
            jittered); ``0`` never. Uploads and deletes are never sent twice: when an upload
            with a `model_id` loses its answer after its whole body was sent, the client
            attests the server again and looks the id up (`list_models`) until it appears, for
            up to `LOST_UPLOAD_LOOKUP_S` (60 s) within `upload_timeout` (the server may still be
            admitting it), or until the server cannot be reached `failover_retries` times in a
            row; the upload counts only if that id holds exactly the bytes sent, else
            `TransportError` says the model is not there.

    Raises:
        AttestationError: (or a subclass) the server could not prove what it runs; nothing
            was sent to it.
        TransportError: the server could not be reached.
    """

    def __init__(
        self,
        addr: str | None = None,
        *,
        api_key: str | None = None,
        simulation: bool | None = None,
        policy: Policy | None = None,
        unattested_port: int | None = None,
        attested_port: int | None = None,
        management_port: int | None = None,
        timeout: float = 30.0,
        upload_timeout: float = 600.0,
        max_response_bytes: int = 256 << 20,
        now: datetime | None = None,
        trust: TrustStore | None = None,
        collateral: CollateralChoice = SERVER,
        busy_retries: int = 4,
        busy_retry_max_delay: float = 4.0,
        failover_retries: int = 4,
    ) -> None:
        check_choice(collateral)
        ports = {"unattested_port": 9923, "attested_port": 9924, "management_port": 9925}
        if addr is None:
            # No address: the configured default server (`veil.client.defaults`); arguments
            # given here still win over what is configured.
            configured = default_server()
            addr = configured.host
            ports.update(configured.ports)
            policy = policy if policy is not None else configured.policy
            simulation = configured.simulation if simulation is None else simulation
        simulation = bool(simulation)
        unattested_port = unattested_port or ports["unattested_port"]
        attested_port = attested_port or ports["attested_port"]
        management_port = management_port or ports["management_port"]
        if busy_retries < 0 or not busy_retry_max_delay >= 0:
            raise ValueError(
                f"busy_retries {busy_retries}, busy_retry_max_delay {busy_retry_max_delay}: "
                "expected both >= 0"
            )
        self._busy_retries = busy_retries
        self._busy_retry_max_delay = busy_retry_max_delay
        if trust is not None and simulation:
            raise ValueError("trust= and simulation=True: got both, expected at most one")
        if trust is not None and trust.simulated:
            raise ValueError(
                "trust: got the simulated root, expected test or vendor roots; "
                "a simulated server is accepted only with simulation=True"
            )
        if simulation:
            warnings.warn_explicit(
                "veil: simulation mode: the server runs in no TEE and its evidence proves "
                "nothing; never send real data",
                SimulationModeWarning,
                __file__,
                0,
                module=__name__,
                registry=None,  # no once-per-location memory: warn on every connection
            )
        # A simulated server measures its veil sources: pinned by default to this client's own.
        simulated_default = policy is None and simulation
        if policy is None:
            if not simulation:
                raise PolicyError(
                    "no policy: pass policy= (e.g. veil.Policy.from_toml(...)) naming the "
                    "measurements you accept"
                )
            policy = _simulated_policy()
        self._total = timeout
        self._upload_total = upload_timeout
        self._max_response_bytes = max_response_bytes
        host = _host(addr)
        self._unattested_url = f"http://{host}:{unattested_port}"
        self._attested_url = f"https://{host}:{attested_port}"
        self._management_url = f"https://{host}:{management_port}"
        if failover_retries < 0:
            raise ValueError(f"failover_retries: got {failover_retries}, expected >= 0")
        self._failover_retries = failover_retries
        self.reattestations = 0
        """How many times this connection attested a server again after losing one."""
        self._settings = (api_key, simulation, policy, now, trust, collateral)
        self._simulated_default = simulated_default
        self._attest()

    def _attest(self) -> None:
        """Steps 1-5, at connection and again after a lost connection (whichever replica answers
        must prove itself: nothing is sent on the strength of an earlier verification)."""
        api_key, simulation, policy, now, trust, collateral = self._settings
        # Compressed answers could expand past any size limit before they are counted.
        headers = {"user-agent": f"veil-python/{__version__}", "accept-encoding": "identity"}
        # Step 1 runs over plain HTTP to a server not yet verified: no API key there.
        certificate, quote, served, server, key_map = self._fetch_evidence(
            headers, with_collateral=wants_server_collateral(collateral)
        )
        if api_key is not None:
            headers[API_KEY_HEADER] = api_key
        # Step 2: a mock server is refused before any verification unless asked for.
        mock = "mock" in server.lower()
        if mock and not simulation:
            raise AttestationError(
                f"the server is simulated (Server: {server!r}): it runs in no TEE; "
                "connect with simulation=True only for development"
            )
        if simulation and mock:
            trust = TrustStore.simulated_only()
        elif trust is None:
            trust = TrustStore.production()
        # Step 3: evidence, collateral (the server's, the services', or a bundle) and policy.
        chosen = own_collateral(collateral, quote, lambda: served)
        try:
            verified = verify_evidence(quote, chosen, policy=policy, trust=trust, now=now)
        except PolicyError as exc:
            if self._simulated_default and "mr_enclave" in str(exc):
                raise PolicyError(_simulated_mismatch(str(exc), server)) from None
            raise
        # Step 4: the evidence must bind the certificate the server showed us, and its key map.
        self.key_map: KeyMap = check_binding(verified.report_data, certificate, key_map)
        """The server's other public keys (receipt key…), vouched for by the evidence."""
        self.verified: VerifiedEvidence = verified
        """The verified evidence of the server (measurements, TCB status, report data)."""
        # Kept for receipts: a proof file embeds the evidence and collateral as verified here.
        self._evidence, self._collateral, self._key_map_encoded = quote, chosen, key_map
        self._receipt_key = self.key_map.get(RECEIPT_KEY)
        if self._receipt_key is not None:
            headers[_RECEIPT_KEY_HEADER] = self._receipt_key.hex()
        self.certificate_der = certificate
        # Step 5: channels that trust only the attested certificate.
        try:
            context = pinned_client_context(certificate)
        except ssl.SSLError:
            raise BindingError("the bound server certificate is not a usable certificate") from None
        previous: HttpClient | None = getattr(self, "_client", None)
        self._client = HttpClient(context=context, server_name=SERVER_NAME, headers=headers)
        if previous is not None:
            previous.close()
        try:
            self._call_once("GET", f"{self._attested_url}/")
        except BaseException:
            self._client.close()
            raise

    def _fetch_evidence(
        self, headers: Mapping[str, str], *, with_collateral: bool
    ) -> tuple[bytes, bytes, Any, str, bytes | None]:
        """Step 1: certificate, quote, collateral (an empty map without), the Server header and
        the encoded key map (None from servers that serve none)."""
        plain = HttpClient(headers=headers)
        try:

            def get(path: str, *, optional: bool = False) -> tuple[bytes, str] | None:
                """(body, Server header); each fetch within `timeout` and the size limit.
                None for a 404 on an `optional` path."""
                url = f"{self._unattested_url}{path}"
                try:
                    status, answer, body = plain.request(
                        "GET", url, timeout=self._total, max_body=MAX_EVIDENCE_RESPONSE_BYTES
                    )
                except ResponseError as exc:
                    # What a TLS port answers to plain HTTP: often the attested port given as
                    # the unattested one.
                    raise TransportError(
                        f"{exc} (is {self._unattested_url.rsplit(':', 1)[1]} the server's "
                        "unattested plain-HTTP port? "
                        "the attested and management ports speak TLS; see unattested_port=)"
                    ) from None
                if optional and status == 404:
                    return None
                if status >= 400:
                    raise EvidenceUnavailableError(f"{url}: status {status}")
                return body, answer.get("server", "")

            def decode(response: tuple[bytes, str] | None, kind: type, what: str) -> Any:
                if response is None:
                    raise EvidenceUnavailableError(f"{what}: not served")
                try:
                    value = wire.decode_reply(response[0], what)
                except ApiError:
                    raise EvidenceUnavailableError(f"{what}: malformed CBOR") from None
                if not isinstance(value, kind):
                    raise EvidenceUnavailableError(
                        f"{what}: got {type(value).__name__}, expected {kind.__name__}"
                    )
                return value

            first = get("/")
            server = first[1] if first is not None else ""
            certificate = decode(first, bytes, "certificate")
            quote = decode(get("/quote"), bytes, "quote")
            collateral = decode(get("/collateral"), dict, "collateral") if with_collateral else {}
            # BlindAI and older veil servers serve no key map: step 4 then wants zeros.
            served_keys = get("/keys", optional=True)
            key_map = None if served_keys is None else decode(served_keys, bytes, "key map")
        finally:
            plain.close()
        return certificate, quote, collateral, server, key_map

    def _request(
        self,
        method: str,
        url: str,
        body: Body = None,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        *,
        idempotent: bool = False,
    ) -> bytes:
        return self._call(method, url, body, timeout, headers, idempotent=idempotent)[0]

    def _call(
        self,
        method: str,
        url: str,
        body: Body = None,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        *,
        idempotent: bool = False,
    ) -> tuple[bytes, Headers]:
        """One call, (body, response headers).

        A call refused at the TLS handshake because the server shows another certificate than
        the attested one (a key rotation, another replica), or refused before any work because
        the server's receipt key is not the attested one (421), had no effect: it is sent again
        after attesting the server anew. An `idempotent` call (predict, list) whose connection
        was lost is sent again the same way. Both up to `failover_retries` times with bounded
        backoff, if the body can be produced again; a non-idempotent call (an upload, a delete)
        whose connection was lost is never sent twice.
        """
        attempt = 0
        while True:
            try:
                return self._call_once(method, url, body, timeout, headers)
            except (TransportError, BindingError) as exc:
                # Refused at the handshake, or (421) before any work: nothing was done.
                unsent = isinstance(exc, BindingError)
                replayable = body is None or isinstance(body, bytes) or callable(body)
                if not (idempotent or unsent) or not replayable:
                    raise
                if attempt >= self._failover_retries:
                    raise
                cause: VeilError = exc
            # Outside the except block: the first failure is not chained to the next.
            while attempt < self._failover_retries:
                time.sleep(failover_delay(attempt))
                attempt += 1
                try:
                    self._attest()
                    self.reattestations += 1
                    break
                # Nobody answers yet, or the server rotated its keys between the fetches of
                # its certificate and its evidence: attest again (every check runs again).
                except (TransportError, BindingError) as exc:
                    cause = exc
            else:
                raise cause

    def _call_once(
        self,
        method: str,
        url: str,
        body: Body = None,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[bytes, Headers]:
        """One call, (body, response headers); a busy refusal (503 + ``Retry-After``) is
        retried if the body can be sent again."""
        attempt = 0
        while True:
            try:
                return self._request_once(method, url, body, timeout, headers)
            except ServiceUnavailableError as exc:
                replayable = body is None or isinstance(body, bytes)
                delay = busy_retry_delay(
                    attempt, exc.retry_after, self._busy_retries, self._busy_retry_max_delay
                )
                if delay is None or not replayable:
                    raise
                time.sleep(delay)
                attempt += 1

    def _request_once(
        self,
        method: str,
        url: str,
        body: Body = None,
        timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[bytes, Headers]:
        status, answer, content = self._exchange(method, url, body, timeout, headers)
        if status == 421:
            # Refused before any work: the server's keys are not the ones attested here.
            raise BindingError(f"{url}: {wire.decode_error(content)}; attest the server again")
        if status >= 400:
            error = api_error_for_status(status, wire.decode_error(content))
            if isinstance(error, ServiceUnavailableError):
                error.retry_after = _retry_after(answer.get("retry-after"))
            raise error
        return content, answer

    def forward(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Headers, bytes]:
        """Send one HTTP request on the attested channel and return the answer as it is.

        For `veil proxy`, which relays the Open Inference Protocol: (status, headers, body),
        error statuses included; the connection's API key, deadline and response cap apply.

        Raises:
            BindingError: the server presents another certificate than the attested one (the
                request was not sent: the TLS handshake failed).
            TransportError: the network failed.
        """
        if not path.startswith("/"):
            raise ValueError(f"path: got {path[:40]!r}, expected one starting with '/'")
        return self._exchange(method, f"{self._attested_url}{path}", body, None, headers)

    def _exchange(
        self,
        method: str,
        url: str,
        body: Body,
        timeout: float | None,
        headers: Mapping[str, str] | None,
    ) -> tuple[int, Headers, bytes]:
        try:
            return self._client.request(
                method,
                url,
                body=body() if callable(body) else body,
                headers=headers,
                timeout=self._total if timeout is None else timeout,
                max_body=self._max_response_bytes,
            )
        except BindingError as exc:
            raise BindingError(f"{exc}: the server's certificate is not the attested one") from None

    # ---- receipts ---------------------------------------------------------------------------

    def _receipt_headers(self, receipt: bool) -> dict[str, str] | None:
        if not receipt:
            return None
        if self._receipt_key is None:
            raise ReceiptError("the server's evidence binds no receipt key: it issues no receipts")
        return {_RECEIPT_HEADER: "1"}

    def _check_receipt(
        self,
        headers: Headers,
        op: str,
        *,
        model_id: str | None,
        model_hash: bytes | None,
        inputs: bytes | None = None,
        outputs: bytes | None = None,
    ) -> Receipt:
        """The receipt of the call just made, checked against what was sent and received."""
        value = headers.get(_RECEIPT_HEADER)
        if value is None or self._receipt_key is None:
            raise ReceiptError("the server answered without the receipt asked for")
        message, head, path = decode_bundle(value)
        payload, tree = check_receipt(
            message, head, path, public_key=self._receipt_key, evidence=self._evidence
        )
        for name, got, expected in (
            ("op", payload.op, op),
            ("model_id", payload.model_id, model_id),
            ("model_hash", payload.model_hash, model_hash),
            ("inputs", payload.inputs, inputs),
            ("outputs", payload.outputs, outputs),
        ):
            if expected is not None and got != expected:
                raise ReceiptError(
                    f"receipt.{name}: got {_shown(got)}, expected {_shown(expected)}"
                )
        return Receipt(
            payload=payload,
            tree_head=tree,
            message=message,
            head=head,
            path=path,
            evidence=self._evidence,
            certificate_der=self.certificate_der,
            key_map=self._key_map_encoded or EMPTY_KEY_MAP.encoded,
            collateral=self._collateral,
        )

    def log_head(self) -> SignedTreeHead:
        """The server's current signed log head, verified with the bound receipt key; keep it
        (``.save(path)``) to check later that the log was never rewritten (`check_consistency`).
        """
        if self._receipt_key is None:
            raise ReceiptError("the server's evidence binds no receipt key: it keeps no log")
        reply = wire.decode_reply(self._request("GET", f"{self._attested_url}/log/head"), "log")
        head = reply.get("head") if isinstance(reply, dict) else None
        if not isinstance(head, bytes):
            raise ReceiptError("log head: malformed reply")
        return SignedTreeHead.verify(head, self._receipt_key)

    def _log_path(self, query: str) -> list[bytes]:
        reply = wire.decode_reply(self._request("GET", f"{self._attested_url}/log/{query}"), "log")
        path = reply.get("path") if isinstance(reply, dict) else None
        if not isinstance(path, list) or not all(isinstance(p, bytes) for p in path):
            raise ReceiptError("log proof: malformed reply")
        return path

    def check_consistency(self, older: TreeHead) -> SignedTreeHead:
        """The current log head, after checking it extends `older` (a head kept earlier).

        Raises:
            LogError: the log was rewritten (or shrank) since `older`.
        """
        newer = self.log_head()
        if older.size > newer.head.size:
            raise LogError(
                f"consistency: the log has {newer.head.size} entries, fewer than the "
                f"{older.size} of the head kept: it was cut"
            )
        path = self._log_path(f"consistency?first={older.size}&second={newer.head.size}")
        verify_consistency(older.size, newer.head.size, older.root, newer.head.root, path)
        return newer

    def prove_inclusion(self, receipt: Receipt, head: SignedTreeHead) -> Receipt:
        """`receipt` with its inclusion proof moved to `head` (a later head of this server),
        e.g. one an auditor keeps for ``veil verify-receipt --log-head``.

        The receipt stays checked with its own key (bound by the evidence it embeds); `head`
        with the key this connection attested, which differs from it after a key rotation or
        a restart: such a proof then verifies against that head kept (``--log-head``), not on
        its own.

        Raises:
            LogError: the log at `head` does not hold the receipt.
        """
        if self._receipt_key is None:
            raise ReceiptError("the server's evidence binds no receipt key")
        own_key = KeyMap.decode(receipt.key_map).get(RECEIPT_KEY)
        if own_key is None:
            raise ReceiptError("receipt: its key map holds no receipt key")
        size = head.head.size
        path = self._log_path(f"inclusion?index={receipt.payload.seq}&size={size}")
        payload, tree = check_receipt(
            receipt.message,
            head.message,
            path,
            public_key=own_key,
            evidence=receipt.evidence,
            head_key=self._receipt_key,
        )
        return dataclasses.replace(
            receipt, payload=payload, tree_head=tree, head=head.message, path=tuple(path)
        )

    # ---- models -----------------------------------------------------------------------------

    def upload_model(
        self,
        model: str | os.PathLike[str] | bytes | Any,
        *,
        model_id: str | None = None,
        model_name: str | None = None,
        visibility: str | None = None,
        allowed_keys: list[str] | tuple[str, ...] | None = None,
        receipt: bool = False,
        progress: bool | Progress = False,
        optimization: str | None = None,
    ) -> UploadResponse:
        """Send an ONNX model over the attested channel (needs an ``owner`` or ``admin`` key).

        Args:
            model: a path to an ``.onnx`` file, the model's bytes, or an ``onnx.ModelProto``.
            model_id: the id to run it by (veil extension); the server picks one if None.
            model_name: a label kept with the model (default: the file name).
            visibility: who may run it (veil extension): ``"public"`` (any valid key) or
                ``"restricted"`` (the uploading key and `allowed_keys`). None: the server's
                default, restricted when it asks for keys, public when it runs ``--no-auth``.
            allowed_keys: key ids (the 16 hex digits after ``veil_``) that may run a restricted
                model besides the uploader; giving them implies ``"restricted"``.
            receipt: ask for a signed receipt of the upload (`UploadResponse.receipt`).
            progress: ``True`` for a progress bar on stderr when it is a terminal, or a
                callable called with (bytes sent, total bytes) as the model is sent.
            optimization: (veil extension) ``"graph"``: serve a graph-optimized copy if its
                outputs match and it is not slower; ``"int8"``: serve an int8-quantized copy
                (outputs change: the reply's `UploadResponse.optimization` says by how much);
                ``"off"``; None: the server's default.

        Raises:
            ConflictError: `model_id` is taken. BadRequestError: not a model the server can load.
            AuthenticationError: no or an invalid API key. PermissionDeniedError: a ``user`` key.
        """
        path: Path | None = None
        data: bytes | bytearray | memoryview = b""
        if isinstance(model, str | os.PathLike):
            path = Path(model)
            size = path.stat().st_size
            model_name = model_name if model_name is not None else path.name
        elif isinstance(model, bytes | bytearray | memoryview):
            data = memoryview(model).cast("B")
            size = len(data)
        elif hasattr(model, "SerializeToString"):
            data = model.SerializeToString()
            size = len(data)
        else:
            raise TypeError(
                f"model: got {type(model).__name__}, expected a path, bytes or onnx.ModelProto"
            )
        if visibility is not None and visibility not in ("public", "restricted"):
            raise ValueError(f"visibility: got {visibility!r}, expected 'public' or 'restricted'")
        head = wire.encode_upload_head(
            size,
            model_name=model_name or "",
            model_id=model_id,
            client_info=_CLIENT_INFO,
            visibility=visibility,
            allowed_keys=allowed_keys,
            optimization=optimization,
        )
        digest = hashlib.sha256()
        whole_body_produced = False
        deadline = time.monotonic() + self._upload_total

        def body(report: Progress) -> Iterator[bytes]:
            # The fields, then the model in pieces: a file is never read whole. Made again for
            # a second attempt (one refused at the handshake), whose digest starts over.
            nonlocal digest, whole_body_produced
            digest = hashlib.sha256()
            whole_body_produced = False
            yield head
            sent = 0
            if path is None:
                view = memoryview(data)
                for start in range(0, size, _UPLOAD_CHUNK):
                    copied = bytes(view[start : start + _UPLOAD_CHUNK])
                    digest.update(copied)
                    yield copied
                    sent += len(copied)
                    report(sent, size)
                whole_body_produced = True
                return
            with path.open("rb") as f:
                while sent < size:
                    piece = f.read(min(_UPLOAD_CHUNK, size - sent))
                    if not piece:
                        raise TransportError(f"{path}: the file shrank while it was sent")
                    digest.update(piece)
                    sent += len(piece)
                    yield piece
                    report(sent, size)
            whole_body_produced = True

        url = f"{self._management_url}/upload"
        request_headers = {"content-length": str(len(head) + size)}
        request_headers.update(self._receipt_headers(receipt) or {})
        with upload_progress(
            progress, size, f"upload {model_name or model_id or 'model'}"
        ) as report:
            try:
                reply, reply_headers = self._call(
                    "POST",
                    url,
                    functools.partial(body, report),
                    self._upload_total,
                    headers=request_headers,
                )
            except TransportError as exc:
                # Never sent twice: the server may have stored it before the answer was lost.
                # With an id to look for, ask whichever server now answers (attested anew).
                if model_id is None or receipt:
                    raise
                landed = None
                if whole_body_produced:  # else the server cannot have it
                    landed = self._find_upload(model_id, digest.digest(), size, deadline)
                if landed is None:
                    raise TransportError(
                        f"{exc}; model {model_id!r} is not on the server (if it was still being "
                        "admitted it may appear later: look with list_models() before sending "
                        "it again)"
                    ) from None
                return landed
        got_id, got_hash = wire.decode_upload_reply(reply)
        expected = digest.digest()
        if got_hash != expected:
            raise ApiError(200, f"upload: server hash {got_hash.hex()}, expected {expected.hex()}")
        signed = None
        if receipt:
            signed = self._check_receipt(
                reply_headers, "upload", model_id=got_id, model_hash=expected
            )
        return UploadResponse(
            model_id=got_id,
            hash=got_hash,
            receipt=signed,
            optimization=wire.decode_upload_optimization(reply),
        )

    def _find_upload(
        self, model_id: str, expected: bytes, size: int, deadline: float
    ) -> UploadResponse | None:
        """After a lost upload answer: the upload, if `model_id` names exactly these bytes.

        The server may still be admitting the model when the first look finds nothing, so the
        id is looked up until it appears, holds other bytes, `LOST_UPLOAD_LOOKUP_S` or the
        upload's own `deadline` (monotonic clock) have passed, or the server could not be
        reached `failover_retries` times in a row (it is gone, and the upload with it).
        """
        attempt, attested, unreachable = 0, False, 0
        until = min(deadline, time.monotonic() + LOST_UPLOAD_LOOKUP_S)
        while (
            self._failover_retries
            and unreachable < self._failover_retries
            and (attempt < self._failover_retries or time.monotonic() < until)
        ):
            time.sleep(failover_delay(attempt))
            attempt += 1
            try:
                if not attested:  # whichever server now answers, attested anew
                    self._attest()
                    self.reattestations += 1
                    attested = True
                listed = self.list_models()
            except TransportError:
                attested = False
                unreachable += 1
                continue
            unreachable = 0
            # Ids belong to their owners: an admin key lists every tenant's model of that id.
            # (No owner: a server with authentication off, which ignores the key.)
            api_key = self._settings[0]
            owner = api_key.split("_")[1] if api_key and api_key.count("_") == 2 else None
            for info in listed:
                if info.model_id == model_id and info.owner in (owner, None):
                    if info.hash == expected and info.size == size:
                        return UploadResponse(model_id=model_id, hash=expected)
                    return None  # the id holds other bytes: this upload was refused
        return None

    def predict(
        self,
        model_id: str,
        inputs: Any,
        *,
        dtype: Any = None,
        shape: Any = None,
        receipt: bool = False,
    ) -> PredictResponse:
        """Run a model on `inputs` inside the TEE.

        Args:
            model_id: the model's id.
            inputs: a numpy array, a torch tensor, a flat list (with `dtype` and `shape`), a
                list of those (fed to the model's inputs in order), or a dict by input name.
            dtype, shape: for flat lists: the element type and dimensions (one, or one per input).
            receipt: ask for a signed receipt (`PredictResponse.receipt`), checked before this
                returns: signature, bound key, the digests of these inputs and the outputs.

        Raises:
            TensorError: an input cannot be encoded. NotFoundError: no such model.
            BadRequestError: the inputs do not fit the model (type, shape, count).
            ReceiptError: a receipt was asked for and does not verify.
        """
        return self._run(model_id, None, inputs, dtype, shape, receipt)

    def run_model(
        self,
        model_id: str = "",
        model_hash: str = "",
        input_tensors: Any = None,
        dtypes: Any = None,
        shapes: Any = None,
    ) -> PredictResponse:
        """BlindAI's name for `predict`; also finds the model by its hex SHA-256 hash."""
        if bool(model_id) == bool(model_hash):
            raise ValueError("give exactly one of model_id and model_hash")
        return self._run(model_id or None, model_hash or None, input_tensors, dtypes, shapes)

    def _run(
        self,
        model_id: str | None,
        model_hash: str | None,
        inputs: Any,
        dtype: Any,
        shape: Any,
        receipt: bool = False,
    ) -> PredictResponse:
        tensors = encode_inputs(inputs, dtype=dtype, shape=shape)
        body = wire.encode_run_request(
            model_id=model_id, model_hash=model_hash, inputs=tensors, client_info=_CLIENT_INFO
        )
        reply, headers = self._call(
            "POST",
            f"{self._attested_url}/run",
            body,
            headers=self._receipt_headers(receipt),
            idempotent=True,
        )
        outputs = wire.decode_run_reply(reply)
        signed = None
        if receipt:
            signed = self._check_receipt(
                headers,
                "predict",
                model_id=model_id,
                model_hash=bytes.fromhex(model_hash) if model_hash else None,
                inputs=tensors_digest(tensors),
                outputs=tensors_digest(outputs),
            )
        return PredictResponse([Tensor.from_wire(t) for t in outputs], receipt=signed)

    def delete_model(self, model_id: str, *, receipt: bool = False) -> Receipt | None:
        """Delete a model from the server (its uploader's key or an admin key); with `receipt`,
        return the signed receipt of the deletion.

        Raises NotFoundError if it has no such model (or none this key may see),
        PermissionDeniedError if this key may not delete it.
        """
        _, headers = self._call(
            "POST",
            f"{self._management_url}/delete",
            wire.encode_delete_request(model_id),
            headers=self._receipt_headers(receipt),
        )
        if not receipt:
            return None
        return self._check_receipt(headers, "delete", model_id=model_id, model_hash=None)

    def list_models(self) -> list[ModelInfo]:
        """The models this key manages (veil extension): its own uploads; an admin's: all."""
        reply = self._request("GET", f"{self._management_url}/models", idempotent=True)
        items = wire.decode_reply(reply, "model list")
        try:
            return [
                ModelInfo(
                    model_id=item["model_id"],
                    model_name=item["model_name"],
                    hash=item["hash"],
                    size=item["size"],
                    inputs=tuple(item["inputs"]),
                    outputs=tuple(item["outputs"]),
                    owner=item.get("owner"),
                    visibility=item.get("visibility", "public"),
                    created_at=_opt_time(item.get("created_at")),
                )
                for item in items
            ]
        except (KeyError, TypeError, ValueError):
            raise ApiError(200, "model list: malformed reply") from None

    # ---- keys (admin keys only; veil extension) -------------------------------------------

    def create_key(self, role: str, name: str | None = None) -> tuple[ApiKeyInfo, str]:
        """Have the server create an API key; return its record and its secret.

        The secret is shown this once: the server keeps only its hash.

        Args:
            role: ``admin``, ``owner`` or ``user``.
            name: a label (at most 200 printable characters), e.g. the account it belongs to.
        """
        reply = self._request(
            "POST",
            f"{self._management_url}/admin/keys",
            admin_wire.encode_create_key_request(role, name),
        )
        item = wire.decode_reply(reply, "created key")
        try:
            return ApiKeyInfo.from_wire(item), str(item["key"])
        except (KeyError, TypeError, ValueError):
            raise ApiError(200, "created key: malformed reply") from None

    def list_keys(self) -> list[ApiKeyInfo]:
        """Every key of the server, revoked ones included (never a secret)."""
        items = wire.decode_reply(
            self._request("GET", f"{self._management_url}/admin/keys"), "key list"
        )
        try:
            return [ApiKeyInfo.from_wire(item) for item in items]
        except (KeyError, TypeError, ValueError):
            raise ApiError(200, "key list: malformed reply") from None

    def revoke_key(self, key_id: str) -> None:
        """Revoke a key (idempotent); NotFoundError for an unknown id."""
        self._request(
            "POST",
            f"{self._management_url}/admin/keys/revoke",
            admin_wire.encode_revoke_key_request(key_id),
        )

    def rotate_keys(self) -> int:
        """Have the server make new TLS and receipt keys and new evidence binding them (admin
        keys only); returns the new generation (1 after the first rotation since start).

        This connection, like every other client's, attests the new keys on its next request.

        Raises:
            PermissionDeniedError: not an admin key. ConflictError: the server cannot rotate
                alone (it joined a cluster).
        """
        reply = wire.decode_reply(
            self._request("POST", f"{self._management_url}/admin/rotate-keys", b""), "rotation"
        )
        generation = reply.get("generation") if isinstance(reply, dict) else None
        if not isinstance(generation, int):
            raise ApiError(200, "rotation: malformed reply")
        return generation

    # ---- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection's sockets."""
        self._client.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Connection({self._attested_url}, verified={self.verified!r})"


def connect(addr: str | None = None, **kwargs: Any) -> Connection:
    """Connect to a server and verify it; same arguments as `Connection`.

    With no address, the configured default server (``VEIL_SERVER``; `veil.client.defaults`).

    Example::

        with veil.connect("127.0.0.1", simulation=True) as client:   # development only
            client.upload_model("model.onnx", model_id="my-model")
            print(client.predict("my-model", x).output[0].as_numpy())
    """
    return Connection(addr, **kwargs)
