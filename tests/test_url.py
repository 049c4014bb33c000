"""BusURL parsing, option merging, and the rule that a password never shows."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

import cascade_bus
from cascade_bus import BusError, BusURL, InvalidURL, UnknownScheme

SECRET = "s3cr3t-Pa55"


def test_scheme_is_lowercased() -> None:
    url = BusURL("MQTT://broker:1883")
    assert url.scheme == "mqtt"
    assert str(url) == "mqtt://broker:1883"


def test_host_port_path_and_options() -> None:
    url = BusURL("nats://broker.example:4222/some/path?client_id=abc&keepalive=30&empty=")
    assert url.hosts == (("broker.example", 4222),)
    assert url.host == "broker.example"
    assert url.port == 4222
    assert url.path == "/some/path"
    assert url.name == "some/path"
    assert url.options == {"client_id": "abc", "keepalive": "30", "empty": ""}
    assert url.username is None
    assert url.password is None


def test_query_values_are_percent_decoded() -> None:
    url = BusURL("mqtt://h?client_id=a%2Fb%20c&x=%3D")
    assert url.options == {"client_id": "a/b c", "x": "="}


def test_no_port_and_no_host() -> None:
    assert BusURL("redis://cache").hosts == (("cache", None),)
    assert BusURL("redis://cache").port is None
    empty = BusURL("memory://")
    assert empty.hosts == ()
    assert empty.host is None
    assert empty.port is None
    assert empty.name == ""


def test_memory_name_is_the_host() -> None:
    url = BusURL("memory://bench")
    assert url.host == "bench"
    assert url.path == ""


def test_userinfo_with_percent_escapes() -> None:
    url = BusURL("mqtt://us%40er:p%3Ass%40w%2Fd@h:1883")
    assert url.username == "us@er"
    assert url.password == "p:ss@w/d"
    assert url.hosts == (("h", 1883),)
    # unmasked() hands the real credentials to a client library, escaped again.
    assert BusURL(url.unmasked()).password == "p:ss@w/d"
    assert BusURL(url.unmasked()).username == "us@er"


def test_username_without_password() -> None:
    url = BusURL("mqtt://alice@h")
    assert url.username == "alice"
    assert url.password is None
    assert str(url) == "mqtt://alice@h"


def test_several_hosts() -> None:
    url = BusURL("nats://u:pw@a:1,b:2,c/x")
    assert url.hosts == (("a", 1), ("b", 2), ("c", None))
    assert url.host == "a"
    assert url.port == 1
    assert url.endpoint() == "nats://a:1,b:2,c/x"
    assert str(url) == "nats://u:[secure]@a:1,b:2,c/x"


def test_ipv6_host() -> None:
    url = BusURL("mqtt://[::1]:1883")
    assert url.hosts == (("::1", 1883),)
    assert url.host == "::1"
    assert url.port == 1883
    assert str(url) == "mqtt://[::1]:1883"


def test_ipv6_cluster() -> None:
    url = BusURL("mqtt://[::1]:1,[fe80::2]:2,plain:3")
    assert url.hosts == (("::1", 1), ("fe80::2", 2), ("plain", 3))
    assert str(url) == "mqtt://[::1]:1,[fe80::2]:2,plain:3"


def test_ipv6_endpoint_keeps_brackets() -> None:
    # "mqtt://::1:1883" would be ambiguous (is 1883 a port or part of the address?).
    assert BusURL("mqtt://[::1]:1883").endpoint() == "mqtt://[::1]:1883"


@pytest.mark.parametrize(
    "text",
    [
        "mqtt://h:abc",
        "mqtt://h:0",
        "mqtt://h:65536",
        "mqtt://h:-1",
        "mqtt://a:1,b:x",
        "mqtt://[::1]:port",
    ],
)
def test_bad_port(text: str) -> None:
    with pytest.raises(InvalidURL, match="invalid port"):
        BusURL(text)


@pytest.mark.parametrize("text", ["localhost:1883", "mqtt:/h", "", "just-a-name"])
def test_no_scheme(text: str) -> None:
    with pytest.raises(InvalidURL, match="scheme://"):
        BusURL(text)


@pytest.mark.parametrize("text", ["://h", "m q://h", "mq!tt://h"])
def test_bad_scheme(text: str) -> None:
    with pytest.raises(InvalidURL, match="scheme"):
        BusURL(text)


def test_unparsable_query() -> None:
    with pytest.raises(InvalidURL, match="query"):
        BusURL("mqtt://h?novalue")


def test_not_a_string() -> None:
    with pytest.raises(InvalidURL, match="must be a str"):
        BusURL(b"mqtt://h")  # type: ignore[arg-type]


def test_invalid_url_is_a_bus_error_and_value_error() -> None:
    with pytest.raises(BusError):
        BusURL("nope")
    with pytest.raises(ValueError):
        BusURL("nope")


# -- options -----------------------------------------------------------------------------------


def test_merged_options_keywords_win() -> None:
    url = BusURL("mqtt://h?keepalive=30&client_id=from-url&format=raw")
    merged = url.merged_options({"keepalive": 5, "clean": True})
    assert merged == {"keepalive": 5, "client_id": "from-url", "format": "raw", "clean": True}
    # The URL itself is not modified.
    assert url.options == {"keepalive": "30", "client_id": "from-url", "format": "raw"}


def test_equality_and_hash_include_credentials() -> None:
    assert BusURL("mqtt://u:a@h") == BusURL("MQTT://u:a@h")
    assert hash(BusURL("mqtt://u:a@h")) == hash(BusURL("mqtt://u:a@h"))
    assert BusURL("mqtt://u:a@h") != BusURL("mqtt://u:b@h")
    assert BusURL("mqtt://h") != "mqtt://h"


# -- the password never shows ------------------------------------------------------------------

PASSWORD_URLS = [
    f"mqtt://user:{SECRET}@broker:1883",
    f"mqtts://user:{SECRET}@a:1,b:2/path?client_id=x",
    f"nats://user:{SECRET}@[::1]:4222",
    f"redis://:{SECRET}@cache:6379/0",
    f"memory://user:{SECRET}@name",
]


@pytest.mark.parametrize("text", PASSWORD_URLS)
def test_password_is_masked_everywhere(text: str) -> None:
    url = BusURL(text)
    assert url.password == SECRET
    for shown in (repr(url), str(url), url.redacted(), url.endpoint(), f"{url}", f"{url!r}"):
        assert SECRET not in shown
    assert "[secure]" in url.redacted()
    assert SECRET not in url.endpoint()
    assert "user" not in url.endpoint()
    assert SECRET in url.unmasked()


def test_percent_escaped_password_is_masked_in_both_forms() -> None:
    url = BusURL("mqtt://u:p%40ss%2Fw@h")
    assert url.password == "p@ss/w"
    for shown in (repr(url), str(url), url.redacted(), url.endpoint()):
        assert "p@ss/w" not in shown
        assert "p%40ss%2Fw" not in shown


@pytest.mark.parametrize(
    "text",
    [
        f"mqtt://u:{SECRET}@h:abc",  # bad port
        f"mqtt://u:{SECRET}@h:99999",
        f"mqtt://u:{SECRET}@a:1,b:bad",
        f"mqtt://u:{SECRET}@h?novalue",  # bad query
        f"u:{SECRET}@h:1883",  # no scheme
        f"m q://u:{SECRET}@h",  # bad scheme
        f"mqtt://u:{SECRET}@[::1:1883",  # unclosed IPv6 bracket
        f"mqtt://u:{SECRET}@[not-an-address]:1883",
        # Users forget to percent-escape reserved characters in passwords; with a bad port the
        # error must still hide the whole password:
        "mqtt://u:sec/ret-Pa55@h:bad",
        "mqtt://u:sec?ret-Pa55@h:bad",
    ],
)
def test_invalid_url_errors_never_show_the_password(text: str) -> None:
    password = text.split("://")[-1].split(":", 1)[1].rsplit("@", 1)[0]
    with pytest.raises(InvalidURL) as info:
        BusURL(text)
    assert password not in str(info.value)
    assert password not in repr(info.value)
    # nor in a chained cause a traceback would print
    cause = info.value.__cause__ or info.value.__context__
    assert cause is None or password not in str(cause)


@pytest.mark.parametrize("password", ["sec/ret", "sec?ret", "sec@ret", "sec#ret"])
def test_unescaped_reserved_characters_in_a_password_parse(password: str) -> None:
    url = BusURL(f"mqtt://u:{password}@h:1883/p?a=1")
    assert url.password == password
    assert (url.host, url.port, url.path, url.options) == ("h", 1883, "/p", {"a": "1"})
    assert password not in repr(url)
    assert password not in url.redacted()


async def test_bus_repr_and_url_hide_the_password() -> None:
    name = f"url-{uuid.uuid4().hex}"
    bus = cascade_bus.connect(f"memory://user:{SECRET}@{name}")
    assert SECRET not in repr(bus)
    async with bus:
        assert SECRET not in repr(bus)
        assert SECRET not in str(bus.url)
        assert SECRET not in repr(bus.url)
        assert SECRET not in repr(bus.transport.url)
        assert bus.url.password == SECRET
    assert SECRET not in repr(bus)


@pytest.mark.parametrize(
    ("text", "options"),
    [
        (f"nosuch://u:{SECRET}@h", {}),
        (f"mqqt://u:{SECRET}@h:1883", {}),
        (f"memory://u:{SECRET}@h?bogus=1", {}),
        (f"memory://u:{SECRET}@h", {"bogus": 1}),
        (f"memory://u:{SECRET}@h", {"buffer_size": "lots"}),
        (f"memory://u:{SECRET}@h", {"format": "xml"}),
        (f"memory://u:{SECRET}@h:nan", {}),
    ],
)
def test_connect_errors_never_show_the_password(text: str, options: dict[str, Any]) -> None:
    with pytest.raises(InvalidURL) as info:
        cascade_bus.connect(text, **options)
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value)
    if isinstance(info.value, UnknownScheme):
        assert all(SECRET not in k for k in info.value.known)
