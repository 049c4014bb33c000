"""`cascade_bus.__all__` is the public API: sorted, complete, and nothing in it is missing."""

from __future__ import annotations

import inspect

import cascade_bus


def test_all_is_sorted_without_duplicates() -> None:
    assert cascade_bus.__all__ == sorted(cascade_bus.__all__)
    assert len(set(cascade_bus.__all__)) == len(cascade_bus.__all__)


def test_every_name_in_all_exists() -> None:
    missing = [name for name in cascade_bus.__all__ if not hasattr(cascade_bus, name)]
    assert missing == []


def test_every_public_class_and_function_is_exported() -> None:
    public = {
        name
        for name, value in vars(cascade_bus).items()
        if not name.startswith("_")
        and (inspect.isclass(value) or inspect.isfunction(value))
        and getattr(value, "__module__", "").partition(".")[0] == "cascade_bus"
    }
    assert public  # the check looks at something
    assert public - set(cascade_bus.__all__) == set()


def test_exported_objects_come_from_cascade_bus() -> None:
    for name in cascade_bus.__all__:
        value = getattr(cascade_bus, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__module__.startswith("cascade_bus."), name


def test_exported_classes_and_functions_are_documented() -> None:
    undocumented = [
        name
        for name in cascade_bus.__all__
        if (
            inspect.isclass(getattr(cascade_bus, name))
            or inspect.isfunction(getattr(cascade_bus, name))
        )
        and not inspect.getdoc(getattr(cascade_bus, name))
    ]
    assert undocumented == []


def test_version() -> None:
    assert isinstance(cascade_bus.__version__, str)
    assert cascade_bus.__version__.count(".") >= 2
