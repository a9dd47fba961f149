"""Dispatch tokens to experts and combine their weighted outputs.

One interface, ``dispatcher(x, routing, experts) -> y``, so the reference loop, the static-shape fast
path and the expert-parallel (all-to-all) path can replace each other without touching the layer.

- :class:`LocalDispatcher`: the reference; gathers each expert's tokens (one host sync per expert).
- :class:`SortedDispatcher`: the reference's computation after one sort by expert (one host read per
  layer, no padding); the default without a capacity factor.
- :class:`PaddedDispatcher`: the fast path; tokens go into a capacity-padded buffer by positions computed
  on the device; experts of one structure run together as grouped convolutions (:mod:`.grouped`), others
  each on its own slice, with BatchNorm statistics that skip the padding (:class:`MaskedBatchNorm2d`);
  outputs are gathered back. Static shapes and no host sync, so it runs asynchronously and under CUDA
  graphs / ``torch.compile``. On CPU, where a host read is free and static shapes buy nothing, each
  expert runs on its valid slots alone (its ``execution`` option).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .gates import global_avg_pool
from .grouped import groupable, grouped_forward, masked_batch_norm
from .routing import Routing, expert_capacity


class Dispatcher(Protocol):
    """``x: [N, ...]`` tokens, a :class:`Routing`, the experts -> ``y: [N, ...out]``, the gate-weighted sum
    of the outputs of each token's dispatched experts."""

    def __call__(self, x: torch.Tensor, routing: Routing, experts: Sequence[nn.Module]) -> torch.Tensor: ...


class LocalDispatcher:
    """Every expert on this process; each runs on the tokens routed to it (gather -> expert -> scatter-add).

    This is the reference path (one host sync per expert to size its batch). Experts that get no token
    this batch are skipped.
    """

    def __call__(self, x: torch.Tensor, routing: Routing, experts: Sequence[nn.Module]) -> torch.Tensor:
        output: torch.Tensor | None = None
        for i, expert in enumerate(experts):
            token_ids = routing.dispatch_mask[:, i].nonzero().squeeze(1)
            if token_ids.numel() == 0:
                continue
            expert_out = expert(x.index_select(0, token_ids))
            weight = routing.gates[token_ids, i].to(expert_out.dtype)
            weighted = expert_out * weight.view(-1, *([1] * (expert_out.dim() - 1)))
            if output is None:
                output = expert_out.new_zeros((x.shape[0], *expert_out.shape[1:]))
            output = output.index_add(0, token_ids, weighted)
        if output is None:  # no expert got a token (all dropped by capacity, or every ReLU gate zero)
            output = x.new_zeros((x.shape[0], *output_shape(experts[0], x)))
        return output


def output_shape(expert: nn.Module, x: torch.Tensor) -> torch.Size:
    """The shape of ``expert``'s output for one token of ``x: [N, ...]`` (without the batch dimension),
    from a no-grad evaluation-mode call, so no BatchNorm statistic moves."""
    was_training = expert.training
    expert.eval()
    try:
        with torch.no_grad():
            return expert(x[:1]).shape[1:]
    finally:
        expert.train(was_training)


