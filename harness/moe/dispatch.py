"""Dispatch tokens to experts and combine their weighted outputs.

One interface, ``dispatcher(x, routing, experts) -> y``, so an expert-parallel (all-to-all) or a
grouped fast path can replace the local one without touching the layer.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
from torch import nn

from .gates import global_avg_pool
from .routing import Routing


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
        if output is None:  # every assignment was dropped by the capacity limit
            with torch.no_grad():
                shape = experts[0](x[:1]).shape[1:]
            output = x.new_zeros((x.shape[0], *shape))
        return output


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
