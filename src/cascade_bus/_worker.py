"""The handler half of a subscription: one worker task calls the handler for each message.

`HandlerWorker._run` is the per-message hot path (decode, dedupe, middleware, handler, ack),
kept flat on purpose; failures are retried, dead-lettered or counted through the host, and a
failing handler never stops its subscription.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from inspect import isawaitable
from typing import TYPE_CHECKING, Any, cast

import msgspec

from ._sink import RECEIVED, Pushed, SubscriptionSink, as_decode_error
from ._stats import DropReason
from ._stub import envelope_of
from ._transport import Message

if TYPE_CHECKING:
    from ._envelope import Envelope

__all__ = ["HandlerWorker", "PayloadHandler"]

#: The queue length at which an in-process publisher waits for a handler subscription.
_LOCAL_HIGH_WATER = 64

#: Stands for a pushed item once its envelope is built: no ack, nothing to release.
_PUSHED = Message("", b"")

log = logging.getLogger("cascade_bus")


class PayloadHandler:
    """A handler that can also take ``(topic, payload)`` straight off the queue (the Connector).

    A subscription whose handler is one (and that has no middleware, dedupe, concurrency or
    type) calls ``await callback(topic, payload)`` without building an envelope, `shape`
    applied to payloads that are not dicts; the handler itself (``__call__(env)``, the same
    call) serves retries and dead-lettering, and every other case.
    """

    callback: Callable[[str, Any], Awaitable[None]]

    @staticmethod
    def shape(payload: Any) -> Any:
        """What the callback gets for a payload that is not a dict (default: it unchanged)."""
        return payload

    async def __call__(self, env: Envelope[Any]) -> None:
        payload = env.payload
        await self.callback(env.topic, payload if type(payload) is dict else self.shape(payload))


class HandlerWorker(SubscriptionSink):
    """Handler mode of a subscription: the worker task and its retries (see `Subscription`)."""

    def start(self, name: str, *, in_process: bool = False) -> None:
        """For the bus: start the worker task (named ``name``) of a handler subscription.

        ``in_process``: the transport is in this process (memory://), so publishers may `push`
        payload copies, and the queue stays short (a publisher that runs far ahead only
        adds cache misses).
        """
        handler = self._handler
        payloads = (
            isinstance(handler, PayloadHandler)
            and self._direct
            and self._sem is None
            and not self._policy.dedupe
            and self._json_copy is not None
        )
        run = self._run_payloads(handler) if payloads else self._run()  # type: ignore[arg-type]
        self._wrap = payloads  # its queue holds received messages wrapped (`RECEIVED`)
        # Untyped JSON, in order, no filter: an in-process publisher may hand over its copies.
        self.takes_payloads = (
            in_process
            and self._json_copy is not None
            and self._sem is None
            and self._filter is None
        )
        if self.takes_payloads:
            self._high = min(self._high, _LOCAL_HIGH_WATER)
            self._low = self._high // 2
            if self._overflow == "block":
                self._push_high = self._high
        self._task = asyncio.get_running_loop().create_task(run, name=name)

    async def _run_payloads(self, handler: PayloadHandler) -> None:
        """`_run` for a `PayloadHandler`: ``callback(topic, payload)``, no envelope built.

        Its queue holds `Pushed` items only, received messages wrapped as one (`RECEIVED`), so
        the payload's type check (a dict, or shape it) is the only one on the pushed path.
        """
        buf = self._buf
        callback = handler.callback
        shape = handler.shape
        json_copy = self._json_copy
        assert json_copy is not None
        decode = self._decode
        decode_local = self._decode_local
        stats = self._stats
        low = self._low
        loop = asyncio.get_running_loop()
        while True:
            if not buf:
                if self._closed:
                    return
                self._waiter = waiter = loop.create_future()
                await waiter
                continue
            item = buf.popleft()
            if self._room is not None and len(buf) <= low:
                self._made_room()
            topic, payload, extra = item  # type: ignore[misc]  # (always a 3-tuple here)
            if type(payload) is not dict:
                if payload is RECEIVED:  # a message from the transport
                    message: Message = extra  # type: ignore[assignment]  # (see RECEIVED)
                    local = message.local
                    try:
                        if local is not None and local[1] is not None and not local[2]:
                            payload = json_copy(local[1])
                        elif local is None:
                            payload = decode(topic, message.data, message.headers).payload
                        else:
                            payload = decode_local(local).payload
                        if type(payload) is not dict:
                            payload = shape(payload)
                    except Exception as exc:  # a bad message must never stop the subscription
                        stats.drop(DropReason.DECODE_ERROR)
                        self._host.report(as_decode_error(exc, topic), topic, None)
                        await self._finish(message)
                        continue
                    try:
                        await callback(topic, payload)
                    except Exception as exc:  # retried or reported with a fresh copy
                        try:
                            await self._failed(self._envelope(message), exc)
                        except asyncio.CancelledError:
                            stats.drop(self._end_reason)
                            raise
                    except asyncio.CancelledError:  # the subscription ended under it
                        stats.drop(self._end_reason)
                        raise
                    else:
                        stats.delivered += 1
                    if message.ack is None and self._progress is None:
                        self._processed += 1
                    else:
                        await self._finish(message)
                    continue
                payload = shape(payload)
            # pushed by a publisher in this process: ours alone
            try:
                await callback(topic, payload)
            except Exception as exc:  # retried or reported with a fresh copy
                try:
                    await self._failed(self._envelope(cast(Pushed, item)), exc)
                except asyncio.CancelledError:
                    stats.drop(self._end_reason)
                    raise
            except asyncio.CancelledError:  # the subscription ended under this message
                stats.drop(self._end_reason)
                raise
            else:
                stats.delivered += 1
            # (not counted in `_processed`: see `SubscriptionSink.push`)

    def _envelope(self, message: Message | Pushed) -> Envelope[Any]:
        """A fresh envelope of a message already decoded once (for retries and reports)."""
        if type(message) is tuple:
            return self._decode_local(message[2])
        assert isinstance(message, Message)
        local = message.local
        if local is None:
            env = self._decode(message.topic, message.data, message.headers)
        else:
            env = self._decode_local(local)
        return msgspec.structs.replace(env, retained=message.retained)

    async def _run(self) -> None:
        """Worker task: hand queued messages to the handler in order (FIFO)."""
        buf = self._buf
        invoke = self._invoke
        assert invoke is not None
        decode = self._decode
        decode_local = self._decode_local
        # Untyped JSON from a bus in this process, the common case: `decode_local` inlined.
        json_copy = self._json_copy
        replace = msgspec.structs.replace
        stats = self._stats
        report = self._host.report
        sem = self._sem
        seen_ids: dict[str, None] | None = {} if self._policy.dedupe else None
        loop = asyncio.get_running_loop()
        # A plain function without middleware is called here: no coroutine per message.
        plain = self._handler if self._direct and not self._is_async else None
        while True:
            if not buf:
                if self._closed:
                    return
                self._waiter = waiter = loop.create_future()
                await waiter
                continue
            item = buf.popleft()
            if self._room is not None and len(buf) <= self._low:
                self._made_room()
            try:
                if type(item) is tuple:  # pushed by a publisher in this process: ours alone
                    message = _PUSHED  # nothing to acknowledge
                    _, payload, (env, _, _) = item  # type: ignore[misc]  # (never wrapped here)
                    if type(env) is tuple:  # a `Stub`
                        env = envelope_of(env, payload)
                    else:
                        headers = env.headers
                        env = replace(
                            env, payload=payload, headers=dict(headers) if headers else {}
                        )
                else:
                    message = item  # type: ignore[assignment]  # (mypy: not narrowed)
                    local = message.local
                    if local is None:
                        env = decode(message.topic, message.data, message.headers)
                        if message.retained is not env.retained:  # receipt decides
                            env = replace(env, retained=message.retained)
                    elif json_copy is not None and local[1] is not None and not local[2]:
                        env = local[0]
                        if type(env) is tuple:  # a `Stub` (the Connector's publishes)
                            env = envelope_of(env, json_copy(local[1]))
                        else:
                            headers = env.headers
                            env = replace(
                                env,
                                payload=json_copy(local[1]),
                                headers=dict(headers) if headers else {},
                            )
                    else:  # (in-process messages are never retained replays)
                        env = decode_local(local)
            except Exception as exc:  # a bad message must never stop the subscription
                stats.drop(DropReason.DECODE_ERROR)
                report(as_decode_error(exc, message.topic), message.topic, None)
                await self._finish(message)
                continue
            if seen_ids is not None and self._seen_before(seen_ids, env.id):
                await self._finish(message)
                continue
            if sem is not None:
                await sem.acquire()
                task = loop.create_task(self._handle_concurrently(message, env, sem))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
                continue
            try:
                if plain is None:
                    await invoke(env)
                else:
                    result = plain(env)
                    if result is not None and isawaitable(result):
                        await result
            except Exception as exc:  # a handler's failure must not stop the subscription
                try:
                    await self._failed(env, exc)
                except asyncio.CancelledError:
                    stats.drop(self._end_reason)
                    raise
            except asyncio.CancelledError:  # the subscription ended under this message
                stats.drop(self._end_reason)
                raise
            else:
                stats.delivered += 1
            if message is _PUSHED:
                continue  # (not counted: see `SubscriptionSink.push`)
            if message.ack is None and self._progress is None:
                self._processed += 1  # `_finish` inline: no coroutine per message
            else:
                await self._finish(message)

    def _seen_before(self, seen_ids: dict[str, None], env_id: str) -> bool:
        """The ``dedupe`` window: True (counted) for an id among the last ones handled."""
        if env_id in seen_ids:
            self._stats.duplicates += 1
            self._stats.drop(DropReason.DUPLICATE)
            return True
        seen_ids[env_id] = None
        if len(seen_ids) > self._policy.dedupe:
            del seen_ids[next(iter(seen_ids))]  # oldest first: dicts keep insertion order
        return False

    async def _handle_concurrently(
        self, message: Message, env: Envelope[Any], sem: asyncio.Semaphore
    ) -> None:
        assert self._invoke is not None
        try:
            try:
                await self._invoke(env)
            except Exception as exc:
                await self._failed(env, exc)
            else:
                self._stats.delivered += 1
        except asyncio.CancelledError:  # the subscription ended under this message
            self._stats.drop(self._end_reason)
            raise
        finally:
            sem.release()
        await self._finish(message)

    async def _finish(self, message: Message) -> None:
        """Ack (at-least-once transports) and record progress for retained catch-up."""
        if message is _PUSHED:
            return  # nothing to acknowledge, and not counted (see `SubscriptionSink.push`)
        if message.ack is not None:
            await self._ack(message)
        self._processed += 1
        progress = self._progress
        if progress is not None and self._processed >= progress[0]:
            self._progress = None
            if not progress[1].done():
                progress[1].set_result(None)

    async def _failed(self, env: Envelope[Any], error: Exception) -> None:
        """A handler raised: retry with backoff, then dead-letter or count the failure."""
        policy = self._policy
        attempts = 1
        assert self._invoke is not None
        while attempts <= policy.retries and not self._closed:
            await asyncio.sleep(policy.retry_delay * 2 ** (attempts - 1))
            attempts += 1
            try:
                await self._invoke(env)
            except Exception as exc:
                error = exc
            else:
                self._stats.delivered += 1
                return
        if policy.dead_letter is not None:
            try:
                await self._host.dead_letter(policy.dead_letter, env, error, attempts)
            except Exception as exc:
                self._host.report(exc, env.topic, env)
            else:
                self._stats.dead_lettered += 1
                self._host.report(error, env.topic, env)
                return
        self._stats.drop(DropReason.HANDLER_ERROR)
        self._host.report(error, env.topic, env)

    async def caught_up(self, timeout: float) -> None:
        """For the bus: wait until the handler ran for all received so far (retained replay)."""
        if self._handler is None or self._processed >= self._received:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._progress = (self._received, fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            log.warning(
                "handler for %r did not finish the retained messages within %.1fs; "
                "subscribe() returns anyway",
                self.pattern,
                timeout,
            )
