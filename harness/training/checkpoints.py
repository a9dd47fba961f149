"""Checkpoints of a training run: rank 0 writes the replicated parameters, optimizer state and
hard-constraint state (buffers of the model) with the run's history, resolved config and world size; in
expert parallelism every rank also writes its own experts. Plain tensors, numbers and strings only, so every
file loads with ``torch.load(weights_only=True)``.

Restores are elastic: :func:`read_checkpoint` composes the one-process (global) state from whatever
``experts_rank*.pt`` files a checkpoint holds, and :func:`restore` gives a model the experts it holds now,
so a checkpoint saved on W ranks resumes on W' ranks, without expert parallelism, or in one process.
"""

from __future__ import annotations

import pathlib
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import HarnessError
from ..moe.parallel import ExpertPlacement, expert_tensor_ids, moe_layers

REPLICATED_FILE = "replicated.pt"
EXPERTS_FILE = re.compile(r"experts_rank(\d+)\.pt")
# The first ``experts.<i>.`` of a tensor name: the MoE layer's experts container (layer "" = the model root).
_EXPERT_NAME = re.compile(r"^(?:(?P<layer>.*?)\.)?experts\.(?P<index>\d+)\.(?P<rest>.+)$")


def experts_file(rank: int) -> str:
    """The file of rank ``rank``'s experts in an expert-parallel checkpoint."""
    return f"experts_rank{rank}.pt"


@dataclass
class Checkpoint:
    """A checkpoint as one process would hold it: every tensor under its one-process name (experts by
    their global ids), whatever world size saved it.

    Attributes:
        model: ``{name: tensor}`` (CPU), the whole model's state_dict.
        optimizer: ``{parameter name: per-parameter optimizer state}`` (e.g. Adam's ``exp_avg``).
        epoch: the epochs it covers; history: their metrics, one dict per epoch.
        world_size: ranks that saved it; expert_parallel: whether each held only its experts.
        placement: ``{MoE layer name: [global expert ids of rank r for r < world_size]}`` (expert parallel).
        config: the run's resolved config (``RunConfig.model_dump(mode="json")``); None in older files.
    """

    model: dict[str, torch.Tensor]
    optimizer: dict[str, dict[str, Any]] = field(default_factory=dict)
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    world_size: int = 1
    expert_parallel: bool = False
    placement: dict[str, list[list[int]]] = field(default_factory=dict)
    config: dict[str, Any] | None = None


def moe_layer_names(model: nn.Module) -> list[str]:
    """Module names of the model's MoE layers, in :func:`~harness.moe.parallel.moe_layers` order."""
    layers = set(map(id, moe_layers(model)))
    return [name for name, module in model.named_modules() if id(module) in layers]


def _split_state(model: nn.Module, optimizer: torch.optim.Optimizer, expert_parallel: bool):
    local = expert_tensor_ids(model) if expert_parallel else set()
    names = {id(p): name for name, p in model.named_parameters()}
    parts: dict[bool, dict[str, dict]] = {False: {"model": {}, "optimizer": {}}, True: {"model": {}, "optimizer": {}}}
    for name, tensor in model.state_dict(keep_vars=True).items():
        parts[id(tensor) in local]["model"][name] = tensor.detach().cpu()
    for param, state in optimizer.state.items():
        parts[id(param) in local]["optimizer"][names[id(param)]] = {
            k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in state.items()
        }
    return parts[False], parts[True]


def save_checkpoint(
    folder: pathlib.Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    history: list[dict[str, Any]],
    rank: int,
    expert_parallel: bool,
    world_size: int = 1,
    config: dict[str, Any] | None = None,
) -> None:
    """Write this rank's files for the checkpoint after epoch ``len(history)`` into ``folder``: rank 0's
    ``replicated.pt`` also records ``world_size``, the expert placement and ``config`` (JSON-able), so a
    restore on another world size, and :mod:`harness.evaluate`, need nothing else."""
    replicated, experts = _split_state(model, optimizer, expert_parallel)
    epoch = len(history)
    if rank == 0:
        placement = (
            {
                name: [ExpertPlacement(layer.num_experts, world_size).local_experts(r) for r in range(world_size)]
                for name, layer in zip(moe_layer_names(model), moe_layers(model))
            }
            if expert_parallel
            else {}
        )
        meta = {"world_size": world_size, "expert_parallel": expert_parallel, "placement": placement, "config": config}
        torch.save({"epoch": epoch, "history": history, **meta, **replicated}, folder / REPLICATED_FILE)
    if expert_parallel:
        torch.save({"epoch": epoch, **experts}, folder / experts_file(rank))


