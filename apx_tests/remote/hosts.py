"""`--apx-host` values: ``user@host[:port]`` (``user@[v6addr]:port`` for IPv6)."""

from __future__ import annotations

import getpass
import re
from dataclasses import dataclass

DEFAULT_PORT = 22

_SPEC = re.compile(r"^(?:(?P<user>[^@\s]+)@)?(?:\[(?P<v6>[0-9A-Fa-f:.%\w]+)\]|(?P<host>[^:@\s\[\]]+))"
                   r"(?::(?P<port>\d+))?$")


class HostSpecError(ValueError):
    """A host spec that cannot be parsed; str() is one line."""


@dataclass(frozen=True)
class HostSpec:
    user: str
    host: str
    port: int = DEFAULT_PORT

    @property
    def label(self) -> str:
        """How messages and item ids name the host: always with user and port."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"

    @property
    def title(self) -> str:
        """How summaries name this member of a fleet (a labgrid place adds its name)."""
        return self.label

    @property
    def prefix(self) -> str:
        """The start of every one-line error about this host."""
        return f"apx-host {self.label}"

    @property
    def item_tag(self) -> str:
        """The part of a remote item's id before the case id."""
        return f"remote[{self.label}]"

    def junit_properties(self) -> list[tuple[str, str]]:
        """Extra JUnit properties of this host's items (a labgrid place names itself)."""
        return []

    @property
    def known_hosts_name(self) -> str:
        """The name OpenSSH's known_hosts uses: `host`, or `[host]:port` off port 22."""
        return self.host if self.port == DEFAULT_PORT else f"[{self.host}]:{self.port}"

    def __str__(self) -> str:
        return self.label


def parse_host(text: str) -> HostSpec:
    match = _SPEC.match(text.strip())
    if not match:
        raise HostSpecError(f"--apx-host {text!r}: expected USER@HOST[:PORT]")
    port = int(match["port"]) if match["port"] else DEFAULT_PORT
    if not 0 < port < 65536:
        raise HostSpecError(f"--apx-host {text!r}: port {port} out of range")
    user = match["user"] or getpass.getuser()
    return HostSpec(user, match["v6"] or match["host"], port)


def parse_hosts(texts) -> list[HostSpec]:
    """Parse and de-duplicate (a host given twice is an error, not two fleet members)."""
    hosts: list[HostSpec] = []
    for text in texts:
        spec = parse_host(text)
        if spec in hosts:
            raise HostSpecError(f"--apx-host {spec.label} given twice")
        hosts.append(spec)
    return hosts
