"""veil's test bed: vendor-shaped PKIs, evidence signers, collateral services. NOT production.

Nothing in this package is trusted by production code. It exists so that tests, demos and
development can run veil's *unmodified* verifier, providers and collateral clients against
evidence and collateral that look exactly like Intel's and AMD's, signed by roots generated at run
time (or, for the simulated platform, by veil's public simulated root):

- `veil.testing.intel_pki`: an Intel-shaped DCAP PKI (Root CA, PCK Platform/Processor CA, PCK
  leaves with the SGX extensions, TCB Signing, CRLs), TCB info v3 and QE identity v2, and SGX v3 /
  TDX v4 and v5 quotes, laid out by `veil.testing.dcap_quote`;
- `veil.testing.amd_pki`: an AMD-shaped PKI (ARK, ASK, ASVK, VCEK, VLEK, the KDS CRL) and an
  SEV-SNP attestation report signer;
- `veil.testing.services`: loopback HTTP stand-ins for Intel PCS/PCCS v4 and AMD KDS, with fault
  knobs (down, slow, 404, stale, foreign) for tests;
- `veil.testing.devices`: the Linux configfs-tsm tree (TDX, SEV-SNP) and Gramine's
  ``/dev/attestation`` (SGX), answered as the kernel and Gramine do, with those signers behind;
- `veil.testing.emulated`: ``python -m veil.testing.emulated serve ...`` runs the production
  ``veil serve`` on those devices (`veil.testing.state` describes the emulated machine);
- `veil.testing.sigstruct`: SGX SIGSTRUCTs signed as ``gramine-sgx-sign`` signs them, for
  `veil policy from-sigstruct` tests;
- `veil.testing.local_server`: ``veil serve --platform simulated`` in a subprocess, for
  ``veil demo``, the documentation's examples and tests.

A client accepts this evidence only through ``TrustStore.hazmat_test_roots(...)``, which warns:
never do it outside tests. The server and the client import nothing from here, except that veil's
simulated platform (`veil.providers.simulated`) issues its evidence with `intel_pki` under its own
public root.

Example (an SGX quote, and its collateral fetched from the PCCS stand-in by veil's own client)::

    from datetime import UTC, datetime
    from veil.attestation.policy import Policy, SgxPolicy
    from veil.attestation.trust import TrustStore
    from veil.attestation.verifier import verify_evidence
    from veil.providers.pcs import pcs_collateral_fetcher
    from veil.testing.intel_pki import IntelPki
    from veil.testing.services import PccsService

    now = datetime.now(UTC)
    pki = IntelPki(now=now, seed=b"example")
    sgx = pki.sgx_platform()
    quote = sgx.quote(b"report data", mr_enclave=bytes(32))
    with PccsService(pki, [sgx], clock=lambda: now) as pccs:
        collateral = pcs_collateral_fetcher(pccs.url)(quote)
    policy = Policy(sgx=SgxPolicy(mr_enclave=(bytes(32),)))
    trust = TrustStore.hazmat_test_roots(intel_root=pki.root)  # warns: test roots
    verify_evidence(quote, collateral, policy=policy, trust=trust, now=now)
"""
