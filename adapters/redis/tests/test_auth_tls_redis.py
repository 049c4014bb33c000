"""Authentication (requirepass, ACL users) and TLS (rediss://) on private redis-servers."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from cascade_bus import ConnectError, InvalidURL, UnsupportedFeature, connect
from cascade_bus.testing.brokers import free_port

pytestmark = [pytest.mark.redis, pytest.mark.fault]

SECRET = "s3cr/et@pw"  # with characters that need URL quoting


def quoted(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


async def round_trip(bus, topic: str, kit) -> None:
    inbox = kit.Inbox()
    await bus.publish(f"{topic}/kept", {"kept": True}, retain=True)
    await bus.subscribe(f"{topic}/#", inbox)
    await bus.publish(f"{topic}/live", {"n": 1}, qos=1)
    assert await inbox.wait_for(2) == [{"kept": True}, {"n": 1}]


async def test_requirepass(private_redis, open_bus, prefix, kit) -> None:
    broker = private_redis(extra_args=("--requirepass", SECRET))
    url = broker.url.replace("redis://", f"redis://:{quoted(SECRET)}@")
    bus = await open_bus(url)
    assert SECRET not in repr(bus)
    assert SECRET not in str(bus.url)
    await round_trip(bus, prefix, kit)
    bad = connect(broker.url.replace("redis://", "redis://:wrong@"))
    with pytest.raises(ConnectError) as info:
        await bad.open()
    assert "wrong" not in str(info.value)
    assert "credentials" in str(info.value) or "refused" in str(info.value)
    with pytest.raises(ConnectError):
        await connect(broker.url).open()  # no password at all


async def test_acl_user(private_redis, open_bus, prefix, kit) -> None:
    """An ACL user limited to the adapter's keys and to the channels it needs."""
    rules = ("alice", "on", f">{SECRET}", "~cascade_bus:*", "&*", "+@all", "-@dangerous")
    broker = private_redis(extra_args=("--user", *rules, "--user", "default", "off"))
    url = broker.url.replace("redis://", f"redis://alice:{quoted(SECRET)}@")
    bus = await open_bus(url)
    assert SECRET not in repr(bus.url)
    await round_trip(bus, prefix, kit)
    inbox = kit.Inbox()
    await bus.subscribe(f"{prefix}/q", inbox, qos=1, queue="w")
    await bus.publish(f"{prefix}/q", "job", qos=1)
    assert await inbox.wait_for(1) == ["job"]
    with pytest.raises(ConnectError) as info:
        await connect(broker.url.replace("redis://", "redis://alice:nope@")).open()
    assert "nope" not in str(info.value)


def test_unknown_options_and_clusters_are_refused() -> None:
    with pytest.raises(InvalidURL, match=r"unknown Redis option.*bogus"):
        connect("redis://127.0.0.1:6379?bogus=1")
    with pytest.raises(InvalidURL, match="Cluster"):
        connect("redis://a:6379,b:6379")
    with pytest.raises(InvalidURL, match="database"):
        connect("redis://127.0.0.1:6379/zero")
    assert connect("redis://127.0.0.1:6379/3").transport._opts.db == 3  # type: ignore[attr-defined]
    assert connect("redis://h?db=2").transport._opts.db == 2  # type: ignore[attr-defined]


WILL_OPTIONS = {
    "will_topic": "app/offline",
    "will_payload": "gone",
    "will_qos": "1",
    "will_retain": "true",
    "presence_topic": "app/status",
}


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379",
        "rediss://127.0.0.1:6379",
        "redis+cluster://127.0.0.1:7000,127.0.0.1:7001",
        "rediss+cluster://127.0.0.1:7000",
    ],
)
@pytest.mark.parametrize("option", sorted(WILL_OPTIONS))
def test_last_will_options_are_unsupported(url: str, option: str) -> None:
    """Every last-will option, as keyword or in the query, names the transport and feature."""
    scheme = url.split("://", 1)[0]
    for attempt in (
        lambda: connect(url, **{option: WILL_OPTIONS[option]}),
        lambda: connect(f"{url}?{option}={WILL_OPTIONS[option]}"),
    ):
        with pytest.raises(UnsupportedFeature) as info:
            attempt()
        assert info.value.transport == scheme
        assert info.value.feature == "last will"
        assert option in str(info.value)
        assert scheme in str(info.value)
    assert not connect(url.split(",")[0]).capabilities.will


@pytest.fixture
def certificate(tmp_path: Path) -> Path:
    """A self-signed certificate for 127.0.0.1 (it is its own CA); key next to it."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not found; install Debian's openssl to test rediss://")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert


async def test_tls(private_redis, open_bus, prefix, kit, certificate: Path) -> None:
    port = free_port()
    key = certificate.with_name("key.pem")
    broker = private_redis(
        port,
        extra_args=(
            "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(certificate),
            "--tls-key-file", str(key), "--tls-ca-cert-file", str(certificate),
            "--tls-auth-clients", "no", "--requirepass", SECRET,
        ),
    )  # fmt: skip
    base = f"rediss://:{quoted(SECRET)}@127.0.0.1:{broker.port}"
    bus = await open_bus(f"{base}?ca_file={certificate}")
    await round_trip(bus, prefix, kit)
    unverified = await open_bus(f"{base}?tls_verify=false")
    await unverified.publish(f"{prefix}/x", 1)
    with pytest.raises(ConnectError):
        await connect(base).open()  # the system CAs do not know our certificate
    with pytest.raises(ConnectError):
        await connect(
            f"redis://:{quoted(SECRET)}@127.0.0.1:{broker.port}"
        ).open()  # plain text against a TLS port
