"""The IPv4 address this node gives Ray and vLLM (`--node-ip-address`, VLLM_HOST_IP). Left to
themselves they pick whatever interface they find first, and a node registered under an address the
others cannot reach is the classic multi-node hang. Chosen from cluster.yaml `interface:` when set,
else the source address of the route toward the head.

    python -m clusterctl.deploy.node_ip [--interface IFACE] --toward HOST --nodes N
"""
from __future__ import annotations

import argparse
import fcntl
import ipaddress
import socket
import struct
import sys

from clusterctl.errors import UserError

_SIOCGIFADDR = 0x8915


def interface_address(name: str) -> str:
    """IPv4 address of a network interface (ioctl SIOCGIFADDR)."""
    names = [entry[1] for entry in socket.if_nameindex()]
    if name not in names:
        raise UserError(f"network interface {name!r} does not exist on {socket.gethostname()}",
                        where="cluster.yaml: interface", fix=f"use one of: {', '.join(names)}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            raise UserError(f"network interface {name!r} has no IPv4 address on {socket.gethostname()}",
                            where="cluster.yaml: interface", fix="name an interface with an IPv4 address") from None
    return socket.inet_ntoa(packed[20:24])


def route_source(host: str) -> str:
    """The local address the kernel would use to reach `host` (a UDP connect sends nothing)."""
    try:
        target = socket.gethostbyname(host)
    except OSError as error:
        raise UserError(f"cannot resolve the head node {host!r} on {socket.gethostname()}: {error}",
                        fix="make the head's host name resolvable on every node (DNS or /etc/hosts)") from None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((target, 9))
        except OSError as error:
            raise UserError(f"no route from {socket.gethostname()} to the head node {host} ({target}): {error}",
                            where="cluster.yaml: interface", fix="set interface: to the NIC that reaches the head") from None
        return sock.getsockname()[0]


def _names_loopback(host: str) -> bool:
    """True for "localhost" or a loopback literal: every node on this one machine (the local backend).
    A host *name* that resolves to loopback here (Debian maps its own name to 127.0.1.1) is a trap."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def node_ip(*, interface: str, toward: str, nodes: int) -> str:
    if interface:
        return interface_address(interface)
    address = route_source(toward)
    if nodes > 1 and ipaddress.ip_address(address).is_loopback and not _names_loopback(toward):
        raise UserError(f"{toward} resolves to a loopback address on this node ({address}), which the other "
                        "nodes cannot reach", where="cluster.yaml: interface",
                        fix="set interface: to the NIC the nodes share (e.g. eth0, ib0)")
    return address


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clusterctl.deploy.node_ip", description=__doc__.split("\n")[0])
    parser.add_argument("--interface", default="")
    parser.add_argument("--toward", required=True, help="the head node's host name or address")
    parser.add_argument("--nodes", type=int, default=1)
    options = parser.parse_args(argv)
    try:
        print(node_ip(interface=options.interface, toward=options.toward, nodes=options.nodes))
    except UserError as error:
        print(f"node_ip: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
