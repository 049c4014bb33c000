"""Request/reply over any transport: a per-bus inbox subscription and one future per request.

`Bus.request` publishes with a unique ``reply_to`` and ``correlation_id`` and waits (bounded)
for the first reply; `Bus.reply` answers one. Transports that know there is no responder
(NATS, memory) make the request fail at once with `NoResponders`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, TypeVar, overload

from ._bus_subscribe import BusSubscribing
from ._envelope import Envelope, new_id
from ._errors import NoResponders, PublishError, RequestTimeout, UnsupportedFeature

__all__ = ["BusRequests"]

T = TypeVar("T")


class BusRequests(BusSubscribing):
    """Request and reply (part of `Bus`)."""

    @overload
    async def request(
        self,
        topic: str,
        payload: Any,
        *,
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
        type: None = None,
    ) -> Envelope[Any]: ...

    @overload
    async def request(
        self,
        topic: str,
        payload: Any,
        *,
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
        type: type[T],
    ) -> Envelope[T]: ...

    async def request(
        self,
        topic: str,
        payload: Any,
        *,
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
        type: Any = None,
    ) -> Envelope[Any]:
        """Publish a request and wait for the first reply.

        Each request gets a unique ``reply_to`` inbox and ``correlation_id``; a responder that
        publishes to ``env.reply_to`` (or calls `reply`) answers it.

        Args:
            topic: Where the responder listens.
            payload: The request payload.
            timeout: Seconds to wait for the reply.
            headers: Headers for the request.
            type: Convert the reply's payload into this type.

        Raises:
            NoResponders: the transport reports that nobody listens on ``topic`` (NATS,
                memory); raised at once.
            RequestTimeout: no reply within ``timeout``.
            DecodeError: the reply does not fit ``type``.
        """
        self._check_open()
        if not self.capabilities.request_reply:
            raise UnsupportedFeature(self._scheme, "request/reply")
        inbox = await self._ensure_inbox()
        cid = new_id()
        fut: asyncio.Future[Envelope[Any]] = asyncio.get_running_loop().create_future()
        self._replies[cid] = fut
        try:
            await self.publish(
                topic, payload, headers=headers, correlation_id=cid, reply_to=f"{inbox}/{cid}"
            )
            try:
                async with asyncio.timeout(timeout):
                    reply = await fut
            except NoResponders:
                raise NoResponders(f"no responder is subscribed to {topic!r}") from None
            except TimeoutError:
                raise RequestTimeout(
                    f"no reply to the request on {topic!r} within {timeout}s"
                ) from None
        finally:
            self._replies.pop(cid, None)
        if type is not None:
            import msgspec

            from ._errors import DecodeError

            try:
                converted = msgspec.convert(reply.payload, type)
            except msgspec.ValidationError as exc:
                raise DecodeError(
                    f"reply on {reply.topic!r} does not match {type}: {exc}"
                ) from None
            reply = msgspec.structs.replace(reply, payload=converted)
        return reply

    async def reply(
        self, request: Envelope[Any], payload: Any, *, headers: Mapping[str, str] | None = None
    ) -> None:
        """Answer a request envelope: publish to its ``reply_to`` with its correlation id.

        Raises:
            PublishError: the envelope has no ``reply_to``.
        """
        if not request.reply_to:
            raise PublishError(
                f"message {request.id} on {request.topic!r} has no reply_to", topic=request.topic
            )
        await self.publish(
            request.reply_to, payload, headers=headers, correlation_id=request.correlation_id
        )

    async def _ensure_inbox(self) -> str:
        prefix = f"{self._inbox_prefix}/{self.id}"
        if self._inbox is not None and not self._inbox.closed:
            return prefix
        if self._inbox_lock is None:
            self._inbox_lock = asyncio.Lock()
        async with self._inbox_lock:
            if self._inbox is None or self._inbox.closed:
                self._inbox = await self.subscribe(f"{prefix}/+", self._on_reply)
        return prefix

    def _on_no_responders(self, reply_to: str) -> None:
        fut = self._replies.get(reply_to.rsplit("/", 1)[-1])
        if fut is not None and not fut.done():
            fut.set_exception(NoResponders("no responder"))

    def _on_reply(self, env: Envelope[Any]) -> None:
        cid = env.correlation_id or env.topic.rsplit("/", 1)[-1]
        fut = self._replies.get(cid) or self._replies.get(env.topic.rsplit("/", 1)[-1])
        if fut is not None and not fut.done():
            fut.set_result(env)
