"""What several sections of the benchmark share: the CIFAR constants, the benchmarked cases
(:class:`Case`, :func:`classification_cases`), balanced routing (:func:`spread_routing`,
:func:`routing_stats`), one training step (:func:`make_step`), kernel counting (:func:`count_ops`),
timing in turns (:func:`interleaved_step_seconds`) and memory and device helpers."""

from __future__ import annotations

import collections
import contextlib
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..moe.balancing import importance_loss
from ..moe.layer import MoELayer

CIFAR_CLASSES = 100


@dataclass
class Case:
    """One benchmarked model: ``model`` is a registry name, ``kwargs`` its constructor options."""

    name: str
    model: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def graphable(self) -> bool:
        """Whether one CUDA graph can hold its training step (no host read inside: loop and sorted read
        their slice sizes on the host)."""
        return self.kwargs.get("dispatch") not in ("loop", "sorted")


def classification_cases(full: bool) -> list[Case]:
    """Dense, then MoE for E in {4, 10}, k in {1, 2}, positions 1..4 (``full``; else layer4 and position 2
    only), each with the reference loop and the sorted dispatch without capacity (the source papers' model;
    the loop is their code), the loop with capacity factor 1.0 (the same model as the fast path: same drops,
    same results), the padded fast path (capacity factor 1.0) and, for E4 at layer4 or with ``full``, the
    padded path without capacity (exact for any routing, every expert sees the whole batch); last, E4 and
    E10 k2 layer4 padded with inner width 192. The models are the studies' (Pavlitska et al.'s experts and
    noise); MoE routers are noisy so :func:`spread_routing` applies."""
    cases = [Case("dense", "resnet18")]
    positions = (1, 2, 3, 4) if full else (2, 4)
    dispatches = (
        ("loop", None, "loop"),
        ("sorted", None, "sorted"),
        ("loop", 1.0, "loop_cf1"),
        ("padded", 1.0, "padded_cf1"),
        ("padded", None, "padded"),
    )
    for num_experts in (4, 10):
        for k in (1, 2):
            for position in positions:
                for dispatch, cf, label in dispatches:
                    if not full and label == "padded" and (num_experts, position) != (4, 4):
                        continue
                    name = f"moe_E{num_experts}_k{k}_L{position}_{label}"
                    kwargs = dict(
                        num_experts=num_experts,
                        k=k,
                        position=position,
                        dispatch=dispatch,
                        capacity_factor=cf,
                        noisy=True,
                    )
                    cases.append(Case(name, "resnet18_moe", kwargs))
    for num_experts in (4, 10):
        # Inner width 192 instead of 180 (a multiple of 64, which tensor cores prefer; 7% more expert FLOPs):
        # a different model, timed beside the default so a user can weigh the trade.
        kwargs = dict(
            num_experts=num_experts,
            k=2,
            position=4,
            dispatch="padded",
            capacity_factor=1.0,
            noisy=True,
            expert_width=192,
        )
        cases.append(Case(f"moe_E{num_experts}_k2_L4_padded_cf1_w192", "resnet18_moe", kwargs))
    return cases


def spread_routing(model: nn.Module) -> None:
    """Make every noisy MoE layer of a fresh model pick experts uniformly at random: the gate's last linear
    layer and the router's noise projection are zeroed, so every expert gets the same logit and the noise
    (std ``softplus(0.01)``, the same for every expert) alone decides. A benchmark then sees the balanced
    routing a trained model with balancing losses has, and every dispatch the same routing distribution."""
    for module in model.modules():
        if isinstance(module, MoELayer) and module.router.noise is not None:
            fc = getattr(module.gate, "fc", None)
            if fc is None:
                raise ValueError(f"spread_routing: the {type(module.gate).__name__} gate has no final linear layer")
            with torch.no_grad():
                fc.weight.zero_()
                fc.bias.zero_()
                module.router.noise.weight.zero_()


