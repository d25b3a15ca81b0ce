"""Keep a Serve replica's inter-deployment gRPC server on loopback when the Ray node itself is on loopback.

Why: Ray Serve 2.60 starts that server in every replica on ``[::]:0`` (``ServeReplica._on_initialized`` in
``ray/serve/_private/replica.py``; the address is not configurable), i.e. on every interface of the machine, even
when the cluster was started on 127.0.0.1 only. The server starts after the deployment's constructor, so a
constructor can swap the address first. Other replicas reach it at the node's address, which is 127.0.0.1 on such a
cluster, so nothing changes for them. On a multi-node cluster (node address not loopback) nothing is touched.
"""

from __future__ import annotations

import ipaddress

_MARK = "_reasonembed_loopback"


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def keep_replica_grpc_on_loopback() -> bool:
    """Patch this replica process so its gRPC server binds 127.0.0.1 instead of ``[::]``; True when patched.

    Idempotent; a no-op outside a loopback-only node or when Ray's replica module no longer has the hook."""
    import ray
    from ray.serve._private import replica as replica_module

    original = getattr(replica_module, "add_port_to_grpc_server", None)
    if original is None:
        return False
    if getattr(original, _MARK, False):
        return True
    if not _is_loopback(ray.util.get_node_ip_address()):
        return False

    def bind_loopback(server, address: str):
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    setattr(bind_loopback, _MARK, True)
    replica_module.add_port_to_grpc_server = bind_loopback
    return True
