"""Authentication and TLS against a private Mosquitto (password file, certificates from openssl)."""

from __future__ import annotations

import asyncio
import gc
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

import cascade_bus
from cascade_bus import ConnectError, InvalidURL

pytestmark = pytest.mark.mqtt

USER = "alice"
# URL-special characters on purpose: the URL must be percent-encoded, and masking must hold.
PASSWORD = "s3cr3t:p@ss/w?rd%"
WRONG = "not-the-Pa55word"


def _secret_free(text: str) -> None:
    for secret in (PASSWORD, quote(PASSWORD, safe=""), WRONG):
        assert secret not in text, f"secret leaked: {text!r}"


def _all_messages(exc: BaseException) -> str:
    """Every message and repr along the exception chain."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None:
        parts += [str(seen), repr(seen)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


@pytest.fixture
def auth_broker(private_mosquitto):
    return private_mosquitto(users={USER: PASSWORD})


def _url(port: int, user: str | None = USER, password: str | None = PASSWORD) -> str:
    userinfo = ""
    if user is not None:
        userinfo = quote(user, safe="")
        if password is not None:
            userinfo += ":" + quote(password, safe="")
        userinfo += "@"
    return f"mqtt://{userinfo}127.0.0.1:{port}"


async def test_right_credentials_connect(auth_broker, unique_topic, kit, caplog):
    caplog.set_level(logging.DEBUG)
    async with cascade_bus.connect(_url(auth_broker.port)) as bus:
        got = kit.Inbox()
        await bus.subscribe(f"{unique_topic}/#", got, qos=1)
        await bus.publish(f"{unique_topic}/x", {"ok": True}, qos=1)
        assert await got.wait_for(1) == [{"ok": True}]
        _secret_free(repr(bus))
        _secret_free(str(bus.url))
        _secret_free(repr(bus.url))
        _secret_free(repr(bus.transport))
    _secret_free(caplog.text)


async def test_credentials_as_options(auth_broker):
    """username/password keyword options work like URL user info (and override it)."""
    url = _url(auth_broker.port, user="mallory", password=WRONG)
    async with cascade_bus.connect(url, username=USER, password=PASSWORD) as bus:
        assert bus.is_open
        _secret_free(repr(bus))


@pytest.mark.parametrize(
    ("user", "password"),
    [(USER, WRONG), ("nobody", PASSWORD), (None, None)],
    ids=["wrong-password", "unknown-user", "anonymous"],
)
async def test_wrong_credentials_raise_connect_error(auth_broker, caplog, user, password):
    caplog.set_level(logging.DEBUG)
    bus = cascade_bus.connect(_url(auth_broker.port, user, password))
    async with asyncio.timeout(5.0):
        with pytest.raises(ConnectError) as raised:
            await bus.open()
    assert f"127.0.0.1:{auth_broker.port}" in str(raised.value)
    assert "refused" in str(raised.value)
    _secret_free(_all_messages(raised.value))
    _secret_free(repr(bus))
    _secret_free(str(bus.url))
    _secret_free(caplog.text)
    assert not bus.is_open


# -- TLS -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(
        ["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30, text=True
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not found; install it (`apt-get install openssl`)")
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=cascade-bus test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip
    _openssl(
        "req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1",
        cwd=d,
    )  # fmt: skip
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\n"
        "subjectKeyIdentifier=hash\n"
    )
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "server.ext",
        cwd=d,
    )  # fmt: skip
    return Pki(ca=d / "ca.crt", cert=d / "server.crt", key=d / "server.key")


@pytest.fixture
def tls_broker(private_mosquitto, pki):
    """A private Mosquitto whose only listener speaks TLS (lines apply to the last listener)."""
    return private_mosquitto(
        extra_config=f"cafile {pki.ca}\ncertfile {pki.cert}\nkeyfile {pki.key}\n"
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_mqtts_with_the_ca_round_trip(tls_broker, pki, unique_topic, kit, host):
    url = f"mqtts://{host}:{tls_broker.port}?ca_file={pki.ca}"
    async with cascade_bus.connect(url) as bus:
        got = kit.Inbox()
        await bus.subscribe(f"{unique_topic}/#", got, qos=1)
        await bus.publish(f"{unique_topic}/secure", {"tls": True}, qos=1)
        assert await got.wait_for(1) == [{"tls": True}]


async def test_mqtts_without_the_ca_fails_verification(tls_broker):
    bus = cascade_bus.connect(f"mqtts://127.0.0.1:{tls_broker.port}")
    async with asyncio.timeout(5.0):
        with pytest.raises(ConnectError, match=f"127.0.0.1:{tls_broker.port}") as raised:
            await bus.open()
    assert "certificate verify failed" in _all_messages(raised.value)
    del raised
    gc.collect()  # a socket leaked by the failed handshake would warn (an error) right here


async def test_mqtts_with_verification_off_connects(tls_broker):
    async with cascade_bus.connect(f"mqtts://127.0.0.1:{tls_broker.port}?tls_verify=false") as bus:
        assert bus.is_open


async def test_plain_mqtt_to_a_tls_listener_fails_fast(tls_broker):
    """Speaking plain MQTT to a TLS port: a bounded ConnectError, not a hang."""
    bus = cascade_bus.connect(f"mqtt://127.0.0.1:{tls_broker.port}")
    async with asyncio.timeout(5.0):
        with pytest.raises(ConnectError, match=f"127.0.0.1:{tls_broker.port}"):
            await bus.open()


async def test_mqtts_with_credentials(private_mosquitto, pki, unique_topic, kit):
    broker = private_mosquitto(
        users={USER: PASSWORD},
        extra_config=f"cafile {pki.ca}\ncertfile {pki.cert}\nkeyfile {pki.key}\n",
    )
    url = _url(broker.port).replace("mqtt://", "mqtts://") + f"?ca_file={pki.ca}"
    async with cascade_bus.connect(url) as bus:
        got = kit.Inbox()
        await bus.subscribe(f"{unique_topic}/#", got)
        await bus.publish(f"{unique_topic}/both", {"auth": "tls"})
        assert await got.wait_for(1) == [{"auth": "tls"}]
        _secret_free(repr(bus))
    wrong = _url(broker.port, USER, WRONG).replace("mqtt://", "mqtts://")
    bus = cascade_bus.connect(f"{wrong}?ca_file={pki.ca}")
    async with asyncio.timeout(5.0):
        with pytest.raises(ConnectError) as raised:
            await bus.open()
    _secret_free(_all_messages(raised.value))


def test_missing_ca_file_is_an_invalid_url(tmp_path):
    with pytest.raises(InvalidURL, match="TLS"):
        cascade_bus.connect(f"mqtts://127.0.0.1:8883?ca_file={tmp_path / 'nope.pem'}")
