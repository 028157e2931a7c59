"""The collector's TLS uprobe helpers that need no BPF: which TCP connection a fd is (real
sockets on loopback, read back through this process's /proc), which TLS libraries a process
maps (this process maps the system libssl through Python's ssl module), and the settings."""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from trawl.collector.tls_settings import TlsUprobeSettings
from trawl.collector.tls_sockets import Endpoints, SocketResolver, hex_address, parse_proc_net_tcp
from trawl.collector.tls_targets import libssl_paths, pod_name, pod_uid, scan, scan_process


def test_proc_net_addresses() -> None:
    assert hex_address("0100007F:1F90") == ("127.0.0.1", 8080)
    assert hex_address("00000000000000000000000001000000:0050") == ("::1", 80)
    # ::ffff:10.1.2.3, as an IPv6 socket's table shows an IPv4 peer: given as IPv4.
    assert hex_address("0000000000000000FFFF00000302010A:01BB") == ("10.1.2.3", 443)
    with pytest.raises(ValueError, match="ADDR:PORT"):
        hex_address("7F000001")


def connected_pair(family: socket.AddressFamily, host: str) -> Iterator[tuple[socket.socket, socket.socket]]:
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind((host, 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname()[:2])
    server, _ = listener.accept()
    listener.close()
    try:
        yield client, server
    finally:
        client.close()
        server.close()


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_a_fd_resolves_to_its_connection(family: socket.AddressFamily, host: str) -> None:
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    for client, server in connected_pair(family, host):
        resolver = SocketResolver()
        for sock in (client, server):
            local, remote = sock.getsockname(), sock.getpeername()
            assert resolver.resolve(os.getpid(), sock.fileno()) == Endpoints(local[0], local[1], remote[0], remote[1])
        assert resolver.lookups == 2
        resolver.resolve(os.getpid(), client.fileno())
        assert resolver.lookups == 2  # cached
        resolver.forget(os.getpid(), client.fileno())
        resolver.resolve(os.getpid(), client.fileno())
        assert resolver.lookups == 3


def test_a_fd_that_is_no_tcp_socket_resolves_to_nothing(tmp_path: Path) -> None:
    resolver = SocketResolver()
    with (tmp_path / "f").open("w") as handle:
        assert resolver.resolve(os.getpid(), handle.fileno()) is None
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with udp:
        assert resolver.resolve(os.getpid(), udp.fileno()) is None
    assert resolver.resolve(2**22 + 7, 3) is None  # no such process


def test_the_proc_table_parser_takes_listening_and_connected_sockets() -> None:
    for client, _server in connected_pair(socket.AF_INET, "127.0.0.1"):
        sockets = parse_proc_net_tcp(Path(f"/proc/{os.getpid()}/net/tcp").read_text())
        inode = os.fstat(client.fileno()).st_ino
        ends, state = sockets[inode]
        assert (ends.local_port, ends.remote_port) == (client.getsockname()[1], client.getpeername()[1])
        assert state == 1  # ESTABLISHED


def test_this_process_maps_the_system_libssl() -> None:
    assert ssl.OPENSSL_VERSION  # the module is loaded, with the shared library it links
    paths = libssl_paths(Path("/proc/self/maps").read_text())
    assert any(path.rsplit("/", 1)[-1].startswith("libssl.so") for path in paths), paths
    libraries: dict[tuple[int, int], object] = {}
    scan_process(Path("/proc"), os.getpid(), libraries)  # type: ignore[arg-type]
    assert libraries
    library = next(iter(libraries.values()))
    assert os.getpid() in library.pids  # type: ignore[attr-defined]
    assert library.reachable.startswith(f"/proc/{os.getpid()}/root/")  # type: ignore[attr-defined]
    everyone = scan(exclude=frozenset({os.getpid()}))
    assert all(os.getpid() not in found.pids for found in everyone.values())


def test_maps_lines_that_are_not_executable_or_deleted_are_skipped() -> None:
    text = "\n".join(
        [
            "7f00-7f10 r--p 00000000 08:01 11 /usr/lib/x86_64-linux-gnu/libssl.so.3",
            "7f10-7f20 r-xp 00010000 08:01 11 /usr/lib/x86_64-linux-gnu/libssl.so.3",
            "7f20-7f30 r-xp 00010000 08:01 12 /opt/app/libssl.so.1.1 (deleted)",
            "7f30-7f40 r-xp 00010000 08:01 13 /opt/app/libsslx.so",
            "7f40-7f50 r-xp 00010000 08:01 14 /opt/boring/libssl.so",
            "7f50-7f60 r-xp 00010000 08:01 15 /venv/grpc/_cython/cygrpc.cpython-311-x86_64-linux-gnu.so",
            "7f60-7f70 r-xp 00010000 08:01 16 /venv/grpc/_cython/other.cpython-311-x86_64-linux-gnu.so",
        ]
    )
    assert libssl_paths(text) == {
        "/usr/lib/x86_64-linux-gnu/libssl.so.3",
        "/opt/boring/libssl.so",
        "/venv/grpc/_cython/cygrpc.cpython-311-x86_64-linux-gnu.so",
    }


def test_settings_bound_what_the_verifier_needs() -> None:
    assert TlsUprobeSettings().mode == "off"
    with pytest.raises(ValidationError, match="power of two"):
        TlsUprobeSettings(chunk_bytes=3000)
    with pytest.raises(ValidationError, match="power of two"):
        TlsUprobeSettings(ring_pages=100)


def test_the_pod_of_a_process_comes_from_its_cgroup(tmp_path: Path) -> None:
    uid = "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"
    cgroups = {
        1: f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid.replace('-', '_')}.slice/"
        "cri-containerd-abc.scope\n",
        2: f"12:memory:/kubepods/besteffort/pod{uid}/0123456789abcdef\n0::/\n",
        3: "0::/system.slice/sshd.service\n",
    }
    for pid, text in cgroups.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cgroup").write_text(text)
    assert [pod_uid(tmp_path, pid) for pid in (1, 2, 3, 4)] == [uid, uid, "", ""]


def test_the_pod_name_is_the_hostname_the_kubelet_gave_its_containers(tmp_path: Path) -> None:
    """Read through /proc/<pid>/root (a stand-in tree here): only for a process in a pod, and only
    a name the kubelet could have written."""
    uid = "0f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b"
    in_pod = f"0::/kubepods/burstable/pod{uid}/0123456789abcdef\n"
    trees = {
        1: (in_pod, "web-7d4b9c-x2x9z\n"),
        2: ("0::/system.slice/sshd.service\n", "node-1\n"),  # the host's own hostname: no pod
        3: (in_pod, "Not A Pod Name!\n"),
        4: (in_pod, None),  # no /etc/hostname in its root
    }
    for pid, (cgroup, hostname) in trees.items():
        etc = tmp_path / str(pid) / "root" / "etc"
        etc.mkdir(parents=True)
        (tmp_path / str(pid) / "cgroup").write_text(cgroup)
        if hostname is not None:
            (etc / "hostname").write_text(hostname)
    assert [pod_name(tmp_path, pid) for pid in (1, 2, 3, 4, 5)] == ["web-7d4b9c-x2x9z", "", "", "", ""]
