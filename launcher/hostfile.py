"""DeepSpeed hostfiles: ``<host> slots=<n>`` per line, ``#`` comments and blank lines ignored."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from llm_ds.config import UserError

# Host names as DNS names or IPv4/IPv6 addresses spell them: nothing a shell would interpret.
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._:-]*[A-Za-z0-9])?$")
_LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\S+)$")


class HostfileError(UserError, ValueError):
    """A hostfile that cannot be used; the message names the file, line and value."""


@dataclass(frozen=True)
class Host:
    name: str
    slots: int


def parse_hostfile_text(text: str, source: str = "hostfile") -> list[Host]:
    """Parse hostfile text, strictly: every problem is an error naming ``source:line``."""
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if not m:
            raise HostfileError(f"{source}:{lineno}: expected '<host> slots=<n>', got {line!r}")
        name, slots = m["host"], m["slots"]
        if not _HOST.match(name):
            raise HostfileError(f"{source}:{lineno}: host {name!r} is not a DNS name or IP address")
        if not slots.isdigit() or int(slots) == 0:
            raise HostfileError(f"{source}:{lineno}: slots={slots} for {name}; must be a whole number > 0")
        if name in seen:
            raise HostfileError(f"{source}:{lineno}: host {name!r} already listed on line {seen[name]}")
        seen[name] = lineno
        hosts.append(Host(name, int(slots)))
    if not hosts:
        raise HostfileError(f"{source}: no hosts")
    return hosts


def parse_hostfile(path: str | Path) -> list[Host]:
    path = Path(path)
    if not path.is_file():
        raise HostfileError(f"hostfile {path}: no such file")
    return parse_hostfile_text(path.read_text(encoding="utf-8"), str(path))
