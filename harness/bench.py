"""Training-throughput benchmark: dense vs MoE ResNet-18, reference vs fast dispatch, eager vs CUDA graph.

``python -m harness.bench [--device cpu|cuda] [--full] [--json PATH]``

Every case trains (forward, backward, Adam step; CE + importance loss) on one fixed batch already on the
device, so the figure is the model's speed, not the input pipeline's. MoE cases route as a balanced model
does (:func:`spread_routing`): a freshly initialised gate sends every random image to the same expert,
which would time a different model (one busy expert, the others idle and skipped by Adam). On CUDA: bf16
autocast and channels_last. Ratios are against the dense model measured in the same run and the same execution mode
(eager or one CUDA graph per training step). The cases of one MoE layer are timed in turns with a dense
model of their own (:func:`interleaved_step_seconds`), so a machine's drift does not decide which dispatch
wins. Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the process's peak RSS on CPU (reset per
case through ``/proc/self/clear_refs``), each less what the other cases alive beside it hold.

An ``epoch`` section times one whole CIFAR-100-sized epoch (50k train + 10k eval images, synthetic,
GPU-resident) through the harness's own train loop; ``expert_parallel`` trains expert-parallel on two
spawned CPU ranks (gloo) with the counted and the static all-to-all; ``detection`` compares RetinaNet
with RetinaNet-MoE heads; ``coco_eval`` times COCOeval on the shared oracle.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import math
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import HarnessError
from .models import create_model
from .moe.balancing import AuxWeights, importance_loss
from .moe.dispatch import PaddedDispatcher
from .moe.routing import TopKRouter

CIFAR_CLASSES = 100
# Noise std of the benchmarked routers: far above the spread of a fresh gate's logits over the experts
# (up to ~3 on random images, the same for every image), so top-k is close to uniform at random.
ROUTING_NOISE_STD = 20.0
# torch.compile takes ~a minute per model: only the headline cases run in that mode.
COMPILED_CASES = ("dense", "moe_E4_k2_L4_padded_cf1", "moe_E10_k2_L4_padded_cf1")


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


@dataclass
class Row:
    """One measured case: throughput in images/s, ratio vs dense in the same mode, peak memory in MiB over
    the timed steps (and over warm-up, autotuning included), the routing it ran under
    (:func:`routing_stats`; None for dense) and the kernel-launching ops of one step (:func:`count_ops`;
    None under ``torch.compile``). Over ``repeats`` runs of the case list (``--repeat``): the median run's
    speed, each ratio against its own run's dense, the lowest and highest ratio, the first run's memory.
    ``ratio_vs_loop``: speed over the reference loop's (the ``loop`` case of the same MoE layer, timed in
    turns with it; the median over runs), None for dense and where the loop did not run (graph mode)."""

    case: str
    mode: str
    images_per_s: float
    ratio_vs_dense: float
    peak_mem_mib: float
    mem_vs_dense: float
    warmup_peak_mem_mib: float
    dropped: float | None = None
    max_load: float | None = None
    ops_per_step: int | None = None
    repeats: int = 1
    ratio_min: float | None = None
    ratio_max: float | None = None
    ratio_vs_loop: float | None = None

    def __post_init__(self) -> None:
        if self.ratio_min is None:
            self.ratio_min = self.ratio_max = self.ratio_vs_dense


def classification_cases(full: bool) -> list[Case]:
    """Dense, then MoE for E in {4, 10}, k in {1, 2}, positions 1..4 (``full``; else layer4 and position 2
    only), each with the reference loop and the sorted dispatch without capacity (the source papers' model;
    the loop is their code), the loop with capacity factor 1.0 (the same model as the fast path: same drops,
    same results), the padded fast path (capacity factor 1.0) and, for E4 at layer4 or with ``full``, the
    padded path without capacity (exact for any routing, every expert sees the whole batch); last, E4 and
    E10 k2 layer4 padded with inner width 192. MoE routers are noisy so :func:`spread_routing` applies.
    The experts use ``expert_layout="inner_narrow"``, the layout the recorded figures were measured with;
    the reference layout (the models' default since 2026-11-30) is the next measurement."""
    cases = [Case("dense", "resnet18")]
    positions = (1, 2, 3, 4) if full else (2, 4)
    dispatches = (("loop", None, "loop"), ("sorted", None, "sorted"), ("loop", 1.0, "loop_cf1"),
                  ("padded", 1.0, "padded_cf1"), ("padded", None, "padded"))
    for num_experts in (4, 10):
        for k in (1, 2):
            for position in positions:
                for dispatch, cf, label in dispatches:
                    if not full and label == "padded" and (num_experts, position) != (4, 4):
                        continue
                    name = f"moe_E{num_experts}_k{k}_L{position}_{label}"
                    kwargs = dict(num_experts=num_experts, k=k, position=position, dispatch=dispatch, capacity_factor=cf,
                                  noisy=True, noise_form="shazeer", expert_layout="inner_narrow")
                    cases.append(Case(name, "resnet18_moe", kwargs))
    for num_experts in (4, 10):
        # Inner width 192 instead of 180 (a multiple of 64, which tensor cores prefer; 7% more expert FLOPs):
        # a different model, timed beside the default so a user can weigh the trade.
        kwargs = dict(num_experts=num_experts, k=2, position=4, dispatch="padded", capacity_factor=1.0, noisy=True,
                      noise_form="shazeer", expert_layout="inner_narrow", expert_width=192)
        cases.append(Case(f"moe_E{num_experts}_k2_L4_padded_cf1_w192", "resnet18_moe", kwargs))
    return cases


def spread_routing(model: nn.Module, noise_std: float = ROUTING_NOISE_STD) -> None:
    """Make every noisy router of a fresh model pick experts uniformly at random (noise std ``noise_std``,
    through the noise layer's bias: its weights start at zero in ``noise_form="shazeer"``, which the
    bench's cases use), so a benchmark sees the balanced routing a trained model with balancing losses
    has, and every dispatch the same routing distribution."""
    bias = noise_std + math.log(-math.expm1(-noise_std))  # softplus^-1(noise_std)
    for module in model.modules():
        if isinstance(module, TopKRouter) and module.noise is not None:
            if module.noise.bias is None:
                raise ValueError("spread_routing needs routers with noise_form='shazeer' (a noise bias)")
            with torch.no_grad():
                module.noise.bias.fill_(bias)


def routing_stats(model: nn.Module, images: torch.Tensor) -> dict[str, float]:
    """One training-mode forward without gradients: ``dropped`` (fraction of the k x N assignments that
    capacity dropped) and ``max_load`` (the busiest expert's kept tokens over the mean, 1.0 = balanced),
    worst over the model's MoE layers; empty for a dense model."""
    with torch.no_grad():
        routings = model(images).routings
    if not routings:
        return {}
    dropped = max(float(r.dropped) / r.indices.numel() for r in routings)
    max_load = max(float(r.dispatch_mask.sum(0).max() / r.dispatch_mask.sum(0).float().mean().clamp_min(1e-9))
                   for r in routings)
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
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:  # "5" resets the peak RSS (VmHWM), Linux only
            f.write("5")


def _proc_status_mib(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (``VmHWM``, ``VmRSS``) in MiB; None off Linux."""
    with contextlib.suppress(OSError):
        with open("/proc/self/status") as f:
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


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
              device: torch.device, after_backward: Callable[[], None] | None = None,
              bf16: bool | None = None) -> Callable[[], torch.Tensor]:
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
NO_KERNEL_OPS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                           "_record_function_enter_new", "_record_function_exit", "promote_types", "device",
                           "is_same_size", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset"})


def count_ops(run: Callable[[], Any]) -> collections.Counter[str]:
    """The kernel-launching aten ops of one call of ``run`` (:class:`OpCounter`), e.g. a training step.
    Their total is the number of launches an eager GPU step pays (each several microseconds on the host
    however small the tensor) and of kernels in its CUDA graph. The same code dispatches the same ops on
    any device (autocast's op lists aside), so a CPU counts it for a GPU."""
    counter = OpCounter()
    with counter:
        run()
    return counter.counts


@dataclass
class PreparedCase:
    """One case built and warmed up, ready to time: ``run()`` is one training step (an eager call or a CUDA
    graph's replay) on its fixed batch ``images: [N, 3, 32, 32]``; ``peak_mem_mib`` the memory its step
    took (:func:`prepare_case`), ``warmup_peak_mem_mib`` that over creation and warm-up,
    ``ops_per_step`` its kernel-launching ops (None under ``torch.compile``) and ``tensor_mib`` what it
    keeps between steps (parameters, buffers, gradients, optimizer state, batch)."""

    case: Case
    run: Callable[[], Any]
    eager_model: nn.Module
    images: torch.Tensor
    peak_mem_mib: float
    warmup_peak_mem_mib: float
    ops_per_step: int | None
    tensor_mib: float = 0.0


def _tensor_mib(*tensors: torch.Tensor | None) -> float:
    """MiB of the distinct storages among ``tensors`` (None skipped)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}
    return sum(storages.values()) / 2**20


def prepare_case(case: Case, device: torch.device, batch_size: int, mode: str,
                 held_mib: float = 0.0) -> PreparedCase:
    """Build ``case`` (seeded: every case sees the same batch), warm it up and measure its memory while it
    runs alone. ``mode``: ``eager``, ``graph`` (the whole step captured once and replayed; CUDA only) or
    ``compile`` (``torch.compile`` of the model, default options). The peak is the steady state: one step
    after warm-up (the capture in graph mode, since a replay allocates nothing), so cuDNN's one-time
    autotuning and compilation stay out of it; the warm-up peak covers model creation and warm-up.
    ``held_mib`` (memory that cases built before this one still hold) is left out of both."""
    _peak_memory_reset(device)
    if device.type == "cuda":
        # cuDNN autotuning re-runs for every new input shape: it would charge the loop's varying expert
        # batches with a search per step, so it is on only for the static-shape cases.
        torch.backends.cudnn.benchmark = case.graphable
    torch.manual_seed(0)
    model = create_model(case.model, num_classes=CIFAR_CLASSES, **case.kwargs).to(device)
    spread_routing(model)
    images = torch.randn(batch_size, 3, 32, 32, device=device)
    labels = torch.randint(0, CIFAR_CLASSES, (batch_size,), device=device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)  # as build_optimizer; graph-capturable
    eager_model = model  # routing stats run eagerly: a compiled model would recompile for no_grad
    if mode == "compile":
        model = torch.compile(model)
    step = make_step(model, optimizer, images, labels, device)
    warmup = 3
    ops_per_step = None
    if mode == "graph":
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up on a side stream, as CUDA graph capture requires
            for _ in range(warmup - 1):
                step()
            ops_per_step = sum(count_ops(step).values())
        torch.cuda.current_stream(device).wait_stream(side)
        warmup_peak = _peak_memory_mib(device)
        _peak_memory_reset(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run: Callable[[], Any] = graph.replay
    else:
        counted = mode == "eager"  # a dispatch mode would break torch.compile's graph
        for _ in range(warmup - counted):
            step()
        if counted:  # the last warm-up step: Adam's state exists, as in the timed steps
            ops_per_step = sum(count_ops(step).values())
        warmup_peak = _peak_memory_mib(device)
        _peak_memory_reset(device)
        step()
        # Timed in turns with other cases: each step under its own autotuning setting, as in warm-up.
        run = _with_cudnn_benchmark(step, case.graphable) if device.type == "cuda" else step
    _sync(device)
    peak = _peak_memory_mib(device)
    kept = _tensor_mib(images, labels, *eager_model.parameters(), *eager_model.buffers(),
                       *(p.grad for p in eager_model.parameters()),
                       *(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)))
    return PreparedCase(case, run, eager_model, images, peak - held_mib, max(peak, warmup_peak) - held_mib,
                        ops_per_step, kept)


def _with_cudnn_benchmark(step: Callable[[], Any], benchmark: bool) -> Callable[[], Any]:
    def run() -> Any:
        torch.backends.cudnn.benchmark = benchmark
        return step()

    return run


def interleaved_step_seconds(runs: list[Callable[[], Any]], steps: int, sync: Callable[[], None],
                             blocks: int = 3) -> list[float]:
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


# MemTracker's kinds of memory -> the names the bench reports.
MEMORY_KINDS = {"Parameter": "parameters", "Gradient": "gradients", "Optstate": "optimizer_state",
                "Activation": "activations", "Temp": "temporaries", "Buffer": "buffers", "Other": "other"}


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


def run_tensor_memory(full: bool, batch_size: int, log: Callable[[str], None],
                      only: str | None = None) -> list[dict[str, Any]]:
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
        log(f"{case.name:32s} tensors at peak {row['total']:7.0f} MiB  x{row['total_vs_dense']:4.2f}  (params "
            f"{row['parameters']:.0f}, grads {row['gradients']:.0f}, Adam {row['optimizer_state']:.0f}, "
            f"activations {row['activations']:.0f}, temporaries {row['temporaries']:.0f}); {row['ops_per_step']} ops")
    return rows


def format_memory_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of :func:`run_tensor_memory`'s rows."""
    lines = ["| case | params (M) | parameters + grads + Adam MiB | activations MiB | temporaries MiB | total MiB | vs dense "
             "| ops/step |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        state = r["parameters"] + r["gradients"] + r["optimizer_state"]
        lines.append(f"| {r['case']} | {r['parameters_m']:.1f} | {state:.0f} | {r['activations']:.0f} | "
                     f"{r['temporaries']:.0f} | {r['total']:.0f} | {r['total_vs_dense']:.2f} | {r['ops_per_step']} |")
    return "\n".join(lines)


def epoch_time(device: torch.device, batch_size: int, train_images: int = 50_000, val_images: int = 10_000,
               overrides: dict[str, Any] | None = None) -> dict[str, float]:
    """Seconds for one training epoch plus one evaluation of ``resnet18_moe`` (E=4, k=2, layer4, padded
    dispatch) through :func:`harness.train.train_one_epoch` / :func:`harness.train.evaluate` on a synthetic
    CIFAR-100-sized data set (uint8, GPU-resident on CUDA). The first epoch is a warm-up and not timed."""
    from .config import RunConfig
    from .data.base import ClassificationData
    from .train import Session, build_model, build_optimizer, evaluate, train_one_epoch, uses_channels_last

    generator = torch.Generator().manual_seed(0)
    data = ClassificationData(
        torch.randint(0, 256, (train_images, 3, 32, 32), dtype=torch.uint8, generator=generator),
        torch.randint(0, CIFAR_CLASSES, (train_images,), generator=generator),
        torch.randint(0, 256, (val_images, 3, 32, 32), dtype=torch.uint8, generator=generator),
        torch.randint(0, CIFAR_CLASSES, (val_images,), generator=generator),
        CIFAR_CLASSES,
    ).to(device)
    raw = {
        "model": {"name": "resnet18_moe"},
        "moe": {"num_experts": 4, "k": 2, "position": [4], "capacity_factor": 1.0, "dispatch": "padded",
                "expert_layout": "inner_narrow", "losses": {"importance": 0.5}},
        "data": {"name": "synthetic_cifar", "batch_size": batch_size, "val_batch_size": 1024},
        "train": {"device": device.type},
        "optim": {"name": "adam", "lr": 1e-3},
    }
    for key, value in (overrides or {}).items():
        raw[key].update(value)
    config = RunConfig.model_validate(raw)
    torch.manual_seed(0)
    model = build_model(config, data).to(device)
    if uses_channels_last(config, device):  # as train_loop lays it out
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, model)
    session = Session(device=device)
    timings: dict[str, float] = {}
    for epoch in (1, 2):
        _sync(device)
        start = time.perf_counter()
        train_one_epoch(model, optimizer, data, config, device, epoch, session)
        _sync(device)
        middle = time.perf_counter()
        evaluate(model, data, config, device, session)
        _sync(device)
        timings = {"train_s": middle - start, "eval_s": time.perf_counter() - middle}
    timings["epoch_s"] = timings["train_s"] + timings["eval_s"]
    timings.update(train_images=train_images, val_images=val_images, batch_size=batch_size)
    return timings


EXPERT_PARALLEL_DISPATCHES = ("loop", "padded")


def _expert_parallel_rank(rank: int, world: int, store: str, batch_size: int, steps: int, out: str) -> None:
    """One spawned gloo rank of :func:`expert_parallel_throughput`: both exchanges' models side by side,
    their steps timed in turns; rank 0 writes the seconds per step of each as JSON."""
    import os

    import torch.distributed as dist

    from .moe.parallel import Collective, shard_experts, sync_gradients

    torch.set_num_threads(max(1, (os.cpu_count() or world) // world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        collective = Collective()
        generator = torch.Generator().manual_seed(rank)
        images = torch.randn(batch_size, 3, 32, 32, generator=generator)
        labels = torch.randint(0, CIFAR_CLASSES, (batch_size,), generator=generator)
        steps_by_dispatch = []
        for dispatch in EXPERT_PARALLEL_DISPATCHES:
            torch.manual_seed(0)  # the same model on every rank before sharding
            model = create_model("resnet18_moe", num_classes=CIFAR_CLASSES, num_experts=4, k=2, position=4,
                                 dispatch=dispatch, capacity_factor=1.0, noisy=True, noise_form="shazeer",
                                 expert_layout="inner_narrow")
            spread_routing(model)  # else every token would travel to the same expert's rank
            shard_experts(model, collective)
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
            step = make_step(model, optimizer, images, labels, torch.device("cpu"),
                             after_backward=lambda model=model: sync_gradients(model, collective, expert_parallel=True))
            for _ in range(2):
                step()
            steps_by_dispatch.append(step)
        seconds = interleaved_step_seconds(steps_by_dispatch, steps, dist.barrier)
        if rank == 0:
            with open(out, "w") as f:
                json.dump(dict(zip(EXPERT_PARALLEL_DISPATCHES, seconds)), f)
    finally:
        dist.destroy_process_group()


def expert_parallel_throughput(world: int, batch_size: int, steps: int) -> dict[str, float]:
    """Images/s over all ranks, by dispatch, of ``resnet18_moe`` (E=4, k=2, layer4, capacity factor 1.0)
    trained expert-parallel on ``world`` spawned CPU processes (gloo), each with ``batch_size`` images:
    ``"loop"`` exchanges counts first and sends exactly the routed tokens, ``"padded"`` sends fixed
    capacity-padded blocks (:class:`~harness.moe.parallel.PaddedExpertParallelDispatcher`). Both models
    live in the same ranks and their steps are timed in turns (:func:`interleaved_step_seconds`)."""
    import os
    import tempfile

    import torch.multiprocessing as mp

    from . import bench  # by its module name: under ``python -m`` this file is ``__main__``

    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "seconds.json")
        mp.start_processes(bench._expert_parallel_rank, args=(world, os.path.join(folder, "store"), batch_size, steps,
                                                            out), nprocs=world, start_method="spawn")
        with open(out) as f:
            seconds = json.load(f)
    return {dispatch: world * batch_size / seconds[dispatch] for dispatch in EXPERT_PARALLEL_DISPATCHES}


def detection_throughput(moe: bool, device: torch.device, batch_size: int, image_size: int, steps: int,
                         backbone: str) -> tuple[float, float]:
    """``(images/s, peak MiB)`` of training torchvision RetinaNet (dense) or RetinaNet-MoE (both head
    subnets E=4, k=2, padded dispatch, capacity factor 1.0) on random images with three boxes each."""
    _peak_memory_reset(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    options = dict(num_classes=81, backbone=backbone, min_size=image_size, max_size=image_size)
    if moe:
        options.update(num_experts=4, k=2, capacity_factor=1.0, dispatch="padded", aux_weights=AuxWeights(importance=0.5))
    model = create_model("retinanet_moe" if moe else "retinanet", **options).to(device)
    images = [torch.rand(3, image_size, image_size, device=device) for _ in range(batch_size)]
    boxes = torch.tensor([[10.0, 20, 40, 50], [60, 60, 160, 200], [5, 100, 250, 250]], device=device) * image_size / 256
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2, 3], device=device)} for _ in range(batch_size)]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device):
            losses = model(images, targets)
        sum(losses.values()).backward()
        optimizer.step()

    for _ in range(2):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch_size / (time.perf_counter() - start), _peak_memory_mib(device)


