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
      search: {type: optuna, metric: val_top1, mode: max, num_samples: 8}     # reserved: see below

Trials are the grid's cross product (in key order) repeated ``num_samples`` times; random domains are drawn
with a seeded sampler, so the same study always yields the same trials (what ``--dry-run`` prints runs).

With ``search: {type: optuna, ...}`` Ray Tune's ``OptunaSearch`` (TPE, seeded with ``sample_seed``) picks the
values of the sampled domains (uniform, loguniform, randint, choice) trial by trial from the results so
far, ``search.num_samples`` trials per grid point: Tune's searchers take no grid, so the grid is crossed by
giving Optuna's trial n the grid point ``n mod (grid size)`` (:class:`OptunaSpace`). Only the grid points
are known before Ray starts; each is validated with every sampled key at its low and at its high end.
"""

from __future__ import annotations

import difflib
import itertools
import math
import random
from dataclasses import dataclass
from typing import Any, get_args, get_origin

from pydantic import BaseModel

from ..config import RunConfig, nested_model, trial_config
from ..errors import ConfigError
from ..extras import missing_extra

RESERVED = ("num_samples", "sample_seed", "max_concurrent_trials", "scheduler", "search")
SEARCHERS = ("optuna",)
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


@dataclass
class SweepSpec:
    """The parsed ``sweep`` section."""

    domains: dict[str, tuple[str, Any]]
    num_samples: int = 1
    sample_seed: int = 0
    max_concurrent_trials: int | None = None
    scheduler: dict[str, Any] | None = None
    search: dict[str, Any] | None = None

    @property
    def sampled_keys(self) -> list[str]:
        """Dimensions drawn from a distribution (by the seeded sampler, or chosen by the searcher)."""
        return [
            key for key, (kind, _) in self.domains.items() if kind in ("choice", "uniform", "loguniform", "randint")
        ]

    @property
    def searcher_trials(self) -> int:
        """Trials a searcher runs: ``search.num_samples`` per grid point (0 without a searcher)."""
        if self.search is None:
            return 0
        return self.search["num_samples"] * math.prod(
            len(args) for kind, args in self.domains.values() if kind == "grid"
        )

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
                raise ConfigError(
                    f"sweep.{key}: unknown domain {name!r}; did you mean {close[0]!r}? (valid: {', '.join(DOMAINS)})"
                )
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
        if name in options and (
            not isinstance(options[name], int) or isinstance(options[name], bool) or options[name] < 1
        ):
            raise ConfigError(f"sweep.{name}: expected an integer >= 1, got {options[name]!r}")
    if "sample_seed" in options and not isinstance(options["sample_seed"], int):
        raise ConfigError(f"sweep.sample_seed: expected an integer, got {options['sample_seed']!r}")
    scheduler = options.get("scheduler")
    if scheduler is not None:
        _check_scheduler(scheduler)
    search = options.get("search")
    if search is not None:
        search = _check_search(search, domains, options)
    spec = SweepSpec(
        domains,
        **{k: v for k, v in options.items() if k not in ("scheduler", "search")},
        scheduler=scheduler,
        search=search,
    )
    if not spec.swept_keys and spec.num_samples == 1:
        raise ConfigError(
            "sweep: nothing varies between trials; add a domain (e.g. seed: {grid: [0, 1]}) "
            "or run python -m harness.train"
        )
    return spec


SCHEDULERS = ("fifo", "asha")


def _check_scheduler(scheduler: Any) -> None:
    if not isinstance(scheduler, dict) or scheduler.get("type") not in SCHEDULERS:
        raise ConfigError(f"sweep.scheduler.type: expected one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    allowed = {"type"} | (
        {"metric", "mode", "grace_period", "reduction_factor"} if scheduler["type"] == "asha" else set()
    )
    unknown = set(scheduler) - allowed
    if unknown:
        raise ConfigError(f"sweep.scheduler: unknown key {sorted(unknown)[0]!r} (valid: {', '.join(sorted(allowed))})")
    if scheduler["type"] == "asha":
        if scheduler.get("mode", "max") not in ("min", "max"):
            raise ConfigError(f"sweep.scheduler.mode: expected min or max, got {scheduler['mode']!r}")
        grace = scheduler.get("grace_period", 1)
        if not isinstance(grace, int) or grace < 1:
            raise ConfigError(f"sweep.scheduler.grace_period: expected an integer >= 1, got {grace!r}")


def _check_search(search: Any, domains: dict[str, tuple[str, Any]], options: dict[str, Any]) -> dict[str, Any]:
    """``sweep.search`` with its defaults filled in (mode max, num_samples 1; the metric, when not given, is
    the study's main metric, filled in by the sweep)."""
    if not isinstance(search, dict) or search.get("type") not in SEARCHERS:
        raise ConfigError(f"sweep.search.type: expected one of {', '.join(SEARCHERS)}, got {search!r}")
    unknown = set(search) - {"type", "metric", "mode", "num_samples"}
    if unknown:
        raise ConfigError(f"sweep.search: unknown key {sorted(unknown)[0]!r} (valid: type, metric, mode, num_samples)")
    problem = missing_extra("optuna", "optuna")
    if problem is not None:
        raise ConfigError(f"sweep.search.type: optuna {problem}")
    search = {"mode": "max", "num_samples": 1, **search}
    if search["mode"] not in ("min", "max"):
        raise ConfigError(f"sweep.search.mode: expected min or max, got {search['mode']!r}")
    samples = search["num_samples"]
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ConfigError(f"sweep.search.num_samples: expected an integer >= 1, got {samples!r}")
    if "num_samples" in options:
        raise ConfigError("sweep.num_samples: with sweep.search, set search.num_samples (trials per grid point)")
    sampled = [k for k, (kind, args) in domains.items() if kind in ("choice", "uniform", "loguniform", "randint")]
    if not sampled:
        raise ConfigError(
            "sweep.search: nothing to search; give a dimension a uniform, loguniform, randint or choice domain"
        )
    for key, (kind, args) in domains.items():
        if kind == "choice" and not all(v is None or isinstance(v, (bool, int, float, str)) for v in args):
            raise ConfigError(
                f"sweep.{key}: under sweep.search a choice takes plain values (Optuna's categorical); "
                "make sub-configs and named dimensions a grid"
            )
    return search


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
    """Every trial of the sweep, each validated (with ``sweep.search``: the grid points, see
    :func:`grid_points`). Invalid combinations fail together, in one line that names each offending
    trial, its swept values and the problem."""
    if spec.search is not None:
        return grid_points(base, spec)
    rng = random.Random(spec.sample_seed)
    trials: list[Trial] = []
    problems: list[str] = []
    for _ in range(spec.num_samples):
        for point in _grid(spec):
            values = {key: _sample(kind, args, rng) for key, (kind, args) in spec.domains.items() if key not in point}
            _add_trial(base, spec, {**point, **values}, trials, problems)
    _raise_problems(trials, problems)
    return trials


def grid_points(base: dict[str, Any], spec: SweepSpec) -> list[Trial]:
    """The grid points of a searched sweep, named ``g000``...: each validated with every sampled key at its
    low end and again at its high end (randint: high - 1; choice: each option), since the searcher may pick
    either; other combinations of sampled values are not checked (a trial the schema refuses errors alone).
    A point's ``values`` and ``overrides`` leave the sampled keys out (the searcher sets them)."""
    sampled = spec.sampled_keys
    points: list[Trial] = []
    problems: list[str] = []
    corners = _corners(spec)
    for index, point in enumerate(_grid(spec)):
        checked: list[Trial] = []
        found: list[str] = []
        for corner in corners:
            _add_trial(base, spec, {**point, **corner}, checked, found, name=f"g{index:03d}")
        problems += found[:1]  # one line per grid point
        if not found:
            trial = checked[0]  # the low ends
            trial.overrides = {k: v for k, v in trial.overrides.items() if k not in sampled}
            trial.values = {k: v for k, v in trial.values.items() if k not in sampled}
            trial.index = index
            points.append(trial)
    _raise_problems(points, problems)
    return points


def _grid(spec: SweepSpec) -> list[dict[str, Any]]:
    """The grid's points in key order, each with the sweep's constant values too."""
    grid_keys = [k for k, (kind, _) in spec.domains.items() if kind == "grid"]
    constants = {k: args for k, (kind, args) in spec.domains.items() if kind == "constant"}
    return [
        {**constants, **dict(zip(grid_keys, point))}
        for point in itertools.product(*(spec.domains[k][1] for k in grid_keys))
    ]


def _corners(spec: SweepSpec) -> list[dict[str, Any]]:
    """Sampled keys at their low ends, at their high ends, and each further choice option."""
    ends: dict[str, list[Any]] = {}
    for key in spec.sampled_keys:
        kind, args = spec.domains[key]
        ends[key] = list(args) if kind == "choice" else [args[0], args[1] - 1 if kind == "randint" else args[1]]
    widest = max(len(v) for v in ends.values())
    return [{key: options[min(i, len(options) - 1)] for key, options in ends.items()} for i in range(widest)]


def _add_trial(
    base: dict[str, Any],
    spec: SweepSpec,
    point: dict[str, Any],
    trials: list[Trial],
    problems: list[str],
    name: str | None = None,
) -> None:
    """Validate one point (dimension -> value, in the sweep's key order) and append it as a Trial, or its
    problem as one line."""
    index = len(trials) + len(problems)
    name = name or f"t{index:04d}"
    values = {key: point[key] for key in spec.domains}
    overrides: dict[str, Any] = {}
    for key, value in values.items():
        if key in spec.named_dimensions:
            overrides.update({k: v for k, v in value.items() if k != "name"})
            values[key] = bundle_label(value)
        else:
            overrides[key] = value
    try:
        config = trial_config(base, overrides, prefix="")
    except ConfigError as exc:
        swept = ", ".join(f"{k}={v!r}" for k, v in values.items() if k in spec.swept_keys)
        problems.append(f"{name} ({swept}): {exc}")
        return
    trials.append(Trial(index, name, overrides, {k: values[k] for k in spec.swept_keys}, config))


def _raise_problems(trials: list[Trial], problems: list[str]) -> None:
    if problems:
        total = len(trials) + len(problems)
        shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ConfigError(f"sweep: {len(problems)} of {total} trials are invalid: {shown}")


class OptunaSpace:
    """Ray Tune ``OptunaSearch``'s define-by-run space for a searched sweep (picklable: Tune saves it with
    the searcher, so a resumed sweep goes on with the same study). Optuna picks each sampled key; its trial
    n runs grid point ``n mod len(points)`` as a constant, which crosses the grid with the search (TPE
    models the sampled keys only). The returned ``trial`` entry names the trial ``t<n>`` and lists the
    keys the searcher chose (see :func:`~harness.config.resolve_entry`)."""

    def __init__(self, points: list[dict[str, Any]], domains: dict[str, tuple[str, Any]]) -> None:
        self.points = points  # each {"name", "overrides", "values"} of a grid point
        self.domains = domains  # sampled key -> (kind, args)

    def __call__(self, ot_trial: Any) -> dict[str, Any]:
        for key, (kind, args) in self.domains.items():
            if kind == "choice":
                ot_trial.suggest_categorical(key, args)
            elif kind == "randint":
                ot_trial.suggest_int(key, args[0], args[1] - 1)
            else:
                ot_trial.suggest_float(key, args[0], args[1], log=kind == "loguniform")
        point = self.points[ot_trial.number % len(self.points)]
        return {"trial": {**point, "name": f"t{ot_trial.number:04d}", "searched": list(self.domains)}}
