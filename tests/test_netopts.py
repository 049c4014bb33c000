"""The adapter kit's shared network options: one parser, one name per meaning."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from cascade_bus import InvalidURL
from cascade_bus.spi import NETWORK_OPTIONS, NetworkOptions, tls_context


def test_defaults() -> None:
    net = NetworkOptions.parse({}, scheme="mqtt", tls=False)
    assert net == NetworkOptions(True, 0.05, 5.0, 10_000, None)


def test_values_from_a_url_query_are_strings() -> None:
    net = NetworkOptions.parse(
        {"reconnect": "false", "reconnect_min": "0.5", "reconnect_max": "2", "offline_buffer": "3"},
        scheme="nats",
        tls=False,
    )
    assert (net.reconnect, net.reconnect_min, net.reconnect_max, net.offline_buffer) == (
        False,
        0.5,
        2.0,
        3,
    )


def test_a_large_minimum_raises_the_default_maximum() -> None:
    assert NetworkOptions.parse({"reconnect_min": 9}, scheme="x", tls=False).reconnect_max == 9


@pytest.mark.parametrize(
    ("opts", "named"),
    [
        ({"reconnect_min": 0}, "reconnect_min"),
        ({"reconnect_min": 2, "reconnect_max": 1}, "reconnect_max"),
        ({"offline_buffer": -1}, "offline_buffer"),
        ({"offline_buffer": "many"}, "offline_buffer"),
        ({"reconnect": "perhaps"}, "reconnect"),
    ],
)
def test_bad_values_name_the_option(opts: dict[str, object], named: str) -> None:
    with pytest.raises(InvalidURL, match=named):
        NetworkOptions.parse(opts, scheme="redis", tls=False)


def test_tls_context_verifies_by_default_and_can_be_told_not_to() -> None:
    strict = NetworkOptions.parse({}, scheme="mqtts", tls=True).tls
    assert isinstance(strict, ssl.SSLContext)
    assert strict.check_hostname
    assert strict.verify_mode == ssl.CERT_REQUIRED
    loose = tls_context({"tls_verify": "false"}, "rediss")
    assert not loose.check_hostname
    assert loose.verify_mode == ssl.CERT_NONE


def test_unreadable_tls_files_are_a_typed_error_naming_the_scheme(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(InvalidURL, match="rediss://"):
        tls_context({"ca_file": str(missing)}, "rediss")


def test_the_option_names_are_the_shared_ones() -> None:
    assert {"reconnect_min", "reconnect_max", "offline_buffer", "tls_verify"} <= NETWORK_OPTIONS
