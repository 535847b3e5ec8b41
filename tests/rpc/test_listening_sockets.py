"""Nothing listens off loopback: every TCP socket that the server, its engine-core process and
its EP ranks listen on (gRPC, the metrics endpoint, torch's rendezvous store, gloo) is bound to
127.0.0.1 or ::1 under the default config, read from the kernel's socket tables. The store used
to listen on `*:<port>`, unauthenticated. A remote master address must be asked for."""
from __future__ import annotations

import os

import pytest

from server.config import AppConfig, ConfigError
from server.worker import rendezvous
from tests.helpers.process_sockets import process_tree, tree_listeners
from tests.helpers.server_process import ServerProcess
from tests.rpc.test_server_faults import engine_core_process, spawned_children


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads /proc/net/tcp (Linux)")
def test_every_listener_of_the_ep2_process_tree_is_on_loopback(tmp_path):
    with ServerProcess(tmp_path, "parallel=ep2", metrics=True) as srv:
        core = engine_core_process(srv.proc.pid)
        [rank1] = spawned_children(srv.proc.pid)
        listeners = tree_listeners(srv.proc.pid)
        print("listening:", {pid: [f"{a}:{p}" for a, p in held] for pid, held in listeners.items()})
        assert set(listeners) <= set(process_tree(srv.proc.pid))
        everything = [(pid, address, port) for pid, held in listeners.items() for address, port in held]
        assert everything and all(address.is_loopback for _, address, _ in everything), everything
        front_end_ports = {port for address, port in listeners.get(srv.proc.pid, [])}
        assert {srv.port, srv.metrics_port} <= front_end_ports
        assert core in listeners and rank1 in listeners  # rank 0's store and gloo; rank 1's gloo


def test_a_remote_master_address_needs_allow_remote():
    with pytest.raises(ConfigError, match=r"parallel.master_addr='10.1.2.3'.*no authentication.*allow_remote"):
        AppConfig.from_dict({"parallel": {"master_addr": "10.1.2.3"}})
    AppConfig.from_dict({"parallel": {"master_addr": "10.1.2.3"}, "server": {"allow_remote": True}})
    AppConfig.from_dict({"parallel": {"master_addr": "::1"}})


def test_loopback_master_pins_gloo_and_nccl_to_the_loopback_interface(monkeypatch):
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")  # the operator's choice stays
    rendezvous.pin_interfaces_to_loopback("10.1.2.3")
    assert "GLOO_SOCKET_IFNAME" not in os.environ
    rendezvous.pin_interfaces_to_loopback("127.0.0.1")
    assert os.environ["GLOO_SOCKET_IFNAME"] == rendezvous.loopback_interface()
    assert os.environ["NCCL_SOCKET_IFNAME"] == "ib0"
    if os.path.exists("/sys/class/net/lo"):
        assert rendezvous.loopback_interface() == "lo"