def _load(path: pathlib.Path) -> dict[str, Any]:
    # mmap: a rank reads every expert file but touches only the experts it holds.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise HarnessError(f"checkpoint {path}: not readable ({exc.__class__.__name__}: {str(exc)[:120]})") from None


def _inferred_placement(files: list[dict[str, Any]]) -> dict[str, list[list[int]]]:
    """Checkpoints written before the placement was recorded: contiguous blocks in rank order, each rank's
    block as long as the experts its file holds (the :class:`ExpertPlacement` rule)."""
    placement: dict[str, list[list[int]]] = {}
    for part in files:
        counts: dict[str, set[int]] = {}
        for name in part["model"]:
            match = _EXPERT_NAME.match(name)
            if match:
                counts.setdefault(match["layer"] or "", set()).add(int(match["index"]))
        for layer, indices in counts.items():
            ranks = placement.setdefault(layer, [])
            start = sum(map(len, ranks))
            ranks.append(list(range(start, start + len(indices))))
    return placement


def _to_global(names: dict[str, Any], owned: dict[str, list[int]], where: str) -> dict[str, Any]:
    """``names`` (an experts file's model or optimizer part) renamed from local to global expert ids;
    ``owned``: the file's ``{layer: global ids}``."""
    renamed = {}
    for name, value in names.items():
        match = _EXPERT_NAME.match(name)
        ids = owned.get(match["layer"] or "") if match else None
        if ids is None or int(match["index"]) >= len(ids):
            raise HarnessError(f"checkpoint {where}: {name} is not an expert of its recorded placement")
        layer = f"{match['layer']}." if match["layer"] else ""
        renamed[f"{layer}experts.{ids[int(match['index'])]}.{match['rest']}"] = value
    return renamed


def read_checkpoint(folder: str | pathlib.Path) -> Checkpoint:
    """The checkpoint in ``folder`` (``replicated.pt`` and any ``experts_rank<r>.pt``) as one process
    would hold it: each rank's experts renamed to their global ids (params, optimizer moments, buffers)."""
    folder = pathlib.Path(folder)
    if not (folder / REPLICATED_FILE).is_file():
        raise HarnessError(f"checkpoint {folder}: no {REPLICATED_FILE} in it")
    main = _load(folder / REPLICATED_FILE)
    ranks = sorted(int(m[1]) for p in folder.iterdir() if (m := EXPERTS_FILE.fullmatch(p.name)))
    world_size = main.get("world_size", max(len(ranks), 1))
    if ranks and ranks != list(range(world_size)):
        raise HarnessError(f"checkpoint {folder}: expert files of ranks {ranks}, expected ranks 0..{world_size - 1}")
    files = [_load(folder / experts_file(r)) for r in ranks]
    placement = main.get("placement") or _inferred_placement(files)
    model, optimizer = dict(main["model"]), dict(main["optimizer"])
    for rank, part in enumerate(files):
        where = f"{folder / experts_file(rank)}"
        if part["epoch"] != main["epoch"]:
            raise HarnessError(
                f"checkpoint {where}: from epoch {part['epoch']}, {REPLICATED_FILE} from epoch {main['epoch']}"
            )
        owned = {layer: per_rank[rank] for layer, per_rank in placement.items()}
        model.update(_to_global(part["model"], owned, where))
        optimizer.update(_to_global(part["optimizer"], owned, where))
    return Checkpoint(
        model,
        optimizer,
        main["epoch"],
        list(main["history"]),
        world_size,
        main.get("expert_parallel", bool(ranks)),
        placement,
        main.get("config"),
    )


