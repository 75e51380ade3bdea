"""The public surface, checked once: what ``amqp_batch`` and
``amqp_batch.testing`` export, and that nothing private leaks out of them."""

from __future__ import annotations

import inspect
import types
import typing

import pytest

import amqp_batch
import amqp_batch.testing

PUBLIC_MODULES = [amqp_batch, amqp_batch.testing]
#: Public names that are values, not classes or functions (no ``__module__``).
CONSTANTS = {"RETRY_COUNT_HEADER", "__version__"}


def _exports(module: types.ModuleType) -> list[tuple[str, object]]:
    return [(name, getattr(module, name)) for name in module.__all__]


def _home(module: types.ModuleType, name: str) -> str:
    """Where a user finds ``name``: names both modules export live in
    ``amqp_batch``."""
    return "amqp_batch" if name in amqp_batch.__all__ else module.__name__


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_every_exported_name_exists(module: types.ModuleType) -> None:
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []
    assert len(set(module.__all__)) == len(module.__all__)


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_every_exported_name_is_documented_where_users_find_it(
    module: types.ModuleType,
) -> None:
    undocumented = []
    misplaced = []
    for name, value in _exports(module):
        if name in CONSTANTS:
            assert isinstance(value, str)
            continue
        if not inspect.getdoc(value):
            undocumented.append(name)
        if getattr(value, "__module__", None) != _home(module, name):
            misplaced.append((name, getattr(value, "__module__", None)))
    assert undocumented == []
    assert misplaced == []


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_nothing_private_leaks(module: types.ModuleType) -> None:
    private_exports = [
        name
        for name in module.__all__
        if name.startswith("_") and name not in CONSTANTS
    ]
    assert private_exports == []
    unlisted = [
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and name.isidentifier()  # not pytest's assertion-rewriting helpers
        and name not in module.__all__
        # Submodules are reachable as attributes once imported; only public ones.
        and not (
            isinstance(value, types.ModuleType)
            and name in ("testing", "idempotency", "prometheus", "tracing")
        )
        and name != "annotations"  # ``from __future__ import annotations``
    ]
    assert unlisted == []


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_public_methods_are_documented(module: types.ModuleType) -> None:
    undocumented = [
        f"{name}.{member}"
        for name, value in _exports(module)
        if inspect.isclass(value)
        for member, attribute in vars(value).items()
        if not member.startswith("_")
        and (inspect.isfunction(attribute) or isinstance(attribute, property))
        and not inspect.getdoc(attribute)
    ]
    assert undocumented == []


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_type_hints_of_exported_classes_resolve(module: types.ModuleType) -> None:
    # A changed ``__module__`` must not break ``typing.get_type_hints`` (used by
    # attrs.resolve_types, cattrs and friends) on classes with string annotations.
    for _, value in _exports(module):
        if inspect.isclass(value):
            typing.get_type_hints(value)
