"""Issue 15, the command-line half, through the real ``cascade-bus`` command on real brokers.

``./scripts/demo`` installs once and says where the command is; the demo clears its retained
pause when interrupted; ``reply`` answers ``request``; ``sub`` tells retained from live and
text from binary; ``transports`` and the connect hints say what is true.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import cascade_bus
from cascade_bus._presence import default_presence_topic
from cascade_bus.cli._app import cli
from cascade_bus.testing.brokers import free_port
from cascade_bus.testing.pipes import Lines, spawn
from cascade_bus.testing.pipes import finish as finish_child

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = cascade_bus.available_transports()
needs_mqtt = pytest.mark.skipif("mqtt" not in ADAPTERS, reason="cascade-bus-mqtt not installed")
needs_nats = pytest.mark.skipif("nats" not in ADAPTERS, reason="cascade-bus-nats not installed")
needs_redis = pytest.mark.skipif("redis" not in ADAPTERS, reason="cascade-bus-redis not installed")
TIMEOUT = 30.0
# As tests/test_cli.py: the child gets Python's own Ctrl-C handler even if started in background.
COMMAND = [
    sys.executable,
    "-c",
    "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "from cascade_bus.cli import main; sys.exit(main())",
]


def invoke(*args: str, input: bytes | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input)


def run_cli(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def start(*args: str) -> tuple[subprocess.Popen[bytes], Lines, Lines]:
    return spawn([*COMMAND, *args], TIMEOUT)


def finish(proc: subprocess.Popen[bytes], out: Lines, err: Lines) -> tuple[int, str, str]:
    code, stdout, stderr = finish_child(proc, out, err, TIMEOUT)
    return code, stdout.strip("\n"), stderr.strip("\n")


# -- 1 and 2: ./scripts/demo installs once, then says where the command is ----------------


def _fake_checkout(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the script and the pyprojects, with a .venv whose pip only logs its calls."""
    (tmp_path / "scripts").mkdir()
    shutil.copy2(ROOT / "scripts" / "demo", tmp_path / "scripts" / "demo")
    shutil.copy2(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for project in sorted(ROOT.glob("adapters/*/pyproject.toml")):
        target = tmp_path / project.relative_to(ROOT)
        target.parent.mkdir(parents=True)
        shutil.copy2(project, target)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    log = tmp_path / "pip.log"
    scripts = {
        # `python -m pip ...` is logged, anything else runs on the real interpreter.
        "python": '#!/bin/sh\nif [ "$1 $2" = "-m pip" ]; then echo "$@" >> "{log}"; exit 0; fi\n'
        'exec "{python}" "$@"\n',
        "cascade-bus": '#!/bin/sh\necho "demo ran: $*"\n',
    }
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text.format(log=log, python=sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return tmp_path / "scripts" / "demo", log


def _run_demo_script(script: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(script), "--runs", "1"], capture_output=True, text=True, timeout=60, check=False
    )


def test_demo_script_installs_only_when_a_pyproject_changed(tmp_path: Path) -> None:
    script, log = _fake_checkout(tmp_path)
    first = _run_demo_script(script)
    assert first.returncode == 0, first.stderr
    assert "demo ran: demo --runs 1" in first.stdout
    installs = log.read_text().splitlines()
    assert len(installs) == 1
    assert "-e .[cli]" in installs[0]
    assert "-e adapters/mqtt/" in installs[0]

    again = _run_demo_script(script)  # nothing changed: no pip (works offline)
    assert again.returncode == 0, again.stderr
    assert "demo ran" in again.stdout
    assert len(log.read_text().splitlines()) == 1

    adapter = next(tmp_path.glob("adapters/*/pyproject.toml"))
    adapter.write_text(adapter.read_text() + "\n# a new dependency\n")
    changed = _run_demo_script(script)
    assert changed.returncode == 0, changed.stderr
    assert len(log.read_text().splitlines()) == 2


def test_demo_script_says_where_the_command_is(tmp_path: Path) -> None:
    script, _ = _fake_checkout(tmp_path)
    result = _run_demo_script(script)
    assert result.returncode == 0, result.stderr
    assert "The cascade-bus command is in .venv/bin/" in result.stderr
    assert "source .venv/bin/activate" in result.stderr
    readme = (ROOT / "README.md").read_text()
    assert "source .venv/bin/activate" in readme
    assert ".venv/bin/cascade-bus" in readme


def test_readme_install_commands_work_from_a_checkout() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "pip install -e adapters/mqtt" in readme
    assert "pip install cascade-bus-mqtt`" not in readme  # on no index


# -- 4: the demo clears its retained pause on Ctrl-C ----------------------------------------


@pytest.mark.mqtt
@needs_mqtt
def test_interrupted_demo_leaves_no_retained_pause(mqtt_url: str) -> None:
    proc, out, err = start("demo", "--url", mqtt_url, "--runs", "2", "--seconds", "60")
    try:
        line = out.wait_for("PAUSE")  # the retained pause is on the broker now
        proc.send_signal(signal.SIGINT)
    finally:
        code, _stdout, stderr = finish(proc, out, err)
    assert code == 130, stderr
    run = re.search(r"run-[0-9a-f]{4}-\d", line)
    assert run is not None, line
    # sub returns what is retained before --timeout can end it: nothing must be there.
    left = invoke("sub", mqtt_url, f"cascade/constraints/{run.group()}", "--timeout", "1", "-q")
    assert left.exit_code == 0, left.output
    assert left.stdout == "", "the interrupted demo left its retained pause behind"
    # Nor its engine's presence status (`cascade/status/<host>-<pid>`): no phantom engine.
    status = default_presence_topic().rsplit("-", 1)[0] + f"-{proc.pid}"
    left = invoke("sub", mqtt_url, status, "--timeout", "1", "-q")
    assert left.exit_code == 0, left.output
    assert left.stdout == "", "the interrupted demo left its engine's status behind"


# -- 5: reply answers request ---------------------------------------------------------------


@pytest.mark.mqtt
@needs_mqtt
def test_reply_with_a_fixed_payload(mqtt_url: str, unique_topic: str) -> None:
    topic = f"{unique_topic}/ping"
    proc, out, err = start("reply", mqtt_url, topic, '{"pong": true}', "--count", "2")
    try:
        err.wait_for("replying to")
        for number in (1, 2):
            asked = run_cli("request", mqtt_url, topic, json.dumps({"n": number}))
            assert asked.returncode == 0, asked.stderr
            assert asked.stdout == '{"pong":true}\n'
    finally:
        code, stdout, stderr = finish(proc, out, err)
    assert code == 0, stderr
    assert stdout.splitlines() == [f'{topic} {{"n":1}}', f'{topic} {{"n":2}}']


@pytest.mark.mqtt
@needs_mqtt
def test_reply_exec_computes_the_answer(mqtt_url: str, unique_topic: str) -> None:
    topic = f"{unique_topic}/calc/add"
    program = (
        "import json, os, sys; d = json.load(sys.stdin); "
        "print(json.dumps({'sum': d['a'] + d['b'], 'topic': os.environ['CASCADE_BUS_TOPIC']}))"
    )
    command = f'{sys.executable} -c "{program}"'
    proc, out, err = start("reply", mqtt_url, topic, "--exec", command, "--count", "1")
    try:
        err.wait_for("replying to")
        asked = run_cli("request", mqtt_url, topic, '{"a": 2, "b": 3}', "--timeout", "10")
    finally:
        code, _, stderr = finish(proc, out, err)
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout) == {"sum": 5, "topic": topic}
    assert code == 0, stderr


