"""Sphinx configuration of the amqp-batch documentation site.

Pages are Markdown (MyST); the reference is generated from the docstrings with
autodoc. Built by ``nox -s docs`` with warnings as errors and nitpicky
cross-references. No intersphinx: the build must work without network access
beyond the package index, so references to the standard library and to anyio
are listed in ``nitpick_ignore_regex`` below instead of linked.
"""

from __future__ import annotations

import enum
import re
import sys
from typing import Any

import attrs
from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer

import amqp_batch
import amqp_batch.testing

project = "amqp-batch"
author = "amqp-batch developers"
copyright = "amqp-batch developers"
release = amqp_batch.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx_design",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# -- MyST ---------------------------------------------------------------------------

myst_enable_extensions = ["colon_fence", "deflist", "fieldlist", "tasklist"]
# "design.md#shutdown"-style links to headings of other pages.
myst_heading_anchors = 3

# -- autodoc ------------------------------------------------------------------------

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
# Long signatures (Publisher.publish) get one parameter per line.
python_maximum_signature_line_length = 88
# "MessageResult", not "amqp_batch._results.MessageResult", in signatures.
python_use_unqualified_type_names = True
add_module_names = False

# Public names say ``__module__ == "amqp_batch"`` (or ``amqp_batch.testing``), but
# their source, with the ``#:`` attribute comments and the member order autodoc
# reads, is in the private modules. Give the public modules an analyzer made of
# the private modules that define their names.


def _public_analyzer(public: str) -> ModuleAnalyzer:
    names = set(sys.modules[public].__all__)
    merged = ModuleAnalyzer("", public, sys.modules[public].__file__ or public)
    merged.analyze()
    for modname in sorted(sys.modules):
        if not modname.startswith("amqp_batch._"):
            continue
        try:
            private = ModuleAnalyzer.for_module(modname)
        except Exception:  # e.g. a module without source
            continue
        if names.isdisjoint(private.find_tags()):
            continue
        merged.attr_docs.update(private.find_attr_docs())
        merged.tags.update(private.tags)
        merged.tagorder.update(private.tagorder)
    return merged


for _public in ("amqp_batch", "amqp_batch.testing"):
    ModuleAnalyzer.cache["module", _public] = _public_analyzer(_public)

# -- nitpicky cross-references ------------------------------------------------------

nitpicky = True
nitpick_ignore_regex = [
    # Standard library and third-party types in signatures (no intersphinx offline).
    (
        r"py:(class|obj|exc|data)",
        r"(collections\.abc|contextlib|datetime|enum|os|ssl|types|typing)\..*",
    ),
    (
        r"py:(class|obj|exc)",
        r"(anyio|attr|attrs|pytest|_pytest|prometheus_client|opentelemetry)(\..*)?",
    ),
    (r"py:class", r"(TimeoutError|ValueError|Exception)"),
]
nitpick_ignore = [
    # Private types that appear in public signatures. The transport protocols are
    # described in transport.md; MemoryBroker implements them.
    ("py:class", "amqp_batch._transport._base.Transport"),
    ("py:class", "Transport"),
    # Unqualified standard names in the hand-written batch_consumer signature.
    ("py:class", "Callable"),
    ("py:class", "Sequence"),
    ("py:class", "AbstractAsyncContextManager"),
    ("py:class", "amqp_batch._transport._base.Session"),
    ("py:class", "amqp_batch._transport._base.PublisherSession"),
    ("py:class", "amqp_batch._transport._base.FieldTable"),
    ("py:class", "amqp_batch._transport._memory._session.MemoryConfirmation"),
    ("py:class", "amqp_batch._transport._base.Confirmation"),
    ("py:class", "amqp_batch._transport._native._channel.Waiter"),
    ("py:class", "ObjectReceiveStream"),
    ("py:obj", "amqp_batch._consumer.SettingsT"),
    ("py:class", "amqp_batch._consumer.SettingsT"),
    ("py:class", "amqp_batch._settings._S"),
    # serve_http's task_status and consumer (anything with health()).
    ("py:class", "TaskStatus"),
    ("py:class", "amqp_batch._http.HealthSource"),
    # Unqualified in the publishers' signatures (``**options: Unpack[...]``).
    ("py:class", "PublishOptions"),
    ("py:class", "MemoryConfirmation"),
    # The phase a transport error happened in (a fact read by the error policy).
    ("py:class", "amqp_batch._exceptions.Phase"),
    # Typed bodies and the aiormq transport: type variables, and the private homes
    # of public types in annotations.
    ("py:class", "T"),
    ("py:class", "amqp_batch._bodies.T"),
    ("py:class", "amqp_batch._bodies.T_co"),
    ("py:class", "amqp_batch._bodies.Decoder"),
    ("py:class", "amqp_batch._message.BodyT_co"),
    ("py:class", "amqp_batch._results.BodyT_contra"),
    ("py:class", "amqp_batch._handler_testing.T"),
    ("py:class", "amqp_batch._transport._aiormq.AiormqSession"),
    ("py:class", "amqp_batch._transport._aiormq.AiormqPublisher"),
    # The publish keywords (a TypedDict of the private transport contract) and
    # MemoryBroker's confirmation, as they appear unqualified in signatures.
    ("py:class", "PublishOptions"),
    ("py:class", "MemoryConfirmation"),
]

# -- HTML ---------------------------------------------------------------------------

html_theme = "furo"
html_title = f"amqp-batch {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_show_sourcelink = False


# -- attrs defaults in signatures ---------------------------------------------------

_ATTRS_DEFAULT = re.compile(r"attr_dict\['(\w+)'\]\.default")


def _attrs_defaults(
    app: Sphinx,
    what: str,
    name: str,
    obj: Any,
    options: Any,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str | None, str | None] | None:
    """Show an attrs class's real defaults instead of ``attr_dict['x'].default``.

    ``autodoc_preserve_defaults`` reads defaults from the source, and the source of
    an attrs-generated ``__init__`` names them indirectly.
    """
    if signature is None or not (isinstance(obj, type) and attrs.has(obj)):
        return None
    fields = attrs.fields_dict(obj)

    def default(match: re.Match[str]) -> str:
        value = fields[match.group(1)].default
        if isinstance(value, enum.Enum):
            return f"{type(value).__name__}.{value.name}"
        if isinstance(value, (str, int, float, bool, type(None), tuple)):
            return repr(value)
        if attrs.has(type(value)) and value == type(value)():
            return f"{type(value).__name__}()"
        return "..."  # e.g. an attrs Factory

    return _ATTRS_DEFAULT.sub(default, signature), return_annotation


def _public_bases(
    app: Sphinx, name: str, obj: Any, options: Any, bases: list[Any]
) -> None:
    """Name generic bases by their public module: ``BatchConsumer[SettingsT]``
    was subscripted before ``BatchConsumer.__module__`` became ``amqp_batch``."""
    for index, base in enumerate(bases):
        origin = getattr(base, "__origin__", None)
        if getattr(origin, "__module__", None) in ("amqp_batch", "amqp_batch.testing"):
            bases[index] = origin[base.__args__]


def setup(app: Sphinx) -> None:
    app.connect("autodoc-process-signature", _attrs_defaults)
    app.connect("autodoc-process-bases", _public_bases)
