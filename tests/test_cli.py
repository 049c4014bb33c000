"""The ``cascade-bus`` command line, driven for real: click's CliRunner and subprocesses.

memory:// brokers live in one process: CliRunner invocations share them (retained messages
carry state from one command to the next), subprocesses do not. Tests that need two processes
on one broker use the shared MQTT broker (``mqtt_url``) and are marked ``mqtt``.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import cascade_bus
from cascade_bus import Connector, _registry, demo
from cascade_bus._install import install_command
from cascade_bus.cli import EXTRA_HINT, main
from cascade_bus.cli._app import cli
from cascade_bus.testing.brokers import free_port
from cascade_bus.testing.pipes import Lines, spawn
from cascade_bus.testing.pipes import finish as finish_child

TIMEOUT = 20.0
SCRIPT = Path(sys.executable).with_name("cascade-bus")
MODULE = [sys.executable, "-m", "cascade_bus.cli"]
# A shell may start children with SIGINT ignored (background jobs); a user's Ctrl-C reaches a
# foreground process with the default handler, so the Ctrl-C tests restore that first.
WITH_SIGINT = [
    sys.executable,
    "-c",
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from cascade_bus.cli import main; sys.exit(main())",
]
SECRET = "s3cret-pw"

needs_mqtt_adapter = pytest.mark.skipif(
    "mqtt" not in cascade_bus.available_transports(), reason="cascade-bus-mqtt not installed"
)


def invoke(*args: str, input: str | bytes | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input)


def assert_one_line_error(result: Result | subprocess.CompletedProcess[str], *needles: str) -> str:
    stdout, stderr = result.stdout, result.stderr
    code = result.exit_code if isinstance(result, Result) else result.returncode
    assert code not in (0, None), (stdout, stderr)
    assert "Traceback" not in stdout + stderr
    assert SECRET not in stdout + stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def run_cli(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    command = [str(SCRIPT)] if SCRIPT.exists() else MODULE
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def start(*args: str) -> tuple[subprocess.Popen[bytes], Lines, Lines]:
    return spawn([*WITH_SIGINT, *args], TIMEOUT)


def finish(proc: subprocess.Popen[bytes], out: Lines, err: Lines) -> tuple[int, str, str]:
    return finish_child(proc, out, err, TIMEOUT)


def unique_memory() -> str:
    return f"memory://cli-{uuid.uuid4().hex[:12]}"


# -- installation and plumbing -------------------------------------------------------------


def test_console_script_and_module_run() -> None:
    version = run_cli("--version")
    assert version.returncode == 0, version.stderr
    assert f"cascade-bus, version {cascade_bus.__version__}" in version.stdout
    help_text = subprocess.run(
        [*MODULE, "--help"], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert help_text.returncode == 0
    for command in ("pub", "sub", "watch", "request", "bench", "doctor", "transports", "demo"):
        assert re.search(rf"^\s+{command}\s", help_text.stdout, re.MULTILINE), command


def test_without_the_extra_main_prints_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [m for m in sys.modules if m.startswith("cascade_bus.cli.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "click", None)
    assert main(["--help"]) == 1
    captured = capsys.readouterr()
    assert captured.err == EXTRA_HINT + "\n"
    assert captured.out == ""


def test_transports_lists_memory() -> None:
    result = invoke("transports")
    assert result.exit_code == 0, result.output
    assert re.search(
        r"memory://\s+│\s+cascade_bus\._memory:MemoryTransport\s+│\s+cascade-bus", result.stdout
    )
    listed = [json.loads(line) for line in invoke("transports", "--json").stdout.splitlines()]
    memory = next(item for item in listed if item["scheme"] == "memory")
    assert memory == {
        "scheme": "memory",
        "transport": "cascade_bus._memory:MemoryTransport",
        "package": "cascade-bus",
        "version": cascade_bus.__version__,
    }


# -- pub / sub -----------------------------------------------------------------------------


def test_pub_retained_then_sub_json() -> None:
    url = unique_memory()
    published = invoke(
        "pub", url, "plant/boiler/setpoint", '{"celsius": 65}', "--retain", "-H", "unit=C"
    )
    assert published.exit_code == 0, published.output
    assert f"published 1 message to 'plant/boiler/setpoint' on {url}" in published.stderr

    result = invoke("sub", url, "plant/#", "--json", "--count", "1", "--timeout", "5")
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.splitlines()
    record = json.loads(line)
    assert record["topic"] == "plant/boiler/setpoint"
    assert record["payload"] == {"celsius": 65}
    assert record["headers"] == {"unit": "C"}
    assert record["content_type"] == "application/json"
    assert record["type"] == "cascade_bus.message"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
    assert record["id"]
    assert record["source"]

    cleared = invoke("pub", url, "plant/boiler/setpoint", "--retain", "--quiet")
    assert cleared.exit_code == 0
    assert cleared.stderr == ""
    empty = invoke("sub", url, "plant/#", "--count", "1", "--timeout", "0.2", "-q")
    assert_one_line_error(empty, "received 0 of 1 message(s) on 'plant/#' within 0.2s")
    assert empty.exit_code == 1


def test_pub_raw_stdin_and_plain_sub_lines() -> None:
    url = unique_memory()
    assert (
        invoke("pub", url, "notes/a", "-", "--raw", "--retain", input=b"hello world").exit_code == 0
    )
    assert invoke("pub", url, "notes/b", "[1, 2]", "--retain").exit_code == 0
    result = invoke("sub", url, "notes/+", "--count", "2", "--timeout", "5", "--quiet")
    assert result.exit_code == 0, result.output
    assert sorted(result.stdout.splitlines()) == [
        "notes/a [retained] hello world",
        "notes/b [retained] [1,2]",
    ]
    assert result.stderr == ""


def test_pub_count_and_rate() -> None:
    result = invoke("pub", unique_memory(), "load/t", '{"n": 1}', "--count", "5", "--rate", "1000")
    assert result.exit_code == 0, result.output
    assert "published 5 messages to 'load/t'" in result.stderr


def test_invalid_json_reports_line_and_column() -> None:
    result = invoke("pub", "memory://", "a/b", '{"a": 1,}')
    line = assert_one_line_error(result, "invalid JSON in PAYLOAD at line 1, column 9")
    assert result.exit_code == 2
    assert "Expecting property name" in line
    result = invoke("pub", "memory://", "a/b", "-", input='{\n  "a": 1\n  "b": 2\n}\n')
    assert_one_line_error(result, "invalid JSON in stdin at line 3, column 3: Expecting ','")
    result = invoke("request", "memory://", "a/b", "hello")
    assert_one_line_error(result, "line 1, column 1", "use --raw")


BAD_INPUT = [
    (
        ["pub", f"mqqt://user:{SECRET}@broker.example:1883", "a/b", "1"],
        "cascade-bus pub: no transport for scheme 'mqqt'; did you mean mqtt?",
    ),
    (["sub", "no-scheme-here", "a/#"], "not a bus URL"),
    (["pub", "memory://x?color=blue", "a", "1"], "unknown option(s) for memory://: color"),
    (["pub", "memory://", "a/+", "1"], "wildcard"),
    (["sub", "memory://", "a/#/b"], "'#'"),
    (["pub", "memory://", "a", "1", "-H", "novalue"], "invalid --header 'novalue'"),
    (["pub", "memory://", "a", "1", "--qos", "3"], "Invalid value for '--qos'"),
    (["bogus"], "No such command 'bogus'"),
]


@pytest.mark.parametrize(("args", "needle"), BAD_INPUT, ids=lambda v: str(v)[:30])
def test_bad_input_is_one_clear_line(args: list[str], needle: str) -> None:
    result = invoke(*args)
    assert_one_line_error(result, needle)
    assert result.exit_code == 2


def test_known_scheme_without_its_adapter_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As on a machine without cascade-bus-nats, whether or not it is installed here.
    hidden = {"nats", "tls"}
    found = {k: v for k, v in _registry._discovered().items() if k not in hidden}
    monkeypatch.setattr(_registry, "_entry_points", found)
    loaded = {k: v for k, v in _registry._registered.items() if k not in hidden}
    monkeypatch.setattr(_registry, "_registered", loaded)
    result = invoke("sub", "nats://127.0.0.1:4222", "a/#")
    install = install_command("cascade-bus-nats")  # -e adapters/nats from a checkout
    assert_one_line_error(result, "no transport for scheme 'nats'", install)
    assert result.exit_code == 2
    doctor = invoke("doctor", "nats://127.0.0.1:4222")
    assert f"hint: install its adapter: {install}" in " ".join(doctor.stdout.split())


@needs_mqtt_adapter
@pytest.mark.parametrize(
    "args",
    [
        ["pub", "{url}", "a/b", "1"],
        ["sub", "{url}", "a/#"],
        ["request", "{url}", "a/b", "{{}}"],
        ["watch", "{url}", "--once"],
        ["bench", "{url}", "--messages", "1"],
    ],
    ids=lambda v: v[0],
)
def test_unreachable_broker_names_address_and_cause(args: list[str]) -> None:
    port = free_port()
    url = f"mqtt://user:{SECRET}@127.0.0.1:{port}"
    result = invoke(*[a.format(url=url) for a in args])
    line = assert_one_line_error(result, f"could not connect to mqtt://127.0.0.1:{port}")
    assert result.exit_code == 1
    assert "refused" in line.lower()
    assert f"mosquitto -p {port}" in line


def test_request_without_responder() -> None:
    result = invoke("request", unique_memory(), "calc/add", '{"a": 2}', "--timeout", "30")
    assert_one_line_error(result, "no responder is subscribed to 'calc/add'")
    assert result.exit_code == 1


# -- doctor --------------------------------------------------------------------------------


def test_doctor_memory_passes_and_shows_capabilities() -> None:
    result = invoke("doctor", "memory://")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for check in ("URL", "transport", "connect", "publish and subscribe", "retained messages",
                  "request/reply", "counters"):  # fmt: skip
        assert re.search(rf"│ {re.escape(check)}\s+│ ok\s+│", out), check
    assert re.search(r"│ max_qos\s+│ 2\s+│", out)
    assert re.search(r"│ max_payload\s+│ 1,048,576 bytes\s+│", out)
    assert "all 7 checks passed" in out


@pytest.mark.parametrize(
    ("fixture", "scheme"),
    [
        pytest.param("mqtt_url", "mqtt", marks=pytest.mark.mqtt),
        pytest.param("nats_url", "nats", marks=pytest.mark.nats),
        pytest.param("redis_url", "redis", marks=pytest.mark.redis),
    ],
)
def test_doctor_passes_on_each_shared_broker(
    fixture: str, scheme: str, request: pytest.FixtureRequest
) -> None:
    if scheme not in cascade_bus.available_transports():
        pytest.skip(f"the {scheme} adapter is not installed (pip install cascade-bus-{scheme})")
    url = request.getfixturevalue(fixture)
    result = run_cli("doctor", url, "--timeout", "10")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert re.search(r"│ connect\s+│ ok\s+│", result.stdout)
    assert re.search(r"│ publish and subscribe\s+│ ok\s+│", result.stdout)
    assert "│ max_qos" in result.stdout


@needs_mqtt_adapter
def test_doctor_unreachable_broker() -> None:
    port = free_port()
    result = run_cli("doctor", f"mqtt://user:{SECRET}@127.0.0.1:{port}", "--timeout", "3")
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert f"mqtt://user:[secure]@127.0.0.1:{port}" in result.stdout
    assert re.search(
        r"│ connect\s+│ failed\s+│ could not connect to mqtt://127\.0\.0\.1:\d+", result.stdout
    )
    assert f"hint: is an MQTT broker running at 127.0.0.1:{port}?" in result.stdout
    assert "│ max_qos" in result.stdout  # the capabilities the transport declares
    line = assert_one_line_error(result, "cascade-bus doctor: connect failed")
    assert f"127.0.0.1:{port}" in line
    assert f"mosquitto -p {port}" in line


def test_doctor_unknown_scheme_suggests() -> None:
    result = invoke("doctor", f"mqqt://user:{SECRET}@localhost")
    assert result.exit_code == 1
    assert "did you mean mqtt?" in result.stdout
    hint = (
        "use mqtt://user:[secure]@localhost"
        if "mqtt" in cascade_bus.available_transports()
        else install_command("cascade-bus-mqtt")
    )
    assert hint in result.stdout
    assert_one_line_error(result, "transport failed")


# -- watch ---------------------------------------------------------------------------------


def test_watch_once_shows_the_retained_state() -> None:
    url = unique_memory()

    async def publish() -> None:
        engine = Connector(url)  # the demo's client and wire format (bare JSON)
        await engine.connect()
        for run, task, attempt, state in [
            ("run-a", "extract", 1, "succeeded"),
            ("run-a", "transform", 2, "running"),
            ("run-b", "extract", 1, "pending"),
        ]:
            event = {
                "run": run,
                "task": task,
                "attempt": attempt,
                "state": state,
                "time": demo._now(),
            }
            topic = f"{demo.TELEMETRY}/{run}/{task}/{attempt}/events"
            await engine.publish(topic, event, retain=True)
        await engine.publish(
            f"{demo.CONSTRAINTS}/run-b", {"paused": True, "reason": "maintenance"}, retain=True
        )
        await engine.publish("cascade/notes/n1", {"text": "[bold]not markup[/bold]"}, retain=True)
        await engine.disconnect()

    asyncio.run(publish())
    result = invoke("watch", url, "--once")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert 'cascade/notes/n1 [retained] {"text":"[bold]not markup[/bold]"}' in out
    assert re.search(
        r"│ run-a\s+│ running\s+│ 1 running, 1 succeeded\s+│ transform #2 running", out
    )
    assert re.search(
        r"│ run-b\s+│ paused\s+│ 1 pending\s+│ extract #1 pending .*│ paused: maintenance", out
    )
    assert re.search(r"│ run-a\s+│ extract\s+│\s+1 │ succeeded\s+│ \d\d:\d\d:\d\d\.\d{3} │", out)
    assert "watching cascade/# on " + url in out
    assert "6 message(s)" in out  # the 5 above and the engine's retained presence
    assert "Engines (0 online of 1)" in out  # the Connector announced itself, then left
    assert re.search(r"│ [\w.-]+-\d+\S*\s+│ offline\s+│ before this watch │", out)


@pytest.mark.mqtt
@needs_mqtt_adapter
def test_watch_once_on_a_demo_stream(mqtt_url: str) -> None:
    proc, out, err = start("watch", mqtt_url, "--once", "--duration", "60")
    try:
        err.wait_for("watching 'cascade/#'")
        demo_run = run_cli(
            "demo", "--url", mqtt_url, "--runs", "2", "--tasks", "2", "--seconds", "0.5"
        )
        assert demo_run.returncode == 0, demo_run.stdout + demo_run.stderr
        runs = sorted(set(re.findall(r"run-[0-9a-f]{4}-\d", demo_run.stdout)))
        assert len(runs) == 2
        # Everything the demo published reached the broker before it exited; a message
        # published after it reaches the watcher after all of them (one connection, in order).
        sentinel = f"cascade/cli-test/{uuid.uuid4().hex}"
        assert invoke("pub", mqtt_url, sentinel, '{"end": true}', "-q").exit_code == 0
        out.wait_for(sentinel)
        proc.send_signal(signal.SIGINT)
    finally:
        code, stdout, stderr = finish(proc, out, err)
    assert code == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().endswith("cascade-bus watch: interrupted")
    for run in runs:
        assert re.search(rf"│ {run}\s+│ succeeded\s+│ 2 succeeded\s+│", stdout), stdout
        assert re.search(rf"│ {run}\s+│ extract\s+│", stdout)
    # The demo pauses its last run with a retained constraint, then clears it.
    assert re.search(rf"│ {runs[-1]}\s+│ succeeded .*│ resumed\s+│", stdout)


# -- request -------------------------------------------------------------------------------


@pytest.mark.mqtt
@needs_mqtt_adapter
async def test_request_with_a_responder(mqtt_url: str, unique_topic: str) -> None:
    topic = f"{unique_topic}/calc/add"

    async def add(env: Any) -> None:
        await bus.reply(env, {"sum": env.payload["a"] + env.payload["b"]})

    async with cascade_bus.connect(mqtt_url) as bus, bus.subscribe(topic, add):
        proc = await asyncio.create_subprocess_exec(
            *MODULE, "request", mqtt_url, topic, '{"a": 2, "b": 3}', "--timeout", "10",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 0, stderr.decode()
    assert stdout.decode() == '{"sum":5}\n'


# -- pub -> sub across processes -----------------------------------------------------------


@pytest.mark.mqtt
@needs_mqtt_adapter
def test_pub_sub_round_trip_across_processes(mqtt_url: str, unique_topic: str) -> None:
    proc, out, err = start(
        "sub", mqtt_url, f"{unique_topic}/#", "--json", "--count", "2", "--timeout", "15"
    )
    try:
        err.wait_for("subscribed to")
        first = invoke("pub", mqtt_url, f"{unique_topic}/a", '{"n": 1}', "-H", "k=v", "--qos", "1")
        assert first.exit_code == 0, first.output
        second = invoke("pub", mqtt_url, f"{unique_topic}/b", "plain text", "--raw")
        assert second.exit_code == 0, second.output
    finally:
        code, stdout, stderr = finish(proc, out, err)
    assert code == 0, stderr
    records = [json.loads(line) for line in stdout.splitlines() if line]
    assert [r["topic"] for r in records] == [f"{unique_topic}/a", f"{unique_topic}/b"]
    assert records[0]["payload"] == {"n": 1}
    assert records[0]["headers"] == {"k": "v"}
    # --raw sends the bytes as they are; a non-JSON text body is shown as text.
    assert records[1]["payload_text"] == "plain text"
    assert "payload_base64" not in records[1]
    assert [r["retained"] for r in records] == [False, False]


@pytest.mark.mqtt
@needs_mqtt_adapter
def test_sub_prints_topic_and_payload_lines(mqtt_url: str, unique_topic: str) -> None:
    proc, out, err = start("sub", mqtt_url, f"{unique_topic}/+", "--count", "1", "--timeout", "15")
    try:
        err.wait_for("subscribed to")
        assert (
            invoke("pub", mqtt_url, f"{unique_topic}/x", '{"celsius": 21.5}', "-q").exit_code == 0
        )
    finally:
        code, stdout, stderr = finish(proc, out, err)
    assert code == 0, stderr
    assert stdout.strip() == f'{unique_topic}/x {{"celsius":21.5}}'


# -- bench, demo, Ctrl-C -------------------------------------------------------------------


def test_bench_prints_numbers() -> None:
    result = invoke("bench", unique_memory(), "--messages", "300")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert re.search(r"│ messages received\s+│\s+300 │", out)
    assert re.search(r"│ lost\s+│\s+0 │", out)
    for name in ("p50", "p90", "p99", "max"):
        assert re.search(rf"│ round trip {name} \(ms\)\s+│\s+\d+\.\d{{3}} │", out), name
    assert re.search(r"│ throughput \(msg/s\)\s+│\s+[\d,]+ │", out)


def test_demo_command_runs_the_demo() -> None:
    result = invoke(
        "demo", "--url", f"memory://user:{SECRET}@cli-demo", "--runs", "2", "--tasks", "1",
        "--seconds", "0.3",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2 runs x 1 tasks on memory://user:[secure]@cli-demo" in result.stdout
    assert "summary: 2 runs, 2 tasks" in result.stdout
    assert "constraints: 1 pause(s), 1 resume(s)" in result.stdout
    assert SECRET not in result.output


def test_ctrl_c_stops_sub_with_130() -> None:
    proc, out, err = start("sub", "memory://", "a/#")
    try:
        err.wait_for("subscribed to 'a/#' on memory://")
        proc.send_signal(signal.SIGINT)
    finally:
        code, _, stderr = finish(proc, out, err)
    assert code == 130
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "cascade-bus sub: interrupted"