@pytest.mark.mqtt
@needs_mqtt
def test_reply_exec_failure_is_reported_and_not_answered(mqtt_url: str, unique_topic: str) -> None:
    topic = f"{unique_topic}/broken"
    proc, out, err = start("reply", mqtt_url, topic, "--exec", "exit 3", "--timeout", "30")
    try:
        err.wait_for("replying to")
        asked = run_cli("request", mqtt_url, topic, "{}", "--timeout", "1")
        err.wait_for("exited with status 3; not answered")
        proc.send_signal(signal.SIGINT)
    finally:
        code, _, stderr = finish(proc, out, err)
    assert asked.returncode == 1
    assert "no reply" in asked.stderr
    assert code == 130, stderr


def test_reply_needs_a_payload_or_exec() -> None:
    result = invoke("reply", "memory://", "a/b")
    assert result.exit_code == 2
    assert "give either PAYLOAD or --exec CMD" in result.stderr


# -- 8 and 9: sub marks retained replays, prints text as text -------------------------------


@pytest.mark.mqtt
@needs_mqtt
def test_sub_marks_retained_and_prints_text_and_binary(mqtt_url: str, unique_topic: str) -> None:
    kept = f"{unique_topic}/kept"
    assert invoke("pub", mqtt_url, kept, '{"v": 1}', "--retain", "-q").exit_code == 0
    try:
        proc, out, err = start("sub", mqtt_url, f"{unique_topic}/#", "--count", "4")
        try:
            err.wait_for("subscribed to")
            for topic, body in [("live", '{"v": 2}'), ("text", "two\nlines")]:
                sent = invoke("pub", mqtt_url, f"{unique_topic}/{topic}", body, "--raw", "-q")
                assert sent.exit_code == 0, sent.output
            binary = invoke(
                "pub", mqtt_url, f"{unique_topic}/bin", "-", "--raw", "-q", input=b"\x00\xff"
            )
            assert binary.exit_code == 0, binary.output
        finally:
            code, stdout, stderr = finish(proc, out, err)
    finally:
        invoke("pub", mqtt_url, kept, "--retain", "-q")
    assert code == 0, stderr
    assert stdout.splitlines() == [
        f'{kept} [retained] {{"v":1}}',
        f'{unique_topic}/live {{"v": 2}}',  # --raw: the bytes as sent
        f"{unique_topic}/text two\\nlines",
        f"{unique_topic}/bin (2 bytes) 00 ff",
    ]
    assert "b'" not in stdout


