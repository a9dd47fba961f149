"""Loading a study file: YAML -> :class:`StudyConfig`, ``--set`` overrides, paths made absolute for
workers, and every validation error turned into one line that names the field (with a "did you mean"
for a mistyped key): a :class:`ConfigError`.
"""

from __future__ import annotations

import copy
import difflib
import pathlib
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from .schema import DEFAULT_ROOTS, DataConfig, RunConfig, StudyConfig


def _model_fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Field names of the (nested) model that ``loc`` points into, for "did you mean" hints."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            break
        nested = nested_model(field.annotation)
        if nested is None:
            break
        model = nested
    return list(model.model_fields)


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The config section type behind a field annotation (``MoEConfig | None`` -> ``MoEConfig``), if any."""
    candidates = [annotation, *get_args(annotation)]
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def format_validation_error(error: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """The first problem as one line: ``field.path: message``."""
    first = error.errors()[0]
    loc = tuple(first["loc"])
    field = ".".join(str(p) for p in (prefix, *loc) if p != "")
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        valid = _model_fields_at(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        message = f"unknown key{hint} (valid: {', '.join(valid)})"
    count = len(error.errors())
    more = f" (and {count - 1} more problem{'s' if count > 2 else ''})" if count > 1 else ""
    return f"{field or '<root>'}: {message}{more}"


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value)`` with the value parsed as YAML (numbers, bools, null, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.epochs=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc.__class__.__name__})") from None
    return key.strip(), value


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree[a][b] = value`` for ``key = "a.b"``, creating dicts where a section is unset."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {key!r} inside it")
        node = child
    node[parts[-1]] = value


def apply_overrides(study: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to a raw study dict. Keys are relative to ``base`` unless they start with
    ``base.``, ``sweep.`` or are ``name``."""
    study = copy.deepcopy(study)
    study.setdefault("base", {})
    for text in overrides:
        key, value = parse_override(text)
        root = key.split(".")[0]
        if root in ("base", "sweep", "name"):
            set_dotted(study, key, value)
        else:
            set_dotted(study["base"], key, value)
    return study


# Options retired with the one value they kept: configs recorded before (in checkpoints, a sweep's saved
# state) name them with that value, which is dropped; any other value is an error naming the field.
RETIRED_OPTIONS = {
    ("moe", "gate", "noise_form"): "pavlitska",
    ("moe", "losses", "sample_similarity", "scaling"): "reference",
    ("moe", "expert_layout"): "reference",
    ("model", "cls_mixture"): "probabilities",
}


def _without_retired_options(raw: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``raw`` without the :data:`RETIRED_OPTIONS` it sets to their kept value (a copy where any is set)."""
    for path, kept in RETIRED_OPTIONS.items():
        *parents, key = path
        section = raw
        for name in parents:
            section = section.get(name) if isinstance(section, dict) else None
        if not isinstance(section, dict) or key not in section:
            continue
        dotted = ".".join((prefix, *path))
        if section[key] != kept:
            raise ConfigError(f"{dotted}: {section[key]!r} was retired; only {kept!r} remains (docs/fidelity.md)")
        raw = copy.deepcopy(raw)
        section = raw
        for name in parents:
            section = section[name]
        del section[key]
    return raw


def validate_run(raw: dict[str, Any], prefix: str = "base") -> RunConfig:
    """Validate a run config dict, raising :class:`ConfigError` with the field's dotted path."""
    raw = _without_retired_options(raw, prefix) if isinstance(raw, dict) else raw
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, RunConfig, prefix)) from None


def read_yaml(path: str | pathlib.Path) -> dict[str, Any]:
    """Read a YAML mapping; missing file or bad YAML is a one-line :class:`ConfigError` naming the file."""
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such study file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with 'name', 'base' and 'sweep', got {type(data).__name__}")
    return data


def load_study(path: str | pathlib.Path, overrides: list[str] | None = None) -> StudyConfig:
    """Read, override and validate a study file."""
    return read_study(path, overrides)[1]


def read_study(path: str | pathlib.Path, overrides: list[str] | None = None) -> tuple[dict[str, Any], StudyConfig]:
    """Read a study file once: ``(raw, study)``, the overridden mapping as written (what trials are built
    from) and its validated :class:`StudyConfig`."""
    raw = apply_overrides(read_yaml(path), overrides or [])
    if isinstance(raw.get("base"), dict):
        try:
            raw["base"] = _without_retired_options(raw["base"], "base")
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    try:
        return raw, StudyConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {format_validation_error(exc, StudyConfig)}") from None


def absolutize_paths(base: dict[str, Any], cwd: pathlib.Path | None = None) -> dict[str, Any]:
    """Make ``data.root``, ``model.weights`` and a local ``distributed.storage_path`` absolute (relative to
    ``cwd``), since Ray workers and Tune trials do not run in the launching directory. Returns a new dict."""
    cwd = cwd or pathlib.Path.cwd()
    base = copy.deepcopy(base)
    data = base.setdefault("data", {}) or {}
    name = data.get("name", DataConfig.model_fields["name"].default)
    if data.get("root") is None and name in DEFAULT_ROOTS:
        data["root"] = DEFAULT_ROOTS[name]  # the loader's default, pinned to the launching directory
    if isinstance(data.get("root"), str):
        data["root"] = str((cwd / data["root"]).resolve())
    model = base.get("model") or {}
    if isinstance(model.get("weights"), str):
        model["weights"] = str((cwd / model["weights"]).resolve())
    distributed = base.get("distributed") or {}
    storage = distributed.get("storage_path")
    if isinstance(storage, str) and "://" not in storage:
        distributed["storage_path"] = str((cwd / storage).resolve())
    return base


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (lists and scalars are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def trial_config(base: dict[str, Any], overrides: dict[str, Any], prefix: str = "base") -> RunConfig:
    """``base`` with a trial's ``overrides`` (dotted key -> value) applied, validated. ``base`` is not changed."""
    raw = copy.deepcopy(base)
    for key, value in overrides.items():
        set_dotted(raw, key, copy.deepcopy(value))
    return validate_run(raw, prefix=prefix)


def resolve_entry(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's ``{"name", "overrides", "values", "search"}`` from its Tune config: a grid trial's entry
    as the sweep expanded it (``search: grid``), or a searched trial's grid point with the values the
    searcher chose merged in (``search: optuna``)."""
    entry = dict(config["trial"])
    searched = entry.pop("searched", None)
    if not searched:
        return {**entry, "search": "grid"}
    chosen = {key: config[key] for key in searched}
    return {
        **entry,
        "overrides": {**entry["overrides"], **chosen},
        "values": {**entry["values"], **chosen},
        "search": "optuna",
    }
