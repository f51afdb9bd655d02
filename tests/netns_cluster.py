"""A Ray cluster of several nodes on this one machine, each node in its own network namespace
(`ip netns`), joined by a bridge in a hub namespace over veth pairs with private addresses that
only these namespaces have (10.77.0.0/24). Nothing touches the machine's own network: the host
namespace gains no interface and no address, and every command that talks to the cluster runs
inside one of the namespaces (`ip netns exec`)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

SUBNET = "10.77.0"


def unavailable() -> str:
    """Why network namespaces cannot be made here, or "" when they can."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces (`ip netns add`) needs root"
    name = f"rsprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` is not permitted here: {r.stderr.strip()}"
    try:
        for what, cmd in [
            ("veth pairs", ["ip", "-n", name, "link", "add", "p0", "type", "veth", "peer", "p1"]),
            ("bridges", ["ip", "-n", name, "link", "add", "b0", "type", "bridge"]),
            ("`ip netns exec`", ["ip", "netns", "exec", name, "true"]),
        ]:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                return f"{what} cannot be made or used in a network namespace here: {r.stderr}"
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ""


def remove_leftovers() -> None:
    """Namespaces of an earlier test process that was killed before it cleaned up (its pid is
    gone): kill what still runs in them, then remove them."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        found = re.match(r"rs(\d+)n-\w+", line.split()[0]) if line.split() else None
        if found and not Path(f"/proc/{found.group(1)}").exists():
            _kill_all(line.split()[0])
            subprocess.run(["ip", "netns", "del", line.split()[0]], capture_output=True)


def _pids(ns: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


def _kill_all(ns: str, seconds: float = 15) -> None:
    """SIGKILL every process in the namespace until none is left (a dying raylet may still
    start one)."""
    deadline = time.monotonic() + seconds
    while (pids := _pids(ns)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class NetnsCluster:
    """Namespaces named <prefix><node>; node i has address 10.77.0.<i+1> on its eth0."""

    def __init__(self, bin_dir: Path, temp_dir: Path, env: dict[str, str]):
        self.prefix = f"rs{os.getpid()}n-"  # remove_leftovers() reads the pid back
        self.bin, self.temp, self.env = bin_dir, temp_dir, env
        self.nodes: dict[str, str] = {}  # node name -> address
        self.made: list[str] = []  # namespaces to remove, in the order they were made
        self.hub = self.prefix + "hub"

    def start_hub(self) -> None:
        """The bridge every node's veth joins, in a namespace of its own."""
        ip("netns", "add", self.hub)
        self.made.append(self.hub)
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")

    def ns(self, node: str) -> str:
        return self.prefix + node

    def add_node(self, node: str) -> str:
        if not self.made:
            self.start_hub()
        ns, address = self.ns(node), f"{SUBNET}.{len(self.nodes) + 1}"
        ip("netns", "add", ns)
        self.made.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", self.hub, "link", "add", f"v{node}", "type", "veth", "peer", "name", "eth0",
           "netns", ns)  # fmt: skip
        ip("-n", self.hub, "link", "set", f"v{node}", "master", "br0")
        ip("-n", self.hub, "link", "set", f"v{node}", "up")
        ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        self.nodes[node] = address
        return address

    def run(
        self,
        node: str,
        *cmd: str,
        timeout: float = 180,
        check: bool = True,
        cwd: Path | None = None,
        extra_env: dict | None = None,
    ) -> subprocess.CompletedProcess:
        """`cmd` inside the node's namespace, with the cluster's environment (+ extra_env)."""
        env = {**self.env, **(extra_env or {})}
        r = subprocess.run(["ip", "netns", "exec", self.ns(node), *cmd], env=env, cwd=cwd,
                           capture_output=True, text=True, timeout=timeout)  # fmt: skip
        assert not check or r.returncode == 0, (cmd, r.stdout[-3000:], r.stderr[-3000:])
        return r

    def start_head(self, node: str, *options: str) -> str:
        address = self.add_node(node)
        self.run(node, str(self.bin / "ray"), "start", "--head", f"--node-ip-address={address}",
                 "--port=6379", f"--dashboard-host={address}", "--dashboard-port=8265",
                 f"--temp-dir={self.temp}", "--disable-usage-stats", *options)  # fmt: skip
        self.head = address
        return address

    def start_worker(self, node: str, *options: str) -> str:
        address = self.add_node(node)
        self.run(node, str(self.bin / "ray"), "start", f"--address={self.head}:6379",
                 f"--node-ip-address={address}", "--disable-usage-stats", *options)  # fmt: skip
        return address

    def pids(self, node: str) -> list[int]:
        return _pids(self.ns(node))

    def kill(self, node: str, process: str) -> int:
        """SIGKILL the node's process named `process` (e.g. raylet); its pid."""
        for pid in self.pids(node):
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == process:
                    os.kill(pid, signal.SIGKILL)
                    return pid
            except (FileNotFoundError, ProcessLookupError):
                continue
        raise AssertionError(f"no {process} process in namespace {self.ns(node)}")

    def close(self) -> None:
        """Kill every process left in the namespaces, then remove them (veths go with them)."""
        for ns in reversed(self.made):
            _kill_all(ns)
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
