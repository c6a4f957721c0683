"""veil's test bed: vendor-shaped PKIs, evidence signers, collateral services. NOT production.

Nothing in this package is trusted by production code. It exists so that tests, demos and
development can run veil's *unmodified* verifier, providers and collateral clients against
evidence and collateral that look exactly like Intel's and AMD's, signed by roots generated at run
time (or, for the simulated platform, by veil's public simulated root):

- `veil.testing.intel_pki`: an Intel-shaped DCAP PKI (Root CA, PCK Platform/Processor CA, PCK
  leaves with the SGX extensions, TCB Signing, CRLs), TCB info v3 and QE identity v2, and SGX v3 /
  TDX v4 quotes;
- `veil.testing.amd_pki`: an AMD-shaped PKI (ARK, ASK, ASVK, VCEK, VLEK, the KDS CRL) and an
  SEV-SNP attestation report signer;
- `veil.testing.services`: loopback HTTP stand-ins for Intel PCS/PCCS v4 and AMD KDS, with fault
  knobs (down, slow, 404, stale, foreign) for tests;
- `veil.testing.devices`: the Linux configfs-tsm tree (TDX, SEV-SNP) and Gramine's
  ``/dev/attestation`` (SGX), answered as the kernel and Gramine do, with those signers behind;
- `veil.testing.emulated`: ``python -m veil.testing.emulated serve ...`` runs the production
  ``veil serve`` on those devices.

A client accepts this evidence only through ``TrustStore.hazmat_test_roots(...)``, which warns:
never do it outside tests. Nothing here is imported by the server or the client.
"""
