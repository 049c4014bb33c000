"""Publishes awaiting the broker's confirmation: settled once, requeued when the link drops.

Publisher confirms settle each QoS 1 (and retained, and request) publish: ``basic.ack`` → done,
``basic.nack`` → `PublishError`, ``basic.return`` of a request → no responders. When the
connection drops, unconfirmed QoS 1 publishes go back to the front of the offline buffer and are
sent again after the reconnect (duplicates are possible, counted by the receiver); unconfirmed
QoS 0 ones are counted as ``disconnected`` drops. Also the fallback on aiormq's public API.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping
from typing import Any

import aiormq
from aiormq.abc import DeliveredMessage

from cascade_bus import BusClosed
from cascade_bus.spi import DropReason, OfflineBuffer, Outgoing, StatsRecorder

from . import _errors as errors
from ._retained import RETAIN_ID, TOPIC
from ._topics import routing_key
from ._wire import Wire, to_properties

__all__ = ["Inflight", "Out", "retained_properties"]


class Out(Outgoing):
    """A publish awaiting the broker's confirmation (requeued if the link drops)."""

    __slots__ = ("headers", "reply_to")

    def __init__(
        self,
        topic: str,
        data: bytes,
        qos: int,
        retain: bool,
        headers: Mapping[str, str] | None,
        reply_to: str | None,
        future: asyncio.Future[None] | None = None,
    ) -> None:
        super().__init__(topic, data, qos, retain, future)
        self.headers = headers
        self.reply_to = reply_to


def retained_properties(
    topic: str, headers: Mapping[str, str] | None, props: Any
) -> tuple[Any, Any]:
    """The log entry's and the live copy's properties of one retained publish (a shared id)."""
    rid = os.urandom(8).hex()
    log_props = to_properties(headers, True)
    log_props.headers = {**(log_props.headers or {}), TOPIC: topic, RETAIN_ID: rid}
    props.headers = {**(props.headers or {}), RETAIN_ID: rid}
    return log_props, props


class Inflight:
    """The unconfirmed publishes of one transport (a future of aiormq's -> its `Out`).

    Args:
        offline: The transport's offline buffer (requeues go to its front).
        stats: The transport's counters.
        endpoint: The masked endpoint, for errors.
        no_responders: Called with a request's ``reply_to`` when it came back unroutable.
        reconnect: Whether a lost connection will be reopened.
    """

    def __init__(
        self,
        offline: OfflineBuffer,
        stats: StatsRecorder,
        endpoint: str,
        no_responders: Callable[[str], None],
        reconnect: bool,
    ) -> None:
        self.outs: dict[asyncio.Future[Any], Out] = {}
        self._offline = offline
        self._stats = stats
        self._endpoint = endpoint
        self._no_responders_cb = no_responders
        self._reconnect = reconnect

    def track(self, confirm: asyncio.Future[Any], out: Out) -> None:
        """Settle ``out`` from the broker's confirmation ``confirm``."""
        self.outs[confirm] = out
        confirm.add_done_callback(self._confirmed)

    def _confirmed(self, confirm: asyncio.Future[Any]) -> None:
        out = self.outs.pop(confirm, None)
        if out is None or confirm.cancelled():
            return
        exc = confirm.exception()
        if isinstance(exc, aiormq.exceptions.PublishError) and out.reply_to:
            self._returned(exc.message, out)  # no queue is bound for the request's topic
        elif exc is not None:
            if isinstance(exc, aiormq.exceptions.DeliveryError):
                out.settle(errors.publish_refused(out.topic, exc.frame))
            return
        elif out.reply_to and isinstance(confirm.result(), DeliveredMessage):
            self._returned(confirm.result(), out)
        if out.retain and any(o is out for o in self.outs.values()):
            return  # the other half (log entry or live copy) of a retained publish is pending
        out.settle()

    def _returned(self, returned: Any, out: Out) -> None:
        """A request came back unroutable (mandatory): nobody is subscribed to its topic."""
        props = getattr(getattr(returned, "header", None), "properties", None)
        message_id = getattr(props, "message_id", None)
        if message_id and isinstance(returned, DeliveredMessage):
            getattr(returned.channel, "message_id_delivery_tag", {}).pop(message_id, None)
        if out.reply_to:
            self._no_responders_cb(out.reply_to)

    def settle_all(self, wire: Wire | None, *, requeue: bool) -> None:
        """The link is gone: requeue (or fail) the QoS 1 publishes, count lost QoS 0 ones."""
        if wire is not None:
            lost_qos0 = wire.abort(errors.lost(self._endpoint, None))
            confirmations: dict[int, Any] = getattr(wire.channel, "confirmations", {})
            for fut in list(confirmations.values()):
                if fut not in self.outs and not fut.done():
                    lost_qos0 += 1
                    fut.set_result(None)
            confirmations.clear()
            if lost_qos0:
                self._stats.drop(DropReason.DISCONNECTED, lost_qos0)
        outs = list(dict.fromkeys(self.outs.values()))  # a retained publish is tracked twice
        self.outs.clear()
        if requeue:
            self._offline.requeue(outs)
        else:
            for out in outs:
                out.settle(BusClosed("the AMQP transport was closed"))

    async def write_public(
        self,
        wire: Wire,
        log_name: str,
        out: Out,
    ) -> None:
        """The fallback on aiormq's public API: each publish awaits its confirmation."""
        topic, reply_to = out.topic, out.reply_to
        key = routing_key(topic)
        props = to_properties(out.headers, out.qos > 0 or out.retain, reply_to)
        try:
            if out.retain:
                log_props, props = retained_properties(topic, out.headers, props)
                await wire.public(log_name, out.data, log_props, "", None)
            message_id = os.urandom(8).hex() if reply_to else None
            await wire.public(key, out.data, props, wire.exchange, message_id)
        except aiormq.exceptions.PublishError as exc:  # returned: no queue for the topic
            if not reply_to:
                raise errors.publish_refused(topic, exc.frame) from exc
            self._no_responders_cb(reply_to)
        except aiormq.exceptions.DeliveryError as exc:
            raise errors.publish_refused(topic, exc.frame) from exc
        except errors.GONE:
            if not out.qos and not out.retain:
                self._stats.drop(DropReason.DISCONNECTED)
                return
            self._offline.hold(out, reconnecting=self._reconnect)
