"""``cascade-bus doctor``: connect, round-trip messages, and say in plain words what failed.

The checks run in order and stop at the first one the others depend on (a URL that does not
parse, a scheme nothing provides, a broker that cannot be reached). Each failure comes with a
hint: how to install the transport, how to start the broker, what to check in the URL.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cascade_bus import (
    Bus,
    BusError,
    BusURL,
    Capabilities,
    Envelope,
    InvalidURL,
    UnknownScheme,
    available_transports,
    get_transport,
)
from cascade_bus._install import install_command
from cascade_bus._registry import KNOWN_PACKAGES

from ._hints import connect_hint
from ._output import print_full, scrub
from ._runtime import open_bus, parse_url
from ._transports import installed_transports

__all__ = ["Check", "Report", "diagnose", "show_report"]

OK = "ok"
FAILED = "failed"
SKIPPED = "skipped"


@dataclass
class Check:
    """The outcome of one check, in plain words."""

    name: str
    status: str
    detail: str
    hint: str = ""


@dataclass
class Report:
    """Everything the doctor found out."""

    url: str
    checks: list[Check] = field(default_factory=list)
    capabilities: Capabilities | None = None
    capabilities_note: str = ""

    @property
    def failed(self) -> list[Check]:
        """The checks that failed."""
        return [c for c in self.checks if c.status == FAILED]

    def add(self, name: str, status: str, detail: str, hint: str = "") -> Check:
        """Record a check."""
        check = Check(name, status, " ".join(scrub(detail).split()), scrub(hint))
        self.checks.append(check)
        return check


def _masked(text: str) -> str:
    """The URL for display: redacted when it parses, else with any password masked."""
    try:
        return BusURL(text).redacted()
    except InvalidURL:
        return scrub(text)


def _scheme_hint(exc: UnknownScheme, url: BusURL) -> str:
    usable = available_transports()
    suggestion = exc.suggestion
    if exc.scheme in KNOWN_PACKAGES:  # a first-party scheme whose adapter is missing
        return f"install its adapter: {install_command(KNOWN_PACKAGES[exc.scheme])}"
    if suggestion is not None and suggestion in usable:
        return f"use {suggestion + url.redacted()[len(url.scheme) :]}"
    if suggestion is not None:
        package = KNOWN_PACKAGES.get(suggestion)
        how = install_command(package) if package else "install its adapter"
        return f"for {suggestion}://, {how}"
    return "`cascade-bus transports` lists the installed schemes"


def _elapsed_ms(start: float) -> str:
    return f"{(time.perf_counter() - start) * 1000:.1f} ms"


async def _round_trip(report: Report, bus: Bus, base: str, timeout: float) -> None:
    start = time.perf_counter()
    topic = f"{base}/ping"
    try:
        async with bus.subscribe(topic) as sub:
            await bus.publish(topic, {"ping": 1})
            env = await sub.get(timeout=timeout)
    except TimeoutError:
        report.add(
            "publish and subscribe",
            FAILED,
            f"published to {topic!r} but nothing came back within {timeout:g}s",
            "the broker accepted the connection but did not deliver; check its access rules "
            "(ACLs) for this topic",
        )
        return
    except BusError as exc:
        report.add("publish and subscribe", FAILED, str(exc))
        return
    if env.payload != {"ping": 1}:
        report.add("publish and subscribe", FAILED, f"got {env.payload!r} back, not what was sent")
        return
    report.add("publish and subscribe", OK, f"round trip on {topic} in {_elapsed_ms(start)}")


async def _retained(report: Report, bus: Bus, base: str, timeout: float) -> None:
    caps = bus.capabilities
    if not caps.retain:
        report.add("retained messages", SKIPPED, "this transport does not offer them")
        return
    topic = f"{base}/retained"
    start = time.perf_counter()
    try:
        # Nobody subscribes yet, so QoS 0: at QoS 1 some transports count "no subscriber".
        await bus.publish(topic, {"retained": True}, retain=True)
        try:
            async with bus.subscribe(topic) as sub:
                env = await sub.get(timeout=timeout)
        finally:
            await bus.publish(topic, b"", retain=True)  # leave nothing behind
    except TimeoutError:
        report.add(
            "retained messages",
            FAILED,
            f"a new subscriber to {topic!r} did not get the retained message within {timeout:g}s",
            "the broker may have retained messages disabled (Mosquitto: retain_available)",
        )
        return
    except BusError as exc:
        report.add("retained messages", FAILED, str(exc))
        return
    note = " (emulated by the adapter)" if caps.retain_emulated else ""
    report.add(
        "retained messages",
        OK if env.payload == {"retained": True} else FAILED,
        f"a late subscriber got it in {_elapsed_ms(start)}{note}",
    )


async def _request_reply(report: Report, bus: Bus, base: str, timeout: float) -> None:
    if not bus.capabilities.request_reply:
        report.add("request/reply", SKIPPED, "this transport does not offer it")
        return
    topic = f"{base}/echo"

    async def respond(env: Envelope[Any]) -> None:
        await bus.reply(env, {"echo": env.payload})

    start = time.perf_counter()
    try:
        async with bus.subscribe(topic, respond):
            reply = await bus.request(topic, {"n": 7}, timeout=timeout)
    except BusError as exc:
        report.add("request/reply", FAILED, str(exc))
        return
    ok = reply.payload == {"echo": {"n": 7}}
    report.add("request/reply", OK if ok else FAILED, f"answered in {_elapsed_ms(start)}")


async def diagnose(url_text: str, *, timeout: float) -> Report:
    """Run the checks against ``url_text``.

    Args:
        url_text: The bus URL as typed.
        timeout: Bound, in seconds, for connecting and for each round trip.
    """
    report = Report(_masked(url_text))
    try:
        url = parse_url(url_text)
    except InvalidURL as exc:
        report.add(
            "URL",
            FAILED,
            str(exc),
            "a bus URL looks like scheme://[user:password@]host[:port][/path][?option=value]",
        )
        return report
    report.add("URL", OK, url.redacted())

    try:
        cls = get_transport(url.scheme)
    except UnknownScheme as exc:
        report.add("transport", FAILED, str(exc), _scheme_hint(exc, url))
        return report
    info = next((i for i in installed_transports() if i.scheme == url.scheme), None)
    where = f"{cls.__module__}:{cls.__qualname__}"
    if info is not None:
        version = f" {info.version}" if info.version else ""
        where += f" from {info.package}{version}"
    report.add("transport", OK, f"{url.scheme}:// is served by {where}")
    report.capabilities = cls.capabilities
    report.capabilities_note = "declared by the transport class"

    try:
        bus = open_bus(url, connect_timeout=timeout)
    except InvalidURL as exc:
        report.add("options", FAILED, str(exc), "see the transport's documentation for options")
        return report
    report.capabilities = bus.capabilities
    start = time.perf_counter()
    try:
        await bus.open()
    except BusError as exc:  # ConnectError mostly; the hint probes the network: a thread
        hint = await asyncio.to_thread(connect_hint, url, str(exc))
        report.add("connect", FAILED, str(exc), hint)
        return report
    try:
        report.add("connect", OK, f"connected to {url.endpoint()} in {_elapsed_ms(start)}")
        report.capabilities = bus.capabilities
        report.capabilities_note = "of this connection"
        base = f"cascade-bus/doctor/{os.urandom(6).hex()}"
        await _round_trip(report, bus, base, timeout)
        await _retained(report, bus, base, timeout)
        await _request_reply(report, bus, base, timeout)
        await bus.flush(timeout)
    finally:
        await asyncio.shield(bus.close())
    stats = bus.stats()
    if stats.dropped_total:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(stats.dropped.items()))
        report.add("counters", FAILED, f"messages were dropped: {dropped}")
    else:
        report.add(
            "counters",
            OK,
            f"published {stats.published}, delivered {stats.delivered}, dropped 0",
        )
    return report


_STYLE = {OK: "green", FAILED: "bold red", SKIPPED: "dim"}


def _capability_rows(caps: Capabilities) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for name, value in msgspec.structs.asdict(caps).items():
        if name == "emulated":
            text = ", ".join(sorted(value)) or "-"
        elif name == "max_payload":
            text = "unbounded" if value is None else f"{value:,} bytes"
        elif isinstance(value, bool):
            text = "yes" if value else "no"
        else:
            text = str(value)
        rows.append((name, text))
    return rows


def show_report(console: Console, report: Report) -> None:
    """Print the checks and the capabilities as tables."""
    console.print(Text(f"cascade-bus doctor {report.url}"))
    checks = Table()
    checks.add_column("check", no_wrap=True)
    checks.add_column("result", no_wrap=True)
    checks.add_column("details", overflow="fold")
    for check in report.checks:
        detail = Text(check.detail)
        if check.hint:
            detail.append(f"\nhint: {check.hint}", "yellow")
        checks.add_row(check.name, Text(check.status, _STYLE[check.status]), detail)
    print_full(console, checks)
    if report.capabilities is not None:
        console.print(Text(f"capabilities ({report.capabilities_note})"))
        caps = Table()
        caps.add_column("feature", no_wrap=True)
        caps.add_column("value")
        for name, text in _capability_rows(report.capabilities):
            caps.add_row(name, text)
        print_full(console, caps)
