"""What a process tries to reach on the network, seen by strace: every connect() of it and its children.

A process that "phones home" first resolves a name: a UDP connect() to the resolver's port 53. strace sees the
call whatever library makes it (C++ telemetry senders included), which Python's audit hooks do not.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
from pathlib import Path

_CONNECT = re.compile(
    r"connect\(\d+, \{sa_family=AF_INET6?, \w+_port=htons\((?P<port>\d+)\),"
    r".*?(?:inet_addr\(\"(?P<v4>[^\"]+)\"\)|inet_pton\(AF_INET6, \"(?P<v6>[^\"]+)\")"
)


def traced(command: list[str], trace: Path) -> list[str]:
    """``command`` run under strace, which writes every connect() of it and its children to ``trace``."""
    strace = shutil.which("strace")
    assert strace, "these tests watch the network with strace (Debian: apt-get install strace)"
    return [strace, "-f", "--seccomp-bpf", "-qq", "-e", "trace=connect", "-o", str(trace), *command]


def outbound_connects(trace: Path) -> list[str]:
    """The strace lines of ``trace`` that leave this machine: an IP address other than loopback, or a name lookup
    (port 53) wherever the resolver is."""
    found = []
    for line in trace.read_text().splitlines():
        match = _CONNECT.search(line)
        if match is None:
            continue
        address = ipaddress.ip_address(match["v4"] or match["v6"])
        mapped = getattr(address, "ipv4_mapped", None)
        local = (mapped or address).is_loopback or address.is_unspecified
        if int(match["port"]) == 53 or not local:
            found.append(line.strip())
    return found
