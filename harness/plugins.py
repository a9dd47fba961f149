"""Methods defined outside ``harness``: a balancing loss, a gate or a model named in a study by its import
path, ``package.module:name`` (docs/extending.md). :func:`load_object` imports it; :func:`check_arguments`
validates the study's ``args`` for it against its signature, so a wrong name or type is a config error
before any training starts."""

from __future__ import annotations

import functools
import importlib
import inspect
import re
import typing
from collections.abc import Callable, Collection
from typing import Any

from pydantic import ConfigDict, ValidationError, create_model

# ``package.module:attribute``: dotted identifiers on both sides of one colon.
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def is_import_path(value: str) -> bool:
    """Whether ``value`` names an object by import path (``package.module:name``) rather than a registry
    name."""
    return bool(IMPORT_PATH.match(value))


@functools.cache
def load_object(path: str) -> Any:
    """The object ``package.module:name`` names (imported once per process). A module that does not
    import or a missing name is a one-line ``ValueError`` naming the path."""
    if not is_import_path(path):
        raise ValueError(f"{path!r} is not an import path (package.module:name)")
    module_name, _, attribute = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{path}: cannot import {module_name!r} ({exc}); is its folder on PYTHONPATH?") from None
    except Exception as exc:  # the module's own code failed (a syntax error, a failing import-time line)
        raise ValueError(f"{path}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{path}: module {module_name!r} has no {attribute!r}")
        obj = getattr(obj, part)
    return obj


def check_arguments(target: Callable[..., Any], args: dict[str, Any], fixed: int, path: str) -> dict[str, Any]:
    """``args`` validated against ``target``'s parameters after its first ``fixed`` ones (those the harness
    passes): unknown names, missing required ones, and values that do not fit a parameter's annotation
    are a one-line ``ValueError`` (strict: a string is never made into a number). Returns the validated
    values."""
    if not callable(target):
        raise ValueError(f"{path}: is not callable")
    signature = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # an annotation that does not resolve: check names only
        hints = {}
    fields: dict[str, Any] = {}
    takes_any = False
    for parameter in list(signature.parameters.values())[fixed:]:
        if parameter.kind is parameter.VAR_KEYWORD:
            takes_any = True
            continue
        if parameter.kind is parameter.VAR_POSITIONAL:
            continue
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[parameter.name] = (hints.get(parameter.name, Any), default)
    model = create_model(
        "Arguments",
        __config__=ConfigDict(extra="allow" if takes_any else "forbid", strict=True, arbitrary_types_allowed=True),
        **fields,
    )
    try:
        return dict(model.model_validate(args))
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise ValueError(f"{path}: args.{where}: {error['msg']}") from None


def check_name(value: str, registry: Collection[str], what: str) -> str:
    """``value`` as a config names a built-in (a key of ``registry``) or one of your own (an import path that
    imports); anything else is a one-line ``ValueError`` listing the valid names. ``what``: e.g. ``gate``."""
    if is_import_path(value):
        load_object(value)
    elif value not in registry:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(sorted(registry))} or package.module:name")
    return value


def check_own_arguments(name: str, args: dict[str, Any], fixed: int, what: str) -> dict[str, Any]:
    """The ``args`` a config gives the method ``name``: :func:`check_arguments` for one of your own (after
    its first ``fixed`` parameters); for a built-in, which takes none, any args are a one-line error."""
    if is_import_path(name):
        return check_arguments(load_object(name), args, fixed, name)
    if args:
        raise ValueError(f"args: only a {what} of your own takes args, not {name!r}")
    return args