def coco_eval_time(oracle: str) -> dict[str, float] | None:
    """Seconds pycocotools' COCOeval takes on the oracle (100 val2014 images, its fake detections), or
    None when the oracle folder is absent."""
    import pathlib

    from .data.coco import read_coco
    from .metrics.detection import coco_evaluate

    folder = pathlib.Path(oracle)
    if not (folder / "instances_val2014_100.json").is_file():
        return None
    gt = read_coco(folder / "instances_val2014_100.json")
    results = json.loads((folder / "instances_val2014_fakebbox100_results.json").read_text())
    start = time.perf_counter()
    stats = coco_evaluate(gt, results)
    return {"seconds": time.perf_counter() - start, "images": 100, "detections": len(results), "ap": stats["ap"]}


def case_groups(cases: list[Case]) -> list[list[Case]]:
    """The cases timed in turns against each other (:func:`interleaved_step_seconds`): the MoE cases of one
    MoE layer (experts, k, position; every dispatch and width), in first-seen order, each group led by
    ``dense`` (so every group has its own dense figure); just ``[dense]`` when no MoE case is left."""
    dense = [case for case in cases if case.name == "dense"]
    groups: dict[tuple[int, int, int], list[Case]] = {}
    for case in cases:
        if case.name != "dense":
            key = (case.kwargs["num_experts"], case.kwargs["k"], case.kwargs["position"])
            groups.setdefault(key, []).append(case)
    return [dense + group for group in groups.values()] or [dense]


