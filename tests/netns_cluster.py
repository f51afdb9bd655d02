"""A Ray cluster of several nodes on this one machine, each node in its own network namespace
(`ip netns`), joined by a bridge in a hub namespace over veth pairs with private addresses that
only these namespaces have (10.77.0.0/24). Nothing touches the machine's own network: the host
namespace gains no interface and no address, and every command that talks to the cluster runs
inside one of the namespaces (`ip netns exec`)."""

from __future__ import annotations

import os
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
    r = subprocess.run(["ip", "-n", name, "link", "add", "probe0", "type", "veth", "peer",
                        "name", "probe1"], capture_output=True, text=True)  # fmt: skip
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    if r.returncode != 0:
        return f"veth pairs cannot be made in a network namespace here: {r.stderr.strip()}"
    return ""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class NetnsCluster:
    """Namespaces named <prefix><node>; node i has address 10.77.0.<i+1> on its eth0."""

    def __init__(self, bin_dir: Path, temp_dir: Path, env: dict[str, str]):
        self.prefix = f"rs{os.getpid() % 100000}"
        self.bin, self.temp, self.env = bin_dir, temp_dir, env
        self.nodes: dict[str, str] = {}  # node name -> address
        self.hub = self.prefix + "hub"
        ip("netns", "add", self.hub)
        ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        ip("-n", self.hub, "link", "set", "br0", "up")

    def ns(self, node: str) -> str:
        return self.prefix + node

    def add_node(self, node: str) -> str:
        ns, address = self.ns(node), f"{SUBNET}.{len(self.nodes) + 1}"
        ip("netns", "add", ns)
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
        r = subprocess.run(["ip", "netns", "pids", self.ns(node)], capture_output=True,
                           text=True)  # fmt: skip
        return [int(p) for p in r.stdout.split()]

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
        for node in self.nodes:
            for pid in self.pids(node):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.5)
        for ns in [*map(self.ns, self.nodes), self.hub]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
