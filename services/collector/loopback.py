"""Which pod a packet captured on a pod's own loopback belongs to, carried as the batch's node.

Inside a pod's network namespace, `lo` carries the plaintext between a service mesh's sidecar
and the app (and anything else the pod's containers say to each other): addresses 127.0.0.x
and ::1, which name no pod. The collector knows the namespace it entered, and the address the
pod has there (its interfaces other than `lo`); it publishes that capture point's batches
with `node` set to `<node>/<pod address>`. The node is the dissector's domain of addresses
(flows are keyed by node, sequences and losses counted per node), so the loopback of each pod
is dissected apart from the host's and from the other pods' (their 127.0.0.1 flows would
otherwise mix), and the calls carry the mark to the enricher, which names their loopback
endpoints as the pod at that address and gives the call its node back (trawl.enricher.identity;
trawl/_calljson.c's Splicer does the same on serialized calls). A Kubernetes node name is a DNS
subdomain, so it never holds the '/'.
"""

from __future__ import annotations

SEPARATOR = "/"


def loopback_node(node: str, pod_address: str) -> str:
    """The node of the batches captured on the loopback of the pod at `pod_address`."""
    return f"{node}{SEPARATOR}{pod_address}"


def split_node(node: str) -> tuple[str, str]:
    """(node, pod address) of a call's node; the address is "" for a call not captured on a pod's loopback."""
    node, _, pod_address = node.partition(SEPARATOR)
    return node, pod_address


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8 and ::1, written as the dissector writes addresses."""
    return ip.startswith("127.") or ip == "::1"
