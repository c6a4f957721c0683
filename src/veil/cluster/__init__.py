"""Clusters: the key broker (`veil broker`) and replicas that join it (`veil serve --join`).

See `veil.cluster.exchange` for the protocol and the trust argument.
"""

from veil.cluster.exchange import ClusterSecrets, own_measurement_policy, verifier

__all__ = ["ClusterSecrets", "own_measurement_policy", "verifier"]
