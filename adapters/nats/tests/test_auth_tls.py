"""Authentication and TLS against private nats-servers with generated configs and certificates.

User/password and token auth (right and wrong credentials, never shown in errors or reprs), TLS
with a private CA (``nats+tls://``, its older name ``tls://``, and ``ca_file``), mutual TLS
(``certfile``/``keyfile``), and the refusals: a TLS client against a plain server, a plain client
against a TLS server.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import cascade_bus
from cascade_bus import ConnectError, InvalidURL

pytestmark = pytest.mark.nats

SECRET = "s3cr3t-Pa55"
TOKEN = "t0k3n-XYZ"


def _conf(tmp_path: Path, name: str, text: str) -> list[str]:
    path = tmp_path / name
    path.write_text(text)
    return ["-c", str(path)]


async def _round_trip(url: str, topic: str, **options: Any) -> None:
    """Connect, then a QoS-0, a QoS-1 and a retained round trip (JetStream works too)."""
    async with cascade_bus.connect(url, **options) as bus:
        got: list[Any] = []
        both = asyncio.Event()

        def record(env: cascade_bus.Envelope[Any]) -> None:
            got.append(env.payload)
            if sum(isinstance(p, int) for p in got) == 2:
                both.set()

        await bus.publish(f"{topic}/r", {"kept": 1}, retain=True)
        await bus.subscribe(f"{topic}/#", record, qos=1)
        assert got == [{"kept": 1}]
        await bus.publish(f"{topic}/a", 0)
        await bus.publish(f"{topic}/b", 1, qos=1)
        async with asyncio.timeout(5):
            await both.wait()
        assert sorted(p for p in got if isinstance(p, int)) == [0, 1]
        await bus.publish(f"{topic}/r", b"", retain=True)


# -- user / password and token -------------------------------------------------------------


@pytest.fixture
def password_server(private_nats: Any, tmp_path: Path) -> Any:
    return private_nats(
        extra_args=_conf(
            tmp_path,
            "users.conf",
            f'authorization {{ users = [ {{ user: "alice", password: "{SECRET}" }} ] }}\n',
        )
    )


async def test_user_and_password(password_server: Any, unique_topic: str) -> None:
    url = password_server.url.replace("nats://", f"nats://alice:{SECRET}@")
    await _round_trip(url, unique_topic)
    bus = cascade_bus.connect(url)
    assert SECRET not in repr(bus)
    assert SECRET not in repr(bus.transport)
    assert SECRET not in str(bus.url)


async def test_user_and_password_as_options(password_server: Any, unique_topic: str) -> None:
    await _round_trip(password_server.url, unique_topic, user="alice", password=SECRET)


async def test_wrong_password_is_refused_without_showing_it(password_server: Any) -> None:
    url = password_server.url.replace("nats://", "nats://alice:wrong-Pa55@")
    with pytest.raises(ConnectError) as info:
        await cascade_bus.connect(url).open()
    text = str(info.value) + repr(info.value)
    assert "wrong-Pa55" not in text
    assert "credentials" in text
    with pytest.raises(ConnectError):
        await cascade_bus.connect(password_server.url).open()  # no credentials at all


@pytest.fixture
def token_server(private_nats: Any, tmp_path: Path) -> Any:
    return private_nats(
        extra_args=_conf(tmp_path, "token.conf", f'authorization {{ token: "{TOKEN}" }}\n')
    )


async def test_token_in_the_password_position_is_masked(
    token_server: Any, unique_topic: str
) -> None:
    url = token_server.url.replace("nats://", f"nats://:{TOKEN}@")
    await _round_trip(url, unique_topic)
    assert TOKEN not in repr(cascade_bus.connect(url))


async def test_token_as_username_and_as_option(token_server: Any, unique_topic: str) -> None:
    url = token_server.url.replace("nats://", f"nats://{TOKEN}@")
    await _round_trip(url, unique_topic)
    assert TOKEN not in repr(cascade_bus.connect(url))  # a bare NATS user name is a token
    await _round_trip(token_server.url, unique_topic, token=TOKEN)
    query = f"{token_server.url}?token={TOKEN}"
    await _round_trip(query, f"{unique_topic}/q")
    assert TOKEN not in repr(cascade_bus.connect(query))


async def test_wrong_token_is_refused(token_server: Any) -> None:
    with pytest.raises(ConnectError) as info:
        await cascade_bus.connect(token_server.url, token="nope-nope").open()
    assert "nope-nope" not in str(info.value)


def test_token_and_password_together_are_refused() -> None:
    with pytest.raises(InvalidURL):
        cascade_bus.connect("nats://alice:pw@127.0.0.1:4222", token="t")


# -- TLS ------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not found (Debian: apt-get install openssl)")
    d = tmp_path_factory.mktemp("certs")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=cascade-bus test CA", cwd=d)  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (d / f"{name}.ext").write_text(ext)
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                 "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
    return d


def _tls_conf(certs: Path, *, verify: bool) -> str:
    return (
        "tls {\n"
        f'  cert_file: "{certs / "server.pem"}"\n'
        f'  key_file: "{certs / "server.key"}"\n'
        f'  ca_file: "{certs / "ca.pem"}"\n'
        f"  verify: {'true' if verify else 'false'}\n"
        "  timeout: 2\n"
        "}\n"
    )


@pytest.fixture
def tls_server(private_nats: Any, tmp_path: Path, certs: Path) -> Any:
    return private_nats(extra_args=_conf(tmp_path, "tls.conf", _tls_conf(certs, verify=False)))


async def test_tls_with_a_private_ca(tls_server: Any, certs: Path, unique_topic: str) -> None:
    url = tls_server.url.replace("nats://", "nats+tls://")
    await _round_trip(url, unique_topic, ca_file=str(certs / "ca.pem"))
    # ca_file alone turns TLS on for a nats:// URL too.
    await _round_trip(tls_server.url, f"{unique_topic}/2", ca_file=str(certs / "ca.pem"))


async def test_tls_without_the_ca_is_refused(tls_server: Any) -> None:
    with pytest.raises(ConnectError):
        await cascade_bus.connect(tls_server.url.replace("nats://", "tls://")).open()


async def test_tls_verify_off(tls_server: Any, unique_topic: str) -> None:
    url = tls_server.url.replace("nats://", "tls://")  # the older name of nats+tls://
    await _round_trip(url, unique_topic, tls_verify=False)


async def test_tls_client_against_a_plain_server_is_refused(private_nats: Any, certs: Path) -> None:
    plain = private_nats()
    with pytest.raises(ConnectError, match="does not offer TLS"):
        await cascade_bus.connect(
            plain.url.replace("nats://", "tls://"), ca_file=str(certs / "ca.pem")
        ).open()


async def test_mutual_tls(
    private_nats: Any, tmp_path: Path, certs: Path, unique_topic: str
) -> None:
    server = private_nats(extra_args=_conf(tmp_path, "mtls.conf", _tls_conf(certs, verify=True)))
    url = server.url.replace("nats://", "tls://")
    await _round_trip(
        url,
        unique_topic,
        ca_file=str(certs / "ca.pem"),
        certfile=str(certs / "client.pem"),
        keyfile=str(certs / "client.key"),
    )
    with pytest.raises(ConnectError):  # no client certificate
        await cascade_bus.connect(url, ca_file=str(certs / "ca.pem")).open()


def test_unreadable_tls_files_are_an_invalid_url(tmp_path: Path) -> None:
    with pytest.raises(InvalidURL, match="TLS"):
        cascade_bus.connect("tls://127.0.0.1:4222", ca_file=str(tmp_path / "missing.pem"))
