"""A client on the far side of a real link: a network namespace joined to the host by a veth pair.

The pair's addresses come from a /30 inside 10.213.0.0/16, a private range that exists only in
this machine's own namespaces, so no packet leaves the machine. ``blackhole()`` makes the client's
side drop everything it sends (its ACKs included), which to the host looks exactly like a phone
that lost its network: no FIN, no RST, just silence.

``tc … netem loss 100%`` is the usual way; kernels built without netem (this CI's) get a
``pfifo limit 0`` qdisc instead, which drops every packet at enqueue the same way.
Names carry the creating pid, so a run killed before its ``finally`` is cleaned up by the next.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from tests.conftest import require_binary

_PREFIX = "bzbho"


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=20)


@dataclass(frozen=True)
class VethLink:
    """``netns`` holds ``client_dev`` at ``client_ip``; the host holds ``host_dev`` at ``host_ip``."""

    ip: str
    tc: str
    netns: str
    host_dev: str
    client_dev: str
    host_ip: str
    client_ip: str

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the client's namespace."""
        return [self.ip, "netns", "exec", self.netns, *argv]

    def blackhole(self) -> str:
        """Drop every packet the client sends from now on; the qdisc used (netem or pfifo)."""
        base = [self.ip, "netns", "exec", self.netns, self.tc, "qdisc", "add", "dev", self.client_dev, "root"]
        if _run(*base, "netem", "loss", "100%", check=False).returncode == 0:
            return "netem loss 100%"
        _run(*base, "pfifo", "limit", "0")
        return "pfifo limit 0"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(ip: str) -> None:
    """Delete namespaces (and with them their veth pairs) left by test runs that no longer exist."""
    listing = _run(ip, "netns", "list", check=False).stdout
    for name in re.findall(rf"^({_PREFIX}(\d+))\b", listing, re.MULTILINE):
        if not _pid_alive(int(name[1])):
            _run(ip, "netns", "del", name[0], check=False)
            _run(ip, "link", "del", f"{name[0]}h", check=False)


@contextmanager
def veth_link() -> Iterator[VethLink]:
    """A fresh namespace + veth pair, removed afterwards however the test ends (root needed)."""
    ip = require_binary("ip", "/usr/sbin/ip", "/sbin/ip")
    tc = require_binary("tc", "/usr/sbin/tc", "/sbin/tc")
    if os.geteuid() != 0:
        message = "network namespaces need root (make test runs as root in CI)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    remove_stale(ip)
    pid = os.getpid()
    name = f"{_PREFIX}{pid}"
    third, fourth = divmod((pid % 16384) * 4, 256)
    host_ip, client_ip = f"10.213.{third}.{fourth + 1}", f"10.213.{third}.{fourth + 2}"
    link = VethLink(ip, tc, name, f"{name}h", f"{name}c", host_ip, client_ip)
    try:
        _run(ip, "netns", "add", name)
        _run(ip, "link", "add", link.host_dev, "type", "veth", "peer", "name", link.client_dev, "netns", name)
        _run(ip, "addr", "add", f"{host_ip}/30", "dev", link.host_dev)
        _run(ip, "link", "set", link.host_dev, "up")
        _run(ip, "-n", name, "addr", "add", f"{client_ip}/30", "dev", link.client_dev)
        _run(ip, "-n", name, "link", "set", link.client_dev, "up")
        _run(ip, "-n", name, "link", "set", "lo", "up")
        yield link
    finally:
        _run(ip, "netns", "del", name, check=False)
        _run(ip, "link", "del", link.host_dev, check=False)
