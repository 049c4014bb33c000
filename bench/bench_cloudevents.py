"""CloudEvents mapping cost: the bus's codec beside the ``cloudevents`` SDK doing the same.

Not a test: run it and read the table (ns per message, best of ``--repeat`` runs of N).

    .venv/bin/python bench/bench_cloudevents.py [--messages N] [--repeat R]

Rows: a structured JSON body with no headers (the fast path), with two extension attributes,
with a bytes payload (``data_base64``), and binary-mode headers (``format=raw``). Columns: the
bus encoding it (``Codec.encode_envelope`` / ``Codec.binary_headers``), the bus decoding it
(``decoder_for(Any).decode``), and the SDK's ``JSONFormat.write`` / ``read`` of the same event
(for binary mode: ``to_binary`` / ``from_binary`` of the SDK's HTTP binding, which has the
same ``ce-`` headers). Needs the SDK: ``pip install cloudevents``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from cloudevents.core.bindings import http as sdk_http
from cloudevents.core.formats.json import JSONFormat

from cascade_bus._codec import Codec, decoder_for

PAYLOAD = {"run": "r1", "task": "extract", "state": "running", "attempt": 2}
HEADERS = {"tenant": "acme", "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0b-01"}


def best_ns(fn: Callable[[], Any], n: int, repeat: int) -> float:
    """The best of ``repeat`` runs of ``n`` calls, in ns per call."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter_ns() - start) / n)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    n, r = args.messages, args.repeat
    codec, decoder, fmt = Codec("json", "urn:bench"), decoder_for(), JSONFormat()
    cases = {
        "structured, no headers": codec.envelope("a/b", PAYLOAD),
        "structured, 2 extensions": codec.envelope("a/b", PAYLOAD, headers=HEADERS),
        "structured, bytes (data_base64)": codec.envelope("a/b", b"\x00" * 100),
    }
    print(
        f"{'case':34s} {'bus encode':>11s} {'bus decode':>11s} {'SDK write':>10s} {'SDK read':>10s}"
    )
    for name, env in cases.items():
        body = codec.encode_envelope(env)
        event = fmt.read(None, body)
        row = [
            best_ns(lambda env=env: codec.encode_envelope(env), n, r),
            best_ns(lambda body=body: decoder.decode("a/b", body), n, r),
            best_ns(lambda event=event: fmt.write(event), n, r),
            best_ns(lambda body=body: fmt.read(None, body), n, r),
        ]
        print(f"{name:34s} " + " ".join(f"{v:11.0f}" for v in row))
    env = codec.envelope("a/b", PAYLOAD, headers=HEADERS, type="com.example.t")
    headers = Codec.binary_headers(env)
    data = codec.encode_payload(PAYLOAD)
    event = fmt.read(None, codec.encode_envelope(env))
    message = sdk_http.to_binary(event, fmt)
    row = [
        best_ns(lambda: (codec.encode_payload(PAYLOAD), Codec.binary_headers(env)), n, r),
        best_ns(lambda: decoder.decode("a/b", data, headers), n, r),
        best_ns(lambda: sdk_http.to_binary(event, fmt), n, r),
        best_ns(lambda: sdk_http.from_binary(message, fmt), n, r),
    ]
    print(f"{'binary (ce- headers)':34s} " + " ".join(f"{v:11.0f}" for v in row))


if __name__ == "__main__":
    main()
