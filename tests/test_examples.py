"""Every documentation example runs, prints what the docs say, and the demo works end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cascade_bus import demo

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
TIMEOUT = 30

# Example file -> text its output must contain (the docs rely on these results).
EXPECTED: dict[str, list[str]] = {
    "quickstart.py": ["sensors/kitchen/temperature {'celsius': 21.5}"],
    "competing_consumers.py": ["jobs per worker: {'worker-0': 3, 'worker-1': 3, 'worker-2': 3}"],
    "handlers.py": [
        "iterator got shop/orders/3 {'qty': 3}",
        "handler got ['shop/orders/1 qty=1', 'shop/orders/2 qty=2', 'shop/orders/3 qty=3']",
    ],
    "retained.py": [
        "pending after subscribe: 1",
        "retained: plant/boiler/setpoint {'celsius': 65}",
        "pending after clear: 0",
    ],
    "queue_groups.py": ["total 6", "logger saw: [0, 1, 2, 3, 4, 5]"],
    "request_reply.py": ["2 + 3 = 5", "no responder: no responder is subscribed to 'calc/divide'"],
    "typed.py": [
        "got Reading(sensor='a', celsius=20.5)",
        "the bad reading never reached the iterator",
        "does not match Reading",
        "dropped: {'decode_error': 1}",
    ],
    "errors.py": [
        "UnknownScheme: mqqt -> did you mean mqtt",
        "InvalidTopic: alerts/+",
        "PayloadTooLarge:",
        "on_error: RuntimeError: handler bug (topic alerts/disk)",
        "'handler_error': 1",
        "caught by the root: InvalidTopic",
    ],
    "envelope.py": [
        '"specversion":"1.0"',
        '"data":{"a":1}',
        "'subject': 'wire/json'",
        "round trip: {'a': 1}",
        "msgpack -> {'b': 2}",
        "bare json -> {'c': 3} ''",
        "bytes -> b'\\x00\\x01binary' application/octet-stream",
        "raw -> {'d': 4} 'docs/raw'",
    ],
    "connector.py": [
        "run-1 paused at start: True",
        "engine got cascade/constraints/run-1 {}",
        "run-1 paused now: False | failed publishes: 0",
    ],
    "connector_sync.py": ["received: ['pending', 'running']"],
    "topics.py": [
        "cascade/telemetry/+/+/+/events   matches ['cascade/telemetry/run-1/load/1/events']",
        "#                                matches ['cascade/telemetry/run-1/load/1/events', "
        "'cascade/constraints/run-1']",
        "'a//b'       rejected:",
        "'a/+/c'      rejected:",
    ],
    "custom_transport.py": [
        "loopback delivered: greetings/en {'text': 'hello'}",
        "request/reply works too: [1, 2, 3]",
        "refused, not ignored: the 'loopback' transport does not support retained messages",
    ],
    "middleware.py": [
        "  bus before invoices/1\n  subscription before invoices/1\n"
        "  handler got {'total': 42} from billing\n  subscription after\n  bus after",
        "  subscription saw PermissionError\n  bus saw PermissionError",
        "on_error: PermissionError: unsigned message",
        "stats: 1 delivered, dropped {'handler_error': 1}",
    ],
    "otel_tracing.py": [
        "handler sees traceparent: True",
        "span 'orders/42/created publish' kind=PRODUCER",
        "span 'orders/42/created process' kind=CONSUMER",
        "messaging.system: memory",
        "consumer's parent is the producer: True",
        "cascade_bus.delivered = 1\ncascade_bus.published = 1\nmessaging.process.duration = 1",
    ],
    "flow_control.py": [
        "drop_oldest: kept [5, 6, 7], dropped {'overflow': 5}",
        "drop_newest: kept [0, 1, 2], dropped {'overflow': 5}",
        "block: got [0, 1, 2, 3, 4, 5, 6, 7], at most 2 queued, dropped {}",
        "max_concurrency=4: 10 handled, at most 4 at once",
    ],
    "dead_letters.py": [
        "payment 1 charged at attempt 2",
        "on_error (after the last attempt): gateway timeout for payment 2",
        "dead letter: {'payment': 2}",
        "  x-death-attempts: 3\n  x-death-error: gateway timeout for payment 2\n"
        "  x-death-error-type: ConnectionError\n  x-death-topic: payments/new",
        "delivered 2, dead_lettered 1, dropped {}",
    ],
    "loss_ledger.py": [
        "published: 7\ndelivered: 1\ndropped closed: 1\ndropped decode_error: 1\n"
        "dropped handler_error: 1\ndropped overflow: 1\ndropped payload_too_large: 1\n"
        "dropped unsubscribed: 2",
        "errors reported: ['DecodeError', 'ValueError']",
        "7 published = 1 delivered + 6 lost, all counted",
        "still queued: 0, buffered: 0",
    ],
}
# pytest modules among the examples: run with pytest rather than as scripts.
PYTEST_EXAMPLES = ["test_broker_fixtures.py", "test_conformance.py", "test_faults.py"]
# Examples that need a broker: file -> (broker kind, expected output). They read the broker's URL
# from CASCADE_BUS_<KIND>_URL, which the test sets from the session fixture (skips without one).
BROKER_EXAMPLES: dict[str, tuple[str, list[str]]] = {
    "nats_quickstart.py": (
        "nats",
        [
            "retained before subscribe() returned: [{'paused': True}]",
            "telemetry: t1/1/events {'state': 'running'}",
        ],
    ),
    "network_transport.py": (
        "redis",
        ["resptoy delivered: toy/run-1/state {'state': 'running'}", "reconnects so far: 0"],
    ),
    "redis_quickstart.py": (
        "redis",
        [
            "retained before subscribe() returned: [{'paused': True}]",
            "telemetry: t1/1/events {'state': 'running'}",
        ],
    ),
    "mqtt_presence.py": (
        "mqtt",
        [
            "while connected: {'online': True, 'client_id': '<client_id>'}",
            "after close: {'online': False, 'client_id': '<client_id>'}",
            "late subscriber (retained): {'online': False, 'client_id': '<client_id>'}",
        ],
    ),
}


def _run(
    *args: str, timeout: float = TIMEOUT, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # Examples may import each other (test_conformance.py uses custom_transport.py).
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(EXAMPLES), os.environ.get("PYTHONPATH")])),
        **(extra_env or {}),
    }
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_every_example_is_checked() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts == set(EXPECTED) | set(PYTEST_EXAMPLES) | set(BROKER_EXAMPLES)


def test_every_example_is_in_the_docs() -> None:
    pages = "\n".join(p.read_text() for p in (ROOT / "docs").rglob("*.md"))
    missing = [
        name
        for name in sorted(EXPECTED) + PYTEST_EXAMPLES + sorted(BROKER_EXAMPLES)
        if f"docs/examples/{name}" not in pages
    ]
    assert not missing, f"examples not included in any page: {missing}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str) -> None:
    result = _run("-W", "error", str(EXAMPLES / name))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    for text in EXPECTED[name]:
        assert text in result.stdout, f"{text!r} not in the output of {name}:\n{result.stdout}"


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(name, marks=getattr(pytest.mark, BROKER_EXAMPLES[name][0]))
        for name in sorted(BROKER_EXAMPLES)
    ],
)
def test_broker_example_runs(name: str, request: pytest.FixtureRequest) -> None:
    kind, expected = BROKER_EXAMPLES[name]
    url = request.getfixturevalue(f"{kind}_url")  # skips (or fails in CI) without a broker
    env_var = f"CASCADE_BUS_{kind.upper()}_URL"
    result = _run("-W", "error", str(EXAMPLES / name), extra_env={env_var: url})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    for text in expected:
        assert text in result.stdout, f"{text!r} not in the output of {name}:\n{result.stdout}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", PYTEST_EXAMPLES)
def test_pytest_example_passes(name: str) -> None:
    result = _run("-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLES / name), timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b[1-9]\d* passed", result.stdout), result.stdout


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.DOTALL)


def _lines(code: str) -> list[str]:
    return [line.strip() for line in code.splitlines() if line.strip()]


def _in_order(needles: list[str], haystack: list[str]) -> bool:
    rest = iter(haystack)
    return all(any(line == candidate for candidate in rest) for line in needles)


def test_readme_code_comes_from_tested_examples() -> None:
    """Each Python block of the README is an excerpt (lines in order) of a tested example."""
    blocks = _python_blocks((ROOT / "README.md").read_text())
    assert blocks
    sources = [_lines(p.read_text()) for p in EXAMPLES.glob("*.py")]
    for block in blocks:
        assert any(_in_order(_lines(block), source) for source in sources), block


# -- the demo ------------------------------------------------------------------------------

TELEMETRY_LINE = re.compile(
    r"telemetry\s+(?P<run>run-\w+-\d+)\s+(?P<task>\S+)\s+attempt (?P<attempt>\d+)\s+"
    r"(?P<state>pending|running|succeeded|failed)\s+at \d\d:\d\d:\d\d\.\d{3}"
)


def test_demo_runs_end_to_end() -> None:
    result = _run("-m", "cascade_bus.demo", "--seconds", "1")
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert result.stderr == ""
    lines = out.splitlines()

    events = [m for m in map(TELEMETRY_LINE.search, lines) if m]
    assert {m["state"] for m in events} >= {"pending", "running", "succeeded"}
    assert len({m["run"] for m in events}) == 3

    pause = next(i for i, line in enumerate(lines) if re.search(r"\bPAUSE\s+run-", line))
    resume = next(i for i, line in enumerate(lines) if re.search(r"\bRESUME\s+run-", line))
    assert pause < resume
    paused_run = lines[pause].split()[2]
    assert any(f"engine     {paused_run} is paused" in line for line in lines)
    assert any(f"engine     {paused_run} may continue" in line for line in lines)
    # The engine honoured the pause: nothing of that run ran before the resume.
    for index, line in enumerate(lines):
        match = TELEMETRY_LINE.search(line)
        if match and match["run"] == paused_run and match["state"] == "running":
            assert index > resume, line

    summary = re.search(r"summary: 3 runs, 12 tasks, (\d+) telemetry events seen of (\d+)", out)
    assert summary
    assert summary[1] == summary[2] == str(len(events))
    assert "events by state: pending" in out
    assert "constraints: 1 pause(s), 1 resume(s)" in out
    assert re.search(r"engine\s+published \d+, delivered 2, dropped 0, reconnects 0", out)
    assert re.search(rf"watcher\s+published 0, delivered {len(events) + 2}, dropped 0", out)


def test_demo_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--runs", "2", "--tasks", "2", "--seconds", "0.3", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "summary: 2 runs, 4 tasks" in out
    assert "constraints: 1 pause(s), 1 resume(s)" in out


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mqqt://user:s3cret@broker.example:1883", "did you mean mqtt?"),
        ("no-scheme-here", "not a bus URL"),
        ("memory://demo?color=blue", "unknown option(s) for memory://: color"),
    ],
)
def test_demo_bad_url_is_one_clear_line(url: str, message: str) -> None:
    result = _run("-m", "cascade_bus.demo", "--url", url)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "s3cret" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1


def test_demo_rejects_bad_arguments() -> None:
    result = _run("-m", "cascade_bus.demo", "--runs", "0")
    assert result.returncode == 2
    assert "--runs and --tasks must be at least 1" in result.stderr
