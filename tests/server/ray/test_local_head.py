"""The Ray head `elasticserve serve --replicas N` starts listens on the loopback address only."""

from __future__ import annotations

import ipaddress

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'elasticserve[ray]'")
psutil = pytest.importorskip("psutil")

from elasticserve.server.ray.serve import init_local_ray  # noqa: E402

pytestmark = pytest.mark.ray


def _loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1
    return address.is_loopback


def test_the_local_ray_head_listens_on_loopback_only():
    if ray.is_initialized():
        ray.shutdown()
    init_local_ray(num_cpus=1)
    try:
        assert ray.get(ray.put(41)) + 1 == 42  # a working head, workers and object store
        me = psutil.Process()
        processes = {p.pid: p for p in [me, *me.children(recursive=True)]}
        listening = [
            (processes[c.pid].name(), c.laddr.ip, c.laddr.port)
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in processes
        ]
        names = {name for name, _, _ in listening}
        assert {"gcs_server", "raylet"} <= names, listening  # Ray's own servers were seen
        exposed = [entry for entry in listening if not _loopback(entry[1])]
        assert exposed == [], exposed
    finally:
        ray.shutdown()
