"""Starting a model from saved weights, and the parts of it that do not train (frozen parameters,
frozen BatchNorm statistics): what the papers' two-stage protocols need.
"""

from __future__ import annotations

import fnmatch
import pathlib

import torch
from torch import nn

from ..errors import ConfigError


def read_state_dict(path: str | pathlib.Path, field: str = "model.weights") -> dict[str, torch.Tensor]:
    """A local state_dict file: a plain ``{name: tensor}``, or a harness checkpoint (``replicated.pt``) or
    ``--save-model`` file whose ``model`` entry is one. A missing or unreadable file is a
    :class:`ConfigError` naming ``field`` and the path."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"{field}: {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ConfigError(f"{field}: {path}: not a PyTorch state_dict ({exc.__class__.__name__})") from exc
    state = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"{field}: {path}: not a PyTorch state_dict")
    if any(path.parent.glob("experts_rank*.pt")):
        # An expert-parallel checkpoint keeps each rank's experts in its own file: this one has none of them.
        raise ConfigError(
            f"{field}: {path}: part of an expert-parallel checkpoint (its experts are in "
            f"experts_rank*.pt); start from a run without expert parallelism or a --save-model file"
        )
    return state


def load_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    path: str | pathlib.Path,
    field: str = "model.weights",
    left_out: int = 0,
) -> dict[str, int]:
    """Load the tensors of ``state`` whose name and shape match ``model``'s (the rest keep their init) and
    print one line with the counts. Returns ``{"loaded", "skipped" (the file's unused tensors, plus
    ``left_out`` the caller dropped before), "kept_init" (the model's tensors not loaded)}``; nothing
    matching is a :class:`ConfigError`."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ConfigError(f"{field}: {path}: no tensor matches this model")
    model.load_state_dict(usable, strict=False)
    counts = {
        "loaded": len(usable),
        "skipped": len(state) - len(usable) + left_out,
        "kept_init": len(own) - len(usable),
    }
    # One line, so a run that silently trained from scratch (a wrong file) shows in its log.
    print(
        f"{field}: {path}: loaded {counts['loaded']} tensors, skipped {counts['skipped']} of the file's, "
        f"{counts['kept_init']} of the model's keep their init",
        flush=True,
    )
    return counts


def load_matching_weights(model: nn.Module, path: str | pathlib.Path) -> dict[str, int]:
    """:func:`load_state` of the file at ``path`` (see :func:`read_state_dict`)."""
    return load_state(model, read_state_dict(path), path)


def freeze_parameters(model: nn.Module, patterns: list[str]) -> int:
    """Stop training every parameter whose name matches one of the fnmatch ``patterns``
    (``requires_grad = False``). Returns how many tensors were frozen; a pattern that matches no parameter
    is a :class:`ConfigError` (a typo would otherwise train everything silently)."""
    frozen = 0
    for pattern in patterns:
        matched = [p for name, p in model.named_parameters() if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            names = [name for name, _ in model.named_parameters()]
            example = ", ".join(names[:3])
            raise ConfigError(f"train.freeze: {pattern!r} matches no parameter (names look like {example}, ...)")
        for param in matched:
            if param.requires_grad:
                param.requires_grad_(False)
                frozen += 1
    return frozen


def set_train_mode(model: nn.Module, frozen_bn: bool) -> None:
    """``model.train()``, with every BatchNorm layer back in eval mode when ``frozen_bn`` (its running
    statistics stay as loaded, as the reference's ``freeze_bn``)."""
    model.train()
    if frozen_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