class SortedDispatcher:
    """Every expert on exactly its tokens, found by one sort: assignments ordered by expert, tokens
    gathered once, each expert run on its contiguous slice, outputs weighted and scattered back once.

    The same computation as :class:`LocalDispatcher` (experts with no token are skipped; plain BatchNorm
    statistics over exactly the routed tokens) with one host read per layer (the E slice sizes) instead of
    one per expert, one gather and one scatter instead of E of each, and no padding, so no capacity factor
    is needed. Not CUDA-graph capturable (the slice sizes are data). On CPU it runs level with the loop
    (convolutions dominate there); on a GPU it saves E - 1 host syncs per layer (not yet measured).

    ``x: [N, ...]``, a :class:`Routing`, the experts -> ``[N, ...out]``.
    """

    def __call__(self, x: torch.Tensor, routing: Routing, experts: Sequence[nn.Module]) -> torch.Tensor:
        n, k = routing.indices.shape
        num_experts = routing.num_experts
        order, counts = assignments_by_expert(routing)
        sizes = counts.tolist()  # the one host read
        order = order[: n * k - sizes[num_experts]]
        chunks = x.index_select(0, order // k).split(sizes[:num_experts])
        outputs = [expert(chunk) for expert, chunk in zip(experts, chunks) if chunk.shape[0] > 0]
        if not outputs:  # every assignment was dropped by the capacity limit
            return LocalDispatcher()(x, routing, experts)
        return combine_sorted(torch.cat(outputs), order, routing)


def soft_dispatch(x: torch.Tensor, routing: Routing, experts: Sequence[nn.Module]) -> torch.Tensor:
    """Soft MoE (Puigcerver et al. 2024): every slot's input is a weighted mix of all N tokens, expert i runs
    on its p slots, and every token's output is a weighted mix of all slots' outputs. ``x: [N, ...]``, a
    ``soft`` :class:`Routing` (``slot_dispatch``, ``slot_combine``: ``[N, E * p]``), the E experts ->
    ``[N, ...out]``. Tokens are whole per-sample feature maps, so the slots mix the batch's samples."""
    dispatch = routing.slot_dispatch.to(x.dtype)
    slots = (dispatch.t() @ x.flatten(1)).view(dispatch.shape[1], *x.shape[1:])  # [E * p, ...]
    per_expert = dispatch.shape[1] // len(experts)
    outputs = torch.cat([expert(part) for expert, part in zip(experts, slots.split(per_expert))])
    combine = routing.slot_combine.to(outputs.dtype)
    return (combine @ outputs.flatten(1)).view(x.shape[0], *outputs.shape[1:])


def combine_sorted(out: torch.Tensor, order: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Gate-weighted sum per token of outputs in assignment order: ``out: [A, ...]`` the outputs of the
    assignments ``order: [A]`` (flat indices ``token * k + j``, e.g. the kept head of
    :func:`assignments_by_expert`) -> ``[N, ...]``."""
    weight = routing.weights.reshape(-1).index_select(0, order).to(out.dtype)
    weighted = out * weight.view(-1, *([1] * (out.dim() - 1)))
    return weighted.new_zeros((routing.indices.shape[0], *out.shape[1:])).index_add_(0, order // routing.k, weighted)


def assignments_by_expert(routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """The N x k token-expert assignments (flat index ``token * k + j``) ordered by expert, each expert's
    in token order, dropped ones last; no host read. Returns ``order: [N * k]`` long and ``counts:
    [E + 1]`` long (assignments per expert, then the dropped)."""
    num_experts = routing.num_experts
    kept = routing.dispatch_mask.gather(1, routing.indices)  # [N, k]
    expert_of = torch.where(kept, routing.indices, torch.full_like(routing.indices, num_experts)).reshape(-1)
    return expert_of.argsort(stable=True), torch.bincount(expert_of, minlength=num_experts + 1)


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover only the valid rows of a padded batch.

    ``valid: [N] bool`` is set by the dispatcher before the expert runs (None = plain BatchNorm2d, so the
    reference path and evaluation are unchanged). Batch mean and biased variance are taken over valid rows
    (x H x W) as ``F.batch_norm`` does; the running statistics (unbiased variance) and
    ``num_batches_tracked`` move only when at least one row is valid, as when the reference skips an
    expert that got no token. Same parameters and buffers as ``nn.BatchNorm2d``, so checkpoints load into
    either. ``[N, C, H, W] -> [N, C, H, W]``.
    """

    valid: torch.Tensor | None = None

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> MaskedBatchNorm2d:
        """A masked copy sharing ``bn``'s parameters and buffers (the same tensors, not copies)."""
        masked = cls.__new__(cls)
        masked.__dict__.update(bn.__dict__)  # the same parameter and buffer dicts, hooks, flags
        return masked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.valid is None or not self.training or not self.track_running_stats or self.momentum is None:
            return super().forward(x)
        return masked_batch_norm([self], x, self.valid.view(-1, 1))


def mask_batchnorms(expert: nn.Module) -> list[MaskedBatchNorm2d]:
    """Swap every ``nn.BatchNorm2d`` in ``expert`` for a :class:`MaskedBatchNorm2d` sharing its tensors
    (state_dict keys unchanged); return them so a dispatcher can set their ``valid`` masks."""
    masked = []
    for module in list(expert.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.BatchNorm2d:
                setattr(module, child_name, MaskedBatchNorm2d.from_batchnorm(child))
    for module in expert.modules():
        if isinstance(module, MaskedBatchNorm2d):
            masked.append(module)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"padded dispatch supports BatchNorm2d only, not {type(module).__name__}")
    return masked


class PaddedDispatcher:
    """Static-shape dispatch: no ``.nonzero()``, ``.item()`` or data-dependent shape on the hot path (except
    in the ``valid_rows`` execution, CPU's default, below).

    Each expert gets ``capacity`` slots: ``ceil(cf * k * N / E)`` when the routing has a capacity factor
    (``Routing.capacity_factor``: the router already dropped what does not fit), else N (every token could
    pick the same expert; exact but as costly as running every expert on every token). A token's slot in
    its expert is the running count of earlier tokens routed there (a cumsum on the device). Results equal
    :class:`LocalDispatcher`'s up to floating-point summation order (tested).

    The slot buffer is not kept for backward: the experts' first convolutions save it as the gather it
    came from (:func:`saved_as_gather`), which backward repeats (tensor memory of a step with k=2: 7% less at
    stage 1, 4% at stage 2).

    ``execution``, how the experts run over the buffer (the same results every way, to float rounding):

    - ``"grouped"``: experts of one supported structure (:func:`~harness.moe.grouped.groupable`) at once, as
      grouped convolutions over a ``[capacity, E * C, H, W]`` buffer; other experts as ``"masked"``.
    - ``"masked"``: each expert on its whole ``[capacity, C, H, W]`` slice, with BatchNorms whose
      statistics skip the padding (:class:`MaskedBatchNorm2d`). Static shapes, no host read.
    - ``"valid_rows"``: each expert on its valid slots alone, with plain BatchNorms: the reference's
      computation, after one host read per layer (the E counts). Where the host is the device (CPU) that
      read costs nothing, and the padded rows and masked BatchNorms (~60 small ops per BatchNorm, each
      paying the framework's per-op cost) are not worth their static shapes: at batch 4 they made an
      E=10 step ~25% slower than the loop on CPU. Not CUDA-graph capturable.
    - ``None`` (default): ``"grouped"`` on CUDA, where one kernel instead of E pays and a host read is a
      sync; ``"valid_rows"`` on CPU; ``"masked"`` elsewhere (meta tensors, other accelerators). On CPU,
      oneDNN's grouped-convolution backward ran 1.5-2x slower than E separate ones at ResNet-stage shapes.

    ``x: [N, ...]``, a :class:`Routing`, the experts -> ``[N, ...out]``.
    """

    EXECUTIONS = ("grouped", "masked", "valid_rows")

    def __init__(self, execution: str | None = None) -> None:
        if execution not in (None, *self.EXECUTIONS):
            raise ValueError(f"execution: {execution!r} is not one of {self.EXECUTIONS} or None")
        self.execution = execution
        self._masked: dict[int, list[MaskedBatchNorm2d]] = {}
        self._groupable: dict[tuple[int, ...], bool] = {}

    @staticmethod
    def capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float | None) -> int:
        """Slots per expert for a batch of ``num_tokens`` routed under ``capacity_factor`` (the routing's;
        None = no limit: room for the whole batch)."""
        if capacity_factor is None:
            return num_tokens
        return min(num_tokens, expert_capacity(num_tokens, num_experts, k, capacity_factor))

    def _norms(self, expert: nn.Module) -> list[MaskedBatchNorm2d]:
        if id(expert) not in self._masked:
            self._masked[id(expert)] = mask_batchnorms(expert)
        return self._masked[id(expert)]

    def execution_for(self, experts: Sequence[nn.Module], device: torch.device) -> str:
        """The way ``experts`` run on ``device``: ``execution`` resolved (see the class docstring)."""
        execution = self.execution or {"cuda": "grouped", "cpu": "valid_rows"}.get(device.type, "masked")
        if execution == "grouped":
            key = tuple(id(e) for e in experts)
            if key not in self._groupable:
                self._groupable[key] = groupable(experts)
            return execution if self._groupable[key] else "masked"
        return execution

    def make_static(self, experts: Sequence[nn.Module], device: torch.device) -> None:
        """No host read from now on: ``valid_rows`` (or the default) becomes ``grouped`` on CUDA, ``masked``
        elsewhere; experts that will run masked get their masked BatchNorms now, not at the first call, so
        ``torch.compile`` or a CUDA graph sees the final modules (a later swap would recompile)."""
        if self.execution in (None, "valid_rows"):
            self.execution = "grouped" if device.type == "cuda" else "masked"
        if self.execution_for(experts, device) == "masked":
            for expert in experts:
                self._norms(expert)

    def run_experts(self, experts: Sequence[nn.Module], buffer: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Every expert on its slots. ``buffer: [S, E, C, H, W]`` (slot s of expert e; padding rows hold
        anything finite), ``valid: [S, E]`` bool (which slots hold a token, a prefix of each expert's slots
        as :func:`padded_slots` fills them: BatchNorm statistics use only those) -> ``[S, E, C', H', W']``
        (padding rows: anything finite)."""
        slots, num_experts = buffer.shape[:2]
        execution = self.execution_for(experts, buffer.device)
        if execution == "grouped":
            out = grouped_forward(experts, buffer.flatten(1, 2), valid)
            return out.view(slots, num_experts, -1, *out.shape[2:])
        if execution == "valid_rows":
            out = _run_on_valid_rows(experts, buffer, valid.sum(dim=0).tolist())
            if out is not None:
                return out
        outputs = []  # masked (or every slot empty: the masked path keeps every expert's statistics)
        # unbind, not buffer[:, e]: its backward is one stack, where E selects would each fill a zero
        # buffer-sized gradient (E^2 buffer rows of memory traffic per step).
        for e, (expert, tokens) in enumerate(zip(experts, buffer.unbind(1))):
            norms = self._norms(expert)
            for norm in norms:
                norm.valid = valid[:, e]
            try:
                outputs.append(expert(tokens))
            finally:
                for norm in norms:
                    norm.valid = None
        return torch.stack(outputs, dim=1)

    def __call__(self, x: torch.Tensor, routing: Routing, experts: Sequence[nn.Module]) -> torch.Tensor:
        n, num_experts, k = x.shape[0], routing.num_experts, routing.k
        # Expert choice fixes the global slots; this rank's tokens need at most n of them.
        capacity = (
            min(routing.capacity, n)
            if routing.capacity is not None
            else self.capacity(n, num_experts, k, routing.capacity_factor)
        )
        slot, token_of_slot, valid = padded_slots(routing, capacity)
        if self.execution_for(experts, x.device) == "grouped" and _is_channels_last(x):
            # Grouped convolutions want [S, E * C, H, W] in x's layout: gather pixels, not images, so the
            # buffer is born channels_last (a row gather would give NCHW, which each convolution and the
            # combine would copy, and the copy, not the gather, would be what backward keeps).
            source, index = slot_pixels(x, token_of_slot, num_experts)
            gathered = source.index_select(0, index)  # [S * H * W * E, C]
            buffer = gathered.view(capacity, *x.shape[2:], num_experts, x.shape[1]).permute(0, 3, 4, 1, 2)
        else:
            source, index = x, token_of_slot
            gathered = x.index_select(0, index)
            buffer = gathered.view(capacity, num_experts, *x.shape[1:])
        with saved_as_gather(gathered, source, index):
            out = self.run_experts(experts, buffer, valid)
        return combine_slots(out, slot, routing.weights, slot < capacity * num_experts)


def _is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x: [N, C, H, W]`` lies channels_last and not also NCHW (one pixel or one channel)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def slot_pixels(x: torch.Tensor, token_of_slot: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The slot buffer of a channels_last ``x: [N, C, H, W]`` as a gather of pixels. Returns ``pixels:
    [N * H * W, C]`` (a view of x) and ``index: [S * H * W * E]``; ``pixels.index_select(0, index)`` viewed
    as ``[S, H, W, E * C]`` is the grouped experts' ``[S, E * C, H, W]`` buffer in channels_last order, slot
    s of expert e in channel group e (``token_of_slot: [S * E]``, slot-major, as :func:`padded_slots`)."""
    n, channels, height, width = x.shape
    pixels = x.permute(0, 2, 3, 1).reshape(n * height * width, channels)  # a view: x is channels_last
    pixel = torch.arange(height * width, device=x.device).view(1, -1, 1)
    index = token_of_slot.view(-1, 1, num_experts) * (height * width) + pixel  # [S, H * W, E]
    return pixels, index.reshape(-1)


def _run_on_valid_rows(experts: Sequence[nn.Module], buffer: torch.Tensor, counts: list[int]) -> torch.Tensor | None:
    """Expert e on the first ``counts[e]`` slots of ``buffer: [S, E, C, H, W]`` (its tokens) ->
    ``[S, E, C', H', W']``, zeros in the padding rows; an expert without a token is skipped, as the
    reference skips it. None when no expert has a token (then no output shape is known)."""
    slots = buffer.shape[0]
    outputs = [
        expert(tokens[:count]) if count else None for expert, tokens, count in zip(experts, buffer.unbind(1), counts)
    ]
    template = next((out for out in outputs if out is not None), None)
    if template is None:
        return None
    return torch.stack(
        [
            F.pad(out, (0, 0) * (out.dim() - 1) + (0, slots - out.shape[0]))
            if out is not None
            else template.new_zeros((slots, *template.shape[1:]))
            for out in outputs
        ],
        dim=1,
    )


@contextlib.contextmanager
def saved_as_gather(gathered: torch.Tensor, source: torch.Tensor, index: torch.Tensor) -> Iterator[None]:
    """While active, a tensor autograd saves that views ``gathered`` (``source.index_select(0, index)``:
    ``source: [N, ...]``, ``index: [R]`` -> ``[R, ...]``) is saved as that recipe and gathered again in
    backward. So the padded slot buffer (k x capacity factor x N rows of the layer's input, which the
    experts' first convolutions save) is not kept until backward; ``source``, the layer's input, is kept
    by the layer before it anyway. Exact: a gather repeats bit for bit, and a view saved after the buffer
    was changed in place is kept as it is.

    Off without gradients, under ``torch.compile`` and inside other saved-tensor
    hooks (activation checkpointing, ``save_on_cpu``), which it would otherwise override. Raises in
    backward if ``source`` was modified in place after the forward, as autograd does for a saved tensor.
    """
    if torch.compiler.is_compiling() or not torch.is_grad_enabled():
        yield  # checked first: Dynamo cannot trace the private call below (a graph break in every layer)
        return
    # private API (the innermost active hooks); where a release lacks it, stay off rather than override
    outer_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", lambda _: True)(False)
    if outer_hooks is not None:
        yield
        return
    version, buffer_version = source._version, gathered._version
    row_shape, row_numel = tuple(gathered.shape[1:]), math.prod(gathered.shape[1:])
    row_strides = gathered.stride()[1:]
    # Autograd keeps both hooks with every tensor saved under them: a strong reference here would keep
    # the buffer alive through backward.
    gathered_ref = weakref.ref(gathered)
    del gathered

    def pack(tensor: torch.Tensor) -> object:
        buffer = gathered_ref()
        if buffer is None or (tensor is not buffer and tensor._base is not buffer) or tensor._version != buffer_version:
            return tensor  # not the buffer, or no longer its gathered values (an expert changed it in place)
        return (tensor.shape, tensor.stride(), tensor.storage_offset())

    def unpack(packed: object) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if source._version != version:
            raise RuntimeError(
                "the input of a padded MoE layer was modified in place after its forward; backward needs it unchanged"
            )
        shape, stride, offset = packed
        if (
            tuple(shape[1:]) == row_shape
            and tuple(stride[1:]) == row_strides
            and stride[0] > 0
            and stride[0] % row_numel == 0
            and offset % row_numel == 0
        ):
            # whole rows, evenly spaced (one expert's slots of a slot-major buffer): gather just those
            first, step = offset // row_numel, stride[0] // row_numel
            return source.index_select(0, index[first : first + step * (shape[0] - 1) + 1 : step])
        return source.index_select(0, index).as_strided(shape, stride, offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def combine_slots(out: torch.Tensor, slot: torch.Tensor, weights: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Gate-weighted sum of each token's expert outputs read from their slots.

    ``out: [S, E, ...]`` expert outputs (row ``s * E + e``: slot s of expert e, in any memory layout),
    ``slot: [N, k]`` each assignment's row (any value where not ``kept``; a row holds at most one kept
    assignment), ``weights: [N, k]`` gate weights, ``kept: [N, k]`` bool -> ``[N, ...]``, in the layout of
    one expert's output (channels_last stays channels_last). Dropped assignments read some row (finite:
    padding holds real tokens or zeros) and count 0.

    Each row is weighted where it lies and then read back per token, so the weights' gradient needs
    ``out`` itself, which the expert's last ReLU keeps anyway, rather than a gathered ``[N, k, ...]`` copy
    (saved activations of resnet18_moe E4 k2 padded: 6.4% fewer at stage 1, 3.5% at stage 2).
    """
    n, k = slot.shape
    slots, num_experts = out.shape[:2]
    rows, ones = slots * num_experts, [1] * (out.dim() - 2)
    row = torch.where(kept, slot, torch.full_like(slot, rows))  # dropped -> a spare entry, cut off below
    kept_weights = torch.where(kept, weights, torch.zeros_like(weights)).to(out.dtype)
    row_weight = kept_weights.new_zeros(rows + 1).scatter(0, row.reshape(-1), kept_weights.reshape(-1))[:rows]
    weighted = out * row_weight.view(slots, num_experts, *ones)
    chosen = _gather_rows(weighted, row.clamp_max(rows - 1).reshape(-1)).view(n, k, *out.shape[2:])
    return _sum_keeping_layout(chosen * kept.to(out.dtype).view(n, k, *ones), dim=1)


def _gather_rows(out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[s, e]`` for each row ``s * E + e`` of ``rows: [R]``; ``out: [S, E, ...]`` -> ``[R, ...]``.
    Grouped experts' channels_last outputs ``[S, E, C, H, W]`` lie in memory as ``[S, H, W, E, C]``,
    where slot and expert do not merge into one row dimension: they are read pixel by pixel rather than
    copied into rows first."""
    slots, num_experts = out.shape[:2]
    if out.dim() == 5 and not out.is_contiguous() and out.permute(0, 3, 4, 1, 2).is_contiguous():
        channels, height, width = out.shape[2:]
        pixels = out.permute(0, 3, 4, 1, 2).reshape(-1, channels)  # a view: [S * H * W * E, C]
        pixel = torch.arange(height * width, device=out.device).view(1, -1)
        slot, expert = (rows // num_experts).view(-1, 1), (rows % num_experts).view(-1, 1)
        index = (slot * (height * width) + pixel) * num_experts + expert  # [R, H * W]
        gathered = pixels.index_select(0, index.reshape(-1))
        return gathered.view(-1, height, width, channels).permute(0, 3, 1, 2)  # [R, C, H, W] channels_last
    return out.reshape(slots * num_experts, *out.shape[2:]).index_select(0, rows)  # a view unless odd strides


def _sum_keeping_layout(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.sum(dim)`` laid out in memory as ``x`` is. Reductions allocate contiguous outputs, so a
    channels_last ``x`` would come out NCHW and the next convolution would copy it back."""
    if torch.compiler.is_compiling():
        return x.sum(dim=dim)  # the compiler picks layouts itself; the sort below is a graph break in Dynamo
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))  # x's dims outermost first in memory
    summed = x.permute(order).sum(dim=order.index(dim))
    kept_order = [d for d in order if d != dim]
    return summed.permute([kept_order.index(d) for d in range(x.dim()) if d != dim])


def padded_slots(routing: Routing, capacity: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each kept assignment goes in an ``[capacity * E]`` buffer, on the device. Slot-major rows:
    row ``s * E + e`` is slot s of expert e, so the buffer views as ``[capacity, E, ...]`` (channel groups
    for grouped experts) without a transpose.

    Returns ``slot: [N, k]`` long (``capacity * E`` for dropped assignments), ``token_of_slot:
    [capacity * E]`` long (the token in each slot; 0 in empty slots) and ``valid: [capacity, E]`` bool.
    """
    dispatch = routing.dispatch_mask  # [N, E]
    num_experts = dispatch.shape[1]
    position = dispatch.long().cumsum(dim=0) - 1  # [N, E]: this token's rank among the expert's tokens
    kept = dispatch.gather(1, routing.indices)  # [N, k]
    pos = position.gather(1, routing.indices)
    trash = num_experts * capacity
    row = pos * num_experts + routing.indices
    slot = torch.where(kept & (pos < capacity), row, torch.full_like(pos, trash))
    tokens = torch.arange(dispatch.shape[0], device=dispatch.device).view(-1, 1).expand_as(slot)
    token_of_slot = torch.zeros(trash + 1, dtype=torch.long, device=dispatch.device)
    token_of_slot = token_of_slot.scatter(0, slot.reshape(-1), tokens.reshape(-1))[:trash]
    counts = dispatch.sum(dim=0).clamp_max(capacity)  # [E]
    valid = torch.arange(capacity, device=dispatch.device).view(-1, 1) < counts.view(1, -1)
    return slot, token_of_slot, valid


def combine_dense(expert_outputs: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Weighted sum of outputs already computed for every token by every expert.

    ``expert_outputs: [N, E, ...] -> [N, ...]``; assignments dropped by capacity contribute nothing.
    """
    weights = (routing.gates * routing.dispatch_mask).to(expert_outputs.dtype)
    weights = weights.view(*weights.shape, *([1] * (expert_outputs.dim() - 2)))
    return (expert_outputs * weights).sum(dim=1)


def expert_forward_with_hidden(expert: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output [N, ...], hidden [N, D])``: an expert's output and the hidden features an attentive gate
    keys on; the expert's own ``forward_with_hidden`` when it has one, else the pooled output."""
    forward_with_hidden = getattr(expert, "forward_with_hidden", None)
    if forward_with_hidden is not None:
        return forward_with_hidden(x)
    out = expert(x)
    return out, global_avg_pool(out)
