"""The console transcripts of the docs are run, and must print what the docs show.

A block is checked when the comment ``<!-- transcript: checked -->`` stands on the line above
its fence: each ``$ command`` line in it is run from the repository's root and its output
(stdout and stderr as they interleave) must be the lines below it, up to the next ``$``.
Only deterministic transcripts are marked (no timings, ids or dates). ``cascade-bus`` runs
this interpreter's CLI, ``pytest`` this interpreter's pytest; ``NAME=value`` words before the
program set environment variables. A pytest run's output is compared without what depends on
the test order or the machine (the order of the progress characters and of the skip reasons,
the source line of each skip, the duration). A mismatch prints the whole actual output, ready
to paste into the page.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MARK = "<!-- transcript: checked -->"
TIMEOUT = 120
# Wide enough that no table of the CLI wraps (rich reads COLUMNS when not on a terminal).
COLUMNS = "200"
# The address the CLI transcripts use for "nothing listens here".
CLOSED = ("127.0.0.1", 1884)
SHARED_MQTT = "mqtt://127.0.0.1:1883"


@dataclass(frozen=True)
class Step:
    """One ``$ command`` of a checked block and the output the page shows for it."""

    page: str
    line: int
    command: str
    expected: list[str]

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: $ {self.command}"


def checked_steps() -> list[Step]:
    """Every command of every checked block in docs/ and the README."""
    steps: list[Step] = []
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        lines = page.read_text().splitlines()
        name = str(page.relative_to(ROOT))
        for at, line in enumerate(lines):
            if line.strip() != MARK:
                continue
            fence = at + 1
            where = f"{name}:{at + 1}: {MARK}"
            assert fence < len(lines), f"{where} must stand right above a fenced block"
            assert lines[fence].startswith("```"), f"{where} must stand right above a fenced block"
            end = next(i for i in range(fence + 1, len(lines)) if lines[i].startswith("```"))
            body = lines[fence + 1 : end]
            assert body, f"{where}: the block is empty"
            assert body[0].startswith("$ "), f"{where}: the block does not start with a $ command"
            for i, text in enumerate(body):
                if text.startswith("$ "):
                    steps.append(Step(name, fence + 2 + i, text[2:], []))
                else:
                    steps[-1].expected.append(text)
    return steps


def argv_and_env(command: str) -> tuple[list[str], dict[str, str]]:
    """The command's argv with this interpreter for the program, and its environment."""
    words = shlex.split(command)
    env = {**os.environ, "COLUMNS": COLUMNS, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    env.pop("CASCADE_BUS_DEBUG", None)
    while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    program, *args = words
    programs = {
        "cascade-bus": [sys.executable, "-m", "cascade_bus.cli"],
        "pytest": [sys.executable, "-m", "pytest", "-p", "no:cacheprovider"],
        "python": [sys.executable],
    }
    assert program in programs, f"no way to run {program!r} here; add it to this test"
    return [*programs[program], *args], env


_PROGRESS = re.compile(r"^[.sxXFE]+\s+\[\s*\d+%\]$")
_SKIPPED = re.compile(r"^(SKIPPED \[\d+\]) \S+:\d+: (.*)$")
_DURATION = re.compile(r" in \d+(\.\d+)?s( \(\d+:\d+:\d+\))?$")


def pytest_comparable(lines: list[str]) -> list[str]:
    """A pytest run's lines without what depends on the order of the tests or the machine."""
    out: list[str] = []
    skipped: list[str] = []
    for line in lines:
        line = line.rstrip()
        if not line or re.fullmatch(r"=+ .* =+|=+", line):
            continue  # blank lines and banners ("short test summary info")
        if _PROGRESS.match(line):
            out.append("".join(sorted(line.split()[0])))
        elif match := _SKIPPED.match(line):
            skipped.append(f"{match[1]} {match[2]}")
        elif line.startswith("SKIPPED ["):
            skipped.append(line)
        else:
            out.append(_DURATION.sub("", line))
    return out + sorted(skipped)


def comparable(step: Step, lines: list[str]) -> list[str]:
    """The lines to compare: a pytest run's normalised, anything else with trailing spaces cut."""
    if " pytest " in f" {step.command} ":
        return pytest_comparable(lines)
    return [line.rstrip() for line in lines]


def listening(address: tuple[str, int]) -> bool:
    """Whether something accepts TCP connections at ``address``."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(address) == 0


STEPS = checked_steps()


def test_the_pages_have_checked_transcripts() -> None:
    pages = {step.page for step in STEPS}
    assert {"docs/cli.md", "docs/writing-a-transport.md"} <= pages


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("step", STEPS, ids=str)
def test_transcript(step: Step, request: pytest.FixtureRequest) -> None:
    if SHARED_MQTT.removeprefix("mqtt://") in step.command:
        # The CLI pages use the shared Mosquitto (skips, or fails in CI, without one).
        url = request.getfixturevalue("mqtt_url")
        if url.rstrip("/") != SHARED_MQTT:
            pytest.skip(f"the transcript needs the broker at {SHARED_MQTT}, not {url}")
    if f"{CLOSED[0]}:{CLOSED[1]}" in step.command and listening(CLOSED):
        pytest.skip(f"the transcript needs nothing listening on {CLOSED[0]}:{CLOSED[1]}")
    argv, env = argv_and_env(step.command)
    result = subprocess.run(
        argv,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    actual = result.stdout.splitlines()
    assert comparable(step, actual) == comparable(step, step.expected), (
        f"{step} prints something else now; its output:\n" + "\n".join(actual)
    )
