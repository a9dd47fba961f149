"""The classification section: every case built, warmed up and timed in turns with a dense model of
its own (:func:`run_classification`), ``--repeat`` runs merged (:func:`merge_repeats`) and the ratio
table (:func:`format_table`)."""

from __future__ import annotations

import gc
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..models import create_model
from ..training.step_modes import capture_graph, side_stream
from .common import (
    CIFAR_CLASSES,
    Case,
    _autocast,
    _peak_memory_mib,
    _peak_memory_reset,
    _sync,
    classification_cases,
    count_ops,
    interleaved_step_seconds,
    make_step,
    routing_stats,
    spread_routing,
)

# torch.compile takes ~a minute per model: only the headline cases run in that mode.
COMPILED_CASES = ("dense", "moe_E4_k2_L4_padded_cf1", "moe_E10_k2_L4_padded_cf1")


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


def prepare_case(case: Case, device: torch.device, batch_size: int, mode: str, held_mib: float = 0.0) -> PreparedCase:
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
    if mode == "graph":  # the training loop's capture (harness.training.step_modes), on this fixed batch
        with side_stream(device):  # warm-up on a side stream, as CUDA graph capture requires
            for _ in range(warmup - 1):
                step()
            ops_per_step = sum(count_ops(step).values())
        warmup_peak = _peak_memory_mib(device)
        _peak_memory_reset(device)
        graph, _ = capture_graph(step, [optimizer])  # Adam made capturable for the capture
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
    kept = _tensor_mib(
        images,
        labels,
        *eager_model.parameters(),
        *eager_model.buffers(),
        *(p.grad for p in eager_model.parameters()),
        *(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)),
    )
    return PreparedCase(
        case, run, eager_model, images, peak - held_mib, max(peak, warmup_peak) - held_mib, ops_per_step, kept
    )


def _with_cudnn_benchmark(step: Callable[[], Any], benchmark: bool) -> Callable[[], Any]:
    def run() -> Any:
        torch.backends.cudnn.benchmark = benchmark
        return step()

    return run


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
        held = (
            (torch.cuda.memory_allocated(device) - group_start) / 2**20 if cuda else sum(p.tensor_mib for p in prepared)
        )
        prepared.append(prepare_case(case, device, batch_size, mode, held))
    seconds = interleaved_step_seconds([p.run for p in prepared], steps, lambda: _sync(device))
    speeds = [batch_size / s for s in seconds]
    loop_speed = next((speed for p, speed in zip(prepared, speeds) if p.case.name.endswith("_loop")), None)
    dense_mem, rows = prepared[0].peak_mem_mib, []
    for p, speed in zip(prepared, speeds):
        with _autocast(device):
            stats = routing_stats(p.eager_model, p.images)
        vs_loop = None if loop_speed is None or p.case.name == "dense" else speed / loop_speed
        rows.append(
            Row(
                p.case.name,
                mode,
                speed,
                speed / speeds[0],
                p.peak_mem_mib,
                p.peak_mem_mib / dense_mem,
                p.warmup_peak_mem_mib,
                ratio_vs_loop=vs_loop,
                ops_per_step=p.ops_per_step,
                **stats,
            )
        )
    return rows


def run_classification(
    device: torch.device,
    full: bool,
    batch_size: int,
    steps: int,
    modes: list[str],
    log: Callable[[str], None],
    only: str | None = None,
) -> list[Row]:
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
                log(
                    f"{row.case:32s} {row.mode:6s} {row.images_per_s:10.0f} img/s  x{row.ratio_vs_dense:5.2f}  "
                    f"{_vs_loop_text(row):>12s}  {row.peak_mem_mib:9.0f} MiB  x{row.mem_vs_dense:5.2f}  "
                    f"{_ops_text(row)} ops" + _routing_text(row)
                )
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
        merged.append(
            Row(
                **{
                    **asdict(median),
                    **{name: first[name] for name in MEMORY_FIELDS},
                    "repeats": len(same_case),
                    "ratio_min": by_ratio[0].ratio_vs_dense,
                    "ratio_max": by_ratio[-1].ratio_vs_dense,
                    "ratio_vs_loop": vs_loop[(len(vs_loop) - 1) // 2] if vs_loop else None,
                }
            )
        )
    return merged


def _ops_text(row: Row) -> str:
    return "-" if row.ops_per_step is None else str(row.ops_per_step)


def _vs_loop_text(row: Row) -> str:
    return "-" if row.ratio_vs_loop is None else f"{row.ratio_vs_loop:.2f} vs loop"


def _routing_text(row: Row) -> str:
    return "" if row.dropped is None else f"  dropped {row.dropped:4.2f}  max load {row.max_load:4.2f}"


def format_table(rows: list[Row]) -> str:
    """A Markdown table of the rows."""
    lines = [
        "| case | mode | img/s | vs dense | vs loop | peak MiB | mem vs dense | ops/step | dropped | max load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        routing = "| - | - |" if r.dropped is None else f"| {r.dropped:.2f} | {r.max_load:.2f} |"
        spread = f" ({r.ratio_min:.2f}-{r.ratio_max:.2f})" if r.repeats > 1 else ""
        vs_loop = "-" if r.ratio_vs_loop is None else f"{r.ratio_vs_loop:.2f}"
        lines.append(
            f"| {r.case} | {r.mode} | {r.images_per_s:.0f} | {r.ratio_vs_dense:.2f}{spread} | {vs_loop} | "
            f"{r.peak_mem_mib:.0f} | {r.mem_vs_dense:.2f} | {_ops_text(r)} {routing}"
        )
    return "\n".join(lines)
