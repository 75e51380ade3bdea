"""Re-exported names say where users find them (trio's way).

``amqp_batch.Message`` is defined in ``amqp_batch._message``; once its
``__module__`` says ``amqp_batch``, reprs, pickles, tracebacks and the API
reference name the public path, not the private module.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Iterable, Mapping

__all__ = ["set_public_module"]


def set_public_module(
    module_name: str, namespace: Mapping[str, object], names: Iterable[str]
) -> None:
    """Give each of ``names`` in ``namespace`` the ``__module__`` ``module_name``.

    Only objects still naming a private module (``amqp_batch._x``) are changed,
    so a name re-exported from ``amqp_batch`` keeps ``amqp_batch`` when
    ``amqp_batch.testing`` re-exports it too.
    """
    for name in names:
        value = namespace[name]
        current = getattr(value, "__module__", None)
        if isinstance(current, str) and current.startswith("amqp_batch._"):
            if isinstance(value, type):
                _resolve_class_annotations(value)
            value.__module__ = module_name


def _resolve_class_annotations(cls: type) -> None:
    # ``typing.get_type_hints(cls)`` evaluates a class's string annotations in
    # the module ``cls.__module__`` names; evaluate them while that is still the
    # defining module, so ``get_type_hints`` (attrs.resolve_types, cattrs...)
    # keeps working on the public name.
    own = inspect.get_annotations(cls)
    if not own:
        return
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except NameError:  # a name imported only for type checking: leave them
        return
    cls.__annotations__ = {key: hints[key] for key in own}