def routing_stats(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """One training-mode forward without gradients: ``dropped`` (fraction of the k x N assignments that
    capacity dropped) and ``max_load`` (the busiest expert's kept tokens over the mean, 1.0 = balanced),
    worst over the model's MoE layers; empty for a dense model."""
    with torch.no_grad():
        routings = model(images).routings
    if not routings:
        return {}
    dropped = max(float(r.dropped) / r.indices.numel() for r in routings)
    max_load = max(
        float(r.dispatch_mask.sum(0).max() / r.dispatch_mask.sum(0).float().mean().clamp_min(1e-9)) for r in routings
    )
    return {"dropped": dropped, "max_load": max_load}


def _peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    # glibc keeps freed pages of earlier cases resident until trimmed: without this, a case's RSS would
    # count what the cases before it freed.
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS, Linux only
        f.write("5")


def _proc_status_mib(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in MiB; None off Linux."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return None


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = _proc_status_mib("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _autocast(device: torch.device, bf16: bool | None = None) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (or wherever ``bf16`` is True), nothing elsewhere."""
    # cache_enabled=False: the autocast weight cache must not outlive a CUDA graph capture.
    if device.type == "cuda" if bf16 is None else bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def make_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    after_backward: Callable[[], None] | None = None,
    bf16: bool | None = None,
) -> Callable[[], torch.Tensor]:
    """One training step on the given batch (``images: [N, 3, H, W]``, ``labels: [N]``): CE + 0.5 x
    importance loss per MoE layer, ``after_backward`` (e.g. a gradient all-reduce) before the optimizer
    step; bf16 autocast on CUDA or where ``bf16`` says so. Returns the loss."""

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=False)  # keep .grad tensors: a CUDA graph needs fixed addresses
        with _autocast(device, bf16):
            output = model(images)
            loss = F.cross_entropy(output.logits.float(), labels)
            for routing in output.routings:
                loss = loss + 0.5 * importance_loss(routing.gates)
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        return loss

    return step


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active (after autograd: forward, backward and optimizer), by
    name, leaving out views and allocations, which launch no kernel (:data:`NO_KERNEL_OPS`)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if not func.is_view and func.overloadpacket.__name__ not in NO_KERNEL_OPS:
            self.counts[func.__name__] += 1
        return func(*args, **(kwargs or {}))


# Ops that only allocate, bookkeep or read metadata (fake tensors dispatch ``device`` queries): no kernel
# runs for them on any device.
NO_KERNEL_OPS = frozenset(
    {
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "_record_function_enter_new",
        "_record_function_exit",
        "promote_types",
        "device",
        "is_same_size",
        "sym_size",
        "sym_stride",
        "sym_numel",
        "sym_storage_offset",
    }
)


def count_ops(run: Callable[[], Any]) -> collections.Counter[str]:
    """The kernel-launching aten ops of one call of ``run`` (:class:`OpCounter`), e.g. a training step.
    Their total is the number of launches an eager GPU step pays (each several microseconds on the host
    however small the tensor) and of kernels in its CUDA graph. The same code dispatches the same ops on
    any device (autocast's op lists aside), so a CPU counts it for a GPU."""
    counter = OpCounter()
    with counter:
        run()
    return counter.counts


def interleaved_step_seconds(
    runs: list[Callable[[], Any]], steps: int, sync: Callable[[], None], blocks: int = 3
) -> list[float]:
    """Seconds per call of each of ``runs`` (e.g. training steps), timed in turns: ``steps`` calls each in up
    to ``blocks`` equal blocks, one block of every run per round (each round starting one run later),
    ``sync()`` (waiting for the device, or for every rank) around each block, and the median block of each.
    A machine that slows down for a while (a shared CPU, a GPU's clocks) then slows every run of a round
    alike, so ratios between them hold; timed one after the other, the drift would count against whichever
    ran during it. The median drops a stall in one block."""
    blocks = max(1, min(blocks, steps))
    per_block = steps // blocks
    times: list[list[float]] = [[] for _ in runs]
    for round_index in range(blocks):
        shift = round_index % len(runs)
        for index in list(range(shift, len(runs))) + list(range(shift)):
            sync()
            start = time.perf_counter()
            for _ in range(per_block):
                runs[index]()
            sync()
            times[index].append((time.perf_counter() - start) / per_block)
    return [sorted(run_times)[len(run_times) // 2] for run_times in times]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
