"""Firewall rules that keep a sandbox's network away from this host and from private ranges.

Each workspace gets bridges of its own (`workspace`: internal, `internet`: with a way out),
named `dy<instance><hash>` so one wildcard names every bridge of this instance. Docker alone
leaves two holes, both closed here with iptables rules in chains of this instance:

- INPUT: a packet from one of our bridges to an address of this host (any interface: the
  bridge's gateway, docker0's, the external one) is dropped unless it answers a connection the
  host opened. Docker routes an internal network's default route to the bridge's gateway,
  which is the host itself.
- FORWARD (Docker's DOCKER-USER chain): a packet from one of our bridges to a private,
  link-local, loopback, shared, multicast or reserved range (cloud metadata included) is
  dropped; traffic between two of our bridges is left to Docker, which drops it between
  different networks.

The rules are installed with the first networked sandbox (and at start when our networks
exist), and removed when the engine closes with none of its networks left; a host where they cannot be installed (no iptables, not root, Docker without iptables) refuses
`workspace` and `internet` sandboxes with the reason, and `doctor` says so. Networks are IPv4
only (Docker's default), so there is no IPv6 path to guard.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import anyio

from dockyard.runtime.substrate.errors import NetworkNotAllowedError

__all__ = ["NetworkGuard", "remove_rules"]

# Every range a sandbox on `internet` must not reach: RFC 1918, shared (CGNAT), loopback,
# link-local (cloud metadata), "this network", IETF/benchmark/documentation, multicast, reserved.
PRIVATE_RANGES = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
_DOCKER_CHAIN = "DOCKER-USER"


def _chains(instance: str) -> tuple[str, str]:
    return f"DOCKYARD-{instance[:10]}-IN", f"DOCKYARD-{instance[:10]}-FWD"


def bridge_prefix(instance: str) -> str:
    """What the name of every bridge of this instance starts with (an interface name has 15
    characters at most: 2 + 6 here, 7 for the network)."""
    return f"dy{instance[:6]}"


def _iptables(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["iptables", "-w", "5", *args], capture_output=True, text=True, timeout=30, check=False)


def remove_rules(instance: str) -> None:
    """Remove this instance's chains and the jumps into them (what is not there is skipped)."""
    inbound, forward = _chains(instance)
    wildcard = bridge_prefix(instance) + "+"
    if shutil.which("iptables") is None:
        return
    for parent, chain in (("INPUT", inbound), (_DOCKER_CHAIN, forward)):
        for _ in range(10):  # a jump added twice (two starts racing) goes too
            if _iptables("-D", parent, "-i", wildcard, "-j", chain).returncode != 0:
                break
        _iptables("-F", chain)
        _iptables("-X", chain)


def _install(instance: str) -> None:
    """Create (or refill) this instance's chains and jump into them from INPUT and DOCKER-USER."""
    if shutil.which("iptables") is None:
        raise OSError("the iptables command is not installed")
    if _iptables("-S", _DOCKER_CHAIN).returncode != 0:
        raise OSError(f"Docker's {_DOCKER_CHAIN} chain is missing (does the daemon run with iptables disabled?)")
    inbound, forward = _chains(instance)
    wildcard = bridge_prefix(instance) + "+"
    rules: list[list[str]] = [
        ["-A", inbound, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
        ["-A", inbound, "-j", "DROP"],
        ["-A", forward, "-o", wildcard, "-j", "RETURN"],
        *(["-A", forward, "-d", cidr, "-j", "DROP"] for cidr in PRIVATE_RANGES),
    ]
    for chain in (inbound, forward):
        _iptables("-N", chain)  # fails harmlessly when it exists; flushed next
        _check(_iptables("-F", chain))
    for rule in rules:
        _check(_iptables(*rule))
    for parent, chain in (("INPUT", inbound), (_DOCKER_CHAIN, forward)):
        if _iptables("-C", parent, "-i", wildcard, "-j", chain).returncode != 0:
            _check(_iptables("-I", parent, "1", "-i", wildcard, "-j", chain))


def _check(done: subprocess.CompletedProcess[str]) -> None:
    if done.returncode != 0:
        raise OSError(
            (done.stderr or done.stdout).strip().splitlines()[-1]
            if (done.stderr or done.stdout).strip()
            else "iptables failed"
        )


class NetworkGuard:
    """Installs this instance's network rules once, on first need, and removes them at close."""

    def __init__(self, instance: str) -> None:
        self._instance = instance
        self._lock = anyio.Lock()
        self._installed = False
        self.problem: str | None = None  # why the rules could not be installed, once tried

    def bridge_name(self, network: str) -> str:
        """The host interface name of one of this instance's networks."""
        return bridge_prefix(self._instance) + hashlib.sha256(network.encode()).hexdigest()[:7]

    async def ensure(self, mode: str) -> None:
        """Install the rules unless they are in place; refuse a networked sandbox without them."""
        async with self._lock:
            if not self._installed and self.problem is None:
                try:
                    await anyio.to_thread.run_sync(_install, self._instance)
                    self._installed = True
                except (OSError, subprocess.SubprocessError) as exc:
                    self.problem = str(exc) or type(exc).__name__
        if self.problem is not None:
            raise NetworkNotAllowedError(
                f"network '{mode}' needs firewall rules that keep sandboxes off this host and private ranges, "
                f"and they could not be installed ({self.problem}); run dockyard as root (or with CAP_NET_ADMIN) "
                "on a host with iptables, or use network 'none'"
            )

    async def close(self, networks_left: bool) -> None:
        """At shutdown: remove the rules unless a network of this instance is left (its
        sandboxes run on while the server is away, and stay guarded)."""
        if self._installed and not networks_left:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(remove_rules, self._instance)
            self._installed = False

    async def check(self) -> str:
        """For `doctor`: whether the rules are in force, or can be, on this host (changes nothing)."""

        def look() -> str:
            if shutil.which("iptables") is None:
                return "missing: the iptables command is not installed; workspace and internet networks are refused"
            docker_chain = _iptables("-S", _DOCKER_CHAIN)
            if docker_chain.returncode != 0:
                why = (docker_chain.stderr or docker_chain.stdout).strip()[-200:]
                return f"missing: iptables cannot read {_DOCKER_CHAIN} ({why}); workspace and internet networks are refused"
            if _iptables("-S", _chains(self._instance)[0]).returncode == 0:
                return "in force: this host and private ranges are dropped for workspace and internet networks"
            return "ready: installed with the first workspace or internet sandbox"

        return await anyio.to_thread.run_sync(look)
