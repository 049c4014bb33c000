"""aiomqtt/paho internals: building a client and taking over its socket callbacks.

aiomqtt integrates paho with asyncio (connect, keepalive); `install` hands the socket's reads
and writes to the `_Wire` instead (one ``send`` per burst, flow control), so the per-message
path never goes through aiomqtt's queue and tasks.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import aiomqtt
import paho.mqtt.client as paho_mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ._options import MqttOptions
from ._packets import _coalesce, _marker_props
from ._wire import _Wire

__all__ = ["abandon_connect", "close_client", "install", "new_client"]

log = logging.getLogger("cascade_bus.mqtt")


def new_client(o: MqttOptions, offline_presence: bytes) -> aiomqtt.Client:
    """A fresh aiomqtt client for ``o`` (one per connection attempt)."""
    v5 = o.version == 5
    # A retained will is marked like any retained publish (see RETAIN_PROPERTY).
    marker = _marker_props(PacketTypes.WILLMESSAGE) if v5 else None
    will = (
        aiomqtt.Will(
            o.will_topic,
            o.will_payload,
            o.will_qos,
            o.will_retain,
            marker if o.will_retain else None,
        )
        if o.will_topic
        else None
    )
    if o.presence_topic:
        will = aiomqtt.Will(o.presence_topic, offline_presence, 1, True, marker)
    properties = None
    if v5 and (not o.clean_start or o.receive_maximum):
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        if not o.clean_start:
            properties.SessionExpiryInterval = 0xFFFFFFFF
        if o.receive_maximum:
            properties.ReceiveMaximum = o.receive_maximum
    return aiomqtt.Client(
        o.host,
        o.port,
        username=o.username,
        password=o.password,
        identifier=o.client_id,
        protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
        keepalive=o.keepalive,
        clean_session=None if v5 else o.clean_start,
        # paho refuses any other clean_start with 3.1.1 (clean_session says it there).
        clean_start=(paho_mqtt.MQTT_CLEAN_START_FIRST_ONLY if o.clean_start or not v5 else False),
        properties=properties,
        tls_context=o.tls,
        transport=o.transport,
        websocket_path=o.ws_path if o.transport == "websockets" else None,
        # paho checks the host name itself unless told not to, even with tls_verify=false
        # (where there is no certificate to check: every connect would fail).
        tls_insecure=True if o.tls is not None and not o.tls.check_hostname else None,
        will=will,
        max_inflight_messages=o.max_inflight,
        socket_options=(((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),) if o.tcp_nodelay else ()),
        timeout=10.0,
    )


def install(
    client: aiomqtt.Client,
    wire: _Wire,
    on_message: Callable[[paho_mqtt.Client, _Wire, paho_mqtt.MQTTMessage], None],
    written_event: asyncio.Event,
) -> None:
    """Route ``client``'s socket through ``wire`` (call before connecting)."""
    paho = client._client
    paho.user_data_set(wire)  # so on_message knows the connection (aiomqtt ignores it)
    paho.on_message = on_message
    paho.manual_ack_set(True)  # PUBACK after the handlers ran (see _Ack)
    loop = asyncio.get_running_loop()

    # aiomqtt registers the socket for writing through call_soon_threadsafe; when the
    # connection dies before that callback runs (a broker going down with data queued), it
    # registers a closed file descriptor (an asyncio error with a traceback), or one already
    # reused by the next connection. Register only while the socket is still paho's.
    def writable() -> None:
        wire.armed = True
        wire.wrote = True
        try:
            if len(paho._out_packet) > 1:
                _coalesce(paho._out_packet)
            paho.loop_write()
        except Exception as exc:  # a broken pipe: the connection is gone
            wire.broken(exc)

    # paho asks for this once per burst (until it has written everything it queued). From
    # our own thread (publishes queued behind others, PUBACKs of received messages) the
    # packets are written at the next turn of the loop, which also gathers a burst into one
    # send; only if the socket cannot take them all does the loop watch it for writing. No
    # call_soon_threadsafe (a self-pipe write and wakeup) and no add/remove_writer
    # (two epoll_ctl) per publish, as aiomqtt does.
    loop_thread = threading.get_ident()

    def watch(sock: Any) -> None:
        wire.watching = True
        loop.add_writer(sock.fileno(), writable)

    def add(sock: Any) -> None:
        current = paho.socket()
        if current is not None and current is sock:
            watch(current)

    def write_soon(sock: Any) -> None:
        current = paho.socket()
        if current is None or current is not sock:
            return
        writable()
        if paho.want_write():  # the socket is full: wait until it drains
            watch(current)

    def register_write(_client: paho_mqtt.Client, userdata: Any, sock: Any) -> None:
        if threading.get_ident() == loop_thread:
            loop.call_soon(write_soon, sock)
        else:  # the CONNECT packet, queued by aiomqtt's connect in an executor thread
            loop.call_soon_threadsafe(add, sock)

    paho.on_socket_register_write = register_write

    # Own the socket reader too (aiomqtt's is replaced right after it registers it): the
    # wire reads (see _Wire), and a full subscription can pause reading: TCP then holds the
    # broker back (flow control). paho opens the socket before it queues CONNECT, so `own`
    # runs before CONNECT is written: the wire reads the connection from its first byte.
    on_socket_open = paho.on_socket_open

    def socket_open(_client: paho_mqtt.Client, userdata: Any, sock: Any) -> None:
        if on_socket_open is not None:
            on_socket_open(_client, userdata, sock)

        def own() -> None:
            current = paho.socket()
            if current is not None and current is sock:
                loop.remove_reader(current.fileno())
                wire.attach(current)
                loop.add_reader(current.fileno(), wire.readable)

        loop.call_soon_threadsafe(own)

    paho.on_socket_open = socket_open
    # Learn when paho has written everything it queued (flush, QoS 0 flow control).
    unregister = paho.on_socket_unregister_write

    def written(client: paho_mqtt.Client, userdata: Any, sock: Any) -> None:
        if wire.watching and unregister is not None:  # aiomqtt's: remove the writer
            wire.watching = False
            unregister(client, userdata, sock)
        written_event.set()

    paho.on_socket_unregister_write = written
    # aiomqtt ignores a connection that closes before CONNACK (a broker shutting down, a
    # proxy refusing) and waits out its whole timeout; fail the attempt at once instead.
    on_disconnect = paho.on_disconnect

    def disconnected(*args: Any) -> None:
        if on_disconnect is not None:
            on_disconnect(*args)
        loop.call_soon_threadsafe(abandon_connect, client)

    paho.on_disconnect = disconnected


def abandon_connect(client: aiomqtt.Client) -> None:
    """Fail a connect attempt still waiting for CONNACK: its connection is gone."""
    pending = client._connected
    if not pending.done():
        pending.set_exception(aiomqtt.MqttError("the connection closed before CONNACK"))
        pending.exception()  # whoever awaits it still gets it; no "never retrieved" noise


async def close_client(client: aiomqtt.Client) -> None:
    """Close ``client`` (DISCONNECT if it is still connected), bounded; never raises."""
    lost = client._disconnected
    if lost.done() and not lost.cancelled():
        lost.exception()  # retrieved: no "exception was never retrieved" noise
    try:
        async with asyncio.timeout(2.0):
            await client.__aexit__(None, None, None)
    except Exception as exc:  # it is gone either way
        log.debug("closing the MQTT client: %r", exc)
