"""Checkpoints of a training run: rank 0 writes the replicated parameters, optimizer state and
hard-constraint state (buffers of the model) with the run's history; in expert parallelism every rank also
writes its own experts. Plain tensors and numbers only, so every file loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pathlib
from typing import Any

import torch
from torch import nn

from .moe.parallel import expert_tensor_ids

REPLICATED_FILE = "replicated.pt"


def experts_file(rank: int) -> str:
    """The file of rank ``rank``'s experts in an expert-parallel checkpoint."""
    return f"experts_rank{rank}.pt"


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
) -> None:
    """Write this rank's files for the checkpoint after epoch ``len(history)`` into ``folder``."""
    replicated, experts = _split_state(model, optimizer, expert_parallel)
    epoch = len(history)
    if rank == 0:
        torch.save({"epoch": epoch, "history": history, **replicated}, folder / REPLICATED_FILE)
    if expert_parallel:
        torch.save({"epoch": epoch, **experts}, folder / experts_file(rank))


def load_checkpoint(
    folder: pathlib.Path, model: nn.Module, optimizer: torch.optim.Optimizer, rank: int, device: torch.device
) -> list[dict[str, Any]]:
    """Restore model and optimizer from ``folder`` (written by :func:`save_checkpoint` with the same world
    size); returns the history of the epochs it covers."""
    parts = [torch.load(folder / REPLICATED_FILE, map_location=device, weights_only=True)]
    if (folder / experts_file(rank)).exists():
        parts.append(torch.load(folder / experts_file(rank), map_location=device, weights_only=True))
    state = {name: t for part in parts for name, t in part["model"].items()}
    model.load_state_dict(state)
    params = dict(model.named_parameters())
    for part in parts:
        for name, param_state in part["optimizer"].items():
            optimizer.state[params[name]] = param_state
    return list(parts[0]["history"])


def save_model_file(model: nn.Module, path: pathlib.Path) -> None:
    """Write ``{"model": state_dict}`` (CPU tensors) to ``path`` atomically: what ``model.weights`` loads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save({"model": {name: t.detach().cpu() for name, t in model.state_dict().items()}}, partial)
    partial.replace(path)
