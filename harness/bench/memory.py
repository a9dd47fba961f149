"""The memory section: the tensors alive at the peak of one training step, counted on fake tensors
(:func:`tensor_memory`), for every case without host reads (:func:`run_tensor_memory`), and their
table (:func:`format_memory_table`)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..models import create_model
from ..moe.dispatch import PaddedDispatcher
from .common import CIFAR_CLASSES, Case, classification_cases, count_ops, make_step, spread_routing

# MemTracker's kinds of memory -> the names the bench reports.
MEMORY_KINDS = {
    "Parameter": "parameters",
    "Gradient": "gradients",
    "Optstate": "optimizer_state",
    "Activation": "activations",
    "Temp": "temporaries",
    "Buffer": "buffers",
    "Other": "other",
}


def group_experts(model: nn.Module) -> None:
    """Make every capacity-padded MoE layer run its experts as grouped convolutions, as it does on CUDA."""
    for module in model.modules():
        if isinstance(getattr(module, "dispatcher", None), PaddedDispatcher):
            module.dispatcher.execution = "grouped"


def tensor_memory(case: Case, batch_size: int, channels_last: bool = True, with_ops: bool = True) -> dict[str, float]:
    """MiB of the tensors alive at the peak of one training step of ``case`` (:func:`make_step`, bf16
    autocast, padded experts grouped and the model channels_last, as on CUDA; Adam's state already
    created), by kind
    (:data:`MEMORY_KINDS`) plus ``total``, ``parameters_m`` (millions of parameters) and ``ops_per_step``
    (:func:`count_ops` of the same step: the kernels a GPU step launches; left out, and a third of the time
    saved, with ``with_ops=False``).

    Counted by PyTorch's ``MemTracker`` on fake tensors (shapes and dtypes, no storage, no compute), so a
    GPU-sized batch is counted in seconds on any machine. It is the part of ``max_memory_allocated`` that
    the model and its dispatch decide: cuDNN workspaces, allocator rounding and caching are not in it.
    Autocast follows CPU autocast's op lists (convolutions and linear layers in bf16, as on CUDA). Only
    cases without host reads (:attr:`Case.graphable`): fake tensors hold no values to read."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    cpu = torch.device("cpu")
    with FakeTensorMode():
        torch.manual_seed(0)
        model = create_model(case.model, num_classes=CIFAR_CLASSES, **case.kwargs)
        spread_routing(model)
        group_experts(model)
        images = torch.randn(batch_size, 3, 32, 32)
        if channels_last:
            # model.to(memory_format=...) swaps parameters, which fake tensors refuse; the same, in place
            for parameter in model.parameters():
                if parameter.dim() == 4:
                    parameter.data = parameter.data.contiguous(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(0, CIFAR_CLASSES, (batch_size,))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        step = make_step(model, optimizer, images, labels, cpu, bf16=True)
        step()  # creates Adam's moments: the steady state is the second step
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            step()
        peak = tracker.get_tracker_snapshot("peak")
        ops = count_ops(step) if with_ops else {}
    result = {name: 0.0 for name in MEMORY_KINDS.values()} | {"total": 0.0}
    for per_device in peak.values():
        for kind, nbytes in per_device.items():
            name = "total" if kind == "Total" else MEMORY_KINDS[kind.value]
            result[name] += nbytes / 2**20
    result["parameters_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    if with_ops:
        result["ops_per_step"] = sum(ops.values())
    return result


def run_tensor_memory(
    full: bool, batch_size: int, log: Callable[[str], None], only: str | None = None
) -> list[dict[str, Any]]:
    """:func:`tensor_memory` of dense and every host-read-free case (matching ``only``), with
    ``total_vs_dense``."""
    rows: list[dict[str, Any]] = []
    dense_total = None
    for case in classification_cases(full):
        if not case.graphable or (only and case.name != "dense" and not re.search(only, case.name)):
            continue
        counted = tensor_memory(case, batch_size)
        dense_total = dense_total or counted["total"]
        row = {"case": case.name, "batch_size": batch_size, **counted, "total_vs_dense": counted["total"] / dense_total}
        rows.append(row)
        log(
            f"{case.name:32s} tensors at peak {row['total']:7.0f} MiB  x{row['total_vs_dense']:4.2f}  (params "
            f"{row['parameters']:.0f}, grads {row['gradients']:.0f}, Adam {row['optimizer_state']:.0f}, "
            f"activations {row['activations']:.0f}, temporaries {row['temporaries']:.0f}); {row['ops_per_step']} ops"
        )
    return rows


def format_memory_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`run_tensor_memory`'s rows."""
    lines = [
        "| case | params (M) | parameters + grads + Adam MiB | activations MiB | temporaries MiB | total MiB "
        "| vs dense | ops/step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        state = r["parameters"] + r["gradients"] + r["optimizer_state"]
        lines.append(
            f"| {r['case']} | {r['parameters_m']:.1f} | {state:.0f} | {r['activations']:.0f} | "
            f"{r['temporaries']:.0f} | {r['total']:.0f} | {r['total_vs_dense']:.2f} | {r['ops_per_step']} |"
        )
    return "\n".join(lines)