def _selected(case: Case, mode: str, only: str | None) -> bool:
    if only and case.name != "dense" and not re.search(only, case.name):
        return False
    if mode == "graph" and not case.graphable:
        return False
    return mode != "compile" or case.name in COMPILED_CASES


def measure_group(group: list[Case], device: torch.device, batch_size: int, steps: int, mode: str) -> list[Row]:
    """One row per case of ``group`` (dense first): all its cases built and warmed up, then their steps
    timed in turns (:func:`interleaved_step_seconds`), each against the group's dense
    (``ratio_vs_dense``) and its reference loop (``ratio_vs_loop``, where the group has one in this mode).
    Memory is each case's own, measured while it ran alone, less what the cases built before it hold."""
    cuda = device.type == "cuda"
    group_start = torch.cuda.memory_allocated(device) if cuda else 0
    prepared: list[PreparedCase] = []
    for case in group:
        # What the cases built so far hold: on CUDA the allocator's own count (their CUDA graphs' pools
        # too); on CPU their tensors, since the resident set also keeps caches that the next case reuses.
        held = ((torch.cuda.memory_allocated(device) - group_start) / 2**20 if cuda
                else sum(p.tensor_mib for p in prepared))
        prepared.append(prepare_case(case, device, batch_size, mode, held))
    seconds = interleaved_step_seconds([p.run for p in prepared], steps, lambda: _sync(device))
    speeds = [batch_size / s for s in seconds]
    loop_speed = next((speed for p, speed in zip(prepared, speeds) if p.case.name.endswith("_loop")), None)
    dense_mem, rows = prepared[0].peak_mem_mib, []
    for p, speed in zip(prepared, speeds):
        with _autocast(device):
            stats = routing_stats(p.eager_model, p.images)
        vs_loop = None if loop_speed is None or p.case.name == "dense" else speed / loop_speed
        rows.append(Row(p.case.name, mode, speed, speed / speeds[0], p.peak_mem_mib,
                        p.peak_mem_mib / dense_mem, p.warmup_peak_mem_mib, ratio_vs_loop=vs_loop,
                        ops_per_step=p.ops_per_step, **stats))
    return rows


