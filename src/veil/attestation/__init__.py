"""Verification of TEE evidence: parse (`abi`) → verify (`verify`) → validate (`policy`)."""
