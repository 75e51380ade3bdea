"""Loading ``amqp-batch run``'s target: ``module:name`` or ``path/to/file.py:name``."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs

from .._consumer import BatchConsumer, Consumer
from .._results import BatchHandler
from ._common import CLIError, describe

__all__ = ["Target", "load_target"]


@attrs.frozen
class Target:
    """What ``run`` consumes with: exactly one of ``handler`` and ``consumer_class``."""

    spec: str
    handler: BatchHandler | None = None
    consumer_class: type[BatchConsumer[Any]] | None = None

    @property
    def kind(self) -> str:
        """``handler`` or ``consumer class``, for messages."""
        return "handler" if self.handler is not None else "consumer class"


def load_target(spec: str) -> Target:
    """Import ``spec`` (``module:name``, ``module:Class.attr`` or ``file.py:name``)
    and check it is a handler or a :class:`BatchConsumer` subclass.

    The current directory is put first on ``sys.path`` (as ``python -m`` does).
    Raises :class:`CLIError` with a one-line reason otherwise.
    """
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        raise CLIError(
            f"target {spec!r} is not MODULE:NAME (for example myapp.handlers:handle "
            "or path/to/handlers.py:handle)"
        )
    module = _import(module_name)
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise CLIError(
                f"target {spec!r}: module {module_name!r} has no attribute "
                f"{attribute!r}"
            ) from None
    return _check(spec, obj)


def _import(module_name: str) -> ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        return _import_file(Path(module_name))
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (
            module_name == exc.name or module_name.startswith(f"{exc.name}.")
        ):
            raise CLIError(
                f"cannot import {module_name!r}: no module named {exc.name!r} "
                "(run from its directory or add it to PYTHONPATH)"
            ) from None
        raise CLIError(f"cannot import {module_name!r}: {describe(exc)}") from None
    except Exception as exc:
        raise CLIError(f"cannot import {module_name!r}: {describe(exc)}") from None


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise CLIError(f"cannot import {str(path)!r}: no such file")
    name = path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CLIError(f"cannot import {str(path)!r}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # The file's own directory is importable, as when running it as a script.
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise CLIError(f"cannot import {str(path)!r}: {describe(exc)}") from None
    return module


def _check(spec: str, obj: Any) -> Target:
    if isinstance(obj, type):
        if not issubclass(obj, BatchConsumer):
            raise CLIError(
                f"target {spec!r} is the class {obj.__name__}, which is not a "
                "BatchConsumer or Consumer subclass"
            )
        if issubclass(obj, Consumer):
            if obj.process_message is Consumer.process_message:
                raise CLIError(
                    f"target {spec!r}: {obj.__name__} does not implement "
                    "process_message()"
                )
        elif obj.process_messages is BatchConsumer.process_messages:
            raise CLIError(
                f"target {spec!r}: {obj.__name__} does not implement process_messages()"
            )
        return Target(spec, consumer_class=obj)
    if isinstance(obj, BatchConsumer):
        raise CLIError(
            f"target {spec!r} is a {type(obj).__name__} instance; name its class "
            "instead (the settings come from flags and the environment)"
        )
    if not callable(obj):
        raise CLIError(
            f"target {spec!r} is not a handler function or a BatchConsumer/"
            f"Consumer subclass (it is a {type(obj).__name__} object)"
        )
    plain = (inspect.isfunction(obj) or inspect.ismethod(obj)) and not (
        inspect.iscoroutinefunction(obj) or inspect.isasyncgenfunction(obj)
    )
    if plain:
        raise CLIError(
            f"target {spec!r} is a plain function; a handler is an async generator "
            "(async def with yield) or an async function returning the results"
        )
    return Target(spec, handler=obj)
