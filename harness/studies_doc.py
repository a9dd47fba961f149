"""The config reference in ``docs/studies.md``, generated from the pydantic schema of :mod:`harness.config`.

``python -m harness.studies_doc`` rewrites the block between :data:`BEGIN` and :data:`END` in place;
``python -m harness.studies_doc --check`` exits 1 when that block differs from what the schema gives.
Each field's meaning is its ``description=`` in ``harness/config/schema.py`` or ``moe.py`` (edit it there, then
regenerate).
"""

from __future__ import annotations

import argparse
import inspect
import os
import pathlib
import re
import sys
import tempfile
import types
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .config import RunConfig, TrackingConfig, nested_model

BEGIN = "<!-- BEGIN GENERATED: python -m harness.studies_doc -->"
END = "<!-- END GENERATED -->"
DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "studies.md"

# Meanings for fields that have no ``description=`` (prefer adding one in harness/config/schema.py or moe.py).
FALLBACK_MEANINGS: dict[str, str] = {}


def _model_names() -> list[str]:
    from .models import MODELS  # what ModelConfig's name validator accepts

    return sorted(MODELS)


# Fields whose valid values a validator decides rather than the annotation: dotted path -> choices.
CHOICES = {"model.name": _model_names}


def _sections(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel]]]:
    """``(dotted prefix, model)`` for the model and every nested section, depth first."""
    found = [(prefix, model)]
    for name, field in model.model_fields.items():
        nested = nested_model(field.annotation)
        if nested is not None:
            found.extend(_sections(nested, f"{prefix}{name}."))
    return found


def _one_line(text: str) -> str:
    """Whitespace collapsed, reST ``literals`` as Markdown `code`, ``*`` outside code escaped (no stray
    emphasis), pipes escaped for a table cell."""
    parts = re.split(r"(`[^`]*`)", re.sub(r"\s+", " ", text).strip().replace("``", "`"))
    text = "".join(part if part.startswith("`") else part.replace("*", "\\*") for part in parts)
    return text.replace("|", "\\|")


def _bounds(metadata: list[Any]) -> str:
    words = []
    for item in metadata:
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if isinstance(item, getattr(annotated_types, attr.capitalize())):
                words.append(f"{symbol} {getattr(item, attr)}")
        if isinstance(item, annotated_types.MinLen) and item.min_length == 1:
            words.append("non-empty")
    return " " + ", ".join(words) if words else ""


def type_text(annotation: Any, metadata: list[Any] | None = None) -> str:
    """An annotation for the reader: Literal choices as `a` / `b`, ``None`` as `null`, a nested model as
    ``section``, bounds from ``metadata`` (``ge=1`` -> ``int >= 1``)."""
    bounds = _bounds(metadata or [])
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        parts = [type_text(a, metadata) for a in get_args(annotation) if a is not type(None)]
        return " / ".join(parts + (["`null`"] if type(None) in get_args(annotation) else []))
    if origin is Literal:
        return " / ".join(f"`{_yaml(v)}`" for v in get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if origin is list:
        return f"list of {type_text(get_args(annotation)[0])}" + bounds.replace(" non-empty", " (non-empty)")
    if origin is dict:
        key, value = get_args(annotation)
        return f"mapping {type_text(key)}: {type_text(value)}" + bounds
    return getattr(annotation, "__name__", str(annotation)) + bounds


def _yaml(value: Any) -> str:
    """A value as YAML flow text (``None`` -> ``null``, ``[4]``, ``{}``, ``0.001``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False)
    return text.removesuffix("\n...\n").strip()


def default_text(field: FieldInfo) -> str:
    """The field's default for the table: `value`, `null`, ``required``, or ``section defaults`` for a
    nested model."""
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "section defaults"
    return f"`{_yaml(value)}`"


def meaning(path: str, field: FieldInfo) -> str:
    """The field's ``description``; else :data:`FALLBACK_MEANINGS`; else, for a section, the first sentence
    of its model's docstring."""
    if field.description:
        return _one_line(field.description)
    if path in FALLBACK_MEANINGS:
        return _one_line(FALLBACK_MEANINGS[path])
    nested = nested_model(field.annotation)
    doc = inspect.cleandoc(nested.__doc__ or "") if nested is not None else ""
    return _one_line(re.split(r"(?<=\.)\s(?=[A-Z`])", doc, maxsplit=1)[0]) if doc else ""


def render_section(prefix: str, model: type[BaseModel]) -> str:
    """One section: a heading, the model's docstring as its introduction, and a table of its fields."""
    title = f"`{prefix.rstrip('.')}`" if prefix else "Top level"
    lines = [f"### {title}", ""]
    doc = inspect.cleandoc(model.__dict__.get("__doc__") or "")
    if doc:
        lines += [_one_line(doc), ""]
    lines += ["| field | type / choices | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        path = prefix + name
        kind = type_text(field.annotation, field.metadata)
        if path in CHOICES:
            kind = " / ".join(f"`{c}`" for c in CHOICES[path]())
        if kind.startswith("section"):
            kind = kind.replace("section", f"section `{path}`", 1)
        lines.append(f"| `{path}` | {kind} | {default_text(field)} | {meaning(path, field)} |")
    return "\n".join(lines) + "\n"


def generate() -> str:
    """The generated block (the text between the marker lines): every section of :class:`RunConfig`, then
    the study-level ``tracking`` section (:class:`TrackingConfig`, beside ``base`` in a study file)."""
    intro = (
        "Generated by `python -m harness.studies_doc` from the pydantic models in `harness/config/schema.py` "
        "and `moe.py` "
        "(meanings are the fields' `description=`; edit them there). `null` is YAML's None; unknown "
        "keys are errors.\n"
    )
    sections = _sections(RunConfig) + _sections(TrackingConfig, "tracking.")
    return "\n".join([intro] + [render_section(p, m) for p, m in sections])


def extract_block(text: str) -> str | None:
    """The text between the marker lines of ``text`` (None when a marker is missing)."""
    start, end = text.find(BEGIN + "\n"), text.find("\n" + END)
    if start < 0 or end < start:
        return None
    return text[start + len(BEGIN) + 1 : end + 1]


def write(path: pathlib.Path = DOC) -> bool:
    """Replace the block in ``path`` atomically (temp file + rename); returns whether it changed."""
    text = path.read_text()
    old = extract_block(text)
    if old is None:
        raise SystemExit(f"{path}: marker lines {BEGIN!r} ... {END!r} not found")
    new = generate()
    if old == new:
        return False
    updated = text.replace(BEGIN + "\n" + old + END, BEGIN + "\n" + new + END, 1)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        handle.write(updated)
    os.chmod(tmp, path.stat().st_mode & 0o777)
    os.replace(tmp, path)
    return True


def main(argv: list[str] | None = None) -> int:
    """CLI: regenerate the block, or with ``--check`` only compare (exit 1 with one line when stale)."""
    parser = argparse.ArgumentParser(prog="python -m harness.studies_doc", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the generated block is out of date")
    parser.add_argument("--path", type=pathlib.Path, default=DOC, help=f"the document (default: {DOC})")
    args = parser.parse_args(argv)
    if args.check:
        block = extract_block(args.path.read_text())
        if block != generate():
            problem = "has no generated block (marker lines missing)" if block is None else "is out of date"
            print(f"{args.path}: the config reference {problem}; run python -m harness.studies_doc", file=sys.stderr)
            return 1
        return 0
    print(f"{args.path}: {'updated' if write(args.path) else 'already current'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
