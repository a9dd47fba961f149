"""Search spaces: the ``sweep`` section of a study -> the list of trials, each validated before anything runs.

Syntax (dotted config keys, relative to ``base``, mapped to domains)::

    sweep:
      moe.gate.type: {grid: [gap_fc, conv_gap_fc]}          # every value, crossed with the other grids
      moe.constraint: {grid: [null, {type: relative_importance, threshold: 0.5}]}   # whole sub-configs
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}              # sampled once per trial
      moe.losses.importance: {uniform: [0.0, 1.0]}
      moe.num_experts: {randint: [2, 9]}                    # low inclusive, high exclusive
      data.batch_size: {choice: [64, 128]}
      seed: {grid: [0, 1, 2]}                               # seeds are a grid dimension like any other
      train.epochs: 5                                       # a plain value: the same in every trial
      method:                                               # a named dimension: each value sets several
        grid:                                               # keys at once ("name" labels it)
          - {name: importance, moe.losses.importance: 0.5}
          - {name: relative_importance, moe.constraint: {type: relative_importance, threshold: 0.5}}
      num_samples: 2                                        # reserved: repeat the grid, resampling the rest
      sample_seed: 0                                        # reserved: seed of the sampler
      max_concurrent_trials: 2                              # reserved: see harness.sweep
      scheduler: {type: asha, metric: val_top1, mode: max, grace_period: 1}   # reserved

Trials are the grid's cross product (in key order) repeated ``num_samples`` times; random domains are drawn
with a seeded sampler, so the same study always yields the same trials (what ``--dry-run`` prints runs).
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
import random
from dataclasses import dataclass
from typing import Any, get_args, get_origin

from pydantic import BaseModel

from .config import RunConfig, nested_model, set_dotted, validate_run
from .errors import ConfigError

RESERVED = ("num_samples", "sample_seed", "max_concurrent_trials", "scheduler")
DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass
class Trial:
    """One point of the sweep: ``index`` (0-based), ``name`` (``t0000``), the ``overrides`` it applies to
    ``base`` (dotted config key -> value), the ``values`` of its swept dimensions (dimension -> value; a
    named dimension's value is its label) and the validated run ``config``."""

    index: int
    name: str
    overrides: dict[str, Any]
    values: dict[str, Any]
    config: RunConfig


def trial_config(base: dict[str, Any], overrides: dict[str, Any], prefix: str = "base") -> RunConfig:
    """``base`` with a trial's ``overrides`` (dotted key -> value) applied, validated. ``base`` is not changed."""
    raw = copy.deepcopy(base)
    for key, value in overrides.items():
        set_dotted(raw, key, copy.deepcopy(value))
    return validate_run(raw, prefix=prefix)


@dataclass
class SweepSpec:
    """The parsed ``sweep`` section."""

    domains: dict[str, tuple[str, Any]]
    num_samples: int = 1
    sample_seed: int = 0
    max_concurrent_trials: int | None = None
    scheduler: dict[str, Any] | None = None

    @property
    def swept_keys(self) -> list[str]:
        """Dimensions that vary between trials (constants excluded): config keys and named dimensions."""
        return [key for key, (kind, _) in self.domains.items() if kind != "constant"]

    @property
    def named_dimensions(self) -> list[str]:
        return [key for key, (kind, args) in self.domains.items() if _is_bundle(key, kind, args)]


def _is_bundle(key: str, kind: str, args: Any) -> bool:
    """A named dimension: a dot-free key that is no config field, over mappings of config keys."""
    return (
        "." not in key
        and key not in RunConfig.model_fields
        and kind in ("grid", "choice")
        and all(isinstance(v, dict) for v in args)
    )


def bundle_label(value: dict[str, Any]) -> str:
    """A named dimension's value as a label: its ``name``, else ``key=value`` pairs."""
    if "name" in value:
        return str(value["name"])
    return ", ".join(f"{k}={v}" for k, v in value.items())


def _check_key(key: str) -> None:
    """The dotted key must name a field of the run config schema."""
    model: type[BaseModel] | None = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        if model is None:  # inside a free-form mapping (resources_per_worker)
            return
        fields = model.model_fields
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=1)
            hint = f"; did you mean {'.'.join(parts[:i] + [close[0]])!r}?" if close else ""
            raise ConfigError(f"sweep.{key}: no such config key{hint}")
        annotation = fields[part].annotation
        model = nested_model(annotation)
        is_mapping = any(get_origin(c) is dict or c is dict for c in (annotation, *get_args(annotation)))
        if i < len(parts) - 1 and model is None and not is_mapping:
            raise ConfigError(f"sweep.{key}: {'.'.join(parts[: i + 1])} is a value, not a section")


