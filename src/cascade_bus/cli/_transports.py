"""Which URL schemes are installed, which class serves each, and which package provides it."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points

import cascade_bus
from cascade_bus import available_transports
from cascade_bus._registry import ENTRY_POINT_GROUP, KNOWN_PACKAGES

__all__ = ["TransportInfo", "installed_transports", "missing_packages"]


@dataclass(frozen=True)
class TransportInfo:
    """One usable scheme: its transport class (``module:Class``) and distribution."""

    scheme: str
    target: str
    package: str
    version: str | None


def installed_transports() -> list[TransportInfo]:
    """Every usable scheme, from `cascade_bus.available_transports` and the entry points."""
    points = {ep.name.lower(): ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    found: list[TransportInfo] = []
    for scheme, target in available_transports().items():
        ep = points.get(scheme)
        # Once imported, a scheme's target names the class's own module (pkg._impl:Class).
        same = ep is not None and target.startswith(ep.value.split(":")[0].split(".")[0])
        dist = ep.dist if ep is not None and same else None
        if dist is not None:
            package, version = dist.name, dist.version
        elif target.split(".")[0].split(":")[0] == "cascade_bus":
            package, version = "cascade-bus", cascade_bus.__version__
        else:  # registered at run time by some module
            package, version = KNOWN_PACKAGES.get(scheme, target.split(".")[0].split(":")[0]), None
        found.append(TransportInfo(scheme, target, package, version))
    return found


def missing_packages() -> dict[str, list[str]]:
    """First-party transport packages that are not installed, with the schemes they provide.

    A scheme listed as usable is never missing (``redis+cluster://`` comes with
    ``cascade-bus-redis``; its ``[cluster]`` extra is checked when it is used).
    """
    usable = {info.scheme for info in installed_transports()}
    missing: dict[str, list[str]] = {}
    for scheme, package in KNOWN_PACKAGES.items():
        if scheme not in usable:
            missing.setdefault(package, []).append(scheme)
    return missing
