"""The data-parallel group the MoE layer, the losses and the metrics reduce over: :class:`Collective`
(``torch.distributed`` sums and gathers; identities in one process, :data:`LOCAL`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient of every rank's copy is the sum of the copies' gradients."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class Collective:
    """Sums and gathers over the process group, or identities when not distributed.

    ``sum`` is differentiable (its backward sums the gradients over ranks), so a loss computed from globally
    reduced statistics back-propagates into every rank's share.
    """

    def __init__(self, group: Any = None, distributed: bool | None = None) -> None:
        """``distributed=None``: use the default process group when one is initialised."""
        self.group = group
        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized()
        self.distributed = distributed
        self.rank = dist.get_rank(group) if self.distributed else 0
        self.world_size = dist.get_world_size(group) if self.distributed else 1

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce sum, differentiable. Any shape."""
        if self.world_size == 1:
            return tensor
        return _AllReduceSum.apply(tensor, self.group)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place all-reduce sum without autograd (counts, gradients, buffers)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[...] -> [W, ...]``, not differentiable; every rank must pass the same shape."""
        if self.world_size == 1:
            return tensor.unsqueeze(0)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.stack(parts)

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Any picklable object from every rank, in rank order."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out


LOCAL = Collective(distributed=False)
