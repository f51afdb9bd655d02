"""What a tree of processes listens on, read from /proc (Linux): TCP sockets in LISTEN and
unconnected bound UDP sockets, attributed to the processes that hold them (their file
descriptors), so that other programs on the machine do not count."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path
from typing import NamedTuple


class Listener(NamedTuple):
    kind: str  # tcp, tcp6, udp, udp6
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    pid: int
    name: str  # the process's comm, e.g. raylet, ray::RayTrainWo

    @property
    def loopback(self) -> bool:
        mapped = getattr(self.address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
        return self.address.is_loopback or bool(mapped and mapped.is_loopback)


def process_tree(root: int) -> set[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo += children.get(pid, [])
    return tree


def _address(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """/proc/net/tcp's `0100007F:1F90`: 32-bit words in host byte order, then the port."""
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(raw), int(port, 16)


def listeners(pids: set[int]) -> list[Listener]:
    """Every listening socket held by one of `pids`."""
    owner: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    owner[link[8:-1]] = pid
        except OSError:  # the process ended, or a descriptor closed while read
            continue
    found = []
    for kind in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{kind}").read_text().splitlines()[1:]:
            fields = line.split()
            state, inode = fields[3], fields[9]
            listens = state == "0A" if kind.startswith("tcp") else state == "07"
            if listens and inode in owner:
                address, port = _address(fields[1])
                pid = owner[inode]
                try:
                    name = Path(f"/proc/{pid}/comm").read_text().strip()
                except OSError:
                    name = "?"
                found.append(Listener(kind, address, port, pid, name))
    return found