@pytest.mark.mqtt
@needs_mqtt
def test_sub_json_says_retained(mqtt_url: str, unique_topic: str) -> None:
    kept = f"{unique_topic}/kept"
    assert invoke("pub", mqtt_url, kept, "hello", "--raw", "--retain", "-q").exit_code == 0
    try:
        result = invoke("sub", mqtt_url, kept, "--json", "--count", "1", "--timeout", "10")
    finally:
        invoke("pub", mqtt_url, kept, "--retain", "-q")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["retained"] is True
    assert record["payload_text"] == "hello"


# -- 9: transports and connect failures say what is true ------------------------------------


def test_transports_never_calls_a_listed_scheme_not_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cascade_bus import _registry
    from cascade_bus._install import install_command

    # As on a machine without cascade-bus-nats: that one is missing, nothing listed is.
    hidden = {"nats", "tls", "nats+tls"}
    found = {k: v for k, v in _registry._discovered().items() if k not in hidden}
    monkeypatch.setattr(_registry, "_entry_points", found)
    loaded = {k: v for k, v in _registry._registered.items() if k not in hidden}
    monkeypatch.setattr(_registry, "_registered", loaded)
    result = invoke("transports")
    assert result.exit_code == 0, result.output
    listed = set(re.findall(r"│ ([a-z+]+)://", result.stdout))
    missing = " ".join(re.findall(r"not installed: (.*)", result.stdout))
    for scheme in re.findall(r"([a-z+]+)://", missing):
        assert scheme not in listed, f"{scheme}:// is listed and said to be missing"
    assert "nats://" in missing
    assert install_command("cascade-bus-nats") in " ".join(result.stdout.split())
    if "redis+cluster" in listed:  # it works: never "not installed" (the case)
        assert "redis+cluster" not in missing


@pytest.mark.nats
@needs_nats
def test_nats_failure_is_one_line_and_names_the_host() -> None:
    result = run_cli("pub", "nats://no-such-host.invalid:4222", "a/b", "1", timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no stray "closed for good" log line
    assert "check the host name 'no-such-host.invalid'" in lines[0]
    refused = run_cli("pub", f"nats://127.0.0.1:{free_port()}", "a/b", "1", timeout=60)
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "start one with `nats-server" in refused.stderr


@pytest.mark.mqtt
@pytest.mark.redis
@needs_redis
def test_wrong_protocol_on_the_port_is_named(mqtt_url: str) -> None:
    port = cascade_bus.BusURL(mqtt_url).port or 1883
    result = run_cli("pub", f"redis://127.0.0.1:{port}", "a/b", "1", timeout=60)
    assert result.returncode == 1
    assert "start one" not in result.stderr
    needle = "is where an MQTT broker" if port == 1883 else "did not answer as a Redis server"
    assert needle in result.stderr, result.stderr


@pytest.mark.redis
@needs_redis
def test_rediss_against_a_plain_redis_fails_fast(redis_url: str) -> None:
    plain = cascade_bus.BusURL(redis_url)
    start_time = time.monotonic()
    result = run_cli("pub", f"rediss://{plain.host}:{plain.port or 6379}", "a/b", "1", timeout=60)
    took = time.monotonic() - start_time
    assert result.returncode == 1
    assert "use redis:// instead of rediss://" in result.stderr, result.stderr
    assert took < 8, took  # the TLS handshake gives up after 3 s, not the 10 s connect timeout
