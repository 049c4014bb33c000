"""Portable topics: validation and the MQTT-style matcher every transport follows."""

import asyncio

from cascade_bus import InvalidTopic, topic_matches, validate_pattern, validate_topic


async def main() -> None:
    """Check a few topics and patterns and print which topics a pattern matches."""
    topics = ["cascade/telemetry/run-1/load/1/events", "cascade/constraints/run-1", "$SYS/uptime"]
    for pattern in ["cascade/telemetry/+/+/+/events", "cascade/#", "cascade/constraints", "#"]:
        validate_pattern(pattern)
        print(f"{pattern:32} matches {[t for t in topics if topic_matches(pattern, t)]}")

    for bad in ["a//b", "/leading", "a/+/c", "a/#"]:
        try:
            validate_topic(bad)  # publish topics: no empty levels, no wildcards
        except InvalidTopic as exc:
            print(f"{bad!r:12} rejected: {exc}")


if __name__ == "__main__":
    asyncio.run(main())