def global_names(model: nn.Module, owned: dict[int, list[int]] | None = None) -> dict[str, str]:
    """``{name in model.state_dict(): one-process name}``: an expert's local index becomes its global id.
    ``owned``: ``{MoE layer index: global ids held}`` from :func:`~harness.moe.parallel.shard_experts`
    (None or empty: every layer holds all its experts)."""
    names = {}
    layers = dict(enumerate(moe_layer_names(model)))
    prefixes = {(f"{layer}." if layer else ""): (owned or {}).get(i) for i, layer in layers.items()}
    for name in model.state_dict():
        names[name] = name
        match = _EXPERT_NAME.match(name)
        prefix = f"{match['layer']}." if match and match["layer"] else ""
        if match and prefix in prefixes and prefixes[prefix] is not None:
            names[name] = f"{prefix}experts.{prefixes[prefix][int(match['index'])]}.{match['rest']}"
    return names


def restore(
    checkpoint: Checkpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    device: torch.device,
    owned: dict[int, list[int]] | None = None,
    where: str = "",
) -> None:
    """Load ``checkpoint`` into ``model`` (holding the experts ``owned`` gives, see :func:`global_names`)
    and its optimizer state into ``optimizer`` (None: model only), tensors moved to ``device``. A
    checkpoint of another model (other tensors, another number of experts) is a one-line
    :class:`HarnessError`."""
    names = global_names(model, owned)
    expected = _whole_model_names(model, names)
    label = f"checkpoint {where}" if where else "checkpoint"
    if set(checkpoint.model) != expected:
        extra, missing = sorted(set(checkpoint.model) - expected), sorted(expected - set(checkpoint.model))
        raise HarnessError(
            f"{label}: does not fit this model (config): "
            f"{len(missing)} tensors missing (e.g. {missing[:1]}), {len(extra)} unexpected (e.g. {extra[:1]})"
        )
    for name, tensor in model.state_dict().items():
        saved = checkpoint.model[names[name]]
        if saved.shape != tensor.shape:
            raise HarnessError(f"{label}: {names[name]} has shape {list(saved.shape)}, the model {list(tensor.shape)}")
    model.load_state_dict({name: checkpoint.model[names[name]] for name in names})
    if optimizer is None:
        return
    for name, param in model.named_parameters():
        state = checkpoint.optimizer.get(names[name])
        if state is not None:  # copies: the optimizer updates them in place, the files are memory-mapped
            optimizer.state[param] = {k: v.to(device, copy=True) if torch.is_tensor(v) else v for k, v in state.items()}


def _whole_model_names(model: nn.Module, names: dict[str, str]) -> set[str]:
    """The one-process names of the whole model, every expert included (also those other ranks hold):
    each held expert's tensor names repeated over every id of its layer."""
    whole = set()
    prefixes = {
        (f"{name}." if name else ""): layer.num_experts
        for name, layer in zip(moe_layer_names(model), moe_layers(model))
    }
    for global_name in names.values():
        match = _EXPERT_NAME.match(global_name)
        prefix = f"{match['layer']}." if match and match["layer"] else ""
        if match and prefix in prefixes:
            whole.update(f"{prefix}experts.{e}.{match['rest']}" for e in range(prefixes[prefix]))
        else:
            whole.add(global_name)
    return whole


def load_checkpoint(
    folder: pathlib.Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    owned: dict[int, list[int]] | None = None,
) -> list[dict[str, Any]]:
    """Restore model and optimizer from ``folder`` (written by :func:`save_checkpoint` on any world size);
    ``owned`` as in :func:`global_names`. Returns the history of the epochs it covers."""
    checkpoint = read_checkpoint(folder)
    restore(checkpoint, model, optimizer, device, owned, where=str(folder))
    return checkpoint.history


def read_model_file(path: str | pathlib.Path) -> Checkpoint:
    """A :func:`save_model_file` file as a :class:`Checkpoint` (the model and, if recorded, the config)."""
    data = _load(pathlib.Path(path))
    state = data.get("model") if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise HarnessError(f"checkpoint {path}: neither a checkpoint nor a --save-model file (no 'model' state_dict)")
    return Checkpoint(model=dict(state), config=data.get("config"))


def save_model_file(model: nn.Module, path: pathlib.Path, config: dict[str, Any] | None = None) -> None:
    """Write ``{"model": state_dict, "config": config}`` (CPU tensors; config JSON-able) to ``path``
    atomically: what ``model.weights`` loads and :mod:`harness.evaluate` evaluates."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    state = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    torch.save({"model": state, "config": config}, partial)
    partial.replace(path)
