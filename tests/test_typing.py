"""Runs mypy --strict over tests/typing/: the public API's static types are part of the contract.

This is the slow test of the unit set (a few seconds: mypy analyses cascade_bus and msgspec's
stubs; later runs reuse .mypy_cache). Run it alone with ``pytest tests/test_typing.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api", reason="mypy is a dev dependency")

ROOT = Path(__file__).resolve().parent.parent
TYPING_FILE = ROOT / "tests" / "typing" / "test_public_api_types.py"


# A cold mypy run takes longer than a unit test should; give it room beyond the default.
@pytest.mark.timeout(180)
def test_public_api_types_pass_mypy_strict() -> None:
    stdout, stderr, status = mypy_api.run(
        [
            str(TYPING_FILE),
            "--strict",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(ROOT / ".mypy_cache"),
            "--no-color-output",
            "--no-error-summary",
        ]
    )
    assert status == 0, f"mypy reported:\n{stdout}{stderr}"
    assert stdout == ""


def test_typing_file_is_checked() -> None:
    # Guard against the mypy test passing because it looked at nothing.
    text = TYPING_FILE.read_text()
    assert text.count("assert_type(") >= 40
    assert "# type: ignore[" in text