def run_classification(device: torch.device, full: bool, batch_size: int, steps: int, modes: list[str],
                       log: Callable[[str], None], only: str | None = None) -> list[Row]:
    """Every case (matching ``only``) in every mode, timed group by group (:func:`case_groups`,
    :func:`measure_group`): dense first, with the median of its groups' speeds, then each MoE case."""
    # One dense step first: the process's one-time costs (kernel libraries, thread pools, cuBLAS workspace)
    # would otherwise count in the memory of whichever case ran first.
    prepare_case(Case("dense", "resnet18"), device, batch_size, "eager")
    rows: list[Row] = []
    for mode in modes:
        selected = [case for case in classification_cases(full) if _selected(case, mode, only)]
        dense_rows, moe_rows = [], []
        for group in case_groups(selected):
            group_rows = measure_group(group, device, batch_size, steps, mode)
            gc.collect()  # the group's models and CUDA graphs go before the next group is built
            if device.type == "cuda":
                torch.cuda.empty_cache()
            dense_rows.append(group_rows[0])
            moe_rows.extend(group_rows[1:])
            for row in group_rows:
                log(f"{row.case:32s} {row.mode:6s} {row.images_per_s:10.0f} img/s  x{row.ratio_vs_dense:5.2f}  "
                    f"{_vs_loop_text(row):>12s}  {row.peak_mem_mib:9.0f} MiB  x{row.mem_vs_dense:5.2f}  "
                    f"{_ops_text(row)} ops" + _routing_text(row))
        dense_speed = sorted(row.images_per_s for row in dense_rows)[(len(dense_rows) - 1) // 2]
        rows.append(Row(**{**asdict(dense_rows[0]), "images_per_s": dense_speed}))
        rows.extend(moe_rows)
    return rows


MEMORY_FIELDS = ("peak_mem_mib", "mem_vs_dense", "warmup_peak_mem_mib")


def merge_repeats(runs: list[list[Row]]) -> list[Row]:
    """One row per case and mode from several runs of the same cases (each run's ratios against its own
    dense): the speed of the run with the median ratio (the lower middle one for an even count),
    ``ratio_min``/``ratio_max`` over all runs, so a reader sees how far the machine moved a case between
    runs, the median ``ratio_vs_loop``, and the memory of the first run (a CPU process keeps the pages of
    earlier cases resident, so a later run's peak RSS would count them)."""
    merged = []
    for same_case in zip(*runs):
        by_ratio = sorted(same_case, key=lambda row: row.ratio_vs_dense)
        median = by_ratio[(len(by_ratio) - 1) // 2]
        first = asdict(same_case[0])
        vs_loop = sorted(row.ratio_vs_loop for row in same_case if row.ratio_vs_loop is not None)
        merged.append(Row(**{**asdict(median), **{name: first[name] for name in MEMORY_FIELDS},
                             "repeats": len(same_case), "ratio_min": by_ratio[0].ratio_vs_dense,
                             "ratio_max": by_ratio[-1].ratio_vs_dense,
                             "ratio_vs_loop": vs_loop[(len(vs_loop) - 1) // 2] if vs_loop else None}))
    return merged


def _ops_text(row: Row) -> str:
    return "-" if row.ops_per_step is None else str(row.ops_per_step)


def _vs_loop_text(row: Row) -> str:
    return "-" if row.ratio_vs_loop is None else f"{row.ratio_vs_loop:.2f} vs loop"


def _routing_text(row: Row) -> str:
    return "" if row.dropped is None else f"  dropped {row.dropped:4.2f}  max load {row.max_load:4.2f}"


def format_table(rows: list[Row]) -> str:
    """A Markdown table of the rows."""
    lines = ["| case | mode | img/s | vs dense | vs loop | peak MiB | mem vs dense | ops/step | dropped | max load |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        routing = "| - | - |" if r.dropped is None else f"| {r.dropped:.2f} | {r.max_load:.2f} |"
        spread = f" ({r.ratio_min:.2f}-{r.ratio_max:.2f})" if r.repeats > 1 else ""
        vs_loop = "-" if r.ratio_vs_loop is None else f"{r.ratio_vs_loop:.2f}"
        lines.append(f"| {r.case} | {r.mode} | {r.images_per_s:.0f} | {r.ratio_vs_dense:.2f}{spread} | {vs_loop} | "
                     f"{r.peak_mem_mib:.0f} | {r.mem_vs_dense:.2f} | {_ops_text(r)} {routing}")
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="every stage position and the no-capacity padded path")
    parser.add_argument("--batch-size", type=int, help="default: 512 on CUDA, 32 on CPU")
    parser.add_argument("--steps", type=int, help="timed steps per case (default: 30 on CUDA, 3 on CPU)")
    parser.add_argument("--mode", action="append", choices=["eager", "graph", "compile"],
                        help="execution modes (default: eager, plus graph on CUDA)")
    parser.add_argument("--skip", action="append", default=[],
                        choices=["classification", "memory", "epoch", "expert_parallel", "detection", "coco_eval"])
    parser.add_argument("--coco-oracle", default="../shared/data/coco-eval-oracle",
                        help="folder of the COCO-eval oracle, timed for the evaluation figure")
    parser.add_argument("--memory-batch-size", type=int, default=512,
                        help="batch size of the tensor-memory count (default 512, the GPU batch, on any device)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the classification cases this many times: the median ratio and its range")
    parser.add_argument("--only", help="regular expression: benchmark only the cases whose name it matches (dense always)")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    args = parser.parse_args(argv)
    try:
        check_arguments(args)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise HarnessError("--device cuda: no CUDA device is available")
        device = torch.device(args.device)
        cuda = device.type == "cuda"
        batch_size = args.batch_size or (512 if cuda else 32)
        steps = args.steps or (30 if cuda else 3)
        modes = args.mode or (["eager", "graph"] if cuda else ["eager"])
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if "graph" in modes and not cuda:
            raise HarnessError("--mode graph needs --device cuda")
        result: dict[str, Any] = {
            "device": device_name(device),
            "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__,
            "batch_size": batch_size,
            "steps": steps,
            "repeat": args.repeat,
        }
        print(f"# harness.bench on {result['device']}, batch {batch_size}, {steps} timed steps per case", flush=True)
        if "classification" not in args.skip:
            runs = []
            for run in range(args.repeat):
                if args.repeat > 1:
                    print(f"# classification, run {run + 1} of {args.repeat}", flush=True)
                runs.append(run_classification(device, args.full, batch_size, steps, modes, lambda s: print(s, flush=True),
                                               args.only))
            rows = merge_repeats(runs)
            result["classification"] = [asdict(r) for r in rows]
            print(format_table(rows), flush=True)
        if "memory" not in args.skip:
            try:
                memory = run_tensor_memory(args.full, args.memory_batch_size, lambda s: print(s, flush=True), args.only)
            except ImportError as exc:  # MemTracker is private PyTorch API: absent from older releases
                result["memory"] = None
                print(f"memory: skipped, this PyTorch cannot count it ({exc})", flush=True)
            else:
                result["memory"] = memory
                print(format_memory_table(memory), flush=True)
        if "epoch" not in args.skip:
            sizes = {} if cuda else {"train_images": 512, "val_images": 256}
            timing = epoch_time(device, batch_size=512 if cuda else 128, **sizes)
            result["epoch"] = timing
            print(f"epoch resnet18_moe E4 k2 L4 padded: {timing['train_images']} train + {timing['val_images']} "
                  f"val images in {timing['epoch_s']:.2f} s (train {timing['train_s']:.2f} s, eval {timing['eval_s']:.2f} s)",
                  flush=True)
        if "expert_parallel" not in args.skip:
            # Two CPU ranks over gloo on any machine: the harness's expert-parallel exchanges side by side.
            ep_batch = 16 if cuda else batch_size
            speeds = expert_parallel_throughput(2, ep_batch, steps)
            result["expert_parallel"] = {"ranks": 2, "backend": "gloo", "batch_size_per_rank": ep_batch,
                                         "loop_images_per_s": speeds["loop"], "padded_images_per_s": speeds["padded"],
                                         "padded_vs_loop": speeds["padded"] / speeds["loop"]}
            print(f"expert parallel resnet18_moe E4 k2 L4, 2 CPU ranks (gloo), batch {ep_batch} per rank: counted "
                  f"exchange {speeds['loop']:.1f} img/s, static exchange {speeds['padded']:.1f} img/s "
                  f"(x{speeds['padded'] / speeds['loop']:.2f})", flush=True)
        if "detection" not in args.skip:
            backbone, size, batch = ("resnet50", 512, 8) if cuda else ("resnet18", 160, 2)
            dense_speed, dense_mem = detection_throughput(False, device, batch, size, steps, backbone)
            moe_speed, moe_mem = detection_throughput(True, device, batch, size, steps, backbone)
            result["detection"] = {"backbone": backbone, "image_size": size, "batch_size": batch,
                                   "dense_images_per_s": dense_speed, "moe_images_per_s": moe_speed,
                                   "ratio_vs_dense": moe_speed / dense_speed, "dense_peak_mem_mib": dense_mem,
                                   "moe_peak_mem_mib": moe_mem}
            print(f"retinanet {backbone} {size}px batch {batch}: dense {dense_speed:.1f} img/s, MoE heads "
                  f"{moe_speed:.1f} img/s (x{moe_speed / dense_speed:.2f}); peak {dense_mem:.0f} / {moe_mem:.0f} MiB",
                  flush=True)
        if "coco_eval" not in args.skip:
            timing = coco_eval_time(args.coco_oracle)
            result["coco_eval"] = timing
            if timing is None:
                print(f"coco_eval: skipped, no oracle at {args.coco_oracle}", flush=True)
            else:
                print(f"coco_eval: {timing['images']} images, {timing['detections']} detections in "
                      f"{timing['seconds']:.2f} s (AP {timing['ap']:.3f})", flush=True)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        from .storage import Location

        try:
            Location(args.json).write_bytes(json.dumps(result, indent=2).encode())
        except OSError as exc:
            print(f"error: --json: cannot write {args.json} ({exc})", file=sys.stderr)
            return 2
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse bad arguments before anything runs (a full run takes minutes): sizes must be positive, ``--only``
    a regular expression, and the folder of ``--json`` writable."""
    for flag in ("batch_size", "steps", "memory_batch_size", "repeat"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise HarnessError(f"--{flag.replace('_', '-')}: must be a positive integer, got {value}")
    if args.only is not None:
        try:
            re.compile(args.only)
        except re.error as exc:
            raise HarnessError(f"--only: not a regular expression ({exc})") from None
    if args.json:
        from .storage import Location

        folder = Location(args.json).parent
        try:
            folder.check_writable()
        except OSError as exc:
            raise HarnessError(f"--json: {folder} is not writable ({exc})") from None


if __name__ == "__main__":
    sys.exit(main())