def _number(key: str, value: Any, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise ConfigError(f"sweep.{key}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    return value


def _parse_domain(key: str, value: Any) -> tuple[str, Any]:
    if not isinstance(value, dict) or not any(name in value for name in DOMAINS):
        if isinstance(value, dict) and len(value) == 1:
            (name,) = value
            close = difflib.get_close_matches(str(name), DOMAINS, n=1)
            if close:
                raise ConfigError(f"sweep.{key}: unknown domain {name!r}; did you mean {close[0]!r}? (valid: {', '.join(DOMAINS)})")
        return "constant", value
    if len(value) != 1:
        raise ConfigError(f"sweep.{key}: one domain per key, got {', '.join(map(str, value))}")
    ((kind, args),) = value.items()
    if kind in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"sweep.{key}.{kind}: expected a non-empty list of values")
        return kind, args
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"sweep.{key}.{kind}: expected [low, high]")
    low, high = (_number(key, a, integer=kind == "randint") for a in args)
    if not low < high:
        raise ConfigError(f"sweep.{key}.{kind}: low must be below high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"sweep.{key}.loguniform: bounds must be > 0, got [{low}, {high}]")
    return kind, (low, high)


def parse_sweep(sweep: dict[str, Any]) -> SweepSpec:
    """Check the syntax and the keys of a ``sweep`` section (not yet the trial configs)."""
    domains: dict[str, tuple[str, Any]] = {}
    options: dict[str, Any] = {}
    for key, value in sweep.items():
        if key in RESERVED:
            options[key] = value
            continue
        kind, args = domains[key] = _parse_domain(key, value)
        if _is_bundle(key, kind, args):
            for bundle in args:
                for inner in bundle:
                    if inner != "name":
                        _check_key(inner)
        else:
            _check_key(key)
    for name in ("num_samples", "max_concurrent_trials"):
        if name in options and (not isinstance(options[name], int) or isinstance(options[name], bool) or options[name] < 1):
            raise ConfigError(f"sweep.{name}: expected an integer >= 1, got {options[name]!r}")
    if "sample_seed" in options and not isinstance(options["sample_seed"], int):
        raise ConfigError(f"sweep.sample_seed: expected an integer, got {options['sample_seed']!r}")
    scheduler = options.get("scheduler")
    if scheduler is not None:
        _check_scheduler(scheduler)
    spec = SweepSpec(domains, **{k: v for k, v in options.items() if k != "scheduler"}, scheduler=scheduler)
    if not spec.swept_keys and spec.num_samples == 1:
        raise ConfigError("sweep: nothing varies between trials; add a domain (e.g. seed: {grid: [0, 1]}) or run python -m harness.train")
    return spec


SCHEDULERS = ("fifo", "asha")


def _check_scheduler(scheduler: Any) -> None:
    if not isinstance(scheduler, dict) or scheduler.get("type") not in SCHEDULERS:
        raise ConfigError(f"sweep.scheduler.type: expected one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    allowed = {"type"} | ({"metric", "mode", "grace_period", "reduction_factor"} if scheduler["type"] == "asha" else set())
    unknown = set(scheduler) - allowed
    if unknown:
        raise ConfigError(f"sweep.scheduler: unknown key {sorted(unknown)[0]!r} (valid: {', '.join(sorted(allowed))})")
    if scheduler["type"] == "asha":
        if scheduler.get("mode", "max") not in ("min", "max"):
            raise ConfigError(f"sweep.scheduler.mode: expected min or max, got {scheduler['mode']!r}")
        grace = scheduler.get("grace_period", 1)
        if not isinstance(grace, int) or grace < 1:
            raise ConfigError(f"sweep.scheduler.grace_period: expected an integer >= 1, got {grace!r}")


def _sample(kind: str, args: Any, rng: random.Random) -> Any:
    if kind == "choice":
        return rng.choice(args)
    low, high = args
    if kind == "uniform":
        return rng.uniform(low, high)
    if kind == "loguniform":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.randrange(low, high)  # randint


def expand_trials(base: dict[str, Any], spec: SweepSpec) -> list[Trial]:
    """Every trial of the sweep, each validated. Invalid combinations fail together, in one line that
    names each offending trial, its swept values and the problem."""
    grid_keys = [k for k, (kind, _) in spec.domains.items() if kind == "grid"]
    grid = list(itertools.product(*(spec.domains[k][1] for k in grid_keys)))
    rng = random.Random(spec.sample_seed)
    trials: list[Trial] = []
    problems: list[str] = []
    for _ in range(spec.num_samples):
        for point in grid:
            index = len(trials) + len(problems)
            values: dict[str, Any] = {}
            for key, (kind, args) in spec.domains.items():
                if kind == "grid":
                    values[key] = point[grid_keys.index(key)]
                elif kind == "constant":
                    values[key] = args
                else:
                    values[key] = _sample(kind, args, rng)
            overrides: dict[str, Any] = {}
            for key, value in values.items():
                if key in spec.named_dimensions:
                    overrides.update({k: v for k, v in value.items() if k != "name"})
                    values[key] = bundle_label(value)
                else:
                    overrides[key] = value
            name = f"t{index:04d}"
            try:
                config = trial_config(base, overrides, prefix="")
            except ConfigError as exc:
                swept = ", ".join(f"{k}={v!r}" for k, v in values.items() if k in spec.swept_keys)
                problems.append(f"{name} ({swept}): {exc}")
                continue
            trials.append(Trial(index, name, overrides, {k: values[k] for k in spec.swept_keys}, config))
    if problems:
        total = len(trials) + len(problems)
        shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ConfigError(f"sweep: {len(problems)} of {total} trials are invalid: {shown}")
    return trials

