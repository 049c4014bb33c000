"""Conformance cases: the Cascade `Connector` scenarios (constraints, telemetry, reconnects)."""

from __future__ import annotations

from typing import Any

from ._base import SuiteBase
from ._helpers import (
    CallbackRecorder,
    ConnectorFactory,
)

__all__ = ["CascadeCases"]


class CascadeCases(SuiteBase):
    """The Cascade `Connector` facade: retained constraints, telemetry, reconnects, publish."""

    # -- the Cascade Connector -----------------------------------------------------------------

    async def test_cascade_retained_pause_in_force_before_subscribe_returns(
        self, make_connector: ConnectorFactory, unique: str
    ) -> None:
        """A retained pause has reached the engine when its subscribe() returns."""
        run = f"conf-{unique}"
        constraint = f"cascade/constraints/{run}"
        controller = make_connector()
        await controller.connect()
        assert controller.bus is not None
        self.require(controller.bus, "retain", "wildcards")
        qos = min(1, controller.bus.capabilities.max_qos)
        await controller.publish(constraint, {"paused": True}, qos=qos, retain=True)
        await controller.disconnect()  # the controller may be gone before the engine starts
        assert controller.publish_failures == 0

        engine = make_connector()
        await engine.connect()
        seen = CallbackRecorder(keep=lambda t: t.startswith(constraint))
        await engine.subscribe("cascade/constraints/#", seen)
        assert seen.calls == [(constraint, {"paused": True})]

        # Nested constraint topics under the run work the same way.
        await engine.publish(f"{constraint}/task-a", {"paused": True}, qos=qos, retain=True)
        await seen.wait_for(lambda: len(seen.calls) == 2, "the live constraint", self.wait_timeout)
        late = CallbackRecorder()
        await engine.subscribe(f"{constraint}/#", late)
        assert sorted(late.calls) == [
            (constraint, {"paused": True}),
            (f"{constraint}/task-a", {"paused": True}),
        ]
        for name in (constraint, f"{constraint}/task-a"):
            await engine.publish(name, {}, qos=qos, retain=True)
        assert engine.publish_failures == 0

    async def test_cascade_resume_by_empty_retained_payload(
        self, make_connector: ConnectorFactory, unique: str
    ) -> None:
        """Clearing with ``{}`` reaches the engine as ``{}`` within 1 s; nothing stays retained."""
        constraint = f"cascade/constraints/conf-{unique}"
        controller, engine = make_connector(), make_connector()
        await controller.connect()
        await engine.connect()
        assert controller.bus is not None
        self.require(controller.bus, "retain", "wildcards")
        await controller.publish(constraint, {"paused": True, "reason": "test"}, retain=True)
        seen = CallbackRecorder(keep=lambda t: t == constraint)
        await engine.subscribe("cascade/constraints/#", seen)
        assert seen.calls == [(constraint, {"paused": True, "reason": "test"})]
        await controller.publish(constraint, {}, retain=True)
        await seen.wait_for(lambda: len(seen.calls) == 2, "the resume", timeout=1.0)
        assert seen.calls[1] == (constraint, {})
        newcomer = CallbackRecorder()
        await engine.subscribe(constraint, newcomer)
        assert newcomer.calls == []  # the pause is gone for good
        for empty in ("", b"", None):  # the other empty forms clear too (and reach us as {})
            await controller.publish(constraint, {"paused": True}, retain=True)
            await controller.publish(constraint, empty, retain=True)
        await seen.wait_for(lambda: len(seen.calls) == 8, "3 more pause/resume", self.wait_timeout)
        assert [p for _, p in seen.calls[2:]] == [{"paused": True}, {}] * 3
        late = CallbackRecorder()
        await engine.subscribe(constraint, late)
        assert late.calls == []
        assert controller.publish_failures == 0

    async def test_cascade_telemetry(self, make_connector: ConnectorFactory, unique: str) -> None:
        """Telemetry on ``cascade/telemetry/+/+/+/events`` arrives with concrete topics."""
        run = f"conf-{unique}"
        engine, watcher = make_connector(), make_connector()
        await engine.connect()
        await watcher.connect()
        assert watcher.bus is not None
        self.require(watcher.bus, "wildcards")
        seen = CallbackRecorder(keep=lambda t: t.split("/")[2:3] == [run])
        await watcher.subscribe("cascade/telemetry/+/+/+/events", seen)
        sent: list[tuple[str, dict[str, Any]]] = []
        for task in ("extract", "load"):
            for state in ("pending", "running", "succeeded"):
                name = f"cascade/telemetry/{run}/{task}/1/events"
                event = {"run": run, "task": task, "attempt": 1, "state": state}
                await engine.publish(name, event)
                sent.append((name, event))
        # Not telemetry events: wrong depth or last level; they must not arrive.
        await engine.publish(f"cascade/telemetry/{run}/extract/events", {"state": "x"})
        await engine.publish(f"cascade/telemetry/{run}/extract/1/2/events", {"state": "x"})
        await engine.publish(f"cascade/telemetry/{run}/extract/1/logs", {"state": "x"})
        done = f"cascade/telemetry/{run}/zz/1/events"
        await engine.publish(done, {"state": "done"})
        await seen.wait_for(
            lambda: any(t == done for t, _ in seen.calls), "the last event", self.wait_timeout
        )
        got = [c for c in seen.calls if c[0] != done]
        if watcher.bus.capabilities.ordering:
            assert got == sent
        else:
            assert sorted(got, key=repr) == sorted(sent, key=repr)
        assert engine.publish_failures == 0

    async def test_cascade_connect_is_idempotent(self, make_connector: ConnectorFactory) -> None:
        """A second connect() keeps the same connection."""
        connector = make_connector()
        assert not connector.connected
        await connector.connect()
        first = connector.bus
        await connector.connect()
        assert connector.connected
        assert connector.bus is first

    async def test_cascade_reconnect_keeps_subscriptions(
        self, make_connector: ConnectorFactory, topic: str
    ) -> None:
        """After disconnect() and connect() the subscriptions still work."""
        engine, other = make_connector(), make_connector()
        await engine.connect()
        await other.connect()
        seen = CallbackRecorder()
        await engine.subscribe(f"{topic}/cmd", seen)
        await other.publish(f"{topic}/cmd", {"n": 1})
        await seen.wait_for(lambda: len(seen.calls) == 1, "the first command", self.wait_timeout)
        await engine.disconnect()
        assert not engine.connected
        await engine.disconnect()  # harmless
        await engine.connect()
        assert engine.connected
        await other.publish(f"{topic}/cmd", {"n": 2})
        await seen.wait_for(lambda: len(seen.calls) == 2, "the second command", self.wait_timeout)
        assert seen.calls == [(f"{topic}/cmd", {"n": 1}), (f"{topic}/cmd", {"n": 2})]

    async def test_cascade_unsubscribe_is_idempotent(
        self, make_connector: ConnectorFactory, topic: str
    ) -> None:
        """unsubscribe() stops the callback, twice is harmless, and survives reconnects."""
        engine, other = make_connector(), make_connector()
        await engine.connect()
        await other.connect()
        gone, probe = CallbackRecorder(), CallbackRecorder()
        handle = await engine.subscribe(f"{topic}/u", gone)
        await engine.subscribe(f"{topic}/u", probe)
        await handle.unsubscribe()
        await handle.unsubscribe()
        await other.publish(f"{topic}/u", {"after": True})
        await probe.wait_for(lambda: len(probe.calls) == 1, "the probe", self.wait_timeout)
        assert gone.calls == []
        # Still unsubscribed after a reconnect.
        await engine.disconnect()
        await engine.connect()
        await handle.unsubscribe()
        await other.publish(f"{topic}/u", {"after": "reconnect"})
        await probe.wait_for(lambda: len(probe.calls) == 2, "the probe", self.wait_timeout)
        assert gone.calls == []

    async def test_cascade_publish_never_raises(
        self, make_connector: ConnectorFactory, topic: str
    ) -> None:
        """Bad topics, bad payloads, no connection: publish() counts, never raises."""
        connector = make_connector()
        await connector.publish(f"{topic}/x", {"before": "connect"})
        assert connector.publish_failures == 1
        await connector.connect()
        await connector.publish(f"{topic}/bad/+", {"wildcard": True})
        await connector.publish(f"{topic}//empty-level", {"x": 1})
        await connector.publish("", {"x": 1})
        await connector.publish(f"{topic}/x", {"unencodable": object()})
        assert connector.publish_failures == 5
        await connector.publish(f"{topic}/x", {"fine": True})
        assert connector.publish_failures == 5
        await connector.disconnect()
        await connector.publish(f"{topic}/x", {"after": "disconnect"})
        assert connector.publish_failures == 6
        connector.publish_soon(f"{topic}/x", {"after": "disconnect"})
        await connector.disconnect()  # waits for what publish_soon scheduled
        assert connector.publish_failures == 7

    async def test_cascade_publish_soon_from_sync_code(
        self, make_connector: ConnectorFactory, topic: str
    ) -> None:
        """publish_soon() from synchronous code is delivered; disconnect() drains it."""
        engine, watcher = make_connector(), make_connector()
        await engine.connect()
        await watcher.connect()
        seen = CallbackRecorder()
        await watcher.subscribe(f"{topic}/soon", seen)

        def from_sync_code() -> None:
            for i in range(3):
                engine.publish_soon(f"{topic}/soon", {"i": i})

        from_sync_code()
        await engine.disconnect()  # drains what was scheduled
        await seen.wait_for(lambda: len(seen.calls) == 3, "3 scheduled", self.wait_timeout)
        assert sorted(p["i"] for _, p in seen.calls) == [0, 1, 2]
        assert engine.publish_failures == 0
