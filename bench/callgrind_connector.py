"""Instructions per delivery through the `Connector` (and the other cases), counted by callgrind.

Wall-clock rates on a shared machine are noisy; instruction counts are not. Each case runs
twice under ``valgrind --tool=callgrind`` (N and 6N messages) and the difference divided by
5N messages is the cost of one message, start-up and imports excluded.

    .venv/bin/python bench/callgrind_connector.py [--messages N] [--cases localbus,connector,bus]

Needs valgrind on PATH. The cases are those of ``bench_connector.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_case(case: str, messages: int, subscribers: int) -> None:
    """The measured program: one case, once (what valgrind runs)."""
    sys.path.insert(0, str(HERE))
    import bench_connector

    asyncio.run(bench_connector.CASES[case](messages, subscribers))


def instructions(case: str, messages: int, subscribers: int) -> int:
    """Total instructions (Ir) of one run of ``case`` under callgrind."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        cmd = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
            sys.executable, __file__, "--run", case, "--messages", str(messages),
            "--subscribers", str(subscribers),
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        match = re.search(r"Collected : (\d+)", proc.stderr)
        if proc.returncode or match is None:
            raise RuntimeError(f"callgrind run failed: {proc.stderr[-2000:]}")
        return int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--cases", default="localbus,connector,bus")
    parser.add_argument("--subscribers", default="1,8")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        run_case(args.run, args.messages, int(args.subscribers))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    n = args.messages
    print("| case | subscribers | instructions per message | per delivery |")
    print("|---|---:|---:|---:|")
    for subscribers in (int(s) for s in args.subscribers.split(",")):
        for case in args.cases.split(","):
            small = instructions(case, n, subscribers)
            large = instructions(case, 6 * n, subscribers)
            per_message = (large - small) / (5 * n)
            print(
                f"| {case} | {subscribers} | {per_message:,.0f} | "
                f"{per_message / subscribers:,.0f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
