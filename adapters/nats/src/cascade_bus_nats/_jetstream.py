"""JetStream setup: the QoS-1 stream, the retained bucket, the QoS-1 consumers, their repair.

Created with ``replicas`` copies (``auto``: 3 in a cluster, else 1), checked again and re-created
after a reconnect (`JetStream.repair`); calls JetStream cannot answer for a moment (leader
elections) are retried (`JetStream.retry`).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import nats.errors as nats_errors
import nats.js.errors as js_errors
from nats.js import api as js_api
from nats.js.manager import JetStreamManager

from cascade_bus import ConnectError

from ._errors import jetstream_error, placement_error, transient
from ._mapper import subject_from_topic
from ._options import NatsOptions
from ._routing import Consumer, Entry, nsub
from ._wire import INBOX

if TYPE_CHECKING:
    from ._transport import NatsTransport

__all__ = ["JetStream"]

log = logging.getLogger("cascade_bus.nats")
_T = TypeVar("_T")
# JetStream's errors for replicas it cannot place: no suitable peers, insufficient resources,
# replicas > 1 on a server that is not clustered.
PLACEMENT_ERRORS = frozenset({10005, 10023, 10074})


async def _false() -> bool:
    return False


class JetStream:
    """The transport's JetStream state: its manager, the stream and bucket, consumer names.

    Args:
        transport: The transport it serves (connection, subscriptions, state).
        opts: The transport's options.
    """

    def __init__(self, transport: NatsTransport, opts: NatsOptions) -> None:
        self.t = transport
        self.opts = opts
        self.jsm: JetStreamManager | None = None
        self.kv_stream = f"KV_{opts.retain_bucket}"
        self.kv_direct = False
        """Read retained values with direct gets (see `_set_kv_reads`)."""
        self._warned: set[str] = set()
        self._consumer_ids = itertools.count(1)

    async def ensure(self, jsm: JetStreamManager | None = None) -> bool:
        """Create the stream and the bucket if missing; True when the stream was (re)created.

        Raises:
            ConnectError: JetStream is not available, or the names clash with other streams.
        """
        try:
            results = await asyncio.gather(
                self._ensure_stream(jsm),
                self._ensure_bucket(jsm) if self.opts.retain else _false(),
            )
        except (
            js_errors.ServiceUnavailableError,
            nats_errors.NoRespondersError,
            js_errors.APIError,
        ) as exc:
            raise jetstream_error(exc, self.t.url.endpoint()) from exc
        return bool(results[0])

    def replicas(self) -> int:
        """The replicas to create the stream and the bucket with (see ``replicas``).

        ``auto``: 3 on a server that is part of a cluster of at least three (its INFO names a
        cluster; ``connect_urls``, when advertised, lists its members), else 1.
        """
        wanted = self.opts.replicas
        if wanted:
            return wanted
        nc = self.t._nc
        info: dict[str, Any] = getattr(nc, "_server_info", None) or {}
        if not info.get("cluster"):
            return 1
        members = info.get("connect_urls")
        return 1 if isinstance(members, list) and 0 < len(members) < 3 else 3

    async def _create_replicated(
        self, what: str, create: Callable[[int], Awaitable[_T]]
    ) -> tuple[_T, int]:
        """Create a stream with `_replicas` replicas; ``auto`` falls back to 1 if refused.

        Returns what ``create`` returned and the replicas it was given.

        Raises:
            ConnectError: JetStream cannot place an explicit ``replicas`` count.
        """
        replicas = self.replicas()
        try:
            return await create(replicas), replicas
        except js_errors.APIError as exc:
            if replicas == 1 or exc.err_code not in PLACEMENT_ERRORS:
                raise
            if self.opts.replicas:
                raise placement_error(exc, self.t.url.endpoint(), what, replicas) from exc
            log.warning(
                "JetStream on %s cannot place %d replicas of %s (%s); created with 1: it "
                "is lost with the server holding it",
                self.t.url.endpoint(),
                replicas,
                what,
                exc.description,
            )
        return await create(1), 1

    def _check_replicas(self, what: str, have: int | None) -> int:
        """Warn (once) when an existing stream has fewer replicas than wanted; return its count."""
        have = have or 1
        wanted = self.replicas()
        if have < wanted and what not in self._warned:
            self._warned.add(what)
            log.warning(
                "%s on %s has %d replica(s), fewer than the %d wanted (replicas=%s); it is "
                "used as it is (raise it with `nats stream edit --replicas`)",
                what,
                self.t.url.endpoint(),
                have,
                wanted,
                self.opts.replicas or "auto",
            )
        return have

    async def _ensure_stream(self, jsm: JetStreamManager | None = None) -> bool:
        jsm = jsm or self.jsm
        assert jsm is not None
        opts = self.opts
        wanted = self.t._q1_prefix + ">"
        what = f"the stream {opts.stream!r}"
        try:
            info = await jsm.stream_info(opts.stream)
        except js_errors.NotFoundError:

            def config(replicas: int) -> js_api.StreamConfig:
                return js_api.StreamConfig(
                    name=opts.stream,
                    description="cascade-bus QoS 1 messages",
                    subjects=[wanted],
                    retention=js_api.RetentionPolicy.INTEREST
                    if opts.stream_retention == "interest"
                    else js_api.RetentionPolicy.LIMITS,
                    max_bytes=opts.stream_max_bytes or None,
                    discard=js_api.DiscardPolicy.OLD,
                    storage=js_api.StorageType.FILE
                    if opts.stream_storage == "file"
                    else js_api.StorageType.MEMORY,
                    max_age=opts.stream_max_age or None,
                    duplicate_window=120.0,
                    num_replicas=replicas,
                )

            try:
                await self._create_replicated(
                    what, lambda replicas: jsm.add_stream(config(replicas))
                )
                return True
            except js_errors.BadRequestError:  # created concurrently by another client
                info = await jsm.stream_info(opts.stream)
        else:
            self._check_replicas(what, info.config.num_replicas)
        if wanted not in (info.config.subjects or []):
            raise ConnectError(
                f"stream {opts.stream!r} on {self.t.url.endpoint()} does not capture {wanted!r} "
                f"(it has {info.config.subjects}); choose another ?stream= or ?qos1_prefix="
            )
        return False

    async def _ensure_bucket(self, jsm: JetStreamManager | None = None) -> bool:
        jsm = jsm or self.jsm
        assert jsm is not None
        what = f"the bucket {self.opts.retain_bucket!r}"
        try:
            info = await jsm.stream_info(self.kv_stream)
        except js_errors.NotFoundError:
            js = cast(Any, self.t._nc).jetstream(timeout=self.opts.ack_timeout)
            try:
                kv, replicas = await self._create_replicated(
                    what,
                    lambda replicas: js.create_key_value(
                        bucket=self.opts.retain_bucket,
                        history=1,
                        direct=True,
                        description="cascade-bus retained messages",
                        replicas=replicas,
                    ),
                )
                self._set_kv_reads(bool(kv._direct), replicas)
                return True
            except js_errors.BadRequestError:
                info = await jsm.stream_info(self.kv_stream)
        else:
            self._check_replicas(what, info.config.num_replicas)
        self._set_kv_reads(bool(info.config.allow_direct), info.config.num_replicas or 1)
        return False

    def _set_kv_reads(self, direct: bool, replicas: int) -> None:
        """Read retained values with direct gets only from an unreplicated bucket.

        Every replica answers a direct get, and a follower may not have applied the newest
        write yet; a replicated bucket is read through its leader (``STREAM.MSG.GET``), which
        has every acknowledged write.
        """
        self.kv_direct = direct and replicas == 1

    async def repair(self) -> bool:
        """Re-create the stream, bucket and QoS-1 consumers the server lost (bounded retries).

        A restarted server answers nothing while JetStream reloads its store, so the checks
        start with short timeouts; once they pass, QoS-1 messages still waiting for an ack are
        sent again at once (the stream drops copies it already has) instead of after
        ``ack_timeout``: the server may have swallowed them while it was not ready.
        """
        nc = self.t._nc
        if nc is None:
            return False
        started = asyncio.get_running_loop().time()
        timeout = 0.25
        for _ in range(30):
            if self.t._closing or not nc.is_connected or nc is not self.t._nc:
                return False
            jsm = JetStreamManager(nc, timeout=timeout)
            try:
                fresh = await self.ensure(jsm)
                for entry in list(self.t._entries):
                    for consumer in entry.consumers:
                        await self._ensure_consumer(consumer, fresh, jsm)
            except (ConnectError, nats_errors.Error, TimeoutError) as exc:
                log.info("JetStream on %s not ready yet: %s", self.t.url.endpoint(), exc)
                await asyncio.sleep(min(timeout, 0.5))  # it may still be loading its store
                timeout = min(timeout * 2, self.opts.ack_timeout)
                continue
            if nc.is_connected:
                self.t._inflight.resend_older(started)
                return True
            return False
        log.error("could not restore the JetStream stream/consumers on %s", self.t.url.endpoint())
        return False

    async def _ensure_consumer(
        self, consumer: Consumer, stream_recreated: bool, jsm: JetStreamManager | None = None
    ) -> None:
        jsm = jsm or self.jsm
        assert jsm is not None
        try:
            await jsm.consumer_info(self.opts.stream, consumer.name)
            return
        except js_errors.NotFoundError:
            pass
        if consumer.entry.closed:
            return
        start = None if stream_recreated else consumer.start_sequence()
        log.warning(
            "QoS-1 consumer %s for %r was gone on %s; re-created%s",
            consumer.name,
            consumer.entry.pattern,
            self.t.url.endpoint(),
            f" from stream sequence {start}" if start else "",
        )
        await self._create_consumer(
            consumer, start, everything=stream_recreated, queue=consumer.entry.queue, jsm=jsm
        )

    def _consumer_names(self, native: str, queue: str | None) -> tuple[str, str, str]:
        """(durable name, deliver subject, kind) of a QoS-1 consumer (see `Consumer`)."""
        stream = self.opts.stream
        if queue is not None:
            # Every member of the queue group, in any process, must find the same consumer.
            digest = hashlib.sha256(f"{stream}\0{queue}\0{native}".encode()).hexdigest()[:24]
            return f"cbusq_{digest}", f"{INBOX}cbusq.{digest}", "shared"
        client_id = self.opts.client_id
        if client_id is not None:
            # The next bus with this client_id finds the same consumer and resumes it.
            digest = hashlib.sha256(f"{stream}\0{client_id}\0{native}".encode()).hexdigest()[:24]
            return f"cbusd_{digest}", f"{INBOX}cbusd.{digest}", "resumable"
        nc = self.t._nc
        assert nc is not None
        return f"cbus_{self.t._uid}_{next(self._consumer_ids)}", nc.new_inbox(), "private"

    async def add_consumer(self, entry: Entry, native: str, queue: str | None) -> None:
        nc = self.t._nc
        assert nc is not None
        name, deliver, kind = self._consumer_names(native, queue)
        consumer = Consumer(entry, name, self.t._q1_prefix + native, deliver, kind)
        entry.consumers.append(consumer)
        nqueue = subject_from_topic(queue) if queue else ""
        # Interest first, then the consumer: nothing it pushes can miss us.
        entry.nsubs.append(await nsub(nc, self.t._router, deliver, nqueue, consumer.route))
        await self.retry(
            lambda: self._create_consumer(consumer, None, everything=False, queue=queue)
        )

    async def retry(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """Run a JetStream call, again while JetStream cannot answer for a moment.

        In a cluster, a node that just died takes leaders with it (the meta group's, a
        stream's); until their elections end, API calls time out or answer 503. Retried with
        backoff until ``qos1_timeout`` (the bus's ``subscribe_timeout`` may end it sooner).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.opts.qos1_timeout
        delay = 0.05
        while True:
            try:
                return await call()
            except Exception as exc:
                if self.t._closed or loop.time() + delay >= deadline or not transient(exc):
                    raise
                log.info("JetStream on %s busy (%r); trying again", self.t.url.endpoint(), exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _create_consumer(
        self,
        consumer: Consumer,
        start: int | None,
        *,
        everything: bool,
        queue: str | None,
        jsm: JetStreamManager | None = None,
    ) -> None:
        jsm = jsm or self.jsm
        assert jsm is not None
        opts = self.opts
        if everything:
            policy = js_api.DeliverPolicy.ALL
        elif start is not None:
            policy = js_api.DeliverPolicy.BY_START_SEQUENCE
        else:
            policy = js_api.DeliverPolicy.NEW
        config = js_api.ConsumerConfig(
            durable_name=consumer.name,
            deliver_subject=consumer.deliver,
            deliver_group=subject_from_topic(queue) if queue else None,
            filter_subject=consumer.filter,
            deliver_policy=policy,
            opt_start_seq=start if policy is js_api.DeliverPolicy.BY_START_SEQUENCE else None,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=opts.ack_wait,
            max_ack_pending=opts.max_ack_pending,
            inactive_threshold=opts.consumer_inactive or None,
            description=f"cascade-bus QoS 1: {consumer.entry.pattern}"[:200],
        )
        try:
            await jsm.add_consumer(opts.stream, config)
        except js_errors.BadRequestError:
            if consumer.kind == "private":
                raise
            # The group's (or this client_id's) consumer exists with other settings: use it.
            info = await jsm.consumer_info(opts.stream, consumer.name)
            if info.config.deliver_subject != consumer.deliver:
                raise

    async def delete_consumer(self, stream: str, name: str) -> None:
        jsm = self.jsm
        if jsm is None:
            return
        try:
            async with asyncio.timeout(2.0):
                await jsm.delete_consumer(stream, name)
        except (nats_errors.Error, TimeoutError) as exc:
            log.debug("deleting consumer %s/%s: %r", stream, name, exc)
